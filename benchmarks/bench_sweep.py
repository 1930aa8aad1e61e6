"""Sweeps: the cost per candidate when K candidates share one read of the inputs (issue 19).

    python benchmarks/bench_sweep.py             # N=8 bf16 ingredients of 32M elements (0.5 GB), 20 candidates
    python benchmarks/bench_sweep.py --small     # N=8 x 2M elements, a quick look

Table 1, a 20-candidate Adam-AME sweep (lr x epochs), merge time only (no evaluate), with
``check_finite=False`` in the main rows (the inputs' NaN/Inf check, ``torch.isfinite`` over every
input, costs more than an Adam merge on bf16 inputs here; ``ak.merge`` runs it per call,
``ak.sweep`` once per sweep: the last two rows show both with the check on):
- one by one: ``ak.merge`` per candidate on the cpu backend (each reads all the inputs);
- one pass: ``merge_many`` in groups of K candidates (K = 1, 4, 10, 20): the inputs are walked
  once per group, chunk by chunk, and every candidate of the group runs the same whole-run
  kernel on a chunk while it is in cache (outputs bit-identical to ``ak.merge``);
- reference: the reference backend (torch.optim per tensor) on one candidate, timed on a
  slice of the inputs and scaled per element (it is too slow for the full size).
Columns: time for the 20 candidates, time per candidate, candidates/s, and the ratio to one by one.

Table 2, K linear candidates (weight vectors over the N ingredients, ``linear_many``) on its two
paths: the cpu backend's folded GD kernel run chunk by chunk for each candidate (``fold='auto'``,
the default on CPU), and the torch [K, N] coefficient matrix applied to each chunk (one fp32
conversion of the chunk for all K; the path for GPU tensors), against ``ak.weighted_soup`` one by
one (one read per candidate): time per candidate and its ratio to K = 1 of the same path.
All ratios are same-run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import machine, print_table, timeit  # noqa: E402

import ame_kernels as ak  # noqa: E402
from ame_kernels.sweeps import expand_grid, linear_many, merge_many  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="2M elements per ingredient")
    ap.add_argument("--elems", type=int, default=None, help="elements per ingredient (default 32M, --small 2M)")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args(argv)
    elems = args.elems or ((2 << 20) if args.small else (32 << 20))
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    if not ak.available_backends()["cpu"][0]:
        print("bench_sweep: the cpu backend is not built (make build)")
        return 1
    print(machine(threads).header())
    g = torch.Generator().manual_seed(0)
    # like a fine-tuning family: a shared base plus small per-ingredient deltas
    base = torch.randn(elems, generator=g)
    xs = [(base + 0.01 * torch.randn(elems, generator=g)).bfloat16() for _ in range(args.n)]
    del base
    grid = {"optimizer": ["adam"], "lr": [1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1],
            "epochs": [1, 2], "backend": ["cpu"], "check_finite": [False]}
    cands = expand_grid(grid)
    k_total = len(cands)
    gb = args.n * elems * 2 / 1e9
    print(f"# N={args.n} bf16 ingredients x {elems / 2**20:.0f}M elements ({gb:.2f} GB read per pass), "
          f"{k_total} Adam-AME candidates (lr x epochs {{1, 2}}), {threads} threads, repeat {args.repeat}\n")

    def one_by_one():
        for c in cands:
            ak.merge(xs, **c)

    def grouped(k):
        def run():
            for g0 in range(0, k_total, k):
                merge_many(xs, cands[g0:g0 + k])
        return run

    def one_by_one_checked():
        for c in cands:
            ak.merge(xs, **dict(c, check_finite=True))

    def sweep_checked():
        ak.sweep(xs, lambda m: 0.0, [dict(c, check_finite=True) for c in cands], group_size=k_total)

    rows = []
    t = timeit(one_by_one, warmup=0, repeat=args.repeat).median
    rows.append(("one by one (ak.merge, cpu)", t))
    for k in (1, 4, 10, 20):
        rows.append((f"one pass, groups of K={k}", timeit(grouped(k), warmup=0, repeat=args.repeat).median))
    sl = min(elems, 1 << 20)
    xs_s = [x[:sl].clone() for x in xs]
    c_ref = dict(cands[0], backend="reference")
    t0 = time.perf_counter()
    ak.merge(xs_s, **c_ref)
    t_ref = (time.perf_counter() - t0) * elems / sl * k_total  # the 20 candidates at full size, scaled
    rows.append((f"reference backend (1 candidate on {sl / 2**20:.0f}M, scaled)", t_ref))
    rows.append(("with the NaN/Inf check: one by one (ak.merge default)", timeit(one_by_one_checked, warmup=0, repeat=args.repeat).median))
    rows.append(("with the NaN/Inf check: ak.sweep, K=20 (checked once)", timeit(sweep_checked, warmup=0, repeat=args.repeat).median))
    base_t = rows[0][1]
    table = [(name, f"{tt:.2f}", f"{tt / k_total * 1e3:.0f}", f"{k_total / tt:.2f}", f"{base_t / tt:.2f}x")
             for name, tt in rows]
    print_table(["path", "20 candidates s", "ms / candidate", "candidates/s", "vs one by one"], table)

    print("\n# linear candidates (weight vectors over the N ingredients)")
    rows2 = []
    ks = (1, 4, 16) if elems > (8 << 20) else (1, 4, 16, 64)  # K outputs are held at once
    for label, fold in (("cpu kernel, chunk by chunk", "auto"), ("torch [K, N] coefficient matrix", True)):
        t1 = None
        for k in ks:
            W = torch.rand(k, args.n, generator=g) + 0.05
            t = timeit(lambda: linear_many(xs, W, check_finite=False, fold=fold), warmup=0, repeat=args.repeat).median
            t1 = t1 or t
            rows2.append((f"linear_many ({label}) K={k}", k, t, t1))
    W = torch.rand(4, args.n, generator=g) + 0.05
    t = timeit(lambda: [ak.weighted_soup(xs, w.tolist(), backend="cpu", check_finite=False) for w in W], warmup=0,
               repeat=args.repeat).median
    rows2.append(("ak.weighted_soup one by one (cpu kernel)", 4, t, t / 4))
    table2 = [(name, k, f"{tt:.2f}", f"{tt / k * 1e3:.0f}", f"{t1 / (tt / k):.2f}x") for name, k, tt, t1 in rows2]
    print_table(["path", "K", "total s", "ms / candidate", "per-candidate speedup vs K=1 of the same path"], table2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
