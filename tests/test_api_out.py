"""ak.merge(..., out=...): the caller's preallocated outputs, written in place and returned.

Same bits as a merge into new tensors (AME and the merge methods, tensors and state dicts,
cpu and reference backends); the output dtype is out's; every misuse is a MergeError
before any work: wrong kind, shape, device, dtype, layout, names, grad, and memory shared
with an ingredient, the base, the pivot or another output.
"""

import pytest
import torch

import ame_kernels as ak
from ame_kernels.errors import MergeError

BACKENDS = ["reference"] + (["cpu"] if ak.available_backends()["cpu"][0] else [])


def _sds(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"w": torch.randn(33, 17, generator=g), "b": torch.randn(17, generator=g).to(torch.bfloat16),
             "step": torch.tensor(7)} for _ in range(n)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [dict(optimizer="adam", lr=0.01, epochs=2), dict(method="linear"),
                                dict(method="ties", density=0.4), dict(method="dare_ties", density=0.5, seed=3)])
def test_out_equals_a_fresh_merge(backend, kw):
    sds = _sds()
    base = _sds(1, seed=9)[0] if kw.get("method") in ("ties", "dare_ties") else None
    want = ak.merge(sds, base=base, backend=backend, **kw)
    out = {"w": torch.full((33, 17), 5.0), "b": torch.full((17,), 5.0, dtype=torch.bfloat16)}
    got = ak.merge(sds, base=base, backend=backend, out=out, **kw)
    assert got["w"] is out["w"] and got["b"] is out["b"]
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    xs = [sd["w"] for sd in sds]
    o = torch.empty(33, 17)
    tb = None if base is None else base["w"]
    assert ak.merge(xs, base=tb, backend=backend, out=o, **kw) is o
    assert torch.equal(o, ak.merge(xs, base=tb, backend=backend, **kw))
    stacked = torch.stack(xs)
    o2 = torch.empty(33, 17)
    ak.merge(stacked, base=tb, backend=backend, out=o2, **kw)
    assert torch.equal(o2, o)


def test_out_dtype_is_outs():
    xs = [torch.randn(100) for _ in range(3)]
    o = torch.empty(100, dtype=torch.bfloat16)
    ak.merge(xs, out=o)
    assert torch.equal(o, ak.merge(xs, out_dtype="bfloat16"))
    with pytest.raises(MergeError, match=r"merge: out the tensor is torch.bfloat16 but out_dtype is 'float16'"):
        ak.merge(xs, out=o, out_dtype="float16")


def test_out_misuse_is_named_before_any_work():
    sds = _sds()
    xs = [sd["w"] for sd in sds]
    before = xs[0].clone()
    cases = [
        (xs, [1, 2], r"merge: out must be a tensor for tensor ingredients, got list"),
        (sds, torch.empty(3), r"merge: out must be a dict of tensors for state-dict ingredients, got Tensor"),
        (xs, torch.empty(17, 33), r"merge: out the tensor has shape \(17, 33\) on cpu; the merge gives \(33, 17\)"),
        (xs, torch.empty(17, 33).t(), r"must be a contiguous float32/bfloat16/float16 tensor, got a non-contiguous"),
        (xs, torch.empty(33, 17, dtype=torch.float64), r"must be a contiguous float32/bfloat16/float16 tensor"),
        (xs, torch.empty(33, 17, requires_grad=True), r"requires grad"),
        (xs, xs[1], r"shares memory with an ingredient"),
        (xs, xs[2].view(-1)[:561].view(33, 17), r"shares memory with an ingredient"),
        (sds, {"w": torch.empty(33, 17)}, r"missing \['b'\]"),
        (sds, {"w": torch.empty(33, 17), "b": torch.empty(17), "step": torch.empty(())}, r"not merged tensors \['step'\]"),
    ]
    for ing, out, msg in cases:
        with pytest.raises(MergeError, match=msg):
            ak.merge(ing, out=out)
    pivot = torch.randn(33, 17)
    with pytest.raises(MergeError, match="shares memory with an ingredient, the base or the pivot"):
        ak.merge(xs, optimizer="adam", pivot=pivot, out=pivot)
    base = torch.randn(33, 17)
    with pytest.raises(MergeError, match="shares memory with an ingredient, the base or the pivot"):
        ak.merge(xs, method="ties", base=base, out=base)
    shared = torch.empty(2 * 33 * 17)
    with pytest.raises(MergeError, match=r"out tensor 'w' and out tensor 'b' share memory"):
        ak.merge([{"w": sd["w"], "b": sd["w"][0].float()} for sd in sds],
                 out={"w": shared[:561].view(33, 17), "b": shared[100:117]})
    assert torch.equal(xs[0], before)
