"""Helpers shared by the quantized-import tests: the prompt, GGUF names and row order, GGUF reading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as T

from bnb_checkpoints import CONFIG

TOKENS = [1, 403, 407, 261, 378, 395, 302, 324, 268, 259, 370, 400, 270, 264, 280, 308]  # stories260K ids
HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def _gguf_name(hf: str) -> str:
    i = hf.split(".")[2]
    lin = hf.split(".", 3)[3].rsplit(".", 1)[0]
    return f"blk.{i}.{HF_TO_GGUF[lin]}.weight"


def _gguf_order(hf: str, w: np.ndarray) -> np.ndarray:
    """Q/K rows as llama.cpp's converter permutes them (LlamaModel.permute)."""
    heads = {"q_proj": CONFIG["num_attention_heads"], "k_proj": CONFIG["num_key_value_heads"]}
    for k, n in heads.items():
        if f".{k}." in hf:
            return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    return w


def _gguf_tensors(path: Path) -> dict:
    from gguf import GGUFReader

    return {t.name: (T(t.tensor_type), np.asarray(t.data)) for t in GGUFReader(str(path)).tensors}
