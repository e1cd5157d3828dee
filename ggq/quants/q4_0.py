"""Q4_0: 32 weights per 18-byte block, symmetric 4-bit quants with one float16 scale.

Block bytes: ``d`` (float16, little-endian) then 16 bytes ``qs``; byte ``j`` holds weight ``j`` in
its low nibble and weight ``j + 16`` in its high nibble. A weight is ``d * (q - 8)``.

Quantization (no imatrix) is bit-identical to ``gguf.quants.Q4_0`` and to
``quantize_row_q4_0_ref`` in ggml-quants.c: ``max`` is the signed weight of largest magnitude
(first one on ties; a NaN wins, as in numpy's argmax), ``d = max / -8``, ``q = min(15,
trunc(x / d + 8.5))``. With an imatrix it follows ``quantize_row_q4_0_impl`` (llama.cpp's
weighted path: per-weight importance ``imatrix[j] * sqrt(sigma2 + x[j]^2)`` and the
``make_qx_quants`` scale search).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ._common import (block_signed_absmax,
                      F16_TO_F32, F32, check_blocks, check_imatrix, check_rows, fp32_bits_to_fp16_bits,
                      get_fp16, make_qx_quants, put_fp16, row_sigma2, to_byte)

QK = 32
TYPE_SIZE = 18


@nb.njit(cache=True, parallel=True)
def _quantize_ref(x, out):
    n_rows, n = x.shape
    for r in nb.prange(n_rows):
        dv = np.empty(1, np.float32)
        dvb = dv.view(np.uint32)
        for b in range(n // QK):
            off = b * QK
            mx = block_signed_absmax(x, r, off, QK)
            d = mx / F32(-8.0)
            idd = F32(1.0) / d if d != F32(0.0) else F32(0.0)
            dv[0] = d
            o = b * TYPE_SIZE
            put_fp16(out, r, o, fp32_bits_to_fp16_bits(dvb[0]))
            for j in range(QK // 2):
                q0 = min(to_byte(x[r, off + j] * idd + F32(8.5)), 15)
                q1 = min(to_byte(x[r, off + QK // 2 + j] * idd + F32(8.5)), 15)
                out[r, o + 2 + j] = q0 | (q1 << 4)


@nb.njit(cache=True, parallel=True)
def _quantize_imatrix(x, qw, out):
    n_rows, n = x.shape
    for r in nb.prange(n_rows):
        dv = np.empty(1, np.float32)
        dvb = dv.view(np.uint32)
        w = np.empty(QK, np.float32)
        L = np.empty(QK, np.int64)
        xr = x[r]
        sigma2 = row_sigma2(x, r, n)
        for b in range(n // QK):
            off = b * QK
            for j in range(QK):
                v = xr[off + j]
                w[j] = qw[off + j] * np.sqrt(sigma2 + v * v)
            dv[0] = make_qx_quants(QK, 8, xr, off, L, w)
            o = b * TYPE_SIZE
            put_fp16(out, r, o, fp32_bits_to_fp16_bits(dvb[0]))
            for j in range(QK // 2):
                out[r, o + 2 + j] = L[j] | (L[j + QK // 2] << 4)


@nb.njit(cache=True, parallel=True)
def _dequantize(q, tab, out):
    n_rows, nbytes = q.shape
    for r in nb.prange(n_rows):
        for b in range(nbytes // TYPE_SIZE):
            o = b * TYPE_SIZE
            d = tab[get_fp16(q, r, o)]
            for j in range(QK // 2):
                byte = np.int64(q[r, o + 2 + j])
                out[r, b * QK + j] = d * F32((byte & 0xF) - 8)
                out[r, b * QK + QK // 2 + j] = d * F32((byte >> 4) - 8)


def quantize_rows(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 ``(n_rows, n)`` (``n % 32 == 0``) to Q4_0 bytes, uint8 ``(n_rows, n // 32 * 18)``.

    ``imatrix``: optional float32 ``(n,)`` importance weights; selects llama.cpp's weighted path
    (``quantize_row_q4_0_impl``), otherwise the reference rounding of ``quantize_row_q4_0_ref``.
    Raises ValueError on a bad shape.
    """
    x = check_rows(x, QK, "Q4_0")
    qw = check_imatrix(imatrix, x.shape[1], "Q4_0")
    out = np.empty((x.shape[0], x.shape[1] // QK * TYPE_SIZE), dtype=np.uint8)
    if qw is None:
        _quantize_ref(x, out)
    else:
        _quantize_imatrix(x, qw, out)
    return out


def dequantize_rows(q: np.ndarray) -> np.ndarray:
    """Q4_0 bytes uint8 ``(n_rows, k * 18)`` -> float32 ``(n_rows, k * 32)`` (``d * (q - 8)``)."""
    q = check_blocks(q, TYPE_SIZE, "Q4_0")
    out = np.empty((q.shape[0], q.shape[1] // TYPE_SIZE * QK), dtype=np.float32)
    _dequantize(q, F16_TO_F32, out)
    return out
