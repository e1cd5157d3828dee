"""Gemma 2 and Gemma 3 (text): GGUF architectures ``gemma2`` and ``gemma3``.

Converter: llama.cpp's ``Gemma2Model`` and ``Gemma3Model`` (conversion/gemma.py):

* every ``*norm.weight`` is stored plus one (Gemma's RMSNorm multiplies by ``1 + w``; llama.cpp's by
  the stored weight), added in the checkpoint's float type after bfloat16 is widened to float32;
* Gemma 2 drops ``lm_head`` (always tied) and writes the soft-capping values and the sliding
  window; Gemma 3 writes a rope base per layer kind (``rope.freq_base`` for the global layers,
  ``rope.freq_base_swa`` for the local ones) and keeps only the embedding rows of the tokenizer's
  vocabulary;
* ``Gemma3ForConditionalGeneration``: the text model only (``language_model.`` dropped from the
  names); the vision tower and projector are skipped with a note (llama.cpp writes them to a
  separate mmproj file, which ggq does not run);
* tokenizer: ``tokenizer.model`` (SentencePiece, ``add_space_prefix`` false); Gemma 3 without one
  takes the BPE path.

Runtime: llama.cpp's ``llm_build_gemma2_iswa`` / ``llm_build_gemma3`` (src/models/gemma2.cpp,
gemma3.cpp), NEOX rope:

    x = token_embd[tokens] * sqrt(n_embd)
    for each layer:
        h = rmsnorm(x) * attn_norm
        q, k, v = h Wq, h Wk, h Wv
        q, k = rmsnorm_per_head(q) * q_norm, rmsnorm_per_head(k) * k_norm      (Gemma 3)
        q, k = rope(q), rope(k)        (Gemma 3: local layers' base, global layers' base and scaling)
        a = attention(q, k, v)         (local layers: sliding window; Gemma 2: scores soft-capped)
        x = x + rmsnorm(a Wo) * post_attention_norm
        h = rmsnorm(x) * ffn_norm
        x = x + rmsnorm((gelu_tanh(h Wgate) * h Wup) Wdown) * post_ffw_norm
    logits = (rmsnorm(x) * output_norm) token_embd     (Gemma 2: soft-capped)

Local (sliding-window) layers: Gemma 2 every other layer from the first, Gemma 3 five of every six
(llama.cpp's swa patterns 2 and 6). The attention scale is 1/sqrt(head_dim) except for the 27B
models, which llama.cpp recognises by their layer count (46 / 62) and give 1/sqrt(n_embd/n_head).
"""

from __future__ import annotations

import json
import math

import gguf
import numpy as np
from numba import njit

from ggq.convert import vocab
from ggq.convert.arch import write_rope_scaling
from ggq.errors import GGQError
from ggq.models.base import K, Family, TensorRule, load_attention, load_ffn, sliding_window_layers
from ggq.runtime import ops
from ggq.runtime.ops import (I_EMBD, I_HD, I_HEAD, I_KV, I_LAYER, I_ROT, L_ATTN_NORM, L_FFN_NORM, L_K_NORM,
                             L_POST_ATTN_NORM, L_POST_FFN_NORM, L_Q_NORM, L_ROPE, L_SWA, L_WO)
from ggq.runtime.rope import rope_frequencies


@njit(cache=True, fastmath=True)
def forward(tokens, pos, seq, all_logits, W, vecs, lay, ip, fp, inv_freq, mscale, kc, vc, logits):
    """The Gemma 2 / Gemma 3 graph for ``tokens`` (int64 (T,)) at positions ``pos`` of sequences
    ``seq`` (int64 (T,) each, as :func:`ggq.models.llama.forward`): fills the KV cache and
    ``logits`` (float32 (T or 1, n_vocab)). Layers without attn_q_norm (Gemma 2) skip the per-head
    norms; F_ATTN_SOFTCAP / F_FINAL_SOFTCAP are 0 where a model has no soft-capping."""
    T = tokens.shape[0]
    n_embd, hd, eps = ip[I_EMBD], ip[I_HD], fp[ops.F_EPS]
    s = ops.scratch(T, ip)
    x = ops.embed(W, ip, tokens, fp[ops.F_EMBD_SCALE])              # token embeddings * sqrt(n_embd)
    cos, sin = ops.rope_tables(T, ip[I_ROT], pos, inv_freq, mscale)
    for l in range(ip[I_LAYER]):
        L = lay[l]
        ops.rmsnorm(x, ops.vec(vecs, L[L_ATTN_NORM], n_embd), eps, s.h)  # attention norm
        ops.attn_inputs(W, L, vecs, s, ip)                          # q, k, v
        if L[L_Q_NORM] >= 0:                                        # Gemma 3: per-head Q/K norms
            ops.head_rmsnorm(s.q, ip[I_HEAD], hd, ops.vec(vecs, L[L_Q_NORM], hd), eps)
            ops.head_rmsnorm(s.k, ip[I_KV], hd, ops.vec(vecs, L[L_K_NORM], hd), eps)
        ops.rope(s.q, ip[I_HEAD], ip, cos[L[L_ROPE]], sin[L[L_ROPE]])   # the layer kind's rope
        ops.rope(s.k, ip[I_KV], ip, cos[L[L_ROPE]], sin[L[L_ROPE]])
        ops.attention(l, s.q, s.k, s.v, kc, vc, pos, seq, ip, fp, L[L_SWA] == 1, s.att)
        ops.linear(W, L[L_WO], s.att, s.aa, s.o)                    # attention output
        ops.rmsnorm(s.o, ops.vec(vecs, L[L_POST_ATTN_NORM], n_embd), eps, s.o)  # post-attention norm
        ops.add_rows(x, s.o)
        ops.rmsnorm(x, ops.vec(vecs, L[L_FFN_NORM], n_embd), eps, s.h)   # FFN norm
        ops.ffn(W, L, s, ops.GELU_TANH)                             # GeGLU
        ops.rmsnorm(s.o, ops.vec(vecs, L[L_POST_FFN_NORM], n_embd), eps, s.o)   # post-FFN norm
        ops.add_rows(x, s.o)
    ops.output(W, ip, fp, vecs, x, all_logits, logits)              # (soft-capped) logits


#: Gemma's turns (no system role: a system message opens the first user turn, as Gemma 3's template does)
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set prefix = messages[0]['content'] + '\n\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (prefix if loop.first else '') + m['content'] | trim + '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def _required(hp, key: str):
    v = hp.cfg.get(key)
    if v is None:
        raise GGQError(f"{hp.model_dir / 'config.json'}: {key} is missing; llama.cpp's converter needs it")
    return v


class Gemma2(Family):
    hf_architectures = ("Gemma2ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.GEMMA2
    forward = staticmethod(forward)
    chat_template = CHAT_TEMPLATE
    #: llama.cpp's sliding-window pattern: every n-th layer is global
    swa_pattern = 2
    qk_norm = False
    #: layer count of the 27B model (llama.cpp's LLM_TYPE_27B, which takes another attention scale)
    layers_27b = 46

    # ------------------------------------------------------------------ converter

    def write_hparams(self, w, hp):
        """``Gemma2Model.set_gguf_parameters`` (config values without defaults of its own)."""
        w.add_context_length(hp.n_ctx)
        w.add_embedding_length(hp.n_embd)
        w.add_block_count(hp.n_layer)
        w.add_feed_forward_length(hp.n_ff)
        w.add_head_count(hp.n_head)
        w.add_head_count_kv(hp.n_head_kv)
        w.add_layer_norm_rms_eps(hp.rms_eps)
        w.add_key_length(int(_required(hp, "head_dim")))
        w.add_value_length(int(_required(hp, "head_dim")))
        w.add_attn_logit_softcapping(float(_required(hp, "attn_logit_softcapping")))
        w.add_final_logit_softcapping(float(_required(hp, "final_logit_softcapping")))
        w.add_sliding_window(int(_required(hp, "sliding_window")))

    def write_vocab(self, w, model_dir, cfg):
        """SentencePiece from tokenizer.model, then add_space_prefix false."""
        if not vocab.tokenizer_files(model_dir)[0]:
            raise GGQError(f"{model_dir}: no tokenizer.model (llama.cpp converts {self.name} from its SentencePiece model)")
        vocab.write_sentencepiece(w, model_dir, cfg)
        w.add_add_space_prefix(False)

    def tensor_rule(self, hf_name, hp, names):
        """lm_head dropped (Gemma 2 always ties it); norm weights plus one."""
        if hf_name == "lm_head.weight":
            return None
        rule = super().tensor_rule(hf_name, hp, names)
        if rule is not None and hf_name.endswith("norm.weight"):
            rule = TensorRule(rule.name, add=1.0)
        return rule

    # ------------------------------------------------------------------ runtime

    def run_params(self, md, tensors):
        """llama.cpp's gemma2 hparams: soft-capping 50 / 30 and a 4096-position window unless the
        file says otherwise; local layers use ``rope.freq_base_swa`` (default: the global base)."""
        rp = super().run_params(md, tensors)
        rp.neox = True
        rp.embd_scale = float(np.sqrt(np.float32(rp.n_embd)))
        rp.attn_softcap = md.get(K.LLM.ATTN_LOGIT_SOFTCAPPING, 50.0, float)
        rp.final_softcap = md.get(K.LLM.FINAL_LOGIT_SOFTCAPPING, 30.0, float)
        rp.swa_window = md.get(K.Attention.SLIDING_WINDOW, 4096)
        rp.swa_layers = sliding_window_layers(md, rp.n_layer, self.swa_pattern)
        rp.rope_base_swa = md.get(K.Rope.FREQ_BASE_SWA, rp.rope_base, float)
        self._scale_and_kinds(rp, md.where)
        return rp

    def _scale_and_kinds(self, rp, where):
        """The attention scale (llama.cpp's 27B rule) and each layer's rope kind (1: local)."""
        n = rp.n_embd // rp.n_head if rp.n_layer == self.layers_27b else rp.head_dim
        if n < 1:
            raise GGQError(f"{where}: embedding_length {rp.n_embd} is smaller than attention.head_count {rp.n_head}")
        rp.attn_scale = 1.0 / math.sqrt(n)
        rp.rope_kinds = [int(w) for w in rp.swa_layers]

    def rope(self, rp, b, n_ctx):
        """Two rope kinds: 0 for the global layers (the file's base and scaling), 1 for the local
        ones (``rope.freq_base_swa``, same scaling)."""
        kinds = [rope_frequencies(rp.n_rot, base, rp.rope_scaling, rp.rope_factor, rp.rope_orig_ctx, None,
                                  rp.rope_attn_factor) for base in (rp.rope_base, rp.rope_base_swa)]
        return np.stack([k[0] for k in kinds]), np.array([k[1] for k in kinds])

    def load_layer(self, b, i, rp, L):
        """llama.cpp's load_arch_tensors: the llama-like layer plus post-attention and post-FFN norms
        (Gemma 3: and per-head Q/K norms)."""
        load_attention(b, i, rp, L, qk_norm=self.qk_norm, post_norm=True)
        load_ffn(b, i, rp, L, post_norm=True)


class Gemma3(Gemma2):
    hf_architectures = ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
    gguf_arch = gguf.MODEL_ARCH.GEMMA3
    swa_pattern = 6
    qk_norm = True
    layers_27b = 62

    # ------------------------------------------------------------------ converter

    def write_hparams(self, w, hp):
        """``Gemma3Model.set_gguf_parameters``: the llama-like set with Gemma 3's defaults, the global
        layers' rope base and scaling, the local layers' base, the sliding window."""
        c, rp = hp.cfg, hp.rope
        full = rp.get("full_attention", rp)
        if c.get("attn_logit_softcapping") is not None:
            raise GGQError(f"{hp.model_dir / 'config.json'}: attn_logit_softcapping is set; Gemma 3 has none")
        w.add_block_count(hp.n_layer)
        w.add_context_length(int(c.get("max_position_embeddings") or 131072))
        w.add_embedding_length(hp.n_embd)
        w.add_feed_forward_length(hp.n_ff)
        w.add_head_count(int(c.get("num_attention_heads") or 8))
        w.add_head_count_kv(int(c.get("num_key_value_heads") or 4))
        write_rope_scaling(w, full)
        w.add_rope_freq_base(float(full.get("rope_theta", 1_000_000.0)))
        local = rp.get("sliding_attention", {}).get("rope_theta")
        if local is not None:
            w.add_rope_freq_base_swa(float(local))
        w.add_layer_norm_rms_eps(float(c.get("rms_norm_eps") or 1e-6))
        w.add_key_length(int(c.get("head_dim") or 256))
        w.add_value_length(int(c.get("head_dim") or 256))
        if c.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(float(c["final_logit_softcapping"]))
        if c.get("sliding_window_pattern") != 1:
            w.add_sliding_window(int(_required(hp, "sliding_window")))

    def write_vocab(self, w, model_dir, cfg):
        """SentencePiece (add_space_prefix false) when there is a tokenizer.model, else BPE."""
        if vocab.tokenizer_files(model_dir)[0]:
            vocab.write_sentencepiece(w, model_dir, cfg)
            w.add_add_space_prefix(False)
        else:
            vocab.write_gpt2(w, model_dir, cfg)

    def tensor_rule(self, hf_name, hp, names):
        """Norm weights plus one; the embedding cut to the tokenizer's vocabulary; lm_head kept
        when the checkpoint has one (untied)."""
        rule = Family.tensor_rule(self, hf_name, hp, names)
        if rule is None:
            return None
        if hf_name.endswith("norm.weight"):
            return TensorRule(rule.name, add=1.0)
        if "embed_tokens.weight" in hf_name:
            return TensorRule(rule.name, rows=_vocab_rows(hp))
        return rule

    def dropped_note(self, names):
        vision = [n for n in names if "vision" in n or "projector" in n]
        if not vision:
            return None
        return (f"the vision tower and projector ({len(vision)} tensors) are skipped: ggq converts the text model "
                "(llama.cpp writes the vision part to a separate mmproj file)")

    # ------------------------------------------------------------------ runtime

    def run_params(self, md, tensors):
        """llama.cpp's gemma3 hparams: a sliding window only when the file gives one (then 5 local
        layers of 6, rope base ``rope.freq_base_swa``, default 10000, unscaled); final soft-capping
        only when the file gives it; no attention soft-capping."""
        rp = Family.run_params(self, md, tensors)
        rp.neox = True
        rp.embd_scale = float(np.sqrt(np.float32(rp.n_embd)))
        rp.final_softcap = md.get(K.LLM.FINAL_LOGIT_SOFTCAPPING, 0.0, float)
        rp.swa_window = max(md.get(K.Attention.SLIDING_WINDOW, 0), 0)
        rp.swa_layers = sliding_window_layers(md, rp.n_layer, self.swa_pattern) if rp.swa_window else []
        rp.rope_base_swa = md.get(K.Rope.FREQ_BASE_SWA, 10000.0, float)
        self._scale_and_kinds(rp, md.where)
        return rp

    def rope(self, rp, b, n_ctx):
        """Two rope kinds: 0 for the global layers (``rope.freq_base`` and the file's scaling, e.g.
        linear x8 on the 4B-27B models), 1 for the local ones (``rope.freq_base_swa``, unscaled)."""
        inv, ms = rope_frequencies(rp.n_rot, rp.rope_base, rp.rope_scaling, rp.rope_factor, rp.rope_orig_ctx, None,
                                   rp.rope_attn_factor)
        inv_swa, ms_swa = rope_frequencies(rp.n_rot, rp.rope_base_swa)
        return np.stack([inv, inv_swa]), np.array([ms, ms_swa])


def _vocab_rows(hp) -> int:
    """Gemma3Model's embedding rows: the SentencePiece vocabulary padded to the config's vocab_size,
    or the tokenizer.json vocabulary plus its added tokens."""
    d = hp.model_dir
    if (d / "tokenizer.model").is_file():
        return len(vocab.sentencepiece_vocab(d, hp.cfg)[0])
    try:
        tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
        return len(tj["model"]["vocab"]) + len(tj.get("added_tokens") or [])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise GGQError(f"{d / 'tokenizer.json'}: cannot read the vocabulary ({e})") from None


FAMILIES = (Gemma2(), Gemma3())
