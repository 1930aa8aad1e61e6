"""DELLA's keep bits without the probabilities (``cpu.della_masks_buffers``, csrc/cpu/rank.h
della_masks) against the definition, bit for bit: philox_uniform(seed, key, i, offset + j) <
della_probs' p_j, packed as the kernels' keep masks (bit j % 8 of byte j / 8).

The kernel decides most entries from per-line bucket counts and ranks only the few left open,
falling back to the sort for clustered lines; these tests reach every branch: odd widths (lines
that do not start on a byte), zeros (exact ranks by index), whole lines equal, ties, NaN / Inf,
clustered magnitudes (the fallback), every SIMD level and thread count, offsets off a Philox
counter, and the engine path (BufferOps, chunked tensors) against the probabilities path.
"""

import zlib

import numpy as np
import pytest
import torch

import ame_kernels
from ame_kernels.backends import available
from ame_kernels.errors import MergeError
from ame_kernels.methods.combine import name_key, philox_uniform
from ame_kernels.methods.task_vectors import della_probs
from test_cpu_rank import task_vectors

pytestmark = pytest.mark.skipif(not available()["cpu"][0], reason=f"cpu backend: {available()['cpu'][1]}")

if available()["cpu"][0]:
    from ame_kernels.backends.cpu import della_masks_buffers

    LEVELS = ame_kernels.build_info()["simd_supported"]
else:
    LEVELS = ["scalar"]

DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RAW = {"float32": torch.int32, "bfloat16": torch.int16, "float16": torch.int16}


def oracle_bits(x, b, shape, d, e, seed, key, i, offset):
    m = x.float() if b is None else x.float() - b.float()
    p = torch.from_numpy(della_probs(m.abs().numpy(), tuple(shape), d, e))
    g = torch.arange(offset, offset + x.numel(), dtype=torch.int64)
    keep = (philox_uniform(seed, key, i, g) < p).numpy()
    return np.packbits(keep, bitorder="little")


def native_bits(x, b, shape, d, e, seed, key, i, offset, threads=2, simd="auto"):
    xb = x.view(RAW[str(x.dtype)[6:]]).numpy()
    bb = None if b is None else b.view(RAW[str(b.dtype)[6:]]).numpy()
    return della_masks_buffers(xb, str(x.dtype)[6:], bb, None if b is None else str(b.dtype)[6:], tuple(shape), d, e,
                               seed, key, i, offset, threads=threads, simd=simd)


def assert_same_bits(got, ref, n, what):
    got, ref = np.unpackbits(got, bitorder="little")[:n], np.unpackbits(ref, bitorder="little")[:n]
    bad = np.flatnonzero(got != ref)
    assert not len(bad), f"{what}: {len(bad)} of {n} bits differ; first at {bad[0]}"


SHAPES = [(1,), (7,), (5000,), (3, 1), (5, 3), (4, 13), (3, 4097), (1, 2048), (40, 2048), (9, 5632), (6, 100), (2, 16),
          (17, 24)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype,base_dtype", [("bfloat16", "bfloat16"), ("float16", "float32"), ("float32", None),
                                              ("bfloat16", None), ("float32", "float16")])
def test_matches_definition(shape, dtype, base_dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype, base_dtype)).encode()))
    x, b = task_vectors(shape, dtype, base_dtype, gen)
    n = x.numel()
    key = name_key("model.layers.0.w")
    for level in LEVELS:
        got = native_bits(x, b, shape, 0.4, 0.15, 5, key, 2, 0, simd=level)
        assert_same_bits(got, oracle_bits(x, b, shape, 0.4, 0.15, 5, key, 2, 0), n, f"{shape} {dtype} {base_dtype} {level}")


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_offsets_seeds_threads(level, threads):
    """A chunk's global offset (off a Philox counter and past 2^32), seeds, ingredients, threads."""
    gen = torch.Generator().manual_seed(threads)
    shape = (33, 200)
    x, b = task_vectors(shape, "bfloat16", "bfloat16", gen)
    for seed, i, offset in [(0, 0, 0), (2**40 + 3, 1, 3), (7, 5, 2**32 + 1), (1, 3, 123456789)]:
        got = native_bits(x, b, shape, 0.5, 0.2, seed, 77, i, offset, threads=threads, simd=level)
        assert_same_bits(got, oracle_bits(x, b, shape, 0.5, 0.2, seed, 77, i, offset), x.numel(), f"{seed} {i} {offset}")


@pytest.mark.parametrize("level", LEVELS)
def test_zeros_ties_and_clusters(level):
    """Many exact zeros (ranked by index), quantized task vectors (ties), whole lines equal, lines
    whose magnitudes sit in a few buckets (more open entries than the kernel resolves: the sort)."""
    gen = torch.Generator().manual_seed(3)
    shape = (12, 1000)
    b = torch.randn(12000, generator=gen).to(torch.bfloat16)
    q = torch.randint(-3, 4, (12000,), generator=gen).float() / 64
    x = (b.float() + q).to(torch.bfloat16)
    x[::3] = b[::3]  # a third of the entries zero
    x[5000:6000] = b[5000:6000]  # a whole line of zeros
    tight = 1.0 + torch.randint(0, 2**12, (2000,), generator=gen).float() * 2**-23  # one bucket's worth
    xf = x.float()
    xf[8000:10000] = b[8000:10000].float() + tight  # two clustered lines
    xt = xf.to(torch.float32)
    bt = b.float()
    for xx, bb, what in [(x, b, "zeros/ties"), (xt, bt, "clustered")]:
        for d, e in [(0.5, 0.2), (0.3, 0.1), (0.9, 0.09), (0.5, 0.0)]:
            got = native_bits(xx, bb, shape, d, e, 11, 9, 1, 64, simd=level)
            assert_same_bits(got, oracle_bits(xx, bb, shape, d, e, 11, 9, 1, 64), 12000, f"{what} d={d} e={e}")
    const = torch.full((4, 300), 0.25)
    got = native_bits(const, None, (4, 300), 0.4, 0.3, 1, 2, 0, 0, simd=level)
    assert_same_bits(got, oracle_bits(const, None, (4, 300), 0.4, 0.3, 1, 2, 0, 0), 1200, "constant lines")


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_fine_tune_ties(level, dtype):
    """Task vectors of fine-tunes in bf16 / fp16: a few hundred distinct magnitudes per line, each
    many times (the tie pass ranks the entries at a bucket's smallest key by index), a few keys with
    low bits (decided by the bounds, the open ones exactly), and a line whose one big tie group
    shares its bucket with many such keys (too many open: the sort)."""
    gen = torch.Generator().manual_seed(17 + len(dtype))
    rows, cols = 24, 2048
    b = (0.02 * torch.randn(rows * cols, generator=gen)).to(DT[dtype])
    for rel in (0.1, 0.03, 0.01, 0.003):
        x = (b.float() + rel * 0.02 * torch.randn(rows * cols, generator=gen)).to(DT[dtype])
        for d, e in [(0.3, 0.1), (0.5, 0.5), (0.9, 0.1), (0.2, 0.01)]:
            got = native_bits(x, b, (rows, cols), d, e, 4, 5, 2, 96, simd=level)
            assert_same_bits(got, oracle_bits(x, b, (rows, cols), d, e, 4, 5, 2, 96), rows * cols,
                             f"{dtype} rel={rel} d={d} e={e}")
    # magnitudes over more binades than one bucket per bf16 step can cover (weights near zero): the
    # top steps get a bucket each, bucket 1 takes every smaller magnitude (ranked by the bounds)
    wide = b.float() * torch.exp2(torch.randint(-24, 1, (rows * cols,), generator=gen).float())
    wide = wide.to(DT[dtype]).float()
    xw = (wide + 0.05 * wide.abs() * torch.randn(rows * cols, generator=gen)).to(DT[dtype])
    for d, e in [(0.3, 0.1), (0.5, 0.45)]:
        got = native_bits(xw, wide, (rows, cols), d, e, 8, 9, 1, 0, simd=level)
        assert_same_bits(got, oracle_bits(xw, wide, (rows, cols), d, e, 8, 9, 1, 0), rows * cols, f"wide d={d}")
    xf = b.float() + 2.0**-10  # one magnitude per line (as fp32 keys: one tie group) ...
    low = torch.randperm(cols, generator=gen)[:30]
    for r in range(rows):  # ... and 30 keys just above it (bits below 2^16 of the key), in its bucket
        xf[r * cols + low] += (r + 1) * 2.0**-24
    bf = b.float()
    for d, e in [(0.5, 0.4), (0.3, 0.1)]:
        got = native_bits(xf, bf, (rows, cols), d, e, 6, 7, 0, 0, simd=level)
        assert_same_bits(got, oracle_bits(xf, bf, (rows, cols), d, e, 6, 7, 0, 0), rows * cols, f"tie group d={d}")


@pytest.mark.parametrize("level", LEVELS)
def test_nan_inf(level):
    gen = torch.Generator().manual_seed(7)
    shape = (6, 333)
    x, b = task_vectors(shape, "float32", "float32", gen, scale=1.0)
    x[5::17] = float("nan")
    raw = x.view(torch.int32)  # NaNs of other payloads and signs: every NaN is one key, ranked by index
    raw[7::23] = 0x7F800001
    raw[9::37] = int(np.int32(np.uint32(0xFFC01234)))
    raw[13::41] = 0x7FFFFFFF
    x[3::29] = float("inf")
    x[11::31] = -float("inf")
    b[3::58] = float("inf")
    got = native_bits(x, b, shape, 0.5, 0.25, 3, 4, 0, 8, simd=level)
    assert_same_bits(got, oracle_bits(x, b, shape, 0.5, 0.25, 3, 4, 0, 8), x.numel(), "NaN/Inf")


def test_argument_checks():
    x = torch.zeros(12).view(torch.int32).numpy()
    with pytest.raises(MergeError, match="contiguous"):
        della_masks_buffers(x, "float32", None, None, (2, 3, 2), 0.4, 0.1, 0, 0, 0)  # dims after dim 1
    with pytest.raises(MergeError, match="out"):
        della_masks_buffers(x, "float32", None, None, (3, 4), 0.4, 0.1, 0, 0, 0, out=np.zeros(1, np.uint8))
    with pytest.raises(MergeError, match="seed"):
        della_masks_buffers(x, "float32", None, None, (3, 4), 0.4, 0.1, -1, 0, 0)
    with pytest.raises(MergeError, match="whole number of rows"):
        della_masks_buffers(x[:10], "float32", None, None, (3, 4), 0.4, 0.1, 0, 0, 0)


def test_engine_takes_the_bits_and_matches_the_probabilities(tmp_path, monkeypatch):
    """The checkpoint engine's della on the cpu backend (BufferOps: keep bits, then the L1 sums and
    the combine read them) writes the same bytes as with the probabilities path, chunked or not;
    and it does take the bits path (della_bits called, della_probs not)."""
    import os

    from safetensors.torch import load_file, save_file

    from ame_kernels.engine import merge_checkpoints
    from ame_kernels.methods.run import BufferOps

    torch.manual_seed(0)
    base = {"w": torch.randn(300, 70).to(torch.bfloat16), "v": torch.randn(5, 9).half(), "e": torch.randn(4097)}
    paths = []
    for i in range(3):
        sd = {k: (v.float() + 0.05 * torch.randn(v.shape)).to(v.dtype) for k, v in base.items()}
        os.makedirs(tmp_path / f"m{i}")
        save_file(sd, str(tmp_path / f"m{i}" / "model.safetensors"))
        paths.append(str(tmp_path / f"m{i}"))
    os.makedirs(tmp_path / "base")
    save_file(base, str(tmp_path / "base" / "model.safetensors"))
    calls = {"bits": [], "probs": []}
    real_bits, real_probs = BufferOps.della_bits, BufferOps.della_probs

    def count(kind, real):
        def f(self, x, b, shape, *a, **k):
            calls[kind].append((tuple(shape), self.length(x), a[-2:] if kind == "bits" else ()))
            return real(self, x, b, shape, *a, **k)
        return f

    outs = {}
    for bits in (True, False):
        monkeypatch.setattr(BufferOps, "draws_bits", bits)
        monkeypatch.setattr(BufferOps, "della_bits", count("bits", real_bits))
        monkeypatch.setattr(BufferOps, "della_probs", count("probs", real_probs))
        for chunk in (None, 0.02):  # MB: chunks of 4096 elements
            out = tmp_path / f"out-{bits}-{chunk}"
            kw = {"chunk_mb": chunk} if chunk else {}
            calls["bits"].clear()
            merge_checkpoints(paths, str(out), method="della", base=str(tmp_path / "base"), density=0.4, epsilon=0.15,
                              seed=3, backend="cpu", **kw)
            outs[(bits, chunk)] = load_file(str(out / "model.safetensors"))
            if bits:  # every (tensor, chunk, ingredient) decided once: a chunked tensor's combine reuses them
                assert calls["bits"] and not calls["probs"], calls
                assert len(set(calls["bits"])) == len(calls["bits"]), calls["bits"]
                if chunk:
                    assert sum(s == (300, 70) for s, _, _ in calls["bits"]) > 3  # "w" came in several chunks
    ref = outs[(False, None)]
    for k, sd in outs.items():
        for name in ref:
            assert torch.equal(sd[name].view(torch.uint8), ref[name].view(torch.uint8)), (k, name)


@pytest.mark.parametrize("shape,expect", [((70, 2048), True), ((130, 5632), True), ((3, 100), True), ((5000,), True),
                                          ((300, 24), True), ((2, 4097), True), ((40, 5632), True),
                                          ((1030, 4099), False)],
                         ids=lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else str(v))
@pytest.mark.parametrize("level", LEVELS)
def test_l1_sums_are_kept_l1s(shape, expect, level):
    """sums=True: the (sum |tau|, sum over kept |tau|) of the bits, bitwise what kept_l1_buffers sums
    with them as masks_in (its tasks of 65536 entries, lane j % 16, lanes then tasks in order), on
    lines that tile those tasks (2048: 32 lines per task; 5632: 128 lines per 11 tasks; 100 and 24:
    lines off the 16 lanes), a chunk small enough for one task whatever its rows (5000, 2 x 4097);
    rows that cannot tile them in a reasonable task, on a larger chunk (1030 x 4099), give None."""
    from ame_kernels.backends.cpu import kept_l1_buffers
    from ame_kernels.methods.combine import CombinePlan

    gen = torch.Generator().manual_seed(sum(shape))
    x, b = task_vectors(shape, "bfloat16", "bfloat16", gen)
    x[::11] = b[::11]  # zeros
    # and fp32 magnitudes over 2^-40 .. 2^20 with full mantissas: their float64 sums round, so a
    # different order of the additions would show
    numel = x.numel()
    wide = torch.randn(numel, generator=gen) * torch.exp2(torch.randint(-40, 21, (numel,), generator=gen).float())
    plan = CombinePlan(1, weight=[1.0], seed=4, name_key=99)
    for (xx, bx), offset in [((x, b), 0), ((x, b), 12345), ((wide, None), 7)]:
        dt = str(xx.dtype)[6:]
        xb = xx.view(RAW[dt]).numpy()
        bb = None if bx is None else bx.view(torch.int16).numpy()
        bd = None if bx is None else "bfloat16"
        bits, l1 = della_masks_buffers(xb, dt, bb, bd, shape, 0.4, 0.1, 4, 99, 0, offset, threads=2, simd=level,
                                       sums=True)
        if not expect:  # (the bits of such lines: test_matches_definition)
            assert l1 is None
            continue
        assert_same_bits(bits, oracle_bits(xx, bx, shape, 0.4, 0.1, 4, 99, 0, offset), numel, f"{shape} bits")
        ref = kept_l1_buffers([xb], [dt], bb, bd, plan, offset, threads=2, masks_in=[bits])
        assert l1.dtype == np.float64 and l1.shape == (2,)
        assert l1.tobytes() == ref[0].tobytes(), (shape, offset, l1, ref[0])
