"""``ame-merge sweep CONFIG.yaml OUT_DIR``: choose the merge recipe on held-out data.

    models: [run1, run2, run3]            # paths, or {path: ...} entries
    evaluate: my_eval:score               # module:function or file.py:function; state dict -> number
    grid:                                 # a mapping of lists (Cartesian product) or a list of mappings
      optimizer: [adam]
      lr: [1.0e-3, 1.0e-2, 1.0e-1]
      epochs: [1, 5]
    top: 3                                # optional: also write the uniform soup of the 3 best
    maximize: true                        # false when evaluate returns a loss
    backend: cpu                          # optional: any other ak.merge argument, applied to every candidate

OUT_DIR receives the best merge as a model folder (``model.safetensors`` and the first model's
config/tokenizer files), ``sweep.csv`` (one row per candidate: its parameters, score and rank),
``sweep.png`` (score against each swept parameter; needs matplotlib), ``sweep.yaml`` (the best
parameters and score, the top-n list) and, with ``top``, ``top_soup/`` (a model folder). The
folder appears complete or not at all. Progress: one line per candidate on stderr (``--quiet``
silences it). Exit codes: 0 done, 2 bad usage / config / input, 1 a failure while sweeping.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Any, List, Optional, Sequence

from .config import read_yaml, resolve_config_path
from .errors import MergeError

KEYS = ("models", "evaluate", "grid", "top", "maximize", "group_size", "chunk_elems", "device")


def _numeric(v: Any) -> Any:
    """YAML 1.1 reads 1e-3 (no dot) as a string: such strings become floats."""
    if isinstance(v, str):
        try:
            f = float(v)
        except ValueError:
            return v
        return int(f) if v.strip().lstrip("+-").isdigit() else f
    if isinstance(v, list):
        return [_numeric(x) for x in v]
    return v


def load_sweep_spec(path: str) -> dict:
    """The checked config: models (paths), evaluate (the spec string), grid (candidates), top, ..."""
    from .errors import suggest
    from .sweeps import KNOWN_KEYS, expand_grid

    doc = read_yaml(path)
    if not isinstance(doc, dict):
        raise MergeError(f"{path}: expected a mapping with models:, evaluate: and grid:")
    for key in doc:
        if key not in KEYS and key not in KNOWN_KEYS:
            raise MergeError(f"{path}: unknown key {key!r}{suggest(key, KEYS + KNOWN_KEYS)}")
    base = os.path.dirname(os.path.abspath(path))
    models_raw = doc.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise MergeError(f"{path}: 'models' must be a non-empty list of paths (or {{path: ...}} entries)")
    models = []
    for i, m in enumerate(models_raw):
        if isinstance(m, dict):
            if set(m) - {"path"} or "path" not in m:
                raise MergeError(f"{path}: models[{i}]: expected a path or {{path: ...}}, got {m!r}")
            m = m["path"]
        models.append(resolve_config_path(m, base, f"{path}: models[{i}]"))
    if "evaluate" not in doc:
        raise MergeError(f"{path}: missing 'evaluate: module:function' (state dict -> score)")
    if "grid" not in doc:
        raise MergeError(f"{path}: missing 'grid:' (a mapping of lists or a list of mappings of ak.merge arguments)")
    grid = doc["grid"]
    if isinstance(grid, dict):
        grid = {k: _numeric(v) for k, v in grid.items()}
    elif isinstance(grid, list):
        grid = [{k: _numeric(v) for k, v in c.items()} if isinstance(c, dict) else c for c in grid]
    fixed = {k: _numeric(v) for k, v in doc.items() if k in KNOWN_KEYS}
    try:
        cands = [{**fixed, **c} for c in expand_grid(grid)]
    except MergeError as e:
        raise MergeError(f"{path}: {e}") from None
    top = doc.get("top")
    maximize = doc.get("maximize", True)
    if not isinstance(maximize, bool):
        raise MergeError(f"{path}: maximize: expected true or false, got {maximize!r}")
    return {"models": models, "evaluate": doc["evaluate"], "candidates": cands, "top": top, "maximize": maximize,
            "group_size": doc.get("group_size", 8), "chunk_elems": doc.get("chunk_elems"),
            "device": doc.get("device", "cpu"), "base": base, "fixed": fixed}


def load_mapped(path: str):
    """(state dict, checkpoint to close): a safetensors checkpoint's tensors as zero-copy views of
    its memory-mapped files (read-only; the sweep never writes its inputs), so the N inputs are
    page cache rather than N private copies. float64 tensors (and any tensor whose bytes are not
    aligned to its element size) are copied. A torch-format checkpoint: (its copied state dict, None)."""
    import warnings

    import numpy as np
    import torch

    from .io.checkpoint import open_checkpoint
    from .strategies import load_state_dict

    ck = open_checkpoint(path)
    if ck.kind != "safetensors":
        ck.close()
        return load_state_dict(path), None
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch.from_numpy of a read-only array: never written
        for name, info in ck.tensors.items():
            v = ck.view(name, 0, info.numel)
            if info.dtype == "float64" or (info.numel and v.ctypes.data % max(1, v.itemsize)):
                v = np.array(v)
            t = torch.from_numpy(v)
            if info.dtype == "bfloat16":
                t = t.view(torch.int16).view(torch.bfloat16)
            elif info.dtype == "float64":
                t = t.float()
            out[name] = t.reshape(info.shape)
    return out, ck


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ame-merge sweep",
                                description="Merge once per candidate of a grid, rank the merges on held-out data "
                                            "(evaluate: module:function), write the best.")
    p.add_argument("config", help="YAML: models, evaluate, grid, optional top / maximize / fixed ak.merge arguments")
    p.add_argument("out_dir", help="output folder: the best model, sweep.csv, sweep.png, sweep.yaml[, top_soup/]")
    p.add_argument("--top", type=int, default=None, help="also write the uniform soup of the N best (overrides top:)")
    p.add_argument("--minimize", action="store_true", help="evaluate returns a loss (overrides maximize:)")
    p.add_argument("--backend", default=None, help="backend for every candidate (overrides the config)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--dry-run", action="store_true", help="check the config and list the candidates; merge nothing")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--verbose", action="store_true", help="tracebacks on errors")
    return p


def _write_model(sd, folder: str, models: List[str], meta: dict) -> None:
    """The merged state dict as the engine writes a merge (shards, config/tokenizer, ame_merge.yaml)."""
    import yaml

    from . import __version__
    from .engine import storage_arrays, write_model_folder
    from .io.checkpoint import aux_files_in

    src = models[0]
    doc = {"ame_kernels_version": __version__, "written_by": "ame-merge sweep", "models": [{"path": m} for m in models],
           **{k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in meta.items()}}
    write_model_folder(storage_arrays(sd), folder, aux=aux_files_in(src if os.path.isdir(src) else os.path.dirname(src)),
                       provenance="# Written by ame-kernels: how this folder was merged.\n"
                       + yaml.safe_dump(doc, sort_keys=False))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))

    def error(msg: str, code: int = 2) -> int:
        print(f"ame-merge sweep: error: {msg}", file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        return code

    opened: List[Any] = []
    dicts: List[Any] = []
    try:
        spec = load_sweep_spec(args.config)
        for c in spec["candidates"]:
            if args.backend is not None:
                c["backend"] = args.backend
            if args.threads is not None:
                c["threads"] = args.threads
        top = args.top if args.top is not None else spec["top"]
        maximize = False if args.minimize else spec["maximize"]
        from .io.atomic import check_target

        protect = list(spec["models"]) + [args.config]
        if args.dry_run:
            from .sweeps import describe

            print(f"models ({len(spec['models'])}):\n" + "\n".join(f"  [{i}] {m}" for i, m in enumerate(spec["models"])))
            print(f"candidates ({len(spec['candidates'])}):\n" +
                  "\n".join(f"  [{k}] {describe(c)}" for k, c in enumerate(spec["candidates"])))
            return 0
        check_target(args.out_dir, args.force, protect=protect)
        import torch

        from .strategies import load_callable, load_state_dict
        from .sweeps import check_candidates

        evaluate = load_callable(spec["evaluate"], spec["base"])  # an import error before any checkpoint is read
        try:
            dev = torch.device(spec["device"])
        except (RuntimeError, TypeError):
            raise MergeError(f"{args.config}: device: expected cpu, cuda or cuda:N, got {spec['device']!r}") from None
        if dev.type == "cpu":
            for m in spec["models"]:
                sd, ck = load_mapped(m)
                opened.append(ck)
                dicts.append(sd)
        else:
            dicts = [{k: v.to(dev) for k, v in load_state_dict(m).items()} for m in spec["models"]]
        check_candidates(dicts, spec["candidates"])
    except MergeError as e:
        _close(opened)
        return error(str(e))
    try:
        return _sweep_and_write(args, spec, dicts, evaluate, top, maximize, protect)
    finally:
        del dicts
        _close(opened)


def _close(opened) -> None:
    for ck in opened:
        if ck is not None:
            try:
                ck.close()
            except (BufferError, OSError):  # a view still alive: the map is released with it
                pass


def _sweep_and_write(args, spec, dicts, evaluate, top, maximize, protect) -> int:
    from .sweeps import describe, sweep

    def error(msg: str, code: int = 2) -> int:
        print(f"ame-merge sweep: error: {msg}", file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        return code

    try:
        log = None if args.quiet else (lambda line: print(line, file=sys.stderr))
        res = sweep(dicts, evaluate, spec["candidates"], top=top, maximize=maximize, group_size=spec["group_size"],
                    chunk_elems=spec["chunk_elems"], progress=log or False)
    except MergeError as e:
        return error(str(e), 1)
    except Exception as e:  # noqa: BLE001 (one clear line; the traceback with --verbose)
        return error(f"{type(e).__name__}: {e}; nothing was written to {os.path.abspath(args.out_dir)}", 1)
    except KeyboardInterrupt:
        return error(f"interrupted (Ctrl-C); nothing was written to {os.path.abspath(args.out_dir)}", 130)
    try:
        import yaml

        from .io.atomic import AtomicDir

        out = AtomicDir(args.out_dir, args.force, protect=protect)
        with out as tmp:
            _write_model(res.best, tmp, spec["models"], {"ame_sweep_best": describe(res.best_params),
                                                         "ame_sweep_score": res.best_score})
            res.to_csv(os.path.join(tmp, "sweep.csv"))
            plotted = res.plot(os.path.join(tmp, "sweep.png"))
            summary = {"best": {"params": _plain(res.best_params), "score": res.best_score},
                       "maximize": maximize, "candidates": len(res.table), "seconds": round(res.seconds, 3),
                       "models": spec["models"], "evaluate": str(spec["evaluate"])}
            if res.top_soup is not None:
                _write_model(res.top_soup, os.path.join(tmp, "top_soup"), spec["models"], {"ame_sweep_top_soup": top})
                summary["top_soup"] = {"n": top, "score": res.top_soup_score, "members": [_plain(p) for p in res.top_params]}
            with open(os.path.join(tmp, "sweep.yaml"), "w") as f:
                yaml.safe_dump(summary, f, sort_keys=False)
            out.commit()
    except (MergeError, OSError) as e:
        return error(f"{e}; nothing was written to {os.path.abspath(args.out_dir)}", 1)
    if not args.quiet:
        extra = f"; top-{top} soup {res.top_soup_score:.6g}" if res.top_soup is not None else ""
        print(f"sweep: best of {len(res.table)}: {describe(res.best_params)}: score {res.best_score:.6g}{extra}; "
              f"wrote {os.path.abspath(args.out_dir)}" + ("" if plotted else " (no plot: matplotlib is missing)"))
    return 0


def _plain(params: dict) -> dict:
    out = {}
    for k, v in params.items():
        if isinstance(v, (list, tuple)):
            v = [float(x) if isinstance(x, float) else x for x in v]
        elif not isinstance(v, (int, float, str, bool, type(None))):
            v = str(v)
        out[k] = v
    return out


__all__ = ["build_parser", "load_sweep_spec", "main"]
