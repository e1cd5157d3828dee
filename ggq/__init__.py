"""ggq: Hugging Face checkpoints to block-quantized GGUF files, and a Numba CPU runtime for them."""

import hashlib
import os
from pathlib import Path

__version__ = "0.1.0"


def _numba_cache_dir() -> str:
    """A Numba cache folder keyed by a hash of ggq's own sources.

    Numba's on-disk cache checks only the timestamp of the file that defines a function, not of the
    kernels it calls in other modules: after an upgrade it could run stale compiled code. Keying the
    folder by every ggq source file makes any change start from a clean cache.
    """
    root = Path(__file__).parent
    h = hashlib.sha1(__version__.encode() + os.environ.get("GGQ_SIMD", "").encode())
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return str(base / "ggq" / "numba" / h.hexdigest()[:16])


if "NUMBA_CACHE_DIR" not in os.environ:
    try:
        os.environ["NUMBA_CACHE_DIR"] = _numba_cache_dir()
    except OSError:
        pass
