"""ame-merge against mergekit on the same files, one row per merge method, measured in one run.

    python benchmarks/bench_mergekit.py --mergekit /path/to/mergekit-yaml          # 4 x 1.1B bf16
    python benchmarks/bench_mergekit.py --mergekit /path/to/mergekit-yaml --small  # 4 x ~0.1B
    python benchmarks/bench_mergekit.py --mergekit ... --small --methods linear ties --only mergekit

mergekit is not a dependency of this project: install it in an environment of its own
(``python -m venv mk && mk/bin/pip install mergekit``) and pass its ``mergekit-yaml``.
Without one (flag or PATH) the script says so and exits 0.

Both tools get the same sharded bf16 Llama-shaped checkpoints (the bench_e2e generator
plus a full Llama config.json, which mergekit needs to resolve the architecture) and do
the same merge, one row per method (``--methods``, default all of METHODS):

* ``soup``: the uniform soup (mergekit ``linear`` with equal weights; ame-merge GD with
  lr 1 constant, fixed pivot: the AME path);
* ``linear``, ``task_arithmetic``, ``ties``, ``breadcrumbs``, ``dare_ties``, ``della``,
  ``slerp``, ``model_stock``: the same config in both schemas (mergekit's
  ``merge_method`` / ``base_model`` / ``parameters``; ame-merge's ``method:`` / ``base:`` /
  per-model keys / top-level parameters). model0 is the base of the task-vector methods
  and model_stock, models 1..N-1 the fine-tunes; slerp interpolates model0 -> model1.

``--corpus``: instead, the issue's corpus of mergekit-form configs (CORPUS: linear, ties,
gradient-slerp, an orcamini-platy-44layer style passthrough of slices with layer ranges scaled
to the family's layer count, dare_ties, model_stock, task_arithmetic with lambda, della) is
written with its models pointed at the family, and the same file runs unchanged through both
tools (``mergekit-yaml CFG OUT``, ``ame-merge CFG OUT``).

After one warm-up run of each (page cache warm), the tools run interleaved for
``--repeat`` rounds, each as a fresh process: wall time (start-up included) and the
process's peak RSS (wait4). A tool that fails prints its error and its row says
``FAILED``; the other rows still run. The outputs of the deterministic methods are
compared tensor by tensor (max |difference| relative to the result, bf16 outputs;
mergekit computes task-vector methods in bf16 itself, ame-merge in float32, so a few
bf16 ulps are expected there); DARE/DELLA draw different random masks and are not
compared (tests/test_mergekit_parity.py checks them statistically).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_e2e import FULL, SMALL, ROOT, generate, llama_shapes, machine  # noqa: E402
from common import run_child  # noqa: E402


def llama_config(vocab, hidden, inter, layers, kv) -> dict:
    heads = hidden // 64
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv // 64, "vocab_size": vocab, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }



class ToolFailed(Exception):
    pass


SETTLE_SECONDS = 3.0


def settle() -> None:
    """The same conditions before every measured run: the previous tool's output flushed to disk
    (its writeback would otherwise land on the next run's writes) and a pause (``--settle``)."""
    os.sync()
    time.sleep(SETTLE_SECONDS)


def timed(cmd: list, cwd: str) -> tuple:
    """(wall seconds, peak RSS bytes) of ``cmd`` as a fresh process (common.run_child: its own
    peak, not this process's, which the output comparisons make large); ToolFailed on failure."""
    settle()
    r = run_child(cmd, cwd=cwd, quiet=True, capture_stderr=True)
    if r.code != 0:
        tail = r.stderr.decode(errors="replace").strip()[-2000:]
        raise ToolFailed(f"exit {r.code}: {tail.splitlines()[-1] if tail else 'no message'}", " ".join(cmd), tail)
    return r.seconds, r.peak_rss


def compare(a_dir: str, b_dir: str) -> float:
    """Largest |a - b| over every tensor, in units of b's magnitude (bf16 outputs)."""
    return compare_stats(a_dir, b_dir)[0]


def compare_stats(a_dir: str, b_dir: str) -> tuple:
    """(largest |a - b| / max(|b|, 1e-3), fraction of elements with |a - b| above one bf16 ulp of
    max(|a|, |b|)): the first explodes on near-zero elements, the second says how many differ."""
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
        raise ToolFailed(f"the outputs hold different tensors: {sorted(set(a) ^ set(b))[:5]}")
    worst, beyond, total = 0.0, 0, 0
    for name in a:
        x, y = a[name].float(), b[name].float()
        d = (x - y).abs()
        worst = max(worst, float((d / y.abs().clamp_min(1e-3)).max()))
        beyond += int((d > torch.maximum(x.abs(), y.abs()) * 2.0**-7).sum())  # bf16: 8 significant bits
        total += d.numel()
    return worst, beyond / max(total, 1)


#: method -> (base?, which models, per-model parameters, global parameters, deterministic?)
#: per-model values are lists over the fine-tunes (cycled); the same numbers go to both tools
METHODS = {
    "soup": None,  # the historical row: the uniform soup, AME path on ame-merge's side
    "linear": dict(base=False, per={"weight": [1.0, 0.5, 0.8]}, glob={"normalize": True}, exact=True),
    "task_arithmetic": dict(base=True, per={"weight": [0.6, 0.4, 0.5]}, glob={"lambda": 0.9}, exact=True),
    "ties": dict(base=True, per={"weight": [1.0, 0.7, 0.5], "density": [0.5, 0.7, 0.5]},
                 glob={"normalize": True, "lambda": 1.0}, exact=True),
    "breadcrumbs": dict(base=True, per={"weight": [1.0, 0.7, 0.5], "density": [0.7], "gamma": [0.05]},
                        glob={}, exact=True),
    "dare_ties": dict(base=True, per={"weight": [1.0, 0.7, 0.5], "density": [0.6]}, glob={}, exact=False),
    "della": dict(base=True, per={"weight": [1.0, 0.7, 0.5], "density": [0.5], "epsilon": [0.1]},
                  glob={}, exact=False),
    "slerp": dict(base=True, two=True, per={}, glob={"t": 0.3}, exact=True),
    "model_stock": dict(base=True, per={}, glob={}, exact=True),
}


#: the corpus (--corpus): mergekit's own form, {M0}..{M3} the family's models (M0 the base), {L}
#: its layer count, {A}/{B} the two slices' ranges; (config text, outputs compared?)
CORPUS = {
    "linear": ("""merge_method: linear
models:
  - model: {M0}
    parameters: {{weight: 1.0}}
  - model: {M1}
    parameters: {{weight: 0.5}}
  - model: {M2}
    parameters: {{weight: 0.8}}
  - model: {M3}
    parameters: {{weight: 0.3}}
parameters: {{normalize: true}}
dtype: bfloat16
""", True),
    "ties": ("""merge_method: ties
base_model: {M0}
models:
  - model: {M1}
    parameters: {{weight: 1.0, density: [1, 0.7, 0.1]}}
  - model: {M2}
    parameters: {{weight: 0.5, density: 0.5}}
  - model: {M3}
    parameters: {{weight: 0.7, density: 0.33}}
parameters: {{normalize: true, int8_mask: true}}
dtype: bfloat16
""", True),
    "gradient-slerp": ("""slices:
  - sources:
      - model: {M0}
        layer_range: [0, {L}]
      - model: {M1}
        layer_range: [0, {L}]
merge_method: slerp
base_model: {M0}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
""", True),
    "orcamini-platy-passthrough": ("""slices:
  - sources:
      - model: {M1}
        layer_range: {A}
  - sources:
      - model: {M2}
        layer_range: {B}
merge_method: passthrough
dtype: bfloat16
""", True),
    "dare_ties": ("""merge_method: dare_ties
base_model: {M0}
models:
  - model: {M1}
    parameters: {{weight: 0.5, density: 0.53}}
  - model: {M2}
    parameters: {{weight: 0.3, density: 0.53}}
  - model: {M3}
    parameters: {{weight: 0.2, density: 0.53}}
parameters: {{int8_mask: true}}
random_seed: 0
dtype: bfloat16
""", False),
    "model_stock": ("""merge_method: model_stock
base_model: {M0}
models:
  - model: {M1}
  - model: {M2}
  - model: {M3}
dtype: bfloat16
""", True),
    "task_arithmetic": ("""merge_method: task_arithmetic
base_model: {M0}
models:
  - model: {M1}
    parameters: {{weight: 0.8}}
  - model: {M2}
    parameters: {{weight: 0.5}}
  - model: {M3}
    parameters: {{weight: 0.3}}
parameters: {{lambda: 0.9}}
dtype: bfloat16
""", True),
    "della": ("""merge_method: della
base_model: {M0}
models:
  - model: {M1}
    parameters: {{weight: 1.0, density: 0.5, epsilon: 0.1}}
  - model: {M2}
    parameters: {{weight: 0.5, density: 0.5, epsilon: 0.1}}
parameters: {{lambda: 1.0}}
random_seed: 0
dtype: bfloat16
""", False),
}


def corpus_config(name: str, models: list, layers: int, fam: str) -> str:
    """Write corpus config NAME pointed at the family (model paths, slice ranges for ``layers``); its path."""
    a, b = [0, -(-layers * 6 // 10)], [layers // 2, layers]  # orcamini-platy: [0, 24] + [20, 40] of 40 layers
    text = CORPUS[name][0].format(**{f"M{i}": m for i, m in enumerate(models)}, L=layers, A=a, B=b)
    path = os.path.join(fam, f"corpus_{name}.yml")
    with open(path, "w") as f:
        f.write(text)
    return path


def _yaml(v) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else repr(v) if isinstance(v, float) else str(v)


def method_configs(method: str, models: list, fam: str, dtype: str = "bfloat16") -> tuple:
    """(mergekit config path, ame-merge config path) of one method on these models."""
    spec = METHODS[method]
    mk_cfg, ak_cfg = os.path.join(fam, f"mergekit_{method}.yml"), os.path.join(fam, f"ame_{method}.yaml")
    if spec is None:
        with open(mk_cfg, "w") as f:
            f.write(f"merge_method: linear\ndtype: {dtype}\nmodels:\n")
            for m in models:
                f.write(f"  - model: {m}\n    parameters:\n      weight: 1.0\n")
        with open(ak_cfg, "w") as f:
            f.write("models:\n" + "".join(f"  - path: {m}\n" for m in models))
            f.write("optimizer: sgd\nlr: 1\nlr_schedule: constant\nadaptive_pivot: false\n")
        return mk_cfg, ak_cfg
    base = models[0] if spec["base"] else None
    if spec.get("two"):
        mk_models, ak_models = [models[0], models[1]], [models[0], models[1]]  # slerp: [base_model, other]
    elif base:
        mk_models = ak_models = models[1:]
    else:
        mk_models = ak_models = models
    per = [{k: v[i % len(v)] for k, v in spec["per"].items()} for i in range(len(mk_models))]
    with open(mk_cfg, "w") as f:
        f.write(f"merge_method: {method}\ndtype: {dtype}\n")
        if base:
            f.write(f"base_model: {base}\n")
        f.write("models:\n")
        for m, p in zip(mk_models, per):
            f.write(f"  - model: {m}\n")
            if p:
                f.write("    parameters:\n" + "".join(f"      {k}: {_yaml(v)}\n" for k, v in p.items()))
        if spec["glob"]:
            f.write("parameters:\n" + "".join(f"  {k}: {_yaml(v)}\n" for k, v in spec["glob"].items()))
    with open(ak_cfg, "w") as f:
        f.write(f"method: {method}\n")
        if base and not spec.get("two"):
            f.write(f"base: {base}\n")
        f.write("models:\n")
        for m, p in zip(ak_models, per):
            f.write(f"  - path: {m}\n" + "".join(f"    {k}: {_yaml(v)}\n" for k, v in p.items()))
        f.write("".join(f"{k}: {_yaml(v)}\n" for k, v in spec["glob"].items()))
        if method in ("dare_ties", "della"):
            f.write("seed: 0\n")
    return mk_cfg, ak_cfg


def main(argv=None) -> int:
    global SETTLE_SECONDS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mergekit", default=shutil.which("mergekit-yaml"), help="path to mergekit-yaml")
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--dir", default="/tmp/ame_bench_mergekit")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
                    help=f"rows to run (default all: {' '.join(METHODS)})")
    ap.add_argument("--corpus", nargs="*", metavar="CONFIG", choices=list(CORPUS),
                    help=f"run the corpus of mergekit-form configs through both tools unchanged (default all: "
                    f"{' '.join(CORPUS)}) instead of --methods")
    ap.add_argument("--only", choices=("mergekit", "ame"), help="run one tool only (no comparison)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the warm-up run of each tool")
    ap.add_argument("--clean", action="store_true", help="delete the generated data at the end")
    ap.add_argument("--keep-outputs", action="store_true", help="keep each row's merged folders (default: deleted)")
    ap.add_argument("--settle", type=float, default=SETTLE_SECONDS,
                    help="seconds of pause (after a sync) before every measured run (default %(default)s)")
    args = ap.parse_args(argv)
    SETTLE_SECONDS = args.settle
    if args.only != "ame" and (not args.mergekit or not os.path.exists(args.mergekit)):
        print("bench_mergekit: no mergekit-yaml (pass --mergekit or put it on PATH): skipped")
        return 0
    if args.corpus is not None and args.n < 4:
        raise SystemExit("bench_mergekit: --corpus uses 4 models (a base and 3 fine-tunes): --n 4")
    if args.n < 3 and "model_stock" in args.methods:
        raise SystemExit("bench_mergekit: model_stock needs a base and >= 2 fine-tunes: --n >= 3 (4 by default)")

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

    def tool_runs(method):
        if args.corpus is not None:  # the same mergekit config through both, unchanged
            mk_cfg = ak_cfg = corpus_config(method, models, dims["layers"], fam)
            mk_flags = []
        else:
            mk_cfg, ak_cfg = method_configs(method, models, fam)
            mk_flags = ["--allow-crimes", "--random-seed", "0"]
        mk_out, ak_out = os.path.join(fam, f"out_mergekit_{method}"), os.path.join(fam, f"out_ame_{method}")

        def run_mergekit():
            shutil.rmtree(mk_out, ignore_errors=True)  # mergekit has no --force
            return timed([args.mergekit, mk_cfg, mk_out, *mk_flags], fam)

        label = "soup" if method == "soup" else method
        runs = {
            f"mergekit {'linear' if method == 'soup' else method}": (run_mergekit, mk_out),
            f"ame-merge {label}": (lambda: timed([sys.executable, "-m", "ame_kernels", ak_cfg, ak_out, "--force",
                                                   "--quiet"], ROOT), ak_out),
        }
        if args.only == "mergekit":
            runs = dict(list(runs.items())[:1])
        elif args.only == "ame":
            runs = dict(list(runs.items())[1:])
        return runs

    mach = machine()
    print(f"# machine: {mach}")
    print(f"# {args.n} x {params / 1e9:.3f}B params bf16, sharded; warm page cache; median of {args.repeat} rounds"
          f"{'' if not args.no_warmup else ' (no warm-up)'}")
    print(f"{'tool':<36} {'seconds':>8} {'[min-max]':>14} {'peak RSS':>10}  notes")
    rows = []  # the closing table: (row, mergekit (s, RSS), ame-merge (s, RSS), outputs)
    for method in (args.methods if args.corpus is None else (args.corpus or list(CORPUS))):
        runs = tool_runs(method)
        samples, failed = {k: [] for k in runs}, {}
        rounds = ([None] if not args.no_warmup else []) + list(range(args.repeat))
        for r in rounds:
            for k, (run, _) in runs.items():
                if k in failed:
                    continue
                try:
                    v = run()
                except ToolFailed as e:
                    failed[k] = e.args[0]
                    print(f"bench_mergekit: {k}: {' '.join(e.args[1:2])} failed:\n{e.args[-1]}", file=sys.stderr)
                    continue
                if r is not None:
                    samples[k].append(v)
        med, peak = {}, {}
        for k, vals in samples.items():
            if k in failed or not vals:
                print(f"{k:<36} {'FAILED':>8} {'':>14} {'':>10}  {failed.get(k, 'no sample')[:160]!r}")
                continue
            secs = [v[0] for v in vals]
            rss = max(v[1] for v in vals)
            med[k], peak[k] = statistics.median(secs), rss
            print(f"{k:<36} {med[k]:8.2f} {f'[{min(secs):.2f}-{max(secs):.2f}]':>14} {rss / 2**20:8.0f} MiB")
        note = ""
        if len(med) == 2:
            (mk_k, (_, mk_out)), (ak_k, (_, ak_out)) = list(runs.items())
            note = f"ame-merge {med[mk_k] / med[ak_k]:.1f}x faster"
            exact = CORPUS[method][1] if args.corpus is not None else method == "soup" or METHODS[method]["exact"]
            outputs = "random masks: not compared"
            if exact:
                try:
                    d, frac = compare_stats(ak_out, mk_out)
                    outputs = ("bitwise equal" if d == 0 else
                               f"max rel. diff {d:.2e}; {100 * frac:.4f}% of elements beyond 1 bf16 ulp")
                    note += f"; outputs agree to {d:.2e} relative, {100 * frac:.4f}% of elements beyond 1 bf16 ulp"
                except ToolFailed as e:
                    outputs = "not comparable"
                    note += f"; outputs not comparable: {e}"
            else:
                note += "; random masks differ by design: not compared"
            print(f"  {method}: {note}")
            rows.append((method, (med[mk_k], peak[mk_k]), (med[ak_k], peak[ak_k]), outputs))
        if not args.keep_outputs:  # two model-sized folders per row: a 1.1B corpus would fill a disk
            for _, out in runs.values():
                shutil.rmtree(out, ignore_errors=True)
    if rows:
        print("\n| config | mergekit s | mergekit RSS | ame-merge s | ame-merge RSS | speed-up | RSS ratio | outputs |")
        print("|---|---|---|---|---|---|---|---|")
        for name, (ms, mr), (a_s, ar), outputs in rows:
            print(f"| {name} | {ms:.2f} | {mr / 2**20:.0f} MiB | {a_s:.2f} | {ar / 2**20:.0f} MiB | {ms / a_s:.1f}x | "
                  f"1/{mr / ar:.1f} | {outputs} |")
    if args.clean:
        shutil.rmtree(fam, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
