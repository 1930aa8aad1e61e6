"""Data-aware merging on the digits family of benchmarks/repro/digits.py (issue 19).

For each exclusion level m and seed: the same N = 10 class-excluding MLP ingredients as
digits.py (``ame_kernels.demo``), then, with every choice made on the VALIDATION split and
every number reported on the TEST split:

* best ingredient (by val), uniform soup;
* sweep-selected Adam-AME: ``ak.sweep`` over lr x epochs (AME_COMMON otherwise), ranked by val
  accuracy, and the uniform soup of its top 3 (the AME paper's Appendix A.2 step 3);
* learned soup (Wortsman et al.): ``ak.learned_soup`` on the val split, global and by layer;
* output ensembles (Rethinking, Sec. 6.2): logit ensemble, feature ensemble (mean features,
  mean head), greedy logit ensemble (members chosen on val);
* soupability from outputs (Too Salty, Sec. 2.3), on the 45 ingredient pairs of each run:
  Spearman correlation of KL / MSE of logits, CKA of logits / features, L2 and cosine of the
  weights with the pair's soup gain in test loss. (These are class-excluding ingredients from
  one init, not Too Salty's branching ResNets: a different population of pairs.)

    python benchmarks/repro/digits_data_aware.py [--levels 1 5 7] [--seeds 0 1 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch

from _common import machine, markdown_table, mean_std, results_dir, write_csv  # noqa: E402  (sets sys.path)

import ame_kernels as ak  # noqa: E402
from ame_kernels import demo  # noqa: E402
from ame_kernels.demo import AME_COMMON, Setting  # noqa: E402

GRID = {"optimizer": ["adam"], "lr": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2], "epochs": [1, 5],
        **{k: [v] for k, v in AME_COMMON.items() if k != "epochs"}}
METHODS = ["best ingredient (by val)", "uniform soup", "sweep-selected Adam-AME", "top-3 soup of the sweep",
           "learned soup", "learned soup (by layer)", "logit ensemble", "feature ensemble", "greedy logit ensemble"]
PREDICTORS = ("kl", "mse", "cka_logits", "cka_features", "l2", "cosine")


def _acc(out, y):
    return float((out.argmax(1) == y).float().mean())


def one_run(m: int, seed: int, train_epochs: int = 20):
    setting = Setting(n_ingredients=10, excluded=m, train_epochs=train_epochs, seed=seed)
    data = demo.load_splits(seed, setting)
    ings, _ = demo.train_ingredients(data, setting)
    h = setting.hidden
    model = demo.make_model(h)
    Xva, yva, Xte, yte = data["Xva"], data["yva"], data["Xte"], data["yte"]
    val = lambda sd: demo.accuracy(sd, Xva, yva, h)  # noqa: E731
    test = lambda sd: demo.accuracy(sd, Xte, yte, h)  # noqa: E731
    rec = {}
    vals = [val(sd) for sd in ings]
    rec["best ingredient (by val)"] = test(ings[int(np.argmax(vals))])
    rec["uniform soup"] = test(ak.uniform_soup(ings))
    res = ak.sweep(ings, val, GRID, top=3)
    rec["sweep-selected Adam-AME"] = test(res.best)
    rec["top-3 soup of the sweep"] = test(res.top_soup)
    rec["chosen"] = f'lr={res.best_params["lr"]} epochs={res.best_params["epochs"]}'
    ce = torch.nn.functional.cross_entropy
    batches = [(Xva[i:i + 64], yva[i:i + 64]) for i in range(0, len(yva), 64)]
    sd, _ = ak.learned_soup(ings, model, ce, batches, steps=200, lr=0.05)
    rec["learned soup"] = test(sd)
    sd, _ = ak.learned_soup(ings, model, ce, batches, by_layer=True, steps=200, lr=0.05)
    rec["learned soup (by layer)"] = test(sd)
    rec["logit ensemble"] = _acc(ak.ensemble(ings, model, Xte, kind="logits"), yte)
    rec["feature ensemble"] = _acc(ak.ensemble(ings, model, Xte, kind="features", head="2"), yte)
    _, members = ak.greedy_ensemble(ings, model, Xva, lambda o: _acc(o, yva), kind="logits")
    rec["greedy logit ensemble"] = _acc(ak.ensemble([ings[i] for i in members], model, Xte), yte)
    rows = ak.output_diagnostics(ings, model, (Xte, yte), head="2")
    rec["spearman"] = ak.soupability_report(rows)
    rec["p_gain_pos"] = float(np.mean([r["gain"] > 0 for r in rows]))
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 5, 7])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--train-epochs", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    od = results_dir(args.out)
    t0 = time.perf_counter()
    per = {}
    for m, seed in itertools.product(args.levels, args.seeds):
        t1 = time.perf_counter()
        per[(m, seed)] = rec = one_run(m, seed, args.train_epochs)
        print(f"m={m} seed={seed}: " + ", ".join(f"{k} {100 * rec[k]:.1f}" for k in METHODS)
              + f"; chosen {rec['chosen']} [{time.perf_counter() - t1:.1f} s]", flush=True)
    header = ["method"] + [f"{10 * m}% OOD" for m in args.levels]
    table = [[name] + [mean_std([per[(m, s)][name] for s in args.seeds], 100, 1) for m in args.levels] for name in METHODS]
    sp_header = ["predictor"] + [f"{10 * m}% OOD" for m in args.levels]
    sp = [[p] + [mean_std([per[(m, s)]["spearman"][p] for s in args.seeds], 1, 2) for m in args.levels] for p in PREDICTORS]
    sp.append(["P(gain > 0)"] + [mean_std([per[(m, s)]["p_gain_pos"] for s in args.seeds], 1, 2) for m in args.levels])
    text = (f"# digits, data-aware merging: test accuracy (%), mean ± std over seeds {args.seeds}\n\n"
            + markdown_table(header, table)
            + "\n\n# Spearman correlation with the pair soup gain (test loss), 45 pairs per run, mean ± std over seeds\n\n"
            + markdown_table(sp_header, sp)
            + f"\n\n{machine()}; {time.perf_counter() - t0:.0f} s in all\n")
    print("\n" + text)
    (od / "digits_data_aware.md").write_text(text)
    write_csv(od / "digits_data_aware.csv", ["excluded", "seed", *METHODS, "chosen"],
              [[m, s, *[f"{per[(m, s)][k]:.4f}" for k in METHODS], per[(m, s)]["chosen"]] for (m, s) in per])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
