"""Greedy AME (Appendix A.4) and the config strategies, on every CPU backend."""

import argparse
import os

import pytest
import torch
import yaml

import ame_kernels as ak
from ame_kernels.greedy import GreedyStep, greedy_merge
from ame_kernels.stew import Stew
from ame_kernels.strategies import load_callable, run_cli, run_strategy
from tolerances import assert_close

from backends import cpu_backends


pytestmark = pytest.mark.parametrize("backend", cpu_backends())

SIZE = 29
CONFIGS = {
    "adam": dict(optimizer="adam", lr=0.05, betas=(0.8, 0.99)),
    "sgd_momentum": dict(optimizer="sgd", lr=0.5, lr_schedule="constant", momentum=0.5, amplification=5.0),
}


def _family(n=5):
    return [torch.randn(SIZE) for _ in range(n)]


class Counter:
    """An evaluate that always improves (each call scores higher): greedy then keeps every step."""

    def __init__(self):
        self.calls = 0

    def __call__(self, model):
        self.calls += 1
        return float(self.calls)


@pytest.mark.parametrize("start", ["worst", "best"])
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_all_accepted_equals_merge(backend, cfg, start):
    """When every step improves, greedy AME is exactly ak.merge from the start ingredient in score order."""
    xs = _family()
    scores = [0.3, 0.9, 0.1, 0.5, 0.7]
    config = ak.AMEConfig(backend=backend, **CONFIGS[cfg])
    merged, history = greedy_merge(xs, Counter(), config, scores=scores, start=start)
    assert all(h.accepted for h in history) and [h.step for h in history] == [1, 2, 3, 4, 5]
    order = [2, 0, 3, 4, 1] if start == "worst" else [1, 4, 3, 0, 2]
    assert [h.ingredient for h in history] == order
    expected = ak.merge(xs, config, pivot=order[0], scores=scores, descending=(start == "best"), backend="reference")
    assert_close(merged, expected, what="greedy with every step kept vs ak.merge")


@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_rejected_steps_leave_no_trace(backend, cfg):
    """Rejected steps restore weights, optimizer state and t: the result is a run of the kept steps only."""
    xs = _family(6)
    config = ak.AMEConfig(backend=backend, **CONFIGS[cfg])
    reject = {2, 4, 5}  # evaluate calls (0 = the start model) whose candidate is rejected

    calls = []

    def evaluate(model):
        calls.append(model.clone())
        k = len(calls) - 1
        return -1e9 if k in reject else float(k)

    merged, history = greedy_merge(xs, evaluate, config, scores=list(range(6)), start="worst")
    assert [h.accepted for h in history] == [True, False, True, False, False, True]
    assert [h.step for h in history] == [1, 1, 2, 2, 2, 3]
    # The same stew with only the kept ingredients (0, 2, 5) added: bit for bit the same.
    stew = Stew(xs[0], config, mode="merge", n=6)
    for i in (0, 2, 5):
        stew.add(xs[i])
    assert torch.equal(merged, stew.weights)
    assert torch.equal(calls[-1], merged)


def test_rejection_uses_strict_improvement_and_scores_none(backend):
    """scores=None: evaluate scores each ingredient first; a candidate that only ties is rejected."""
    xs = [torch.full((SIZE,), v) for v in (3.0, -1.0, 2.0)]

    def evaluate(model):  # closer to 0 is better; the ensemble never beats -|best| + ...
        return -float(model.abs().mean())

    merged, history = greedy_merge(xs, evaluate, optimizer="sgd", lr=1.0, lr_schedule="constant",
                                   amplification=3.0, adaptive_pivot=True, backend=backend, start="best")
    # order by score descending: -1 (score -1), 2 (-2), 3 (-3); w0 = -1.
    assert [h.ingredient for h in history] == [1, 2, 0]
    # step on the start itself: g = 0, the candidate ties the start: rejected (strictly better needed)
    assert history[0].accepted is False and history[0].score == -1.0
    # GD lr 1 zeta=N: w_1 = x_i (the candidate is the ingredient itself): worse -> rejected
    assert [h.accepted for h in history[1:]] == [False, False]
    assert torch.equal(merged, xs[1])


def test_state_dicts_and_history_types(backend):
    sds = [{"a": torch.randn(4, 3), "n": torch.tensor([1, 2])} for _ in range(3)]
    merged, history = greedy_merge(sds, lambda m: float(-m["a"].norm()), optimizer="adam", lr=0.1, backend=backend,
                                   scores=[1.0, 2.0, 3.0], batch_size=2)
    assert set(merged) == {"a", "n"} and torch.equal(merged["n"], sds[0]["n"])
    assert all(isinstance(h, GreedyStep) for h in history)
    assert history[0].ingredient == (0, 1) and history[1].ingredient == 2


def test_greedy_bad_input(backend):
    xs = _family(3)
    with pytest.raises(ak.MergeError, match="start must be"):
        greedy_merge(xs, Counter(), start="middle", backend=backend)
    with pytest.raises(ak.MergeError, match="expected 3 scores"):
        greedy_merge(xs, Counter(), scores=[1, 2], backend=backend)
    with pytest.raises(ak.MergeError, match="evaluate must be callable"):
        greedy_merge(xs, "not callable", backend=backend)
    with pytest.raises(ak.MergeError, match="NaN"):
        greedy_merge(xs, lambda m: float("nan"), backend=backend)
    with pytest.raises(ak.MergeError, match="must return a number"):
        greedy_merge(xs, lambda m: "good", backend=backend)
    with pytest.raises(ak.MergeError, match="not in the config"):
        greedy_merge(xs, Counter(), scores=None, order=[2, 1, 0], backend=backend)


# --------------------------------------------------------------------------- strategies from a config

EVAL_MODULE = """
import torch
def closeness(sd):
    return -float(sum((t.float() - 1.0).pow(2).sum() for t in sd.values() if t.is_floating_point()))
"""


def test_run_strategy_each_strategy(backend, tmp_path):
    (tmp_path / "evalmod.py").write_text(EVAL_MODULE)
    sds = [{"w": torch.randn(3, 5) + 1.0, "b": torch.randn(4) + 1.0} for _ in range(4)]
    evaluate = load_callable("evalmod.py:closeness", str(tmp_path))
    cfg = {"optimizer": "adam", "lr": 0.05, "backend": backend}
    merged = run_strategy("greedy", sds, cfg, {"evaluate": "evalmod.py:closeness", "start": "best"}, base_dir=str(tmp_path))
    direct, _ = greedy_merge(sds, evaluate, ak.AMEConfig(**cfg), start="best")
    assert all(torch.equal(merged[k], direct[k]) for k in direct)
    soup = run_strategy("uniform_soup", sds, cfg)
    assert_close(soup["w"], torch.stack([d["w"] for d in sds]).mean(0), what="uniform soup")
    ws = run_strategy("weighted_soup", sds, cfg, {"weights": [1, 0, 0, 1]})
    assert_close(ws["b"], (sds[0]["b"] + sds[3]["b"]) / 2, what="weighted soup")
    stew = run_strategy("stew", sds, {"backend": backend, "pivot": 0}, {"mode": "server"})
    assert_close(stew["w"], torch.stack([d["w"] for d in sds]).mean(0), what="default server stew = running soup")
    stew = run_strategy("stew", sds, {**cfg, "pivot": 1}, {"mode": "merge"})
    expected = ak.merge(sds, ak.AMEConfig(**cfg), pivot=1, backend="reference")
    assert_close(stew["w"], expected["w"], what="merge-mode stew = ak.merge")
    gs = run_strategy("greedy_soup", sds, cfg, {"evaluate": evaluate})
    assert set(gs) == {"w", "b"}
    with pytest.raises(ak.MergeError, match="needs 'evaluate"):
        run_strategy("greedy", sds, cfg, {})
    with pytest.raises(ak.MergeError, match="unknown strategy"):
        run_strategy("ties", sds, cfg, {})
    with pytest.raises(ak.MergeError, match="cannot import"):
        load_callable("no_such_module_xyz:f")
    with pytest.raises(ak.MergeError, match="has no attribute"):
        load_callable("evalmod.py:nothing", str(tmp_path))


def test_run_cli_greedy_end_to_end(backend, tmp_path):
    """A 'strategy: greedy' config: checkpoints on disk in, an output folder with model.safetensors out."""
    from safetensors.torch import load_file, save_file

    (tmp_path / "evalmod.py").write_text(EVAL_MODULE)
    sds = [{"w": (torch.randn(3, 5) + 1.0).to(torch.bfloat16), "b": torch.randn(4) + 1.0} for _ in range(3)]
    for i, sd in enumerate(sds):
        os.makedirs(tmp_path / f"m{i}")
        save_file(sd, str(tmp_path / f"m{i}" / "model.safetensors"))
    (tmp_path / "m0" / "config.json").write_text("{}")
    doc = {"models": [{"path": f"m{i}", "score": s} for i, s in enumerate([0.2, 0.9, 0.5])],
           "strategy": "greedy", "evaluate": "evalmod.py:closeness", "start": "best",
           "optimizer": "adam", "lr": 0.05}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(doc))
    args = argparse.Namespace(config=str(tmp_path / "cfg.yaml"), out_dir=str(tmp_path / "out"), backend=backend,
                              threads=None, out_dtype=None, force=False, dry_run=False, quiet=True)
    assert run_cli(args) == 0
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert out["w"].dtype == torch.bfloat16 and (tmp_path / "out" / "config.json").exists()
    evaluate = load_callable("evalmod.py:closeness", str(tmp_path))
    direct, _ = greedy_merge(sds, evaluate, optimizer="adam", lr=0.05, scores=[0.2, 0.9, 0.5], start="best",
                             backend=backend)
    assert torch.equal(out["w"], direct["w"]) and torch.equal(out["b"], direct["b"])
    assert run_cli(args) == 2  # the output exists: refused without --force
    doc["evaluate"] = "evalmod.py:missing"
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(doc))
    args.config, args.out_dir = str(tmp_path / "bad.yaml"), str(tmp_path / "out2")
    assert run_cli(args) == 2 and not (tmp_path / "out2").exists()


def test_ame_merge_cli_runs_a_strategy_config(backend, tmp_path):
    """`ame-merge CONFIG.yaml OUT` with 'strategy: stew' goes through ame_kernels.strategies (cli.main hook)."""
    from safetensors.torch import load_file, save_file

    from ame_kernels.cli import main

    sds = [{"w": torch.randn(4, 6)} for _ in range(3)]
    for i, sd in enumerate(sds):
        save_file(sd, str(tmp_path / f"m{i}.safetensors"))
    doc = {"models": [f"m{i}.safetensors" for i in range(3)], "strategy": "stew", "mode": "server", "pivot": 0}
    (tmp_path / "stew.yaml").write_text(yaml.safe_dump(doc))
    assert main([str(tmp_path / "stew.yaml"), str(tmp_path / "out"), "--backend", backend, "--quiet"]) == 0
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert_close(out["w"], torch.stack([d["w"] for d in sds]).mean(0), what="server stew = running soup")
    doc["strategy"] = "greedy"  # no evaluate: a usage error, nothing written
    (tmp_path / "greedy.yaml").write_text(yaml.safe_dump(doc))
    assert main([str(tmp_path / "greedy.yaml"), str(tmp_path / "out2"), "--backend", backend, "--quiet"]) == 2
    assert not (tmp_path / "out2").exists()


def test_strategy_cli_force_never_replaces_an_input_and_copies_remote_code(backend, tmp_path):
    """The strategy path of ame-merge protects its inputs as the merge path does (--force on an
    input folder, or on the folder holding the inputs and the config, is a usage error that
    deletes nothing), and carries the pivot folder's config and remote-code files over."""
    from safetensors.torch import save_file

    from ame_kernels.cli import main

    for i in range(3):
        os.makedirs(tmp_path / f"m{i}")
        save_file({"w": torch.randn(4, 6)}, str(tmp_path / f"m{i}" / "model.safetensors"))
    (tmp_path / "m0" / "config.json").write_text('{"auto_map": {}}')
    (tmp_path / "m0" / "modeling_custom.py").write_text("# remote code\n")
    doc = {"models": [f"m{i}" for i in range(3)], "strategy": "stew", "mode": "server", "pivot": 0}
    cfg = tmp_path / "stew.yaml"
    cfg.write_text(yaml.safe_dump(doc))
    for target in (tmp_path / "m0", tmp_path):
        assert main([str(cfg), str(target), "--force", "--backend", backend, "--quiet"]) == 2
        assert (tmp_path / "m0" / "model.safetensors").exists() and cfg.exists()
    assert main([str(cfg), str(tmp_path / "out"), "--backend", backend, "--quiet"]) == 0
    assert (tmp_path / "out" / "config.json").exists() and (tmp_path / "out" / "modeling_custom.py").exists()


def test_greedy_soup_log_names_its_starting_model(backend):
    sds = [{"w": torch.full((3,), float(v))} for v in (0.0, 1.0, 2.0)]
    lines = []
    run_strategy("greedy_soup", sds, {"backend": backend}, {"evaluate": lambda sd: -float(sd["w"].sum())},
                 log=lines.append)
    assert lines[0] == "greedy_soup: starts from model 0 (the best by score)", lines
