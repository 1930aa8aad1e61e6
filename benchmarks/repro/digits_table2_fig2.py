"""The AME paper's Table 2 and Figure 2 in miniature on the digits family (issue 19).

Table 2 (does the merge keep its ingredients' memory?): for the class-excluding ingredients of
benchmarks/repro/digits.py, the TRAIN accuracy (on the training split, all classes: every
training example was seen by some ingredient) and the TEST accuracy of the best ingredient (by
val) and of the best merge (Adam-AME chosen by ``ak.sweep`` on val). The paper's claim: the
merge is more accurate on the ingredients' training data than on unseen data.

Figure 2 (ensemble epochs and batching): ingredients saved after each of 1, 2, 5, 10 and 20
training epochs; GD-AME (harmonic lr 1, adaptive soup pivot, zeta 1: the paper's setting) with
1, 5 and 15 ensemble epochs, batches of 1 without shuffling against batches of 2 with
shuffling; test accuracy against the ingredients' training epoch.

    python benchmarks/repro/digits_table2_fig2.py [--levels 1 5 7] [--seeds 0 1 2] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import time

import numpy as np
import torch
from torch import nn

from _common import machine, markdown_table, mean_std, results_dir, write_csv  # noqa: E402  (sets sys.path)

import ame_kernels as ak  # noqa: E402
from ame_kernels import demo  # noqa: E402
from ame_kernels.demo import AME_COMMON, Setting  # noqa: E402

GRID = {"optimizer": ["adam"], "lr": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2], "epochs": [1, 5],
        **{k: [v] for k, v in AME_COMMON.items() if k != "epochs"}}
SNAPSHOTS = (1, 2, 5, 10, 20)
VARIANTS = {f"E={e}, B={b}{', shuffled' if s else ''}": dict(optimizer="sgd", lr=1.0, lr_schedule="harmonic", pivot="soup",
                                                          adaptive_pivot=True, amplification=1.0, epochs=e, batch_size=b,
                                                          shuffle=s, seed=0)
            for e in (1, 5, 15) for b, s in ((1, False), (2, True))}


def train_with_snapshots(data, setting: Setting):
    """As demo.train_ingredients, keeping each ingredient's weights after the SNAPSHOTS epochs."""
    init = demo.shared_init(setting)
    snaps = {t: [] for t in SNAPSHOTS}
    for j in range(setting.n_ingredients):
        ex = demo.excluded_classes(j, setting.excluded, setting.n_ingredients)
        keep = ~torch.isin(data["ytr"], torch.tensor(ex, dtype=torch.long))
        X, y = data["Xtr"][keep], data["ytr"][keep]
        model = demo.make_model(setting.hidden)
        model.load_state_dict(init)
        opt = torch.optim.Adam(model.parameters(), lr=setting.train_lr)
        g = torch.Generator().manual_seed(1000 * setting.seed + j)
        for epoch in range(1, max(SNAPSHOTS) + 1):
            perm = torch.randperm(len(y), generator=g)
            for b in range(0, len(y), setting.train_batch):
                idx = perm[b:b + setting.train_batch]
                loss = nn.functional.cross_entropy(model(X[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            if epoch in snaps:
                snaps[epoch].append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return snaps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 5, 7])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    od = results_dir(args.out)
    t2, f2 = {}, {}
    for m, seed in itertools.product(args.levels, args.seeds):
        setting = Setting(n_ingredients=10, excluded=m, train_epochs=max(SNAPSHOTS), seed=seed)
        data = demo.load_splits(seed, setting)
        h = setting.hidden
        acc = lambda sd, split: demo.accuracy(sd, data[f"X{split}"], data[f"y{split}"], h)  # noqa: E731
        snaps = train_with_snapshots(data, setting)
        ings = snaps[max(SNAPSHOTS)]
        best = ings[int(np.argmax([acc(sd, "va") for sd in ings]))]
        res = ak.sweep(ings, lambda sd: acc(sd, "va"), GRID)
        t2[(m, seed)] = {"ingredient train": acc(best, "tr"), "ingredient test": acc(best, "te"),
                         "merge train": acc(res.best, "tr"), "merge test": acc(res.best, "te")}
        for t, sds in snaps.items():
            for name, cfg in VARIANTS.items():
                f2[(m, seed, t, name)] = acc(ak.merge(sds, **cfg), "te")
            f2[(m, seed, t, "uniform soup")] = acc(ak.uniform_soup(sds), "te")
        print(f"m={m} seed={seed}: " + ", ".join(f"{k} {100 * v:.1f}" for k, v in t2[(m, seed)].items()), flush=True)
    cols = ["ingredient train", "ingredient test", "merge train", "merge test"]
    table2 = [[f"{10 * m}% OOD"] + [mean_std([t2[(m, s)][c] for s in args.seeds], 100, 1) for c in cols]
              for m in args.levels]
    names = ["uniform soup", *VARIANTS]
    fig_rows = [[f"{10 * m}% OOD", name] + [mean_std([f2[(m, s, t, name)] for s in args.seeds], 100, 1) for t in SNAPSHOTS]
                for m in args.levels for name in names]
    text = ("# Table 2 in miniature: train vs test accuracy (%) of the best ingredient (by val) and the best merge "
            f"(Adam-AME chosen by ak.sweep on val), mean ± std over seeds {args.seeds}\n\n"
            + markdown_table(["level", *cols], table2)
            + "\n\n# Figure 2 in miniature: GD-AME test accuracy (%) against the ingredients' training epoch "
              "(harmonic lr 1, adaptive soup pivot; E ensemble epochs, B ingredients per batch)\n\n"
            + markdown_table(["level", "merge", *[f"epoch {t}" for t in SNAPSHOTS]], fig_rows)
            + f"\n\n{machine()}; {time.perf_counter() - t0:.0f} s\n")
    print(text)
    (od / "digits_table2_fig2.md").write_text(text)
    write_csv(od / "digits_fig2.csv", ["excluded", "seed", "train_epoch", "merge", "test"],
              [[m, s, t, n, f"{v:.4f}"] for (m, s, t, n), v in f2.items()])
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(args.levels), figsize=(4.2 * len(args.levels), 3.4), squeeze=False)
        for ax, m in zip(axes[0], args.levels):
            for name in names:
                ys = [100 * np.mean([f2[(m, s, t, name)] for s in args.seeds]) for t in SNAPSHOTS]
                ax.plot(SNAPSHOTS, ys, marker="o", ms=3, lw=1, label=name, ls="--" if name == "uniform soup" else "-")
            ax.set_xscale("log")
            ax.set_title(f"{10 * m}% OOD", fontsize=9)
            ax.set_xlabel("ingredient training epoch")
            ax.set_ylabel("test accuracy %")
        axes[0][-1].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(od / "digits_fig2.png", dpi=110)
        plt.close(fig)
    except ImportError:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
