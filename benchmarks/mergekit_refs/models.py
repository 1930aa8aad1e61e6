"""The inputs of the stored mergekit references, regenerated bitwise with numpy alone.

No mergekit (nor torch) import: tests/test_mergekit_parity.py and make_refs.py both
build the same tiny Llama-shaped checkpoints from here, and MANIFEST.json records a
sha256 of every model so a numpy whose random streams changed is caught, not trusted.

Every value sits on a fixed-point grid so float32 holds it exactly and a fine-tune's
task vector ``ft - base`` is exact in float32 whatever the order of evaluation:

* base (and ``far``) entries are ``k * 2**-12`` (|value| < 4);
* a fine-tune is ``base + m * 2**-22`` with ``m`` a nonzero integer whose magnitudes are
  *distinct within each tensor* (a random sample without replacement from
  [256, 65536)): no task-vector entry is 0 and no two have equal |value|, so a magnitude
  rank (TIES top-k, breadcrumbs' window, DELLA's ranks) has no ties to break, and a
  dropped entry (DARE/DELLA) is visible as ``out == base``.

Models: ``base``; fine-tunes ``ft0``, ``ft1`` (signs agree with ft0's on ~70%),
``ft2`` (signs *oppose* ft0's on ~60%: TIES' sign election matters); ``far``, an
independent model on the same grid (cosine ~0 with base: SLERP's spherical branch;
the norm weights, all ~1, stay colinear and take its linear branch).
"""

from __future__ import annotations

import hashlib
from typing import Dict, List, Tuple

import numpy as np

SPEC = dict(vocab=256, hidden=32, inter=64, layers=3, heads=4, kv_heads=2, seed=20261201)
BASE_GRID = 2.0 ** -12
DELTA_GRID = 2.0 ** -22
MAG_LO, MAG_HI = 256, 65536          # |m| range of a task-vector entry, in DELTA_GRID units
NAMES = ("base", "ft0", "ft1", "ft2", "far")


def shapes(spec: dict = SPEC) -> List[Tuple[str, Tuple[int, ...]]]:
    """(name, shape) of every tensor of the Llama checkpoint, in file order."""
    v, h, i, n = spec["vocab"], spec["hidden"], spec["inter"], spec["layers"]
    kv = h // spec["heads"] * spec["kv_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for layer in range(n):
        p = f"model.layers.{layer}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def layer_index(name: str):
    """The decoder layer a tensor belongs to, or None (embeddings, final norm, lm_head)."""
    if name.startswith("model.layers."):
        return int(name.split(".")[2])
    return None


def llama_config(spec: dict = SPEC) -> dict:
    """A full config.json, so mergekit resolves the architecture (LlamaForCausalLM)."""
    h = spec["hidden"]
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
        "intermediate_size": spec["inter"], "num_hidden_layers": spec["layers"],
        "num_attention_heads": spec["heads"], "num_key_value_heads": spec["kv_heads"],
        "head_dim": h // spec["heads"], "vocab_size": spec["vocab"], "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
        "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2,
    }


def _base_ints(rng, name, shape):
    if name.endswith("norm.weight"):           # RMSNorm gains ~ 1
        return np.rint((1.0 + 0.02 * rng.standard_normal(shape)) / BASE_GRID).astype(np.int64)
    k = np.rint(0.05 * rng.standard_normal(shape) / BASE_GRID).astype(np.int64)
    return np.clip(k, -4095, 4095)


def _magnitudes(rng, n):
    return rng.permutation(MAG_HI - MAG_LO)[:n].astype(np.int64) + MAG_LO


def model_ints(spec: dict = SPEC) -> Dict[str, Dict[str, np.ndarray]]:
    """Every model as int64 arrays in DELTA_GRID units (value = int * 2**-22)."""
    rng = np.random.default_rng(spec["seed"])
    up = int(round(BASE_GRID / DELTA_GRID))
    models = {k: {} for k in NAMES}
    for name, shape in shapes(spec):
        n = int(np.prod(shape))
        base = _base_ints(rng, name, shape) * up
        far = _base_ints(rng, name, shape) * up
        s0 = np.where(rng.random(n) < 0.5, -1, 1)
        s1 = np.where(rng.random(n) < 0.7, s0, -s0)
        s2 = np.where(rng.random(n) < 0.6, -s0, s0)
        for key, sign in (("ft0", s0), ("ft1", s1), ("ft2", s2)):
            m = sign * _magnitudes(rng, n)
            models[key][name] = base + m.reshape(shape)
        models["base"][name] = base
        models["far"][name] = far
    return models


def models_f32(spec: dict = SPEC) -> Dict[str, Dict[str, np.ndarray]]:
    """Every model as float32 numpy state dicts (exact: the ints fit float32's 24 bits)."""
    out = {}
    for key, sd in model_ints(spec).items():
        out[key] = {}
        for name, v in sd.items():
            assert np.abs(v).max() < 2 ** 24
            out[key][name] = (v.astype(np.float64) * DELTA_GRID).astype(np.float32)
    return out


def digest(sd: Dict[str, np.ndarray]) -> str:
    """sha256 over names, shapes and float32 bytes, in file order."""
    h = hashlib.sha256()
    for name in sorted(sd):
        a = np.ascontiguousarray(sd[name], dtype=np.float32)
        h.update(name.encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def task_vector_scale(spec: dict = SPEC) -> float:
    """Largest |task-vector entry| (the unit the parity tolerances are stated in)."""
    return MAG_HI * DELTA_GRID
