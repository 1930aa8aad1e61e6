"""GPU whole-run kernels against the reference backend and the copy roofline, all in one run.

    python benchmarks/bench_gpu.py                      # N=8 bf16, 1B elements if memory allows
    python benchmarks/bench_gpu.py --elems 100000000 --optimizers adam --repeats 5

Measured in this run, on this GPU, with the same inputs for every provider:
- baselines: device-to-device copy bandwidth (read + write bytes / time) and pinned
  host-to-device copy bandwidth;
- per optimizer (GD = sgd, which the kernels fold into one weighted sum; adagrad, adam,
  adamw, adadelta; N ingredients, 1 epoch, batch 1, soup pivot, adaptive): the reference backend (torch.optim on GPU; run over slices of
  --ref-slice elements and summed, because its fp32 temporaries for 1B elements do not
  fit in GPU memory), the triton kernel, and the CUDA C++ kernel when that backend is
  available; ms (median, 20th/80th percentile), effective GB/s = (N*C*sizeof(in) +
  C*sizeof(out)) / time, % of the D2D copy bandwidth, speedup over the reference; the
  largest difference to the reference output;
- the combine pass (``ame_kernels.methods.combine``: linear, task arithmetic, TIES, DARE,
  DELLA plans over the same N inputs and a base): the triton and CUDA C++ combine kernels,
  ms and effective GB/s = (bytes read + written: N inputs, base, per-element probs for
  DELLA, out) / time as a % of the D2D copy; max|diff| is checked bit for bit against the
  oracle ``combine_torch`` over a slice (--combine-check elements at a global offset past
  2^32), so the column counts differing elements there (0 expected);
- the chunked host path (driver.py): inputs in host memory (pinned, and pageable),
  streamed through the GPU; effective GB/s as a % of the pinned H2D bandwidth.
Rows are appended to benchmarks/results/bench_gpu.csv. Without a CUDA GPU it prints
"no CUDA GPU: skipped" and exits 0.

``--device cpu`` is a smoke run of this script, not a benchmark: the same code path on
CPU tensors with the Triton kernels interpreted (TRITON_INTERPRET=1) and tiny sizes, so
CI checks the script end to end before a GPU session spends its time on it. Its
figures mean nothing and its rows are not written unless --csv is given.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import os
import platform
import subprocess
import sys
from typing import Callable, Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CSV_PATH = os.path.join(ROOT, "benchmarks", "results", "bench_gpu.csv")
OPTIMIZERS = {
    "gd": dict(optimizer="sgd", lr=1.0, lr_schedule="harmonic"),
    "adagrad": dict(optimizer="adagrad", lr=1e-2),
    "adam": dict(optimizer="adam", lr=1e-3),
    "adamw": dict(optimizer="adamw", lr=1e-3, weight_decay=1e-2),
    "adadelta": dict(optimizer="adadelta", lr=1.0),
}
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclasses.dataclass
class Row:
    case: str
    optimizer: str
    provider: str
    n: int
    elems: int
    in_dtype: str
    out_dtype: str
    ms_median: float
    ms_p20: float
    ms_p80: float
    gb_per_s: float
    baseline: str
    baseline_gb_per_s: float
    pct_of_baseline: float
    speedup_vs_reference: float
    max_abs_diff_vs_reference: float
    gpu: str
    torch: str
    triton: str
    cuda: str
    commit: str
    date: str


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], None], repeats: int, warmup: int, once: Callable[[Callable[[], None]], float]) -> tuple:
    """(median, p20, p80) of ``once(fn)`` milliseconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    _sync()
    times = [once(fn) for _ in range(repeats)]
    return float(np.median(times)), float(np.percentile(times, 20)), float(np.percentile(times, 80))


def time_cuda(fn: Callable[[], None], repeats: int, warmup: int) -> tuple:
    """(median, p20, p80) milliseconds of ``fn``, timed with CUDA events on the current stream."""
    import torch

    def once(f) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        f()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    return _timed(fn, repeats, warmup, once)


def time_wall(fn: Callable[[], None], repeats: int, warmup: int) -> tuple:
    """Like time_cuda but host wall clock (for paths that synchronize themselves, and the CPU smoke run)."""
    import time

    def once(f) -> float:
        t0 = time.perf_counter()
        f()
        _sync()
        return (time.perf_counter() - t0) * 1e3

    return _timed(fn, repeats, warmup, once)


def pick_elems(requested: Optional[int], n: int, in_size: int, out_size: int) -> int:
    """1B elements (or the request) halved until inputs + 2 outputs + 4 GiB of headroom fit in free memory."""
    import torch

    free, _ = torch.cuda.mem_get_info()
    elems = requested or (1 << 30)
    if requested:
        return elems
    while elems > (1 << 20) and n * elems * in_size + 2 * elems * out_size + (4 << 30) > free:
        elems //= 2
    return elems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=8, help="ingredients (default 8)")
    ap.add_argument("--elems", type=int, default=None, help="elements per ingredient (default 1B if memory allows)")
    ap.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="bf16", help="input and output dtype")
    ap.add_argument("--optimizers", default="gd,adagrad,adam,adamw,adadelta", help=f"comma list of {', '.join(OPTIMIZERS)}")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ref-repeats", type=int, default=3, help="repeats for the (slow) reference backend")
    ap.add_argument("--ref-slice", type=int, default=1 << 27, help="elements per reference call (memory bound)")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--host-elems", type=int, default=1 << 28, help="elements per ingredient for the chunked host path")
    ap.add_argument("--chunk-elems", type=int, default=None, help="driver chunk (default: its own choice)")
    ap.add_argument("--combine", default="linear,task_arithmetic,ties,dare,della",
                    help=f"comma list of combine plans ({', '.join(COMBINE_PLANS)}); empty: skip the combine pass")
    ap.add_argument("--combine-check", type=int, default=1 << 22,
                    help="elements of each combine output checked bit for bit against combine_torch")
    ap.add_argument("--csv", default=None, help=f"rows appended here (default {os.path.relpath(CSV_PATH, ROOT)}; "
                                                "none for --device cpu)")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="cpu: a smoke run of the script (needs TRITON_INTERPRET=1; figures meaningless)")
    args = ap.parse_args(argv)

    import torch

    smoke = args.device == "cpu"
    if smoke and os.environ.get("TRITON_INTERPRET") != "1":
        ap.error("--device cpu runs the Triton kernels interpreted: set TRITON_INTERPRET=1")
    if not smoke and not torch.cuda.is_available():
        print("no CUDA GPU: skipped")
        return 0
    if args.csv is None and not smoke:
        args.csv = CSV_PATH
    import triton

    import ame_kernels as ak
    from ame_kernels.backends import get_backend
    from ame_kernels.backends.triton.driver import ChunkedRunner

    dtype = getattr(torch, DTYPE_NAMES[args.dtype])
    opts = [o.strip() for o in args.optimizers.split(",") if o.strip()]
    for o in opts:
        if o not in OPTIMIZERS:
            ap.error(f"--optimizers: unknown {o!r}; choose from {', '.join(OPTIMIZERS)}")
    dev = args.device
    timer = time_wall if smoke else time_cuda
    if smoke:
        gpu, about = "cpu (smoke run: figures meaningless)", "interpreted"
    else:
        props = torch.cuda.get_device_properties(0)
        gpu, about = props.name, f"{props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs"
    meta = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, cuda=str(torch.version.cuda),
                commit=_commit(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    print(f"# bench_gpu  {gpu} ({about})  "
          f"torch {meta['torch']}  triton {meta['triton']}  CUDA {meta['cuda']}  ame_kernels {ak.__version__} "
          f"@ {meta['commit']}  host {platform.processor() or platform.machine()} ({os.cpu_count()} cpus)  {meta['date']}")

    triton_be = get_backend("triton", dev)
    cuda_be = None
    if smoke:  # on a GPU machine get_backend("cuda", "cpu") succeeds (it streams host tensors)
        print("# cuda backend: not part of the --device cpu smoke run")
    else:
        try:
            cuda_be = get_backend("cuda", dev)
        except ak.MergeError as e:
            print(f"# cuda backend not available: {e}")
    ref_be = get_backend("reference", dev)

    n, isz = args.n, torch.empty(0, dtype=dtype).element_size()
    c = (args.elems or 4099) if smoke else pick_elems(args.elems, n, isz, isz)
    print(f"# N={n} x {c:,} elements {args.dtype} in, {args.dtype} out; 1 epoch, batch 1, soup pivot, adaptive")
    rows = []

    # --- baselines ---------------------------------------------------------------------
    nbytes = min(n * c * isz, 4 << 30)
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    d2d = timer(lambda: dst.copy_(src), args.repeats, args.warmup)
    d2d_gbs = 2 * nbytes / (d2d[0] * 1e-3) / 1e9
    del src, dst
    hbytes = min(nbytes, 2 << 30)
    host = torch.empty(hbytes, dtype=torch.uint8, pin_memory=not smoke)
    dst = torch.empty(hbytes, dtype=torch.uint8, device=dev)
    h2d = timer(lambda: dst.copy_(host, non_blocking=True), args.repeats, args.warmup)
    h2d_gbs = hbytes / (h2d[0] * 1e-3) / 1e9
    del host, dst
    print(f"D2D copy {d2d_gbs:8.1f} GB/s (read+write, {nbytes / 2**30:.2f} GiB)   "
          f"pinned H2D {h2d_gbs:6.1f} GB/s ({hbytes / 2**30:.2f} GiB)")
    for case, t, gbs in (("d2d_copy", d2d, d2d_gbs), ("pinned_h2d", h2d, h2d_gbs)):
        rows.append(Row(case, "-", "torch", n, c, args.dtype, args.dtype, *t, gbs, case, gbs, 100.0, float("nan"),
                        float("nan"), **meta))

    # --- whole run, inputs resident on the GPU -------------------------------------------
    gen = torch.Generator(device=dev).manual_seed(0)
    xs = [torch.randn(c, device=dev, generator=gen).to(dtype) for _ in range(n)]
    out = torch.empty(c, dtype=dtype, device=dev)
    traffic = n * c * isz + c * isz
    print(f"\n{'optimizer':<9} {'provider':<10} {'ms':>9} {'p20-p80':>17} {'GB/s':>8} {'% D2D':>6} "
          f"{'x ref':>7} {'max|diff|':>10}")
    for opt in opts:
        plan = ak.schedule(ak.AMEConfig(**OPTIMIZERS[opt]), n)
        ref_ms, ref_out = float("nan"), None
        if not args.skip_reference:
            ref_out = torch.empty_like(out)
            slices = [slice(lo, min(c, lo + args.ref_slice)) for lo in range(0, c, args.ref_slice)]

            def run_ref():
                for s in slices:
                    ref_be.whole_run([x[s] for x in xs], plan, None, True, ref_out[s])

            t = timer(run_ref, args.ref_repeats, 1)
            ref_ms = t[0]
            rows.append(_row("whole_run", opt, "reference", n, c, args, t, traffic, d2d_gbs, ref_ms, float("nan"), meta))
            _print(opt, "reference", t, traffic, d2d_gbs, ref_ms, float("nan"))
            _empty_cache()
        providers = [("triton", triton_be)] + ([("cuda", cuda_be)] if cuda_be is not None else [])
        for name, be in providers:
            t = timer(lambda: be.whole_run(xs, plan, None, True, out), args.repeats, args.warmup)
            diff = float("nan")
            if ref_out is not None:
                diff = (out.float() - ref_out.float()).abs().max().item()
            rows.append(_row("whole_run", opt, name, n, c, args, t, traffic, d2d_gbs, ref_ms, diff, meta))
            _print(opt, name, t, traffic, d2d_gbs, ref_ms, diff)
        del ref_out

    # --- combine pass, inputs resident on the GPU ---------------------------------------------
    methods = [m.strip() for m in args.combine.split(",") if m.strip()]
    for m in methods:
        if m not in COMBINE_PLANS:
            ap.error(f"--combine: unknown {m!r}; choose from {', '.join(COMBINE_PLANS)}")
    if methods:
        bench_combine(methods, xs, out, triton_be, cuda_be, args, timer, d2d_gbs, meta, rows, dev, gen)
    del xs, out
    _empty_cache()

    # --- chunked host path ---------------------------------------------------------------
    hc = min(args.host_elems, c)
    hxs = [torch.randn(hc).to(dtype) for _ in range(n)]
    traffic = n * hc * isz + hc * isz
    print(f"\nchunked host path: N={n} x {hc:,} elements in host memory, adam, vs pinned H2D {h2d_gbs:.1f} GB/s")
    plan = ak.schedule(ak.AMEConfig(**OPTIMIZERS["adam"]), n)
    providers = [("triton", triton_be)] + ([("cuda", cuda_be)] if cuda_be is not None else [])
    for pinned in (False,) if smoke else (True, False):
        inputs = [x.pin_memory() for x in hxs] if pinned else hxs
        hout = torch.empty(hc, dtype=dtype, pin_memory=pinned)
        for name, be in providers:
            runner = ChunkedRunner(dev, args.chunk_elems)
            t = time_wall(lambda: runner.run(be.whole_run, inputs, plan, None, True, hout), max(3, args.repeats // 2), 1)
            gbs = traffic / (t[0] * 1e-3) / 1e9
            case = f"chunked_host_{'pinned' if pinned else 'pageable'}"
            rows.append(Row(case, "adam", name, n, hc, args.dtype, args.dtype, *t, gbs, "pinned_h2d", h2d_gbs,
                            100 * gbs / h2d_gbs, float("nan"), float("nan"), **meta))
            print(f"  {'pinned' if pinned else 'pageable':<8} {name:<8} {t[0]:9.2f} ms  {gbs:7.1f} GB/s  "
                  f"{100 * gbs / h2d_gbs:5.1f}% of pinned H2D")
            runner.release()
        del inputs, hout

    if args.csv is None:
        print(f"\n{len(rows)} rows (smoke run: none written)")
        return 0
    os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
    new = not os.path.exists(args.csv)
    with open(args.csv, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[fl.name for fl in dataclasses.fields(Row)])
        if new:
            w.writeheader()
        for r in rows:
            w.writerow(dataclasses.asdict(r))
    print(f"\n{len(rows)} rows appended to {os.path.relpath(args.csv, ROOT)}")
    return 0


def _combine_plan(method: str, n: int, c: int):
    """(CombinePlan, uses base, uses per-element probs) for one method's shape of combine pass."""
    from ame_kernels.methods.combine import ELECT_SUM, CombinePlan, name_key

    w = np.full(n, 1.0 / n, dtype=np.float32)
    key = name_key("model.layers.0.mlp.down_proj.weight")
    if method == "linear":
        return CombinePlan(n=n, weight=w, normalize=True), False, False
    if method == "task_arithmetic":
        return CombinePlan(n=n, weight=np.ones(n), lam=0.5), True, False
    if method == "ties":  # top 20% by magnitude (the window keys here are synthetic: the kernel's cost is the same)
        return CombinePlan(n=n, weight=np.ones(n), top_mag=np.full(n, np.inf), end_mag=np.full(n, 0.25),
                           end_idx=np.zeros(n), elect=ELECT_SUM, normalize=True), True, False
    if method == "dare":
        return CombinePlan(n=n, weight=np.ones(n), density=np.full(n, 0.1), inv_prob=True, seed=7, name_key=key,
                           lam=0.5), True, False
    if method == "della":  # per-element keep probabilities, elect sum
        return CombinePlan(n=n, weight=np.ones(n), density=np.full(n, 0.5), inv_prob=True, seed=7, name_key=key,
                           elect=ELECT_SUM, normalize=True), True, True
    raise KeyError(method)


COMBINE_PLANS = ("linear", "task_arithmetic", "ties", "dare", "della")


def bench_combine(methods, xs, out, triton_be, cuda_be, args, timer, d2d_gbs, meta, rows, dev, gen) -> None:
    """The combine kernels over the whole-run section's inputs (see the module docstring)."""
    import torch

    from ame_kernels.methods.combine import combine_torch

    n, c = len(xs), out.numel()
    isz = xs[0].element_size()
    base = torch.randn(c, device=dev, generator=gen).to(xs[0].dtype)
    # the slice checked against the oracle, at a global offset past 2^32 (both Philox counter words)
    k = min(c, args.combine_check)
    offset = (1 << 32) - k // 2
    print(f"\ncombine pass: N={n} x {c:,} elements, base {args.dtype}; bitwise check over {k:,} elements at offset "
          f"{offset}")
    print(f"{'method':<16} {'provider':<10} {'ms':>9} {'p20-p80':>17} {'GB/s':>8} {'% D2D':>6} {'differ':>7}")
    for method in methods:
        plan, with_base, with_probs = _combine_plan(method, n, c)
        b = base if with_base else None
        probs = None
        if with_probs:
            free, _ = torch.cuda.mem_get_info() if torch.cuda.is_available() else (1 << 62, 0)
            if n * c * 4 + (2 << 30) > free:
                print(f"{method:<16} skipped: {n} fp32 probability rows of {c:,} elements do not fit in free memory")
                continue
            probs = [torch.rand(c, device=dev, generator=gen) for _ in range(n)]
        traffic = n * c * isz + c * isz + (c * isz if with_base else 0) + (n * c * 4 if with_probs else 0)
        want = torch.empty(k, dtype=out.dtype)
        sl = slice(0, k)
        combine_torch([x[sl].cpu() for x in xs], None if b is None else b[sl].cpu(), want, plan, offset,
                      None if probs is None else [p[sl].cpu() for p in probs])
        providers = [("triton", triton_be)] + ([("cuda", cuda_be)] if cuda_be is not None else [])
        for name, be in providers:
            t = timer(lambda: be.combine(xs, b, out, plan, 0, probs), args.repeats, args.warmup)
            got = torch.empty(k, dtype=out.dtype, device=dev)
            be.combine([x[sl] for x in xs], None if b is None else b[sl], got, plan, offset,
                       None if probs is None else [p[sl] for p in probs])
            bits = torch.int32 if out.dtype == torch.float32 else torch.int16
            differ = int((got.cpu().view(bits) != want.view(bits)).sum())
            gbs = traffic / (t[0] * 1e-3) / 1e9
            rows.append(Row(f"combine_{method}", "-", name, n, c, args.dtype, args.dtype, *t, gbs, "d2d_copy", d2d_gbs,
                            100 * gbs / d2d_gbs, float("nan"), float(differ), **meta))
            print(f"{method:<16} {name:<10} {t[0]:9.2f} {t[1]:8.2f}-{t[2]:<8.2f} {gbs:8.1f} {100 * gbs / d2d_gbs:5.1f}% "
                  f"{differ:7d}")
        del probs, want
        _empty_cache()
    del base


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _row(case, opt, provider, n, c, args, t, traffic, d2d_gbs, ref_ms, diff, meta) -> Row:
    gbs = traffic / (t[0] * 1e-3) / 1e9
    return Row(case, opt, provider, n, c, args.dtype, args.dtype, *t, gbs, "d2d_copy", d2d_gbs, 100 * gbs / d2d_gbs,
               ref_ms / t[0], diff, **meta)


def _print(opt, provider, t, traffic, d2d_gbs, ref_ms, diff) -> None:
    gbs = traffic / (t[0] * 1e-3) / 1e9
    print(f"{opt:<9} {provider:<10} {t[0]:9.2f} {t[1]:8.2f}-{t[2]:<8.2f} {gbs:8.1f} {100 * gbs / d2d_gbs:5.1f}% "
          f"{ref_ms / t[0]:6.1f}x {diff:10.3g}")


if __name__ == "__main__":
    sys.exit(main())
