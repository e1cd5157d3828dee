"""Real PEFT LoRA adapters for the tests, made by peft on the CPU, and PEFT's own logits.

The base is the small random Llama of :mod:`bnb_checkpoints` (``LlamaConfig``: hidden 256, 2
layers, 4 heads / 2 KV heads so that Q and K rows are permuted in GGUF, stories260K's tokenizer),
saved in float32. Adapters are ``get_peft_model(base, LoraConfig(...))`` with ``lora_B`` drawn
from a normal distribution (PEFT initializes it to zero, which would change nothing) and saved
with ``save_pretrained``. Cached under ``CACHE/lora/<peft>-<transformers>-r<RECIPE>/<name>``.

The QLoRA adapter is trained-shaped the same way over the bitsandbytes NF4 checkpoint of
:mod:`bnb_checkpoints` loaded 4-bit by transformers (PEFT wraps bitsandbytes' ``Linear4bit``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import bnb_checkpoints as bc

RECIPE = 1
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
#: name -> (LoraConfig arguments, std of lora_B, seed)
ADAPTERS = {
    "main": (dict(r=8, lora_alpha=16, target_modules=ALL), 0.02, 1),
    "second": (dict(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj", "down_proj"]), 0.03, 2),
    "rslora": (dict(r=16, lora_alpha=8, target_modules=ALL, use_rslora=True,
                    alpha_pattern={"model.layers.1.self_attn.o_proj": 24}), 0.02, 3),
}


def _version_key() -> str:
    import peft
    import transformers

    return f"{peft.__version__}-{transformers.__version__}-r{RECIPE}"


def root(cache: Path) -> Path:
    return cache / "lora" / _version_key()


def base(cache: Path, stories: Path) -> Path:
    """The float32 base checkpoint (made once)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d = root(cache) / "base"
    if (d / "config.json").exists():
        return d
    d.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(14)
    return bc.save(LlamaForCausalLM(LlamaConfig(**bc.CONFIG)), d, stories)


def _save_adapter(model, d: Path, kw: dict, std: float, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", **kw))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, std)
    tmp = d.with_name(d.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    pm.save_pretrained(tmp)
    tmp.rename(d)
    return d


def adapter(cache: Path, stories: Path, name: str) -> Path:
    """The PEFT adapter folder ``name`` (a key of :data:`ADAPTERS`) over :func:`base`."""
    d = root(cache) / name
    if (d / "adapter_config.json").exists():
        return d
    import torch
    from transformers import LlamaForCausalLM

    b = base(cache, stories)
    kw, std, seed = ADAPTERS[name]
    return _save_adapter(LlamaForCausalLM.from_pretrained(b, dtype=torch.float32), d, kw, std, seed)


def smollm2_adapter(cache: Path, smollm2: Path) -> Path:
    """A rank-8 adapter on all seven projections of the real SmolLM2-135M-Instruct checkpoint
    (30 layers, 9 heads / 3 KV heads, hidden 576)."""
    d = root(cache) / "smollm2-main"
    if (d / "adapter_config.json").exists():
        return d
    import torch
    from transformers import LlamaForCausalLM

    d.parent.mkdir(parents=True, exist_ok=True)
    model = LlamaForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    return _save_adapter(model, d, dict(r=8, lora_alpha=16, target_modules=ALL), 0.01, 5)


def qlora(cache: Path, stories: Path) -> tuple[Path, Path]:
    """(bitsandbytes NF4 checkpoint, PEFT adapter made over it loaded in 4 bits)."""
    nf4 = bc.build(cache, stories, "nf4")
    d = root(cache) / "qlora-nf4"
    if (d / "adapter_config.json").exists():
        return nf4, d
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(nf4, device_map="cpu")
    return nf4, _save_adapter(model, d, dict(r=8, lora_alpha=16, target_modules=ALL), 0.02, 4)


def scaled_copy(src: Path, dst: Path, factor: float) -> Path:
    """A copy of adapter ``src`` whose ``lora_alpha`` is multiplied by ``factor``: in PEFT's own
    terms, the adapter applied with scale ``factor`` (the reference for ``--lora FILE:SCALE``)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["lora_alpha"] = cfg["lora_alpha"] * factor
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def _float_base(base_dir: Path, weights: dict | None = None):
    """A float32 transformers Llama of ``base_dir`` (a float checkpoint), or of ``bc.CONFIG`` holding
    ``weights`` ({hf name: float32 numpy}, e.g. bitsandbytes' dequantization) over ``base_dir``'s
    float tensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if weights is None:
        return LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    from safetensors.torch import load_file

    model = LlamaForCausalLM(LlamaConfig(**bc.CONFIG)).float().eval()
    sd = {k: v.float() for k, v in load_file(str(base_dir / "model.safetensors")).items()
          if v.dtype in (torch.float32, torch.float16, torch.bfloat16) and "quant" not in k and "absmax" not in k}
    sd.update({k: torch.from_numpy(v) for k, v in weights.items()})
    missing, _ = model.load_state_dict(sd, strict=False)
    assert not [k for k in missing if k != "lm_head.weight"], missing
    model.tie_weights()
    return model


def peft_logits(base_dir: Path, adapters: list[Path], tokens: list[int], merged: bool = False, weights=None):
    """float64 logits ``(len(tokens), vocab)`` of PEFT running ``adapters`` (all active, each at its
    own scaling) on the float32 base; ``merged``: after ``merge_and_unload`` (PEFT's merged weights)."""
    import numpy as np
    import torch
    from peft import PeftModel

    model = _float_base(base_dir, weights)
    pm = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="a0")
    for i, a in enumerate(adapters[1:], 1):
        pm.load_adapter(str(a), adapter_name=f"a{i}")
    pm.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    pm.eval()
    if merged:
        pm = pm.merge_and_unload()
    with torch.no_grad():
        out = pm(torch.tensor([tokens])).logits[0]
    return out.double().numpy().astype(np.float64)


def peft_merged_weights(base_dir: Path, adapter_dir: Path, weights=None) -> dict:
    """{hf weight name: float32 numpy} of PEFT's ``merge_and_unload`` (the linear layers only)."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(_float_base(base_dir, weights), str(adapter_dir))
    m = pm.merge_and_unload()
    return {k: v.detach().float().numpy() for k, v in m.state_dict().items()
            if any(f".{t}." in k for t in ALL)}
