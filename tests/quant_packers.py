"""Our own packers for GPTQ, AWQ and compressed-tensors, written from the published formats.

They are deliberately written differently from ggq's unpackers (per-word shift/OR loops, the
explicit 3-bit word-straddling recipe of AutoGPTQ's ``QuantLinear.pack``, AWQ's interleave map,
compressed-tensors' ``pack_to_int32``), so a test that packs here and decodes with ggq checks the
format, not one implementation against itself. :func:`make_checkpoint` writes a tiny synthetic
Llama checkpoint whose linear layers are packed, and returns the codes for the reference.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble k of a word holds column AWQ_ORDER[k]


def pack_gptq_rows(values: np.ndarray, bits: int) -> np.ndarray:
    """uint codes (n, cols) -> int32 (n * bits / 32, cols), packed along axis 0 as AutoGPTQ does."""
    v = values.astype(np.uint32)
    n, cols = v.shape
    out = np.zeros((n * bits // 32, cols), dtype=np.uint32)
    if bits in (2, 4, 8):
        per = 32 // bits
        for row in range(out.shape[0]):
            for j in range(per):
                out[row] |= v[row * per + j] << np.uint32(bits * j)
    elif bits == 3:
        i, row = 0, 0
        while row < out.shape[0]:
            for j in range(i, i + 10):
                out[row] |= v[j] << np.uint32(3 * (j - i))
            i += 10
            out[row] |= v[i] << np.uint32(30)
            row += 1
            out[row] |= (v[i] >> np.uint32(2)) & np.uint32(1)
            i += 1
            for j in range(i, i + 10):
                out[row] |= v[j] << np.uint32(3 * (j - i) + 1)
            i += 10
            out[row] |= v[i] << np.uint32(31)
            row += 1
            out[row] |= (v[i] >> np.uint32(1)) & np.uint32(3)
            i += 1
            for j in range(i, i + 10):
                out[row] |= v[j] << np.uint32(3 * (j - i) + 2)
            i += 10
            row += 1
    else:
        raise ValueError(bits)
    return out.view(np.int32)


def pack_gptq_cols(values: np.ndarray, bits: int) -> np.ndarray:
    """uint codes (rows, n) -> int32 (rows, n * bits / 32), packed along axis 1 (GPTQ qzeros)."""
    return np.ascontiguousarray(pack_gptq_rows(np.ascontiguousarray(values.T), bits).T)


def pack_awq_gemm(values: np.ndarray) -> np.ndarray:
    """4-bit codes (rows, n) -> int32 (rows, n / 8): word w, nibble k = column 8w + AWQ_ORDER[k]."""
    v = values.astype(np.uint32)
    rows, n = v.shape
    out = np.zeros((rows, n // 8), dtype=np.uint32)
    for col in range(n // 8):
        for k in range(8):
            out[:, col] |= v[:, col * 8 + AWQ_ORDER[k]] << np.uint32(4 * k)
    return out.view(np.int32)


def pack_seq(values: np.ndarray, bits: int) -> np.ndarray:
    """uint codes (rows, n) -> int32 (rows, ceil(n / (32 / bits))): consecutive codes per word,
    code k of a word at bits k*bits (AWQ GEMV, compressed-tensors pack_to_int32), zero-padded."""
    per = 32 // bits
    v = values.astype(np.uint32)
    rows, n = v.shape
    pad = -n % per
    v = np.concatenate([v, np.zeros((rows, pad), np.uint32)], axis=1)
    out = np.zeros((rows, v.shape[1] // per), dtype=np.uint32)
    for k in range(per):
        out |= v[:, k::per] << np.uint32(bits * k)
    return out.view(np.int32)


def gemv_zeros_width(in_features: int, group_size: int, pack_num: int = 8) -> int:
    """AWQ GEMV's padded width (in words) of qzeros (calculate_zeros_width in AutoAWQ)."""
    mult = {128: 1, 64: 2, 32: 4}[min(group_size, 128)]
    base = -(-(in_features // group_size) // pack_num)
    return -(-base // mult) * mult


@dataclass
class Layer:
    """Reference codes of one linear layer, torch order: q (out, in) unsigned codes, s (out, groups)
    float32 (exact fp16/bf16 values), z (out, groups) integer zero points, g (in,) groups."""

    q: np.ndarray
    s: np.ndarray
    z: np.ndarray
    g: np.ndarray

    def dequantize(self) -> np.ndarray:
        w = self.s[:, self.g].astype(np.float64) * (self.q.astype(np.float64) - self.z[:, self.g])
        return w.astype(np.float32)


def random_layer(rng, out: int, n_in: int, bits: int, group_size: int, sym: bool, act_order: bool = False,
                 zmax: int | None = None, scale_dtype=np.float16) -> Layer:
    gs = n_in if group_size == -1 else group_size
    groups = -(-n_in // gs)
    q = rng.integers(0, 1 << bits, size=(out, n_in))
    s = rng.uniform(0.004, 0.03, size=(out, groups)).astype(scale_dtype).astype(np.float32)
    if sym:
        z = np.full((out, groups), 1 << (bits - 1))
    else:
        z = rng.integers(0, (zmax if zmax is not None else (1 << bits) - 1) + 1, size=(out, groups))
    g = np.arange(n_in) // gs
    if act_order:
        perm = rng.permutation(n_in)
        g = np.empty(n_in, np.int64)
        g[perm] = np.arange(n_in) // gs
    return Layer(q.astype(np.int64), s, z.astype(np.int64), g)


def gptq_tensors(prefix: str, L: Layer, bits: int, fmt: str = "gptq") -> dict[str, np.ndarray]:
    """GPTQ tensors of one layer; ``fmt`` "gptq" stores z - 1 (modulo 2^bits), "gptq_v2" stores z."""
    stored = (L.z - (1 if fmt == "gptq" else 0)) & ((1 << bits) - 1)
    return {f"{prefix}.qweight": pack_gptq_rows(L.q.T, bits),
            f"{prefix}.qzeros": pack_gptq_cols(stored.T, bits),
            f"{prefix}.scales": np.ascontiguousarray(L.s.T, dtype=np.float16),
            f"{prefix}.g_idx": L.g.astype(np.int32)}


def awq_tensors(prefix: str, L: Layer, version: str = "gemm", group_size: int = 128) -> dict[str, np.ndarray]:
    if version == "gemm":
        return {f"{prefix}.qweight": pack_awq_gemm(L.q.T), f"{prefix}.qzeros": pack_awq_gemm(L.z.T),
                f"{prefix}.scales": np.ascontiguousarray(L.s.T, dtype=np.float16)}
    out, n_in = L.q.shape
    width = gemv_zeros_width(n_in, group_size)
    zp = np.zeros((out, width * 8), np.int64)
    zp[:, : L.z.shape[1]] = L.z
    sp = np.zeros((out, width * 8), np.float16)
    sp[:, : L.s.shape[1]] = L.s
    return {f"{prefix}.qweight": pack_seq(L.q, 4), f"{prefix}.qzeros": pack_seq(zp, 4), f"{prefix}.scales": sp}


def ct_tensors(prefix: str, L: Layer, bits: int, sym: bool, packed_zp: bool = True,
               g_idx: bool = False) -> dict[str, np.ndarray]:
    """compressed-tensors pack-quantized tensors: signed codes + 2^(bits-1), bf16 scales."""
    import torch

    off = 1 << (bits - 1)
    t = {f"{prefix}.weight_packed": pack_seq(L.q, bits),  # L.q = signed + off already
         f"{prefix}.weight_scale": torch.from_numpy(L.s).to(torch.bfloat16),
         f"{prefix}.weight_shape": np.array(L.q.shape, np.int64)}
    if not sym:
        zs = L.z - off  # signed zero point
        if packed_zp:
            t[f"{prefix}.weight_zero_point"] = np.ascontiguousarray(pack_seq(np.ascontiguousarray((zs + off).T), bits).T)
        else:
            t[f"{prefix}.weight_zero_point"] = zs.astype(np.int8)
    if g_idx:
        t[f"{prefix}.weight_g_idx"] = L.g.astype(np.int32)
    return t


# ------------------------------------------------------------------------ a tiny Llama checkpoint

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
    "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "vocab_size": 512, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "hidden_act": "silu", "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    "torch_dtype": "float16",
}
LINEARS = {"self_attn.q_proj": (128, 128), "self_attn.k_proj": (64, 128), "self_attn.v_proj": (64, 128),
           "self_attn.o_proj": (128, 128), "mlp.gate_proj": (256, 128), "mlp.up_proj": (256, 128),
           "mlp.down_proj": (128, 256)}


def make_checkpoint(out_dir: Path, stories_dir: Path, method: str, bits: int = 4, group_size: int = 64,
                    sym: bool = True, act_order: bool = False, fmt: str | None = None, seed: int = 0,
                    packed_zp: bool = True) -> dict[str, Layer]:
    """Write a 2-layer Llama (dims 128/256, GQA) with packed linears into ``out_dir``.

    ``method``: "gptq" (``fmt`` "gptq"/"gptq_v2"), "awq" (``fmt`` "gemm"/"gemv") or
    "compressed-tensors". The tokenizer is stories260K's. Returns {HF weight name: Layer}.
    """
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(stories_dir / f, out_dir / f)
    cfg = dict(CONFIG)
    tensors: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": (rng.standard_normal((512, 128)) * 0.05).astype(np.float16),
        "model.norm.weight": np.ones(128, np.float16),
    }
    layers: dict[str, Layer] = {}
    torch_tensors = {}
    for i in range(CONFIG["num_hidden_layers"]):
        tensors[f"model.layers.{i}.input_layernorm.weight"] = np.ones(128, np.float16)
        tensors[f"model.layers.{i}.post_attention_layernorm.weight"] = np.ones(128, np.float16)
        for lin, (o, n) in LINEARS.items():
            prefix = f"model.layers.{i}.{lin}"
            L = random_layer(rng, o, n, bits, group_size, sym, act_order,
                             scale_dtype=np.float16 if method != "compressed-tensors" else np.float32)
            if method == "gptq":
                if (fmt or "gptq") == "gptq" and not sym:
                    L.z = L.z + 1  # v1 can encode z in 1..2^bits only
                t = gptq_tensors(prefix, L, bits, fmt or "gptq")
            elif method == "awq":
                t = awq_tensors(prefix, L, fmt or "gemm", group_size)
            else:
                import torch

                L.s = torch.from_numpy(L.s).to(torch.bfloat16).float().numpy()
                t = ct_tensors(prefix, L, bits, sym, packed_zp=packed_zp, g_idx=act_order)
                torch_tensors.update({k: v for k, v in t.items() if not isinstance(v, np.ndarray)})
                t = {k: v for k, v in t.items() if isinstance(v, np.ndarray)}
            tensors.update(t)
            layers[f"{prefix}.weight"] = L
    if method == "gptq":
        cfg["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "sym": sym,
                                      "desc_act": act_order, "checkpoint_format": fmt or "gptq"}
    elif method == "awq":
        cfg["quantization_config"] = {"quant_method": "awq", "bits": bits, "group_size": group_size,
                                      "zero_point": not sym, "version": fmt or "gemm"}
    else:
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "format": "pack-quantized", "weights": {
                "num_bits": bits, "type": "int", "symmetric": sym, "strategy": "group" if group_size > 0 else "channel",
                "group_size": group_size if group_size > 0 else None, "actorder": "group" if act_order else None}}}}
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=1))
    if torch_tensors:
        import torch
        from safetensors.torch import save_file as save_torch

        allt = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}
        allt.update(torch_tensors)
        save_torch(allt, str(out_dir / "model.safetensors"))
    else:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(out_dir / "model.safetensors"))
    return layers
