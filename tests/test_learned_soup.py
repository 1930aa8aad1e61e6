"""ak.learned_soup: one ingredient, identical ingredients, convex toy problems (global and by layer), bad input."""

import pytest
import torch
from torch import nn

import ame_kernels as ak
from ame_kernels.errors import MergeError


class Two(nn.Module):
    """Two linear maps in parallel: out = a(x[:, :3]) + b(x[:, 3:]); the MSE is convex in the coefficients."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 2, bias=False)
        self.b = nn.Linear(3, 2, bias=False)

    def forward(self, x):
        return self.a(x[:, :3]) + self.b(x[:, 3:])


def _setup(n=3, seed=0):
    """n ingredients whose flattened tensors are orthogonal across ingredients (a well-conditioned toy)."""
    g = torch.Generator().manual_seed(seed)
    sds = [{} for _ in range(n)]
    for k in ("a.weight", "b.weight"):
        q, _ = torch.linalg.qr(torch.randn(6, n, generator=g))  # [6, n], orthonormal columns
        for i in range(n):
            sds[i][k] = 2.0 * q[:, i].reshape(2, 3).contiguous()
    x = torch.randn(256, 6, generator=torch.Generator().manual_seed(seed + 1))
    return sds, x


def _mix(sds, ca, cb):
    return {"a.weight": sum(c * s["a.weight"] for c, s in zip(ca, sds)),
            "b.weight": sum(c * s["b.weight"] for c, s in zip(cb, sds))}


mse = nn.functional.mse_loss


def test_one_ingredient_returns_it():
    sds, x = _setup(1)
    merged, alpha = ak.learned_soup(sds, Two(), mse, (x, torch.zeros(256, 2)), steps=5)
    assert torch.equal(alpha, torch.ones(1))
    for k in sds[0]:
        assert torch.equal(merged[k], sds[0][k])


def test_two_identical_ingredients_return_them():
    sds, x = _setup(1)
    twin = {k: v.clone() for k, v in sds[0].items()}
    merged, alpha = ak.learned_soup([sds[0], twin], Two(), mse, (x, torch.randn(256, 2)), steps=10, lr=0.1)
    torch.testing.assert_close(alpha, torch.full((2,), 0.5))
    for k in sds[0]:
        torch.testing.assert_close(merged[k], sds[0][k], rtol=0, atol=1e-7)


def test_convex_toy_reaches_the_optimum_coefficients():
    sds, x = _setup(3)
    star = [0.2, 0.5, 0.3]
    with torch.no_grad():
        y = torch.func.functional_call(Two(), _mix(sds, star, star), (x,))
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
    merged, alpha = ak.learned_soup(sds, Two(), mse, batches, steps=150, lr=0.1)
    torch.testing.assert_close(alpha, torch.tensor(star), rtol=0, atol=1e-2)
    torch.testing.assert_close(merged["a.weight"], _mix(sds, star, star)["a.weight"], rtol=0, atol=2e-2)


def test_by_layer_recovers_per_layer_coefficients_where_global_cannot():
    sds, x = _setup(3, seed=4)
    ca, cb = [0.7, 0.2, 0.1], [0.1, 0.1, 0.8]
    with torch.no_grad():
        y = torch.func.functional_call(Two(), _mix(sds, ca, cb), (x,))
    _, alpha = ak.learned_soup(sds, Two(), mse, (x, y), by_layer=True, steps=150, lr=0.1)
    assert set(alpha) == {"a.weight", "b.weight"}
    torch.testing.assert_close(alpha["a.weight"], torch.tensor(ca), rtol=0, atol=1e-2)
    torch.testing.assert_close(alpha["b.weight"], torch.tensor(cb), rtol=0, atol=1e-2)
    merged_g, _ = ak.learned_soup(sds, Two(), mse, (x, y), steps=100, lr=0.1)
    merged_l, _ = ak.learned_soup(sds, Two(), mse, (x, y), by_layer=True, steps=100, lr=0.1)
    loss = lambda sd: float(mse(torch.func.functional_call(Two(), sd, (x,)), y))
    assert loss(merged_l) < 0.5 * loss(merged_g)


def test_bad_input():
    sds, x = _setup(2)
    y = torch.zeros(256, 2)
    bad = {"c.weight": sds[1]["a.weight"], "b.weight": sds[1]["b.weight"]}
    with pytest.raises(MergeError, match="tensor names differ"):
        ak.learned_soup([sds[0], bad], Two(), mse, (x, y))
    renamed = [{"m." + k: v for k, v in sd.items()} for sd in sds]
    with pytest.raises(MergeError, match="ingredient 0's names do not match.*missing 'a.weight'"):
        ak.learned_soup(renamed, Two(), mse, (x, y))
    with pytest.raises(MergeError, match="step 1: the model or loss_fn raised RuntimeError"):
        ak.learned_soup(sds, Two(), mse, (x[:, :4], y), steps=1)
    with pytest.raises(MergeError, match="init must be 2 positive"):
        ak.learned_soup(sds, Two(), mse, (x, y), init=[1.0, 0.0])
    with pytest.raises(MergeError, match="data has no batches"):
        ak.learned_soup(sds, Two(), mse, [], steps=1)
