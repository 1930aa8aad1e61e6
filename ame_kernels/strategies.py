"""Stateful strategies from a merge config: greedy AME, stew, and model soups.

A config picks one with ``strategy:`` (absent or ``ame``: the plain ``ak.merge``
run of the CLI engine). The others need whole models in memory (``evaluate``
scores whole candidates), so they load the checkpoints as state dicts:

    strategy: greedy            # greedy_merge: evaluate:, start: worst|best (default worst)
    strategy: stew              # Stew over the schedule's batches: mode: server|merge (default server)
    strategy: greedy_soup       # greedy_soup: evaluate:
    strategy: uniform_soup
    strategy: weighted_soup     # weights: [a_1, ..., a_N], normalize: true|false
    evaluate: my_pkg.evals:val_accuracy   # 'module:function' or 'path/to/file.py:function'

``evaluate`` gets the candidate as a state dict (name -> tensor) and returns a
number, higher is better. Per-model ``score:`` entries (config.scores) order the
greedy strategies; without them ``evaluate`` scores every model first.

``run_strategy`` is the Python entry (state dicts in, state dict out); ``run_cli``
runs a whole ``ame-merge CONFIG.yaml OUT_DIR`` whose config names a strategy
(``config_strategy`` tells the CLI whether it does).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from .config import FIELD_NAMES, AMEConfig, make_config, read_yaml
from .errors import MergeError

STRATEGIES = ("greedy", "stew", "greedy_soup", "uniform_soup", "weighted_soup")
#: keys a strategy config may hold besides the CLI's own (models, pivot, engine keys, AMEConfig fields).
STRATEGY_KEYS = ("strategy", "evaluate", "start", "mode", "weights", "normalize", "base")


def load_callable(spec: Any, base_dir: Optional[str] = None, what: str = "evaluate") -> Callable:
    """'module:function' (dotted attributes allowed) or 'path/to/file.py:function' -> the callable."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise MergeError(f"{what}: expected 'module:function' or 'file.py:function', got {spec!r}")
    mod_name, attr = spec.split(":")
    try:
        if mod_name.endswith(".py"):
            path = mod_name if os.path.isabs(mod_name) or base_dir is None else os.path.join(base_dir, mod_name)
            if not os.path.isfile(path):
                raise MergeError(f"{what}: {path}: no such file")
            name = f"_ame_evaluate_{abs(hash(os.path.abspath(path)))}"
            loader = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            if base_dir is not None and base_dir not in sys.path:
                sys.path.insert(0, base_dir)  # modules beside the config file, as the user would expect
            module = importlib.import_module(mod_name)
    except MergeError:
        raise
    except Exception as e:  # noqa: BLE001 (any import failure is the user's module: one clear line)
        raise MergeError(f"{what}: cannot import {mod_name!r} ({type(e).__name__}: {e})") from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise MergeError(f"{what}: {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise MergeError(f"{what}: {spec!r} is a {type(obj).__name__}, not a callable")
    return obj


def _stew_pivot(config: AMEConfig, dicts: List[dict]):
    pivot = config.pivot
    if isinstance(pivot, str):  # 'soup': the fp32 mean (non-floating tensors from the first model)
        return {k: (torch.stack([d[k].float() for d in dicts]).mean(0) if dicts[0][k].is_floating_point() else dicts[0][k])
                for k in dicts[0]}
    if isinstance(pivot, int):
        if not -len(dicts) <= pivot < len(dicts):
            raise MergeError(f"stew: pivot index {pivot} is out of range for {len(dicts)} models")
        return dicts[pivot]
    if isinstance(pivot, dict):
        return pivot
    raise MergeError(f"stew: pivot must be 'soup', a model index or a state dict, got {type(pivot).__name__}")


def run_strategy(strategy: str, state_dicts: Sequence[Dict[str, torch.Tensor]], config: Any,
                 yaml_entry: Optional[dict] = None, base_dir: Optional[str] = None,
                 log: Optional[Callable[[str], None]] = None) -> Dict[str, torch.Tensor]:
    """Run ``strategy`` on ``state_dicts`` with ``config`` (AMEConfig or dict) and the strategy's
    own keys from ``yaml_entry`` (evaluate, start, mode, weights, normalize); returns the merged state dict.

    base_dir: where relative 'file.py:function' paths and modules are looked up. log: gets one
    line per greedy step / a summary line.
    """
    entry = dict(yaml_entry or {})
    if strategy not in STRATEGIES:
        raise MergeError(f"strategy: unknown strategy {strategy!r}; valid choices: {', '.join(map(repr, STRATEGIES))} "
                         "(or 'ame', the plain merge)")
    cfg = make_config(config)
    dicts = [dict(d) for d in state_dicts]
    if not dicts or not all(isinstance(d, dict) for d in dicts):
        raise MergeError("strategy: state_dicts must be a non-empty list of state dicts")
    say = log or (lambda line: None)
    scores = cfg.scores
    common = dict(backend=cfg.backend, out_dtype=cfg.out_dtype, threads=cfg.threads, check_finite=cfg.check_finite)

    def need_evaluate() -> Callable:
        if "evaluate" not in entry:
            raise MergeError(f"strategy {strategy!r}: needs 'evaluate: module:function' (candidate state dict -> score)")
        return load_callable(entry["evaluate"], base_dir)

    if strategy == "greedy":
        from .greedy import greedy_merge

        start = entry.get("start", "worst")
        evaluate = need_evaluate()
        # greedy starts at its start model unless the config names a model index as the pivot
        pivot = cfg.pivot if isinstance(cfg.pivot, int) else None
        merged, history = greedy_merge(dicts, evaluate, cfg.replace(scores=None, order=None, pivot="soup"), scores=scores,
                                       start=start, pivot=pivot)
        for h in history:
            say(f"greedy: step with {h.ingredient}: score {h.score:.6g} {'kept' if h.accepted else 'reverted'}")
        say(f"greedy: kept {sum(h.accepted for h in history)} of {len(history)} steps")
        return merged
    if strategy == "greedy_soup":
        from .soups import greedy_soup

        evaluate = need_evaluate()
        soup, history = greedy_soup(dicts, evaluate, scores, **common)
        for h in history:
            say(f"greedy_soup: model {h.ingredient}: score {h.score:.6g} {'kept' if h.accepted else 'skipped'}")
        return soup
    if strategy == "uniform_soup":
        from .soups import uniform_soup

        return uniform_soup(dicts, **common)
    if strategy == "weighted_soup":
        from .soups import weighted_soup

        if "weights" not in entry:
            raise MergeError("strategy 'weighted_soup': needs 'weights: [a_1, ..., a_N]'")
        weights = entry["weights"]
        if not isinstance(weights, (list, tuple)):
            raise MergeError(f"strategy 'weighted_soup': weights must be a list, got {weights!r}")
        from .config import _as_bool

        normalize = _as_bool("normalize", entry.get("normalize", True))
        return weighted_soup(dicts, weights, normalize=normalize, **common)
    # stew: the schedule's batches (order, scores, batch_size, epochs, shuffle), one add() each.
    from .api import _check_structure
    from .schedule import schedule
    from .stew import Stew

    _check_structure(dicts)
    mode = entry.get("mode", "server")
    plan = schedule(cfg, len(dicts))
    pivot = _stew_pivot(cfg, dicts)
    amplification = None
    if mode == "server" and cfg.amplification != 1.0:  # the config's zeta_t replaces the server default t+1
        amplification, cfg = cfg.amplification, cfg.replace(amplification=1.0)
    stew = Stew(pivot, cfg.replace(pivot="soup", order=None, scores=None), mode=mode,
                n=len(dicts) if mode == "merge" else None, amplification=amplification,
                dtypes_like=dicts[0])  # as merge: the first model's dtypes
    for t in range(1, plan.steps + 1):
        stew.add([dicts[i] for i in plan.batch(t)])
    say(f"stew ({mode}): {stew.t} steps")
    return stew.weights


# --------------------------------------------------------------------------- the CLI path


def _read_yaml(path: str) -> dict:
    doc = read_yaml(path)
    if not isinstance(doc, dict):
        raise MergeError(f"{path}: expected a mapping with a 'models:' list, got {type(doc).__name__}")
    return doc


def config_strategy(path: str) -> Optional[str]:
    """The config's strategy if it names one of STRATEGIES, else None (plain merge, or unreadable: the CLI reports it)."""
    try:
        doc = _read_yaml(path)
    except MergeError:
        return None
    s = doc.get("strategy")
    return None if s in (None, "ame") else str(s)


def load_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """A whole checkpoint (folder or file) as a state dict, through the engine's reader."""
    import numpy as np

    from .io.checkpoint import open_checkpoint

    ckpt = open_checkpoint(path)
    try:
        out = {}
        for name, info in ckpt.tensors.items():
            v = np.array(ckpt.view(name, 0, info.numel))  # a copy: the file is closed below
            t = torch.from_numpy(v)
            if info.dtype == "bfloat16":
                t = t.view(torch.int16).view(torch.bfloat16)
            elif info.dtype == "float64":
                t = t.float()  # kernels read fp32/bf16/fp16; fp64 checkpoints merge in fp32
            out[name] = t.reshape(info.shape)
        return out
    finally:
        ckpt.close()


def load_strategy_spec(path: str, overrides: Optional[dict] = None) -> tuple:
    """(strategy, model paths, AMEConfig, strategy entry, config dir) from a strategy config."""
    from .cli import ENGINE_KEYS, _resolve_path

    doc = _read_yaml(path)
    base = os.path.dirname(os.path.abspath(path))
    allowed = ("models", "pivot") + tuple(ENGINE_KEYS) + STRATEGY_KEYS + tuple(f for f in FIELD_NAMES if f != "pivot")
    for key in doc:
        if key not in allowed:
            raise MergeError(f"{path}: unknown key {key!r}")
    strategy = doc.get("strategy")
    if strategy not in STRATEGIES:
        raise MergeError(f"{path}: strategy: expected one of {', '.join(STRATEGIES)} (or 'ame'), got {strategy!r}")
    models_raw = doc.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise MergeError(f"{path}: 'models' must be a non-empty list of {{path: ..., score: ...}} entries")
    models, scores = [], []
    for i, m in enumerate(models_raw):
        m = {"path": m} if isinstance(m, str) else m
        if not isinstance(m, dict) or "path" not in m or set(m) - {"path", "score"}:
            raise MergeError(f"{path}: models[{i}]: expected a path or {{path: ..., score: ...}}, got {m!r}")
        models.append(_resolve_path(m["path"], base, f"{path}: models[{i}].path"))
        scores.append(m.get("score"))
    fields = {k: v for k, v in doc.items() if k in FIELD_NAMES and k != "pivot"}
    if any(s is not None for s in scores):
        if not all(s is not None for s in scores):
            raise MergeError(f"{path}: give a score to every model or to none")
        fields["scores"] = scores
    pivot = doc.get("pivot", "soup")
    if isinstance(pivot, str) and pivot.strip() != "soup" and not pivot.strip().lstrip("-").isdigit():
        raise MergeError(f"{path}: pivot: strategies take 'soup' or a model index, got {pivot!r}")
    fields["pivot"] = pivot
    fields.update(overrides or {})
    try:
        cfg = AMEConfig.from_dict(fields)
    except MergeError as e:
        raise MergeError(f"{path}: {e}") from None
    entry = {k: doc[k] for k in STRATEGY_KEYS if k in doc}
    return strategy, models, cfg, entry, base


def run_cli(args) -> int:
    """``ame-merge CONFIG.yaml OUT_DIR`` for a config with ``strategy:`` (argparse namespace of cli.build_parser)."""
    from safetensors.torch import save_file

    from .io.atomic import AtomicDir, check_target
    from .io.checkpoint import aux_files_in, copy_aux_files

    def error(msg: str) -> int:
        print(f"ame-merge: error: {msg}", file=sys.stderr)
        return 2

    overrides = {k: v for k, v in (("backend", args.backend), ("threads", args.threads), ("out_dtype", args.out_dtype))
                 if v is not None}
    try:
        strategy, models, cfg, entry, base = load_strategy_spec(args.config, overrides)
        protect = list(models) + [args.config]  # --force never replaces an input or the config
        if not args.dry_run:
            check_target(args.out_dir, args.force, protect=protect)
        if args.dry_run:
            print(f"strategy: {strategy}\nmodels ({len(models)}):\n" + "\n".join(f"  [{i}] {m}" for i, m in enumerate(models)))
            return 0
        if "evaluate" in entry:  # an import error is reported before any checkpoint is read
            entry["evaluate"] = load_callable(entry["evaluate"], base)
        device = args.device if getattr(args, "device", None) else "cpu"
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            raise MergeError(f"--device: expected cpu, cuda or cuda:N, got {device!r}") from None
        dicts = [{k: v.to(dev) for k, v in load_state_dict(m).items()} for m in models]
        log = None if args.quiet else (lambda line: print(line, file=sys.stderr))
        merged = run_strategy(strategy, dicts, cfg, entry, base_dir=base, log=log)
        out = AtomicDir(args.out_dir, args.force, protect=protect)
        with out as tmp:  # the folder appears complete or not at all
            save_file({k: v.detach().cpu().contiguous() for k, v in merged.items()}, os.path.join(tmp, "model.safetensors"),
                      metadata={"format": "pt", "ame_strategy": strategy})
            src = models[cfg.pivot] if isinstance(cfg.pivot, int) else models[0]
            folder = src if os.path.isdir(src) else os.path.dirname(src)
            copy_aux_files(aux_files_in(folder), tmp)
            out.commit()
        if not args.quiet:
            print(f"{strategy}: wrote {os.path.abspath(args.out_dir)} ({len(merged)} tensors)")
        return 0
    except MergeError as e:
        return error(str(e))
