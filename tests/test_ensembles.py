"""Output ensembles and soupability from outputs: hand-computed averages, CKA/KL properties, Spearman."""

import math

import pytest
import torch
from torch import nn

import ame_kernels as ak
from ame_kernels.errors import MergeError


class MLP(nn.Module):
    def __init__(self, d=6, h=8, c=4):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, h), nn.Tanh())
        self.fc = nn.Linear(h, c)

    def forward(self, x):
        return self.fc(self.body(x))


def _models(n=3, seed=0):
    torch.manual_seed(seed)
    return [MLP() for _ in range(n)]


def _x(seed=1, n=32):
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))


def test_logit_ensemble_is_the_mean_of_logits():
    ms, x = _models(), _x()
    out = ak.ensemble([m.state_dict() for m in ms], MLP(), x, kind="logits")
    with torch.no_grad():
        ref = torch.stack([m(x) for m in ms]).mean(0)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(ak.ensemble(ms, MLP(), x), ref)  # modules work too


def test_feature_ensembles_hand_computed():
    ms, x = _models(), _x()
    with torch.no_grad():
        feats = torch.stack([m.body(x) for m in ms]).mean(0)
        W = torch.stack([m.fc.weight for m in ms]).mean(0)
        b = torch.stack([m.fc.bias for m in ms]).mean(0)
        ref = feats @ W.T + b
        ref_first = ms[0].fc(feats)
    torch.testing.assert_close(ak.ensemble(ms, MLP(), x, kind="features"), ref)  # head found: fc
    torch.testing.assert_close(ak.ensemble(ms, MLP(), x, kind="features", head="fc"), ref)
    torch.testing.assert_close(ak.ensemble(ms, MLP(), x, kind="features_first_head", head="fc"), ref_first)
    # in batches of 5 rows (32 is not a multiple): the same outputs
    torch.testing.assert_close(ak.ensemble(ms, MLP(), x, kind="features", batch_size=5), ref)
    torch.testing.assert_close(ak.ensemble(ms, MLP(), x, batch_size=5), ak.ensemble(ms, MLP(), x))


def _accuracy(y):
    return lambda out: float((out.argmax(1) == y).float().mean())


def test_greedy_ensemble_starts_at_best_and_never_worse():
    ms, x = _models(4, seed=3), _x(n=64)
    y = ms[2](x).argmax(1).detach()  # model 2 is perfect on these labels
    out, members = ak.greedy_ensemble(ms, MLP(), x, _accuracy(y))
    assert members[0] == 2 and _accuracy(y)(out) == 1.0
    rows = ak.compare_outputs({"soup": ak.uniform_soup([m.state_dict() for m in ms])}, ms, MLP(), x, _accuracy(y))
    by = {r["name"]: r["score"] for r in rows}
    assert by["best ingredient"] == 1.0 and by["greedy logit ensemble"] >= by["best ingredient"]
    assert {"soup", "logit ensemble", "feature ensemble", "greedy feature ensemble", "mean ingredient"} <= set(by)


def test_ensemble_bad_input():
    ms, x = _models(2), _x()
    bad = {("layer." + k): v for k, v in ms[0].state_dict().items()}
    with pytest.raises(MergeError, match="model 1's names do not match.*missing 'body.0.bias'"):
        ak.ensemble([ms[0].state_dict(), bad], MLP(), x)
    with pytest.raises(MergeError, match="kind must be one of"):
        ak.ensemble(ms, MLP(), x, kind="probs")
    with pytest.raises(MergeError, match="no module 'head'"):
        ak.ensemble(ms, MLP(), x, kind="features", head="head")
    with pytest.raises(MergeError, match="need at least 1 model"):
        ak.ensemble([], MLP(), x)


# ------------------------------------------------------------------ soupability


def test_cka_identity_orthogonal_and_scale_invariance():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 7, generator=g)
    Q, _ = torch.linalg.qr(torch.randn(7, 7, generator=g))
    assert ak.linear_cka(X, X) == pytest.approx(1.0, abs=1e-12)
    assert ak.linear_cka(X, 3.5 * X @ Q) == pytest.approx(1.0, abs=1e-10)
    assert ak.linear_cka(X, X + 4.0) == pytest.approx(1.0, abs=1e-10)  # centred
    Y = torch.randn(50, 5, generator=g)
    c = ak.linear_cka(X, Y)
    assert 0.0 <= c < 0.6 and c == pytest.approx(ak.linear_cka(Y, X))
    with pytest.raises(MergeError, match="same number of rows"):
        ak.linear_cka(X, Y[:10])


def test_kl_and_mse_of_logits():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(20, 5, generator=g)
    assert ak.logit_kl(a, a) == 0.0 and ak.logit_mse(a, a) == 0.0
    assert ak.logit_kl(a, a + 3.0) == pytest.approx(0.0, abs=1e-12)  # softmax is shift-invariant
    b = torch.randn(20, 5, generator=g)
    p, q = a.double().softmax(1), b.double().softmax(1)
    ref = float((p * (p.log() - q.log())).sum(1).mean())
    assert ak.logit_kl(a, b) == pytest.approx(ref, rel=1e-10)
    assert ak.logit_mse(a, b) == pytest.approx(float(((a - b) ** 2).mean()))


def test_spearman_against_hand_values():
    assert ak.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert ak.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties get average ranks: x ranks [1, 2.5, 2.5, 4], y ranks [1, 2, 3, 4]
    assert ak.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)
    assert math.isnan(ak.spearman([1, 1, 1], [1, 2, 3]))


def test_output_diagnostics_pairs_and_report():
    ms = _models(3, seed=5)
    ms.append(MLP())
    ms[3].load_state_dict(ms[0].state_dict())  # a duplicate of model 0
    x = _x(n=40)
    y = ms[1](x).argmax(1).detach()
    rows = ak.output_diagnostics(ms, MLP(), (x, y), head="fc")
    assert len(rows) == 6 and {"pair", "kl", "mse", "cka_logits", "cka_features", "l2", "cosine", "gain"} <= set(rows[0])
    dup = next(r for r in rows if r["pair"] == (0, 3))
    assert dup["kl"] == 0.0 and dup["mse"] == 0.0 and dup["cka_logits"] == pytest.approx(1.0)
    assert dup["l2"] == 0.0 and dup["gain"] == pytest.approx(0.0, abs=1e-6)  # the soup of twins is the twin
    rep = ak.soupability_report(rows)
    assert set(rep) == {"kl", "mse", "cka_logits", "cka_features", "l2", "cosine"}
    assert all(-1.0 <= v <= 1.0 or math.isnan(v) for v in rep.values())
    with pytest.raises(MergeError, match="'gain'"):
        ak.soupability_report([{"kl": 1.0}, {"kl": 2.0}])


def test_diagnostics_with_model_and_data_adds_output_rows(tmp_path, capsys):
    """ak.diagnostics(..., model=, data=) and `ame-merge inspect --data` report, per pair, what the
    outputs say (KL of identical models is 0) beside the weight statistics."""
    import os

    from safetensors.torch import save_file

    from ame_kernels.cli import main

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    a = {k: v.detach().clone() for k, v in net.state_dict().items()}
    b = {k: v + 0.3 * torch.randn_like(v) for k, v in a.items()}
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    d = ak.diagnostics([a, a, b], model=net, data=(x, y))
    rows = {r["pair"]: r for r in d.outputs}
    assert set(rows) == {(0, 1), (0, 2), (1, 2)}
    assert rows[(0, 1)]["kl"] == 0.0 and rows[(0, 1)]["gain"] == 0.0 and rows[(0, 2)]["kl"] > 0
    assert "from the outputs on the held-out data" in d.table() and d.to_dict()["outputs"][0]["pair"] == [0, 1]
    with pytest.raises(ak.MergeError, match="give model= and data= together"):
        ak.diagnostics([a, b], model=net)
    paths = []
    for i, sd in enumerate((a, b)):
        os.makedirs(tmp_path / f"m{i}")
        save_file(sd, str(tmp_path / f"m{i}" / "model.safetensors"))
        paths.append(str(tmp_path / f"m{i}"))
    torch.save({"x": x, "y": y, "state": a}, tmp_path / "held_out.pt")
    (tmp_path / "probe.py").write_text(
        "import torch\n"
        "def held_out():\n"
        "    net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))\n"
        f"    d = torch.load({str(tmp_path / 'held_out.pt')!r})\n"
        "    return {'model': net, 'data': (d['x'], d['y'])}\n")
    assert main(["inspect", *paths, "--data", f"{tmp_path / 'probe.py'}:held_out"]) == 0
    out = capsys.readouterr().out
    assert "from the outputs on the held-out data" in out and "0-1" in out
