"""Task-vector transforms under AME: TIES trimming, DARE dropping or breadcrumbs applied to each
ingredient's task vector before any AME optimizer sees it.

    ak.merge(sds, optimizer="adam", lr=1e-3, transform="dare", base=base_sd, density=0.3)

Each ingredient is replaced by x_i' = base + tau_i', tau_i' its sparsified task vector,
exactly as the methods of the same name sparsify it (``ties``: top density by magnitude
then sign election with unit weights, entries against the elected sign zeroed; ``dare``:
a Philox mask of keep rate density, rescaled as ``rescale`` says; ``breadcrumbs``: the
gamma / density magnitude band). AME then runs on x_1'..x_N' with its own pivot (the
soup of the transformed ingredients by default). What it is for: AME's optimizers
average the ingredients' disagreement away step by step; trimming or dropping the
small, noisy entries first (what makes TIES and DARE beat plain task arithmetic) hands
the optimizer cleaner pseudogradients, and the adaptive optimizers rescale what remains
per entry. The transform is a streamed pass of its own (the same statistics as the
methods), then AME's whole-run kernel runs on the fp32 results.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

from ..errors import MergeError, suggest
from .params import Params, resolve

#: transform name -> the method whose sparsification it applies
TRANSFORMS = {"ties": "ties", "dare": "dare_linear", "breadcrumbs": "breadcrumbs"}
#: the parameters a transform takes (the rest of its method's are meaningless without a merge)
TRANSFORM_PARAMS = {"ties": ("density", "consensus"), "dare": ("density", "rescale"),
                    "breadcrumbs": ("density", "gamma", "rescale")}
TRANSFORM_KEYS = ("transform", "density", "densities", "gamma", "rescale", "consensus")


def split_transform(options: Dict[str, Any], n: int, where: str) -> Tuple[Optional[Tuple[Any, Params]], Dict[str, Any]]:
    """((method, params) of the transform or None, the remaining options). The DARE mask's seed is
    AME's ``seed``."""
    from . import METHODS

    if "transform" not in options:
        return None, options
    name = options["transform"]
    key = str(name).lower() if isinstance(name, str) else name
    if key not in TRANSFORMS:
        raise MergeError(f"{where}: unknown transform {name!r}{suggest(str(name), list(TRANSFORMS))}; "
                         f"valid: {', '.join(TRANSFORMS)}")
    method = METHODS[TRANSFORMS[key]]
    allowed = TRANSFORM_PARAMS[key]
    given = {k: v for k, v in options.items() if k in TRANSFORM_KEYS and k != "transform"}
    rest = {k: v for k, v in options.items() if k not in TRANSFORM_KEYS}
    for k in given:
        canon = "density" if k == "densities" else k
        if canon not in allowed:
            raise MergeError(f"{where}: transform {key!r} takes {', '.join(allowed)}, not {k!r}")
    if key == "dare":
        given["seed"] = rest.get("seed", 0)
    params = resolve(method.name, method.params, n, given, None, where)
    method.check(params, n, where)
    return (method, params), rest


def transform_torch(inputs, base, outs, plan, offset: int = 0) -> None:
    """The transform pass in plain torch (the normative definition the kernels match bitwise):
    outs[i] = b + t_i, t_i ingredient i's task vector kept, rescaled (``inv_prob``: / p) and
    scaled as the combine pass does, times its weight (1 under ``unit_params``), and with an
    election the entries whose sign differs from the elected one (sign of the vote, +1 at 0)
    zeroed. ``outs``: N float32 tensors of C elements."""
    import torch

    from .combine import ELECT_NONE, keep_masks

    b, parts = keep_masks(inputs, base, plan, offset)
    ys = []
    for i, (tau, keep, p) in enumerate(parts):
        t = tau / p if (plan.inv_prob and p is not None) else tau
        t = t * torch.tensor(float(plan.scale[i]), dtype=torch.float32, device=t.device)
        t = torch.where(keep, t, torch.zeros_like(t))
        ys.append(torch.tensor(float(plan.weight[i]), dtype=torch.float32, device=t.device) * t)
    if plan.elect != ELECT_NONE:
        vote = torch.zeros_like(b)
        for y in ys:
            vote = vote + (y if plan.elect == 1 else torch.sign(y))
        pos = vote >= 0
        ys = [torch.where((pos & (y > 0)) | (~pos & (y < 0)), y, torch.zeros_like(y)) for y in ys]
    for o, y in zip(outs, ys):
        o.copy_(b + y)


def unit_params(params: Params, n: int) -> Params:
    """The transform's parameters with unit weights, lambda 1 and no normalisation."""
    values = dict(params.values)
    values.update(weight=(1.0,) * n, normalize=False)
    values["lambda"] = 1.0
    return Params(params.method, values, params.given)


__all__ = ["TRANSFORMS", "split_transform", "transform_torch", "unit_params"]

