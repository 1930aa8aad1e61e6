"""A demanding user's inputs to the Python API: odd tensors, numpy/torch scalars, non-finite
hyperparameters, failing callables, backends called directly. Each bad input is an
ak.MergeError naming the culprit, raised before any work; odd but valid inputs give the same
result as their plain form and leave the inputs untouched."""

import numpy as np
import pytest
import torch

import ame_kernels as ak
from ame_kernels.backends.reference import ReferenceBackend

from backends import cpu_backends


def raises(match, fn, *a, **kw):
    with pytest.raises(ak.MergeError, match=match) as e:
        fn(*a, **kw)
    return str(e.value)


def _xs(n=3, shape=(4, 3)):
    return [torch.randn(*shape) for _ in range(n)]


def _meta(shape=(4, 3)):
    return torch.empty(*shape, device="meta")


# -- odd but valid ingredient forms ---------------------------------------------------------


@pytest.mark.parametrize("backend", cpu_backends())
def test_views_and_buffers_merge_like_their_contiguous_copies_and_inputs_stay_untouched(backend):
    """Transposed, sliced, expanded (stride 0) and requires_grad inputs, int/bool buffers, N=1:
    the result equals the merge of contiguous copies, no input is modified (bitwise) and the
    output shares no storage with any input."""
    base = torch.randn(6, 4)
    views = [
        base.t(),                                  # transposed
        torch.randn(4, 12)[:, ::2],                # sliced, strided
        torch.randn(1, 6).expand(4, 6),            # expanded, stride 0
        torch.randn(4, 6, requires_grad=True),     # autograd leaf
    ]
    dicts = [{"w": v, "pos": torch.arange(5), "mask": torch.ones(3, dtype=torch.bool)} for v in views]
    before = [{k: t.detach().clone() for k, t in d.items()} for d in dicts]
    cfg = dict(optimizer="adam", lr=0.05, epochs=2, backend=backend)
    out = ak.merge(dicts, **cfg)
    plain = ak.merge([{k: t.detach().contiguous().clone() for k, t in d.items()} for d in dicts], **cfg)
    for k in plain:
        assert torch.equal(out[k], plain[k]), k
    for d, b in zip(dicts, before):
        for k in d:
            assert torch.equal(d[k].detach(), b[k]), f"input {k!r} was modified"
    for d in dicts:
        for k in d:
            assert out[k].untyped_storage().data_ptr() != d[k].untyped_storage().data_ptr(), f"{k!r} aliases an input"
    assert not out["w"].requires_grad and list(out) == ["w", "pos", "mask"]
    one = ak.merge([views[0]], **cfg)
    torch.testing.assert_close(one, views[0], rtol=0, atol=0)


# -- inputs no backend can merge --------------------------------------------------------------


def test_meta_tensors_are_named_not_a_runtime_error():
    xs = [torch.randn(4, 3), _meta()]
    raises(r"'w' of ingredient 1 is a meta tensor", ak.merge, [{"w": x} for x in xs])
    raises("meta tensor", ak.merge, xs, check_finite=False)
    raises("meta tensor", ak.uniform_soup, [_meta(), _meta()])
    raises("meta tensor", ak.greedy_merge, [_meta(), _meta()], lambda w: 0.0)
    raises("meta tensor", ak.greedy_soup, [_meta(), _meta()], lambda w: 0.0, scores=[1.0, 2.0])
    raises("pivot the tensor is a meta tensor", ak.Stew, _meta())
    raises("ingredient 0: the tensor is a meta tensor", ak.diagnostics, [_meta(), _meta()])
    raises("pivot the tensor is a meta tensor", ak.merge, _xs(2), pivot=_meta(), backend="reference")


@pytest.mark.parametrize("backend", cpu_backends())
def test_a_failed_stew_add_leaves_the_stew_as_it_was(backend):
    """'b' (after 'a' in the stew) is unusable: the add fails before 'a' is stepped, also with
    check_finite=False (no check of the values, so nothing else would catch it early)."""
    stew = ak.Stew({"a": torch.zeros(3), "b": torch.zeros(3)}, optimizer="adam", lr=0.1, backend=backend,
                   check_finite=False)
    stew.add({"a": torch.ones(3), "b": torch.ones(3)})
    snap = stew.snapshot()
    for bad in (_meta((3,)), torch.ones(3, dtype=torch.complex64), torch.ones(3, dtype=torch.float64)):
        with pytest.raises(ak.MergeError, match="'b' of ingredient 1"):
            stew.add([{"a": torch.ones(3), "b": torch.ones(3)}, {"a": torch.ones(3), "b": bad}])
        assert stew.step == 1
        for k in ("a", "b"):
            assert torch.equal(stew.weights_fp32[k], snap.weights[k].reshape(3)), k
            assert torch.equal(stew.optimizer_state[k], snap.state[k]), k


def test_complex_tensors_are_an_error_not_silently_copied():
    xs = [torch.randn(3, dtype=torch.complex64) for _ in range(2)]
    raises(r"ingredient 0 has complex dtype torch.complex64.*view_as_real", ak.merge, xs)
    raises("complex dtype", ak.merge, [{"w": torch.randn(2), "z": x} for x in xs])
    raises("complex dtype", ak.Stew, {"z": xs[0]})


def test_an_unsupported_float_dtype_is_not_called_non_floating():
    msg = raises(r"'w' of ingredient 1 has unsupported dtype torch.float64; supported: float32",
                 ak.merge, [{"w": torch.randn(3)}, {"w": torch.randn(3, dtype=torch.float64)}])
    assert "non-floating" not in msg
    stew = ak.Stew(torch.randn(3))
    msg = raises("unsupported dtype torch.float64", stew.add, torch.randn(3, dtype=torch.float64))
    assert "non-floating" not in msg


def test_a_non_floating_buffer_of_another_dtype_is_reported():
    a = {"w": torch.randn(3), "pos": torch.arange(4)}
    b = {"w": torch.randn(3), "pos": torch.arange(4, dtype=torch.int32)}  # equal values, other dtype
    with pytest.warns(UserWarning, match="'pos'.*ingredients \\[1\\].*dtype"):
        out = ak.merge([a, b], backend="reference")
    assert out["pos"].dtype == torch.int64
    stew = ak.Stew(a)
    with pytest.warns(UserWarning, match="'pos'.*dtype"):
        stew.add(b)


def test_a_pivot_state_dict_needs_only_the_floating_tensors():
    """Non-floating tensors come from ingredient 0, so a parameters-only pivot is enough."""
    dicts = [{"w": torch.randn(3), "pos": torch.arange(2)} for _ in range(3)]
    pivot = {"w": torch.randn(3)}
    out = ak.merge(dicts, pivot=pivot, backend="reference")
    full = ak.merge(dicts, pivot={**pivot, "pos": torch.arange(2)}, backend="reference")
    assert torch.equal(out["w"], full["w"]) and torch.equal(out["pos"], dicts[0]["pos"])
    raises(r"pivot state dict is missing \['w'\]", ak.merge, dicts, pivot={"pos": torch.arange(2)})


# -- non-finite pivots and hyperparameters ----------------------------------------------------------


def test_a_non_finite_explicit_pivot_is_named():
    xs = _xs(3)
    bad = xs[0].clone()
    bad[1, 2] = float("nan")
    raises("pivot the tensor contains NaN or Inf", ak.merge, xs, pivot=bad)
    raises("pivot tensor 'w' contains NaN or Inf", ak.merge, [{"w": x} for x in xs], pivot={"w": bad})
    raises(r"weighted_soup: merge: base the tensor contains NaN", ak.weighted_soup, xs, [1, 2, 3], base=bad,
           normalize=False)
    raises(r"weighted_soup: merge: .*base must be a state dict", ak.weighted_soup, [{"w": x} for x in xs], [1, 2, 3], base=xs[0],
           normalize=False)
    out = ak.merge(xs, pivot=bad, check_finite=False, backend="reference")  # the check can be turned off
    assert not torch.isfinite(out).all()


@pytest.mark.parametrize("field,value", [
    ("weight_decay", float("nan")), ("weight_decay", float("inf")), ("lr_decay", float("nan")),
    ("initial_accumulator_value", float("nan")), ("initial_accumulator_value", float("inf")),
    ("dampening", float("nan")), ("lr_power", float("nan")), ("amplification", float("inf")),
])
def test_non_finite_hyperparameters_are_named_before_any_work(field, value):
    raises(f"AMEConfig.{field}: must be a finite number", ak.AMEConfig, optimizer="adagrad", **{field: value})


def test_nan_scores_are_an_error():
    raises("AMEConfig.scores: a score is NaN", ak.merge, _xs(3), scores=[0.1, float("nan"), 0.3])


def test_out_of_range_integers_are_named():
    raises(r"AMEConfig.seed: must be in \[-2\*\*63, 2\*\*64\)", ak.merge, _xs(2), shuffle=True, seed=2**70)
    raises("AMEConfig.epochs: .* more than a plan holds", ak.merge, _xs(2), epochs=10**30)


# -- types as people pass them ---------------------------------------------------------------------


def test_numpy_and_torch_scalars_work_as_python_numbers():
    xs = _xs(3)
    ref = ak.merge(xs, pivot=1, amplification=2.0, backend="reference")
    assert torch.equal(ak.merge(xs, pivot=np.int64(1), amplification=np.float32(2.0), backend="reference"), ref)
    assert torch.equal(ak.merge(xs, pivot=np.int32(1), amplification=torch.tensor(2.0), backend="reference"), ref)
    assert ak.AMEConfig(pivot=np.int64(2)).pivot == 2 and ak.AMEConfig(amplification=np.float64(3)).amplification == 3.0
    m, _ = ak.greedy_merge(xs, lambda w: 0.0, scores=[3, 2, 1], pivot=np.int64(0), backend="reference")
    assert m.shape == xs[0].shape
    a = ak.Stew(xs[0], amplification=np.float32(2.0), backend="reference").add(xs[1]).weights
    b = ak.Stew(xs[0], amplification=2.0, backend="reference").add(xs[1]).weights
    assert torch.equal(a, b)


@pytest.mark.parametrize("field,value,match", [
    ("lr_schedule", 0.5, r"got the number 0.5.*lr=0.5, lr_schedule='constant'"),
    ("order", 2, "AMEConfig.order: expected a permutation"),
    ("scores", 2.0, "AMEConfig.scores: expected one score per ingredient"),
    ("betas", "0.9,0.99", r"AMEConfig.betas: expected two numbers \(beta1, beta2\), got '0.9,0.99'"),
])
def test_a_wrong_container_type_is_named(field, value, match):
    raises(match, ak.AMEConfig, **{field: value})


def test_names_of_choices_are_case_insensitive():
    cfg = ak.AMEConfig(optimizer="Adam", lr_schedule="Harmonic", backend="CPU")
    assert (cfg.optimizer, cfg.lr_schedule, cfg.backend) == ("adam", "harmonic", "cpu")


@pytest.mark.parametrize("field,fn,match", [
    ("lr_schedule", lambda t: 1 / (t - 1), r"lr_schedule: the callable raised ZeroDivisionError at t=1"),
    ("lr_schedule", lambda t: "fast", r"lr_schedule: the callable returned 'fast' at t=1, not a number"),
    ("amplification", lambda t: None, r"amplification: the callable returned None at t=1"),
])
def test_a_failing_schedule_callable_is_named_with_its_step(field, fn, match):
    raises(match, ak.merge, _xs(2), **{field: fn})
    stew = ak.Stew(torch.zeros(2), mode="merge", n=2, **{field: fn})
    raises(match, stew.add, torch.ones(2))
    assert stew.step == 0 and torch.equal(stew.weights, torch.zeros(2))


def test_a_stew_asks_a_callable_lr_for_one_value_per_step():
    """step t needs lr_t only; asking for lr_1..lr_t at every add made T adds cost O(T^2) calls."""
    calls = []
    stew = ak.Stew(torch.zeros(2), lr_schedule=lambda t: calls.append(t) or 1.0 / t, backend="reference")
    for _ in range(20):
        stew.add(torch.ones(2))
    assert calls == list(range(1, 21))


# -- backends called directly ------------------------------------------------------------------------


def _plan(n=3):
    return ak.schedule(ak.AMEConfig(optimizer="adam", lr=0.1), n)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_backend_called_directly_checks_its_contract(backend):
    b = ak.get_backend(backend)
    plan, xs, out = _plan(), [torch.randn(6) for _ in range(3)], torch.empty(6)
    raises("plan must be a StepPlan", b.whole_run, xs, "plan", None, True, out)
    raises("inputs has 2 tensors but the plan is for N=3", b.whole_run, xs[:2], plan, None, True, out)
    raises("out.* has 5 elements but inputs.0. has 6", b.whole_run, xs, plan, None, True, torch.empty(5))
    raises(r"inputs\[1\].*5", b.whole_run, [xs[0], torch.randn(5), xs[2]], plan, None, True, out)
    raises("pivot.* 3 is not in \\[0, 3\\)", b.whole_run, xs, plan, 3, True, out)
    raises("pivot.* -1 is not in \\[0, 3\\)", b.whole_run, xs, plan, -1, True, out)
    raises("inputs.0.*float64", b.whole_run, [xs[0].double(), *xs[1:]], plan, None, True, out)
    h = plan.hyper
    w, state = torch.zeros(6), torch.zeros(h.state_slots, 6)
    raises(r"t\b.*counts? from 1, got 0", b.step, w, state, [xs[0]], None, plan.coeffs[0], 0, h)
    raises("coeffs.* 4 values", b.step, w, state, [xs[0]], None, plan.coeffs, 1, h)
    raises("state", b.step, w, torch.zeros(1, 6), [xs[0]], None, plan.coeffs[0], 1, h)
    raises("batch", b.step, w, state, [], None, plan.coeffs[0], 1, h)
    raises("w.*float32", b.step, w.bfloat16(), state, [xs[0]], None, plan.coeffs[0], 1, h)
    assert torch.equal(w, torch.zeros(6)) and torch.equal(state, torch.zeros(h.state_slots, 6))


def test_the_reference_backend_still_takes_any_float_dtypes_mixed():
    plan, out = _plan(), torch.empty(6, dtype=torch.bfloat16)
    xs = [torch.randn(6), torch.randn(6).half(), torch.randn(6).bfloat16()]
    assert ReferenceBackend().whole_run(xs, plan, np.int64(1), True, out) == []


# -- diagnostics ---------------------------------------------------------------------------------------


def test_diagnostics_bad_numbers_are_named():
    xs = _xs(2)
    raises("threshold 'outlier' must be a number, got 'far'", ak.diagnostics, xs, thresholds={"outlier": "far"})
    raises("chunk_mb must be a finite number > 0, got inf", ak.diagnostics, xs, chunk_mb=float("inf"))


def test_ak_diagnostics_stays_the_function_whatever_was_imported_first():
    """The function shares its submodule's name: importing the submodule first (as the ``inspect``
    CLI and ``from ame_kernels.diagnostics import soup_gain`` do) must not make it a module. A fresh
    interpreter, since in this one the import order is already fixed by the test files."""
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys, ame_kernels.diagnostics, ame_kernels as ak\n"
            "from ame_kernels.diagnostics import soup_gain\n"
            "print(callable(ak.diagnostics), ak.diagnostics is sys.modules['ame_kernels.diagnostics'].diagnostics)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                          capture_output=True, text=True)
    assert proc.stdout.split() == ["True", "True"], proc.stdout + proc.stderr


@pytest.mark.parametrize("backend", cpu_backends())
def test_float16_overflow_is_an_error_not_inf(backend):
    """Finite float16 ingredients whose merge leaves float16's range (an overshooting lr, a large
    zeta) would be rounded to Inf; check_finite names the tensor instead, and
    check_finite=False keeps the old behaviour (as ame-merge does)."""
    xs = [{"w": torch.full((5,), 6.0e4, dtype=torch.float16), "b": torch.zeros(3, dtype=torch.float16)}
          for _ in range(2)]
    xs[1]["w"] = torch.full((5,), 6.5e4, dtype=torch.float16)
    cfg = dict(optimizer="sgd", lr=4.0, lr_schedule="constant", backend=backend)  # overshoots to ~1e5
    raises(r"tensor 'w'.*float16 range", ak.merge, xs, **cfg)
    out = ak.merge(xs, **cfg, check_finite=False)
    assert torch.isinf(out["w"]).all() and torch.equal(out["b"], xs[0]["b"])
    assert torch.isfinite(ak.merge(xs, **cfg, out_dtype="float32")["w"]).all()
