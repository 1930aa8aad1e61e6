"""The AME paper's own identities (DESIGN section 1), through the public API, on every CPU backend."""

import pytest
import torch

import ame_kernels as ak
from backends import cpu_backends
from tolerances import assert_close

pytestmark = pytest.mark.parametrize("backend", cpu_backends())


def _family(n=5, size=37, dtype=torch.float32):
    return [torch.randn(size).to(dtype) for _ in range(n)]


def _soup(xs):
    return torch.stack([x.float() for x in xs]).mean(0)


@pytest.mark.parametrize("pivot", ["soup", 0, 3])
def test_gd_lr1_fixed_pivot_is_uniform_soup(backend, pivot):
    """GD, lr=1 constant, fixed pivot (any), zeta=1, E=1, B=1 -> uniform soup (eq. 3/4)."""
    xs = _family()
    out = ak.merge(xs, optimizer="sgd", lr=1.0, lr_schedule="constant", adaptive_pivot=False,
                   amplification=1.0, pivot=pivot, backend=backend)
    assert_close(out, _soup(xs), what="GD soup identity")


@pytest.mark.parametrize("pivot", ["soup", 2, "tensor"])
def test_gd_harmonic_adaptive_zeta_n_is_soup(backend, pivot):
    """GD, lr_t = 1/t, adaptive pivot, zeta=N, E=1, B=1, any init -> uniform soup (Section 3.1)."""
    xs = _family()
    init = torch.full((37,), 10.0) if pivot == "tensor" else pivot
    out = ak.merge(xs, optimizer="sgd", lr=1.0, lr_schedule="harmonic", adaptive_pivot=True,
                   amplification=float(len(xs)), pivot=init, backend=backend)
    assert_close(out, _soup(xs), what="harmonic GD soup identity")


def test_gd_harmonic_first_step_lands_on_first_ingredient(backend):
    """w_1 = x_1: zeta = N on step 1 and 0 afterwards freezes w at w_1."""
    xs = _family()
    zeta = [float(len(xs))] + [0.0] * (len(xs) - 1)
    out = ak.merge(xs, optimizer="sgd", lr=1.0, lr_schedule="harmonic", amplification=zeta,
                   pivot=torch.full((37,), -3.0), backend=backend)
    assert_close(out, xs[0], what="w_1 = x_1")


def test_order_is_respected(backend):
    """With harmonic GD and zeta=N, freezing after step 1 gives the first ingredient of the order."""
    xs = _family()
    zeta = [5.0, 0.0, 0.0, 0.0, 0.0]
    out = ak.merge(xs, optimizer="sgd", amplification=zeta, scores=[0.1, 0.9, 0.5, 0.2, 0.3], backend=backend)
    assert_close(out, xs[1], what="highest score first")
    out = ak.merge(xs, optimizer="sgd", amplification=zeta, scores=[0.1, 0.9, 0.5, 0.2, 0.3], descending=False,
                   backend=backend)
    assert_close(out, xs[0], what="lowest score first")
    out = ak.merge(xs, optimizer="sgd", amplification=zeta, order=[4, 0, 1, 2, 3], backend=backend)
    assert_close(out, xs[4], what="explicit order")


def test_prop1_adagrad_with_huge_eps_is_gd(backend):
    """Prop. 1: Adagrad with eps >> sum g^2 and lr = eps * lr_gd ~ GD with lr_gd."""
    xs = _family()
    big = 1e6
    gd = ak.merge(xs, optimizer="sgd", lr=1.0, lr_schedule="constant", adaptive_pivot=False, backend=backend)
    ada = ak.merge(xs, optimizer="adagrad", lr=big, eps=big, lr_schedule="constant", adaptive_pivot=False,
                   backend=backend)
    assert_close(ada, _soup(xs), what="Adagrad ~ soup")
    torch.testing.assert_close(ada, gd, rtol=1e-4, atol=1e-5)
    # and it is not vacuous: a small eps gives something else
    ada_small = ak.merge(xs, optimizer="adagrad", lr=1.0, eps=1e-10, lr_schedule="constant", adaptive_pivot=False,
                         backend=backend)
    assert (ada_small - gd).abs().max() > 1e-2


def _prop2_points(k=2.0, omega=0.5):
    return [
        torch.tensor([-k * omega, (k + 1) * omega]),
        torch.tensor([-(k + 1) * omega, -k * omega]),
        torch.tensor([k * omega, -(k + 1) * omega]),
        torch.tensor([(k + 1) * omega, k * omega]),
    ]


@pytest.mark.parametrize("epochs", [1, 2, 7])
def test_prop2_constant_lr_cycles(backend, epochs):
    """Prop. 2(i): GD with constant lr 1/(k+1) from (omega, 0) on the four points cycles forever."""
    k, omega = 2.0, 0.5
    xs = _prop2_points(k, omega)
    out = ak.merge(xs, optimizer="sgd", lr=1 / (k + 1), lr_schedule="constant", amplification=4.0,
                   pivot=torch.tensor([omega, 0.0]), epochs=epochs, backend=backend)
    assert_close(out, torch.tensor([omega, 0.0]), what=f"cycle after {epochs} epochs")
    # one step less than a full epoch is a different corner of the l1 ball: it really moves
    zeta = [4.0, 4.0, 4.0, 0.0]
    out3 = ak.merge(xs, optimizer="sgd", lr=1 / (k + 1), lr_schedule="constant", amplification=zeta,
                    pivot=torch.tensor([omega, 0.0]), backend=backend)
    assert_close(out3, torch.tensor([0.0, -omega]), what="third corner")


def test_prop2_decaying_lr_converges(backend):
    """Prop. 2(ii): with lr_t = O(t^alpha), alpha < -1, the iterates converge."""
    xs = _prop2_points()
    kw = dict(optimizer="sgd", lr=1 / 3, lr_schedule="power", lr_power=-1.5, amplification=4.0,
              pivot=torch.tensor([0.5, 0.0]), backend=backend)
    a = ak.merge(xs, epochs=200, **kw)
    b = ak.merge(xs, epochs=400, **kw)
    assert (a - b).abs().max() < 5e-3  # tail of sum t^-1.5 over steps 800..1600 is ~0.02 * lr * diam
    c = ak.merge(xs, epochs=2, **kw)
    assert (c - b).abs().max() > 1e-2  # not vacuous: early iterates are elsewhere
