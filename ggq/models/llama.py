"""Llama (Llama 2/3, SmolLM, TinyLlama, CodeLlama) and Mistral: GGUF architecture ``llama``.

Converter: llama.cpp's ``LlamaModel`` (conversion/llama.py): Q/K rows permuted from Hugging Face's
rotate-half order into NORM rope's adjacent pairs, ``{arch}.vocab_size`` written, llama3-style
``rope_freqs.weight``; tokenizer from ``tokenizer.model``, a byte-fallback ``tokenizer.json``
(still a SentencePiece-type vocabulary) or a BPE ``tokenizer.json``.

Runtime: llama.cpp's ``llm_build_llama`` (src/models/llama.cpp), NORM rope:

    x = token_embd[tokens]
    for each layer:
        h = rmsnorm(x) * attn_norm
        q, k, v = h Wq, h Wk, h Wv (+ biases)
        q, k = rope(q), rope(k)
        x = x + attention(q, k, v) Wo
        h = rmsnorm(x) * ffn_norm
        x = x + (silu(h Wgate) * h Wup) Wdown
    logits = (rmsnorm(x) * output_norm) Woutput
"""

from __future__ import annotations

import gguf
from numba import njit

from ggq.convert import vocab
from ggq.models.base import Family
from ggq.runtime import ops
from ggq.runtime.ops import (I_EMBD, I_HD, I_HEAD, I_KV, I_LAYER, I_ROT, L_ATTN_NORM, L_FFN_NORM, L_K_NORM, L_Q_NORM,
                             L_ROPE, L_SWA, L_WO)


@njit(cache=True, fastmath=True)
def forward(tokens, pos, seq, all_logits, W, vecs, lay, ip, fp, inv_freq, mscale, kc, vc, logits):
    """The llama graph for ``tokens`` (int64 (T,)) at positions ``pos`` of sequences ``seq`` (int64
    (T,) each: a prompt batch of one sequence, or one token of each of several sequences): fills
    the KV cache and ``logits`` (float32 (T or 1, n_vocab)). Also Qwen 2's (biases, NEOX rope), Qwen 3's (per-head
    Q/K RMSNorm before rope, where the layer has attn_q_norm) and Phi-3's (fused Q|K|V and
    gate|up, LongRoPE factors in ``inv_freq``): the ops take those from the layer table."""
    T = tokens.shape[0]
    n_embd, hd, eps = ip[I_EMBD], ip[I_HD], fp[ops.F_EPS]
    s = ops.scratch(T, ip)
    x = ops.embed(W, ip, tokens, 1.0)                               # token embeddings
    cos, sin = ops.rope_tables(T, ip[I_ROT], pos, inv_freq, mscale)
    for l in range(ip[I_LAYER]):
        L = lay[l]
        ops.rmsnorm(x, ops.vec(vecs, L[L_ATTN_NORM], n_embd), eps, s.h)  # attention norm
        ops.attn_inputs(W, L, vecs, s, ip)                          # q, k, v (+ biases)
        if L[L_Q_NORM] >= 0:                                        # Qwen 3: per-head Q/K norms
            ops.head_rmsnorm(s.q, ip[I_HEAD], hd, ops.vec(vecs, L[L_Q_NORM], hd), eps)
            ops.head_rmsnorm(s.k, ip[I_KV], hd, ops.vec(vecs, L[L_K_NORM], hd), eps)
        ops.rope(s.q, ip[I_HEAD], ip, cos[L[L_ROPE]], sin[L[L_ROPE]])
        ops.rope(s.k, ip[I_KV], ip, cos[L[L_ROPE]], sin[L[L_ROPE]])
        ops.attention(l, s.q, s.k, s.v, kc, vc, pos, seq, ip, fp, L[L_SWA] == 1, s.att)
        ops.linear(W, L[L_WO], s.att, s.aa, s.o)                    # attention output
        ops.add_rows(x, s.o)
        ops.rmsnorm(x, ops.vec(vecs, L[L_FFN_NORM], n_embd), eps, s.h)   # FFN norm
        ops.ffn(W, L, s, ops.SILU)                                  # SwiGLU
        ops.add_rows(x, s.o)
    ops.output(W, ip, fp, vecs, x, all_logits, logits)


class Llama(Family):
    hf_architectures = ("LlamaForCausalLM", "MistralForCausalLM")
    gguf_arch = gguf.MODEL_ARCH.LLAMA
    gguf_aliases = ("mistral",)
    permute_qk = True
    write_vocab_size = True
    write_rope_dims = True
    forward = staticmethod(forward)

    def write_vocab(self, w, model_dir, cfg):
        """``LlamaModel.set_vocab``: add_prefix_space from tokenizer_config.json first, then
        SentencePiece, a byte-fallback tokenizer.json, or BPE; CodeLlama's fill-in-the-middle ids;
        no BOS for 49152-token vocabularies (llama.cpp's "granite small models" rule, SmolLM too)."""
        has_spm, has_json, _ = vocab.tokenizer_files(model_dir)
        tok_config = vocab.read_json(model_dir / "tokenizer_config.json", missing_ok=True) or {}
        add_prefix_space = tok_config.get("add_prefix_space")
        if add_prefix_space is not None:
            w.add_add_space_prefix(add_prefix_space)
        if has_spm:
            vocab.write_sentencepiece(w, model_dir, cfg)
        elif has_json and vocab.is_llama_hf_json(model_dir):
            vocab.write_llama_hf(w, model_dir)
        else:
            vocab.write_gpt2(w, model_dir, cfg)
        vocab_size = cfg.get("vocab_size", 32000)
        if vocab_size == 32016:
            sv = vocab.SpecialVocab(model_dir, cfg, load_merges=False, special_types=("prefix", "suffix", "middle", "eot"))
            for typ, tid in (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010)):
                sv.set_special(typ, tid)
            sv.add_to(w)
        if vocab_size == 49152:
            w.add_add_bos_token(False)

    def is_70b(self, n_layer, n_head, n_head_kv):
        # llama.cpp: 80 layers is LLM_TYPE_70B, but not for Llama 1 65B's (no GQA)
        return n_layer == 80 and n_head != n_head_kv


FAMILIES = (Llama(),)
