"""Block quantization kernels, one module per ggml type (candle-style).

Every module ``ggq.quants.<type>`` (``q4_0``, ``q8_0``, ``q4_k``, ...) exposes two Numba-backed
functions working on 2-D C-contiguous arrays, parallel over rows:

``quantize_rows(x, imatrix=None) -> np.ndarray``
    ``x``: float32 ``(n_rows, n_per_row)``, ``n_per_row`` a multiple of the block size.
    ``imatrix``: optional float32 ``(n_per_row,)`` importance weights (ignored by types whose
    llama.cpp reference has no weighted path). Returns uint8 ``(n_rows, n_per_row // block_size *
    type_size)``: the ggml block bytes, row after row.
``dequantize_rows(q) -> np.ndarray``
    ``q``: uint8 ``(n_rows, n_bytes_per_row)``. Returns float32 ``(n_rows, n_per_row)``.

This package's :func:`quantize` and :func:`dequantize` dispatch on the type and accept any
shape, the way ``gguf.quants.quantize``/``dequantize`` do (the last axis is the row).
"""

from __future__ import annotations

import importlib

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

T = GGMLQuantizationType

#: ggml type -> module name under ggq.quants
_MODULES: dict[GGMLQuantizationType, str] = {
    T.F32: "floats",
    T.F16: "floats",
    T.BF16: "floats",
    T.Q4_0: "q4_0",
    T.Q4_1: "q4_1",
    T.Q5_0: "q5_0",
    T.Q5_1: "q5_1",
    T.Q8_0: "q8_0",
    T.Q2_K: "q2_k",
    T.Q3_K: "q3_k",
    T.Q4_K: "q4_k",
    T.Q5_K: "q5_k",
    T.Q6_K: "q6_k",
    T.Q8_K: "q8_k",
}


def _module(qtype: GGMLQuantizationType):
    qtype = GGMLQuantizationType(qtype)
    name = _MODULES.get(qtype)
    if name is None:
        raise NotImplementedError(f"ggq has no kernel for {qtype.name}")
    return importlib.import_module(f"ggq.quants.{name}")


def parse_ggml_type(name: str) -> GGMLQuantizationType:
    """A ggml type from its name (``q4_k``, ``Q8_0``, ``f16``; case-insensitive).

    Raises :class:`ggq.errors.GGQError` listing the types ggq can write if the name is unknown.
    """
    from ggq.errors import GGQError

    try:
        t = GGMLQuantizationType[name.strip().upper()]
    except KeyError:
        t = None
    if t is None or t not in _MODULES or t == T.Q8_K:
        valid = ", ".join(x.name for x in _MODULES if x != T.Q8_K)
        raise GGQError(f"unknown ggml type {name!r} (valid: {valid})")
    return t


def supported(qtype: GGMLQuantizationType) -> bool:
    """True if ggq can quantize to and dequantize from ``qtype``."""
    try:
        _module(qtype)
    except (NotImplementedError, ImportError):
        return False
    return True


def block_size(qtype: GGMLQuantizationType) -> int:
    """Weights per block (1 for F32/F16/BF16, 32 for Q4_0..Q8_0, 256 for K-quants)."""
    return GGML_QUANT_SIZES[GGMLQuantizationType(qtype)][0]


def type_size(qtype: GGMLQuantizationType) -> int:
    """Bytes per block."""
    return GGML_QUANT_SIZES[GGMLQuantizationType(qtype)][1]


def row_bytes(qtype: GGMLQuantizationType, n_per_row: int) -> int:
    """Bytes taken by one row of ``n_per_row`` weights; ValueError if it does not divide."""
    bs, ts = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
    if n_per_row % bs:
        raise ValueError(f"row length {n_per_row} is not a multiple of the {GGMLQuantizationType(qtype).name} block size {bs}")
    return n_per_row // bs * ts


def quantize(data: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize ``data`` (any float dtype, shape ``(..., n)``) to ``qtype``.

    Returns uint8 ``(..., row_bytes(qtype, n))`` block bytes, except F32/F16/BF16 which return
    float32/float16/uint16-as-uint8 exactly as ``gguf.quants.quantize`` does (F32 and F16 as their
    own numpy dtypes, BF16 as uint8 bytes). Raises ValueError if ``n`` is not a multiple of the
    block size and NotImplementedError for a type ggq has no kernel for.
    """
    qtype = GGMLQuantizationType(qtype)
    mod = _module(qtype)
    if qtype in (T.F32, T.F16, T.BF16):
        return mod.quantize(data, qtype)
    shape = data.shape
    rb = row_bytes(qtype, shape[-1])
    rows = np.ascontiguousarray(data.reshape(-1, shape[-1]), dtype=np.float32)
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        out = mod.quantize_rows(rows, imatrix)
    else:
        out = mod.quantize_rows(rows)
    return out.reshape(*shape[:-1], rb)


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Dequantize block bytes ``data`` (uint8 ``(..., nbytes)``) of ``qtype`` to float32 ``(..., n)``.

    F32/F16 accept their own dtypes too, like ``gguf.quants.dequantize``.
    """
    qtype = GGMLQuantizationType(qtype)
    mod = _module(qtype)
    if qtype in (T.F32, T.F16, T.BF16):
        return mod.dequantize(data, qtype)
    shape = data.shape
    rows = np.ascontiguousarray(data.reshape(-1, shape[-1]).view(np.uint8))
    out = mod.dequantize_rows(rows)
    return out.reshape(*shape[:-1], out.shape[-1])
