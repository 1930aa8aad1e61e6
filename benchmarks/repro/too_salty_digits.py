"""Too Salty (Sections 2.2-2.3) in miniature on scikit-learn's digits (issue 19).

A base MLP 64-64-10 is trained from one init with Adam; after k shared epochs (the branching
point) B models branch off it and each trains on for a further ``--apart`` epochs with its own
data order and a perturbed learning rate, so pairs of models share k epochs of training. For
every pair of branches with the same k (and, across k, pairs from different branching
points share min(k_a, k_b) epochs) we soup the two (uniform mean) and measure on the test
split the soup gain ``min(L_a, L_b) - L_soup`` (test loss, Too Salty's definition), and the
predictors of ``ak.output_diagnostics``: L2 and cosine of the weights, KL and MSE of the
logits, linear CKA of the logits and of the penultimate features.

Reports the quantiles of the gain and P(gain > 0) against shared epochs, and the Spearman
correlation of each predictor with the gain over all pairs.

    python benchmarks/repro/too_salty_digits.py [--branch-epochs 0 1 2 5 10 20] [--branches 4] [--apart 10]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch import nn

from _common import machine, markdown_table, results_dir, write_csv  # noqa: E402  (sets sys.path)

import ame_kernels as ak  # noqa: E402
from ame_kernels import demo  # noqa: E402
from ame_kernels.demo import Setting  # noqa: E402

PREDICTORS = ("l2", "cosine", "kl", "mse", "cka_logits", "cka_features")


def _train(model, X, y, epochs, lr, seed, batch=32):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for b in range(0, len(y), batch):
            idx = perm[b:b + batch]
            loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--branch-epochs", type=int, nargs="+", default=[0, 1, 2, 5, 10, 20])
    ap.add_argument("--branches", type=int, default=4)
    ap.add_argument("--apart", type=int, default=10)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    od = results_dir(args.out)
    data = demo.load_splits(args.seed, Setting())
    X, y, Xte, yte = data["Xtr"], data["ytr"], data["Xte"], data["yte"]
    torch.manual_seed(args.seed)
    base = demo.make_model(64)
    models, shared = [], []
    done = 0
    for k in sorted(args.branch_epochs):
        _train(base, X, y, k - done, args.lr, seed=10_000 + k)
        done = k
        for b in range(args.branches):
            m = demo.make_model(64)
            m.load_state_dict(base.state_dict())
            lr = args.lr * (0.5 + b / max(1, args.branches - 1))  # different hyperparameters per branch
            _train(m, X, y, args.apart, lr, seed=1000 * k + b + 1)
            models.append({kk: v.detach().clone() for kk, v in m.state_dict().items()})
            shared.append(k)
    arch = demo.make_model(64)
    rows = ak.output_diagnostics(models, arch, (Xte, yte), head="2")
    for r in rows:
        i, j = r["pair"]
        r["shared"] = min(shared[i], shared[j])
    by_k = {}
    for r in rows:
        by_k.setdefault(r["shared"], []).append(r["gain"])
    q_rows = []
    for k in sorted(by_k):
        g = np.asarray(by_k[k])
        q_rows.append([k, len(g), *[f"{np.percentile(g, p):+.4f}" for p in (10, 50, 90)], f"{np.mean(g > 0):.2f}"])
    rep = ak.soupability_report(rows, predictors=PREDICTORS)
    rep_pos = ak.soupability_report(rows, predictors=PREDICTORS, positive_only=True)
    n_pos = sum(r["gain"] > 0 for r in rows)
    text = (f"# Too Salty on digits: {len(models)} models ({args.branches} branches at each of epochs "
            f"{sorted(args.branch_epochs)}, {args.apart} epochs apart), {len(rows)} pairs, soup gain in test loss\n\n"
            + markdown_table(["shared epochs", "pairs", "gain p10", "median", "p90", "P(gain > 0)"], q_rows)
            + "\n\n" + markdown_table(["predictor", "Spearman with gain (all pairs)", f"positive-gain pairs only ({n_pos})"],
                                      [[p, f"{rep[p]:+.2f}", f"{rep_pos.get(p, float('nan')):+.2f}"] for p in PREDICTORS])
            + f"\n\n{machine()}; {time.perf_counter() - t0:.0f} s\n")
    print(text)
    (od / "too_salty_digits.md").write_text(text)
    write_csv(od / "too_salty_digits.csv", ["i", "j", "shared", "gain", *PREDICTORS],
              [[*r["pair"], r["shared"], f"{r['gain']:.6f}", *[f"{r[p]:.6g}" for p in PREDICTORS]] for r in rows])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
