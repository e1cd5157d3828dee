"""Phi-3, Phi-3.5 and Phi-4-mini: GGUF architecture ``phi3``.

Converter: llama.cpp's ``Phi3MiniModel`` (conversion/phi.py):

* the fused ``qkv_proj`` and ``gate_up_proj`` stay fused in the file (``attn_qkv``, and ``ffn_up``
  with 2 n_ff rows, gate first), as llama.cpp writes them; the runtime splits their outputs;
* rotary dims ``int(partial_rotary_factor * n_embd) // n_head`` (Phi-4-mini rotates 3/4 of each head);
* LongRoPE (Phi-3 128k, Phi-3.5, Phi-4-mini): ``rope_factors_long.weight`` and
  ``rope_factors_short.weight`` (float32, one factor per rotated pair) written first, and
  ``rope.scaling.attn_factor`` = sqrt(1 + ln(s) / ln(original context)) for s = context / original
  context (0.1 ln(s) + 1 for yarn);
* tokenizer: BPE for a ``GPT2Tokenizer`` (Phi-4), else ``tokenizer.model`` with Phi-3's own loop
  (added tokens CONTROL only when flagged special, tokenizer.json's added tokens applied too).

Runtime: llama.cpp's ``llm_build_phi3`` (src/models/phi3.cpp) is the llama graph
(:func:`ggq.models.llama.forward`) with the fused matrices, NEOX rope divided by the long factors
when the context (rounded up to 256) exceeds the original context, else by the short ones, and
cos/sin scaled by the attention factor. The sliding window some configs give (Phi-3-mini-4k's 2047)
is ignored, as llama.cpp ignores it.
"""

from __future__ import annotations

import math

import gguf
import numpy as np

from ggq.convert import vocab
from ggq.convert.arch import find_hparam
from ggq.errors import GGQError, show
from ggq.models.base import MT, Family, tn
from ggq.models.llama import forward
from ggq.runtime.rope import rope_frequencies


def _rope_dims(hp) -> int:
    return int(hp.rope.get("partial_rotary_factor", 1.0) * hp.n_embd) // hp.n_head


def _long_rope(hp) -> tuple[float, list, list] | None:
    """(attention factor, long factors, short factors) of a LongRoPE config, None without one;
    GGQError for an inconsistent one (``generate_extra_tensors`` of llama.cpp's Phi3MiniModel)."""
    rp, where = hp.rope, hp.model_dir / "config.json"
    long, short = rp.get("long_factor"), rp.get("short_factor")
    if not long:
        return None
    orig = _original_ctx(hp)
    scale = int(find_hparam(hp.cfg, ("n_positions", "max_position_embeddings"))) / orig
    kind = str(rp.get("rope_type", "")).lower()
    if kind in ("su", "longrope"):
        attn = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
    elif kind == "yarn":
        attn = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
    else:
        raise GGQError(f"{where}: rope scaling type {show(kind or 'None')} with long/short factors is not supported")
    half = _rope_dims(hp) / 2
    if not short or len(long) != len(short) or len(long) != half:
        raise GGQError(f"{where}: rope long/short factors must have {half:g} entries each "
                       f"(long {len(long)}, short {len(short or [])})")
    return attn, long, short


def _original_ctx(hp) -> int:
    orig = hp.rope.get("original_max_position_embeddings")
    if orig is None:
        raise GGQError(f"{hp.model_dir / 'config.json'}: original_max_position_embeddings is missing")
    return int(orig)


#: Phi-3's turns: <|system|>, <|user|>, <|assistant|>, each closed by <|end|>
CHAT_TEMPLATE = (
    "{%- for m in messages -%}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- else -%}{{ eos_token }}{%- endif -%}"
)


class Phi3(Family):
    hf_architectures = ("Phi3ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.PHI3
    forward = staticmethod(forward)
    chat_template = CHAT_TEMPLATE

    # ------------------------------------------------------------------ converter

    def write_hparams(self, w, hp):
        """``Phi3MiniModel.set_gguf_parameters`` (no rope scaling type: the factors are tensors),
        plus the LongRoPE attention factor."""
        c = hp.cfg
        lr = _long_rope(hp)
        if lr is not None:
            w.add_rope_scaling_attn_factors(lr[0])
        w.add_context_length(int(find_hparam(c, ("n_positions", "max_position_embeddings"))))
        w.add_rope_scaling_orig_ctx_len(_original_ctx(hp))
        w.add_embedding_length(hp.n_embd)
        w.add_feed_forward_length(hp.n_ff)
        w.add_block_count(hp.n_layer)
        w.add_head_count(hp.n_head)
        w.add_head_count_kv(hp.n_head_kv)
        w.add_layer_norm_rms_eps(hp.rms_eps)
        w.add_rope_dimension_count(_rope_dims(hp))
        w.add_rope_freq_base(hp.rope_theta)
        w.add_sliding_window(int(c.get("sliding_window") or 0))

    def write_vocab(self, w, model_dir, cfg):
        """BPE for Phi-4's GPT2Tokenizer, else Phi-3's SentencePiece loop."""
        tok_config = vocab.read_json(model_dir / "tokenizer_config.json", missing_ok=True) or {}
        if tok_config.get("tokenizer_class") == "GPT2Tokenizer":
            vocab.write_gpt2(w, model_dir, cfg)
            return
        if not vocab.tokenizer_files(model_dir)[0]:
            raise GGQError(f"{model_dir}: no tokenizer.model (and tokenizer_config.json names no GPT2Tokenizer)")
        vocab.write_sentencepiece(w, model_dir, cfg, added_special_only=True, added_from_tokenizer_json=True)

    def extra_tensors(self, hp, model_dir):
        """LongRoPE's per-pair factors, float32."""
        lr = _long_rope(hp)
        if lr is None:
            return []
        return [(tn(MT.ROPE_FACTORS_LONG), np.asarray(lr[1], np.float32)),
                (tn(MT.ROPE_FACTORS_SHORT), np.asarray(lr[2], np.float32))]

    # ------------------------------------------------------------------ runtime

    def run_params(self, md, tensors):
        rp = super().run_params(md, tensors)
        rp.neox = True
        return rp

    def rope(self, rp, b, n_ctx):
        """One kind: the long factors when the context rounded up to 256 exceeds the original one
        (llama.cpp's choice, made once per context), else the short ones (either may be absent);
        cos/sin scaled by ``rope.scaling.attn_factor``."""
        half = rp.n_rot // 2
        long = -(-n_ctx // 256) * 256 > rp.rope_orig_ctx
        factors = b.vec_array(tn(MT.ROPE_FACTORS_LONG if long else MT.ROPE_FACTORS_SHORT), half, optional=True)
        b.tensor(tn(MT.ROPE_FACTORS_SHORT if long else MT.ROPE_FACTORS_LONG), (half,), optional=True)  # shape check
        inv, ms = rope_frequencies(rp.n_rot, rp.rope_base, rp.rope_scaling, rp.rope_factor, rp.rope_orig_ctx, factors,
                                   rp.rope_attn_factor)
        return inv[None, :], np.array([ms])


FAMILIES = (Phi3(),)
