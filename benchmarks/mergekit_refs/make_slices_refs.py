"""mergekit's outputs for the ``slices:`` configs in slices/*.yml (MODELS/<name> = models.py's models).

    /work/mkvenv/bin/python benchmarks/mergekit_refs/make_slices_refs.py [--mergekit PATH]

Same pattern as make_refs.py: the tiny models written to a scratch folder, each config run by
``mergekit-yaml`` (flags in SLICES.json), its output stored as out/slices_<name>.safetensors
with the output config's num_hidden_layers in SLICES.json. mergekit is only needed here, never
by the package or the tests (tests/test_mergekit_schema.py reads the stored outputs).
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

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import models  # noqa: E402
from make_refs import load_dir, write_models  # noqa: E402

FLAGS = ["--allow-crimes", "--no-lazy-unpickle", "--device", "cpu", "--random-seed", "0", "--no-copy-tokenizer",
         "--no-write-model-card", "--quiet"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mergekit", default=os.path.join(os.path.dirname(sys.executable), "mergekit-yaml"))
    args = ap.parse_args(argv)
    from importlib.metadata import version

    from safetensors.numpy import save_file

    work = tempfile.mkdtemp(prefix="mkslices-")
    try:
        write_models(os.path.join(work, "models"), models.models_f32())
        entries = []
        for fn in sorted(os.listdir(os.path.join(HERE, "slices"))):
            if not fn.endswith(".yml"):
                continue
            name = fn[:-4]
            text = open(os.path.join(HERE, "slices", fn)).read().replace("MODELS/", work + "/models/")
            cfg = os.path.join(work, fn)
            with open(cfg, "w") as f:
                f.write(text)
            out = os.path.join(work, "out_" + name)
            r = subprocess.run([args.mergekit, cfg, out, *FLAGS], capture_output=True, text=True)
            if r.returncode:
                print(r.stdout[-3000:], r.stderr[-3000:])
                raise SystemExit(f"make_slices_refs: {name}: mergekit failed ({r.returncode})")
            tensors = load_dir(out)
            save_file(tensors, os.path.join(HERE, "out", f"slices_{name}.safetensors"))
            layers = json.load(open(os.path.join(out, "config.json")))["num_hidden_layers"]
            entries.append({"name": name, "config": f"slices/{fn}", "file": f"out/slices_{name}.safetensors",
                            "num_hidden_layers": layers, "tensors": len(tensors)})
            print(f"{name:<14} ok ({len(tensors)} tensors, {layers} layers)")
        with open(os.path.join(HERE, "SLICES.json"), "w") as f:
            json.dump({"mergekit_version": version("mergekit"),
                       "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
                       "command": "mergekit-yaml CONFIG OUT " + " ".join(FLAGS), "configs": entries}, f, indent=1)
            f.write("\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
