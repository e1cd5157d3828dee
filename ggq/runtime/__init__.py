"""The Numba CPU runtime: load a GGUF file and run it with its family's forward pass (:mod:`ggq.models`).

``ggq.runtime.model.Model`` is the entry point (``Model.load(path)``, ``eval``, ``reset``,
``truncate``); ``loader`` validates and memory-maps files; ``kernels`` holds the compiled matrix
products per block-type family; ``ops`` the compiled steps the families' forward passes are
written with; ``bench`` measures prompt/decode speed. See ``specs/runtime.md``.
"""
