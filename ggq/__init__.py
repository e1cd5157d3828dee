"""ggq: Hugging Face checkpoints to block-quantized GGUF files, and a Numba CPU runtime for them."""

__version__ = "0.1.0"
