#!/usr/bin/env python
"""Fuzz ame-merge with hostile files: safetensors headers, shard indexes and YAML configs.

    python tools/fuzz_hostile.py                  # 300 cases, each in its own process
    python tools/fuzz_hostile.py -n 2000 --seed 7 --timeout 60 --mem-gb 4

Every case is one ``python -m ame_kernels`` (a merge, a ``--dry-run`` or ``inspect``) on a
generated folder, under a memory limit (RLIMIT_AS) and a timeout, and must end with exit 0, 1
or 2, no traceback, no output folder (or hidden temporary one) after a failure, and within the
limits. Prints the counts and each failure with the seed that reproduces it
(``--seed S -n 1``). tests/test_hostile_fuzz.py runs the same generators in-process, a bounded
number of cases per ``make test`` (more with ``AME_FUZZ_EXAMPLES``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import struct
import subprocess
import sys
import tempfile
import time
from typing import List, Tuple

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["a.weight", "b.bias", "c"]
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "BOOL", "F8_E4M3", "X99", "", "f32"]


# ----------------------------------------------------------------------------- valid pieces


def safetensors_bytes(tensors: dict, metadata: dict = None) -> bytes:
    """A valid safetensors file of numpy arrays (name -> (code, array))."""
    header, data, pos = {}, b"", 0
    if metadata:
        header["__metadata__"] = metadata
    for name, (code, arr) in tensors.items():
        raw = arr.tobytes()
        header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [pos, pos + len(raw)]}
        data += raw
        pos += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def valid_model(rng: random.Random, folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    tensors = {
        "a.weight": ("F32", np.asarray([rng.uniform(-1, 1) for _ in range(24)], dtype="<f4").reshape(4, 6)),
        "b.bias": ("F16", np.asarray([rng.uniform(-1, 1) for _ in range(6)], dtype="<f2")),
        "c": ("I64", np.arange(3, dtype="<i8")),
    }
    with open(os.path.join(folder, "model.safetensors"), "wb") as f:
        f.write(safetensors_bytes(tensors, {"format": "pt"}))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "fuzz"}, f)
    return folder


# ----------------------------------------------------------------------------- hostile pieces


def _value(rng: random.Random, depth: int = 0):
    """A random JSON value, now and then a hostile one (deep, huge, odd types)."""
    r = rng.random()
    if r < 0.02:
        if rng.random() < 0.5:
            v: list = []
            for _ in range(300):  # deep, but json.dumps can still write it (deeper ones are written raw)
                v = [v]
            return v
        return "x" * rng.randint(1000, 100_000)
    if depth > 3 or r < 0.5:
        return rng.choice([0, 1, -1, 7, 2**31, 2**64, -(2**63), 1.5, float("1e308"), True, None, "", "F32", "x"])
    if r < 0.75:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["dtype", "shape", "data_offsets", "k", ""]): _value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def hostile_header(rng: random.Random) -> bytes:
    """A safetensors file: a valid one mutated, or a generated header (entries, lengths, data)."""
    base = safetensors_bytes({
        "a.weight": ("F32", np.zeros((4, 6), "<f4")), "b.bias": ("F16", np.zeros(6, "<f2")), "c": ("I64", np.zeros(3, "<i8")),
    })
    kind = rng.randrange(6)
    if kind == 0:  # truncated anywhere
        return base[: rng.randrange(len(base))]
    if kind == 1:  # flipped bytes
        b = bytearray(base)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)
    if kind == 2:  # a lying length field
        return struct.pack("<Q", rng.choice([0, 1, 7, len(base), 2**40, 2**64 - 1, rng.randrange(400)])) + base[8:]
    if kind == 3:  # deep JSON
        depth = rng.choice([100, 1000, 100_000])
        h = b'{"a": ' + b"[" * depth + b"]" * depth + b"}"
        return struct.pack("<Q", len(h)) + h
    # generated entries: odd dtypes, shapes, offsets, overlaps, zero-size tensors
    header = {}
    pos = 0
    for name in rng.sample(NAMES + ["zero", "__metadata__"], rng.randint(1, 5)):
        shape = rng.choice([[4, 6], [6], [3], [0], [], [-1], [2**40], [2, 3, 4], ["4"], None])
        code = rng.choice(DTYPES)
        n = 1
        for s in shape if isinstance(shape, list) else []:
            n *= s if isinstance(s, int) else 1
        size = max(0, n) * {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "BOOL": 1}.get(code, 1)
        begin = rng.choice([pos, pos, 0, max(0, pos - 4), pos + 3, -8])
        end = rng.choice([begin + size, begin + size, begin, begin - 1, begin + size + 8])
        entry = {"dtype": code, "shape": shape, "data_offsets": [begin, end]}
        if rng.random() < 0.2:
            entry = _value(rng)
        header[name] = entry
        pos = max(pos, end if isinstance(end, int) else pos)
    h = json.dumps(header).encode()
    pos = min(pos, 1 << 16)  # a huge shape claims more than the file will hold (the point of the case)
    data = b"\0" * rng.choice([pos, pos, max(0, pos - 8), pos + 16, 0])
    return struct.pack("<Q", len(h)) + h + data


def hostile_index(rng: random.Random) -> Tuple[str, dict]:
    """(index JSON text, {shard file: bytes}) for a sharded folder."""
    shards = {f"model-0000{k}-of-00002.safetensors": k for k in (1, 2)}
    weight_map = {n: rng.choice(list(shards)) for n in NAMES}
    kind = rng.randrange(5)
    if kind == 0:
        weight_map[rng.choice(NAMES)] = rng.choice(["missing.safetensors", "../x", "", 7, None, [], "."])
    elif kind == 1:
        weight_map = _value(rng)
    elif kind == 2:
        weight_map["extra"] = rng.choice(list(shards))
    elif kind == 3:
        text = '{"weight_map": ' + "[" * 5000 + "]" * 5000 + "}"
        return text, {}
    files = {}
    for fname in shards:
        names = [n for n, s in (weight_map.items() if isinstance(weight_map, dict) else []) if s == fname]
        arrs = {"a.weight": ("F32", np.zeros((4, 6), "<f4")), "b.bias": ("F16", np.zeros(6, "<f2")), "c": ("I64", np.zeros(3, "<i8"))}
        files[fname] = safetensors_bytes({n: arrs[n] for n in names if n in arrs} or {"c": arrs["c"]})
    doc = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    text = json.dumps(doc)
    if rng.random() < 0.2:
        text = text[: rng.randrange(len(text))]
    return text, files


_KEYS = ["optimizer", "lr", "epochs", "batch_size", "betas", "pivot", "lr_schedule", "amplification", "seed",
         "out_dtype", "chunk_mb", "shard_size", "device", "shuffle", "scores", "order", "strategy", "evaluate",
         "optimiser", "models", "lr_power", "eps", "threads", "backend", "weights"]
_SCALARS = ["adam", "sgd", "1e-3", "0", "-1", "1e400", ".nan", ".inf", "true", "null", "~", "'x'", "[]", "{}",
            "0x10", "1_000", "2", "3", "soup", "cpu", "cuda:99", "5GB", "-0", "'\\u0000'", "!!binary aGk=",
            "!!python/object:os.system x", "9" * 5000, "é", "[0.9, 0.999]", "[1, 0]"]


def hostile_yaml(rng: random.Random, models: List[str]) -> bytes:
    """A config: valid keys and values mixed with hostile ones (anchors, bombs, deep nesting, bad bytes)."""
    kind = rng.randrange(8)
    lines = ["models:"] + [f"  - {{path: {m}}}" for m in models]
    if kind == 0:  # an alias bomb in a value
        levels, width = rng.randint(3, 9), rng.randint(2, 9)
        items = ["&a0 [" + ", ".join(["x"] * width) + "]"]
        items += [f"&a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]" for i in range(1, levels)]
        lines.append(f"{rng.choice(_KEYS)}: [" + ", ".join(items) + "]")
    elif kind == 1:  # deep nesting
        d = rng.choice([50, 70, 1000, 3000])
        lines.append(f"{rng.choice(_KEYS)}: " + "[" * d + "]" * d)
    elif kind == 2:  # random bytes inside
        b = bytearray("\n".join(lines + ["lr: 0.1"]).encode())
        for _ in range(rng.randint(1, 6)):
            b.insert(rng.randrange(len(b)), rng.randrange(256))
        return bytes(b)
    elif kind == 3:  # models themselves odd
        lines = ["models: " + rng.choice(["[]", "x", "[1, 2]", "[{path: [a]}]", "{a: b}", "[{path: /dev/zero}]", "&m [*m]"])]
    for _ in range(rng.randint(0, 6)):
        key = rng.choice(_KEYS)
        if key == "models":
            continue
        lines.append(f"{key}: {rng.choice(_SCALARS)}")
    if rng.random() < 0.1:
        lines.append(lines[-1])  # a key twice
    return ("\n".join(lines) + "\n").encode()


# ----------------------------------------------------------------------------- one case


def make_case(rng: random.Random, root: str, kind: str = None) -> Tuple[List[str], str]:
    """Write a case under ``root``; (ame-merge argv, kind)."""
    kind = kind or rng.choice(["header", "index", "yaml"])
    m0 = valid_model(rng, os.path.join(root, "m0"))
    m1 = os.path.join(root, "m1")
    os.makedirs(m1)
    if kind == "header":
        with open(os.path.join(m1, "model.safetensors"), "wb") as f:
            f.write(hostile_header(rng))
        cfg = f"models: [{m0}, {m1}]\noptimizer: adam\nepochs: 2\n".encode()
    elif kind == "index":
        text, files = hostile_index(rng)
        with open(os.path.join(m1, "model.safetensors.index.json"), "w") as f:
            f.write(text)
        for fname, data in files.items():
            with open(os.path.join(m1, fname), "wb") as f:
                f.write(data)
        cfg = f"models: [{m0}, {m1}]\n".encode()
    else:
        valid_model(rng, m1 + "_")
        os.rmdir(m1)
        os.rename(m1 + "_", m1)
        cfg = hostile_yaml(rng, [m0, m1])
    cfg_path = os.path.join(root, "merge.yaml")
    with open(cfg_path, "wb") as f:
        f.write(cfg)
    mode = rng.random()
    if mode < 0.1:
        return ["inspect", cfg_path], kind
    out = os.path.join(root, "out")
    if mode < 0.25:
        return [cfg_path, out, "--dry-run"], kind
    return [cfg_path, out, "--quiet", "--chunk-mb", rng.choice(["0.001", "64"])], kind


def problems(code, err: str, root: str, argv: List[str]) -> List[str]:
    """What is wrong with one outcome (empty when it is fine)."""
    bad = []
    if code not in (0, 1, 2):
        bad.append(f"exit {code}")
    if "Traceback" in err:
        bad.append("a traceback")
    stray = [ln for ln in err.splitlines() if "Warning" in ln and not ln.startswith("ame-merge:")]
    if stray:
        bad.append(f"a stray warning: {stray[0][:200]}")
    lines = [ln for ln in err.splitlines() if ln.startswith("ame-merge: error:")]
    if any(len(ln) > 2000 for ln in lines):
        bad.append(f"an error line of {max(len(ln) for ln in lines)} characters")
    if code != 0 and argv[0] != "inspect" and "--dry-run" not in argv:
        if os.path.lexists(os.path.join(root, "out")):
            bad.append("an output after a failure")
    hidden = [e for e in os.listdir(root) if e.startswith(".out.")]
    if hidden:
        bad.append(f"left behind: {hidden}")
    if code == 0 and argv[0] != "inspect" and "--dry-run" not in argv and not os.path.isdir(os.path.join(root, "out")):
        bad.append("exit 0 without an output")
    return bad


# ----------------------------------------------------------------------------- the long run


def _limit(mem_bytes: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))

    return apply


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=300, help="cases (default 300)")
    p.add_argument("--seed", type=int, default=0, help="first seed (case i uses seed + i)")
    p.add_argument("--timeout", type=float, default=60, help="seconds per case (default 60)")
    p.add_argument("--mem-gb", type=float, default=4, help="address-space limit per case (default 4 GB)")
    p.add_argument("--kind", choices=["header", "index", "yaml"], help="only this kind of case")
    a = p.parse_args(argv)
    counts, failures = {}, []
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.time()
    for i in range(a.n):
        seed = a.seed + i
        rng = random.Random(seed)
        with tempfile.TemporaryDirectory(prefix="ame-fuzz-") as root:
            args, kind = make_case(rng, root, a.kind)
            try:
                proc = subprocess.run([sys.executable, "-m", "ame_kernels", *args], cwd=root, env=env, capture_output=True,
                                      text=True, timeout=a.timeout, preexec_fn=_limit(int(a.mem_gb * 2**30)))
                code, err = proc.returncode, proc.stderr
                bad = problems(code, err, root, args)
            except subprocess.TimeoutExpired:
                code, err, bad = "timeout", "", [f"no answer in {a.timeout} s"]
            if "MemoryError" in err:
                bad.append("a MemoryError")
            counts[(kind, code)] = counts.get((kind, code), 0) + 1
            if bad:
                failures.append((seed, kind, args, bad, err.strip().splitlines()[-3:]))
    print(f"{a.n} cases in {time.time() - t0:.0f} s (seeds {a.seed}..{a.seed + a.n - 1})")
    for (kind, code), n in sorted(counts.items(), key=str):
        print(f"  {kind:6s} exit {code}: {n}")
    for seed, kind, args, bad, tail in failures:
        print(f"FAIL seed {seed} ({kind}, {' '.join(args[1:]) if args[0] == 'inspect' else ' '.join(args[2:])}): "
              f"{'; '.join(bad)}\n    " + "\n    ".join(tail))
    print(f"{len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
