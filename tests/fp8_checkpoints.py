"""Real FP8 checkpoints for the tests, made on the CPU by transformers and compressed-tensors.

The random Llama of ``bnb_checkpoints`` (hidden 256, 2 layers, stories260K's tokenizer), in bf16:

* ``fp8-block``, ``fp8-ue8m0``, ``fp8-tensor``: ``quant_method: fp8`` as DeepSeek-V3 / Qwen3 publish it
  (and, without ``weight_block_size``, one scale per tensor), each linear
  weight quantized by transformers' own ``integrations.finegrained_fp8.Fp8Quantize`` (the op
  ``FineGrainedFP8Config`` uses; its GPU check is bypassed by calling the op directly): float8_e4m3fn
  weights and ``weight_scale_inv`` per 128x128 block (float32, or UE8M0 powers of two);
* ``ct-fp8-channel``, ``ct-fp8-block``, ``ct-fp8-tensor``: compressed-tensors ``float-quantized``
  (the FP8_DYNAMIC and FP8_BLOCK presets, and a weights-only per-tensor scheme), and
  ``ct-w8a8-channel``, ``ct-w8a8-group``: ``int-quantized`` (the W8A8 preset, and int8 groups of
  64 with int8 per-token activations), as llm-compressor writes them: the scheme applied
  with ``apply_quantization_config``, the scales computed by its ``calculate_qparams`` from each
  weight's min/max (what llm-compressor's min-max observer feeds it), the weights compressed by
  ``ModelCompressor.compress_model`` and the config written by ``update_config``;
* ``fp8-e5m2-block``, ``fp8-e5m2-tensor``: ``quant_method: fp8`` with ``fmt: e5m2``: the same
  transformers op with its fp8 dtype and range set to torch's ``float8_e5m2`` (transformers itself
  only writes e4m3fn; the op is dtype-generic: scale ``max|w| / 57344`` per block, clamp, cast),
  and ``fp8-e5m2-channel``: AutoFP8-style per-row ``weight_scale`` (``(out, 1)``), the rows
  quantized with torch the same way. compressed-tensors cannot write e5m2 (its 8-bit float
  ``QuantizationArgs`` are e4m3fn only: ``FP8_E4M3_DATA``), so there is no compressed-tensors
  e5m2 checkpoint.

Cached under ``CACHE/fp8/<transformers>-<compressed-tensors>-r<RECIPE>/<kind>``.
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

from bnb_checkpoints import CONFIG

RECIPE = 2
KINDS = ["fp8-block", "fp8-ue8m0", "fp8-tensor", "ct-fp8-channel", "ct-fp8-block", "ct-fp8-tensor"]
#: llm-compressor's W8A8 output format (compressed-tensors int-quantized): channel scales (the W8A8
#: preset) and group scales (int8 weights in groups of 64, int8 dynamic per-token activations)
INT8_KINDS = ["ct-w8a8-channel", "ct-w8a8-group"]
#: float8_e5m2 weights (``fmt: e5m2``): 128x128 block scales, one scale per tensor, one per row
E5M2_KINDS = ["fp8-e5m2-block", "fp8-e5m2-tensor", "fp8-e5m2-channel"]
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _version_key() -> str:
    import compressed_tensors
    import transformers

    return f"{transformers.__version__}-{compressed_tensors.__version__}-r{RECIPE}"


def _model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(8)
    return LlamaForCausalLM(LlamaConfig(**CONFIG)).to(torch.bfloat16)


def _finish(model, tmp: Path, stories: Path) -> None:
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(stories / f, tmp / f)


def _transformers_fp8(tmp: Path, stories: Path, scale_fmt: str, block=(128, 128), e5m2: bool = False) -> None:
    import contextlib
    from unittest import mock

    import torch
    from transformers import FineGrainedFP8Config
    from transformers.integrations import finegrained_fp8
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    model = _model()
    cfg = FineGrainedFP8Config(weight_block_size=list(block) if block else None, scale_fmt=scale_fmt)
    op = Fp8Quantize(types.SimpleNamespace(quantization_config=cfg))
    fi = torch.finfo(torch.float8_e5m2)
    # the op reads its target dtype and range from these module globals (e4m3fn, +-448)
    dtype = (mock.patch.multiple(finegrained_fp8, _FP8_DTYPE=torch.float8_e5m2, _FP8_MIN=fi.min, _FP8_MAX=fi.max)
             if e5m2 else contextlib.nullcontext())
    sd = {}
    with dtype:
        for k, v in model.state_dict().items():
            if k == "lm_head.weight":
                continue
            if k.endswith(".weight") and k.split(".")[-2] in LINEARS:
                sd.update(op._quantize_one(k, v))
            else:
                sd[k] = v
    _save_quantized(tmp, model, sd, dict(cfg.to_dict(), **({"fmt": "e5m2"} if e5m2 else {})))


def _save_quantized(tmp: Path, model, sd: dict, quantization_config: dict) -> None:
    """Write ``sd`` (the quantized state dict) as ``model``'s checkpoint in ``tmp``, a Llama config
    with ``quantization_config``."""
    from safetensors.torch import save_file

    model.config.architectures = ["LlamaForCausalLM"]
    model.config.save_pretrained(tmp)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    c = json.loads((tmp / "config.json").read_text())
    c["quantization_config"] = quantization_config
    (tmp / "config.json").write_text(json.dumps(c, indent=2))


def _e5m2_channel(tmp: Path, stories: Path) -> None:
    """AutoFP8-style per-row scales: ``P.weight`` float8_e5m2, ``P.weight_scale`` float32 ``(out, 1)``
    = each row's ``max|w| / 57344``; quantized with torch (scale, clamp to e5m2's range, cast)."""
    import torch

    model = _model()
    fi = torch.finfo(torch.float8_e5m2)
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        if k.endswith(".weight") and k.split(".")[-2] in LINEARS:
            w = v.float()
            amax = w.abs().amax(dim=1, keepdim=True)
            s = torch.where(amax > 0, amax / fi.max, torch.ones_like(amax))
            sd[k] = (w / s).clamp(fi.min, fi.max).to(torch.float8_e5m2)
            sd[k[: -len("weight")] + "weight_scale"] = s
        else:
            sd[k] = v
    _save_quantized(tmp, model, sd, {"quant_method": "fp8", "fmt": "e5m2", "activation_scheme": "dynamic"})


def _ct(tmp: Path, stories: Path, preset: str, model=None) -> None:
    """Quantize ``model`` (default: the random test Llama, bf16) with compressed-tensors' ``preset``
    ("TENSOR": weights-only per-tensor FP8) and save it, compressed, to ``tmp``."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config, preset_name_to_scheme)
    from compressed_tensors.quantization.utils import calculate_qparams

    model = _model() if model is None else model
    if preset == "TENSOR":
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=8, type="float",
                                                                                 strategy="tensor", symmetric=True))
    elif preset == "W8A8_GROUP":
        scheme = QuantizationScheme(
            targets=["Linear"],
            weights=QuantizationArgs(num_bits=8, type="int", strategy="group", group_size=64, symmetric=True),
            input_activations=QuantizationArgs(num_bits=8, type="int", strategy="token", symmetric=True, dynamic=True))
    else:
        scheme = preset_name_to_scheme(preset, ["Linear"])
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"]))
    with torch.no_grad():
        for mod in model.modules():
            if not hasattr(mod, "weight_scale"):
                continue
            a = mod.quantization_scheme.weights
            w = mod.weight.float()
            if a.strategy == "block":
                bm, bn = a.block_structure
                r = w.reshape(w.shape[0] // bm, bm, w.shape[1] // bn, bn)
                mn, mx = r.amin(dim=(1, 3)), r.amax(dim=(1, 3))
            elif a.strategy == "group":
                r = w.reshape(w.shape[0], -1, a.group_size)
                mn, mx = r.amin(dim=2), r.amax(dim=2)
            elif a.strategy == "channel":
                mn, mx = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
            else:
                mn, mx = w.min().reshape(1), w.max().reshape(1)
            s, z = calculate_qparams(mn, mx, a)
            mod.weight_scale.copy_(s.reshape(mod.weight_scale.shape))
            mod.weight_zero_point.copy_(z.reshape(mod.weight_zero_point.shape))
    comp = ModelCompressor.from_pretrained_model(model)
    comp.compress_model(model)
    model.save_pretrained(tmp)
    comp.update_config(str(tmp))


def build(cache: Path, stories: Path, kind: str) -> Path:
    """The checkpoint folder of ``kind`` (one of :data:`KINDS`, :data:`E5M2_KINDS` or :data:`INT8_KINDS`),
    made once and cached."""
    root = cache / "fp8" / _version_key()
    d = root / kind
    if (d / "config.json").exists():
        return d
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{kind}.part"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    if kind == "fp8-block":
        _transformers_fp8(tmp, stories, "float")
    elif kind == "fp8-ue8m0":
        _transformers_fp8(tmp, stories, "ue8m0")
    elif kind == "fp8-tensor":
        _transformers_fp8(tmp, stories, "float", None)
    elif kind == "fp8-e5m2-block":
        _transformers_fp8(tmp, stories, "float", e5m2=True)
    elif kind == "fp8-e5m2-tensor":
        _transformers_fp8(tmp, stories, "float", None, e5m2=True)
    elif kind == "fp8-e5m2-channel":
        _e5m2_channel(tmp, stories)
    else:
        _ct(tmp, stories, {"ct-fp8-channel": "FP8_DYNAMIC", "ct-fp8-block": "FP8_BLOCK", "ct-fp8-tensor": "TENSOR",
                           "ct-w8a8-channel": "W8A8", "ct-w8a8-group": "W8A8_GROUP"}[kind])
    _finish(None, tmp, stories)
    tmp.rename(d)
    return d


def reference_dequantize(path: Path) -> dict:
    """{weight name: float32 numpy}: each quantized layer decoded by its own library (transformers'
    ``_dequantize_fp8_weight`` in float32, or compressed-tensors' ``dequantize`` with the scale in
    float32, i.e. the exact product ``q * s``)."""
    import torch
    from safetensors.torch import load_file

    cfg = json.loads((path / "config.json").read_text())["quantization_config"]
    t = load_file(str(path / "model.safetensors"))
    out = {}
    if cfg["quant_method"] == "fp8":
        from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

        for k, v in t.items():
            if v.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                # block or tensor scales (weight_scale_inv), or AutoFP8's per-row weight_scale (out, 1)
                s = t[k + "_scale_inv"] if k + "_scale_inv" in t else t[k + "_scale"]
                out[k] = _dequantize_fp8_weight(v.clone(), s.to(torch.float32), cfg.get("weight_block_size"),
                                                torch.float32).numpy()
    else:
        from compressed_tensors.quantization import QuantizationArgs
        from compressed_tensors.quantization.lifecycle.forward import dequantize

        args = QuantizationArgs(**next(iter(cfg["config_groups"].values()))["weights"])
        for k, v in t.items():
            if v.dtype in (torch.float8_e4m3fn, torch.int8) and k.endswith(".weight"):
                p = k[: -len("weight")]
                zp = t.get(p + "weight_zero_point")
                out[k] = dequantize(v, t[p + "weight_scale"].float(), zp, args, dtype=torch.float32).numpy()
    return out
