"""Qwen 3 (dense, 0.6B-32B): GGUF architecture ``qwen3``.

Converter: llama.cpp's ``Qwen3Model`` (conversion/qwen.py), a ``Qwen2Model``: the llama-like key set
without ``rope.dimension_count``, no Q/K permutation, ``q_norm``/``k_norm`` kept as
``attn_q_norm``/``attn_k_norm``; tokenizer from ``tokenizer.model`` if there is one, else BPE.

Runtime: llama.cpp's ``llm_build_qwen3`` (src/models/qwen3.cpp): the llama graph
(:func:`ggq.models.llama.forward`, which applies the per-head norms where a layer has them) with
NEOX rope and an RMSNorm of every Q and K head before rope:

    x = token_embd[tokens]
    for each layer:
        h = rmsnorm(x) * attn_norm
        q, k, v = h Wq, h Wk, h Wv
        q, k = rmsnorm_per_head(q) * q_norm, rmsnorm_per_head(k) * k_norm
        q, k = rope(q), rope(k)                       (NEOX)
        x = x + attention(q, k, v) Wo
        h = rmsnorm(x) * ffn_norm
        x = x + (silu(h Wgate) * h Wup) Wdown
    logits = (rmsnorm(x) * output_norm) Woutput
"""

from __future__ import annotations

import gguf

from ggq.models.base import load_attention, load_ffn
from ggq.models.qwen2 import Qwen2


#: ChatML with Qwen 3's thinking switch: earlier replies keep only their answer; with
#: enable_thinking false the reply starts after an empty thinking block
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- set content = m['content'] -%}"
    "{%- if m['role'] == 'assistant' and '</think>' in content -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\n') -%}{%- endif -%}"
    "{{ '<|im_start|>' + m['role'] + '\n' + content + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{ '<think>\n\n</think>\n\n' }}{%- endif -%}"
    "{%- endif -%}"
)


class Qwen3(Qwen2):
    hf_architectures = ("Qwen3ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN3
    write_rope_dims = False
    chat_template = CHAT_TEMPLATE

    def is_70b(self, n_layer, n_head, n_head_kv):
        return False

    def load_layer(self, b, i, rp, L):
        """llama.cpp's load_arch_tensors for qwen3: the llama-like layer plus attn_q_norm/attn_k_norm."""
        load_attention(b, i, rp, L, qk_norm=True)
        load_ffn(b, i, rp, L)


FAMILIES = (Qwen3(),)
