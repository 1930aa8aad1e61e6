"""Proposition 2 of the AME paper (Appendix A.3): GD ensembles need not converge with a fixed lr.

Prop. 2(i), the paper's counterexample: for k, omega > 0, lr = 1/(k+1) constant and the
N = 4 ingredients

    x1 = (-k w, (k+1) w),  x2 = (-(k+1) w, -k w),  x3 = (k w, -(k+1) w),  x4 = ((k+1) w, k w)

(w = omega), GD started at (omega, 0) cycles forever on the l1 ball of radius omega:
(omega, 0) -> (0, omega) -> (-omega, 0) -> (0, -omega) -> (omega, 0) -> ...

The paper's GD step is w <- w - lr * (w - x_i), i.e. the pseudogradient w - x_i without the
1/N; with ak.merge that is amplification zeta = N (g = zeta (w - x_i) / N), adaptive pivot,
batch size 1, no shuffle, pivot (omega, 0).

Prop. 2(ii): with a decaying lr the ensemble converges. Shown with lr_t = t^-1.5 * 1/(k+1)
(alpha = -1.5 < -1, the proposition's condition) and with the harmonic lr_t = 1/t (alpha = -1,
the soup schedule: it is not covered by (ii) but converges too, to the soup (0, 0)).

Every iterate is computed with the public API: the whole-run merge over E epochs gives
w_{4E}; the intermediate iterates come from one-ingredient merges (N = 1, zeta = 1, one step,
pivot = the previous iterate, lr = lr_t), which is exact because GD without momentum has no
state. The script checks that the step-by-step path ends where the whole-run merge ends.

    python benchmarks/repro/prop2.py [--k 2] [--omega 1] [--epochs 50] [--out DIR] [--no-plot]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from _common import machine, markdown_table, results_dir, write_csv  # noqa: E402  (sets sys.path)

import ame_kernels as ak  # noqa: E402


def points(k: float, omega: float) -> torch.Tensor:
    w = omega
    return torch.tensor(
        [[-k * w, (k + 1) * w], [-(k + 1) * w, -k * w], [k * w, -(k + 1) * w], [(k + 1) * w, k * w]],
        dtype=torch.float64,
    ).float()


def lr_fn(kind: str, k: float):
    if kind == "constant":
        return lambda t: 1.0 / (k + 1)
    if kind == "power":
        return lambda t: t**-1.5 / (k + 1)
    if kind == "harmonic":
        return lambda t: 1.0 / t
    raise ValueError(kind)


def whole_run(x: torch.Tensor, w0: torch.Tensor, kind: str, k: float, epochs: int) -> torch.Tensor:
    """w_{4E} from one ak.merge call."""
    n = x.shape[0]
    return ak.merge(
        x, optimizer="sgd", lr=1.0, lr_schedule=[lr_fn(kind, k)(t) for t in range(1, n * epochs + 1)],
        amplification=float(n), adaptive_pivot=True, pivot=w0, epochs=epochs, batch_size=1, shuffle=False,
    )


def path(x: torch.Tensor, w0: torch.Tensor, kind: str, k: float, epochs: int) -> np.ndarray:
    """[4E+1, 2] iterates w_0..w_{4E}, one single-step merge per step."""
    n = x.shape[0]
    lr = lr_fn(kind, k)
    ws = [w0.clone()]
    for t in range(1, n * epochs + 1):
        xi = x[(t - 1) % n : (t - 1) % n + 1]
        ws.append(
            ak.merge(xi, optimizer="sgd", lr=lr(t), lr_schedule="constant", amplification=1.0,
                     adaptive_pivot=True, pivot=ws[-1], epochs=1, batch_size=1)
        )
    return torch.stack(ws).double().numpy()


def run(k: float = 2.0, omega: float = 1.0, epochs: int = 50, out=None, plot: bool = True, verbose: bool = True):
    torch.set_num_threads(1)
    x = points(k, omega)
    w0 = torch.tensor([omega, 0.0])
    soup = x.double().mean(0).numpy()
    res = {}
    rows = []
    for kind in ("constant", "power", "harmonic"):
        p = path(x, w0, kind, k, epochs)
        end = whole_run(x, w0, kind, k, epochs).double().numpy()
        steps = np.linalg.norm(np.diff(p, axis=0), axis=1)
        l1 = np.abs(p).sum(1)
        epoch_ends = p[:: x.shape[0]]
        res[kind] = dict(path=p, end=end, steps=steps, l1=l1, epoch_ends=epoch_ends)
        rows.append([
            kind,
            {"constant": f"1/(k+1) = {1 / (k + 1):.4g}", "power": "t^-1.5/(k+1)", "harmonic": "1/t"}[kind],
            f"{steps[:4].mean():.4g}", f"{steps[-4:].mean():.4g}",
            f"{np.linalg.norm(epoch_ends[-1] - epoch_ends[-2]):.3g}",
            f"[{l1[-4:].min():.4g}, {l1[-4:].max():.4g}]",
            f"({end[0]:.4g}, {end[1]:.4g})",
            f"{np.linalg.norm(end - soup):.3g}",
            f"{np.max(np.abs(end - p[-1])):.2g}",
        ])
    header = ["lr schedule", "lr_t", "mean step, epoch 1", f"mean step, epoch {epochs}",
              "|w_4E - w_4(E-1)|", "l1 norm, last epoch", "w_4E (whole run)", "dist to soup", "|whole run - path|"]
    table = markdown_table(header, rows)
    info = (f"k = {k}, omega = {omega}, {epochs} epochs of 4 steps, GD, amplification 4 (g = w - x_i), "
            f"adaptive pivot, init (omega, 0); soup = ({soup[0]:.3g}, {soup[1]:.3g}).\nMachine: {machine()}")
    if verbose:
        print(info)
        print(table)
    od = results_dir(out)
    with open(od / "prop2.md", "w") as f:
        f.write("# Proposition 2 (Appendix A.3): cycle with a constant lr, convergence with a decaying lr\n\n")
        f.write(info.replace("\n", "\n\n") + "\n\n" + table + "\n")
    write_csv(od / "prop2.csv", header, rows)
    if plot:
        _plot(res, x.numpy(), od / "prop2.png", k, omega)
    res["table"] = table
    return res


def _plot(res, x, path_png, k, omega):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw=dict(width_ratios=[1.35, 1]))
    ax = axes[0]
    ax.scatter(*x.T, c="k", marker="s", label="ingredients x1..x4")
    for i, xi in enumerate(x):
        ax.annotate(f"x{i + 1}", xi, textcoords="offset points", xytext=(4, 4))
    l1 = np.array([[omega, 0], [0, omega], [-omega, 0], [0, -omega], [omega, 0]])
    ax.plot(*l1.T, c="0.8", lw=6, zorder=0, label="l1 ball of radius omega")
    for kind, c in (("constant", "tab:red"), ("power", "tab:blue"), ("harmonic", "tab:green")):
        p = res[kind]["path"]
        ax.plot(*p.T, c=c, lw=1, marker=".", ms=3, label=f"GD, lr {kind}")
    ax.scatter([omega], [0], c="k", marker="*", s=120, zorder=5, label="init (omega, 0)")
    ax.set_aspect("equal")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    ax.set_title(f"Prop. 2: k = {k}, omega = {omega}")
    ax = axes[1]
    for kind, c in (("constant", "tab:red"), ("power", "tab:blue"), ("harmonic", "tab:green")):
        s = res[kind]["steps"]
        ax.plot(np.arange(1, len(s) + 1), s, c=c, label=f"lr {kind}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("step t")
    ax.set_ylabel("|w_t - w_{t-1}|")
    ax.set_title("step length: constant lr never shrinks")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path_png, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--k", type=float, default=2.0)
    p.add_argument("--omega", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--out", default=None)
    p.add_argument("--no-plot", action="store_true")
    a = p.parse_args(argv)
    run(a.k, a.omega, a.epochs, a.out, plot=not a.no_plot)


if __name__ == "__main__":
    main()
