"""Fast versions of the paper reproductions (benchmarks/repro) and of the demo pipeline.

- Appendix F.3: on a Cauchy sample, Adam-AME with the paper's settings lands closer to the
  true location than the soup (the sample mean), in median over trials;
- Proposition 2(i): GD with constant lr 1/(k+1) cycles on the four points; 2(ii): with a
  decaying lr the steps vanish (and the harmonic schedule ends at the soup);
- the digits pipeline end to end on a tiny setting: every ingredient and merge is evaluated,
  checkpoints are real folders, the CLI soup is the GD identity (= the mean of the ingredients).
"""

import math
import os
import sys

import numpy as np
import pytest
import torch

REPRO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "repro")


def _load(name):
    """Import benchmarks/repro/<name>.py under a private name, without leaving that folder on sys.path
    (its run_all.py must not shadow benchmarks/run_all.py for other tests)."""
    import importlib.util

    sys.path.insert(0, REPRO)  # for its `from _common import ...`
    try:
        spec = importlib.util.spec_from_file_location(f"ame_repro_{name}", os.path.join(REPRO, f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(REPRO)


cauchy = _load("cauchy")
prop2 = _load("prop2")

from ame_kernels import demo  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- Appendix F.3


def test_cauchy_adam_ame_beats_the_soup_in_median():
    s = cauchy.draw("cauchy", 12, seed=1)  # [12 trials, 300 points, 2]
    ame = cauchy.ame(s, cauchy.adam_cfg(0.1), seed=1)  # the paper's Adam-AME, from (10, 10)
    err_ame = np.linalg.norm(ame, axis=1)
    err_soup = np.linalg.norm(s.mean(1), axis=1)
    err_median = np.linalg.norm(np.median(s, axis=1), axis=1)
    assert np.all(np.isfinite(ame))
    assert np.median(err_ame) < np.median(err_soup), (err_ame, err_soup)
    # it really left the adversarial start (10, 10) and sits within ~1 of the median
    assert np.max(err_ame) < 5.0
    assert np.median(np.linalg.norm(ame - np.median(s, axis=1), axis=1)) < 1.0
    # and the median itself is the better estimator still (AME's constant-lr noise floor)
    assert np.median(err_median) < np.median(err_ame)


def test_cauchy_mle_is_a_stationary_point():
    rng = np.random.default_rng(0)
    x = rng.standard_cauchy((301, 3)) + np.array([1.0, -2.0, 0.5])
    mu = cauchy.cauchy_mle(x)
    score = np.sum(2 * (x - mu) / (1 + (x - mu) ** 2), axis=0)  # d/dmu of the log-likelihood
    assert np.all(np.abs(score) < 1e-8)
    assert np.all(np.abs(mu - np.median(x, axis=0)) < 0.5)


def test_cauchy_batched_trials_equal_separate_merges():
    s = cauchy.draw("gaussian", 3, seed=2)
    cfg = {**cauchy.adam_cfg(0.01), "epochs": 5}
    batched = cauchy.ame(s, cfg, seed=3)
    single = np.stack([cauchy.ame(s[i : i + 1], cfg, seed=3)[0] for i in range(3)])
    np.testing.assert_allclose(batched, single, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- Proposition 2


@pytest.mark.parametrize("k,omega", [(2.0, 1.0), (0.5, 3.0)])
def test_prop2_constant_lr_cycles_on_the_l1_ball(k, omega):
    x = prop2.points(k, omega)
    w0 = torch.tensor([omega, 0.0])
    p = prop2.path(x, w0, "constant", k, epochs=3)  # 12 steps, one merge call each
    expected = np.array([[omega, 0], [0, omega], [-omega, 0], [0, -omega]] * 3 + [[omega, 0]], dtype=np.float64)
    np.testing.assert_allclose(p, expected, atol=1e-5 * omega)
    steps = np.linalg.norm(np.diff(p, axis=0), axis=1)
    np.testing.assert_allclose(steps, omega * math.sqrt(2), rtol=1e-5)  # never shrinks: no convergence
    # the whole-run merge (one call, 40 epochs = 160 steps) is back at the start, not at the soup (0, 0)
    end = prop2.whole_run(x, w0, "constant", k, epochs=40).numpy()
    np.testing.assert_allclose(end, [omega, 0.0], atol=1e-4 * omega)


def test_prop2_decaying_lr_converges():
    k, omega = 2.0, 1.0
    x = prop2.points(k, omega)
    w0 = torch.tensor([omega, 0.0])
    p = prop2.path(x, w0, "power", k, epochs=25)  # lr_t = t^-1.5 / (k+1): alpha < -1
    steps = np.linalg.norm(np.diff(p, axis=0), axis=1)
    assert steps[-4:].max() < 1e-2 * steps[:4].max()
    end = prop2.whole_run(x, w0, "power", k, epochs=25).numpy()
    np.testing.assert_allclose(end, p[-1], atol=1e-5)
    ends = p[::4]
    assert np.linalg.norm(ends[-1] - ends[-2]) < 1e-3  # consecutive epoch ends (the cycle: 0)
    # harmonic lr (amplification N): the running mean, i.e. exactly the soup after each epoch
    h = prop2.whole_run(x, w0, "harmonic", k, epochs=5).numpy()
    np.testing.assert_allclose(h, x.double().mean(0).numpy(), atol=1e-5)


# --------------------------------------------------------------------------- digits pipeline


def test_digits_pipeline_end_to_end(tmp_path):
    setting = demo.Setting(n_ingredients=3, excluded=1, hidden=16, train_epochs=2, seed=0)
    ame = {"Adam-AME": dict(optimizer="adam", lr=1e-2)}  # two CLI calls in all (soup + Adam): seconds each
    res = demo.run_setting(setting, str(tmp_path), ame=ame, via="auto", cross_check=True)
    methods = [r["method"] for r in res.rows]
    assert methods[:3] == ["ingredient 0", "ingredient 1", "ingredient 2"]
    assert {"uniform soup", "greedy soup", "greedy soup (asc)", "best ingredient (by val)", "Adam-AME"} <= set(methods)
    for r in res.rows:
        assert 0.0 <= r["val"] <= 1.0 and 0.0 <= r["test"] <= 1.0, r
    # each ingredient excluded its class and is a real checkpoint folder
    for j, d in enumerate(res.ingredient_dirs):
        assert os.path.isfile(os.path.join(d, "model.safetensors")) and os.path.isfile(os.path.join(d, "config.json"))
        assert res.rows[j]["excluded"] == [[0], [3], [6]][j]
    # the soup is the GD identity: equal to the plain mean of the saved ingredients
    assert res.soup_identity_maxdiff < 1e-6
    ings = [demo.load_checkpoint(d) for d in res.ingredient_dirs]
    mean = {k: torch.stack([sd[k] for sd in ings]).mean(0) for k in ings[0]}
    data = demo.load_splits(0, setting)
    assert res.row("uniform soup")["test"] == pytest.approx(demo.accuracy(mean, data["Xte"], data["yte"], 16), abs=1e-9)
    if demo.cli_available():
        # merged through the CLI: output folders exist and match the in-memory merge
        assert os.path.isfile(tmp_path / "merged" / "Adam-AME" / "model.safetensors")
        assert max(res.cli_vs_api_maxdiff.values()) < 1e-6
    # Adam-AME moved away from the soup (it is not the identity merge)
    adam = demo.load_checkpoint(str(tmp_path / "merged" / "Adam-AME")) if demo.cli_available() else None
    if adam is not None:
        assert max(float((adam[k] - mean[k]).abs().max()) for k in mean) > 1e-3
    best = res.row("best ingredient (by val)")
    assert best["val"] == max(r["val"] for r in res.rows if r["kind"] == "ingredient")


def test_demo_main_prints_every_row(tmp_path, capsys):
    # the `make demo` entry point on a tiny setting, in memory (the CLI path is covered above)
    assert demo.main(["--ingredients", "3", "--excluded", "1", "--epochs", "1", "--out", str(tmp_path), "--via", "api"]) == 0
    out = capsys.readouterr().out
    for name in ("best ingredient (by val)", "uniform soup", "greedy soup", *demo.DEFAULT_AME):
        assert name in out
    assert os.path.isfile(tmp_path / "ingredient_01" / "model.safetensors")
