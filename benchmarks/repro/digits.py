"""Table 1 of the AME paper in miniature: merging class-excluding digits classifiers.

For each exclusion level m (each ingredient never sees m of the 10 classes: m/10 OOD) and
each seed (data split, shared init, training order):

* train N = 10 ingredients of a small MLP from ONE shared initialization, ingredient j
  without classes j..j+m-1 (mod 10) (the paper's Appendix A.2 scheme; every class is
  seen by N - m ingredients), and save each as a checkpoint folder;
* choose each AME optimizer's learning rate (and AdamW's weight decay) on the VALIDATION
  split with in-memory ``ak.merge`` runs over a small grid (ties: the first, i.e. the
  smallest lr); the test split is never used for any choice;
* merge the checkpoint folders through the ``ame-merge`` CLI (one YAML per merge): the
  uniform soup (the GD identity) and GD / Adagrad / Adam / AdamW-AME with the chosen
  settings; the greedy soups (model-soups recipe, best first, and the paper's worst-first
  variant, on the validation split) in Python;
* evaluate everything on the test split.

Reports test accuracy, mean ± std over the seeds, per method and level.

    python benchmarks/repro/digits.py [--levels 1 5 7] [--seeds 0 1 2 3 4] [--out DIR] [--via cli|api]
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import tempfile
import time

import numpy as np
import torch

from _common import machine, markdown_table, mean_std, results_dir, write_csv  # noqa: E402  (sets sys.path)

from ame_kernels import demo  # noqa: E402
from ame_kernels.demo import AME_COMMON, Setting  # noqa: E402

GRIDS = {
    "GD-AME": [dict(optimizer="sgd", lr=lr) for lr in (0.25, 0.5, 1.0, 2.0, 4.0)],
    "Adagrad-AME": [dict(optimizer="adagrad", lr=lr) for lr in (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)],
    "Adam-AME": [dict(optimizer="adam", lr=lr) for lr in (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)],
    "AdamW-AME": [dict(optimizer="adamw", lr=lr, weight_decay=wd)
                  for lr, wd in itertools.product((3e-4, 1e-3, 3e-3, 1e-2), (0.1, 1.0))],
}
METHODS = ["best ingredient (by val)", "mean ingredient", "uniform soup", "greedy soup", "greedy soup (asc)", *GRIDS]


def sweep(setting: Setting, grids=GRIDS, log=print):
    """Train once, pick each optimizer's config on val with ak.merge; returns (chosen, sweep rows, (data, ings, excl))."""
    data = demo.load_splits(setting.seed, setting)
    ings, excl = demo.train_ingredients(data, setting)
    h = setting.hidden
    rows, chosen = [], {}
    for name, grid in grids.items():
        best = None
        for g in grid:
            cfg = {**AME_COMMON, **g}
            out, _ = demo.merge_api(ings, cfg)
            va = demo.accuracy(out, data["Xva"], data["yva"], h)
            te = demo.accuracy(out, data["Xte"], data["yte"], h)
            rows.append(dict(excluded=setting.excluded, seed=setting.seed, method=name, **{k: v for k, v in g.items() if k != "optimizer"},
                             val=va, test=te))
            if best is None or va > best[0]:
                best = (va, g)
        chosen[name] = best[1]
    return chosen, rows, (data, ings, excl)


def run(levels=(1, 5, 7), seeds=(0, 1, 2, 3, 4), n_ingredients=10, train_epochs=20, out=None, via="auto",
        keep_checkpoints=False, verbose=True, grids=GRIDS):
    torch.set_num_threads(1)
    od = results_dir(out)
    ckroot = tempfile.mkdtemp(prefix="ame_digits_")
    per_run, sweep_rows, notes = [], [], []
    t_start = time.perf_counter()
    try:
        for m, seed in itertools.product(levels, seeds):
            t0 = time.perf_counter()
            setting = Setting(n_ingredients=n_ingredients, excluded=m, train_epochs=train_epochs, seed=seed)
            chosen, rows, trained = sweep(setting, grids)
            sweep_rows += rows
            # the chosen configs, merged from the saved checkpoint folders (the CLI where present)
            res = demo.run_setting(setting, os.path.join(ckroot, f"m{m}_s{seed}"), ame=chosen, via=via, cross_check=True,
                                   trained=trained)
            ing = [r for r in res.rows if r["kind"] == "ingredient"]
            rec = {"excluded": m, "seed": seed, "mean ingredient": float(np.mean([r["test"] for r in ing]))}
            for name in METHODS:
                if name != "mean ingredient":
                    rec[name] = res.row(name)["test"]
            rec["val"] = {r["method"]: r["val"] for r in res.rows}
            rec["chosen"] = chosen
            rec["greedy_members"] = f'{res.row("greedy soup")["members"]} / {res.row("greedy soup (asc)")["members"]}'
            rec["soup_identity_maxdiff"] = res.soup_identity_maxdiff
            rec["cli_vs_api_maxdiff"] = max(res.cli_vs_api_maxdiff.values()) if res.cli_vs_api_maxdiff else float("nan")
            rec["merge_wall_s"] = {r["method"]: r["wall_s"] for r in res.rows if r["kind"] in ("soup", "ame")}
            per_run.append(rec)
            if verbose:
                print(f"m={m} seed={seed}: " + ", ".join(f"{k} {100 * rec[k]:.1f}" for k in METHODS)
                      + f"  [{time.perf_counter() - t0:.1f} s]", flush=True)
    finally:
        if keep_checkpoints:
            print(f"checkpoints kept in {ckroot}")
        else:
            shutil.rmtree(ckroot, ignore_errors=True)
    total = time.perf_counter() - t_start

    header = ["method"] + [f"{10 * m}% OOD (m={m})" for m in levels]
    rows = []
    for name in METHODS:
        rows.append([name] + [mean_std([r[name] for r in per_run if r["excluded"] == m], 100, 1) for m in levels])
    table = markdown_table(header, rows)
    # wins of each AME row over the uniform soup, per run
    wins = []
    for name in GRIDS:
        cells = []
        for m in levels:
            rr = [r for r in per_run if r["excluded"] == m]
            d = [100 * (r[name] - r["uniform soup"]) for r in rr]
            cells.append(f"{np.mean(d):+.1f} ({sum(x > 0 for x in d)}/{sum(x < 0 for x in d)})")
        wins.append([name + " - soup"] + cells)
    wins_table = markdown_table(["test acc difference, points (runs better/worse)"] + header[1:], wins)
    chosen_rows = []
    for r in per_run:
        chosen_rows.append([f"m={r['excluded']} seed={r['seed']}"] + [
            ", ".join(f"{k} {v:g}" for k, v in r["chosen"][name].items() if k != "optimizer") for name in GRIDS
        ] + [str(r["greedy_members"])])
    chosen_table = markdown_table(["run"] + list(GRIDS) + ["greedy soup size (desc / asc)"], chosen_rows)
    via_used = "the ame-merge CLI" if (via == "cli" or (via == "auto" and demo.cli_available())) else "ak.merge"
    ident = max(r["soup_identity_maxdiff"] for r in per_run)
    cross = max(r["cli_vs_api_maxdiff"] for r in per_run)
    info = (
        f"load_digits (1797 images; test 30%, val 20% of the rest, stratified, per seed), MLP 64-64-10, "
        f"{n_ingredients} ingredients per run from one shared init, each trained {train_epochs} epochs (Adam, lr 1e-3, "
        f"batch 32) without classes j..j+m-1 (mod 10). Seeds {list(seeds)}; test accuracy in %, mean ± std over seeds.\n"
        f"AME: pivot soup, adaptive pivot, {AME_COMMON['epochs']} epochs, batch {AME_COMMON['batch_size']}, shuffled, "
        f"constant lr, amplification 1; lr (AdamW: lr, weight decay) chosen per run on the validation split from "
        + "; ".join(f"{k}: " + ", ".join(f"{g['lr']:g}" + (f"/wd {g['weight_decay']:g}" if "weight_decay" in g else "") for g in v) for k, v in grids.items())
        + f".\nMerges of the checkpoint folders via {via_used}; the soup is the GD identity "
        f"(max |soup - mean| = {ident:.1e}); CLI vs in-memory ak.merge max diff {cross:.1e}. "
        f"Greedy soup: ame_kernels.soups.greedy_soup on val accuracy (best first); greedy soup (asc): worst first "
        f"(the paper's Appendix A.4 variant). Best ingredient: the highest val accuracy.\n"
        f"Total {total:.0f} s. Machine: {machine()}"
    )
    if verbose:
        print(info)
        print(table)
        print()
        print(wins_table)
        print()
        print(chosen_table)
    if out is not None or len(seeds) >= 3:
        with open(od / "digits.md", "w") as f:
            f.write("# Digits merge quality (Table 1 in miniature)\n\n" + info.replace("\n", "\n\n") + "\n\n")
            f.write(table + "\n\nAME minus uniform soup, per run:\n\n" + wins_table + "\n\nChosen on validation:\n\n" + chosen_table + "\n")
        write_csv(od / "digits_runs.csv", ["excluded", "seed"] + METHODS,
                  [[r["excluded"], r["seed"]] + [f"{r[k]:.4f}" for k in METHODS] for r in per_run])
        keys = ["excluded", "seed", "method", "lr", "weight_decay", "val", "test"]
        write_csv(od / "digits_sweep.csv", keys, [[r.get(k, "") if k not in ("val", "test") else f"{r[k]:.4f}" for k in keys] for r in sweep_rows])
        _plot(per_run, levels, od / "digits.png")
    return dict(per_run=per_run, table=table, sweep=sweep_rows, info=info)


def _plot(per_run, levels, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.2))
    width = 0.8 / len(METHODS)
    for i, name in enumerate(METHODS):
        means = [100 * np.mean([r[name] for r in per_run if r["excluded"] == m]) for m in levels]
        stds = [100 * np.std([r[name] for r in per_run if r["excluded"] == m], ddof=1) if len(per_run) > len(levels) else 0 for m in levels]
        ax.bar(np.arange(len(levels)) + (i - len(METHODS) / 2 + 0.5) * width, means, width, yerr=stds, label=name, capsize=2)
    ax.set_xticks(np.arange(len(levels)))
    ax.set_xticklabels([f"{10 * m}% OOD" for m in levels])
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("load_digits, 10 class-excluding ingredients: test accuracy (mean ± std over seeds)")
    ax.legend(fontsize=7, ncol=4, loc="upper right")
    ax.set_ylim(0, 105)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--levels", type=int, nargs="+", default=[1, 5, 7], help="classes excluded per ingredient")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--ingredients", type=int, default=10)
    p.add_argument("--train-epochs", type=int, default=20)
    p.add_argument("--via", choices=("auto", "cli", "api"), default="auto")
    p.add_argument("--out", default=None)
    p.add_argument("--keep-checkpoints", action="store_true")
    a = p.parse_args(argv)
    run(tuple(a.levels), tuple(a.seeds), a.ingredients, a.train_epochs, a.out, a.via, a.keep_checkpoints)


if __name__ == "__main__":
    main()
