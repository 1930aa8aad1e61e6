"""Every bad input raises ak.MergeError (a ValueError) before any work, naming the culprit."""

import pytest
import torch

import ame_kernels as ak


def _sd(**shapes):
    return {k: torch.randn(*v) for k, v in shapes.items()}


def raises(match, fn, *a, **kw):
    with pytest.raises(ak.MergeError, match=match) as e:
        fn(*a, **kw)
    assert isinstance(e.value, ValueError)
    return e.value


def test_no_ingredients():
    raises("at least 1 ingredient", ak.merge, [])


def test_mixed_kinds():
    raises("all tensors or all state dicts", ak.merge, [torch.randn(3), {"a": torch.randn(3)}])


def test_single_dict_is_not_a_list():
    raises("list of state dicts", ak.merge, {"a": torch.randn(3)})


def test_missing_and_extra_names_are_listed():
    a = _sd(w=(3,), b=(2,))
    b = _sd(w=(3,), c=(2,))
    msg = str(raises("ingredient 2", ak.merge, [a, a, b, _sd(w=(3,))]))
    assert "missing ['b'], extra ['c']" in msg and "ingredient 3: missing ['b'], extra none" in msg
    assert "ingredient 1" not in msg


def test_shape_mismatch_names_tensor_and_ingredient():
    msg = str(raises("'layer.w'", ak.merge, [_sd(**{"layer.w": (3, 4)}), _sd(**{"layer.w": (4, 3)})]))
    assert "ingredient 1" in msg and "(4, 3)" in msg


def test_device_mismatch():
    a = torch.randn(3)
    b = torch.empty(3, device="meta")
    raises("meta", ak.merge, [a, b])


@pytest.mark.parametrize("field,value,match", [
    ("optimizer", "adamm", r"unknown optimizer 'adamm'.*did you mean 'adam'"),
    ("lr", 0.0, "lr"),
    ("lr", -1.0, "lr"),
    ("epochs", 0, "epochs"),
    ("batch_size", 0, "batch_size"),
    ("betas", (0.9, 1.0), "betas"),
    ("betas", (-0.1, 0.9), "betas"),
    ("lr_schedule", "cosine", "lr_schedule.*valid choices"),
    ("backend", "gpu", "backend"),
    ("out_dtype", "int8", "out_dtype"),
    ("pivot", "mean", "pivot"),
    ("momentum", 1.5, "momentum"),
    ("eps", -1.0, "eps"),
])
def test_bad_hyperparameter_is_named(field, value, match):
    raises(match, ak.merge, [torch.randn(3)] * 2, **{field: value})


def test_unknown_option_suggests_closest():
    raises(r"unknown option 'learning_rate'|unknown option 'lr_shedule'.*lr_schedule", ak.merge,
           [torch.randn(3)], lr_shedule="constant")


def test_non_float_pivot():
    raises("pivot.*floating", ak.merge, [torch.randn(3)] * 2, pivot=torch.arange(3))


def test_pivot_shape_and_index():
    raises("pivot.*shape", ak.merge, [torch.randn(3)] * 2, pivot=torch.randn(4))
    raises("pivot index 5 is out of range", ak.merge, [torch.randn(3)] * 2, pivot=5)


def test_schedule_of_wrong_length():
    raises("lr_schedule: expected 4 values", ak.merge, [torch.randn(3)] * 4, lr_schedule=[0.1, 0.2])
    raises("amplification: expected 8 values", ak.merge, [torch.randn(3)] * 4, epochs=2, amplification=[1.0])


def test_bad_order_and_scores():
    raises("order", ak.merge, [torch.randn(3)] * 3, order=[0, 0, 1])
    raises("scores", ak.merge, [torch.randn(3)] * 3, scores=[1.0, 2.0])


def test_nan_names_tensor_and_ingredient():
    a, b = _sd(w=(4,), v=(2,)), _sd(w=(4,), v=(2,))
    b["v"][1] = float("inf")
    msg = str(raises("'v'", ak.merge, [a, b]))
    assert "ingredient 1" in msg and "NaN or Inf" in msg
    out = ak.merge([a, b], check_finite=False, backend="reference")  # the check can be turned off
    assert not torch.isfinite(out["v"]).all()


def test_errors_happen_before_any_backend_work(monkeypatch):
    """Validation precedes compute: a backend that records calls is never called on bad input."""
    from ame_kernels.backends.reference import ReferenceBackend

    calls = []
    monkeypatch.setattr(ReferenceBackend, "whole_run", lambda self, *a, **k: calls.append(1))
    a, b = _sd(w=(4,), v=(2,)), _sd(w=(4,), v=(2,))
    b["v"][0] = float("nan")
    with pytest.raises(ak.MergeError):
        ak.merge([a, b], backend="reference")
    assert calls == []


def test_non_float_tensors_copied_with_warning():
    a = {"w": torch.randn(3), "step": torch.tensor([3])}
    b = {"w": torch.randn(3), "step": torch.tensor([4])}
    with pytest.warns(UserWarning, match="'step'.*ingredients \\[1\\]"):
        out = ak.merge([a, b], backend="reference")
    assert out["step"].item() == 3 and list(out) == ["w", "step"]


def test_config_round_trip_and_overrides():
    cfg = ak.AMEConfig(optimizer="adam", lr="1e-3", eps="1e-8", betas=["0.8", 0.99], epochs="3")
    assert cfg.lr == 1e-3 and cfg.eps == 1e-8 and cfg.betas == (0.8, 0.99) and cfg.epochs == 3
    assert ak.AMEConfig.from_dict(cfg.to_dict()) == cfg
    xs = [torch.randn(5) for _ in range(3)]
    a = ak.merge(xs, cfg, epochs=1, backend="reference")
    b = ak.merge(xs, optimizer="adam", lr=1e-3, betas=(0.8, 0.99), epochs=1, backend="reference")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_schedule_too_long_to_hold_is_refused_at_once():
    """epochs: 1e8 used to plan for minutes and end in a MemoryError; now one clear error before planning."""
    with pytest.raises(ak.MergeError, match=r"AMEConfig.epochs: 100000000 epochs x 3 ingredients .* more than a plan holds"):
        ak.schedule(ak.AMEConfig(epochs=10**8), 3)
    plan = ak.schedule(ak.AMEConfig(epochs=4, batch_size=2), 3)  # the compact batches are the same batches
    assert plan.batch_ptr.tolist() == [0, 2, 3, 5, 6, 8, 9, 11, 12] and plan.batch_idx.tolist() == [0, 1, 2] * 4


def test_sparse_tensors_are_named():
    import torch

    with pytest.raises(ak.MergeError, match=r"ingredient 0 is a sparse_coo tensor; merging needs dense tensors"):
        ak.merge([torch.eye(3).to_sparse(), torch.eye(3).to_sparse()])
