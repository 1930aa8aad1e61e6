"""Regenerate the stored mergekit references (needs a mergekit install; never runs in CI).

    /work/mkvenv/bin/python benchmarks/mergekit_refs/make_refs.py [--mergekit PATH/mergekit-yaml]

mergekit (LGPL) is a comparison tool only: it runs as a separate program in an
environment of its own (``python -m venv mk && mk/bin/pip install torch mergekit``);
nothing here imports it. This script

1. writes the tiny Llama-shaped checkpoints of ``models.py`` (float32 safetensors plus
   a full Llama config.json) to a scratch folder;
2. runs ``mergekit-yaml`` (CPU, ``dtype: float32``, ``--random-seed 0``) on every
   config of CONFIGS;
3. stores, under this folder, ``out/<name>.safetensors`` (the float32 merge) for the
   deterministic methods, and for the random ones (DARE, DELLA: masks from
   torch.bernoulli) ``masks/<name>.safetensors``: per tensor the kept-entry mask
   (np.packbits of ``out != base``, C order) and the factor each kept task-vector entry
   was scaled by, so tests compare statistics, not values;
4. checks, in float64 numpy, that the semantics stated in MANIFEST.json["semantics"]
   reproduce every stored output (these checks are the evidence for them), and
5. writes MANIFEST.json: mergekit version, date, each config's YAML text, structured
   parameters, output file, the model digests and the semantics.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import models  # noqa: E402

W3 = [1.0, 0.7, 0.5]
FTS = ["ft0", "ft1", "ft2"]


def _m(names, **per):
    """Model entries: per-model keys given as a scalar (all) or a list (one each)."""
    out = []
    for i, n in enumerate(names):
        e = {"model": n}
        for k, v in per.items():
            e[k] = v[i] if isinstance(v, list) else v
        out.append(e)
    return out


# kind "exact": compare values; kind "random": compare mask statistics and the rescale.
CONFIGS = [
    dict(name="linear_normalize", method="linear", base=None, kind="exact",
         models=_m(FTS, weight=[1.0, 2.0, 0.5]), parameters={"normalize": True}),
    dict(name="linear_raw", method="linear", base=None, kind="exact",
         models=_m(FTS, weight=[0.5, 0.3, 0.4]), parameters={"normalize": False}),
    dict(name="task_arithmetic", method="task_arithmetic", base="base", kind="exact",
         models=_m(FTS, weight=[0.8, 0.5, 0.3]), parameters={"lambda": 0.9}),
    dict(name="ties_mixed_density", method="ties", base="base", kind="exact",
         models=_m(FTS, weight=W3, density=[0.5, 0.7, 0.5]), parameters={"normalize": True, "lambda": 0.8}),
    dict(name="ties_raw", method="ties", base="base", kind="exact",
         models=_m(FTS, weight=0.6, density=0.7), parameters={"normalize": False}),
    dict(name="breadcrumbs", method="breadcrumbs", base="base", kind="exact",
         models=_m(FTS, weight=W3, density=0.7, gamma=0.05), parameters={"lambda": 1.1}),
    dict(name="breadcrumbs_ties", method="breadcrumbs_ties", base="base", kind="exact",
         models=_m(FTS, weight=W3, density=[0.6, 0.8, 0.7], gamma=0.05), parameters={"normalize": True}),
    dict(name="slerp_far", method="slerp", base="base", kind="exact",
         models=_m(["base", "far"]), parameters={"t": 0.3}),
    dict(name="slerp_gradient", method="slerp", base="base", kind="exact",
         models=_m(["base", "far"]), parameters={"t": [0.1, 0.5, 0.9]}),
    dict(name="slerp_near", method="slerp", base="base", kind="exact",
         models=_m(["base", "ft0"]), parameters={"t": 0.4}),
    dict(name="model_stock", method="model_stock", base="base", kind="exact",
         models=_m(FTS), parameters={}),
    dict(name="model_stock_filter_wise", method="model_stock", base="base", kind="exact",
         models=_m(FTS), parameters={"filter_wise": True}),
    # random methods: one fine-tune of weight 1, so out - base is the sparsified task vector
    dict(name="dare_linear", method="dare_linear", base="base", kind="random",
         models=_m(["ft0"], weight=1.0, density=0.6), parameters={}),
    dict(name="dare_linear_norescale", method="dare_linear", base="base", kind="random",
         models=_m(["ft0"], weight=1.0, density=0.4), parameters={"rescale": False}),
    dict(name="dare_ties", method="dare_ties", base="base", kind="random",
         models=_m(["ft0"], weight=1.0, density=0.6), parameters={}),
    dict(name="della", method="della", base="base", kind="random",
         models=_m(["ft0"], weight=1.0, density=0.5, epsilon=0.1), parameters={}),
    dict(name="della_linear", method="della_linear", base="base", kind="random",
         models=_m(["ft0"], weight=1.0, density=0.5), parameters={}),  # epsilon: mergekit's default
]


def _yaml_scalar(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, list):
        return "[" + ", ".join(_yaml_scalar(x) for x in v) + "]"
    return repr(v) if isinstance(v, float) else str(v)


def mergekit_yaml(cfg: dict, paths: dict) -> str:
    lines = [f"merge_method: {cfg['method']}"]
    if cfg["base"]:
        lines.append(f"base_model: {paths[cfg['base']]}")
    lines.append("models:")
    for e in cfg["models"]:
        lines.append(f"  - model: {paths[e['model']]}")
        p = {k: v for k, v in e.items() if k != "model"}
        if p:
            lines.append("    parameters:")
            lines += [f"      {k}: {_yaml_scalar(v)}" for k, v in p.items()]
    if cfg["parameters"]:
        lines.append("parameters:")
        lines += [f"  {k}: {_yaml_scalar(v)}" for k, v in cfg["parameters"].items()]
    lines.append("dtype: float32")
    return "\n".join(lines) + "\n"


def write_models(root: str, f32: dict) -> dict:
    from safetensors.numpy import save_file

    paths = {}
    for key, sd in f32.items():
        d = os.path.join(root, key)
        os.makedirs(d, exist_ok=True)
        save_file({n: sd[n] for n, _ in models.shapes()}, os.path.join(d, "model.safetensors"),
                  metadata={"format": "pt"})
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(models.llama_config(), f, indent=1)
        paths[key] = d
    return paths


def load_dir(d: str) -> dict:
    from safetensors.numpy import load_file

    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(d, f)))
    return out


def slerp_t(name: str, t, layers: int) -> float:
    """mergekit's value of a (gradient) t for one tensor: layer i of L sits at i/(L-1);
    embeddings, the final norm and lm_head at 0; a list interpolates piecewise linearly."""
    if not isinstance(t, list):
        return float(t)
    li = models.layer_index(name)
    x = 0.0 if li is None else (li / (layers - 1) if layers > 1 else 1.0)
    s = x * (len(t) - 1)
    i0 = int(s)
    i1 = min(len(t) - 1, i0 + 1)
    return (1 - (s - i0)) * t[i0] + (s - i0) * t[i1]


# ---- float64 numpy statements of the semantics, checked against mergekit's outputs ----

def _topk_mask(d, density):
    n = d.size
    if density >= 1:
        return np.ones(d.shape, bool)
    k = max(1, int(density * n))
    order = np.argsort(-np.abs(d).reshape(-1), kind="stable")
    m = np.zeros(n, bool)
    m[order[:k]] = True
    return m.reshape(d.shape)


def _window_mask(d, density, gamma):
    n = d.size
    if density >= 1:
        return np.ones(d.shape, bool)
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = np.argsort(np.abs(d).reshape(-1), kind="stable")
    m = np.zeros(n, bool)
    m[order[n_bot:n_bot + target]] = True
    return m.reshape(d.shape)


def oracle(cfg: dict, f32: dict, name: str) -> np.ndarray:
    P = cfg["parameters"]
    x = {k: f32[k][name].astype(np.float64) for k in f32}
    meth = cfg["method"]
    if meth == "linear":
        w = np.array([e["weight"] for e in cfg["models"]])
        acc = sum(wi * x[e["model"]] for wi, e in zip(w, cfg["models"]))
        return acc / w.sum() if P.get("normalize", True) else acc
    if meth == "slerp":
        a, b = x[cfg["models"][0]["model"]], x[cfg["models"][1]["model"]]
        t = slerp_t(name, P["t"], models.SPEC["layers"])
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        na, nb = (na if na > 1e-8 else 1.0), (nb if nb > 1e-8 else 1.0)
        dot = float(np.clip(np.sum((a / na) * (b / nb)), -1, 1))
        if abs(dot) > 0.9995:
            return (1 - t) * a + t * b
        th = np.arccos(dot)
        return (np.sin((1 - t) * th) * a + np.sin(t * th) * b) / np.sin(th)
    if meth == "model_stock":
        w0 = x[cfg["base"]]
        ws = [x[e["model"]] for e in cfg["models"]]
        fw = P.get("filter_wise", False)
        shape = w0.shape
        if fw:
            rows = (lambda v: v.reshape(1, -1)) if w0.ndim == 1 else (lambda v: v)
        else:
            rows = lambda v: v.reshape(1, -1)  # noqa: E731
        w0r = rows(w0)
        offs = [rows(v) - w0r for v in ws]
        cos = []
        for i in range(len(offs)):
            for j in range(i + 1, len(offs)):
                nrm = np.linalg.norm(offs[i], axis=-1) * np.linalg.norm(offs[j], axis=-1)
                cos.append(np.clip((offs[i] * offs[j]).sum(-1) / np.maximum(nrm, 1e-6), -1, 1))
        c = np.mean(cos, axis=0)[:, None]
        n = len(ws)
        den = 1 + (n - 1) * c
        t = np.where(np.abs(den) < 1e-6, 0.0, n * c / np.where(np.abs(den) < 1e-6, 1.0, den))
        avg = sum(rows(v) for v in ws) / n
        return (t * avg + (1 - t) * w0r).reshape(shape)
    # generalized task arithmetic
    base = x[cfg["base"]]
    consensus = meth in ("ties", "breadcrumbs_ties", "dare_ties", "della")
    normalize = P.get("normalize", meth in ("ties", "della"))
    deltas, ws = [], []
    for e in cfg["models"]:
        d = x[e["model"]] - base
        if meth in ("ties",):
            d = d * _topk_mask(d, e.get("density", 1.0))
        elif meth in ("breadcrumbs", "breadcrumbs_ties"):
            d = d * _window_mask(d, e.get("density", 1.0), e.get("gamma", 0.01))
        deltas.append(d * e["weight"])
        ws.append(e["weight"])
    D = np.stack(deltas)
    W = np.array(ws).reshape((-1,) + (1,) * base.ndim)
    if consensus:
        maj = np.where(D.sum(0) >= 0, 1.0, -1.0)
        mask = np.sign(D) == maj
        mixed = (D * mask).sum(0)
        div = (W * mask).sum(0)
        div[div == 0] = 1
    else:
        mixed = D.sum(0)
        div = np.broadcast_to(W.sum(0), base.shape).copy()
        div[np.abs(div) < 1e-8] = 1
    if normalize:
        mixed = mixed / div
    return base + P.get("lambda", 1.0) * mixed


def random_record(cfg, f32, out):
    """Per tensor: packed kept mask, the factor kept entries were scaled by, checks."""
    base, ft = f32["base"], f32[cfg["models"][0]["model"]]
    tensors, stats = {}, {}
    rescale = cfg["parameters"].get("rescale", True)
    for name, _ in models.shapes():
        d = ft[name].astype(np.float64) - base[name]
        got = out[name].astype(np.float64) - base[name]
        kept = got != 0
        ratio = got[kept] / d[kept]
        scale = float(np.median(ratio))
        l1 = float(np.abs(d).sum() / np.abs(d[kept]).sum())
        expect = l1 if rescale else 1.0
        # out is rounded to float32 near |base|: the ratio carries ulp(base)/|delta| of noise
        tol = float(np.max(np.spacing(np.abs(out[name][kept]).astype(np.float32)) / np.abs(d[kept])))
        assert abs(scale - expect) <= 2 * tol + 1e-12, (cfg["name"], name, scale, expect, tol)
        assert np.all(np.abs(ratio - scale) <= 2 * tol + 1e-12), (cfg["name"], name)
        tensors[name + ".mask"] = np.packbits(kept.reshape(-1))
        tensors[name + ".scale"] = np.array([scale], np.float64)
        stats[name] = {"numel": int(d.size), "kept": int(kept.sum()), "scale": scale, "l1_ratio": l1,
                       "inv_density": 1.0 / cfg["models"][0]["density"]}
    return tensors, stats


SEMANTICS = {
    "rescale": ("dare_linear, dare_ties, della, della_linear (rescale defaults true) and any GTA method given "
                "rescale: true: after masking, the task vector of each model is multiplied by "
                "sum|delta| / sum|kept delta| over the WHOLE tensor (L1-norm ratio, sparsify.rescaled_masked_tensor "
                "with RescaleNorm.l1), NOT divided by density (nor by DELLA's per-entry keep probability); "
                "skipped (no rescale) when either L1 sum < 1e-7. rescale: false keeps kept entries unscaled."),
    "lambda": ("a global (SHARED) parameter of every GTA method (task_arithmetic, ties, dare_*, breadcrumbs*, "
               "della*), default 1.0: out = base + lambda * mixed_delta, applied AFTER normalize."),
    "weight": "per-model, required (no default) for linear and GTA methods; applied to each task vector before the sign election",
    "normalize_defaults": {"linear": True, "task_arithmetic": False, "ties": True, "dare_ties": False,
                           "dare_linear": False, "breadcrumbs": False, "breadcrumbs_ties": False,
                           "della": True, "della_linear": False},
    "rescale_defaults": {"task_arithmetic": False, "ties": False, "breadcrumbs": False, "breadcrumbs_ties": False,
                         "dare_ties": True, "dare_linear": True, "della": True, "della_linear": True},
    "normalize": ("no consensus (task_arithmetic, dare_linear, breadcrumbs, della_linear): mixed = sum_i w_i delta_i, "
                  "divided by sum_i w_i (replaced by 1 when |sum| < 1e-8). Consensus (ties, dare_ties, "
                  "breadcrumbs_ties, della): divided per entry by sum of w_i over the models whose weighted delta "
                  "sign equals the elected sign (replaced by 1 where exactly 0). linear: sum w_i x_i / sum w_i."),
    "ties_election": ("sign of sum_i (w_i * sparsified delta_i) per entry, >= 0 elects +1 (a zero sum elects +); "
                      "an entry contributes iff sign(w_i delta_i) == elected sign (zero entries never contribute). "
                      "consensus_method sum. int8_mask only changes the mask dtype."),
    "ties_magnitude": "k = max(1, int(density * numel)) largest |delta| kept per tensor (whole tensor, not per row); density >= 1 keeps all, <= 0 none",
    "breadcrumbs": ("target = int(density*numel), n_top = int(gamma*numel), n_bot = max(0, numel - target - n_top); "
                    "sort |delta| ascending, keep ranks [n_bot, n_bot + target). gamma default 0.01 (per model). "
                    "In mergekit 0.1.5 n_top == 0 is FINE (the old indices[n_bot:-n_top] bug, which zeroed a "
                    "tensor when int(gamma*numel) == 0, is fixed by slicing [n_bot:n_bot+target])."),
    "dare": "mask = torch.bernoulli(full(density)) per entry, independently per model; density >= 1 returns the delta unchanged",
    "della": ("epsilon per model, default 0.15; density +/- epsilon must lie in (0, 1) (else ValueError). "
              "A 1-D tensor is treated as one row; ranks are taken PER ROW (dim 1) of a 2-D tensor: rank r = 1 "
              "for the smallest |delta| .. ncols for the largest, rank_norm = (r - min r)/(max r - min r) = "
              "(r-1)/(ncols-1); keep probability p = density - epsilon + 2*epsilon*rank_norm (larger |delta| "
              "kept more often); mask = bernoulli(p); then the L1 rescale over the whole tensor (see rescale)."),
    "slerp": ("ingredients [base_model, other]: t = 0 gives base_model, t = 1 the other. Whole tensor flattened "
              "(one vector per tensor); norms <= eps = 1e-8 are replaced by 1; dot of the normalised vectors "
              "clamped to [-1, 1]; |dot| > 0.9995 (DOT_THRESHOLD, colinear or antipodal) -> lerp (1-t)a + t b; "
              "else sin((1-t)th)/sin(th) a + sin(t th)/sin(th) b on the UNnormalised a, b; computed in float32 "
              "(float64 for float64 inputs). t gradient list: layer i of L at x = i/(L-1), embed_tokens, the final "
              "norm and lm_head at x = 0; value = piecewise-linear interpolation of the list at x*(len-1)."),
    "model_stock": ("ingredients: base (w0) + N >= 2 fine-tunes. filter_wise false (default): each tensor flattened; "
                    "true: per row of a 2-D tensor (dim -1), a 1-D tensor as one row. cos = mean over the N(N-1)/2 "
                    "pairs of clamp(<o_i,o_j> / max(|o_i||o_j|, 1e-6), -1, 1), o_i = w_i - w0; t = N cos / (1 + "
                    "(N-1) cos), t = 0 where |1 + (N-1) cos| < 1e-6; out = t * mean(w_i) + (1 - t) * w0. t is not "
                    "clamped to [0, 1]."),
    "linear": "sum_i w_i x_i, divided by sum_i w_i when normalize (default true); no base",
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mergekit", default=os.path.join(os.path.dirname(sys.executable), "mergekit-yaml"))
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--only", nargs="*", help="config names to (re)run")
    args = ap.parse_args(argv)
    from importlib.metadata import version

    mk_version = version("mergekit")
    work = args.work or tempfile.mkdtemp(prefix="mkrefs-")
    f32 = models.models_f32()
    paths = write_models(os.path.join(work, "models"), f32)
    os.makedirs(os.path.join(HERE, "out"), exist_ok=True)
    os.makedirs(os.path.join(HERE, "masks"), exist_ok=True)
    man_path = os.path.join(HERE, "MANIFEST.json")
    old = json.load(open(man_path)) if os.path.exists(man_path) else {}
    entries = {c["name"]: c for c in old.get("configs", [])}
    from safetensors.numpy import save_file

    for cfg in CONFIGS:
        if args.only and cfg["name"] not in args.only:
            continue
        text = mergekit_yaml(cfg, paths)
        cfg_path = os.path.join(work, cfg["name"] + ".yml")
        with open(cfg_path, "w") as f:
            f.write(text)
        out_dir = os.path.join(work, "out_" + cfg["name"])
        shutil.rmtree(out_dir, ignore_errors=True)
        cmd = [args.mergekit, cfg_path, out_dir, "--allow-crimes", "--no-lazy-unpickle", "--device", "cpu",
               "--random-seed", "0", "--no-copy-tokenizer", "--no-write-model-card", "--quiet"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            print(r.stdout[-3000:], r.stderr[-3000:])
            raise SystemExit(f"make_refs: {cfg['name']}: mergekit failed ({r.returncode})")
        out = load_dir(out_dir)
        assert set(out) == {n for n, _ in models.shapes()}, sorted(set(out) ^ {n for n, _ in models.shapes()})
        entry = {k: v for k, v in cfg.items()}
        entry["yaml"] = text.replace(work + "/models/", "MODELS/")
        if isinstance(cfg["parameters"].get("t"), list):
            entry["t_per_tensor"] = {n: slerp_t(n, cfg["parameters"]["t"], models.SPEC["layers"])
                                     for n, _ in models.shapes()}
        if cfg["kind"] == "exact":
            worst = 0.0
            for name, _ in models.shapes():
                assert out[name].dtype == np.float32
                ref = oracle(cfg, f32, name)
                worst = max(worst, float(np.abs(out[name] - ref).max()))
            entry["oracle_max_abs_diff"] = worst
            assert worst < 1e-5, (cfg["name"], worst)
            fn = f"out/{cfg['name']}.safetensors"
            save_file({n: out[n] for n, _ in models.shapes()}, os.path.join(HERE, fn))
        else:
            tensors, stats = random_record(cfg, f32, out)
            fn = f"masks/{cfg['name']}.safetensors"
            save_file(tensors, os.path.join(HERE, fn))
            entry["stats"] = stats
        entry["file"] = fn
        entries[cfg["name"]] = entry
        print(f"{cfg['name']:<26} ok {entry.get('oracle_max_abs_diff', '')}")

    manifest = {
        "mergekit_version": mk_version,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "mergekit-yaml CONFIG OUT --allow-crimes --no-lazy-unpickle --device cpu --random-seed 0 "
                   "--no-copy-tokenizer --no-write-model-card --quiet",
        "models": {"spec": models.SPEC, "digests": {k: models.digest(v) for k, v in f32.items()},
                   "note": "regenerate with benchmarks/mergekit_refs/models.py; MODELS/<name> in the YAML texts"},
        "semantics": SEMANTICS,
        "configs": [entries[c["name"]] for c in CONFIGS if c["name"] in entries],
    }
    with open(man_path, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
