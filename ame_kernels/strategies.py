"""Stateful strategies from a merge config: greedy AME, stew and the greedy soup, in memory.

A config picks one with ``strategy:``; these need whole models in memory (``evaluate``
scores whole candidates), so they load the checkpoints as state dicts, and write the
result through the engine's output path (``engine.write_state_dict``):

    strategy: greedy            # greedy_merge: evaluate:, start: worst|best (default worst)
    strategy: stew              # Stew over the schedule's batches: mode: server|merge (default server)
    strategy: greedy_soup       # greedy_soup: evaluate:
    evaluate: my_pkg.evals:val_accuracy   # 'module:function' or 'path/to/file.py:function'

``strategy: uniform_soup`` and ``weighted_soup`` are merge methods (``linear``,
``task_arithmetic``) and stream on the engine (``spec._soup_as_method``); ``run_strategy``
still takes them from Python.

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

from .config import AMEConfig, make_config, read_yaml
from .errors import MergeError

from .spec import SOUP_STRATEGIES, STRATEGIES


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
        from .backends.reference import batch_mean  # ascending index, / N: a full batch's mean to the bit

        return {k: (batch_mean([d[k] for d in dicts]) if dicts[0][k].is_floating_point() else dicts[0][k])
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
        start = sorted(set(range(len(dicts))) - {h.ingredient for h in history})
        say(f"greedy_soup: starts from model {start[0] if start else 0} (the best by score)")
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
        from .config import as_bool

        normalize = as_bool("normalize", entry.get("normalize", True))
        return weighted_soup(dicts, weights, normalize=normalize, **common)
    # stew: the schedule's batches (order, scores, batch_size, epochs, shuffle), one add() each.
    from .checks import check_structure
    from .schedule import schedule
    from .stew import Stew

    check_structure(dicts)
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
        stew.add([dicts[i] for i in sorted(plan.batch(t))])  # ascending: the batch mean's order
    say(f"stew ({mode}): {stew.t} steps")
    return stew.weights


# --------------------------------------------------------------------------- the CLI path


def config_strategy(path: str) -> Optional[str]:
    """The config's in-memory strategy (greedy, stew, greedy_soup), else None (a merge method on the
    engine, or unreadable: the CLI reports it)."""
    try:
        doc = read_yaml(path)
    except MergeError:
        return None
    s = doc.get("strategy") if isinstance(doc, dict) else None
    return None if s in (None, "ame", *SOUP_STRATEGIES) else str(s)


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
    """(strategy, model paths, AMEConfig, strategy entry, config dir) from a strategy config
    (read by ``spec.load_spec``, the one reader of config files)."""
    from .spec import check_call, load_spec

    spec = load_spec(path)
    if spec.strategy is None:
        raise MergeError(f"{path}: strategy: expected one of greedy, stew, greedy_soup (the soups are methods: "
                         "ame-merge runs them on the engine)")
    return spec.strategy, spec.models, check_call(spec, overrides), dict(spec.strategy_keys), spec.folder


def run_cli(args) -> int:
    """``ame-merge CONFIG.yaml OUT_DIR`` for a config with an in-memory ``strategy:`` (argparse namespace
    of cli.build_parser). The checkpoints are checked as the engine checks them (headers only) before
    any is loaded, and the result is written through the engine's output path (shards, config.json's
    dtype, ame_merge.yaml, atomic)."""
    import yaml

    from . import __version__
    from .engine import DEFAULT_SHARD_SIZE, close_plan, parse_size, plan_merge
    from .io.atomic import check_target

    def error(msg: str) -> int:
        print(f"ame-merge: error: {msg}", file=sys.stderr)
        return 2

    overrides = {k: v for k, v in (("backend", args.backend), ("threads", args.threads), ("out_dtype", args.out_dtype))
                 if v is not None}
    try:
        strategy, models, cfg, entry, base = load_strategy_spec(args.config, overrides)
        from .spec import load_spec

        engine = load_spec(args.config).engine
        shard_size = parse_size(args.shard_size, "--shard-size") if getattr(args, "shard_size", None) else engine.get("shard_size", DEFAULT_SHARD_SIZE)
        protect = list(models) + [args.config]  # --force never replaces an input or the config
        if args.out_dir:
            check_target(args.out_dir, args.force, protect=protect)
        plan = plan_merge(models, cfg, shard_size=shard_size)  # every input's header, names and shapes checked
        try:
            aux = (plan.ingredients[cfg.pivot if isinstance(cfg.pivot, int) else 0].aux_files()
                   or plan.ingredients[0].aux_files())
            protect += [p for ck in plan.ingredients for p in ([ck.path] + [str(f) for f in ck.files])]
        finally:
            close_plan(plan)
        if args.dry_run:
            print(f"strategy: {strategy} (in memory)\nmodels ({len(models)}):\n"
                  + "\n".join(f"  [{i}] {m}" for i, m in enumerate(models))
                  + f"\nchecked: {len(plan.tensors)} tensors agree in names and shapes")
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
        from .engine import storage_arrays, write_state_dict

        tensors = storage_arrays(merged)
        doc = {"ame_kernels_version": __version__, "strategy": strategy, "models": [{"path": m} for m in models],
               "config": cfg.to_dict(), **({k: str(v) for k, v in entry.items()} if entry else {})}
        files = write_state_dict(tensors, args.out_dir, shard_size=shard_size, aux=aux, out_dtype=cfg.out_dtype,
                                 provenance="# Written by ame-kernels: how this folder was merged.\n"
                                 + yaml.safe_dump(doc, sort_keys=False), force=args.force, protect=protect)
        if not args.quiet:
            print(f"{strategy}: wrote {os.path.abspath(args.out_dir)} ({len(merged)} tensors, {len(files)} shard(s))")
        return 0
    except MergeError as e:
        return error(str(e))
