"""DELLA's per-line magnitude ranks on the cpu backend, by the kind of task vector.

    python benchmarks/bench_della.py            # 16M bf16 entries (8192 lines of 2048) per regime
    python benchmarks/bench_della.py --small    # 1M entries, a quick look

DELLA's keep probability rises with an entry's magnitude rank in its line, so its cost depends on
the data: how many distinct magnitudes a line holds and how often each repeats. The regimes: an
ingredient independent of the base (the end-to-end benchmark's family: task vectors as large as
the weights, hardly a tie), and fine-tunes whose deltas are a fraction of the weights' standard
deviation (0.3 down to 0.003: in bf16, the smaller the delta, the fewer distinct magnitudes and
the more zeros; real fine-tunes sit near the small end). Weights N(0, 0.02) in bf16, base in
bf16, density 0.3, epsilon 0.1.

Per regime, in interleaved rounds: ``della_masks_buffers`` (the keep bits with the L1 sums, what
the engine runs for DELLA's default rescale), ``della_probs_buffers`` (the probabilities, for
the inverse rescale and the torch paths), and a memcpy of the two inputs' bytes (torch's copy on
the same threads). Columns: distinct magnitudes and zeros per line (sampled), median ms
[p20-p80] and ns per entry of both, the masks' input read rate against the memcpy's copy rate,
and whether the bits equal the definition (philox_uniform < della_probs) on a slice. Rows are
appended to benchmarks/results/bench_della.csv.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import RunFields, Timing, chosen_regimes, cpu_threads, machine, now, regime_args, report, timeit  # noqa: E402

COLS = 2048
DENSITY, EPSILON, SEED = 0.3, 0.1, 7
REGIMES = {"independent": None, "delta 0.3": 0.3, "delta 0.1": 0.1, "delta 0.03": 0.03, "delta 0.01": 0.01,
           "delta 0.003": 0.003}


@dataclasses.dataclass
class Row(RunFields):
    regime: str
    entries: int
    distinct_per_line: float
    zeros_pct: float
    masks_ms: float
    masks_p20_ms: float
    masks_p80_ms: float
    masks_ns_per_entry: float
    probs_ms: float
    probs_ns_per_entry: float
    memcpy_gbps: float
    masks_pct_memcpy: float
    bits_equal: bool


def _timing(samples: list) -> Timing:
    a = np.asarray(samples)
    return Timing(float(np.median(a)), float(np.percentile(a, 20)), float(np.percentile(a, 80)), len(a))


def regime_inputs(rel, n: int, gen: torch.Generator):
    """(x, base) bf16: base N(0, 0.02); x independent of it (rel None) or base + rel * 0.02 * N(0, 1)."""
    b = (0.02 * torch.randn(n, generator=gen)).to(torch.bfloat16)
    if rel is None:
        return (0.02 * torch.randn(n, generator=gen)).to(torch.bfloat16), b
    return (b.float() + rel * 0.02 * torch.randn(n, generator=gen)).to(torch.bfloat16), b


def definition_bits(x, b, rows: int) -> np.ndarray:
    from ame_kernels.methods.combine import philox_uniform
    from ame_kernels.methods.task_vectors import della_probs

    m = (x[:rows * COLS].float() - b[:rows * COLS].float()).abs().numpy()
    p = torch.from_numpy(della_probs(m, (rows, COLS), DENSITY, EPSILON))
    keep = philox_uniform(SEED, 3, 1, torch.arange(rows * COLS, dtype=torch.int64)) < p
    return np.packbits(keep.numpy(), bitorder="little")


def run(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="1M entries per regime")
    ap.add_argument("--lines", type=int, default=None, help="lines of 2048 per regime (default 8192, --small 512)")
    regime_args(ap, REGIMES)
    ap.add_argument("--simd", default="auto", help="force a SIMD level (scalar, avx2, avx512)")
    args = ap.parse_args(argv)

    threads = cpu_threads(args.threads)
    if not threads:
        return []
    from ame_kernels.backends.cpu import della_masks_buffers, della_probs_buffers

    lines = args.lines or (512 if args.small else 8192)
    n = lines * COLS
    mach = machine(threads)
    if args.simd != "auto":
        mach.simd = args.simd
    print(mach.header())
    names = chosen_regimes(args.regimes, REGIMES)
    gen = torch.Generator().manual_seed(0)
    bits = np.empty(n // 8, dtype=np.uint8)
    probs = np.empty(n, dtype=np.float32)
    src = torch.ones(n * 4 // 4, dtype=torch.float32)  # the two bf16 inputs' bytes
    dst = torch.empty_like(src)
    rows, table = [], []
    for name in names:
        x, b = regime_inputs(REGIMES[name], n, gen)
        xr, br = x.view(torch.int16).numpy(), b.view(torch.int16).numpy()
        sample = (x[:64 * COLS].float() - b[:64 * COLS].float()).abs().view(64, COLS)
        distinct = float(np.mean([len(torch.unique(sample[i])) for i in range(64)]))
        zeros = float((sample == 0).float().mean()) * 100
        fns = {
            "masks": lambda: della_masks_buffers(xr, "bfloat16", br, "bfloat16", (lines, COLS), DENSITY, EPSILON,
                                                 SEED, 3, 1, 0, threads=threads, simd=args.simd, out=bits, sums=True),
            "probs": lambda: della_probs_buffers(xr, "bfloat16", br, "bfloat16", (lines, COLS), DENSITY, EPSILON,
                                                 threads=threads, out=probs),
            "memcpy": lambda: dst.copy_(src),
        }
        samples = {k: [] for k in fns}
        for f in fns.values():
            f()
        for _ in range(args.repeat):  # interleaved: every kernel sees the same machine conditions
            for k, f in fns.items():
                samples[k].append(timeit(f, warmup=0, repeat=1).median)
        tm, tp, tc = _timing(samples["masks"]), _timing(samples["probs"]), _timing(samples["memcpy"])
        check = min(lines, 256)
        got = della_masks_buffers(xr[:check * COLS], "bfloat16", br[:check * COLS], "bfloat16", (check, COLS),
                                  DENSITY, EPSILON, SEED, 3, 1, 0, threads=threads, simd=args.simd)
        same = bool(np.array_equal(got, definition_bits(x, b, check)))
        bw = src.numel() * 4 / tc.median
        read = n * 4 / tm.median  # x and base, bf16
        r = Row(now(), mach.cpu, threads, mach.simd, mach.commit, mach.loadavg, name, n, round(distinct, 1),
                round(zeros, 1), round(tm.median * 1e3, 2), round(tm.p20 * 1e3, 2), round(tm.p80 * 1e3, 2),
                round(tm.median * 1e9 / n, 3), round(tp.median * 1e3, 2), round(tp.median * 1e9 / n, 3),
                round(bw / 1e9, 2), round(100 * read / bw, 1), same)
        rows.append(r)
        table.append([name, f"{distinct:.0f}", f"{zeros:.1f}%", tm.ms(), f"{r.masks_ns_per_entry:.2f}",
                      tp.ms(), f"{r.probs_ns_per_entry:.2f}", f"{tp.median / tm.median:.2f}x", f"{r.memcpy_gbps:.1f}",
                      f"{r.masks_pct_memcpy:.0f}%", "yes" if same else "NO"])
        print(f"# {name}: masks {tm.ms()} ms, probs {tp.ms()} ms", flush=True)
    return report("bench_della", ["regime", "distinct/line", "zeros", "masks ms [p20-p80]", "masks ns/entry", "probs ms [p20-p80]",
                 "probs ns/entry", "probs/masks", "memcpy GB/s", "masks % memcpy", "bits = definition"], table, rows)


def main(argv=None) -> int:
    rows = run(argv)
    return 0 if all(r.bits_equal for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
