"""Distributed merges under torchrun: every rank merges a disjoint, byte-balanced share.

    torchrun --nproc-per-node K -m ame_kernels CONFIG.yaml OUT_DIR [flags]
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m ame_kernels CONFIG.yaml /shared/OUT_DIR --device cuda

``ame-merge`` sees the torchrun environment (``WORLD_SIZE`` > 1, ``RANK``) and runs
``main_distributed``. The protocol, with a collective at each numbered step and no
communication during the merge itself:

1. every rank makes the same plan (the plan is a pure function of the config and
   the files) and reports whether that worked; any failure ends every rank (exit 2);
2. rank 0 creates the temporary output folder beside the target (shared filesystem)
   and every shard file, preallocated with its final header; all ranks learn its name;
3. every rank merges its share of the plan's work items (a contiguous run, split by
   bytes) on its own device (``cuda:LOCAL_RANK`` for a CUDA device, else the CPU with
   ``cpu_count / LOCAL_WORLD_SIZE`` threads) and writes its results into the shared
   shard files at their final offsets;
4. the ranks exchange their outcomes; only if all succeeded does rank 0 write the
   index, the copied config/tokenizer files and ``ame_merge.yaml`` and rename the
   folder into place. Otherwise rank 0 removes the folder and every rank exits 1,
   rank 0 printing each failing rank's error.

The work items and shard layout are the single-process plan's, so the tensors are
identical byte for byte whatever the number of processes. Control messages use
gloo (with nccl alongside for CUDA devices).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Any, List, Optional, Sequence

from .errors import MergeError


def world_from_env(environ: Optional[dict] = None) -> Optional[dict]:
    """{'rank', 'world_size', 'local_rank', 'local_world_size'} under torchrun with WORLD_SIZE > 1, else None."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        if world <= 1 or "RANK" not in env:
            return None
        return {
            "rank": int(env["RANK"]),
            "world_size": world,
            "local_rank": int(env.get("LOCAL_RANK", "0")),
            "local_world_size": int(env.get("LOCAL_WORLD_SIZE", str(world))),
        }
    except ValueError:
        return None


def split_work(plan, world_size: int) -> List[list]:
    """Cut ``plan.work`` into ``world_size`` contiguous runs of about equal bytes (read + written)."""
    sizes = [plan.item_bytes(it) for it in plan.work]
    total = sum(sizes) or 1
    shares: List[list] = [[] for _ in range(world_size)]
    done = 0
    for it, size in zip(plan.work, sizes):
        mid = done + size / 2  # an item goes to the rank whose byte range holds its middle
        shares[min(world_size - 1, int(mid * world_size / total))].append(it)
        done += size
    return shares


class _Group:
    """The few collectives the protocol needs, over torch.distributed."""

    def __init__(self, device: str):
        import torch.distributed as dist

        self.dist = dist
        backend = "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def gather(self, obj: Any) -> List[Any]:
        out: List[Any] = [None] * self.size
        self.dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        try:
            self.dist.destroy_process_group()
        except Exception:  # noqa: BLE001 (best effort at exit)
            pass


def _failures(statuses: Sequence[dict]) -> List[str]:
    return [f"rank {r}: {s['error']}" for r, s in enumerate(statuses) if not s["ok"]]


def _one_line(statuses: Sequence[dict]) -> str:
    """The failing ranks' errors; once, without rank numbers, when every rank failed alike (a bad input)."""
    errors = [s["error"] for s in statuses if not s["ok"]]
    if len(errors) == len(statuses) and len(set(errors)) == 1:
        return errors[0]
    return "; ".join(_failures(statuses))


def _status(fn, *a, **kw) -> dict:
    try:
        return {"ok": True, "value": fn(*a, **kw)}
    except MergeError as e:
        return {"ok": False, "error": str(e), "trace": traceback.format_exc()}
    except Exception as e:  # noqa: BLE001 (reported by rank 0 as one line)
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}


def main_distributed(args, world: dict) -> int:
    """The torchrun path of ``ame-merge`` (see the module docstring); returns the same exit code on every rank."""
    from .cli_common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, prepare
    from .cli_common import error as _error
    from .engine import close_plan, create_shards, input_paths, merge_items, peak_rss_bytes, write_metadata
    from .io.atomic import AtomicDir, Terminated, check_target, terminate_as_exception

    rank, size, local_rank = world["rank"], world["world_size"], world["local_rank"]
    lead = rank == 0

    def say(msg: str) -> None:
        if lead:
            _error(msg)

    device = args.device or "cpu"
    if device == "cuda":
        device = f"cuda:{local_rank}"  # each rank its own GPU
    args.device = device
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(torch.device(device))
    elif args.threads is None:  # share the cores among this node's ranks
        args.threads = str(max(1, (os.cpu_count() or 1) // max(1, world["local_world_size"])))

    group = _Group(device)
    plan = None
    atomic: Optional[AtomicDir] = None
    try:
        with terminate_as_exception():
            t0 = time.perf_counter()
            # 1. the same plan everywhere
            def plan_and_check():
                p = prepare(args)
                try:
                    check_target(args.out_dir, args.force, protect=input_paths(p) + [args.config])
                except BaseException:
                    close_plan(p)
                    raise
                return p

            st = _status(plan_and_check)
            plan = st.pop("value", None)
            statuses = group.gather({k: v for k, v in st.items() if k != "value"})
            bad = _failures(statuses)
            if bad:
                say(_one_line(statuses))
                return EXIT_USAGE
            # 2. rank 0 makes the folder and the preallocated shards
            if lead:
                atomic = AtomicDir(args.out_dir, force=args.force, protect=input_paths(plan) + [args.config])

                def make() -> str:
                    tmp = atomic.create()
                    create_shards(plan, tmp)
                    return tmp

                st = _status(make)
            else:
                st = {"ok": True, "value": None}
            statuses = group.gather(st)
            bad = _failures(statuses)
            if bad:
                say("; ".join(bad))
                return EXIT_FAILED
            tmp = statuses[0]["value"]
            # 3. this rank's share
            share = split_work(plan, size)[rank]
            bar = None
            if lead and not args.quiet:
                from tqdm import tqdm

                bar = tqdm(total=sum(plan.item_bytes(it) for it in share), unit="B", unit_scale=True, unit_divisor=1024,
                           desc=f"rank 0/{size}", dynamic_ncols=True, file=sys.stderr)
            threads = int(args.threads) if args.threads is not None else None
            st = _status(merge_items, plan, tmp, share, threads, bar.update if bar else None)
            if bar is not None:
                bar.close()
            st["rss"] = peak_rss_bytes()
            notes = st.pop("value", None) or []
            statuses = group.gather(st)
            bad = _failures(statuses)
            if args.verbose:
                for s in statuses:
                    if not s["ok"] and lead:
                        print(s["trace"], file=sys.stderr)
            # 4. all or nothing
            if not bad and lead:
                st = _status(lambda: (write_metadata(plan, tmp, {"distributed": {"world_size": size, "device": device}}), atomic.commit()))
                bad = _failures([st])
            final = group.gather({"bad": bad if lead else []})[0]["bad"]
            if final:
                say(f"{'; '.join(final)}; nothing was written to {os.path.abspath(args.out_dir)}")
                return EXIT_FAILED
            for note in notes:
                print(f"ame-merge: warning: rank {rank}: {note}", file=sys.stderr)
            if lead and not args.quiet:
                secs = time.perf_counter() - t0
                rss = max(s["rss"] for s in statuses)
                moved = plan.in_bytes + plan.out_bytes
                print(
                    f"merged {len(plan.tensors)} tensors, {plan.in_bytes / 1e9:.2f} GB in + {plan.out_bytes / 1e9:.2f} GB out "
                    f"in {secs:.2f} s ({moved / secs / 1e9:.2f} GB/s) on {size} ranks with backend {plan.backend}, "
                    f"peak RSS {rss / 2**20:.0f} MiB per rank -> {os.path.abspath(args.out_dir)}"
                )
            return EXIT_OK
    except (KeyboardInterrupt, Terminated) as e:
        say(f"interrupted ({str(e) or 'Ctrl-C'}); nothing was written to {os.path.abspath(args.out_dir)}")
        return 128 + e.signum if isinstance(e, Terminated) else EXIT_INTERRUPTED
    except Exception as e:  # noqa: BLE001 (a collective failed: a peer died)
        _error(f"rank {rank}: {type(e).__name__}: {e}; nothing was written to {os.path.abspath(args.out_dir)}")
        return EXIT_FAILED
    finally:
        if atomic is not None:
            atomic.abort()  # no-op after the commit
        if plan is not None:
            close_plan(plan)
        group.close()
