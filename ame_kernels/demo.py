"""``make demo`` / ``python -m ame_kernels.demo``: a small real merge, end to end, in well under a minute.

The setting is the paper's Table 1 (Section 4.1) in miniature, on scikit-learn's bundled
``load_digits`` (8x8 images, 10 classes; no download):

1. one shared initialization of a small MLP (64 -> hidden -> 10);
2. N ingredients, ingredient j trained (Adam) on the training split minus the classes
   j, j+1, ..., j+m-1 (mod 10): each ingredient is out-of-domain on m/10 of the test set;
3. every ingredient saved as a Hugging Face style checkpoint folder
   (``model.safetensors`` + ``config.json``) under ``demo_out/``;
4. merged with the ``ame-merge`` CLI (``python -m ame_kernels CONFIG.yaml OUT``), one YAML
   file per merge: the uniform soup (GD, lr 1 constant, fixed pivot, zeta 1, one epoch,
   batch 1: the paper's identity), and GD-, Adagrad-, Adam- and AdamW-AME (pivot: the soup,
   adaptive pivoting, a few shuffled epochs); plus the greedy soups (best-first, the
   model-soups recipe, via ``ame_kernels.soups``; and worst-first, the paper's "Asc" variant),
   which need a validation set and so run in Python;
5. every ingredient and merge evaluated on the validation and test splits; one table.

The AME learning rates of the demo are fixed (chosen on validation accuracy in the sweep of
``make repro``, see DEFAULT_AME and docs/results.md); ``benchmarks/repro/digits.py`` runs the full experiment (several
exclusion levels and seeds, learning rates chosen per run on the validation split).

The helpers here (data, model, training, checkpoint folders, CLI merge, evaluation) are
what ``benchmarks/repro/digits.py`` and the tests use too.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

StateDict = Dict[str, torch.Tensor]

#: the AME methods: row name -> merge config (YAML fields). The lrs are the grid points with the best
#: mean VALIDATION accuracy over all 15 runs (3 exclusion levels x 5 seeds) of the sweep in
#: benchmarks/repro/digits.py (results/digits_sweep.csv); see docs/results.md.
AME_COMMON = dict(pivot="soup", adaptive_pivot=True, lr_schedule="constant", epochs=5, batch_size=2, shuffle=True, seed=0)
SOUP_CONFIG = dict(optimizer="sgd", lr=1.0, lr_schedule="constant", pivot=0, adaptive_pivot=False,
                   amplification=1.0, epochs=1, batch_size=1, shuffle=False)
DEFAULT_AME = {
    "GD-AME": dict(optimizer="sgd", lr=0.25),
    "Adagrad-AME": dict(optimizer="adagrad", lr=3e-4),
    "Adam-AME": dict(optimizer="adam", lr=1e-2),
    "AdamW-AME": dict(optimizer="adamw", lr=1e-2, weight_decay=0.1),
}


@dataclass
class Setting:
    n_ingredients: int = 10
    excluded: int = 5  # classes each ingredient never sees (m); OOD fraction = m / 10
    hidden: int = 64
    train_epochs: int = 20
    train_lr: float = 1e-3
    train_batch: int = 32
    seed: int = 0
    val_fraction: float = 0.2  # of the non-test part
    test_fraction: float = 0.3


# --------------------------------------------------------------------------- data and model


def load_splits(seed: int, setting: Setting = Setting()) -> Dict[str, torch.Tensor]:
    """Stratified train / val / test splits of load_digits (pixels scaled to [0, 1])."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    Xa, Xte, ya, yte = train_test_split(X, y, test_size=setting.test_fraction, random_state=seed, stratify=y)
    Xtr, Xva, ytr, yva = train_test_split(Xa, ya, test_size=setting.val_fraction, random_state=seed, stratify=ya)
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
    return dict(Xtr=t(Xtr), ytr=t(ytr).long(), Xva=t(Xva), yva=t(yva).long(), Xte=t(Xte), yte=t(yte).long())


def make_model(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def excluded_classes(j: int, m: int, n: int = 10) -> List[int]:
    """Ingredient j of n excludes classes s, s+1, ..., s+m-1 (mod 10) with s = floor(10 j / n).

    For n = 10 this is the paper's scheme (Appendix A.2: s = j); for n = 5, s = 2j, so every
    class is still excluded by the same number of ingredients when m n / 10 is whole.
    """
    s = (10 * j) // n
    return sorted({(s + i) % 10 for i in range(m)})


def shared_init(setting: Setting) -> StateDict:
    torch.manual_seed(10_000 + setting.seed)
    return {k: v.detach().clone() for k, v in make_model(setting.hidden).state_dict().items()}


def train_ingredients(data, setting: Setting, init: Optional[StateDict] = None) -> Tuple[List[StateDict], List[List[int]]]:
    """N state dicts fine-tuned from one shared init, ingredient j without classes excluded_classes(j, m)."""
    init = shared_init(setting) if init is None else init
    out, excl = [], []
    for j in range(setting.n_ingredients):
        ex = excluded_classes(j, setting.excluded, setting.n_ingredients)
        keep = ~torch.isin(data["ytr"], torch.tensor(ex, dtype=torch.long))
        X, y = data["Xtr"][keep], data["ytr"][keep]
        model = make_model(setting.hidden)
        model.load_state_dict(init)
        opt = torch.optim.Adam(model.parameters(), lr=setting.train_lr)
        g = torch.Generator().manual_seed(1000 * setting.seed + j)
        for _ in range(setting.train_epochs):
            perm = torch.randperm(len(y), generator=g)
            for b in range(0, len(y), setting.train_batch):
                idx = perm[b : b + setting.train_batch]
                loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        out.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        excl.append(ex)
    return out, excl


@torch.no_grad()
def accuracy(sd: StateDict, X: torch.Tensor, y: torch.Tensor, hidden: int) -> float:
    model = make_model(hidden)
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return float((model(X).argmax(1) == y).float().mean())


# --------------------------------------------------------------------------- checkpoints and the CLI


def save_checkpoint(sd: StateDict, folder: str, meta: Optional[dict] = None) -> str:
    """A Hugging Face style folder: model.safetensors + config.json."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"architectures": ["DigitsMLP"], "model_type": "digits-mlp", **(meta or {})}, f, indent=1)
    return folder


def load_checkpoint(folder: str) -> StateDict:
    """Read a model folder written by save_checkpoint or by ame-merge (single file or sharded)."""
    from safetensors.torch import load_file

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        sd: StateDict = {}
        for name in files:
            sd.update(load_file(os.path.join(folder, name)))
        return sd
    return load_file(os.path.join(folder, "model.safetensors"))


def write_yaml(path: str, model_dirs: Sequence[str], cfg: dict, scores: Optional[Sequence[float]] = None) -> None:
    import yaml

    doc = {"models": [{"path": os.path.abspath(p), **({"score": float(s)} if scores is not None else {})}
                      for p, s in zip(model_dirs, scores if scores is not None else [None] * len(model_dirs))]}
    doc.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()})
    with open(path, "w") as f:
        yaml.safe_dump(doc, f, sort_keys=False)


def merge_cli(model_dirs: Sequence[str], cfg: dict, out_dir: str, yaml_path: Optional[str] = None) -> Tuple[StateDict, dict]:
    """Merge checkpoint folders with ``python -m ame_kernels CONFIG.yaml OUT --force``; returns (weights, timings).

    timings: 'wall_s' (the whole command, interpreter start included) and 'merge_s' (the engine's
    own figure from its summary line, when printed).
    """
    yaml_path = yaml_path or out_dir.rstrip("/") + ".yaml"
    os.makedirs(os.path.dirname(os.path.abspath(yaml_path)), exist_ok=True)
    write_yaml(yaml_path, model_dirs, cfg)
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ame_kernels", yaml_path, out_dir, "--force"],
                          capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"ame-merge failed (exit {proc.returncode}) on {yaml_path}:\n{proc.stderr.strip()}")
    m = re.search(r" in ([0-9.]+) s ", proc.stdout)
    return load_checkpoint(out_dir), {"wall_s": wall, "merge_s": float(m.group(1)) if m else float("nan")}


def merge_api(state_dicts: Sequence[StateDict], cfg: dict) -> Tuple[StateDict, dict]:
    """The same merge in memory through ak.merge (used for sweeps and as a cross-check)."""
    from .api import merge

    t0 = time.perf_counter()
    out = merge(list(state_dicts), **cfg)
    return out, {"wall_s": time.perf_counter() - t0, "merge_s": time.perf_counter() - t0}


def merged_dir(out_root: str, name: str) -> str:
    """Where the demo writes the merge ``name``: OUT/merged/NAME ('uniform soup' -> uniform_soup,
    'greedy soup (asc)' -> greedy_soup_asc), with its YAML config beside it as NAME.yaml."""
    return os.path.join(out_root, "merged", re.sub(r"[^A-Za-z0-9-]+", "_", name).strip("_"))


def cli_available() -> bool:
    try:
        import importlib.util

        return importlib.util.find_spec("ame_kernels.cli") is not None
    except (ImportError, ValueError):
        return False


def greedy_soup_of(state_dicts: Sequence[StateDict], val_scores: Sequence[float], evaluate,
                   ascending: bool = False) -> Tuple[StateDict, int]:
    """The greedy soup: (size, soup) of a running uniform mean that keeps a candidate only if ``evaluate``
    strictly improves.

    Descending (the model-soups recipe, the paper's "Greedy Soup (Desc)"): start at the best
    ingredient, offer the others best first; ``ame_kernels.soups.greedy_soup`` when present.
    Ascending (the paper's "Greedy Soup (Asc)", Appendix A.4): start at the worst, offer the others
    worst first (a plain loop here).
    """
    greedy_soup = None
    if not ascending:
        try:
            from .soups import greedy_soup
        except ImportError:
            greedy_soup = None
    if greedy_soup is not None:
        soup, history = greedy_soup(list(state_dicts), evaluate, scores=list(val_scores))
        return soup, 1 + sum(1 for h in history if h.accepted)
    order = sorted(range(len(state_dicts)), key=lambda i: val_scores[i], reverse=not ascending)
    members = [order[0]]
    best = val_scores[order[0]]
    for i in order[1:]:
        cand = {k: torch.stack([state_dicts[j][k].float() for j in members + [i]]).mean(0) for k in state_dicts[0]}
        s = evaluate(cand)
        if s > best:
            members, best = members + [i], s
    soup = {k: torch.stack([state_dicts[j][k].float() for j in members]).mean(0) for k in state_dicts[0]}
    return soup, len(members)


# --------------------------------------------------------------------------- one run


@dataclass
class RunResult:
    setting: Setting
    rows: List[dict] = field(default_factory=list)  # one per ingredient and per merge
    ingredient_dirs: List[str] = field(default_factory=list)
    soup_identity_maxdiff: float = float("nan")  # |CLI soup - torch mean| (GD identity)
    cli_vs_api_maxdiff: Dict[str, float] = field(default_factory=dict)
    train_s: float = 0.0
    via: str = "api"  # how the soup / AME merges were run: 'cli' or 'api'

    def row(self, method: str) -> dict:
        return next(r for r in self.rows if r["method"] == method)


def run_setting(setting: Setting, out_root: str, ame: Optional[Dict[str, dict]] = None, via: str = "auto",
                cross_check: bool = True, trained=None) -> RunResult:
    """Train, save, merge, evaluate one setting (one seed, one exclusion level).

    trained: (data, ingredients, excluded classes) already made for this setting, to skip training.
    """
    torch.manual_seed(setting.seed)
    ame = DEFAULT_AME if ame is None else ame
    use_cli = cli_available() if via == "auto" else via == "cli"
    res = RunResult(setting, via="cli" if use_cli else "api")
    t0 = time.perf_counter()
    if trained is None:
        data = load_splits(setting.seed, setting)
        ings, excl = train_ingredients(data, setting)
    else:
        data, ings, excl = trained
    res.train_s = time.perf_counter() - t0
    h = setting.hidden

    def evaluate(sd, split):
        return accuracy(sd, data[f"X{split}"], data[f"y{split}"], h)

    os.makedirs(out_root, exist_ok=True)
    for j, (sd, ex) in enumerate(zip(ings, excl)):
        d = save_checkpoint(sd, os.path.join(out_root, f"ingredient_{j:02d}"),
                            {"hidden_size": h, "num_labels": 10, "excluded_classes": ex, "seed": setting.seed})
        res.ingredient_dirs.append(d)
        res.rows.append(dict(method=f"ingredient {j}", kind="ingredient", val=evaluate(sd, "va"), test=evaluate(sd, "te"),
                             excluded=ex, wall_s=float("nan"), merge_s=float("nan"), output=d))
    val_scores = [r["val"] for r in res.rows]
    # ingredients are read back from their folders: the merges see exactly what was saved
    reloaded = [load_checkpoint(d) for d in res.ingredient_dirs]

    def do_merge(name: str, cfg: dict):
        if use_cli:
            folder = merged_dir(out_root, name)
            out, tm = merge_cli(res.ingredient_dirs, cfg, folder)
            tm["output"] = folder
            if cross_check:
                ref, _ = merge_api(reloaded, cfg)
                res.cli_vs_api_maxdiff[name] = max(float((out[k].float() - ref[k].float()).abs().max()) for k in ref)
        else:
            out, tm = merge_api(reloaded, cfg)
            tm["output"] = None  # in memory only
        return out, tm

    def save_greedy(name: str, sd: StateDict, size: int):
        if not use_cli:  # the in-memory path writes no merges
            return None
        return save_checkpoint(sd, merged_dir(out_root, name), {"hidden_size": h, "num_labels": 10, "greedy_soup_members": size})

    merges: List[Tuple[str, str, dict]] = [("uniform soup", "soup", SOUP_CONFIG)]
    merges += [(name, "ame", {**AME_COMMON, **cfg}) for name, cfg in ame.items()]
    for name, kind, cfg in merges:
        out, tm = do_merge(name, cfg)
        res.rows.append(dict(method=name, kind=kind, val=evaluate(out, "va"), test=evaluate(out, "te"), config=cfg, **tm))
        if kind == "soup":
            mean = {k: torch.stack([sd[k].float() for sd in reloaded]).mean(0) for k in reloaded[0]}
            res.soup_identity_maxdiff = max(float((out[k].float() - mean[k]).abs().max()) for k in mean)
    t1 = time.perf_counter()
    gsoup, size = greedy_soup_of(reloaded, val_scores, lambda sd: evaluate(sd, "va"))
    res.rows.append(dict(method="greedy soup", kind="greedy", val=evaluate(gsoup, "va"), test=evaluate(gsoup, "te"),
                         members=size, merge_s=time.perf_counter() - t1, wall_s=float("nan"),
                         output=save_greedy("greedy soup", gsoup, size)))
    t1 = time.perf_counter()
    gsoup, size = greedy_soup_of(reloaded, val_scores, lambda sd: evaluate(sd, "va"), ascending=True)
    res.rows.append(dict(method="greedy soup (asc)", kind="greedy", val=evaluate(gsoup, "va"), test=evaluate(gsoup, "te"),
                         members=size, merge_s=time.perf_counter() - t1, wall_s=float("nan"),
                         output=save_greedy("greedy soup (asc)", gsoup, size)))
    best = int(np.argmax(val_scores))
    b = res.rows[best]
    res.rows.append(dict(method="best ingredient (by val)", kind="best", val=b["val"], test=b["test"], index=best,
                         wall_s=float("nan"), merge_s=float("nan"), output=b["output"]))
    return res


ROW_ORDER = ["best ingredient (by val)", "uniform soup", "greedy soup", "greedy soup (asc)"]


def format_table(res: RunResult, root: Optional[str] = None) -> str:
    """One row per method: val and test accuracy, the merge's time, the CLI command's time, where it is.

    root: the demo's output folder; outputs under it are shown relative to it."""
    order = ROW_ORDER + [r["method"] for r in res.rows if r["kind"] == "ame"]
    where = f"output (in {root})" if root else "output"
    lines = [f"{'method':<26} {'val acc':>8} {'test acc':>9} {'merge s':>8} {'CLI s':>6}  {where}"]
    for name in order:
        r = res.row(name)
        ms = "-" if np.isnan(r["merge_s"]) else f"{r['merge_s']:.3f}"
        ws = "-" if np.isnan(r["wall_s"]) or res.via != "cli" or r["kind"] not in ("soup", "ame") else f"{r['wall_s']:.2f}"
        out = r.get("output")
        if out is None:
            out = "(in memory)"
        else:
            out = os.path.relpath(out, root) if root and not os.path.relpath(out, root).startswith("..") else out
            out += "/"
        extra = f"  ({r['members']} of {res.setting.n_ingredients} kept)" if "members" in r else ""
        lines.append(f"{name:<26} {100 * r['val']:>7.1f}% {100 * r['test']:>8.1f}% {ms:>8} {ws:>6}  {out}{extra}")
    return "\n".join(lines)


def _ame_settings() -> str:
    lrs = ", ".join(f"{k.replace('-AME', '')} {v['lr']:g}" + (f" (weight decay {v['weight_decay']:g})" if "weight_decay" in v else "")
                    for k, v in DEFAULT_AME.items())
    return (f"pivot soup (adaptive), {AME_COMMON['epochs']} epochs, batch {AME_COMMON['batch_size']}, shuffled, "
            f"constant lr {lrs}")


def format_legend(res: RunResult, width: int = 100) -> str:
    """What each row and column of format_table is, wrapped to ``width`` columns."""
    import textwrap

    n = res.setting.n_ingredients
    rows = [
        ("best ingredient", "the one ingredient with the best val acc: what you would have without merging"),
        ("uniform soup", f"the plain mean of the {n} ingredients (= GD-AME with lr 1, fixed pivot, 1 epoch, batch 1: "
                         f"max |merged - mean| = {res.soup_identity_maxdiff:.1e})"),
        ("greedy soup", "the model-soups recipe: start from the best ingredient by val acc, offer the others best "
                        "first, keep one only if the soup's val acc improves"),
        ("greedy soup (asc)", "the same from the worst ingredient, offered worst first (the paper's Greedy Soup (Asc)). "
                              "Both greedy soups choose on the val split, so their val acc flatters them: compare test acc"),
        ("*-AME", "AME: the optimizer (GD, Adagrad, Adam, AdamW) stepped on the pseudogradients pivot - x_i; "
                  + _ame_settings() + ". The lrs are fixed (the best mean val acc of the sweep in "
                  "benchmarks/repro/digits.py of the source repository), not tuned on this run"),
    ]
    cols = [
        ("val acc, test acc", "accuracy on the validation split and on the held-out test split"),
        ("merge s", "the merge itself: the engine's time from ame-merge's summary line (greedy soups: the search in "
                    "Python, evaluations included)"),
        ("CLI s", "the whole ame-merge command, a fresh Python process with its start-up (-: no command ran)"),
    ]
    indent = 2 + 19
    lines = []
    for title, items in (("rows:", rows), ("columns:", cols)):
        lines.append(title)
        for label, text in items:
            lines.append(textwrap.fill(text, width, initial_indent=f"  {label:<19}", subsequent_indent=" " * indent))
    return "\n".join(lines)


def format_reading(res: RunResult) -> str:
    """What this run's numbers say, on test accuracy (one seed: the spread between seeds is several points)."""
    soup, best = res.row("uniform soup"), res.row("best ingredient (by val)")
    pts = lambda a, b: 100 * (a - b)  # noqa: E731
    ame = [f"{r['method']} {pts(r['test'], soup['test']):+.1f}" for r in res.rows if r["kind"] == "ame"]
    top = max((r for r in res.rows if r["kind"] != "ingredient"), key=lambda r: r["test"])
    import textwrap

    text = (f"this run, on test: the soup is {pts(soup['test'], best['test']):+.1f} points against the best ingredient"
            + (f"; against the soup: {', '.join(ame)}" if ame else "")
            + f"; the best row is {top['method']} ({100 * top['test']:.1f}%). One seed of a small setting: seeds "
            "differ by several points, and AME's lr is not tuned here (the *-AME row above).")
    return textwrap.fill(text, 100)


def _cli_command() -> str:
    """How to run ame-merge from here: ``ame-merge`` when it is on PATH, else this Python with -m
    (``make demo`` runs .venv/bin/python, whose bin/ is usually not on PATH)."""
    import shutil

    exe = shutil.which("ame-merge")
    if exe and os.path.dirname(os.path.abspath(exe)) == os.path.dirname(os.path.abspath(sys.executable)):
        return "ame-merge"
    py = os.path.relpath(sys.executable) if not os.path.relpath(sys.executable).startswith("..") else sys.executable
    return f"{py} -m ame_kernels"


def _missing_extra() -> Optional[str]:
    """The one-line error when the demo's extra (scikit-learn) is not installed, else None."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        return ("ame_kernels.demo: error: the demo needs scikit-learn (for its bundled digits data set): "
                "pip install 'ame-kernels[demo]' (or pip install scikit-learn)")
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="AME demo: merge small digits classifiers through the ame-merge CLI")
    p.add_argument("--out", default="demo_out", help="folder for the checkpoints and merges (default ./demo_out)")
    p.add_argument("--ingredients", type=int, default=10)
    p.add_argument("--excluded", type=int, default=5, help="classes each ingredient never sees (OOD = m/10)")
    p.add_argument("--epochs", type=int, default=10, help="training epochs per ingredient")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--via", choices=("auto", "cli", "api"), default="auto", help="merge path (auto: the CLI when present)")
    a = p.parse_args(argv)
    missing = _missing_extra()
    if missing:
        print(missing, file=sys.stderr)
        return 2
    torch.set_num_threads(1)  # tiny matmuls: one thread is fastest, and the CLI merges run beside it
    t0 = time.perf_counter()
    setting = Setting(n_ingredients=a.ingredients, excluded=a.excluded, train_epochs=a.epochs, seed=a.seed)
    res = run_setting(setting, a.out, via=a.via, cross_check=False)
    root = os.path.abspath(a.out)
    n, m = setting.n_ingredients, setting.excluded
    print(f"AME demo: scikit-learn's digits (8x8 images, 10 classes), an MLP 64-{setting.hidden}-10; {n} ingredients "
          f"trained from one shared init, each {setting.train_epochs} epochs without {m} of the 10 classes "
          f"(blind to {10 * m}% of the test set), seed {setting.seed}")
    ing = [r for r in res.rows if r["kind"] == "ingredient"]
    print(f"ingredients: {os.path.join(root, 'ingredient_00')} .. ingredient_{n - 1:02d} (model.safetensors + config.json), "
          f"test acc {100 * min(r['test'] for r in ing):.1f}% .. {100 * max(r['test'] for r in ing):.1f}%, "
          f"trained in {res.train_s:.1f} s")
    if res.via == "cli":
        print(f"merges: each through the ame-merge CLI (python -m ame_kernels NAME.yaml NAME), "
              f"into {os.path.join(root, 'merged')}/NAME/ with its config beside it as NAME.yaml")
    else:
        print("merges: in memory through ak.merge (--via api): none written to disk")
    print()
    print(format_table(res, root))
    print()
    print(format_legend(res))
    print()
    print(format_reading(res))
    cli = _cli_command()
    steps = [(f"{cli} inspect {os.path.join(a.out, 'ingredient_*')}", "how alike the ingredients are")]
    if res.via == "cli" and "Adam-AME" in DEFAULT_AME:
        steps.append((f"{cli} {os.path.join(a.out, 'merged', 'Adam-AME.yaml')} OUT --dry-run", "one merge's plan"))
    steps.append((f"{cli} help config", "the YAML config's keys"))
    w = max(len(c) for c, _ in steps)
    print("next:\n" + "\n".join(f"  {c:<{w}}  # {what}" for c, what in steps))
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
