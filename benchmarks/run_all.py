"""Run every benchmarks/bench_*.py in turn (``make bench``): each script's ``main(argv)``.

    python benchmarks/run_all.py                # every benchmark at its default size
    python benchmarks/run_all.py --small        # passes --small to every benchmark that has it
    python benchmarks/run_all.py --only whole_run,e2e

A benchmark that cannot run here (no GPU, backend not built) prints why and returns 0;
an exception in one benchmark is reported and the others still run. The exit status is
1 when any benchmark failed.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)


def _load(path: str):
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses (and pickling) look the module up by name
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="pass --small to every benchmark that has it")
    ap.add_argument("--only", default="", help="comma-separated names (bench_<name>.py)")
    args = ap.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    scripts = sorted(glob.glob(os.path.join(HERE, "bench_*.py")))
    if only:
        scripts = [s for s in scripts if os.path.basename(s)[len("bench_"):-3] in only]
    failed = []
    for path in scripts:
        name = os.path.basename(path)
        print(f"\n===== {name} =====", flush=True)
        t0 = time.perf_counter()
        try:
            mod = _load(path)
            if not hasattr(mod, "main"):
                print(f"{name}: no main(argv): skipped")
                continue
            with open(path) as f:  # pass --small only to scripts that define it
                small = args.small and '"--small"' in f.read()
            rc = mod.main(["--small"] if small else [])
            if rc not in (None, 0):
                failed.append(f"{name} (exit {rc})")
        except SystemExit as e:  # argparse or a script's own exit
            if e.code not in (None, 0):
                failed.append(f"{name} (exit {e.code})")
        except Exception:  # noqa: BLE001 (one benchmark's failure must not hide the others)
            traceback.print_exc()
            failed.append(name)
        print(f"===== {name}: {time.perf_counter() - t0:.1f} s =====", flush=True)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
        return 1
    print(f"\nall {len(scripts)} benchmarks ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
