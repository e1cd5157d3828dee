"""The Numba CPU runtime: load a GGUF file and run llama / mistral / qwen2 models.

``ggq.runtime.model.Model`` is the entry point (``Model.load(path)``, ``eval``, ``reset``,
``truncate``); ``loader`` validates and memory-maps files; ``kernels`` holds the compiled matrix
products per block-type family; ``bench`` measures prompt/decode speed. See ``specs/runtime.md``.
"""
