"""ame-merge: merge checkpoints on disk from a YAML config.

    ame-merge CONFIG.yaml OUT_DIR [--backend B] [--device D] [--threads T] [--chunk-mb M]
              [--shard-size S] [--out-dtype D] [--force] [--dry-run] [--quiet] [--verbose]
    ame-merge inspect ...          (routed to ame_kernels.diagnostics:inspect_main)
    python -m ame_kernels ...      (the same)

Exit codes: 0 done; 2 bad usage, config or input (nothing was written); 1 a
failure during the merge (nothing was left behind); 130 (Ctrl-C) or 143
(SIGTERM) interrupted, nothing left behind. Errors go
to stderr as one line (the traceback with --verbose). The YAML schema is in
docs/cli.md. Under torchrun (WORLD_SIZE > 1 in the environment) the merge is
split across the ranks (ame_kernels.distributed).
"""

from __future__ import annotations

import argparse
import difflib
import os
import signal
import sys
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, List, Optional, Sequence

from .config import FIELD_NAMES, AMEConfig, read_yaml, resolve_config_path
from .errors import MergeError, Terminated

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
ENGINE_KEYS = ("device", "chunk_mb", "shard_size")
TOP_KEYS = ("models", "pivot") + ENGINE_KEYS + tuple(f for f in FIELD_NAMES if f != "pivot")
MODEL_KEYS = ("path", "score")


class UsageError(MergeError):
    """Bad usage or config: exit code 2."""


def _suggest(key: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(key), list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


@dataclass
class MergeSpec:
    """What a config file asks for, paths resolved."""

    models: List[str]
    config: AMEConfig
    pivot_path: Optional[str] = None
    engine: dict = field(default_factory=dict)
    source: str = ""


def _resolve_path(p: Any, base: str, what: str) -> str:
    return resolve_config_path(p, base, what, UsageError)


def load_spec(path: str) -> MergeSpec:
    """Read and check a config file (YAML); raises UsageError naming the key at fault."""
    doc = read_yaml(path, UsageError)
    if not isinstance(doc, dict):
        raise UsageError(f"{path}: expected a mapping with a 'models:' list, got {type(doc).__name__}")
    for key in doc:
        if key not in TOP_KEYS:
            raise UsageError(f"{path}: unknown key {key!r}{_suggest(key, TOP_KEYS)}")
    for key, value in doc.items():
        if key != "models":
            _check_finite(value, f"{path}: {key}")
    base = os.path.dirname(os.path.abspath(path))
    models_raw = doc.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise UsageError(f"{path}: 'models' must be a non-empty list of {{path: ..., score: ...}} entries")
    models, scores = [], []
    for i, m in enumerate(models_raw):
        if isinstance(m, str):
            m = {"path": m}
        if not isinstance(m, dict):
            raise UsageError(f"{path}: models[{i}]: expected a mapping with 'path', got {m!r}")
        for key in m:
            if key not in MODEL_KEYS:
                raise UsageError(f"{path}: models[{i}]: unknown key {key!r}{_suggest(key, MODEL_KEYS)}")
        if "path" not in m:
            raise UsageError(f"{path}: models[{i}]: missing 'path'")
        models.append(_resolve_path(m["path"], base, f"{path}: models[{i}].path"))
        _check_finite(m.get("score"), f"{path}: models[{i}].score")
        scores.append(m.get("score"))
    fields = {k: v for k, v in doc.items() if k in FIELD_NAMES and k != "pivot"}
    given = [s is not None for s in scores]
    if any(given):
        if not all(given):
            missing = [i for i, g in enumerate(given) if not g]
            raise UsageError(f"{path}: models{missing}: missing 'score' (give a score to every model or to none)")
        if "scores" in fields:
            raise UsageError(f"{path}: give scores either per model or as 'scores:', not both")
        fields["scores"] = scores
    pivot_path = None
    pivot = doc.get("pivot", "soup")
    if isinstance(pivot, dict):
        if set(pivot) != {"path"}:
            raise UsageError(f"{path}: pivot: expected 'soup', a model index, a path, or {{path: ...}}, got {pivot!r}")
        pivot = pivot["path"]
    if isinstance(pivot, bool) or pivot is None:
        raise UsageError(f"{path}: pivot: expected 'soup', a model index or a checkpoint path, got {pivot!r}")
    if isinstance(pivot, str) and pivot.strip() != "soup" and not pivot.strip().lstrip("-").isdigit():
        pivot_path = _resolve_path(pivot, base, f"{path}: pivot")
        pivot = "soup"  # placeholder: the engine takes the explicit checkpoint from pivot_path
    fields["pivot"] = pivot
    try:
        config = AMEConfig.from_dict(fields)
    except MergeError as e:
        raise UsageError(f"{path}: {e}") from None
    engine = {k: doc[k] for k in ENGINE_KEYS if k in doc}
    _check_engine(engine, path)
    return MergeSpec(models, config, pivot_path, engine, path)


def _check_finite(value: Any, what: str) -> None:
    """NaN or Inf, typed as .nan / .inf / "nan" / "inf" (alone or in a list), is an error naming the key.

    No option takes them, and one slipping through would surface only mid-merge (a kernel refusing
    the coefficient) or as a silently wrong order (a NaN score)."""
    import math

    for v in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            continue
        try:
            f = float(v)
        except (TypeError, ValueError, OverflowError):
            continue
        if not math.isfinite(f):
            raise UsageError(f"{what}: must be a finite number, got {v!r}")


def _check_engine(engine: dict, path: str) -> None:
    """chunk_mb, shard_size and device of a config file, each error naming the file and the key."""
    from .engine import parse_size

    if "chunk_mb" in engine:
        v = _float_arg(engine["chunk_mb"], f"{path}: chunk_mb")
        if not v > 0:
            raise UsageError(f"{path}: chunk_mb: must be a number > 0, got {engine['chunk_mb']!r}")
        engine["chunk_mb"] = v
    if "shard_size" in engine:
        try:
            engine["shard_size"] = parse_size(engine["shard_size"], f"{path}: shard_size")
        except MergeError as e:
            raise UsageError(str(e)) from None
    if "device" in engine and not isinstance(engine["device"], str):
        raise UsageError(f"{path}: device: expected 'cpu', 'cuda' or 'cuda:N', got {engine['device']!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ame-merge",
        description="Merge checkpoints with Amortized Model Ensembling (see docs/cli.md for the YAML schema). "
        "'ame-merge inspect ...' runs the diagnostics.",
    )
    p.add_argument("config", help="YAML file: models (path, score), pivot, and AMEConfig fields")
    p.add_argument("out_dir", nargs="?", help="output folder (Hugging Face style); optional with --dry-run")
    p.add_argument("--backend", help="auto, cpu, reference, triton, cuda (overrides the config)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--threads", help="CPU threads for the kernels")
    p.add_argument("--chunk-mb", help="chunk size in MiB of fp32 elements per ingredient (default 64)")
    p.add_argument("--shard-size", help="output shard size, e.g. 5GB (default), 500MB, 2GiB")
    p.add_argument("--out-dtype", help="float32, bfloat16 or float16 (default: the pivot's dtype)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--dry-run", action="store_true", help="check everything and print the plan; write nothing")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")
    p.add_argument("--verbose", "-v", action="store_true", help="tracebacks on errors")
    return p


def _float_arg(value: Any, what: str) -> float:
    if isinstance(value, bool):  # YAML's true/yes/on
        raise UsageError(f"{what}: expected a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{what}: expected a number, got {value!r}") from None


def prepare(args: argparse.Namespace):
    """Config file + flags -> a checked MergePlan (UsageError/MergeError before any work)."""
    from .engine import DEFAULT_CHUNK_MB, DEFAULT_SHARD_SIZE, parse_size, plan_merge

    spec = load_spec(args.config)
    overrides = {}
    if args.backend is not None:
        overrides["backend"] = args.backend
    if args.threads is not None:
        overrides["threads"] = args.threads
    if args.out_dtype is not None:
        overrides["out_dtype"] = args.out_dtype
    try:
        config = spec.config.replace(**overrides) if overrides else spec.config
    except MergeError as e:
        flag = {"backend": "--backend", "threads": "--threads", "out_dtype": "--out-dtype"}
        msg = str(e)
        for k, v in flag.items():
            msg = msg.replace(f"AMEConfig.{k}", v)
        raise UsageError(msg) from None
    chunk_mb = _float_arg(args.chunk_mb, "--chunk-mb") if args.chunk_mb is not None else spec.engine.get("chunk_mb", DEFAULT_CHUNK_MB)
    if not (chunk_mb > 0 and chunk_mb != float("inf")):
        raise UsageError(f"--chunk-mb: must be a number > 0, got {args.chunk_mb!r}")
    if args.shard_size is not None:
        try:
            shard_size = parse_size(args.shard_size, "--shard-size")
        except MergeError as e:
            raise UsageError(str(e)) from None
    else:
        shard_size = spec.engine.get("shard_size", DEFAULT_SHARD_SIZE)
    device = str(args.device if args.device is not None else spec.engine.get("device", "cpu"))
    return plan_merge(spec.models, config, pivot_path=spec.pivot_path, chunk_mb=chunk_mb, shard_size=shard_size, device=device)


def describe(plan) -> str:
    """The --dry-run report."""
    from .engine import measure_copy_bandwidth

    cfg = plan.config
    merged = sum(t.merge for t in plan.tensors)
    pivot = plan.pivot.path if hasattr(plan.pivot, "path") else ("soup" if plan.pivot is None else f"model {plan.pivot}")
    lines = [
        f"models ({plan.n}):",
        *[f"  [{i}] {ck.path}  ({len(ck.tensors)} tensors, {ck.nbytes / 1e9:.3f} GB, {ck.kind})" for i, ck in enumerate(plan.ingredients)],
        f"pivot: {pivot}{' (adaptive)' if cfg.adaptive_pivot else ' (fixed)'}",
        f"optimizer: {cfg.optimizer}, lr {cfg.resolved_lr:g} ({cfg.lr_schedule if isinstance(cfg.lr_schedule, str) else 'per-step'}), "
        f"epochs {cfg.epochs}, batch size {cfg.batch_size}: {plan.steps.steps} steps, order {list(plan.steps.order)}",
        f"tensors: {len(plan.tensors)} ({merged} merged, {len(plan.tensors) - merged} copied)",
        f"bytes: {plan.in_bytes / 1e9:.3f} GB read, {plan.out_bytes / 1e9:.3f} GB written "
        f"in {len(plan.shard_files)} shard(s) of at most {plan.shard_size / 1e9:g} GB",
        f"backend: {plan.backend} on {plan.device}, chunks of {plan.chunk_elems} elements ({len(plan.work)} work items)",
        f"estimated peak memory: {plan.estimated_peak_bytes() / 2**20:.0f} MiB",
    ]
    bw = measure_copy_bandwidth()
    secs = (plan.in_bytes + plan.out_bytes) / bw
    lines.append(
        f"estimated time: >= {secs:.1f} s with a warm page cache (bytes moved / this machine's copy bandwidth, "
        f"{bw / 1e9:.1f} GB/s); a cold cache is bounded by the disk"
    )
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


#: the longest error line printed; a longer one (a value quoted from a hostile file) is cut in the middle
MAX_ERROR_CHARS = 1000


def _error(msg: str) -> None:
    if len(msg) > MAX_ERROR_CHARS:
        cut = len(msg) - MAX_ERROR_CHARS + 200
        msg = f"{msg[: MAX_ERROR_CHARS - 400]} ...[{cut} characters cut]... {msg[-200:]}"
    print(f"ame-merge: error: {msg}", file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    # first thing: SIGTERM/SIGHUP raise Terminated (as Ctrl-C raises KeyboardInterrupt), so an interrupt
    # at any point ends in one line and the right exit code, never a traceback or a silent -15
    old = _raise_on_terminate()
    try:
        return _main(argv)
    except (KeyboardInterrupt, Terminated) as e:  # outside a merge (a merge reports its own, see _run)
        _error(f"interrupted ({_signal_name(e)})")
        return 128 + e.signum if isinstance(e, Terminated) else EXIT_INTERRUPTED
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _raise_on_terminate() -> dict:
    """SIGTERM and SIGHUP raise Terminated in the main thread; the previous handlers (to restore)."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        raise Terminated(signum)

    return {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}


def _signal_name(e: BaseException) -> str:
    if isinstance(e, Terminated):
        return signal.Signals(e.signum).name if e.signum in signal.Signals._value2member_map_ else f"signal {e.signum}"
    return "Ctrl-C"


def _main(argv: Optional[Sequence[str]]) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "inspect":
        return _inspect(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or bad usage (2)
        return int(e.code or 0)
    if not args.dry_run and not args.out_dir:
        _error("OUT_DIR is required (or pass --dry-run)")
        return EXIT_USAGE
    if _names_strategy(args.config):  # 'strategy: greedy|stew|...' runs in memory (ame_kernels/strategies.py)
        return _run_strategy(args)
    from .distributed import world_from_env

    world = world_from_env()
    if world is not None and args.dry_run and world["rank"] != 0:
        return EXIT_OK  # the plan is printed once, by rank 0
    if world is not None and not args.dry_run:
        from .distributed import main_distributed

        return main_distributed(args, world)
    return _run(args)


def _run_strategy(args: argparse.Namespace) -> int:
    """A strategy config, with the merge path's error and signal handling (its AtomicDir cleans up)."""
    try:
        from .strategies import run_cli  # imports torch: only for those configs

        return run_cli(args)
    except (KeyboardInterrupt, Terminated) as e:
        _error(f"interrupted ({_signal_name(e)})")
        if args.verbose:
            traceback.print_exc()
        return 128 + e.signum if isinstance(e, Terminated) else EXIT_INTERRUPTED
    except MergeError as e:
        _error(str(e))
        if args.verbose:
            traceback.print_exc()
        return EXIT_USAGE
    except Exception as e:  # noqa: BLE001 (one clear line; traceback on request)
        where = f"; nothing was written to {os.path.abspath(args.out_dir)}" if args.out_dir else ""
        _error(f"{_describe(e)}{where}")
        if args.verbose:
            traceback.print_exc()
        return EXIT_FAILED


def _names_strategy(path: str) -> bool:
    """Whether the config asks for a strategy other than AME (read without importing torch;
    the same rule as strategies.config_strategy; an unreadable file is reported by the merge path)."""
    try:
        doc = read_yaml(path)
    except MergeError:
        return False
    return isinstance(doc, dict) and doc.get("strategy") not in (None, "ame")


def _run(args: argparse.Namespace) -> int:
    from .engine import close_plan, input_paths
    from .io.atomic import check_target

    plan = None
    try:
        try:
            plan = prepare(args)
            if args.out_dir:  # also with --dry-run: it checks everything the merge would
                check_target(args.out_dir, args.force, protect=input_paths(plan) + [args.config])
        except (MergeError, OSError) as e:  # OSError: an input that cannot be read, named by _describe
            _error(_describe(e))
            if args.verbose:
                traceback.print_exc()
            return EXIT_USAGE
        if args.dry_run:
            print(describe(plan))
            return EXIT_OK
        for w in plan.warnings:
            print(f"ame-merge: warning: {w}", file=sys.stderr)
        from .io.guard import guard_available, run_guarded

        if plan.device == "cpu" and guard_available():
            # in a forked child: an input truncated while mapped (SIGBUS) becomes an error naming it
            return run_guarded(lambda: _merge_and_report(args, plan), _needed_bytes(plan), os.path.abspath(args.out_dir))
        return _merge_and_report(args, plan)
    except KeyboardInterrupt:  # Ctrl-C while checking the inputs (a merge handles its own)
        _error("interrupted (Ctrl-C) before the merge started; nothing was written")
        if args.verbose:
            traceback.print_exc()
        return EXIT_INTERRUPTED
    except Terminated as e:
        _error(f"interrupted ({_signal_name(e)}) before the merge started; nothing was written")
        return 128 + e.signum
    finally:
        if plan is not None:
            close_plan(plan)


def _merge_and_report(args: argparse.Namespace, plan) -> int:
    """Run the checked plan into OUT_DIR; report the result (or the error) truthfully; the exit code."""
    import warnings

    from .engine import run_merge
    from .io.atomic import terminate_as_exception

    out = os.path.abspath(args.out_dir)
    done = False
    try:
        with terminate_as_exception(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = run_merge(plan, args.out_dir, force=args.force, progress=not args.quiet, protect=[args.config])
            done = True
            for w in caught:
                print(f"ame-merge: warning: {w.message}", file=sys.stderr)
            if not args.quiet:
                print(result.summary())
        return EXIT_OK
    except (KeyboardInterrupt, Terminated) as e:
        if done or getattr(e, "output_complete", None):  # delivered once the commit was done: the output is complete
            print(f"ame-merge: {_signal_name(e)} received after the merge was complete: {out} holds the merged model", file=sys.stderr)
            return EXIT_OK
        _error(f"interrupted ({str(e) or 'Ctrl-C'}); nothing was written to {out}")
        if args.verbose:
            traceback.print_exc()
        return 128 + e.signum if isinstance(e, Terminated) else EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 (one clear line; traceback on request)
        if done or getattr(e, "output_complete", None):
            print(f"ame-merge: warning: {_describe(e)} after the merge was complete: {out} holds the merged model", file=sys.stderr)
            return EXIT_OK
        _error(f"{_describe(e)}; nothing was written to {out}")
        if args.verbose:
            traceback.print_exc()
        return EXIT_FAILED


def _needed_bytes(plan) -> dict:
    """Input file -> bytes the merge reads from it (its size, for files that are not safetensors)."""
    needed = {}
    for ck in plan.ingredients + ([plan.pivot] if not isinstance(plan.pivot, (int, type(None))) else []):
        for path, f in ck.files.items():
            size = getattr(f, "needed", None)
            if size is None:
                try:
                    size = os.path.getsize(path)
                except OSError:
                    continue
            needed[path] = size
    return needed


def _describe(e: BaseException) -> str:
    """One line for an error met while merging: a MergeError as is, an OSError as 'FILE: what', else 'Type: text'."""
    if isinstance(e, MergeError):
        return str(e)
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else f"{e.filename}"
        return f"{where}: {e.strerror}"
    return f"{type(e).__name__}: {e}"


def _inspect(argv: List[str]) -> int:
    try:
        from .diagnostics import inspect_main
    except ImportError as e:
        _error(f"'inspect' is not available (ame_kernels.diagnostics.inspect_main could not be imported: {e})")
        return EXIT_USAGE
    return int(inspect_main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
