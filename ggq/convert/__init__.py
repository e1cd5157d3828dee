"""Conversion of Hugging Face checkpoints (and GGUF files) into GGUF files.

Modules: ``checkpoint`` (reading a checkpoint lazily), ``arch`` (what the model families'
rules share: config hyper-parameters and rope parameters, HF tensor names to GGUF names, Q/K row
permutation; the families themselves are in :mod:`ggq.models`), ``vocab`` (tokenizer
export), ``mixes`` (per-tensor type choice), ``quantized`` (GPTQ/AWQ import), ``requantize``
(GGUF to GGUF), ``pipeline`` (the streaming convert itself).
"""
