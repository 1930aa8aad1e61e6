"""ame-merge: merge checkpoints on disk from a YAML config.

    ame-merge CONFIG.yaml OUT_DIR [--backend B] [--device D] [--threads T] [--chunk-mb M]
              [--shard-size S] [--out-dtype D] [--force] [--dry-run] [--quiet] [--verbose]
    ame-merge inspect ...          (routed to ame_kernels.diagnostics:inspect_main)
    ame-merge help [TOPIC]         (ame_kernels.help_topics: config, strategies, ...)
    ame-merge --version
    python -m ame_kernels ...      (the same)

Exit codes: 0 done; 2 bad usage, config or input (nothing was written); 1 a
failure during the merge (nothing was left behind); 130 (Ctrl-C) or 143
(SIGTERM) interrupted, nothing left behind. Errors go
to stderr as one line (the traceback with --verbose). The YAML schema:
``ame-merge help config`` (ame_kernels/help_topics.py). Under torchrun (WORLD_SIZE > 1 in the environment) the merge is
split across the ranks (ame_kernels.distributed).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback
from typing import List, Optional, Sequence

from .errors import MergeError, Terminated
from .spec import MergekitOnly
from .cli_common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, error as _error, prepare



def version_line() -> str:
    """``ame-merge --version``: the package version and what the native part was built with."""
    from . import __version__
    from ._native import build_info

    info = build_info()
    if not info.get("native"):
        native = "no native kernels (reference and Triton backends only)"
    else:
        native = f"CPU kernels {info.get('simd_best', '?')}, CUDA module {'built' if info.get('cuda_compiled') else 'not built'}"
    return f"ame-merge {__version__} ({native}; Python {sys.version.split()[0]})"


#: mergekit-yaml flags accepted without effect here (a one-line note each): this engine always
#: streams in bounded memory, copies config and tokenizer files, and writes no model card
MERGEKIT_NOOP_FLAGS = ("--allow-crimes", "--lazy-unpickle", "--no-lazy-unpickle", "--low-cpu-memory", "--read-to-gpu",
                       "--multi-gpu", "--trust-remote-code", "--clone-tensors", "--safe-serialization")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ame-merge",
        description="Merge checkpoints with a merge method (ame, linear, task_arithmetic, ties, dare_linear, dare_ties, "
        "breadcrumbs, breadcrumbs_ties, della, della_linear, slerp, model_stock). "
        "'ame-merge help config' prints the YAML schema; 'ame-merge help' lists the other topics; "
        "'ame-merge inspect ...' runs the diagnostics.",
    )
    p.add_argument("--version", action="version", version=version_line())
    p.add_argument("config", help="YAML file: models (path, score, per-model parameters), method, base, the method's "
                   "parameters or AME's (pivot, optimizer, lr, ...)")
    p.add_argument("out_dir", nargs="?", help="output folder (Hugging Face style); optional with --dry-run")
    p.add_argument("--backend", help="auto, cpu, reference, triton, cuda (overrides the config)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--threads", help="CPU threads for the kernels")
    p.add_argument("--chunk-mb", help="chunk size in MiB of fp32 elements per ingredient (default 64)")
    p.add_argument("--shard-size", help="output shard size, e.g. 5GB (default), 500MB, 2GiB")
    p.add_argument("--out-shard-size", help="mergekit-yaml's flag: output shard size with mergekit's suffixes "
                   "(K/M/B = 1e3/1e6/1e9 bytes: 5B is 5e9); in a mergekit config --shard-size reads K/M/B/G the same way")
    p.add_argument("--out-dtype", help="float32, bfloat16 or float16 (default: the pivot's dtype)")
    mk = p.add_argument_group("mergekit-yaml's flags (ame-merge help mergekit)")
    mk.add_argument("--cuda", action="store_true", help="= --device cuda")
    mk.add_argument("-j", "--num-threads", dest="num_threads", help="= --threads")
    mk.add_argument("--random-seed", dest="random_seed", help="the seed of dare_* / della* (= random_seed)")
    mk.add_argument("--write-model-card", dest="model_card", action="store_true", default=None,
                    help="write README.md, a model card (the default with a mergekit config, as mergekit)")
    mk.add_argument("--no-write-model-card", dest="model_card", action="store_false")
    mk.add_argument("--copy-tokenizer", dest="copy_tokenizer", action="store_true", default=None,
                    help="copy the tokenizer files (the default)")
    mk.add_argument("--no-copy-tokenizer", dest="copy_tokenizer", action="store_false",
                    help="no tokenizer files in the output")
    for flag in MERGEKIT_NOOP_FLAGS:
        mk.add_argument(flag, dest="mk_noop", action="append_const", const=flag, help=argparse.SUPPRESS)
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--dry-run", action="store_true", help="check everything and print the plan; write nothing")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary")
    p.add_argument("--verbose", "-v", action="store_true", help="tracebacks on errors")
    return p


def describe(plan) -> str:
    """The --dry-run report."""
    from .engine import measure_copy_bandwidth

    cfg = plan.config
    merged = sum(t.merge for t in plan.tensors)
    models = [f"models ({plan.n}):",
              *[f"  [{i}] {ck.path}  ({len(ck.tensors)} tensors, {ck.nbytes / 1e9:.3f} GB, {ck.kind})"
                for i, ck in enumerate(plan.ingredients)]]
    if plan.method == "ame":
        pivot = plan.pivot.path if hasattr(plan.pivot, "path") else ("soup" if plan.pivot is None else f"model {plan.pivot}")
        how = [
            f"method: ame (Amortized Model Ensembling); pivot: {pivot}{' (adaptive)' if cfg.adaptive_pivot else ' (fixed)'}",
            f"optimizer: {cfg.optimizer}, lr {cfg.resolved_lr:g} ({cfg.lr_schedule if isinstance(cfg.lr_schedule, str) else 'per-step'}), "
            f"epochs {cfg.epochs}, batch size {cfg.batch_size}: {plan.steps.steps} steps, order {list(plan.steps.order)}",
        ]
    else:
        params = ", ".join(f"{k} {v}" for k, v in plan.call.params.to_dict().items())
        how = [f"method: {plan.method} ({plan.call.method.title}){'; base: ' + plan.base.path if plan.base else ''}",
               f"parameters: {params or 'none'}"]
    schema = getattr(plan, "schema", None)
    lines = [
        *(["schema: ame (ame-merge help config)"] if schema == "ame" else []),
        *getattr(plan, "notes", []),
        *models,
        *how,
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


def main(argv: Optional[Sequence[str]] = None, raise_mergekit_only: bool = False) -> int:
    """The exit code. ``raise_mergekit_only``: a spec.MergekitOnly refusal found while checking
    (before anything is written) is raised instead of reported (the mergekit-yaml script hands it over)."""
    # first thing: SIGTERM/SIGHUP raise Terminated (as Ctrl-C raises KeyboardInterrupt), so an interrupt
    # at any point ends in one line and the right exit code, never a traceback or a silent -15
    old = _raise_on_terminate()
    try:
        return _main(argv, raise_mergekit_only)
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


def _main(argv: Optional[Sequence[str]], raise_mergekit_only: bool = False) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "inspect":
        return _inspect(argv[1:])
    if argv and argv[0] == "help":  # ame-merge help [TOPIC] (ame_kernels/help_topics.py)
        from .help_topics import help_main

        return help_main(argv[1:])
    if argv and argv[0] == "sweep":
        from .sweep_cli import main as sweep_main

        return int(sweep_main(argv[1:]) or 0)
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
    return _run(args, raise_mergekit_only)


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
    """Whether the config names an in-memory strategy (greedy, stew, greedy_soup); read without
    importing torch. An unreadable file is reported by the merge path."""
    from .config import read_yaml
    from .spec import SOUP_STRATEGIES

    try:
        doc = read_yaml(path)
    except MergeError:
        return False
    return isinstance(doc, dict) and doc.get("strategy") not in (None, "ame", *SOUP_STRATEGIES)


def _run(args: argparse.Namespace, raise_mergekit_only: bool = False) -> int:
    from .engine import close_plan, input_paths
    from .io.atomic import check_target

    plan = None
    try:
        try:
            plan = prepare(args)
            if args.out_dir:  # also with --dry-run: it checks everything the merge would
                check_target(args.out_dir, args.force, protect=input_paths(plan) + [args.config])
        except (MergeError, OSError) as e:  # OSError: an input that cannot be read, named by _describe
            if raise_mergekit_only and isinstance(e, MergekitOnly) and not args.dry_run:
                raise
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
