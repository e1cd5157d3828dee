"""Q8_0: 32 weights per 34-byte block, symmetric 8-bit quants with one float16 scale.

Block bytes: ``d`` (float16) then 32 signed bytes ``qs`` in weight order. A weight is ``d * q``.

Quantization is bit-identical to ``gguf.quants.Q8_0`` and to ``quantize_row_q8_0_ref`` in
ggml-quants.c: ``d = max|x| / 127``, ``q = roundf(x / d)`` (half away from zero). llama.cpp has
no weighted (imatrix) path for Q8_0, so an ``imatrix`` is accepted and ignored.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ._common import (F16_TO_F32, F32, check_blocks, check_imatrix, check_rows, fp32_bits_to_fp16_bits,
                      get_fp16, put_fp16, roundf, to_byte)

QK = 32
TYPE_SIZE = 34


@nb.njit(cache=True, parallel=True)
def _quantize_ref(x, out):
    n_rows, n = x.shape
    for r in nb.prange(n_rows):
        dv = np.empty(1, np.float32)
        dvb = dv.view(np.uint32)
        for b in range(n // QK):
            off = b * QK
            amax = F32(0.0)
            for j in range(QK):
                av = abs(x[r, off + j])
                if av != av:  # numpy's max propagates NaN
                    amax = av
                    break
                if av > amax:
                    amax = av
            d = amax / F32(127.0)
            idd = F32(1.0) / d if d != F32(0.0) else F32(0.0)
            dv[0] = d
            o = b * TYPE_SIZE
            put_fp16(out, r, o, fp32_bits_to_fp16_bits(dvb[0]))
            for j in range(QK):
                out[r, o + 2 + j] = to_byte(roundf(x[r, off + j] * idd))


@nb.njit(cache=True, parallel=True)
def _dequantize(q, tab, out):
    n_rows, nbytes = q.shape
    for r in nb.prange(n_rows):
        for b in range(nbytes // TYPE_SIZE):
            o = b * TYPE_SIZE
            d = tab[get_fp16(q, r, o)]
            for j in range(QK):
                v = np.int64(q[r, o + 2 + j])
                if v >= 128:
                    v -= 256
                out[r, b * QK + j] = F32(v) * d


def quantize_rows(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 ``(n_rows, n)`` (``n % 32 == 0``) to Q8_0 bytes, uint8 ``(n_rows, n // 32 * 34)``.

    ``imatrix`` (float32 ``(n,)``) is checked for length and otherwise ignored, as in llama.cpp.
    Raises ValueError on a bad shape.
    """
    x = check_rows(x, QK, "Q8_0")
    check_imatrix(imatrix, x.shape[1], "Q8_0")
    out = np.empty((x.shape[0], x.shape[1] // QK * TYPE_SIZE), dtype=np.uint8)
    _quantize_ref(x, out)
    return out


def dequantize_rows(q: np.ndarray) -> np.ndarray:
    """Q8_0 bytes uint8 ``(n_rows, k * 34)`` -> float32 ``(n_rows, k * 32)`` (``d * q``)."""
    q = check_blocks(q, TYPE_SIZE, "Q8_0")
    out = np.empty((q.shape[0], q.shape[1] // TYPE_SIZE * QK), dtype=np.float32)
    _dequantize(q, F16_TO_F32, out)
    return out
