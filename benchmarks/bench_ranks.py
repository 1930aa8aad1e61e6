"""TIES' and breadcrumbs' statistics pass: the exact rank keys of |x_i - b| (``select_ranks``).

    python benchmarks/bench_ranks.py             # 3 bf16 ingredients + a bf16 base of 16M entries per regime
    python benchmarks/bench_ranks.py --small     # 1M entries, a quick look

Per regime of task vector (as bench_della's: "independent" models, "delta r" fine-tunes whose
task vector is r times the weights' spread, and "finetune": the base's low 4 mantissa bits
redrawn, as bench_e2e's fine-tune family), the keys of three TIES ranks (density 0.2, one per
ingredient) and six breadcrumbs ranks (gamma 0.01, density 0.3: two per ingredient) through the
cpu backend's buffer path (``BufferOps``, the checkpoint engine's), in interleaved rounds:

- ``select_ranks`` as it runs (a sampled bracket per rank; fine-tunes' brackets binned: their
  tied entries counted per magnitude step instead of listed);
- the same with binning off (``BIN_MIN`` out of reach: the brackets' entries listed, the path
  before binned brackets), to show what binning changes, in the same run;
- a memcpy of the inputs' bytes (torch's copy on the same threads) as the machine's yardstick.

Every key is checked against the radix passes (``select_ranks_radix``), which the tests check
against sorting. Rows are appended to benchmarks/results/bench_ranks.csv.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import RunFields, Timing, chosen_regimes, cpu_threads, machine, now, regime_args, report, timeit  # noqa: E402

N = 3
REGIMES = {"independent": None, "delta 0.1": 0.1, "delta 0.01": 0.01, "finetune": "low4"}
METHODS = {"ties": [(i, 0.2) for i in range(N)],
           "breadcrumbs": [(i, f) for i in range(N) for f in (0.01, 0.31)]}


@dataclasses.dataclass
class Row(RunFields):
    regime: str
    method: str
    entries: int
    binned_targets: int
    targets: int
    ranks_ms: float
    ranks_p20_ms: float
    ranks_p80_ms: float
    listed_ms: float
    listed_over_binned: float
    memcpy_ms: float
    ranks_over_memcpy: float
    keys_equal_radix: bool


def regime_inputs(kind, n: int, gen: torch.Generator):
    """(ingredients, base) bf16 of n entries: base N(0, 0.02), task vectors of the regime's kind."""
    b = (0.02 * torch.randn(n, generator=gen)).to(torch.bfloat16)
    xs = []
    for _ in range(N):
        if kind is None:
            x = (0.02 * torch.randn(n, generator=gen)).to(torch.bfloat16)
        elif kind == "low4":
            bits = b.view(torch.int16).to(torch.int32)
            noise = torch.randint(0, 16, (n,), generator=gen, dtype=torch.int32)
            x = ((bits & ~15) | noise).to(torch.int16).view(torch.bfloat16)
        else:
            x = (b.float() + kind * 0.02 * torch.randn(n, generator=gen)).to(torch.bfloat16)
        xs.append(x)
    return xs, b


def run(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="1M entries per regime")
    ap.add_argument("--entries", type=int, default=None, help="entries per ingredient (default 16M, --small 1M)")
    regime_args(ap, REGIMES)
    args = ap.parse_args(argv)

    threads = cpu_threads(args.threads)
    if not threads:
        return []
    stats = importlib.import_module("ame_kernels.methods.stats")
    from ame_kernels.methods.run import BufferOps

    n = args.entries or ((1 << 20) if args.small else (16 << 20))
    mach = machine(threads)
    print(mach.header())
    names = chosen_regimes(args.regimes, REGIMES)
    gen = torch.Generator().manual_seed(0)
    ops = BufferOps(threads=threads)
    src = torch.ones(n * (N + 1) // 2, dtype=torch.float32)  # the inputs' and base's bf16 bytes
    dst = torch.empty_like(src)
    rows, table = [], []
    for name in names:
        xs, b = regime_inputs(REGIMES[name], n, gen)
        arrs = [(x.view(torch.int16).numpy(), "bfloat16") for x in xs]
        chunks = lambda: [(0, arrs, (b.view(torch.int16).numpy(), "bfloat16"))]  # noqa: E731
        for method, fracs in METHODS.items():
            targets = [(i, int(f * n)) for i, f in fracs]
            ref = stats.select_ranks_radix(chunks, ops, n, targets)
            keys = stats.select_ranks(chunks, ops, n, targets)
            _, shifts = stats.sample_brackets(chunks, ops, n, targets, list(range(len(targets))))
            binned = sum(1 for s in shifts.values() if s)

            def listed():
                old = stats.BIN_MIN
                stats.BIN_MIN = 1 << 62  # no bracket bins: its entries are listed
                try:
                    return stats.select_ranks(chunks, ops, n, targets)
                finally:
                    stats.BIN_MIN = old

            same = keys == ref and listed() == ref
            fns = {"ranks": lambda: stats.select_ranks(chunks, ops, n, targets), "listed": listed,
                   "memcpy": lambda: dst.copy_(src)}
            samples = {k: [] for k in fns}
            order = list(fns)
            for r in range(args.repeat):  # interleaved, the order rotated: no variant always follows the copy
                for k in order[r % 3:] + order[:r % 3]:
                    samples[k].append(timeit(fns[k], warmup=0, repeat=1).median)
            t = {k: Timing(float(np.median(v)), float(np.percentile(v, 20)), float(np.percentile(v, 80)), len(v))
                 for k, v in samples.items()}
            r = Row(now(), mach.cpu, threads, mach.simd, mach.commit, mach.loadavg, name, method, n, binned,
                    len(targets), round(t["ranks"].median * 1e3, 2), round(t["ranks"].p20 * 1e3, 2),
                    round(t["ranks"].p80 * 1e3, 2), round(t["listed"].median * 1e3, 2),
                    round(t["listed"].median / t["ranks"].median, 2), round(t["memcpy"].median * 1e3, 2),
                    round(t["ranks"].median / t["memcpy"].median, 2), same)
            rows.append(r)
            table.append([name, method, f"{binned}/{len(targets)}", t["ranks"].ms(), t["listed"].ms(),
                          f"{r.listed_over_binned:.2f}x", t["memcpy"].ms(), f"{r.ranks_over_memcpy:.1f}x",
                          "yes" if same else "NO"])
            print(f"# {name} {method}: {t['ranks'].ms()} ms ({binned} of {len(targets)} binned)", flush=True)
    return report("bench_ranks", ["regime", "method", "binned", "select_ranks ms [p20-p80]", "listed ms", "listed / binned",
                 "memcpy ms", "x memcpy", "keys = radix"], table, rows)


def main(argv=None) -> int:
    rows = run(argv)
    return 0 if all(r.keys_equal_radix for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
