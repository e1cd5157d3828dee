"""Qwen 2 / Qwen 2.5: GGUF architecture ``qwen2``.

Converter: llama.cpp's ``Qwen2Model`` (conversion/qwen.py): no Q/K permutation (NEOX rope turns
the halves Hugging Face stores), Q/K/V biases kept; tokenizer from ``tokenizer.model`` if there is
one, else BPE.

Runtime: llama.cpp's ``llm_build_qwen2``: the llama graph (:func:`ggq.models.llama.forward`) with
Q/K/V biases and NEOX rope.
"""

from __future__ import annotations

import gguf

from ggq.convert import vocab
from ggq.models.base import Family
from ggq.models.llama import forward


class Qwen2(Family):
    hf_architectures = ("Qwen2ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN2
    write_rope_dims = True
    forward = staticmethod(forward)

    def write_vocab(self, w, model_dir, cfg):
        """``Qwen2Model.set_vocab``: SentencePiece if there is a tokenizer.model, else BPE."""
        has_spm, _, _ = vocab.tokenizer_files(model_dir)
        if has_spm:
            vocab.write_sentencepiece(w, model_dir, cfg)
        else:
            vocab.write_gpt2(w, model_dir, cfg)

    def is_70b(self, n_layer, n_head, n_head_kv):
        return n_layer == 80

    def run_params(self, md, tensors):
        rp = super().run_params(md, tensors)
        rp.neox = True
        return rp


FAMILIES = (Qwen2(),)
