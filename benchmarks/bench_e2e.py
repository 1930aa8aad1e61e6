"""End to end: merge a family of sharded bf16 checkpoints from disk, against plain IO of the same bytes.

    python benchmarks/bench_e2e.py                 # 4 x ~1.1B params (TinyLlama shapes), ~8.8 GB of inputs
    python benchmarks/bench_e2e.py --small         # 4 x ~0.1B params, a quick look
    python benchmarks/bench_e2e.py --nproc 2       # also 2 processes (ame_kernels.distributed, gloo)

Printed, all measured in this run on this machine:
- plain IO: read every input byte once (readinto a reused buffer) and write the
  output's bytes once (pwrite; buffered, and O_DIRECT as ame-merge writes), cold
  page cache (inputs evicted with posix_fadvise DONTNEED) and warm; the faster
  of the two writes is the baseline of the ratios;
- every measured run starts after the same pause (--settle) following the
  deletion of the previous output (see ``settle``);
- ame-merge (a fresh process, start-up included) for the soup (GD, lr 1 constant,
  fixed pivot) and Adam-AME (adam, lr 1e-3, harmonic), cold and warm, as a ratio
  to plain IO of the same cache state, with the merge process's peak RSS (wait4, through common.run_child);
- the start-up of a merge process (interpreter and imports), and each ratio without it;
  while `import ame_kernels` imports torch, also "torch-free entry" rows: the same
  ame-merge with the package __init__ bypassed and torch blocked (what the CPU file
  path costs once the package imports torch lazily);
- with --nproc K: the same merges under torchrun with K processes (warm; peak RSS
  is the largest single process).
Rows are appended to benchmarks/results/bench_e2e.csv.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from common import run_child  # noqa: E402

from ame_kernels.io.safetensors import ShardWriter  # noqa: E402  (torch-free)

# TinyLlama-1.1B: vocab 32000, hidden 2048, intermediate 5632, 22 layers, 32 heads / 4 kv heads
FULL = dict(vocab=32000, hidden=2048, inter=5632, layers=22, kv=256)
SMALL = dict(vocab=32000, hidden=768, inter=2048, layers=8, kv=256)


def llama_shapes(vocab, hidden, inter, layers, kv):
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def generate(folder, shapes, seed, shard_bytes, base, offsets_seed=None):
    """One sharded bf16 checkpoint: windows of a shared random array, xor-perturbed in the low 4
    mantissa bits per model. The windows' offsets come from the model's own seed (independent
    models: task vectors as large as the weights) or, with ``offsets_seed``, from that seed for
    every model (fine-tunes of one base: the same weights but their low bits, so each task vector
    entry is a few bf16 ulps and a row holds few distinct magnitudes, as real fine-tunes' do)."""
    os.makedirs(folder, exist_ok=True)
    shards, cur, fill = [], [], 0
    for name, shape in shapes:
        nbytes = int(np.prod(shape)) * 2
        if cur and fill + nbytes > shard_bytes:
            shards.append(cur)
            cur, fill = [], 0
        cur.append((name, "bfloat16", shape))
        fill += nbytes
    shards.append(cur)
    rng = np.random.default_rng(seed)
    orng = rng if offsets_seed is None else np.random.default_rng(offsets_seed)
    weight_map = {}
    for k, entries in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        w = ShardWriter(os.path.join(folder, fname), entries, {"format": "pt"}).create()
        for name, _, shape in entries:
            n = int(np.prod(shape))
            for s in range(0, n, 1 << 24):
                c = min(1 << 24, n - s)
                off = int(orng.integers(0, base.size - c))
                w.write(name, s, base[off : off + c] ^ rng.integers(0, 16, c, dtype=np.uint16))
            weight_map[name] = fname
        w.close()
    total = sum(int(np.prod(s)) * 2 for _, s in shapes)
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "llama", "torch_dtype": "bfloat16"}, f)


def data_files(folder):
    return sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))


def evict(paths):
    """Drop these files from the page cache (no root needed); False if the platform cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def plain_io(inputs, out_path, out_bytes, direct=False, buf_mb=64):
    """Read every input byte once, write out_bytes once: the floor a merge from disk cannot beat.

    direct=True writes with O_DIRECT (as ame-merge does where it can) from an aligned buffer.
    """
    import mmap

    buf = mmap.mmap(-1, buf_mb << 20)  # page aligned, for O_DIRECT
    mv = memoryview(buf)
    t0 = time.perf_counter()
    for p in inputs:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(mv):
                pass
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    fd = os.open(out_path, flags, 0o644)
    padded = -(-out_bytes // 4096) * 4096
    left, off = padded, 0
    while left:
        n = os.pwrite(fd, mv[: min(len(mv), left)], off)
        left -= n
        off += n
    os.ftruncate(fd, out_bytes)
    os.close(fd)
    secs = time.perf_counter() - t0
    os.remove(out_path)
    return secs


#: --methods: name -> (parameters, whether model 0 is the base)
METHOD_CASES = {
    "linear": ({}, False),
    "task_arithmetic": ({"weight": 0.5}, True),
    "ties": ({"density": 0.2}, True),
    "dare_ties": ({"density": 0.3}, True),
    "breadcrumbs": ({"density": 0.3, "gamma": 0.01}, True),
    "della": ({"density": 0.3, "epsilon": 0.1}, True),
    "della_linear": ({"density": 0.3, "epsilon": 0.1}, True),
    "slerp": ({"t": 0.4}, False),
    "model_stock": ({}, True),
}
#: --methods, a task-vector transform under AME: name -> AME options (model 0 the base, models 1.. the ingredients)
TRANSFORM_CASES = {
    "adam+dare": {"optimizer": "adam", "lr": "1e-3", "transform": "dare", "density": 0.3},
    "adam+ties": {"optimizer": "adam", "lr": "1e-3", "transform": "ties", "density": 0.2},
}


def _timed_plain(inputs, out_path, out_bytes, direct, pause):
    import resource

    settle(pause)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    secs = plain_io(inputs, out_path, out_bytes, direct=direct)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return secs, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime), None


def settle(seconds):
    """The same pause before every measured run: on VMs that hand freed memory back to the host
    (virtio-balloon free page reporting), how long ago the last output was deleted changes what
    writing new pages costs; every case gets the same conditions."""
    time.sleep(seconds)


# ame-merge with the package's __init__ bypassed and torch blocked: what `ame-merge` costs once
# `import ame_kernels` imports torch lazily (the file path itself needs numpy and the extension only)
TORCH_FREE = (
    "import sys, types; pkg = types.ModuleType('ame_kernels'); pkg.__path__ = [sys.argv.pop(1)]; "
    "pkg.__version__ = 'bench'; sys.modules['ame_kernels'] = pkg; sys.modules['torch'] = None; "
    "from ame_kernels.cli import main; sys.exit(main(sys.argv[1:]))"
)


def run_merge(cfg_path, out_dir, extra, env=None, pause=0.0, torch_free=False):
    """ame-merge in a fresh process: (wall seconds, CPU seconds, peak RSS bytes of that process)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    settle(pause)
    entry = ["-c", TORCH_FREE, os.path.join(ROOT, "ame_kernels")] if torch_free else ["-m", "ame_kernels"]
    cmd = [sys.executable, *entry, cfg_path, out_dir, "--quiet"] + extra
    r = run_child(cmd, cwd=ROOT, env=env)
    if r.code != 0:
        raise SystemExit(f"bench_e2e: {' '.join(cmd)} failed with exit code {r.code}")
    return r.seconds, r.cpu, r.peak_rss


def run_distributed(cfg_path, out_dir, nproc, extra, pause=0.0):
    shutil.rmtree(out_dir, ignore_errors=True)
    settle(pause)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", f"--nproc-per-node={nproc}", "-m", "ame_kernels", cfg_path, out_dir, "--quiet"] + extra
    r = run_child(cmd, cwd=ROOT)  # peak_rss: the largest of torchrun and its ranks
    if r.code != 0:
        raise SystemExit(f"bench_e2e: {' '.join(cmd)} failed")
    return r.seconds, r.cpu, r.peak_rss


def machine():
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return dict(cpu=cpu, cores=os.cpu_count(), mem_gb=round(mem / 2**30, 1), python=platform.python_version(),
                numpy=np.__version__, commit=commit, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


@dataclasses.dataclass
class Row:
    case: str
    cache: str
    seconds: float
    ratio_to_plain_io: float
    startup_seconds: float
    cpu_seconds: float
    gb_per_s: float
    peak_rss_mb: float
    n: int
    params: int
    in_gb: float
    out_gb: float
    backend: str
    threads: int
    chunk_mb: float
    cpu: str
    cores: int
    commit: str
    date: str


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4, help="ingredients (default 4)")
    ap.add_argument("--small", action="store_true", help="~0.1B params per model instead of ~1.1B")
    ap.add_argument("--dir", default="/tmp/ame_bench_e2e", help="where to generate the models (kept for reuse)")
    ap.add_argument("--chunk-mb", default=None, help="passed to ame-merge")
    ap.add_argument("--threads", default=None, help="passed to ame-merge")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--nproc", type=int, default=1, help="also run with this many processes (torchrun, gloo)")
    ap.add_argument("--repeat", type=int, default=3, help="warm rounds (the median is reported; default 3)")
    ap.add_argument("--clean", action="store_true", help="delete the generated models afterwards")
    ap.add_argument("--family", choices=["independent", "finetune"], default="independent",
                    help="independent models (default), or fine-tunes of one base: the same weights but "
                         "their low mantissa bits (small task vectors with many ties, as real fine-tunes)")
    ap.add_argument("--settle", type=float, default=3.0, help="pause before every measured run, seconds (default 3)")
    ap.add_argument("--methods", default="", help="also these merge methods, comma-separated, or 'all' (model 0 is "
                    "the base of the methods that take one, the others its fine-tunes; slerp merges models 0 and 1; adam+dare, adam+ties: Adam-AME over transformed task vectors)")
    args = ap.parse_args(argv)

    spec = SMALL if args.small else FULL
    shapes = llama_shapes(**spec)
    params = sum(int(np.prod(s)) for _, s in shapes)
    family = "" if args.family == "independent" else f"-{args.family}"
    root = os.path.join(args.dir, f"{'small' if args.small else 'full'}-n{args.n}{family}")
    models = [os.path.join(root, f"m{i}") for i in range(args.n)]
    need = params * 2 * (args.n + 1.2)
    free = shutil.disk_usage(os.path.dirname(root) if os.path.exists(os.path.dirname(root)) else "/tmp").free
    if not all(os.path.exists(os.path.join(m, "model.safetensors.index.json")) for m in models):
        if free < need:
            raise SystemExit(f"bench_e2e: needs {need / 1e9:.1f} GB free under {args.dir}, has {free / 1e9:.1f} GB")
        t0 = time.perf_counter()
        base = (np.random.default_rng(0).standard_normal(1 << 26, dtype=np.float32) * 0.02).view(np.uint32) >> 16
        base = base.astype(np.uint16)
        for i, m in enumerate(models):
            generate(m, shapes, 1 + i, 2 * 10**9, base, None if args.family == "independent" else 1000)
        print(f"generated {args.n} x {params / 1e9:.2f}B params in {time.perf_counter() - t0:.0f} s under {root}")
    inputs = [p for m in models for p in data_files(m)]
    in_bytes = sum(os.path.getsize(p) for p in inputs)
    out_bytes = params * 2
    info = machine()
    print(f"# machine: {info['cpu']}, {info['cores']} cores, {info['mem_gb']} GiB; python {info['python']}, numpy {info['numpy']}, commit {info['commit']}")
    print(f"# {args.n} x {params / 1e9:.3f}B params bf16: {in_bytes / 1e9:.2f} GB in, {out_bytes / 1e9:.2f} GB out")

    cfgs = {
        "soup (GD)": dict(optimizer="sgd", lr=1, lr_schedule="constant", adaptive_pivot=False),
        "Adam-AME": dict(optimizer="adam", lr="1e-3"),
    }
    import yaml

    out_dir = os.path.join(root, "merged")
    extra = ["--backend", args.backend]
    if args.chunk_mb:
        extra += ["--chunk-mb", str(args.chunk_mb)]
    if args.threads:
        extra += ["--threads", str(args.threads)]
    backend = _backend_name(args.backend)
    probe = subprocess.run([sys.executable, "-c", "import sys, ame_kernels; print('torch' in sys.modules)"], cwd=ROOT, capture_output=True, text=True)
    eager_torch = probe.stdout.strip() == "True"
    cases = []  # (label, is_plain, run() -> (wall s, cpu s, peak rss bytes or None))
    for direct in (False, True):
        cases.append((f"plain IO ({'direct' if direct else 'buffered'} write)", True,
                      lambda direct=direct: _timed_plain(inputs, os.path.join(root, "plain.out"), out_bytes, direct, args.settle)))
    docs = {label: {"models": [{"path": m} for m in models], **cfg} for label, cfg in cfgs.items()}
    wanted = [*METHOD_CASES, *TRANSFORM_CASES] if args.methods == "all" else [m for m in args.methods.split(",") if m]
    for name in wanted:
        if name in TRANSFORM_CASES:
            docs[name] = {"base": models[0], "models": [{"path": m} for m in models[1:]], **TRANSFORM_CASES[name]}
            continue
        if name not in METHOD_CASES:
            raise SystemExit(f"bench_e2e: --methods: unknown method {name!r}; valid: "
                             f"{', '.join([*METHOD_CASES, *TRANSFORM_CASES])}")
        params, base = METHOD_CASES[name]
        ms = models[:2] if name == "slerp" else (models[1:] if base else models)
        docs[name] = {"method": name, **({"base": models[0]} if base else {}), "models": [{"path": m} for m in ms], **params}
    for label, doc in docs.items():
        cfg_path = os.path.join(root, f"{label.split()[0].lower()}.yaml")
        with open(cfg_path, "w") as f:
            yaml.safe_dump(doc, f)
        cases.append((label, False, lambda c=cfg_path: run_merge(c, out_dir, extra, pause=args.settle)))
        if eager_torch and backend == "cpu":
            cases.append((f"{label}, torch-free entry", False,
                          lambda c=cfg_path: run_merge(c, out_dir, extra, pause=args.settle, torch_free=True)))
        if args.nproc > 1:
            cases.append((f"{label} x{args.nproc} proc", False,
                          lambda c=cfg_path: run_distributed(c, out_dir, args.nproc, extra, pause=args.settle)))
    runs = {}
    if evict(inputs):  # cold: one run per case, inputs evicted first
        for label, _, run in cases:
            shutil.rmtree(out_dir, ignore_errors=True)
            evict(inputs)
            runs[(label, "cold")] = [run()]
    plain_io(inputs, os.path.join(root, "plain.out"), out_bytes)  # warm the page cache
    for _ in range(args.repeat):  # warm: rounds, the cases interleaved so load from elsewhere hits all alike
        for label, _, run in cases:
            runs.setdefault((label, "warm"), []).append(run())
    shutil.rmtree(out_dir, ignore_errors=True)

    # start-up of a merge process (interpreter + imports), measured here so the merge proper can be read off
    startup = sorted(_startup() for _ in range(3))[1]
    med = {k: sorted(v, key=lambda r: r[0])[len(v) // 2] for k, v in runs.items()}
    plain = {cache: min(med[(label, cache)][0] for label, is_plain, _ in cases if is_plain) for cache in ("cold", "warm") if (cases[0][0], cache) in med}
    print(f"# load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; warm: median of {args.repeat} interleaved rounds")
    print(f"# start-up of a merge process (python -c 'import ame_kernels.cli', median of 3): {startup:.2f} s")
    if eager_torch:
        print("# 'import ame_kernels' imports torch; 'torch-free entry' rows bypass the package __init__ with torch blocked")
    print(f"# x plain IO: against the faster plain IO of the same cache state; CPU s: user + sys of the process(es)")
    print(f"{'case':<28} {'cache':<5} {'seconds':>8} {'[min-max]':>13} {'x plain IO':>10} {'w/o start-up':>12} {'CPU s':>6} {'GB/s':>6} {'peak RSS':>9}")
    results = []
    for (label, cache), (secs, cpu, rss) in med.items():
        walls = [r[0] for r in runs[(label, cache)]]
        ratio = secs / plain[cache]
        is_plain = label.startswith("plain IO")
        net = "-" if is_plain or "torch-free" in label else f"{(secs - startup) / plain[cache]:.2f}"
        gbps = (in_bytes + out_bytes) / secs / 1e9
        spread = f"[{min(walls):.1f}-{max(walls):.1f}]"
        print(f"{label:<28} {cache:<5} {secs:>8.2f} {spread:>13} {ratio:>10.2f} {net:>12} {cpu:>6.1f} {gbps:>6.2f} {(f'{rss / 2**20:.0f} MiB' if rss else '-'):>9}")
        results.append(Row(f"{label} [{args.family}]" if family else label, cache, round(secs, 3), round(ratio, 3), round(startup, 3), round(cpu, 3), round(gbps, 3), round(rss / 2**20, 1) if rss else 0.0,
                           args.n, params, round(in_bytes / 1e9, 3), round(out_bytes / 1e9, 3), backend,
                           int(args.threads or os.cpu_count()), float(args.chunk_mb or 64), info["cpu"], info["cores"], info["commit"], info["date"]))
    csv_path = os.path.join(ROOT, "benchmarks", "results", "bench_e2e.csv")
    os.makedirs(os.path.dirname(csv_path), exist_ok=True)
    new = not os.path.exists(csv_path)
    with open(csv_path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[fl.name for fl in dataclasses.fields(Row)])
        if new:
            w.writeheader()
        for r in results:
            w.writerow(dataclasses.asdict(r))
    if args.clean:
        shutil.rmtree(root, ignore_errors=True)


def _startup():
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import ame_kernels.cli"], cwd=ROOT, check=True)
    return time.perf_counter() - t0


def _backend_name(name):
    if name != "auto":
        return name
    from ame_kernels.engine import _resolve_backend

    return _resolve_backend("auto", "cpu")


if __name__ == "__main__":
    main()
