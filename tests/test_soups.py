"""Model soups (uniform, weighted, greedy) on every CPU backend."""


import pytest
import torch

import ame_kernels as ak
from ame_kernels.soups import greedy_soup, uniform_soup, weighted_soup
from tolerances import assert_close

from backends import cpu_backends


pytestmark = pytest.mark.parametrize("backend", cpu_backends())

SIZE = 41


def _sds(n=4, dtype=torch.float32):
    return [{"w": torch.randn(6, 7).to(dtype), "b": torch.randn(5).to(dtype), "idx": torch.arange(3)} for _ in range(n)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_uniform_soup_is_mean(backend, dtype):
    sds = _sds(5, dtype)
    soup = uniform_soup(sds, backend=backend)
    for k in ("w", "b"):
        assert soup[k].dtype == dtype
        assert_close(soup[k], torch.stack([d[k].float() for d in sds]).mean(0), dtype, what=k)
    assert torch.equal(soup["idx"], sds[0]["idx"])
    xs = [torch.randn(SIZE) for _ in range(3)]
    assert_close(uniform_soup(xs, backend=backend, out_dtype="float32"), torch.stack(xs).mean(0), what="tensors")


def test_weighted_soup_algebra(backend):
    """sum a_t x_t (/ sum a), and base + sum a_t (x_t - base) without normalisation."""
    xs = [torch.randn(SIZE) for _ in range(4)]
    a = [0.5, 1.0, 0.0, 2.5]
    combo = sum(ai * x for ai, x in zip(a, xs))
    # normalised (sum a = 1 after dividing by 4)
    assert_close(weighted_soup(xs, a, backend=backend), combo / 4, what="normalised")
    # raw linear combination: p = 0
    assert_close(weighted_soup(xs, a, normalize=False, backend=backend), combo, what="raw combination")
    # task arithmetic: base + sum a (x - base)
    base = torch.randn(SIZE)
    assert_close(weighted_soup(xs, a, normalize=False, base=base, backend=backend),
                 base + sum(ai * (x - base) for ai, x in zip(a, xs)), what="task arithmetic")
    # normalised weights would make the base cancel: a base given there is refused, not ignored
    with pytest.raises(ak.MergeError, match="a base cancels"):
        weighted_soup(xs, a, base=base, backend=backend)
    # equal weights = uniform soup, on state dicts too
    sds = _sds(3)
    ws = weighted_soup(sds, [2.0, 2.0, 2.0], backend=backend)
    assert_close(ws["w"], torch.stack([d["w"] for d in sds]).mean(0), what="equal weights")
    raw = weighted_soup(sds, [1.0, -1.0, 0.5], normalize=False, backend=backend)
    assert_close(raw["b"], sds[0]["b"] - sds[1]["b"] + 0.5 * sds[2]["b"], what="dict raw combination")


def _toy_family():
    """x_i = c_i u (u a unit vector); evaluate = -||m||^2 = -c^2, so every soup's score is known."""
    u = torch.randn(SIZE, dtype=torch.float64)
    u = (u / u.norm()).float()
    cs = [0.1, -0.1, 5.0, -0.05, 0.3]
    return [c * u for c in cs], u


def _closeness(m):
    return -float(m.double().pow(2).sum())


def test_greedy_soup_known_answer(backend):
    """Model-soups recipe on a toy family where the kept set is known by hand.

    Scores -c^2: order 3 (-0.0025), 0, 1 (tie at -0.01, given order kept), 4, 2.
    {3}: c=-0.05; +0 -> mean 0.025 (better, kept); +1 -> -0.0167 (better, kept);
    +4 -> 0.0625 (worse); +2 -> 1.24 (worse). Soup = mean(x3, x0, x1).
    """
    xs, u = _toy_family()
    soup, history = greedy_soup(xs, _closeness, backend=backend)
    assert [h.ingredient for h in history] == [0, 1, 4, 2]
    assert [h.accepted for h in history] == [True, True, False, False]
    assert [h.step for h in history] == [2, 3, 3, 3]
    assert_close(soup, torch.stack([xs[3], xs[0], xs[1]]).mean(0), what="greedy soup")
    assert history[1].score == pytest.approx(-(0.05 / 3) ** 2, rel=1e-5)


def test_greedy_soup_given_scores_and_dicts(backend):
    """Given held-out scores set the order (4, 3, 2, 1, 0); the soup's own score decides what is kept.

    {4}: 0.3 (-0.09); +3 -> 0.125 (kept); +2 -> worse; +1 -> 0.05 (kept); +0 -> 0.0625 (worse).
    """
    xs, u = _toy_family()
    sds = [{"p": x, "step": torch.tensor(7)} for x in xs]
    soup, history = greedy_soup(sds, lambda m: _closeness(m["p"]), scores=[1, 2, 3, 4, 5], backend=backend)
    assert [h.ingredient for h in history] == [3, 2, 1, 0]
    assert [h.accepted for h in history] == [True, False, True, False]
    assert_close(soup["p"], torch.stack([xs[4], xs[3], xs[1]]).mean(0), what="greedy soup (dicts)")
    assert torch.equal(soup["step"], torch.tensor(7))


def test_greedy_soup_never_worse_than_best(backend):
    xs = [torch.randn(SIZE) for _ in range(6)]
    target = torch.randn(SIZE)

    def evaluate(m):
        return -float((m.float() - target).pow(2).sum())

    soup, _ = greedy_soup(xs, evaluate, backend=backend)
    assert evaluate(soup) >= max(evaluate(x) for x in xs)


def test_soup_bad_input(backend):
    xs = [torch.randn(SIZE) for _ in range(3)]
    with pytest.raises(ak.MergeError, match="expected 3 weights"):
        weighted_soup(xs, [1.0, 2.0], backend=backend)
    with pytest.raises(ak.MergeError, match="sum to 0"):
        weighted_soup(xs, [1.0, -1.0, 0.0], backend=backend)
    with pytest.raises(ak.MergeError, match="sum to 0 .or nearly"):  # cancellation residue: weights x1e12
        weighted_soup(xs, [1.0, -1.0, 1e-12], backend=backend)
    with pytest.raises(ak.MergeError, match="finite"):
        weighted_soup(xs, [1.0, float("inf"), 0.0], backend=backend)
    with pytest.raises(ak.MergeError, match="expected 3 scores"):
        greedy_soup(xs, _closeness, scores=[1.0], backend=backend)
    with pytest.raises(ak.MergeError, match="shape"):
        uniform_soup([torch.zeros(3), torch.zeros(4)], backend=backend)
    with pytest.raises(ak.MergeError, match="NaN"):
        greedy_soup([torch.zeros(3), torch.full((3,), float("nan"))], _closeness, scores=[1, 2], backend=backend)
