"""Real bitsandbytes checkpoints for the tests, made by transformers + bitsandbytes on the CPU.

A small random Llama (``LlamaConfig``: hidden 256, 2 layers, the 512-token vocabulary of
stories260K, whose tokenizer is copied in) is saved as float32, loaded again with
``BitsAndBytesConfig`` (4-bit NF4/FP4 with and without double quantization, 8-bit LLM.int8) on
``device_map="cpu"`` and written with ``save_pretrained``. Checkpoints are cached under
``CACHE/bnb/<bitsandbytes>-<transformers>-r<RECIPE>/<kind>`` and rebuilt when a version changes.
"""

from __future__ import annotations

import shutil
from pathlib import Path

RECIPE = 1
#: kind -> (BitsAndBytesConfig arguments, torch dtype the float model is loaded in before quantizing)
KINDS = {
    "nf4": (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"), "bfloat16"),
    "nf4-dq": (dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True), "bfloat16"),
    "fp4": (dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"), "float16"),
    "fp4-dq": (dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True), "float32"),
    "int8": (dict(load_in_8bit=True), "bfloat16"),
}
CONFIG = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=True,
              bos_token_id=1, eos_token_id=2, initializer_range=0.08, rms_norm_eps=1e-5)


def _version_key() -> str:
    import bitsandbytes
    import transformers

    return f"{bitsandbytes.__version__}-{transformers.__version__}-r{RECIPE}"


def _base(root: Path, stories: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    d = root / "base"
    if (d / "config.json").exists():
        return d
    torch.manual_seed(14)
    return save(LlamaForCausalLM(LlamaConfig(**CONFIG)), d, stories)


def save(model, d: Path, stories: Path) -> Path:
    """``model.save_pretrained`` with stories260K's tokenizer into ``d``, through ``d.part`` renamed
    at the end (an interrupted build leaves no half checkpoint in the cache)."""
    tmp = d.with_name(d.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(stories / f, tmp / f)
    tmp.rename(d)
    return d


def build(cache: Path, stories: Path, kind: str) -> Path:
    """The checkpoint folder of ``kind`` (a key of :data:`KINDS`), made once and cached."""
    root = cache / "bnb" / _version_key()
    d = root / kind
    if (d / "config.json").exists():
        return d
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    root.mkdir(parents=True, exist_ok=True)
    base = _base(root, stories)
    kw, dtype = KINDS[kind]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype), device_map="cpu",
                                                 quantization_config=BitsAndBytesConfig(**kw))
    return save(model, d, stories)


def bnb_dequantize(path: Path) -> dict:
    """{weight name: float32 numpy} for every quantized layer of the checkpoint at ``path``, decoded by
    bitsandbytes itself (``functional.dequantize_4bit`` with ``QuantState.from_dict``, or
    ``functional.int8_vectorwise_dequant``): the independent reference."""
    import bitsandbytes.functional as F
    import torch
    from safetensors.torch import load_file

    t = load_file(str(path / "model.safetensors"))
    out = {}
    for k in t:
        if ".quant_state.bitsandbytes__" in k:
            w = k.split(".quant_state.")[0]
            qs = F.QuantState.from_dict({x[len(w) + 1:]: v for x, v in t.items() if x.startswith(w + ".")},
                                        torch.device("cpu"))
            out[w] = F.dequantize_4bit(t[w], qs).float().numpy()
        elif k.endswith(".SCB"):
            w = k[: -len("SCB")] + "weight"
            out[w] = F.int8_vectorwise_dequant(t[w], t[k]).float().numpy()
    return out


def hf_logits(path: Path, tokens: list[int]):
    """transformers running the quantized checkpoint (bitsandbytes layers; float32 activations, which
    LLM.int8 layers cast to fp16 and quantize to int8 per row, as bitsandbytes does):
    float64 logits ``(len(tokens), vocab)``."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    # transformers keeps a quantized model in its saved dtype; run the float parts (embeddings, norms)
    # in float32 like llama.cpp: their bf16/fp16 values are exact in float32
    for mod in model.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.dtype in (torch.bfloat16, torch.float16) and type(p) is torch.nn.Parameter:
                setattr(mod, name, torch.nn.Parameter(p.data.float(), requires_grad=False))
    with torch.no_grad():
        out = model(torch.tensor([tokens])).logits[0]
    return out.double().numpy().astype(np.float64)


def exact_logits(path: Path, tokens: list[int], weights: dict | None = None):
    """float64 logits of a plain float32 transformers Llama whose linear weights are bitsandbytes'
    own dequantization of the checkpoint (:func:`bnb_dequantize`, or ``weights``: {name: float32
    numpy} from another library's dequantization): the exact model the checkpoint
    stands for, without bitsandbytes' CPU kernels (which compute in bf16 on AVX512-BF16 machines
    and quantize int8 activations)."""
    import numpy as np
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**CONFIG)
    model = LlamaForCausalLM(cfg).float().eval()
    sd = {k: v.float() for k, v in load_file(str(path / "model.safetensors")).items()
          if v.dtype in (torch.float32, torch.float16, torch.bfloat16) and "quant" not in k and "absmax" not in k
          and not k.endswith(".SCB")}
    sd.update({k: torch.from_numpy(v) for k, v in (bnb_dequantize(path) if weights is None else weights).items()})
    missing, _ = model.load_state_dict(sd, strict=False)
    assert not [k for k in missing if k != "lm_head.weight"], missing
    model.tie_weights()
    with torch.no_grad():
        out = model(torch.tensor([tokens])).logits[0]
    return out.double().numpy().astype(np.float64)
