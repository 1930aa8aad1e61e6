"""The cpu backend's DELLA rank kernel (csrc/cpu/rank.h) against ``della_probs`` (numpy), bitwise.

The kernel ranks |x - b| along dim 1 (a 1-D tensor: one row; dims after 1 kept apart) with
a stable radix sort and writes p = (rank / (cols - 1) * 2) * eps + (density - eps) in fp32.
Compared bit for bit with the numpy oracle on odd shapes (1-D, cols 1..4097, rest > 1),
every input and base dtype, no base, ties (quantized task vectors, zeros, -0, whole rows
equal), NaN / Inf (NaN after Inf, NaNs tied), densities and epsilons at their edges,
thread counts; the torch entry, the buffer entry and the ops the methods call; a
hypothesis property test; argument checks.
"""

import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ame_kernels.backends import available
from ame_kernels.backends.base import Backend
from ame_kernels.errors import MergeError
from ame_kernels.methods.task_vectors import della_probs, della_probs_torch

pytestmark = pytest.mark.skipif(not available()["cpu"][0], reason=f"cpu backend: {available()['cpu'][1]}")

if available()["cpu"][0]:
    from ame_kernels.backends.cpu import CpuBackend, della_probs_buffers

DT = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RAW = {"float32": torch.int32, "bfloat16": torch.int16, "float16": torch.int16}


# --------------------------------------------------------------------------- helpers


def oracle(x, b, shape, d, e):
    """della_probs on the fp32 magnitudes |x - b| (as the numpy path computes them)."""
    m = x.float() if b is None else x.float() - b.float()
    return della_probs(m.abs().numpy(), tuple(shape), d, e)


def native(x, b, shape, d, e, threads=2):
    """The kernel through the buffer entry (raw bits: bf16 as int16)."""
    xb = x.view(RAW[str(x.dtype)[6:]]).numpy()
    bb = None if b is None else b.view(RAW[str(b.dtype)[6:]]).numpy()
    return della_probs_buffers(xb, str(x.dtype)[6:], bb, None if b is None else str(b.dtype)[6:], tuple(shape), d, e,
                               threads=threads)


def assert_same_bits(got, ref, what=""):
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.dtype == np.float32 and ref.dtype == np.float32 and got.shape == ref.shape, what
    bad = np.flatnonzero(got.view(np.uint32) != ref.view(np.uint32))
    assert not len(bad), f"{what}: {len(bad)} of {got.size} differ; first at {bad[0]}: {got[bad[0]]!r} vs {ref[bad[0]]!r}"


def task_vectors(shape, dtype, base_dtype, gen, scale=1e-2):
    """An ingredient near a base (base None: the ingredient alone), both in their dtypes."""
    numel = int(np.prod(shape, dtype=np.int64))
    b = torch.randn(numel, generator=gen)
    x = (b + scale * torch.randn(numel, generator=gen)).to(DT[dtype])
    return x, None if base_dtype is None else b.to(DT[base_dtype])


SHAPES = [(1,), (2,), (7,), (5000,), (3, 1), (4, 2), (5, 3), (3, 4097), (2, 3, 5), (3, 4, 2, 2), (1, 2048),
          (40, 2048), (6, 257, 3)]


# --------------------------------------------------------------------------- bitwise vs numpy


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", list(DT))
@pytest.mark.parametrize("base_dtype", list(DT) + [None])
def test_matches_numpy(shape, dtype, base_dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, dtype, base_dtype)).encode()))
    x, b = task_vectors(shape, dtype, base_dtype, gen)
    assert_same_bits(native(x, b, shape, 0.4, 0.15), oracle(x, b, shape, 0.4, 0.15), f"{shape} {dtype} {base_dtype}")


@pytest.mark.parametrize("shape", [(8, 300), (3, 5, 4), (6000,), (2, 4097)], ids=str)
@pytest.mark.parametrize("levels", [1, 3, 40])
def test_ties(shape, levels):
    """Task vectors on a few levels (and many exact zeros, -0 among them): ties by index."""
    gen = torch.Generator().manual_seed(levels)
    numel = int(np.prod(shape))
    b = torch.randn(numel, generator=gen).to(torch.bfloat16)
    q = torch.randint(-levels, levels + 1, (numel,), generator=gen).float() / 8
    x = (b.float() + q).to(torch.bfloat16)
    x[::7] = b[::7]  # exact zeros
    assert_same_bits(native(x, b, shape, 0.5, 0.2), oracle(x, b, shape, 0.5, 0.2), "bf16 ties")
    z = q.clone()
    z[::3] = -0.0  # -0 ties with +0
    assert_same_bits(native(z, None, shape, 0.5, 0.2), oracle(z, None, shape, 0.5, 0.2), "signed zeros")


def test_whole_rows_equal():
    x = torch.full((5, 1000), 0.25)
    got = native(x, None, (5, 1000), 0.3, 0.1)
    assert_same_bits(got, oracle(x, None, (5, 1000), 0.3, 0.1), "constant rows")
    # ties by index: the probabilities rise along every row
    assert (np.diff(got.reshape(5, 1000), axis=1) > 0).all()


@pytest.mark.parametrize("dtype", list(DT))
def test_nan_inf(dtype):
    """NaN (any payload or sign, also Inf - Inf) ranks after +Inf, NaNs tied by index, as numpy sorts."""
    gen = torch.Generator().manual_seed(7)
    shape = (6, 333)
    x, b = task_vectors(shape, dtype, "float32", gen, scale=1.0)
    xf = x.float()
    xf[5::17] = float("nan")
    xf[3::29] = float("inf")
    xf[11::31] = -float("inf")
    xf[0:4] = -float("nan")
    x = xf.to(DT[dtype])
    if dtype == "float32":  # NaNs of other payloads
        raw = x.view(torch.int32)
        raw[100:110] = 0x7F800001
        raw[200:210] = -1  # 0xFFFFFFFF
    b = b.clone()
    b[3::58] = float("inf")  # inf - inf = NaN
    p = native(x, b, shape, 0.5, 0.25)
    assert_same_bits(p, oracle(x, b, shape, 0.5, 0.25), f"{dtype} NaN/Inf")
    assert_same_bits(native(x, None, shape, 0.5, 0.25), oracle(x, None, shape, 0.5, 0.25), f"{dtype} NaN/Inf no base")


@pytest.mark.parametrize("d,e", [(0.5, 0.0), (1e-6, 0.0), (0.5, 0.49999), (0.1, 0.09999999), (0.9, 0.09999999),
                                 (0.15, 0.15 - 1e-9), (0.3, 1e-8), (0.7, 0.15), (0.999999, 1e-7), (0.9999, 0.0)])
def test_density_epsilon_edges(d, e):
    gen = torch.Generator().manual_seed(3)
    for shape in [(4, 4097), (3, 1), (9,)]:
        x, b = task_vectors(shape, "bfloat16", "bfloat16", gen)
        assert_same_bits(native(x, b, shape, d, e), oracle(x, b, shape, d, e), f"{shape} d={d} e={e}")


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_threads(threads):
    gen = torch.Generator().manual_seed(11)
    shape = (97, 2048)  # several tasks of whole rows
    x, b = task_vectors(shape, "bfloat16", "bfloat16", gen)
    assert_same_bits(native(x, b, shape, 0.4, 0.1, threads), oracle(x, b, shape, 0.4, 0.1), f"threads={threads}")


def test_chunk_of_rows():
    """A chunk of whole rows gives that slice of the whole tensor's probabilities."""
    gen = torch.Generator().manual_seed(5)
    shape = (10, 3, 7)
    x, b = task_vectors(shape, "float16", "float32", gen)
    whole = native(x, b, shape, 0.4, 0.1)
    row = 3 * 7
    assert_same_bits(native(x[2 * row:7 * row], b[2 * row:7 * row], shape, 0.4, 0.1), whole[2 * row:7 * row], "chunk")


def test_empty():
    x = torch.zeros(0, dtype=torch.bfloat16)
    assert native(x, None, (0, 5), 0.4, 0.1).shape == (0,)
    assert native(x, x, (0,), 0.4, 0.1).shape == (0,)


# --------------------------------------------------------------------------- entry points the methods use


def test_backend_entries():
    """CpuBackend.della_probs (torch) = the default Backend's (numpy) = della_probs_torch (the oracle)."""
    gen = torch.Generator().manual_seed(2)
    shape = (12, 513)
    x, b = task_vectors(shape, "bfloat16", "float16", gen)
    got = CpuBackend().della_probs(x, b, shape, 0.35, 0.1)
    assert isinstance(got, torch.Tensor) and got.dtype == torch.float32
    ref = Backend.della_probs(CpuBackend(), x, b, shape, 0.35, 0.1)
    assert_same_bits(got.numpy(), ref.numpy(), "torch entry")
    tor = della_probs_torch((x.float() - b.float()).abs(), shape, 0.35, 0.1)
    assert_same_bits(got.numpy(), tor.numpy(), "della_probs_torch")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_torch_probs_are_numpys(shape):
    """della_probs_torch (what Backend.della_probs runs on a GPU: one stable argsort on the device)
    = della_probs (numpy), bitwise, with ties, zeros, NaN and Inf in the lines."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr(shape).encode()))
    x, b = task_vectors(shape, "bfloat16", "bfloat16", gen)
    m = (x.float() - b.float()).abs()
    n = m.numel()
    m[::5] = 0.0
    m[3::11] = float("nan")
    m[7::13] = float("inf")
    m[1::4] = m[0]
    for d, e in [(0.4, 0.15), (0.9, 0.1), (0.5, 0.0)]:
        ref = della_probs(m.numpy(), shape, d, e)
        got = della_probs_torch(m, shape, d, e)
        assert got.dtype == torch.float32 and got.shape == (n,)
        assert_same_bits(got.numpy(), ref, f"{shape} d={d} e={e}")


def test_ops():
    """The ops the methods call: BufferOps (the engine's cpu path) and TorchOps on cpu and reference."""
    from ame_kernels.backends import get_backend
    from ame_kernels.methods.run import BufferOps, TorchOps

    gen = torch.Generator().manual_seed(4)
    shape = (7, 129, 2)
    x, b = task_vectors(shape, "bfloat16", "bfloat16", gen)
    ref = oracle(x, b, shape, 0.4, 0.2)
    buf = BufferOps(2).della_probs((x.view(torch.int16).numpy(), "bfloat16"), (b.view(torch.int16).numpy(), "bfloat16"),
                                   shape, 0.4, 0.2)
    assert_same_bits(buf, ref, "BufferOps")
    for name in ("cpu", "reference"):
        t = TorchOps(get_backend(name, "cpu"), 2).della_probs(x, b, shape, 0.4, 0.2)
        assert_same_bits(t.numpy(), ref, f"TorchOps({name})")


def test_argument_checks():
    x = torch.zeros(10)
    with pytest.raises(MergeError, match="whole number of rows"):
        CpuBackend().della_probs(x, None, (3, 4), 0.4, 0.1)  # 10 elements are not rows of 4
    with pytest.raises(MergeError, match="base"):
        CpuBackend().della_probs(x, torch.zeros(9), (10,), 0.4, 0.1)
    with pytest.raises(MergeError, match="dtype"):
        della_probs_buffers(x.numpy(), "int8", None, None, (10,), 0.4, 0.1)


# --------------------------------------------------------------------------- property


VALUES = [0.0, -0.0, 1e-3, -1e-3, 2e-3, 0.5, -0.5, 1e-40, float("inf"), -float("inf"), float("nan"), 3.0]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 4), cols=st.integers(1, 300), rest=st.integers(1, 3), ndim=st.sampled_from([1, 2, 3]),
    dtype=st.sampled_from(list(DT)), base=st.sampled_from(list(DT) + [None]),
    d=st.floats(0.02, 0.98), frac=st.floats(0.0, 0.999), seed=st.integers(0, 2**31 - 1),
    tied=st.booleans(), threads=st.integers(1, 4),
)
def test_property(rows, cols, rest, ndim, dtype, base, d, frac, seed, tied, threads):
    shape = (rows * cols * rest,) if ndim == 1 else (rows, cols) if ndim == 2 else (rows, cols, rest)
    numel = int(np.prod(shape))
    e = min(d, 1 - d) * frac
    gen = torch.Generator().manual_seed(seed)
    if tied:  # a few values, signed zeros, denormals, Inf and NaN: many ties
        idx = torch.randint(0, len(VALUES), (numel,), generator=gen)
        x = torch.tensor(VALUES)[idx].to(DT[dtype])
        b = None if base is None else torch.tensor(VALUES)[torch.randint(0, 6, (numel,), generator=gen)].to(DT[base])
    else:
        x, b = task_vectors(shape, dtype, base, gen)
    assert_same_bits(native(x, b, shape, d, e, threads), oracle(x, b, shape, d, e), f"{shape} {dtype} {base}")


@pytest.mark.parametrize("cols", [64, 65, 100, 2048, 5632, 65536, 65537])
def test_keys_alike_in_their_high_bits(cols):
    """Magnitudes that differ only in their low bits (1 + k 2^-23: one varying key byte, the others
    skipped) and ordinary bf16 task vectors (every byte varies), across line widths: the same bits
    as numpy."""
    gen = torch.Generator().manual_seed(cols)
    m = 1.0 + torch.randint(0, 2**10, (2, cols), generator=gen).float() * 2**-23
    x = m * torch.where(torch.rand(2, cols, generator=gen) < 0.5, -1.0, 1.0)
    assert_same_bits(native(x, None, (2, cols), 0.4, 0.15), oracle(x, None, (2, cols), 0.4, 0.15), f"cols {cols}")
    # and ordinary bf16 task vectors of the same widths
    xb, bb = task_vectors((3, cols), "bfloat16", "bfloat16", gen)
    assert_same_bits(native(xb, bb, (3, cols), 0.3, 0.1), oracle(xb, bb, (3, cols), 0.3, 0.1), f"bf16 cols {cols}")


@pytest.mark.parametrize("low_bits", [16, 8])
@pytest.mark.parametrize("frac", [0.0, 0.005, 1 / 64, 1 / 64 + 0.002, 0.05, 0.5])
@pytest.mark.parametrize("cols", [64, 2048, 5632])
def test_keys_compressed_and_runs_resorted(low_bits, frac, cols):
    """Keys with their low 16 (or 8) bits zero, a fraction of them moved by a few units in those
    bits (the kernel compresses the key to its high bits when at most cols / 64 keys have low bits,
    then re-sorts each run of one compressed key that holds such a key): ties among the zero-low
    keys, low keys on both sides of their run and equal to each other; the same bits as numpy on
    each side of the cols / 64 budget."""
    gen = torch.Generator().manual_seed(low_bits * 1000 + cols + int(frac * 1e4))
    rows = 3
    m = torch.rand(rows, cols, generator=gen) * 4 + 0.01
    k = m.view(torch.int32) & ~((1 << low_bits) - 1)
    k = k & ~(((1 << 4) - 1) << low_bits)  # few distinct high keys: long runs of one compressed key
    hit = torch.rand(rows, cols, generator=gen) < frac
    step = torch.randint(-3, 4, (rows, cols), generator=gen, dtype=torch.int32)
    k = torch.where(hit, k + step + 4, k)  # +1..+7 in the low bits, some equal to each other
    x = k.view(torch.float32) * torch.where(torch.rand(rows, cols, generator=gen) < 0.5, -1.0, 1.0)
    x[:, ::13] = 0.0
    shape = (rows, cols)
    assert_same_bits(native(x, None, shape, 0.4, 0.15), oracle(x, None, shape, 0.4, 0.15), f"low{low_bits} {frac}")
    # and as a base + an ingredient that differ by those magnitudes
    b = torch.randn(rows, cols, generator=gen)
    assert_same_bits(native(b + x, b, shape, 0.3, 0.1), oracle(b + x, b, shape, 0.3, 0.1), "with a base")


def test_out_buffer():
    """della_probs_buffers(out=...) writes the given array (the engine reuses one per slot) and
    checks it; the engine's BufferOps gives each slot's call the same bits as a fresh array."""
    from ame_kernels.methods.run import BufferOps

    gen = torch.Generator().manual_seed(9)
    shape = (5, 300)
    x, b = task_vectors(shape, "bfloat16", "bfloat16", gen)
    xb, bb = x.view(torch.int16).numpy(), b.view(torch.int16).numpy()
    out = np.full(1500, np.nan, dtype=np.float32)
    got = della_probs_buffers(xb, "bfloat16", bb, "bfloat16", shape, 0.4, 0.1, out=out)
    assert got is out
    assert_same_bits(out, oracle(x, b, shape, 0.4, 0.1), "out=")
    for bad in (np.zeros(1499, np.float32), np.zeros(1500, np.float64), np.zeros(3000, np.float32)[::2]):
        with pytest.raises(MergeError, match="out"):
            della_probs_buffers(xb, "bfloat16", bb, "bfloat16", shape, 0.4, 0.1, out=bad)
    ops = BufferOps(2)
    first = ops.della_probs((xb, "bfloat16"), (bb, "bfloat16"), shape, 0.4, 0.1, slot=0)
    assert_same_bits(first, oracle(x, b, shape, 0.4, 0.1), "slot 0")
    x2, b2 = task_vectors((2, 300), "bfloat16", "bfloat16", gen)  # a smaller chunk reuses the buffer
    second = ops.della_probs((x2.view(torch.int16).numpy(), "bfloat16"), (b2.view(torch.int16).numpy(), "bfloat16"),
                             (2, 300), 0.4, 0.1, slot=0)
    assert np.shares_memory(first, second) and second.shape == (600,)
    assert_same_bits(second, oracle(x2, b2, (2, 300), 0.4, 0.1), "slot 0 reused")
