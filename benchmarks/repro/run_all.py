"""``make repro``: every paper reproduction at full size, tables and plots under benchmarks/repro/results/.

    python benchmarks/repro/run_all.py [--quick] [--out DIR]

--quick runs small versions (few trials / one seed) for a smoke test; its results go to a
temporary folder unless --out is given, so the committed full-size results are not overwritten.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from _common import machine, results_dir  # noqa: E402  (sets sys.path)

import cauchy  # noqa: E402
import digits  # noqa: E402
import prop2  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.quick and a.out is None:
        a.out = tempfile.mkdtemp(prefix="ame_repro_quick_")
    out = results_dir(a.out)
    print(f"machine: {machine()}\nresults: {out}\n")
    t = {}
    t0 = time.perf_counter()
    print("== Appendix F.3: Cauchy / Gaussian location (Adam-AME vs soup vs median/MLE)")
    cauchy.run(trials=30 if a.quick else 300, out=a.out)
    t["cauchy"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    print("\n== Proposition 2: GD cycle with constant lr, convergence with decaying lr")
    prop2.run(epochs=10 if a.quick else 50, out=a.out)
    t["prop2"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    print("\n== Table 1 in miniature: class-excluding digits ingredients, merged through the CLI")
    if a.quick:
        digits.run(levels=(1, 5), seeds=(0,), train_epochs=10, out=a.out)
    else:
        digits.run(out=a.out)
    t["digits"] = time.perf_counter() - t0
    # the data-aware studies (issue 19): each script's own command line, quick = one seed, fewer levels
    for name, title, quick in [
        ("digits_data_aware", "Data-aware merging: sweep-selected AME, learned soup, output ensembles",
         ["--levels", "1", "5", "--seeds", "0", "--train-epochs", "10"]),
        ("too_salty_digits", "Too Salty: soupability from the models' outputs", ["--branch-epochs", "0", "2", "5"]),
        ("digits_table2_fig2", "AME Table 2 / Figure 2 on digits", ["--levels", "1", "5", "--seeds", "0"]),
    ]:
        import importlib

        t0 = time.perf_counter()
        print(f"\n== {title}")
        importlib.import_module(name).main((quick if a.quick else []) + (["--out", a.out] if a.out else []))
        t[name] = time.perf_counter() - t0
    print("\n" + ", ".join(f"{k} {v:.0f} s" for k, v in t.items()) + f"; results in {out}")


if __name__ == "__main__":
    main()
