"""GGUF file I/O on top of the ``gguf`` package: atomic output, file info."""
