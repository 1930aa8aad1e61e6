"""A PEFT LoRA adapter for models.py's ``base`` and PEFT's own merge of it (merge_and_unload).

    /work/mkvenv/bin/python benchmarks/mergekit_refs/make_lora_refs.py

Writes lora/adapter/ (adapter_config.json, adapter_model.safetensors: r = 4, alpha = 8 on
q_proj, v_proj and down_proj with random A and B, lm_head in modules_to_save, perturbed) and
out/lora_merged.safetensors (PEFT's merge_and_unload of it into base, float32), with PEFT's
version in lora/PEFT.json. Needs torch, transformers and peft (the mergekit venv has them); the
package and the tests do not (tests/test_mergekit_schema.py reads the stored files).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import models  # noqa: E402


def main() -> int:
    import peft
    import torch
    import transformers
    from safetensors.torch import save_file

    torch.manual_seed(20261201)
    cfg = transformers.LlamaConfig(**{k: v for k, v in models.llama_config().items()
                                      if k not in ("architectures", "model_type", "torch_dtype")})
    model = transformers.LlamaForCausalLM(cfg).to(torch.float32)
    sd = {k: torch.from_numpy(v.copy()) for k, v in models.models_f32()["base"].items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in m for m in missing), (missing, unexpected)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.1,
                           init_lora_weights=False, modules_to_save=["lm_head"])
    pm = peft.get_peft_model(model, lcfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.05)
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.01)
    out = os.path.join(HERE, "lora", "adapter")
    shutil.rmtree(out, ignore_errors=True)
    pm.save_pretrained(out, safe_serialization=True)
    for f in os.listdir(out):
        if f not in ("adapter_config.json", "adapter_model.safetensors"):
            os.remove(os.path.join(out, f))
    merged = pm.merge_and_unload()
    msd = {k: v.detach().contiguous() for k, v in merged.state_dict().items() if k in sd}
    save_file(msd, os.path.join(HERE, "out", "lora_merged.safetensors"))
    with open(os.path.join(HERE, "lora", "PEFT.json"), "w") as f:
        json.dump({"peft_version": peft.__version__, "transformers_version": transformers.__version__,
                   "torch_version": torch.__version__, "base": "models.py base", "merged": "out/lora_merged.safetensors"},
                  f, indent=1)
        f.write("\n")
    print("ok", len(msd), "tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
