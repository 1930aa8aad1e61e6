"""ame-merge against mergekit's linear merge of the same files, measured in one run.

    python benchmarks/bench_mergekit.py --mergekit /path/to/mergekit-yaml          # 4 x 1.1B bf16
    python benchmarks/bench_mergekit.py --mergekit /path/to/mergekit-yaml --small  # 4 x ~0.1B

mergekit is not a dependency of this project: install it in an environment of its own
(``python -m venv mk && mk/bin/pip install mergekit``) and pass its ``mergekit-yaml``.
Without one (flag or PATH) the script says so and exits 0.

Both tools get the same sharded bf16 Llama-shaped checkpoints (the bench_e2e generator
plus a full Llama config.json, which mergekit needs to resolve the architecture) and do
the same merge: the uniform soup (mergekit ``linear`` with equal weights; ame-merge GD
with lr 1 constant, fixed pivot). After one warm-up run of each (page cache warm), the
two run interleaved for ``--repeat`` rounds, each as a fresh process: wall time
(start-up included) and the process's peak RSS (wait4). The outputs are compared tensor
by tensor (max |difference| in units of the bf16 result).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e import FULL, SMALL, ROOT, generate, llama_shapes, machine  # noqa: E402


def llama_config(vocab, hidden, inter, layers, kv) -> dict:
    heads = hidden // 64
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv // 64, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }


def timed(cmd: list, cwd: str) -> tuple:
    """(wall seconds, peak RSS bytes) of ``cmd`` as a fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(proc.pid, 0)
    secs = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"bench_mergekit: {' '.join(cmd)} failed ({code}): {proc.stderr.read().decode()[-2000:]}")
    return secs, ru.ru_maxrss * 1024


def compare(a_dir: str, b_dir: str) -> float:
    """Largest |a - b| over every tensor, in units of b's magnitude (bf16 outputs)."""
    import torch
    from safetensors.torch import load_file

    def tensors(d):
        out = {}
        for f in sorted(os.listdir(d)):
            if f.endswith(".safetensors"):
                out.update(load_file(os.path.join(d, f)))
        return out

    a, b = tensors(a_dir), tensors(b_dir)
    if set(a) != set(b):
        raise SystemExit(f"bench_mergekit: the outputs hold different tensors: {sorted(set(a) ^ set(b))[:5]}")
    worst = 0.0
    for name in a:
        x, y = a[name].float(), b[name].float()
        worst = max(worst, float(((x - y).abs() / y.abs().clamp_min(1e-3)).max()))
    del torch
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mergekit", default=shutil.which("mergekit-yaml"), help="path to mergekit-yaml")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--dir", default="/tmp/ame_bench_mergekit")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--clean", action="store_true", help="delete the generated data at the end")
    args = ap.parse_args(argv)
    if not args.mergekit or not os.path.exists(args.mergekit):
        print("bench_mergekit: no mergekit-yaml (pass --mergekit or put it on PATH): skipped")
        return 0

    dims = SMALL if args.small else FULL
    shapes = llama_shapes(**dims)
    fam = os.path.join(args.dir, f"{'small' if args.small else 'full'}-n{args.n}")
    models = [os.path.join(fam, f"model{i}") for i in range(args.n)]
    if not all(os.path.exists(os.path.join(m, "model.safetensors.index.json")) for m in models):
        base = (np.random.default_rng(0).standard_normal(1 << 26, dtype=np.float32) * 0.02).view(np.uint32) >> 16
        base = base.astype(np.uint16)
        for i, m in enumerate(models):
            generate(m, shapes, 1 + i, 2 * 10**9, base)
    for m in models:
        with open(os.path.join(m, "config.json"), "w") as f:
            json.dump(llama_config(**dims), f)
    params = sum(int(np.prod(s)) for _, s in shapes)

    mk_cfg = os.path.join(fam, "mergekit_linear.yml")
    with open(mk_cfg, "w") as f:
        f.write("merge_method: linear\ndtype: bfloat16\nmodels:\n")
        for m in models:
            f.write(f"  - model: {m}\n    parameters:\n      weight: 1.0\n")
    ak_cfg = os.path.join(fam, "ame_soup.yaml")
    with open(ak_cfg, "w") as f:
        f.write("models:\n" + "".join(f"  - path: {m}\n" for m in models))
        f.write("optimizer: sgd\nlr: 1\nlr_schedule: constant\nadaptive_pivot: false\n")

    mk_out, ak_out = os.path.join(fam, "out_mergekit"), os.path.join(fam, "out_ame")
    def run_mergekit():
        shutil.rmtree(mk_out, ignore_errors=True)  # mergekit has no --force
        return timed([args.mergekit, mk_cfg, mk_out, "--allow-crimes"], fam)

    runs = {
        "mergekit linear": run_mergekit,
        "ame-merge soup": lambda: timed([sys.executable, "-m", "ame_kernels", ak_cfg, ak_out, "--force", "--quiet"],
                                        ROOT),
    }
    mach = machine()
    print(f"# machine: {mach}")
    print(f"# {args.n} x {params / 1e9:.3f}B params bf16, sharded; warm page cache; median of {args.repeat} rounds")
    samples = {k: [] for k in runs}
    for run in runs.values():  # warm-up: page cache, and each tool's own first-run costs
        run()
    for _ in range(args.repeat):
        for k, run in runs.items():
            samples[k].append(run())
    worst = compare(ak_out, mk_out)
    print(f"{'tool':<18} {'seconds':>8} {'[min-max]':>14} {'peak RSS':>10}")
    med = {}
    for k, vals in samples.items():
        secs = [v[0] for v in vals]
        rss = max(v[1] for v in vals)
        med[k] = statistics.median(secs)
        print(f"{k:<18} {med[k]:8.2f} {f'[{min(secs):.2f}-{max(secs):.2f}]':>14} {rss / 2**20:8.0f} MiB")
    print(f"ame-merge is {med['mergekit linear'] / med['ame-merge soup']:.1f}x faster; "
          f"outputs agree to {worst:.2e} relative (bf16 rounding of the same mean)")
    if args.clean:
        shutil.rmtree(fam, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
