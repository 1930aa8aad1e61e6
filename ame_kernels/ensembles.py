"""Output ensembles, the baseline every merge is measured against ("Rethinking weight-averaged
model merging", Section 6.2), and the greedy ensembles.

    out = ak.ensemble([sd_a, sd_b, sd_c], model, x, kind="logits")          # mean of the logits
    out = ak.ensemble(sds, model, x, kind="features", head="fc")            # mean features, mean head
    out, members = ak.greedy_ensemble(sds, model, x, score_fn)              # greedy, in output space
    rows = ak.compare_outputs({"soup": soup, "ame": merged}, sds, model, x, score_fn)

One architecture (``model``, an ``nn.Module``) is evaluated with each state dict through
``torch.func.functional_call``: the N models are never instantiated. ``kind``:

- ``"logits"``: (1/N) sum_i f_i(x), the logits (before softmax) averaged ("Ens Logits");
- ``"features"``: the penultimate features h_i(x) (the input of the ``head`` module, by
  default the last module that holds parameters) averaged, then classified by the head whose
  parameters are the mean of the N heads' ("Ens Features": "the merging of the last FC layers
  from all merged models for classification");
- ``"features_first_head"``: the mean features classified by the first model's head
  ("Ens Features*").

The greedy ensembles ("Grd Ens Lgt" / "Grd Ens Fts") follow the greedy-soup recipe in output
space: rank the models by their own score, start from the best, and add each next one only if
the ensemble's score strictly improves. Each model's outputs are computed once and reused.
Outputs are computed under ``torch.no_grad()`` in the model's current mode (call
``model.eval()`` first for dropout / batch norm).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .errors import MergeError

KINDS = ("logits", "features", "features_first_head")


def as_state_dicts(models: Sequence[Any], what: str) -> List[Dict[str, torch.Tensor]]:
    """nn.Modules or state dicts -> state dicts (a module's ``state_dict()``)."""
    if isinstance(models, (dict, torch.nn.Module)) or not hasattr(models, "__iter__"):
        raise MergeError(f"{what}: expected a list of models or state dicts, got one {type(models).__name__}")
    out = []
    for i, m in enumerate(models):
        if isinstance(m, torch.nn.Module):
            out.append(dict(m.state_dict()))
        elif isinstance(m, dict):
            out.append(m)
        else:
            raise MergeError(f"{what}: model {i} is a {type(m).__name__}, not an nn.Module or a state dict")
    if not out:
        raise MergeError(f"{what}: need at least 1 model, got 0")
    return out


def check_names(model: torch.nn.Module, sd: Dict[str, Any], what: str, label: str) -> None:
    """``sd``'s names are ``model``'s parameters and buffers (extra names or missing parameters
    are an error naming them)."""
    expected = dict(model.state_dict())
    params = {n for n, _ in model.named_parameters()}
    missing = sorted(n for n in params if n not in sd)
    extra = sorted(n for n in sd if n not in expected)
    if missing or extra:
        def short(v):
            return (", ".join(map(repr, v[:5])) + (f" and {len(v) - 5} more" if len(v) > 5 else "")) or "none"
        raise MergeError(f"{what}: {label}'s names do not match the model's parameters: missing {short(missing)}; "
                         f"not in the model {short(extra)} (state dicts of this architecture, as model.state_dict())")
    for n in params:
        if tuple(sd[n].shape) != tuple(expected[n].shape):
            raise MergeError(f"{what}: {label}: {n!r} has shape {tuple(sd[n].shape)}, the model's is {tuple(expected[n].shape)}")


def _args(inputs: Any) -> tuple:
    return tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def resolve_head(model: torch.nn.Module, head: Optional[str], what: str) -> Tuple[str, torch.nn.Module]:
    """(name, module) of the classification head: ``head`` by name, else the last module (in
    ``named_modules`` order) that holds parameters of its own."""
    modules = dict(model.named_modules())
    if head is not None:
        if head not in modules:
            raise MergeError(f"{what}: the model has no module {head!r} (head=); modules with parameters: "
                             f"{[n for n, m in modules.items() if n and any(True for _ in m.parameters(recurse=False))][:12]}")
        return head, modules[head]
    last = None
    for n, m in model.named_modules():
        if any(True for _ in m.parameters(recurse=False)):
            last = (n, m)
    if last is None or last[0] == "":
        raise MergeError(f"{what}: cannot find a head module in the model; name it with head=")
    return last


def forward(model: torch.nn.Module, sd: Dict[str, torch.Tensor], inputs: Any, head: Optional[torch.nn.Module] = None,
            batch_size: Optional[int] = None):
    """(outputs, features) of ``model`` with the weights ``sd`` on ``inputs``; features are the
    input of ``head`` (None without a head). ``batch_size``: run the rows of ``inputs`` (every
    positional tensor split along dim 0) in batches and concatenate the results."""
    if batch_size is not None:
        args = _args(inputs)
        n = int(args[0].shape[0])
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise MergeError(f"ensemble: batch_size must be an integer >= 1, got {batch_size!r}")
        outs, feats = [], []
        for b in range(0, n, batch_size):
            part = tuple(a[b:b + batch_size] if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == n else a
                         for a in args)
            o, f = forward(model, sd, part, head)
            outs.append(o)
            feats.append(f)
        return torch.cat(outs), (torch.cat(feats) if head is not None else None)
    captured = []
    handle = None
    if head is not None:
        handle = head.register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
    try:
        out = torch.func.functional_call(model, sd, _args(inputs), strict=False)
    finally:
        if handle is not None:
            handle.remove()
    if head is not None and not captured:
        raise MergeError("ensemble: the head module was not called in the forward pass; name the module whose input "
                         "is the penultimate features with head=")
    return out, (captured[-1] if captured else None)


def _head_params(name: str, head: torch.nn.Module, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    prefix = f"{name}." if name else ""
    return {k: sd[prefix + k] for k, _ in head.named_parameters() if prefix + k in sd} | \
           {k: sd[prefix + k] for k, _ in head.named_buffers() if prefix + k in sd}


class _Outputs:
    """Each model's logits (and features) computed once; ensembles of any subset from them."""

    def __init__(self, sds, model, inputs, kind: str, head: Optional[str], what: str, batch_size: Optional[int] = None):
        if kind not in KINDS:
            raise MergeError(f"{what}: kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
        if not isinstance(model, torch.nn.Module):
            raise MergeError(f"{what}: model must be an nn.Module (the architecture), got {type(model).__name__}")
        self.kind = kind
        self.sds = sds
        for i, sd in enumerate(sds):
            check_names(model, sd, what, f"model {i}")
        self.head_name, self.head = (None, None) if kind == "logits" else resolve_head(model, head, what)
        self.logits, self.features = [], []
        with torch.no_grad():
            for sd in sds:
                out, feat = forward(model, sd, inputs, self.head, batch_size)
                self.logits.append(out)
                self.features.append(feat)

    def combine(self, members: Sequence[int]) -> torch.Tensor:
        members = list(members)
        if self.kind == "logits":
            return torch.stack([self.logits[i].float() for i in members]).mean(0)
        feats = torch.stack([self.features[i].float() for i in members]).mean(0)
        heads = [_head_params(self.head_name, self.head, self.sds[i]) for i in members]
        if self.kind == "features_first_head":
            params = heads[0]
        else:
            params = {k: (torch.stack([h[k].float() for h in heads]).mean(0) if heads[0][k].is_floating_point() else heads[0][k])
                      for k in heads[0]}
        params = {k: (v.to(feats.dtype) if v.is_floating_point() else v) for k, v in params.items()}
        with torch.no_grad():
            return torch.func.functional_call(self.head, params, (feats,), strict=False)


def ensemble(models: Sequence[Any], model: torch.nn.Module, inputs: Any, kind: str = "logits",
             head: Optional[str] = None, batch_size: Optional[int] = None) -> torch.Tensor:
    """The ensembled outputs of ``models`` (state dicts or modules of ``model``'s architecture)
    on ``inputs`` (a tensor, or a tuple of positional arguments); ``kind`` as the module
    docstring; ``head``: the module whose input is the penultimate features (feature kinds);
    ``batch_size``: run the inputs' rows in batches of that many (bounded memory)."""
    sds = as_state_dicts(models, "ensemble")
    outs = _Outputs(sds, model, inputs, kind, head, "ensemble", batch_size)
    return outs.combine(range(len(sds)))


def _score(score_fn: Callable, outputs: torch.Tensor, what: str, label: str) -> float:
    try:
        s = score_fn(outputs)
    except MergeError:
        raise
    except Exception as e:  # noqa: BLE001
        raise MergeError(f"{what}: score_fn raised {type(e).__name__} on {label}: {e}") from e
    if isinstance(s, torch.Tensor) and s.numel() == 1:
        s = s.item()
    if isinstance(s, bool) or not isinstance(s, numbers.Real) or math.isnan(float(s)):
        raise MergeError(f"{what}: score_fn must return a number on {label}, got {s!r}")
    return float(s)


def greedy_ensemble(models: Sequence[Any], model: torch.nn.Module, inputs: Any, score_fn: Callable[[torch.Tensor], float],
                    kind: str = "logits", head: Optional[str] = None, scores: Optional[Sequence[float]] = None,
                    batch_size: Optional[int] = None) -> Tuple[torch.Tensor, List[int]]:
    """Greedy ensemble (module docstring): ``score_fn(outputs) -> number`` (higher is better) on
    held-out ``inputs``; ``scores``: the models' own held-out scores (None: ``score_fn`` of each
    model's own outputs). Returns (the ensembled outputs, the indices kept, in order of addition)."""
    what = "greedy_ensemble"
    if not callable(score_fn):
        raise MergeError(f"{what}: score_fn must be callable (outputs -> score), got {type(score_fn).__name__}")
    sds = as_state_dicts(models, what)
    outs = _Outputs(sds, model, inputs, kind, head, what, batch_size)
    if scores is None:
        own = [_score(score_fn, outs.combine([i]), what, f"model {i}") for i in range(len(sds))]
    else:
        own = [float(s) for s in scores]
        if len(own) != len(sds):
            raise MergeError(f"{what}: expected {len(sds)} scores, got {len(own)}")
    order = sorted(range(len(sds)), key=lambda i: own[i], reverse=True)
    members = [order[0]]
    best_out = outs.combine(members)
    best = _score(score_fn, best_out, what, f"model {order[0]}")
    for i in order[1:]:
        cand = outs.combine(members + [i])
        s = _score(score_fn, cand, what, f"the ensemble of {members + [i]}")
        if s > best:
            members.append(i)
            best, best_out = s, cand
    return best_out, members


def compare_outputs(merges: Dict[str, Any], ingredients: Sequence[Any], model: torch.nn.Module, inputs: Any,
                    score_fn: Callable[[torch.Tensor], float], head: Optional[str] = None,
                    kinds: Sequence[str] = ("logits", "features"), greedy: bool = True,
                    batch_size: Optional[int] = None) -> List[Dict[str, Any]]:
    """A results table, merges and ensembles side by side on the same ``inputs``: one row
    ``{"name", "kind", "score"}`` per merged state dict in ``merges`` (name -> state dict), for the
    best and the mean ingredient, for each ensemble ``kind`` and (``greedy``) its greedy variant."""
    what = "compare_outputs"
    sds = as_state_dicts(ingredients, what)
    rows: List[Dict[str, Any]] = []
    own = []
    with torch.no_grad():
        for i, sd in enumerate(sds):
            check_names(model, sd, what, f"ingredient {i}")
            own.append(_score(score_fn, forward(model, sd, inputs, batch_size=batch_size)[0], what, f"ingredient {i}"))
        rows.append({"name": "best ingredient", "kind": "model", "score": max(own)})
        rows.append({"name": "mean ingredient", "kind": "model", "score": sum(own) / len(own)})
        for name, sd in merges.items():
            check_names(model, sd, what, f"merge {name!r}")
            rows.append({"name": name, "kind": "merge", "score": _score(score_fn, forward(model, sd, inputs, batch_size=batch_size)[0], what, name)})
    names = {"logits": "logit ensemble", "features": "feature ensemble", "features_first_head": "feature ensemble (first head)"}
    for kind in kinds:
        outs = _Outputs(sds, model, inputs, kind, head, what, batch_size)
        rows.append({"name": names[kind], "kind": "ensemble", "score": _score(score_fn, outs.combine(range(len(sds))), what, kind)})
        if greedy:
            out, members = greedy_ensemble(sds, model, inputs, score_fn, kind=kind, head=head, scores=own,
                                           batch_size=batch_size)
            rows.append({"name": f"greedy {names[kind]}", "kind": "ensemble", "score": _score(score_fn, out, what, kind),
                         "members": members})
    return rows


__all__ = ["KINDS", "compare_outputs", "ensemble", "greedy_ensemble"]
