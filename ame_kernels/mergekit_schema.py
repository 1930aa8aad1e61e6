"""mergekit's YAML schema (a config with ``merge_method:``), read into the same MergeSpec.

``spec.load_spec`` dispatches here when the document has a ``merge_method`` key; everything
is checked before any checkpoint is opened, and an unsupported key, method or feature is an
error naming the file and the key (with a hint among mergekit's keys), never ignored.

    merge_method: ties              # linear, task_arithmetic, ties, dare_ties, dare_linear,
    base_model: path/or/org-name    #   breadcrumbs, breadcrumbs_ties, della, della_linear,
    models:                         #   slerp, model_stock, passthrough (slices), ame
      - model: a/                   # a path, or a Hugging Face ID (org/name[@revision])
        parameters: {weight: 0.5, density: [0.2, 0.8]}
    parameters: {normalize: true, int8_mask: true}
    dtype: bfloat16                 # out_dtype defaults to it; compute is float32 here
    tokenizer_source: base          # base, or a model path whose tokenizer files are copied
    chat_template: auto             # or the template's Jinja text (written to the tokenizer files)
    random_seed: 0                  # the seed of dare_* / della*

Semantics followed (mergekit 0.1.5, benchmarks/mergekit_refs/MANIFEST.json "semantics"):

- Parameters: a scalar; a list (a gradient over the layer index: layer i of L at
  x = i / (L - 1), every other tensor at x = 0); ``{filter: NAME, value: V}`` rules (a list,
  matched in order against the tensor name as a substring; ``*`` or no filter matches all;
  no match falls through). A per-model parameter is looked up in the model's own
  ``parameters`` first, then in the top-level ``parameters``; a shared one (lambda,
  normalize, rescale, t, filter_wise) only in the top-level ones.
- ``base_model``: the base of the task-vector methods and of model_stock (excluded from the
  task vectors when it is also listed in ``models``, as mergekit does); slerp's t = 0 end;
  linear takes it only as one more listed model.
- ``weight`` is required (per model or top level) for linear and the task-vector methods, as
  in mergekit.
- ``int8_mask`` is accepted and has no effect: in mergekit it only stores the sign/keep masks
  as int8 instead of the compute dtype, the same 0/1/-1 values, so the output is unchanged;
  the kernels here keep masks in registers and never store them.
- ``dtype``: mergekit's compute dtype (inputs are cast to it). The kernels here compute in
  float32 whatever the inputs, which is at least mergekit's precision (equal at float32);
  ``dtype`` is therefore the output dtype unless ``out_dtype`` is given. float64 is refused.
"""

from __future__ import annotations

import os
import re
from typing import Any, Dict, List, Optional, Tuple

from .errors import MergeError, suggest

TOP_KEYS = ("merge_method", "models", "slices", "base_model", "dtype", "out_dtype", "parameters",
            "tokenizer_source", "tokenizer", "chat_template", "random_seed")
#: keys of mergekit's schema refused here (named in the error)
UNSUPPORTED_TOP = {"modules": "mergekit's 'modules:' (multi-module architectures) is not supported"}
MODEL_KEYS = ("model", "parameters")

GTA = ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear")
METHODS = ("linear",) + GTA + ("slerp", "model_stock", "passthrough", "ame")
#: mergekit methods this schema does not run (named with a hint)
OTHER_MK_METHODS = ("nuslerp", "multislerp", "karcher", "sce", "nearswap", "arcee_fusion", "ram", "task_adapter")

#: mergekit's parameters per method: name -> 'shared' or 'model' (per input)
def mk_params(method: str) -> Dict[str, str]:
    if method == "linear":
        return {"weight": "model", "normalize": "shared"}
    if method in GTA:
        p = {"int8_mask": "shared", "normalize": "shared", "rescale": "shared", "lambda": "shared",
             "weight": "model", "density": "model"}
        if method.startswith("breadcrumbs"):
            p["gamma"] = "model"
        if method.startswith("della"):
            p["epsilon"] = "model"
        return p
    if method == "slerp":
        return {"t": "shared"}
    if method == "model_stock":
        return {"filter_wise": "shared"}
    return {}


DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "half": "float16"}
#: tokenizer files copied by tokenizer_source: MODEL
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "vocab.txt", "merges.txt", "added_tokens.json", "spiece.model", "chat_template.jinja",
                   "chat_template.json")
#: mergekit 0.1.5's named chat templates (its own data files, not shipped here)
MK_CHAT_TEMPLATES = ("alpaca", "chatml", "exaone", "llama3", "mistral")
HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


class MergekitSchemaError(MergeError):
    pass




def _usage(msg: str):
    from .spec import UsageError

    return UsageError(msg)


def _mk_only(msg: str):
    """A refusal of something mergekit itself runs (spec.MergekitOnly: mergekit-yaml may hand it over)."""
    from .spec import MergekitOnly

    return MergekitOnly(msg)


# ------------------------------------------------------------------------- model references

def resolve_hf_id(ref: str, what: str) -> str:
    """``org/name[@revision]`` -> its snapshot folder: from the local cache, else downloaded (io/hub.py)."""
    from .io.hub import HubError, resolve_hf_id as resolve

    try:
        return resolve(ref, what)
    except HubError as e:
        raise _usage(str(e)) from None


class LoraRef(str):
    """A ``base+lora`` model reference: the string 'BASE+ADAPTER' (resolved), opened by
    ``io.lora.open_lora`` when the merge is planned."""

    base: str = ""
    adapter: str = ""


def _lora_ref(ref: str, folder: str, what: str) -> LoraRef:
    base_s, _, ad_s = ref.partition("+")
    if not base_s or not ad_s:
        raise _lora(ref, what)
    base = resolve_model(base_s, folder, what + " (the base before '+')")
    adapter = resolve_model(ad_s, folder, what + " (the LoRA adapter after '+')")
    if not os.path.isfile(os.path.join(adapter, "adapter_config.json")):
        raise _lora(ref, what, f"{adapter} has no adapter_config.json")
    out = LoraRef(f"{base}+{adapter}")
    out.base, out.adapter = base, adapter
    return out


def open_model(ref: str, what: str = "model"):
    """A resolved reference -> a Checkpoint (a LoraRef applies its adapter) or the path itself."""
    if isinstance(ref, LoraRef):
        from .io.lora import open_lora

        return open_lora(ref.base, ref.adapter, what)
    return ref


def resolve_model(ref: Any, folder: str, what: str) -> str:
    """A mergekit model reference: a local path (beside the config, else the working directory),
    or a Hugging Face ID (the local cache, else downloaded: io/hub.py); ``base+lora`` a LoraRef."""
    if isinstance(ref, dict):
        raise _usage(f"{what}: expected a model path or Hugging Face ID as a string, got a mapping {ref!r}")
    if not isinstance(ref, str) or not ref.strip():
        raise _usage(f"{what}: expected a model path or Hugging Face ID, got {ref!r}")
    p = os.path.expanduser(ref.strip())
    if os.path.isabs(p):
        if not os.path.exists(p) and "+" in p:
            return _lora_ref(p, folder, what)
        return p
    for cand in (os.path.join(folder, p), os.path.abspath(p)):
        if os.path.exists(cand):
            return os.path.abspath(cand)
    if "+" in p:
        return _lora_ref(p, folder, what)
    if HF_ID.match(p):
        return resolve_hf_id(p, what)
    return os.path.abspath(os.path.join(folder, p))  # missing: reported by the reader with this path


def _lora(ref: str, what: str, why: str = "expected BASE+ADAPTER"):
    return _usage(f"{what}: {ref!r}: the 'base+lora' form (a PEFT LoRA adapter folder applied to its base): {why}")


# ------------------------------------------------------------------------- parameter settings

def parse_setting(value: Any, what: str) -> Any:
    """mergekit's ParameterSetting -> a scalar or a methods.params Rule (Gradient / Filtered)."""
    from .methods.params import Filtered, Gradient

    def scalar(v):
        return isinstance(v, (bool, int, float, str))

    if scalar(value):
        return value
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list):
        if not value:
            raise _usage(f"{what}: an empty list (give a value, a gradient [a, b, ...] or filter rules)")
        if all(scalar(v) for v in value):
            return Gradient(value)
        rules = []
        for j, r in enumerate(value):
            if not isinstance(r, dict):
                raise _usage(f"{what}[{j}]: expected {{filter: NAME, value: ...}} (a list mixes rules and numbers), "
                             f"got {r!r}")
            for k in r:
                if k not in ("filter", "value"):
                    raise _usage(f"{what}[{j}]: unknown key {k!r}{suggest(k, ('filter', 'value'))}; "
                                 "a rule is {filter: NAME, value: ...}")
            if "value" not in r:
                raise _usage(f"{what}[{j}]: missing 'value'")
            f = r.get("filter")
            if f is not None and not isinstance(f, str):
                raise _usage(f"{what}[{j}].filter: expected a tensor-name substring, got {f!r}")
            v = r["value"]
            if not (scalar(v) or (isinstance(v, list) and v and all(scalar(e) for e in v))):
                raise _usage(f"{what}[{j}].value: expected a value or a gradient list, got {v!r}")
            rules.append((f, Gradient(v) if isinstance(v, list) else v))
        return Filtered(rules)
    raise _usage(f"{what}: expected a value, a gradient list or {{filter, value}} rules, got {value!r}")


def map_leaves(setting: Any, fn) -> Any:
    from .methods.params import Chain, Filtered, Gradient

    if isinstance(setting, Gradient):
        return Gradient([fn(v) for v in setting.values])
    if isinstance(setting, Filtered):
        return Filtered([(f, map_leaves(s, fn)) for f, s in setting.rules])
    if isinstance(setting, Chain):
        return Chain([map_leaves(s, fn) for s in setting.settings])
    return fn(setting)


def rescale_setting(v: Any) -> Any:
    """mergekit's boolean ``rescale`` (true / false, or their strings) as this engine's l1 / none."""
    if isinstance(v, bool):
        return "l1" if v else "none"
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return "l1" if v.lower() == "true" else "none"
    return v


def params_block(doc: Any, what: str) -> Dict[str, Any]:
    """A ``parameters:`` mapping of a mergekit config ({} when absent); a usage error naming ``what`` otherwise."""
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise _usage(f"{what}: expected a mapping of parameter names to values, got {doc!r}")
    return doc


# ------------------------------------------------------------------------- the schema

def load_mergekit(doc: dict, path: str):
    """A mergekit config document -> MergeSpec (schema 'mergekit'); UsageError naming file and key."""
    from .spec import MergeSpec, check_call, check_finite_value

    for key in doc:
        if key in UNSUPPORTED_TOP:
            raise _mk_only(f"{path}: {key}: {UNSUPPORTED_TOP[key]}")
        if key not in TOP_KEYS:
            raise _usage(f"{path}: unknown key {key!r} of mergekit's schema{suggest(key, TOP_KEYS)} "
                         f"(a file with 'merge_method' is read as a mergekit config; its keys: {', '.join(TOP_KEYS)})")
    folder = os.path.dirname(os.path.abspath(path))
    method = doc.get("merge_method")
    if not isinstance(method, str) or method.lower() not in METHODS:
        hint = suggest(str(method).lower(), METHODS)
        if isinstance(method, str) and method.lower() in OTHER_MK_METHODS:
            raise _mk_only(f"{path}: merge_method: mergekit's {method!r} is not supported here; supported: "
                         f"{', '.join(METHODS)}")
        raise _usage(f"{path}: merge_method: unknown method {method!r}{hint}; supported: {', '.join(METHODS)}")
    method = method.lower()
    spec = MergeSpec(path, [], folder=folder)
    spec.schema = "mergekit"
    # ---- general keys
    for key in ("dtype", "out_dtype"):
        if doc.get(key) is not None:
            v = doc[key]
            name = str(v).lower().replace("torch.", "")
            if name not in DTYPES:
                if name in ("float64", "double", "fp64"):
                    raise _mk_only(f"{path}: {key}: {v!r}: float64 merges are not supported (the kernels compute "
                                   "in float32); use float32, bfloat16 or float16")
                raise _usage(f"{path}: {key}: expected float32, bfloat16 or float16, got {v!r}")
    out_dtype = doc.get("out_dtype") or doc.get("dtype")
    options: Dict[str, Any] = {}
    if out_dtype is not None:
        options["out_dtype"] = DTYPES[str(out_dtype).lower().replace("torch.", "")]
    if "random_seed" in doc and doc["random_seed"] is not None:
        s = doc["random_seed"]
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise _usage(f"{path}: random_seed: expected an integer >= 0, got {s!r}")
    for key, value in doc.items():
        if key not in ("models", "slices", "parameters", "tokenizer"):
            check_finite_value(value, f"{path}: {key}")
    spec.tokenizer_from = _tokenizer(doc, path, folder)
    spec.chat_template = _chat_template(doc.get("chat_template"), path)
    base = None
    if doc.get("base_model") is not None:
        base = resolve_model(doc["base_model"], folder, f"{path}: base_model")
    if doc.get("slices") is not None:
        if doc.get("models") is not None:
            raise _usage(f"{path}: give either 'models' or 'slices', not both (mergekit's rule)")
        from .mergekit_slices import load_slices

        return load_slices(doc, path, spec, method, base, options)
    models_raw = doc.get("models")
    if not isinstance(models_raw, list) or not models_raw:
        raise _usage(f"{path}: 'models' must be a non-empty list of {{model: PATH, parameters: {{...}}}} entries "
                     "(or give 'slices')")
    entries: List[Tuple[str, Dict[str, Any]]] = []
    for i, m in enumerate(models_raw):
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict):
            raise _usage(f"{path}: models[{i}]: expected {{model: PATH, parameters: {{...}}}}, got {m!r}")
        for key in m:
            if key not in MODEL_KEYS:
                raise _usage(f"{path}: models[{i}]: unknown key {key!r}{suggest(key, MODEL_KEYS)} "
                             f"(mergekit's model entry: model, parameters)")
        if "model" not in m:
            raise _usage(f"{path}: models[{i}]: missing 'model'")
        entries.append((resolve_model(m["model"], folder, f"{path}: models[{i}].model"),
                        params_block(m.get("parameters"), f"{path}: models[{i}].parameters")))
    top = params_block(doc.get("parameters"), f"{path}: parameters")
    seed = doc.get("random_seed")
    spec.method = method
    spec.options = options
    if method == "ame":
        _ame(spec, entries, top, base, path)
    elif method == "passthrough":
        if len(entries) != 1 or top or entries[0][1]:
            raise _usage(f"{path}: merge_method passthrough with 'models' takes exactly one model and no parameters "
                         "(to stack layer ranges, use 'slices')")
        spec.method, spec.models, spec.per_model = "linear", [entries[0][0]], [{}]
    else:
        _method(spec, method, entries, top, base, seed, path)
    spec.notes.insert(0, f"schema: mergekit (merge_method: {method})")
    spec.source_method = method
    check_call(spec)

    def checkpoints():
        from .io.checkpoint import open_checkpoint

        opened = []
        try:
            for i, m in enumerate(spec.models):
                ck = open_model(m, f"{path}: models[{i}].model")
                opened.append(open_checkpoint(ck) if isinstance(ck, str) else ck)
            if spec.base is not None and isinstance(spec.base, str):
                ck = open_model(spec.base, f"{path}: base_model")
                spec.base = open_checkpoint(ck) if isinstance(ck, str) else ck
                opened.append(spec.base)
            cks = tie_embeddings(opened[: len(spec.models)] + ([spec.base] if spec.base is not None else []), spec)
            check_vocab(cks, path, mk_only=doc.get("tokenizer_source") is not None or doc.get("tokenizer") is not None)
            if spec.base is not None:
                spec.base = cks[-1]
            return cks[: len(spec.models)]
        except BaseException:
            for ck in opened:
                ck.close()
            raise

    spec.checkpoints = checkpoints
    return spec


def check_vocab(cks: list, path: str, mk_only: bool = False) -> None:
    """Vocabularies of different sizes: refused naming the sizes (mergekit's tokenizer_source: union,
    which permutes and pads the embeddings, is not implemented). ``mk_only``: the config names a
    tokenizer source, with which mergekit merges them (the refusal is then spec.MergekitOnly)."""
    for name in (LM_HEAD,) + EMBED_NAMES:
        rows = {ck.path: ck.tensors[name].shape[0] for ck in cks if name in ck.tensors and ck.tensors[name].shape}
        if len(set(rows.values())) > 1:
            sizes = ", ".join(f"{p}: {r}" for p, r in rows.items())
            raise (_mk_only if mk_only else _usage)(
                f"{path}: the models' vocabularies differ ({name} rows: {sizes}); merging them needs "
                "mergekit's tokenizer_source: union, which is not supported here")


LM_HEAD = "lm_head.weight"
EMBED_NAMES = ("model.embed_tokens.weight", "transformer.wte.weight", "embed_tokens.weight")


def tie_embeddings(cks: list, spec) -> list:
    """mergekit's tied lm_head: a checkpoint without ``lm_head.weight`` whose config.json says
    ``tie_word_embeddings: true`` reads its embeddings as lm_head when another input has one
    (so tied and untied models merge); the output then has its own lm_head, and its config
    says tie_word_embeddings: false. All tied (or all untied): unchanged."""
    import dataclasses

    from .io.checkpoint import Checkpoint

    has = [LM_HEAD in ck.tensors for ck in cks]
    if all(has) or not any(has):
        return cks
    out = []
    for ck in cks:
        if LM_HEAD in ck.tensors:
            out.append(ck)
            continue
        emb = next((e for e in EMBED_NAMES if e in ck.tensors), None)
        tied = False
        if ck.folder and os.path.isfile(os.path.join(ck.folder, "config.json")):
            import json

            try:
                with open(os.path.join(ck.folder, "config.json"), encoding="utf-8") as f:
                    tied = bool(json.load(f).get("tie_word_embeddings", False))
            except (OSError, ValueError):
                tied = False
        if emb is None or not tied:
            return cks  # the engine's structure check names the difference
        tensors = dict(ck.tensors)
        tensors[LM_HEAD] = dataclasses.replace(ck.tensors[emb], name=LM_HEAD)
        out.append(Checkpoint(ck.path, ck.kind, tensors, ck.files, ck.folder))
        spec.notes.append(f"{ck.path}: tied lm_head (tie_word_embeddings): its embeddings are read as lm_head.weight")
    spec.config_updates = {**getattr(spec, "config_updates", {}), "tie_word_embeddings": False}
    return out


def _tokenizer(doc: dict, path: str, folder: str) -> Optional[str]:
    """tokenizer_source / tokenizer: 'base' (None here: the base's files are copied anyway when
    there is one) or a model path whose tokenizer files are copied; anything else an error."""
    src = doc.get("tokenizer_source")
    key = "tokenizer_source"
    tok = doc.get("tokenizer")
    if tok is not None:
        if src is not None:
            raise _usage(f"{path}: give either tokenizer_source or tokenizer, not both (mergekit's rule)")
        if not isinstance(tok, dict):
            raise _usage(f"{path}: tokenizer: expected a mapping {{source: ...}}, got {tok!r}")
        for k in tok:
            if k != "source":
                make = _mk_only if k in ("tokens", "pad_to_multiple_of") else _usage
                raise make(f"{path}: tokenizer.{k}: not supported (only tokenizer.source: base or a model path; "
                           "token embeddings and padding of a new vocabulary are not)")
        # mergekit's TokenizerConfig.source defaults to 'union'
        src, key = tok.get("source", "union"), "tokenizer.source"
    if src is None:
        return None
    if src == "base":
        if doc.get("base_model") is None:
            raise _usage(f"{path}: {key}: 'base' needs a base_model")
        src = doc["base_model"]
    if src == "union":
        dflt = " (mergekit's default when tokenizer: has no source)" if "source" not in (tok or {"source": 1}) else ""
        raise _mk_only(f"{path}: {key}: 'union'{dflt} (a merged vocabulary) is not supported; use 'base' or a model path")
    if isinstance(src, str) and src.startswith("model:"):
        src = src[len("model:"):]
    p = resolve_model(src, folder, f"{path}: {key}")
    if not os.path.isdir(p) or not any(os.path.isfile(os.path.join(p, f)) for f in TOKENIZER_FILES):
        raise _usage(f"{path}: {key}: {p} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...)")
    return p


def _chat_template(value: Any, path: str) -> Optional[str]:
    """mergekit's chat_template: a Jinja template text (written to the output's tokenizer files),
    or 'auto' (the most common template among the models' tokenizer_config.json, chosen when the
    plan is made); mergekit's named templates (chatml, llama3, ...) are its own data files,
    not shipped here: an error asking for the text."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise _usage(f"{path}: chat_template: expected a Jinja template text or 'auto', got {value!r}")
    if value == "auto":
        return value
    if len(value) < 20 or "{" not in value:
        make = _mk_only if value in MK_CHAT_TEMPLATES else _usage
        raise make(f"{path}: chat_template: {value!r}: mergekit's named templates (alpaca, chatml, exaone, "
                   "llama3, mistral) are not shipped here; give the template's Jinja text, or 'auto'")
    return value


def auto_chat_template(folders: List[str]) -> Optional[str]:
    """The most common chat template among the models' tokenizer files (mergekit's 'auto')."""
    import json
    from collections import Counter

    found = []
    for d in folders:
        t = None
        jinja = os.path.join(d, "chat_template.jinja")
        tc = os.path.join(d, "tokenizer_config.json")
        try:
            if os.path.isfile(jinja):
                with open(jinja, encoding="utf-8") as f:
                    t = f.read()
            elif os.path.isfile(tc):
                with open(tc, encoding="utf-8") as f:
                    t = json.load(f).get("chat_template")
        except (OSError, ValueError):
            t = None
        if isinstance(t, dict):
            t = t.get("default")
        if isinstance(t, str) and t.strip():
            found.append(t.strip())
    return Counter(found).most_common(1)[0][0] if found else None


def _method(spec, method: str, entries, top: dict, base: Optional[str], seed, path: str) -> None:
    from .methods.params import Chain, Required, Rule

    allowed = mk_params(method)
    for key in top:
        if key not in allowed:
            raise _usage(f"{path}: parameters.{key}: mergekit's {method} has no parameter {key!r}"
                         f"{suggest(key, allowed)}; its parameters: {', '.join(allowed) or 'none'}")
    for i, (_, params) in enumerate(entries):
        for key in params:
            if key not in allowed:
                raise _usage(f"{path}: models[{i}].parameters.{key}: mergekit's {method} has no parameter {key!r}"
                             f"{suggest(key, allowed)}; its parameters: {', '.join(allowed) or 'none'}")
            if allowed[key] == "shared":
                raise _usage(f"{path}: models[{i}].parameters.{key}: {key!r} is a shared parameter of {method} "
                             "(mergekit reads it from the top-level 'parameters' only, so here it would be ignored); "
                             "move it to the top-level parameters")
    paths = [p for p, _ in entries]
    if method == "linear":
        if base is not None and base not in paths:
            raise _usage(f"{path}: base_model: linear has no base; mergekit adds an unlisted base_model as one more "
                         "input that needs a weight: list it under models with a weight, or drop base_model")
        ings, base_out = entries, None
    elif method == "slerp":
        if base is None:
            raise _usage(f"{path}: base_model: slerp needs a base_model (the t = 0 end) and one other model")
        others = [e for e in entries if e[0] != base]
        if len(others) != 1:
            raise _usage(f"{path}: models: slerp takes base_model and exactly one other model, got {len(others)} "
                         "others")
        ings, base_out = [(base, {})] + others, None
        if "t" not in top:
            raise _usage(f"{path}: parameters.t: slerp needs t (mergekit requires it; 0 gives base_model)")
    else:  # task-vector methods and model_stock: the base is excluded from the task vectors
        if base is None:
            raise _usage(f"{path}: base_model: {method} needs a base_model")
        ings = [e for e in entries if e[0] != base]
        if not ings:
            raise _usage(f"{path}: models: {method} needs at least one model besides base_model")
        base_out = base
        dropped = [i for i, e in enumerate(entries) if e[0] == base and e[1]]
        if dropped:
            spec.notes.append(f"models[{dropped[0]}] is base_model: its parameters do not apply (as in mergekit)")
    per_model: List[Dict[str, Any]] = []
    options = spec.options
    index = {id(e): j for j, e in enumerate(entries)}
    for i, (_, params) in enumerate(ings):
        at = f"models[{index[id(ings[i])]}]" if id(ings[i]) in index else "base_model"

        mine: Dict[str, Any] = {}
        for key, scope in allowed.items():
            if scope != "model":
                continue
            own = params.get(key)
            glob = top.get(key)
            own_s = parse_setting(own, f"{path}: {at}.parameters.{key}") if own is not None else None
            glob_s = parse_setting(glob, f"{path}: parameters.{key}") if glob is not None else None
            required = key == "weight" and (method == "linear" or method in GTA)
            chain = [s for s in (own_s, glob_s) if s is not None]
            if chain and required and any(isinstance(s, Rule) for s in chain):
                mine[key] = Chain(chain + [Required(key, f"{path}: {at}")])
            elif len(chain) > 1:
                mine[key] = Chain(chain)
            elif chain:
                mine[key] = chain[0]
            elif required:
                raise _usage(f"{path}: {at}: {ings[i][0]} has no weight (mergekit requires "
                             f"'weight' for {method}: give it in the model's parameters or the top-level ones)")
        per_model.append(mine)
    for key, scope in allowed.items():
        if scope == "shared" and key in top:
            if key == "int8_mask":
                continue  # no effect on the result (module docstring)
            s = parse_setting(top[key], f"{path}: parameters.{key}")
            options[key] = map_leaves(s, rescale_setting) if key == "rescale" else s
    if method == "task_arithmetic":
        for key in ("density", "rescale"):  # mergekit's task_arithmetic does not sparsify: no effect there
            if options.pop(key, None) is not None or any(m.pop(key, None) is not None for m in per_model):
                spec.notes.append(f"{key} has no effect on task_arithmetic (none in mergekit either)")
    if seed is not None and method in ("dare_ties", "dare_linear", "della", "della_linear"):
        options["seed"] = seed
    spec.models = [p for p, _ in ings]
    spec.per_model = per_model
    spec.base = base_out


def _ame(spec, entries, top: dict, base: Optional[str], path: str) -> None:
    from .config import FIELD_NAMES

    for key, value in top.items():
        if key not in FIELD_NAMES and key != "transform":
            raise _usage(f"{path}: parameters.{key}: not an option of merge_method ame{suggest(key, FIELD_NAMES)}")
        if isinstance(value, (list, dict)) and key not in ("betas", "order", "scores", "lr_schedule"):
            raise _usage(f"{path}: parameters.{key}: AME options take one value (no gradients or filters)")
    scores = []
    for i, (_, params) in enumerate(entries):
        for key in params:
            if key != "score":
                raise _usage(f"{path}: models[{i}].parameters.{key}: merge_method ame takes only 'score' per model")
        scores.append(params.get("score"))
    options = {**spec.options, **top}
    if any(s is not None for s in scores):
        if not all(s is not None for s in scores):
            raise _usage(f"{path}: models: give a score to every model or to none")
        options["scores"] = scores
    if base is not None:
        if "transform" not in top:
            raise _usage(f"{path}: base_model: merge_method ame takes a pivot, not a base (parameters: "
                         "{pivot: soup | INDEX}); a base is for parameters.transform")
        spec.base = base
    spec.method = "ame"
    spec.options = options
    spec.models = [p for p, _ in entries]
    spec.per_model = [{} for _ in entries]
