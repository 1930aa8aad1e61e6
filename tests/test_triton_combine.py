"""Triton combine kernel (backends/triton/combine.py) against the oracle ``combine_torch``, bit for bit.

The combine pass (``ame_kernels.methods.combine``) is exact fp32 arithmetic in a fixed
order, so the kernel must reproduce the oracle's output bits: every case here compares
raw bits, not values within a tolerance.

Without a CUDA device the kernel runs under the Triton interpreter on CPU tensors, with
the interpreter handling of tests/test_triton.py: the variable is set while this module
imports the kernel and while its tests run, and restored after; if triton was already
imported without it, the tests skip and ``test_interpreter_in_subprocess`` reruns this
file in a child with TRITON_INTERPRET=1. The interpreter is slow (Philox is 10 rounds of
numpy ops per block), so the cases are few and small: sizes 1, 7, 33, 1000 and 4099 (five
programs of the interpreter's BLOCK of 1024), N = 1..8 spread over the cases.
GPU-only tests (large sizes) skip without CUDA.
"""

import importlib.util

import numpy as np
import pytest
import torch

from ame_kernels.errors import MergeError
from ame_kernels.methods.combine import ELECT_COUNT, ELECT_NONE, ELECT_SUM, combine_torch
from combine_cases import BF16, CASES, F16, F32, assert_bitwise, make_case
from triton_interpreter import CUDA, DEVICE, import_kernels, module_fixtures, rerun_in_child, too_late

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

_TOO_LATE = too_late()
KERNELS = import_kernels(("combine",), _TOO_LATE)
_interpreter, _in_process = module_fixtures(_TOO_LATE)

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (CI runs the kernel under TRITON_INTERPRET=1)")


@pytest.fixture(scope="module")
def triton_backend():
    from ame_kernels.backends.triton import TritonBackend

    return TritonBackend()


@pytest.mark.skipif(not _TOO_LATE, reason="the kernel runs in this process")
def test_interpreter_in_subprocess():
    rerun_in_child(__file__)


# --------------------------------------------------------------------------- helpers


def _case(*args, **kw):
    return make_case(*args, device=DEVICE, **kw)


def _check(xs, b, plan, out_dtype, offset=0, probs=None, what=""):
    fn = KERNELS["combine"].combine
    got = torch.full((xs[0].numel(),), float("nan"), dtype=out_dtype, device=xs[0].device)
    fn(xs, b, got, plan, offset, probs)
    want = torch.empty(xs[0].numel(), dtype=out_dtype)
    combine_torch([x.cpu() for x in xs], None if b is None else b.cpu(), want, plan, offset,
                  None if probs is None else [None if p is None else p.cpu() for p in probs])
    assert_bitwise(got, want, what)
    return got


# --------------------------------------------------------------------------- cases

@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_combine_bitwise_equals_oracle(case):
    name, n, size, dts, out_dtype, opts = case
    offset = opts.get("offset", 0)
    xs, b, plan, probs = _case(n, size, dts, out_dtype, **opts)
    _check(xs, b, plan, out_dtype, offset, probs, name)


@pytest.mark.parametrize("out_dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("elect", [ELECT_NONE, ELECT_SUM, ELECT_COUNT], ids=["none", "sum", "count"])
def test_every_option_at_once(elect, out_dtype):
    """N = 8 mixed dtypes, a tied window, densities, per-element probs and inv_prob, past 2^32."""
    offset = (1 << 32) - 3000
    xs, b, plan, probs = _case(8, 4099, [BF16, F32, F16], out_dtype, elect=elect, normalize=elect != ELECT_COUNT,
                               inv_prob=True, density=[0.3, 1.0, 0.6, 0.9] * 2, probs=True, window=(17, 3000),
                               ties=True, offset=offset, base_dtype=F16)
    _check(xs, b, plan, out_dtype, offset, probs, f"elect={elect}")


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("elect", [ELECT_NONE, ELECT_SUM, ELECT_COUNT], ids=["none", "sum", "count"])
def test_nonfinite_inputs_follow_the_oracle(elect):
    """NaN deltas fail every window test (dropped); infinite ones vote; sign(NaN) = 0 as torch's."""
    xs, b, plan, _ = _case(3, 33, [F32], BF16, elect=elect, normalize=True, density=[1.0, 0.5, 1.0])
    xs[0][3], xs[1][3], xs[2][3] = float("nan"), float("inf"), float("-inf")
    xs[0][5], xs[1][6] = float("inf"), float("nan")
    plan.weight[2] = 0.0  # 0 * inf: a NaN y
    _check(xs, b, plan, BF16, 0, None, f"nonfinite elect={elect}")


def test_more_than_32_ingredients_recompute_their_keep(elect=ELECT_SUM):
    """Keep bits carry ingredients 0..31 to the second elect pass; the rest recompute (window, draw)."""
    n = 66
    xs, b, plan, _ = _case(n, 7, [BF16], BF16, elect=elect, normalize=True, density=np.linspace(0.2, 1.0, n),
                           window=(1, 6), weights=np.linspace(-1.0, 1.5, n))
    _check(xs, b, plan, BF16, 0, None, f"n={n}")


def test_random_mask_matches_the_oracle_philox_stream():
    """DARE alone with unit weights and lam: out = b + keep * tau, so the bits are the Philox mask."""
    n, size = 2, 1000
    xs, b, plan, _ = _case(n, size, [F32], F32, density=0.5, weights=[1.0, 1.0], lam=1.0)
    plan.scale[:] = 1.0
    got = _check(xs, b, plan, F32, offset=(1 << 32) - 500, what="dare mask")
    kept = (got.cpu() != b.cpu()).float().mean().item()
    assert 0.4 < kept < 0.9  # two draws of 0.5: about 3/4 of the elements move


@pytest.mark.parametrize("offset", [1, 2, 3, 5, (1 << 34) - 1, (1 << 34) + 2])
@pytest.mark.parametrize("size", [1, 2, 3, 4, 7, 1029])
def test_offsets_off_a_philox_counter(offset, size):
    """The kernel's blocks start on a Philox counter (4 elements): a chunk at offset mod 4 != 0 has its
    first 1-3 elements from the oracle and the rest from the kernel; every size, bitwise the oracle."""
    xs, b, plan, probs = _case(3, size, [BF16, F32], BF16, density=[0.4, 1.0, 0.7], elect=ELECT_SUM,
                               normalize=True, probs=True)
    _check(xs, b, plan, BF16, offset, probs, f"offset {offset} size {size}")


def test_chunks_with_offsets_equal_one_call():
    """Masks and windows use global indices: combining [0, k) and [k, C) with offset k is the whole."""
    size, k = 1000, 389
    xs, b, plan, probs = _case(3, size, [BF16], BF16, density=[0.4, 1.0, 0.8], inv_prob=True,
                               elect=ELECT_SUM, normalize=True, window=(10, 600), probs=True)
    fn = KERNELS["combine"].combine
    whole = torch.empty(size, dtype=BF16, device=xs[0].device)
    fn(xs, b, whole, plan, 0, probs)
    parts = torch.empty_like(whole)
    for lo, hi in ((0, k), (k, size)):
        fn([x[lo:hi] for x in xs], b[lo:hi], parts[lo:hi], plan, lo,
           [None if p is None else p[lo:hi] for p in probs])
    assert_bitwise(parts, whole, "chunked")


def test_unaligned_views_take_the_scalar_path():
    xs, b, plan, _ = _case(2, 34, [BF16], BF16, density=0.5, elect=ELECT_COUNT)
    xs = [x[1:] for x in xs]  # 2-byte offset: not 16-byte aligned
    _check(xs, b[1:], plan, BF16, what="unaligned")


def test_triton_backend_combine_and_empty_chunk(triton_backend):
    xs, b, plan, probs = _case(2, 7, [F16], BF16, elect=ELECT_SUM, probs=True, density=0.5)
    got = torch.empty(7, dtype=BF16, device=xs[0].device)
    triton_backend.combine(xs, b, got, plan, offset=5, probs=probs)
    want = torch.empty(7, dtype=BF16)
    combine_torch([x.cpu() for x in xs], b.cpu(), want, plan, 5, [None if p is None else p.cpu() for p in probs])
    assert_bitwise(got, want, "backend")
    empty = torch.empty(0, dtype=BF16, device=xs[0].device)
    triton_backend.combine([x[:0] for x in xs], b[:0], empty, plan)


def test_bad_arguments_raise_naming_function_and_argument():
    fn = KERNELS["combine"].combine
    xs, b, plan, _ = _case(2, 7, [F32], F32)
    out = torch.empty(7, device=xs[0].device)
    with pytest.raises(MergeError, match="triton.combine: inputs has 1 tensors"):
        fn(xs[:1], b, out, plan)
    with pytest.raises(MergeError, match=r"probs\[0\] has dtype torch.bfloat16"):
        fn(xs, b, out, plan, 0, [xs[0].to(BF16), None])
    with pytest.raises(MergeError, match="probs has 1 entries"):
        fn(xs, b, out, plan, 0, [None])
    with pytest.raises(MergeError, match=r"base\[0\] has 6 elements"):
        fn(xs, b[:6], out, plan)
    with pytest.raises(MergeError, match="offset"):
        fn(xs, b, out, plan, -1)
    with pytest.raises(MergeError, match="plan must be a CombinePlan"):
        fn(xs, b, out, None)


def test_autotune_key_names_every_constexpr_but_block():
    """As tests/test_triton.py's: a constexpr missing from the key would reuse another variant's config."""
    import inspect

    mod = KERNELS["combine"]
    tuner = mod._combine_kernel
    params = inspect.signature(tuner.fn.fn).parameters.values()
    constexprs = {p.name for p in params if "constexpr" in str(p.annotation)}
    assert "ELECT" in constexprs, constexprs  # the annotation was read
    assert set(tuner.keys) >= constexprs - {"BLOCK"}, sorted(constexprs - {"BLOCK"} - set(tuner.keys))
    assert "BLOCK" not in tuner.keys and {"C_LOG2", "N"} <= set(tuner.keys)
    assert mod.FP_FUSION is False  # the oracle's separate multiply and add, never an FMA


def test_elect_none_divisor_is_the_fp32_sum_in_order():
    mod = KERNELS["combine"]
    assert mod.elect_none_divisor(np.array([0.1, 0.2, 0.3], dtype=np.float32)) == float(
        np.float32(np.float32(np.float32(0.1) + np.float32(0.2)) + np.float32(0.3)))
    assert mod.elect_none_divisor(np.array([1.0, -1.0], dtype=np.float32)) == 1.0
    assert mod.elect_none_divisor(np.array([5e-9], dtype=np.float32)) == 1.0


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("elect", [ELECT_NONE, ELECT_SUM, ELECT_COUNT])
def test_gpu_large_bitwise(elect):
    size = (1 << 22) + 3
    xs, b, plan, probs = _case(8, size, [BF16, F32], BF16, elect=elect, normalize=True, inv_prob=True,
                               density=[0.3, 1.0] * 4, probs=True, window=(1000, size // 2), offset=(1 << 32) - size // 2)
    _check(xs, b, plan, BF16, (1 << 32) - size // 2, probs, f"gpu elect={elect}")


# --------------------------------------------------------------------------- the transform pass


def _check_transform(xs, b, plan, offset=0, what=""):
    """The SPLIT kernel's per-ingredient fp32 outputs against transform_torch, bit for bit."""
    from ame_kernels.methods.transforms import transform_torch

    c = xs[0].numel()
    got = [torch.full((c,), float("nan"), dtype=F32, device=xs[0].device) for _ in xs]
    KERNELS["combine"].transform(xs, b, got, plan, offset)
    want = [torch.empty(c, dtype=F32) for _ in xs]
    transform_torch([x.cpu() for x in xs], None if b is None else b.cpu(), want, plan, offset)
    for i, (g, w) in enumerate(zip(got, want)):
        assert_bitwise(g, w, f"{what}: ingredient {i}")


@pytest.mark.parametrize("elect", [ELECT_NONE, ELECT_SUM, ELECT_COUNT], ids=["none", "sum", "count"])
@pytest.mark.parametrize("offset", [0, 3, (1 << 32) - 1029])
def test_transform_bitwise_equals_the_oracle(elect, offset):
    """DARE / TIES / breadcrumbs-style plans (draws, a tied window, inv_prob) at unit weights, mixed
    input dtypes, offsets on and off a Philox counter: each output is b + its kept (agreeing) entries."""
    xs, b, plan, _ = _case(4, 1033, [BF16, F32, F16], F32, elect=elect, inv_prob=elect == ELECT_NONE,
                           density=[0.5, 1.0, 0.3, 0.8], window=(3, 700))
    plan.weight[:] = 1.0
    _check_transform(xs, b, plan, offset, f"elect {elect} offset {offset}")


def test_transform_without_base_and_tiny_chunks():
    for size in (1, 2, 5):
        xs, _, plan, _ = _case(2, size, [BF16], F32, density=0.5, elect=ELECT_SUM)
        _check_transform(xs, None, plan, 1, f"size {size}")


def test_transform_checks_its_outputs():
    xs, b, plan, _ = _case(2, 10, [F32], F32)
    fn = KERNELS["combine"].transform
    with pytest.raises(MergeError, match="outs has 1"):
        fn(xs, b, [torch.empty(10, device=xs[0].device)], plan)
    with pytest.raises(MergeError, match="float32"):
        fn(xs, b, [torch.empty(10, dtype=BF16, device=xs[0].device)] * 2, plan)


def test_backend_transform_is_the_kernel(triton_backend, monkeypatch):
    """TritonBackend.transform launches the SPLIT kernel (not the torch default) and equals the oracle."""
    from ame_kernels.methods import transforms

    xs, b, plan, _ = _case(3, 300, [BF16], F32, density=0.4, elect=ELECT_SUM)
    got = [torch.empty(300, device=xs[0].device) for _ in xs]

    def refuse(*a, **k):
        raise AssertionError("the torch transform ran")

    want = [torch.empty(300) for _ in xs]
    transforms.transform_torch([x.cpu() for x in xs], b.cpu(), want, plan, 0)
    monkeypatch.setattr(transforms, "transform_torch", refuse)
    assert triton_backend.transform(xs, b, got, plan, 0) is None
    for g, w in zip(got, want):
        assert_bitwise(g, w, "backend transform")
