"""Conversion of Hugging Face checkpoints (and GGUF files) into GGUF files.

Modules: ``checkpoint`` (reading a checkpoint lazily), ``arch`` (the architecture table: config
keys to GGUF metadata, HF tensor names to GGUF names, row permutations), ``vocab`` (tokenizer
export), ``mixes`` (per-tensor type choice), ``quantized`` (GPTQ/AWQ import), ``requantize``
(GGUF to GGUF), ``pipeline`` (the streaming convert itself).
"""
