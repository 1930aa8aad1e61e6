"""Weighted sums: linear (soups), SLERP and model stock; one combine pass with explicit weights.

- ``linear``: sum_i w_i x_i / sum_i w_i (``normalize``, default) or sum_i w_i x_i. Equal
  weights give the uniform soup, the default method when a call names no method.
- ``slerp`` (Shoemake 1985; mergekit's per-tensor form): two ingredients, ``t`` in [0, 1],
  t = 0 giving the first. With theta the angle between the two flattened tensors,
  out = sin((1-t) theta)/sin(theta) x_0 + sin(t theta)/sin(theta) x_1; when the
  normalised tensors are nearly colinear (|cos theta| > 0.9995, mergekit's threshold) it
  falls back to (1-t) x_0 + t x_1. Norms below 1e-8 are not normalised (as mergekit).
- ``model_stock`` (Jang et al. 2024): with cos theta the mean pairwise cosine between the
  fine-tunes' task vectors x_i - base (each product clamped to 1e-6 below, as mergekit),
  t = k cos / (1 + (k - 1) cos) for k fine-tunes; out = t mean_i(x_i) + (1 - t) base.
The statistics (norms and dots) are one streamed ``gram`` pass in float64.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..errors import MergeError
from .base import BASE_NEVER, BASE_REQUIRED, Method, normalize_param, weight_param
from .combine import CombinePlan
from .params import Param, Params

SLERP_DOT_THRESHOLD = 0.9995
SLERP_EPS = 1e-8
MODEL_STOCK_EPS = 1e-6


class Linear(Method):
    name, title, paper = "linear", "Linear (weighted soup)", "Wortsman et al. 2022, arXiv:2203.05482"
    formula = "sum_i w_i x_i / sum_i w_i  (normalize: false drops the division)"
    base = BASE_NEVER
    params = (weight_param(), normalize_param(True))

    def check(self, p: Params, n: int, where: str) -> None:
        total = float(np.sum(np.asarray(p["weight"], dtype=np.float32), dtype=np.float32))
        scale = float(np.sum(np.abs(p["weight"])))
        if p["normalize"] and abs(total) <= 1e-6 * max(scale, 1e-30):
            raise MergeError(f"{where}: weights {list(p['weight'])} sum to {total:g}; normalize divides by the sum "
                             "(give weights with a non-zero sum, or normalize: false)")

    def plan(self, ctx, p: Params) -> CombinePlan:
        return CombinePlan(ctx.n, weight=p["weight"], normalize=p["normalize"])

    def reference(self, xs: Sequence, base, p: Params, name: str):
        import torch

        w = torch.tensor([float(np.float32(v)) for v in p["weight"]])
        y = (torch.stack([x.reshape(-1).float() for x in xs]) * w[:, None]).sum(0)
        return y / w.sum() if p["normalize"] else y


class Slerp(Method):
    name, title, paper = "slerp", "Spherical linear interpolation", "Shoemake 1985 (mergekit's per-tensor form)"
    formula = "sin((1-t)theta)/sin(theta) x_0 + sin(t theta)/sin(theta) x_1; lerp when |cos theta| > 0.9995"
    base = BASE_NEVER
    min_n = max_n = 2
    params = (Param("t", "float", 0.5, "interpolation position: 0 gives ingredient 0, 1 ingredient 1", low=0.0, high=1.0),)

    @staticmethod
    def weights(g: np.ndarray, t: float) -> tuple:
        n0, n1 = math.sqrt(max(g[0, 0], 0.0)), math.sqrt(max(g[1, 1], 0.0))
        dot = g[0, 1] / ((n0 if n0 > SLERP_EPS else 1.0) * (n1 if n1 > SLERP_EPS else 1.0))
        if abs(dot) > SLERP_DOT_THRESHOLD:
            return (1.0 - t, t), dot, True
        theta = math.acos(max(-1.0, min(1.0, dot)))
        s = math.sin(theta)
        return (math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s), dot, False

    def plan(self, ctx, p: Params) -> CombinePlan:
        (w0, w1), dot, lerp = self.weights(ctx.gram(), p["t"])
        plan = CombinePlan(2, weight=[w0, w1])
        plan.notes.update(cos=float(dot), lerp=bool(lerp))
        return plan

    def reference(self, xs: Sequence, base, p: Params, name: str):
        import torch

        v0, v1 = (x.reshape(-1).double() for x in xs)
        n0, n1 = v0.norm().item(), v1.norm().item()
        dot = float((v0 / (n0 if n0 > SLERP_EPS else 1.0)) @ (v1 / (n1 if n1 > SLERP_EPS else 1.0)))
        t = p["t"]
        if abs(dot) > SLERP_DOT_THRESHOLD:
            return ((1 - t) * v0 + t * v1).float()
        theta = math.acos(dot)
        return ((math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)).to(torch.float32)


class ModelStock(Method):
    name, title, paper = "model_stock", "Model stock", "Jang et al. 2024, arXiv:2403.19522"
    formula = "t = k cos / (1 + (k-1) cos), cos the mean pairwise cosine of the task vectors; t mean(x_i) + (1-t) base"
    base = BASE_REQUIRED
    min_n = 2
    #: chunks hold whole rows (filter_wise takes per-row statistics)
    row_aligned = True
    params = (Param("filter_wise", "bool", False, "per-row statistics and t (rows along the last dimension; "
                    "a 1-D tensor is one row), as mergekit's filter_wise"),)

    @staticmethod
    def row_len(shape) -> int:
        return int(shape[-1]) if len(shape) >= 2 else max(1, int(np.prod(shape, dtype=np.int64)) if shape else 1)

    @staticmethod
    def ratio(g: np.ndarray) -> tuple:
        k = g.shape[0]
        norms = np.sqrt(np.maximum(np.diag(g), 0.0))
        cos = [max(-1.0, min(1.0, g[i, j] / max(norms[i] * norms[j], MODEL_STOCK_EPS)))
               for i in range(k) for j in range(i + 1, k)]
        c = float(np.mean(cos))
        den = 1 + (k - 1) * c
        return (k * c / den if abs(den) >= MODEL_STOCK_EPS else 0.0), c  # mergekit: t = 0 at a vanishing denominator

    def plan(self, ctx, p: Params) -> CombinePlan:
        if p.get("filter_wise", False) and len(ctx.shape) >= 1 and ctx.numel:
            row = self.row_len(ctx.shape)
            grams = [ctx.ops.row_gram(xs, b, row) for _, xs, b in ctx.chunks()]
            g = np.concatenate(grams, axis=0)  # [rows, N, N]
            ts = np.array([self.ratio(gr)[0] for gr in g])
            W = np.ascontiguousarray(np.repeat((ts / ctx.n)[:, None], ctx.n, axis=1), dtype=np.float32)
            plan = CombinePlan(ctx.n, weight=W[0])
            plan.notes.update(row_weight=(row, W), t=ts)
            return plan
        t, c = self.ratio(ctx.gram())
        plan = CombinePlan(ctx.n, weight=[t / ctx.n] * ctx.n)
        plan.notes.update(cos=c, t=t)
        return plan

    def reference(self, xs: Sequence, base, p: Params, name: str):
        import torch

        if p.get("filter_wise", False):
            row = self.row_len(tuple(base.shape))
            b2 = base.reshape(-1, row).double()
            outs = []
            for r in range(b2.shape[0]):
                sub = Params(self.name, {"filter_wise": False}, ())
                outs.append(self.reference([x.reshape(-1, row)[r] for x in xs], b2[r], sub, name))
            return torch.cat(outs)
        b = base.reshape(-1).double()
        taus = [x.reshape(-1).double() - b for x in xs]
        k = len(taus)
        cos = []
        for i in range(k):
            for j in range(i + 1, k):
                prod = (taus[i].norm() * taus[j].norm()).clamp(min=MODEL_STOCK_EPS)
                cos.append(((taus[i] @ taus[j]) / prod).clamp(-1, 1))
        c = torch.stack(cos).mean()
        t = k * c / (1 + (k - 1) * c)
        mean = torch.stack([x.reshape(-1).double() for x in xs]).mean(0)
        return (t * mean + (1 - t) * b).float()
