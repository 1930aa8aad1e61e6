"""mergekit's ``slices:``: frankenmerges (passthrough) and slices merged by a method.

    merge_method: passthrough
    slices:
      - sources: [{model: a/, layer_range: [0, 24]}]
      - sources: [{model: b/, layer_range: [8, 32]}]

Each output slice stacks its layers in order; output layer j of the whole model takes, from
each source of its slice, the source's layer ``layer_range[0] + offset`` (the layer index in
every tensor name renamed to j); the copied config.json's ``num_hidden_layers`` is the total.
As mergekit: the tensors outside the layers take the first slice's sources for the embeddings
(names with ``embed``, ``wte``, ``wpe``) and the last slice's for the rest (final norm,
lm_head). A slice with several sources is merged by ``merge_method``: every slice must then
have the same number of sources (ingredient k is the k-th non-base source of each slice) and
the base, for the methods that take one, among each slice's sources. Parameters are looked up
per source, then in the slice's ``parameters``, then in the top-level ones; a gradient runs
over the layers of its slice (x = offset / (len - 1), 1 for a one-layer slice; 0 outside the
layers). Nothing is copied: the output is read from the sources' files through renamed views
(``io.checkpoint.Checkpoint`` objects), so it streams like any merge.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

from .methods.params import LAYER_RE, Chain, Param, Rule, evaluate, layer_index
from .errors import suggest

SLICE_KEYS = ("sources", "base_model", "parameters")
SOURCE_KEYS = ("model", "layer_range", "parameters")
PRE_MARKS = ("embed", "wte", "wpe", "word_embeddings")


def _usage(msg: str):
    from .spec import UsageError

    return UsageError(msg)


def _mk_only(msg: str):
    from .spec import MergekitOnly

    return MergekitOnly(msg)




class PerTensor(Rule):
    """A setting per output tensor: name -> (setting, x, name the filters match)."""

    def __init__(self, table: Dict[str, Tuple[Any, float, str]]):
        self.table = table

    def value(self, name: str, x: float, p: Param) -> Any:
        hit = self.table.get(name)
        if hit is None:
            return None
        setting, own_x, match = hit
        return evaluate(setting, match, own_x, p)

    def leaves(self) -> List[Any]:
        out: List[Any] = []
        seen = set()
        for s, _, _ in self.table.values():
            if id(s) in seen:
                continue
            seen.add(id(s))
            out.extend(s.leaves() if isinstance(s, Rule) else [s])
        return out

    def to_yaml(self) -> Any:
        return "per slice"


def rename_layer(name: str, new: int) -> str:
    m = LAYER_RE.search(name)
    return name[: m.start(1)] + str(new) + name[m.end(1):]


def load_slices(doc: dict, path: str, spec, method: str, base: Optional[str], options: dict):
    from .mergekit_schema import GTA, mk_params, params_block, parse_setting, resolve_model

    folder = spec.folder
    raw = doc.get("slices")
    if not isinstance(raw, list) or not raw:
        raise _usage(f"{path}: slices: expected a non-empty list of {{sources: [...]}}")
    allowed = mk_params(method) if method not in ("passthrough", "ame") else {}
    if method == "ame":
        raise _usage(f"{path}: slices: merge_method ame takes 'models', not slices")
    top = params_block(doc.get("parameters"), f"{path}: parameters")
    if method == "passthrough" and top:
        make = _mk_only if "scale" in top else _usage
        raise make(f"{path}: parameters.{next(iter(top))}: passthrough takes no parameters here "
                     "(mergekit's per-source 'scale' is not supported)")
    slices = []
    for s, sl in enumerate(raw):
        at = f"{path}: slices[{s}]"
        if not isinstance(sl, dict):
            raise _usage(f"{at}: expected {{sources: [...]}}, got {sl!r}")
        for k in sl:
            if k not in SLICE_KEYS:
                extra = " (not supported)" if k == "residual_weight" else suggest(k, SLICE_KEYS)
                make = _mk_only if k == "residual_weight" else _usage
                raise make(f"{at}: unknown key {k!r}{extra}; a slice takes: {', '.join(SLICE_KEYS)}")
        srcs = sl.get("sources")
        if not isinstance(srcs, list) or not srcs:
            raise _usage(f"{at}.sources: expected a non-empty list of {{model: PATH, layer_range: [a, b]}}")
        sources = []
        for j, src in enumerate(srcs):
            sat = f"{at}.sources[{j}]"
            if not isinstance(src, dict):
                raise _usage(f"{sat}: expected {{model: PATH, layer_range: [a, b]}}, got {src!r}")
            for k in src:
                if k not in SOURCE_KEYS:
                    raise _usage(f"{sat}: unknown key {k!r}{suggest(k, SOURCE_KEYS)}; a source takes: "
                                 f"{', '.join(SOURCE_KEYS)}")
            if "model" not in src or "layer_range" not in src:
                raise _usage(f"{sat}: needs 'model' and 'layer_range'")
            lr = src["layer_range"]
            if (not isinstance(lr, list) or len(lr) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in lr)
                    or not 0 <= lr[0] < lr[1]):
                raise _usage(f"{sat}.layer_range: expected [start, end) with 0 <= start < end, got {lr!r}")
            params = params_block(src.get("parameters"), f"{sat}.parameters")
            for k in params:
                if method == "passthrough":
                    if k == "scale":
                        raise _mk_only(f"{sat}.parameters.scale: mergekit's per-source scale is not supported")
                    raise _usage(f"{sat}.parameters.{k}: passthrough takes no parameters here")
                if k not in allowed:
                    raise _usage(f"{sat}.parameters.{k}: mergekit's {method} has no parameter {k!r}"
                                 f"{suggest(k, allowed)}")
                if allowed[k] == "shared":
                    raise _usage(f"{sat}.parameters.{k}: {k!r} is a shared parameter (give it in the slice's or "
                                 "the top-level parameters)")
            sources.append({"model": resolve_model(src["model"], folder, f"{sat}.model"),
                            "range": (lr[0], lr[1]), "params": {k: parse_setting(v, f"{sat}.parameters.{k}")
                                                                for k, v in params.items()}, "at": sat})
        lens = {b - a for a, b in (x["range"] for x in sources)}
        if len(lens) != 1:
            raise _usage(f"{at}.sources: every source of a slice needs the same number of layers, got "
                         f"{[x['range'] for x in sources]}")
        sparams = params_block(sl.get("parameters"), f"{at}.parameters")
        for k in sparams:
            if method == "passthrough" or k not in allowed:
                raise _usage(f"{at}.parameters.{k}: mergekit's {method} has no parameter {k!r}{suggest(k, allowed)}")
        sbase = resolve_model(sl["base_model"], folder, f"{at}.base_model") if sl.get("base_model") else base
        slices.append({"sources": sources, "params": {k: parse_setting(v, f"{at}.parameters.{k}")
                                                      for k, v in sparams.items()},
                       "base": sbase, "n": lens.pop(), "at": at})
    for k in top:
        if k not in allowed:
            raise _usage(f"{path}: parameters.{k}: mergekit's {method} has no parameter {k!r}{suggest(k, allowed)}")
    gtop = {k: parse_setting(v, f"{path}: parameters.{k}") for k, v in top.items() if k != "int8_mask"}

    # roles per slice: (base source or None, ingredient sources)
    takes_base = method in GTA or method in ("model_stock", "slerp")
    roles = []
    for sl in slices:
        srcs = sl["sources"]
        if method == "passthrough":
            if len(srcs) != 1:
                raise _usage(f"{sl['at']}.sources: passthrough takes one source per slice, got {len(srcs)}")
            roles.append((None, srcs))
        elif takes_base:
            if sl["base"] is None:
                raise _usage(f"{sl['at']}: {method} needs a base_model (top level or the slice's)")
            b = [x for x in srcs if x["model"] == sl["base"]]
            if not b:
                raise _usage(f"{sl['at']}.sources: the base_model {sl['base']} is not among this slice's sources "
                             "(mergekit merges a slice from its own sources)")
            others = [x for x in srcs if x is not b[0]]
            roles.append((b[0], [b[0]] + others if method == "slerp" else others))
        else:
            roles.append((None, srcs))
    counts = {len(r[1]) for r in roles}
    if len(counts) != 1:
        raise _usage(f"{path}: slices: every slice needs the same number of sources to merge here, got "
                     f"{[len(r[1]) for r in roles]}")
    n = counts.pop()
    spec.method = "linear" if method == "passthrough" else method
    spec.options = dict(options)
    if method in ("dare_ties", "dare_linear", "della", "della_linear") and doc.get("random_seed") is not None:
        spec.options["seed"] = doc["random_seed"]
    spec.models = [x["model"] for x in roles[0][1]]
    spec.per_model = [{} for _ in range(n)]
    has_base = takes_base and method != "slerp"
    spec.base = roles[0][0]["model"] if has_base else None
    if method == "slerp" and "t" not in top and not any("t" in sl["params"] for sl in slices):
        raise _usage(f"{path}: parameters.t: slerp needs t")
    spec.notes.insert(0, f"schema: mergekit (merge_method: {method}, {len(slices)} slices)")
    spec.source_method = method
    state = {"slices": slices, "roles": roles, "n": n, "top": gtop, "allowed": allowed, "method": method,
             "has_base": has_base}
    spec.checkpoints = lambda: _build(spec, state)
    from .spec import check_call

    check_call(spec)
    return spec


def _open(cache: dict, p: str):
    from .io.checkpoint import open_checkpoint
    from .mergekit_schema import open_model

    if p not in cache:
        m = open_model(p)
        cache[p] = open_checkpoint(m) if isinstance(m, str) else m
    return cache[p]


def _build(spec, state) -> list:
    """Open the sources and build the renamed views (one Checkpoint per ingredient, and the base's)."""
    from .io.checkpoint import Checkpoint
    from .mergekit_schema import GTA

    slices, roles, n = state["slices"], state["roles"], state["n"]
    cache: dict = {}
    try:
        for sl in slices:
            for src in sl["sources"]:
                ck = _open(cache, src["model"])
                layers = [i for i in (layer_index(t) for t in ck.tensors) if i is not None]
                L = max(layers) + 1 if layers else 0
                if src["range"][1] > L:
                    raise _usage(f"{spec.source}: {src['at']}.layer_range: {list(src['range'])} is beyond the "
                                 f"{L} layers of {src['model']}")
        # output tensor name -> per ingredient (source, input name), slice index, x
        table: List[Tuple[str, int, float, List[Tuple[dict, str]], Optional[Tuple[dict, str]]]] = []
        out_layer = 0
        first = _open(cache, roles[0][1][0]["model"])
        pre = [t for t in first.tensors if layer_index(t) is None and any(m in t for m in PRE_MARKS)]
        last_ck = _open(cache, roles[-1][1][0]["model"])
        post = [t for t in last_ck.tensors if layer_index(t) is None and not any(m in t for m in PRE_MARKS)]
        for name in pre:
            table.append((name, 0, 0.0, [(s, name) for s in roles[0][1]],
                          (roles[0][0], name) if roles[0][0] else None))
        for si, (sl, (bsrc, ings)) in enumerate(zip(slices, roles)):
            for off in range(sl["n"]):
                x = off / (sl["n"] - 1) if sl["n"] > 1 else 1.0
                ref = ings[0]
                ck = _open(cache, ref["model"])
                names = [t for t in ck.tensors if layer_index(t) == ref["range"][0] + off]
                for t in names:
                    out = rename_layer(t, out_layer)
                    per = []
                    for s in ings:
                        inn = rename_layer(t, s["range"][0] + off)
                        per.append((s, inn))
                    b = (bsrc, rename_layer(t, bsrc["range"][0] + off)) if bsrc is not None else None
                    table.append((out, si, x, per, b))
                out_layer += 1
        for name in post:
            table.append((name, len(slices) - 1, 0.0, [(s, name) for s in roles[-1][1]],
                          (roles[-1][0], name) if roles[-1][0] else None))

        def view(k: Optional[int]) -> Checkpoint:
            tensors, files = {}, {}
            folder = None
            for out, _, _, per, b in table:
                src, inn = per[k] if k is not None else b
                ck = _open(cache, src["model"])
                info = ck.tensors.get(inn)
                if info is None:
                    raise _usage(f"{spec.source}: {src['at']}: {src['model']} has no tensor {inn!r} "
                                 f"(needed for output tensor {out!r})")
                tensors[out] = dataclasses.replace(info, name=out)
                files[info.file] = ck.files[info.file]
                folder = folder or ck.folder
            label = "base" if k is None else f"ingredient {k}"
            return Checkpoint(f"slices ({label}: " + ", ".join(sorted({p[k][0]['model'] if k is not None else b[0]['model']
                                                                       for _, _, _, p, b in table})) + ")",
                              "safetensors", tensors, files, folder)

        cks = [view(k) for k in range(n)]
        if state["has_base"]:
            spec.base = view(None)
        # parameters per output tensor
        allowed, top = state["allowed"], state["top"]
        for key, scope in allowed.items():
            if key == "int8_mask":
                continue
            if scope == "model":
                for k in range(n):
                    tab = {}
                    for out, si, x, per, _ in table:
                        src, inn = per[k]
                        chain = [v for v in (src["params"].get(key), slices[si]["params"].get(key), top.get(key))
                                 if v is not None]
                        if chain:
                            tab[out] = (Chain(chain) if len(chain) > 1 else chain[0], x, inn)
                        elif key == "weight" and (state["method"] == "linear" or state["method"] in GTA):
                            raise _usage(f"{spec.source}: {src['at']}: no weight (mergekit requires 'weight' for "
                                         f"{state['method']}: give it per source, per slice or at the top level)")
                    if tab:
                        spec.per_model[k][key] = PerTensor(tab)
            else:
                tab = {}
                for out, si, x, _, _ in table:
                    chain = [v for v in (slices[si]["params"].get(key), top.get(key)) if v is not None]
                    if chain:
                        tab[out] = (Chain(chain) if len(chain) > 1 else chain[0], x, out)
                if tab:
                    from .mergekit_schema import map_leaves, rescale_setting

                    rule = PerTensor({o: (map_leaves(s, rescale_setting) if key == "rescale" else s, x, m)
                                      for o, (s, x, m) in tab.items()})
                    spec.options[key] = rule
        spec.config_updates = {"num_hidden_layers": out_layer}
        return cks
    except BaseException:
        for ck in cache.values():
            ck.close()
        raise
