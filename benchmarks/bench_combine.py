"""The combine pass (cpu backend) against a same-run memcpy and the torch oracle.

    python benchmarks/bench_combine.py             # N=8 bf16 ingredients + bf16 base of 32M elements
    python benchmarks/bench_combine.py --small     # N=8 x 2M elements, a quick look

Plans (ame_kernels.methods.combine.CombinePlan), all with a bf16 base and a bf16 output:
task arithmetic (weighted sum of task vectors), TIES-like (a magnitude window per
ingredient, elect "sum", normalize), DARE (density 0.1 with 1/p rescale: a Philox draw per
element and ingredient), DARE+TIES. Per plan: the cpu backend's median time [p20-p80],
its effective GB/s (inputs + base read, output written, once each), the memcpy rate as
bench_whole_run defines it (bytes copied per second by torch's parallel copy of the
inputs' size on the same threads, timed in the same rounds) with the % of it, and the
stricter "% copy traffic" (against the copy's read + write bytes); then combine_torch
(the oracle, run once on a --torch-elements slice: its int64 Philox is slow) as elements/s
and the speedup per element. The outputs of the slice are checked bitwise against the
oracle. Rows are appended to benchmarks/results/bench_combine.csv.
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

from common import RunFields, Timing, cpu_threads, machine, now, report, timeit  # noqa: E402

from ame_kernels.methods.combine import CombinePlan, combine_torch, name_key  # noqa: E402


@dataclasses.dataclass
class Row(RunFields):
    plan: str
    n: int
    dtype: str
    elements: int
    cpu_ms: float
    cpu_p20_ms: float
    cpu_p80_ms: float
    eff_gbps: float
    memcpy_gbps: float
    pct_memcpy: float
    pct_copy_traffic: float
    torch_elements: int
    torch_ms: float
    speedup_per_element: float
    bitwise_slice: bool


def plans(n: int, key_mag: float) -> dict:
    w = np.full(n, 1.0 / n)
    k = name_key("model.layers.0.mlp.up_proj.weight")
    return {
        "task_arith": CombinePlan(n=n, weight=np.ones(n), lam=0.5),
        # TIES-like: keep magnitudes above a threshold (an end key), elect by sum, normalize
        "ties": CombinePlan(n=n, weight=w, end_mag=np.full(n, key_mag), end_idx=np.zeros(n), elect=1,
                            normalize=True),
        "dare": CombinePlan(n=n, weight=w, density=np.full(n, 0.1), inv_prob=True, seed=1234, name_key=k),
        "dare_ties": CombinePlan(n=n, weight=w, density=np.full(n, 0.1), inv_prob=True, elect=1, normalize=True,
                                 seed=1234, name_key=k),
    }


def _timing(samples: list) -> Timing:
    a = np.asarray(samples)
    return Timing(float(np.median(a)), float(np.percentile(a, 20)), float(np.percentile(a, 80)), len(a))


def run(argv=None) -> list:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="N=8 x 2M elements")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--elements", type=int, default=None, help="elements per ingredient (default 32M, --small 2M)")
    ap.add_argument("--torch-elements", type=int, default=1 << 20, help="slice combine_torch runs on")
    ap.add_argument("--threads", type=int, default=None, help="default: torch.get_num_threads()")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--plans", default="task_arith,ties,dare,dare_ties")
    ap.add_argument("--simd", default=None, help="force a SIMD level (scalar, avx2, avx512)")
    args = ap.parse_args(argv)

    threads = cpu_threads(args.threads)
    if not threads:
        return []
    from ame_kernels.backends.cpu import CpuBackend

    n = args.n
    c = args.elements or (2 * 2**20 if args.small else 32 * 2**20)
    dt = torch.bfloat16
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(c, generator=g) * 0.02).to(dt)
    xs = [(base.float() + torch.randn(c, generator=g) * 0.002).to(dt) for _ in range(n)]
    out = torch.empty(c, dtype=dt)
    eff_bytes = (n + 2) * c * 2  # inputs + base read, out written
    key_mag = float(np.float32(0.002 * 1.0))  # |tau| above ~1 sigma: keeps ~32%

    mach = machine(threads)
    if args.simd:
        mach.simd = args.simd
    print(mach.header())
    cpu = CpuBackend(simd=args.simd)
    src = torch.ones(n * c * 2 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    all_plans = plans(n, key_mag)
    names = args.plans.split(",")
    fns = {k: (lambda p=all_plans[k]: cpu.combine(xs, base, out, p, 0, threads=threads)) for k in names}
    fns["memcpy"] = lambda: dst.copy_(src)
    samples = {k: [] for k in fns}
    for f in fns.values():  # warm-up
        f()
    for _ in range(args.repeat):  # interleaved rounds: every plan sees the same machine conditions
        for k, f in fns.items():
            samples[k].append(timeit(f, warmup=0, repeat=1).median)
    t_copy = _timing(samples.pop("memcpy"))
    bw = src.numel() * 4 / t_copy.median

    ct = min(args.torch_elements, c)
    rows, table = [], []
    for k in names:
        t = _timing(samples[k])
        ref = torch.empty(ct, dtype=dt)
        got = torch.empty(ct, dtype=dt)
        sl = [x[:ct] for x in xs]
        t_torch = timeit(lambda: combine_torch(sl, base[:ct], ref, all_plans[k], 0), warmup=0, repeat=1)
        cpu.combine(sl, base[:ct], got, all_plans[k], 0, threads=threads)
        same = bool(torch.equal(ref.view(torch.int16), got.view(torch.int16)))
        gbps = eff_bytes / t.median
        speed = (t_torch.median / ct) / (t.median / c)
        r = Row(now(), mach.cpu, threads, mach.simd, mach.commit, mach.loadavg, k, n, "bfloat16", c,
                round(t.median * 1e3, 2), round(t.p20 * 1e3, 2), round(t.p80 * 1e3, 2), round(gbps / 1e9, 2),
                round(bw / 1e9, 2), round(100 * gbps / bw, 1), round(50 * gbps / bw, 1), ct,
                round(t_torch.median * 1e3, 1), round(speed, 1), same)
        rows.append(r)
        table.append([k, n, c, t.ms(), f"{r.eff_gbps:.1f}", f"{r.memcpy_gbps:.1f}", f"{r.pct_memcpy:.0f}%",
                      f"{r.pct_copy_traffic:.0f}%", f"{c / t.median / 1e6:.0f}M", f"{ct / t_torch.median / 1e6:.1f}M",
                      f"{speed:.0f}x", "yes" if same else "NO"])
        print(f"# {k}: cpu {t.ms()} ms, torch {t_torch.median * 1e3:.0f} ms on {ct} elements", flush=True)
    return report("bench_combine", ["plan", "N", "elements", "cpu ms [p20-p80]", "GB/s", "memcpy GB/s (copied)", "% memcpy",
                 "% copy traffic", "cpu elem/s", "torch elem/s", "speedup", "bitwise"], table, rows)


def main(argv=None) -> int:
    run(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
