"""Qwen 3 (dense, 0.6B-32B): GGUF architecture ``qwen3``.

Converter: llama.cpp's ``Qwen3Model`` (conversion/qwen.py), a ``Qwen2Model``: the llama-like key set
without ``rope.dimension_count``, no Q/K permutation, ``q_norm``/``k_norm`` kept as
``attn_q_norm``/``attn_k_norm``; tokenizer from ``tokenizer.model`` if there is one, else BPE.

Runtime: llama.cpp's ``llm_build_qwen3`` (src/models/qwen3.cpp): the llama graph with NEOX rope and
an RMSNorm of every Q and K head before rope:

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
from numba import njit

from ggq.models.base import load_attention, load_ffn
from ggq.models.qwen2 import Qwen2
from ggq.runtime import ops
from ggq.runtime.ops import (I_EMBD, I_HD, I_HEAD, I_KV, I_LAYER, I_ROT, L_ATTN_NORM, L_FFN_NORM, L_K_NORM, L_Q_NORM,
                             L_ROPE, L_WO)


@njit(cache=True, fastmath=True)
def forward(tokens, pos0, all_logits, W, vecs, lay, ip, fp, inv_freq, mscale, kc, vc, logits):
    """The qwen3 graph for ``tokens`` (int64 (T,)) at positions pos0..: fills the KV cache and
    ``logits`` (float32 (T or 1, n_vocab))."""
    T = tokens.shape[0]
    n_embd, hd, eps = ip[I_EMBD], ip[I_HD], fp[ops.F_EPS]
    s = ops.scratch(T, ip)
    x = ops.embed(W, ip, tokens, 1.0)                               # token embeddings
    cos, sin = ops.rope_tables(T, ip[I_ROT], pos0, inv_freq, mscale)
    for l in range(ip[I_LAYER]):
        L = lay[l]
        ops.rmsnorm(x, ops.vec(vecs, L[L_ATTN_NORM], n_embd), eps, s.h)  # attention norm
        ops.attn_inputs(W, L, vecs, s, ip)                          # q, k, v
        ops.head_rmsnorm(s.q, ip[I_HEAD], hd, ops.vec(vecs, L[L_Q_NORM], hd), eps)  # per-head Q/K norms
        ops.head_rmsnorm(s.k, ip[I_KV], hd, ops.vec(vecs, L[L_K_NORM], hd), eps)
        ops.rope(s.q, ip[I_HEAD], ip, cos[L[L_ROPE]], sin[L[L_ROPE]])
        ops.rope(s.k, ip[I_KV], ip, cos[L[L_ROPE]], sin[L[L_ROPE]])
        ops.attention(l, s.q, s.k, s.v, kc, vc, pos0, ip, fp, False, s.att)
        ops.linear(W, L[L_WO], s.att, s.aa, s.o)                    # attention output
        x += s.o
        ops.rmsnorm(x, ops.vec(vecs, L[L_FFN_NORM], n_embd), eps, s.h)   # FFN norm
        ops.ffn(W, L, s, ops.SILU)                                  # SwiGLU
        x += s.o
    ops.output(W, ip, fp, vecs, x, all_logits, logits)


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
    forward = staticmethod(forward)
    chat_template = CHAT_TEMPLATE

    def is_70b(self, n_layer, n_head, n_head_kv):
        return False

    def load_layer(self, b, i, rp, L):
        """llama.cpp's load_arch_tensors for qwen3: the llama-like layer plus attn_q_norm/attn_k_norm."""
        load_attention(b, i, rp, L, qk_norm=True)
        load_ffn(b, i, rp, L)


FAMILIES = (Qwen3(),)
