"""CUDA C++ combine kernel (csrc/cuda/combine.{h,cuh,cu}, _C_cuda.combine, CudaBackend.combine).

Without a GPU: ``_C_cuda.combine_emulated`` runs the kernel's very per-group code
(combine.cuh: same templates, loaders, Philox, vector and scalar paths) on the host over
host memory, and every case must equal the oracle ``combine_torch`` bit for bit (any NaN
equals any NaN). That checks the arithmetic, not the device side proper (launch geometry,
__ldg, the device intrinsics __fadd_rn / __fmul_rn / __fdiv_rn / __umulhi), which the GPU
tests below check when a GPU is there and skip otherwise.
"""

import numpy as np
import pytest
import torch

from ame_kernels import _native
from ame_kernels.errors import MergeError
from ame_kernels.methods.combine import ELECT_COUNT, ELECT_NONE, ELECT_SUM, combine_torch
from combine_cases import BF16, CASES, F16, F32, assert_bitwise, make_case

C_CUDA = _native.load("_C_cuda")
GPU = torch.cuda.is_available()
needs_module = pytest.mark.skipif(C_CUDA is None, reason=f"_C_cuda is not built: {_native.why_missing('_C_cuda')}")
needs_gpu = pytest.mark.skipif(
    not (GPU and C_CUDA is not None),
    reason="needs a CUDA GPU and the _C_cuda module (torch.cuda.is_available() is False or _C_cuda is missing)",
)


def _oracle(xs, b, plan, out_dtype, offset, probs):
    want = torch.empty(xs[0].numel(), dtype=out_dtype)
    combine_torch([x.cpu() for x in xs], None if b is None else b.cpu(), want, plan, offset,
                  None if probs is None else [None if p is None else p.cpu() for p in probs])
    return want


def _emulated(xs, b, plan, out_dtype, offset=0, probs=None, vec=True, what=""):
    from ame_kernels.backends.cuda import combine_emulated

    got = torch.full((xs[0].numel(),), float("nan"), dtype=out_dtype)
    combine_emulated(xs, b, got, plan, offset, probs, vec=vec)
    assert_bitwise(got, _oracle(xs, b, plan, out_dtype, offset, probs), what)
    return got


# ---- without a GPU: the emulated kernel against the oracle ---------------------------------


@needs_module
@pytest.mark.parametrize("vec", [True, False], ids=["vector", "scalar"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_emulated_combine_bitwise_equals_oracle(case, vec):
    name, n, size, dts, out_dtype, opts = case
    xs, b, plan, probs = make_case(n, size, dts, out_dtype, **opts)
    _emulated(xs, b, plan, out_dtype, opts.get("offset", 0), probs, vec, name)


@needs_module
@pytest.mark.parametrize("out_dtype", [F32, BF16, F16], ids=str)
@pytest.mark.parametrize("elect", [ELECT_NONE, ELECT_SUM, ELECT_COUNT], ids=["none", "sum", "count"])
@pytest.mark.parametrize("size", [1, 7, 8, 9, 33, 1000, 4099])
def test_emulated_every_option_at_once(size, elect, out_dtype):
    """N = 8 mixed dtypes, a tied window, densities, per-element probs and inv_prob, across 2^32."""
    offset = (1 << 32) - size // 2
    xs, b, plan, probs = make_case(8, size, [BF16, F32, F16], out_dtype, elect=elect,
                                   normalize=elect != ELECT_COUNT, inv_prob=True, density=[0.3, 1.0, 0.6, 0.9] * 2,
                                   probs=True, window=(min(3, size - 1), max(1, 3 * size // 4)), ties=True,
                                   offset=offset, base_dtype=F16)
    _emulated(xs, b, plan, out_dtype, offset, probs, what=f"size={size} elect={elect}")


@needs_module
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 8, 65])
def test_emulated_every_n(n):
    """Each N from 1 to 8, and past the 64 keep bits carried between the elect passes."""
    xs, b, plan, probs = make_case(n, 1000, [BF16, F32], BF16, elect=ELECT_SUM if n % 2 else ELECT_COUNT,
                                   normalize=True, inv_prob=True, density=np.linspace(0.2, 1.0, n), probs=n > 4,
                                   window=(5, 900), weights=np.linspace(-1.0, 1.5, n))
    _emulated(xs, b, plan, BF16, 0, probs, what=f"n={n}")


@needs_module
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("elect", [ELECT_NONE, ELECT_SUM, ELECT_COUNT], ids=["none", "sum", "count"])
def test_emulated_nonfinite_inputs_follow_the_oracle(elect):
    xs, b, plan, _ = make_case(3, 33, [F32], BF16, elect=elect, normalize=True, density=[1.0, 0.5, 1.0])
    xs[0][3], xs[1][3], xs[2][3] = float("nan"), float("inf"), float("-inf")
    xs[0][5], xs[1][6] = float("inf"), float("nan")
    plan.weight[2] = 0.0  # 0 * inf: a NaN y
    _emulated(xs, b, plan, BF16, 0, None, what=f"nonfinite elect={elect}")


@needs_module
def test_emulated_chunks_with_offsets_equal_one_call():
    from ame_kernels.backends.cuda import combine_emulated

    size, k = 1000, 389
    xs, b, plan, probs = make_case(3, size, [BF16], BF16, density=[0.4, 1.0, 0.8], inv_prob=True,
                                   elect=ELECT_SUM, normalize=True, window=(10, 600), probs=True)
    whole = torch.empty(size, dtype=BF16)
    combine_emulated(xs, b, whole, plan, 0, probs)
    parts = torch.empty_like(whole)
    for lo, hi in ((0, k), (k, size)):
        combine_emulated([x[lo:hi] for x in xs], b[lo:hi], parts[lo:hi], plan, lo,
                         [None if p is None else p[lo:hi] for p in probs])
    assert_bitwise(parts, whole, "chunked")
    assert_bitwise(whole, _oracle(xs, b, plan, BF16, 0, probs), "whole")


@needs_module
def test_emulated_unaligned_views():
    xs, b, plan, probs = make_case(3, 43, [BF16, F32], F16, density=0.5, elect=ELECT_COUNT, probs=True)
    xs, b = [x[1:] for x in xs], b[1:]
    probs = [None if p is None else p[1:] for p in probs]
    _emulated(xs, b, plan, F16, 1, probs, what="unaligned")


@needs_module
def test_emulated_empty_chunk():
    from ame_kernels.backends.cuda import combine_emulated

    xs, b, plan, _ = make_case(2, 7, [F32], F32)
    combine_emulated([x[:0] for x in xs], b[:0], torch.empty(0), plan)


@needs_module
def test_binding_rejects_bad_arguments_naming_them():
    from ame_kernels.backends.cuda import combine_emulated

    xs, b, plan, _ = make_case(2, 7, [F32], F32)
    out = torch.empty(7)
    kw = dict(inputs=[x.data_ptr() for x in xs], input_dtypes=["float32"] * 2, c=7, base=0, base_dtype="float32",
              out=out.data_ptr(), out_dtype="float32", probs=[], offset=0, vec=True, **plan.kernel_kwargs())
    C_CUDA.combine_emulated(**kw)  # the good call
    with pytest.raises(ValueError, match=r"\[combine_emulated\] elect"):
        C_CUDA.combine_emulated(**dict(kw, elect=3))
    with pytest.raises(ValueError, match=r"\[combine_emulated\] weight: expected shape \[2\]"):
        C_CUDA.combine_emulated(**dict(kw, weight=np.ones(3, dtype=np.float32)))
    with pytest.raises(ValueError, match=r"\[combine_emulated\] top_idx: expected dtype int64"):
        C_CUDA.combine_emulated(**dict(kw, top_idx=np.zeros(2, dtype=np.int32)))
    with pytest.raises(ValueError, match=r"\[combine_emulated\] probs"):
        C_CUDA.combine_emulated(**dict(kw, probs=[0]))
    with pytest.raises(ValueError, match=r"\[combine_emulated\] offset"):
        C_CUDA.combine_emulated(**dict(kw, offset=-1))
    with pytest.raises(ValueError, match=r"\[combine_emulated\] out_dtype"):
        C_CUDA.combine_emulated(**dict(kw, out_dtype="float64"))
    with pytest.raises(MergeError, match=r"cuda.combine_emulated: inputs has 1 tensors"):
        combine_emulated(xs[:1], b, out, plan)
    with pytest.raises(MergeError, match=r"probs\[1\] has dtype torch.bfloat16"):
        combine_emulated(xs, b, out, plan, 0, [None, xs[1].to(BF16)])


@pytest.mark.skipif(C_CUDA is None or GPU, reason="checks the no-GPU behaviour of the device entry (needs _C_cuda, no GPU)")
def test_device_entry_refuses_without_a_gpu():
    xs, b, plan, _ = make_case(1, 7, [F32], F32)
    with pytest.raises(ValueError, match=r"\[combine\] device"):
        C_CUDA.combine(inputs=[xs[0].data_ptr()], input_dtypes=["float32"], c=7, input_table=0, dtype_table=0, base=0,
                       base_dtype="float32", out=xs[0].data_ptr(), out_dtype="float32", probs=[], probs_table=0,
                       fparams_dev=0, iparams_dev=0, offset=0, device=0, stream=0, **plan.kernel_kwargs())


# ---- on a GPU ------------------------------------------------------------------------------


@needs_gpu
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_gpu_combine_bitwise_equals_oracle(case):
    from ame_kernels.backends.cuda import CudaBackend

    name, n, size, dts, out_dtype, opts = case
    offset = opts.get("offset", 0)
    xs, b, plan, probs = make_case(n, size, dts, out_dtype, device="cuda", **opts)
    got = torch.full((size,), float("nan"), dtype=out_dtype, device="cuda")
    CudaBackend().combine(xs, b, got, plan, offset, probs)
    assert_bitwise(got, _oracle(xs, b, plan, out_dtype, offset, probs), name)


@needs_gpu
@pytest.mark.parametrize("elect", [ELECT_NONE, ELECT_SUM, ELECT_COUNT], ids=["none", "sum", "count"])
def test_gpu_large_bitwise_and_host_tensors(elect):
    from ame_kernels.backends.cuda import CudaBackend

    size = (1 << 22) + 3
    offset = (1 << 32) - size // 2
    xs, b, plan, probs = make_case(8, size, [BF16, F32], BF16, elect=elect, normalize=True, inv_prob=True,
                                   density=[0.3, 1.0] * 4, probs=True, window=(1000, size // 2), offset=offset)
    want = _oracle(xs, b, plan, BF16, offset, probs)
    backend = CudaBackend()
    dev = [x.cuda() for x in xs]
    got = torch.empty(size, dtype=BF16, device="cuda")
    backend.combine(dev, b.cuda(), got, plan, offset, [None if p is None else p.cuda() for p in probs])
    assert_bitwise(got, want, f"gpu elect={elect}")
    host = torch.empty(size, dtype=BF16)
    backend.combine(xs, b, host, plan, offset, probs)  # host tensors: through the GPU and back
    assert_bitwise(host, want, f"gpu host tensors elect={elect}")


# ---- the transform pass (kSplit): each ingredient's fp32 output ------------------------------


def _transform_oracle(xs, b, plan, offset):
    from ame_kernels.methods.transforms import transform_torch

    want = [torch.empty(xs[0].numel(), dtype=F32) for _ in xs]
    transform_torch([x.cpu() for x in xs], None if b is None else b.cpu(), want, plan, offset)
    return want


@needs_module
@pytest.mark.parametrize("vec", [True, False], ids=["vector", "scalar"])
@pytest.mark.parametrize("elect", [ELECT_NONE, ELECT_SUM, ELECT_COUNT], ids=["none", "sum", "count"])
@pytest.mark.parametrize("size", [1, 9, 1033])
def test_emulated_transform_bitwise_equals_oracle(size, elect, vec):
    """Draws, per-element probs, a tied window, inv_prob, mixed dtypes, an offset past 2^32, unit
    weights: outs[i] = b + its kept (agreeing) entries, bit for bit transform_torch."""
    from ame_kernels.backends.cuda import transform_emulated

    xs, b, plan, probs = make_case(5, size, [BF16, F32, F16], F32, elect=elect, inv_prob=elect != ELECT_SUM,
                                   density=[0.5, 1.0, 0.3, 0.8, 1.0], window=(2, size // 2) if size > 4 else None)
    plan.weight[:] = 1.0
    offset = (1 << 32) - 7
    got = [torch.full((size,), float("nan")) for _ in xs]
    transform_emulated(xs, b, got, plan, offset, vec=vec)
    for i, (g, w) in enumerate(zip(got, _transform_oracle(xs, b, plan, offset))):
        assert_bitwise(g, w, f"size {size} elect {elect} ingredient {i}")


@needs_module
def test_emulated_transform_checks_its_outputs():
    from ame_kernels.backends.cuda import transform_emulated

    xs, b, plan, _ = make_case(2, 10, [F32], F32)
    with pytest.raises(MergeError, match="outs has 1"):
        transform_emulated(xs, b, [torch.empty(10)], plan)
    with pytest.raises(MergeError, match="float32"):
        transform_emulated(xs, b, [torch.empty(10, dtype=BF16)] * 2, plan)
    with pytest.raises(MergeError, match="outs"):
        transform_emulated(xs, b, [torch.empty(10), torch.empty(11)], plan)


@needs_gpu
@pytest.mark.parametrize("elect", [ELECT_NONE, ELECT_SUM], ids=["none", "sum"])
def test_gpu_transform_bitwise_and_host_tensors(elect):
    from ame_kernels.backends.cuda import CudaBackend

    xs, b, plan, _ = make_case(3, 100003, [BF16], F32, elect=elect, density=0.4)
    plan.weight[:] = 1.0
    want = _transform_oracle(xs, b, plan, 5)
    be = CudaBackend()
    got = [torch.empty(100003, device="cuda") for _ in xs]
    be.transform([x.cuda() for x in xs], b.cuda(), got, plan, 5)
    for g, w in zip(got, want):
        assert_bitwise(g.cpu(), w, f"device elect {elect}")
    host = [torch.empty(100003) for _ in xs]
    be.transform(xs, b, host, plan, 5)
    for g, w in zip(host, want):
        assert_bitwise(g, w, f"host tensors elect {elect}")
