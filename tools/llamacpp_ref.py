"""llama.cpp as a reference, through llama-cpp-python: its converter, its quantizer, its kernels.

* :func:`llama_cpp_source` downloads the llama-cpp-python source package with pip (PyPI only) and
  returns the vendored llama.cpp folder, which holds ``convert_hf_to_gguf.py`` and its own gguf-py.
* :func:`convert_hf` runs that converter on a Hugging Face folder (``outtype`` f32/f16/bf16/q8_0).
* :func:`convert_lora` runs its ``convert_lora_to_gguf.py`` on a PEFT LoRA folder against a base folder.
* :func:`quantize_file` runs ``llama_model_quantize`` (the C library behind ``llama-quantize``).
* :func:`ggml_lib` opens ``libggml-base`` with ctypes; :func:`ggml_quantize` calls its
  ``ggml_quantize_chunk`` on a float32 array (optionally with an imatrix) and returns the block bytes.

Used by tests and benchmarks; nothing from llama.cpp is committed to this repository.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import tarfile
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = Path(os.environ.get("GGQ_TEST_CACHE", REPO / ".cache" / "tests"))


def llama_cpp_source(cache: Path = DEFAULT_CACHE) -> Path:
    """Return ``<cache>/llama-cpp-src/.../vendor/llama.cpp``, fetching the sdist with pip if absent."""
    root = Path(cache) / "llama-cpp-src"
    found = list(root.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py"))
    if found:
        return found[0].parent
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "-d", tmp, LLAMA_CPP_PYTHON], check=True)
        sdist = next(Path(tmp).glob("*.tar.gz"))
        with tarfile.open(sdist) as tf:
            members = [m for m in tf.getmembers()
                       if "/vendor/llama.cpp/" in m.name and ("/ggml/" not in m.name or m.name.endswith((".c", ".h", ".cpp")))]
            tf.extractall(root, members=members, filter="data")
    return next(root.glob("llama_cpp_python-*/vendor/llama.cpp/convert_hf_to_gguf.py")).parent


def convert_hf(model_dir: Path, out: Path, outtype: str = "f16", cache: Path = DEFAULT_CACHE) -> Path:
    """Convert ``model_dir`` with llama.cpp's ``convert_hf_to_gguf.py`` (its own gguf-py on the path)."""
    src = llama_cpp_source(cache)
    env = dict(os.environ, PYTHONPATH=f"{src / 'gguf-py'}{os.pathsep}{src}", NO_LOCAL_GGUF="")
    subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(out),
                    "--outtype", outtype], check=True, env=env, capture_output=True)
    return Path(out)


def convert_lora(adapter_dir: Path, base_dir: Path, out: Path, outtype: str = "f16", cache: Path = DEFAULT_CACHE) -> Path:
    """Convert the PEFT adapter ``adapter_dir`` with llama.cpp's ``convert_lora_to_gguf.py`` (``--base
    base_dir``; its own gguf-py on the path)."""
    src = llama_cpp_source(cache)
    env = dict(os.environ, PYTHONPATH=f"{src / 'gguf-py'}{os.pathsep}{src}", NO_LOCAL_GGUF="")
    subprocess.run([sys.executable, str(src / "convert_lora_to_gguf.py"), str(adapter_dir), "--base", str(base_dir),
                    "--outfile", str(out), "--outtype", outtype], check=True, env=env, capture_output=True)
    return Path(out)


# llama_ftype values (same numbers as gguf.LlamaFileType)
FTYPES = {
    "F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10,
    "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16,
    "Q5_K_M": 17, "Q6_K": 18, "Q2_K_S": 21, "BF16": 32,
}


def quantize_file(inp: Path, out: Path, ftype: str, nthread: int = 2, allow_requantize: bool = False,
                  imatrix: Path | None = None) -> Path:
    """Quantize a GGUF with ``llama_model_quantize`` (llama-quantize's library call).

    ``imatrix`` is not supported through this path (llama-cpp-python exposes no imatrix loader).
    """
    import llama_cpp

    if imatrix is not None:
        raise NotImplementedError("imatrix through llama-cpp-python is not wired up")
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = nthread
    params.ftype = FTYPES[ftype]
    params.allow_requantize = allow_requantize
    rc = llama_cpp.llama_model_quantize(str(inp).encode(), str(out).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({inp}, {ftype}) returned {rc}")
    return Path(out)


@lru_cache(maxsize=1)
def ggml_lib() -> ctypes.CDLL:
    """libggml-base from the installed llama-cpp-python, with ggml_quantize_chunk's signature set."""
    import llama_cpp

    libdir = Path(llama_cpp.__file__).parent / "lib"
    lib = ctypes.CDLL(str(libdir / "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    return lib


def ggml_quantize(x: np.ndarray, qtype: int, imatrix: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's ``ggml_quantize_chunk`` on float32 ``x`` ``(n_rows, n_per_row)`` -> uint8 block bytes.

    Without ``imatrix`` K-quants take their ``quantize_row_*_ref`` path; with one, the weighted
    ``quantize_*_impl`` path llama-quantize uses with ``--imatrix``.
    """
    lib = ggml_lib()
    x = np.ascontiguousarray(x, dtype=np.float32)
    nrows, n = x.shape
    lib.ggml_quantize_init(int(qtype))
    rb = lib.ggml_row_size(int(qtype), n)
    out = np.zeros((nrows, rb), dtype=np.uint8)
    imp = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        imp = imatrix.ctypes.data
    lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, nrows, n, imp)
    return out


if __name__ == "__main__":
    print(llama_cpp_source())


def load_llama(path: Path, n_ctx: int = 512, n_threads: int = 2, vocab_only: bool = False):
    """A ``llama_cpp.Llama`` on ``path`` (quiet, CPU, ``n_threads``)."""
    import llama_cpp

    return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                           verbose=False, vocab_only=vocab_only, n_gpu_layers=0, logits_all=True)


def next_logits(llm, tokens: list[int]) -> np.ndarray:
    """llama.cpp's float32 ``(n_vocab,)`` logits after ``tokens`` (a fresh context each call)."""
    llm.reset()
    llm.eval(list(tokens))
    return np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)


def greedy(llm, tokens: list[int], n: int) -> list[int]:
    """``n`` greedy (argmax) continuation tokens from llama.cpp after ``tokens``."""
    llm.reset()
    llm.eval(list(tokens))
    out = []
    for _ in range(n):
        t = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(t)
        llm.eval([t])
    return out
