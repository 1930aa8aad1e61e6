"""The learned soup (Wortsman et al. 2022): mixing coefficients fitted on held-out data.

    merged, alpha = ak.learned_soup(ingredients, model, loss_fn, val_batches, steps=200, lr=0.05)
    merged, alpha = ak.learned_soup(ingredients, model, loss_fn, val_batches, by_layer=True)

The merged model is ``theta(a) = sum_i alpha_i x_i`` with ``alpha = softmax(a)`` (one [N]
vector, or one per floating tensor with ``by_layer=True``), so the coefficients stay on the
simplex: a convex combination of the ingredients. ``a`` starts at 0 (the uniform soup) and is
fitted by Adam (learning rate ``lr``, cosine-decayed to 0 over ``steps``) on ``loss_fn(model(inputs), targets)`` over the held-out batches (cycled), with
the model evaluated through ``torch.func.functional_call``: the user's ``model`` supplies the
architecture only, its own weights are not used or changed.

Memory: the ingredients (read, never copied: the mix is a custom autograd function whose
backward computes ``dL/dalpha_i = <dL/dtheta, x_i>`` from the ingredients themselves), one
merged model in fp32 and its gradient, not N models with gradients. Floating buffers (batch
norm statistics) are mixed with the same coefficients; integer buffers are copied from the
first ingredient. Returns ``(merged state dict in the ingredients' dtypes, coefficients)``:
a float32 tensor [N], or with ``by_layer`` a dict tensor name -> [N].
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from .checks import as_state_dicts, check_all_finite, check_structure
from .ensembles import check_names
from .errors import MergeError


class _Mix(torch.autograd.Function):
    """theta = sum_i alpha_i x_i (fp32), gradient to alpha only; saves no copy of the x_i."""

    @staticmethod
    def forward(ctx, alpha, *xs):
        ctx.xs = xs
        out = alpha[0] * xs[0].float()
        for i in range(1, len(xs)):
            out.add_(xs[i].float(), alpha=float(alpha[i]))  # the alpha scalars are read on the host
        return out

    @staticmethod
    def backward(ctx, grad):
        g = grad.float()
        ga = torch.stack([(g * x.float()).sum() for x in ctx.xs]).to(grad.device)
        return (ga,) + (None,) * len(ctx.xs)


def _cycle_batches(data: Any):
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        data = [data]
    try:
        iter(data)
    except TypeError:
        raise MergeError("learned_soup: data must be an (inputs, targets) pair or an iterable of such batches") from None
    while True:
        empty = True
        for b in data:
            empty = False
            if not (isinstance(b, (tuple, list)) and len(b) == 2):
                raise MergeError("learned_soup: each batch of data must be an (inputs, targets) pair")
            yield b
        if empty:
            raise MergeError("learned_soup: data has no batches")


def _args(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def learned_soup(ingredients: Sequence[Any], model: torch.nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor],
                 data: Any, by_layer: bool = False, steps: int = 100, lr: float = 0.05,
                 init: Optional[Sequence[float]] = None, log: Optional[Callable[[str], None]] = None,
                 check_finite: bool = True) -> Tuple[Dict[str, torch.Tensor], Union[torch.Tensor, Dict[str, torch.Tensor]]]:
    """Fit softmax mixing coefficients on held-out data (module docstring).

    ingredients: state dicts (or nn.Modules) of ``model``'s architecture; loss_fn(outputs,
    targets) -> scalar loss to minimise; data: (inputs, targets) or an iterable of such batches
    (inputs a tensor or a tuple of positional arguments), cycled for ``steps`` Adam steps of
    ``lr``; init: starting coefficients (positive, N; default uniform); log: receives a line
    every 10% of the steps."""
    what = "learned_soup"
    if not isinstance(model, torch.nn.Module):
        raise MergeError(f"{what}: model must be an nn.Module (the architecture), got {type(model).__name__}")
    if not callable(loss_fn):
        raise MergeError(f"{what}: loss_fn must be callable (outputs, targets) -> loss, got {type(loss_fn).__name__}")
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
        raise MergeError(f"{what}: steps must be an integer >= 0, got {steps!r}")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not (lr > 0 and math.isfinite(lr)):
        raise MergeError(f"{what}: lr must be a positive number, got {lr!r}")
    items = [dict(m.state_dict()) if isinstance(m, torch.nn.Module) else m for m in ingredients]
    dicts, form = as_state_dicts(items)
    if form != "dict":
        raise MergeError(f"{what}: ingredients must be state dicts (or modules) of the model's architecture")
    names = check_structure(dicts)
    if check_finite:
        check_all_finite(dicts, names)
    for i, sd in enumerate(dicts):
        check_names(model, sd, what, f"ingredient {i}")
    n = len(dicts)
    floats = [k for k in names if dicts[0][k].is_floating_point()]
    device = dicts[0][floats[0]].device if floats else torch.device("cpu")
    if init is None:
        a0 = torch.zeros(n, dtype=torch.float32)
    else:
        w = torch.as_tensor(init, dtype=torch.float64).reshape(-1)
        if w.numel() != n or not bool((w > 0).all()) or not bool(torch.isfinite(w).all()):
            raise MergeError(f"{what}: init must be {n} positive finite numbers (one per ingredient), got {init!r}")
        a0 = (w / w.sum()).log().float()
    rows = len(floats) if by_layer else 1
    logits = a0.to(device).repeat(rows, 1).clone().requires_grad_(True)  # [rows, N]
    opt = torch.optim.Adam([logits], lr=float(lr))
    # cosine decay to 0 over the steps: Adam at a constant lr keeps circling the optimum at ~lr
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, steps) / max(steps, 1))))

    def mixed(alpha: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = {}
        for r, k in enumerate(floats):
            out[k] = _Mix.apply(alpha[r if by_layer else 0], *[d[k].detach() for d in dicts])
        for k in names:
            if k not in out:
                out[k] = dicts[0][k]
        return out

    batches = _cycle_batches(data) if steps else iter(())
    every = max(1, steps // 10)
    for step in range(1, steps + 1):
        x, y = next(batches)
        opt.zero_grad(set_to_none=True)
        alpha = logits.softmax(dim=1)
        try:
            loss = loss_fn(torch.func.functional_call(model, mixed(alpha), _args(x), strict=False), y)
        except MergeError:
            raise
        except Exception as e:  # noqa: BLE001 (the user's model or loss: one clear line, the cause kept)
            raise MergeError(f"{what}: step {step}: the model or loss_fn raised {type(e).__name__}: {e}") from e
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise MergeError(f"{what}: loss_fn must return a scalar tensor, got {type(loss).__name__}")
        if not bool(torch.isfinite(loss)):
            raise MergeError(f"{what}: step {step}: the loss is {float(loss)} (lower lr?)")
        loss.backward()
        opt.step()
        sched.step()
        if log is not None and (step % every == 0 or step == steps):
            log(f"learned_soup: step {step}/{steps}: loss {float(loss):.6g}")
    with torch.no_grad():
        alpha = logits.softmax(dim=1).detach()
        merged = {}
        for r, k in enumerate(floats):
            merged[k] = _Mix.apply(alpha[r if by_layer else 0], *[d[k].detach() for d in dicts]).to(dicts[0][k].dtype)
        out = {k: (merged[k] if k in merged else dicts[0][k].clone()) for k in names}
    coefs = {k: alpha[r].cpu() for r, k in enumerate(floats)} if by_layer else alpha[0].cpu()
    return out, coefs


__all__ = ["learned_soup"]
