"""Q5_0: 32 weights per 22-byte block, symmetric 5-bit quants with one float16 scale.

Block bytes: ``d`` (float16), ``qh`` (uint32 little-endian: bit ``j`` is bit 4 of weight ``j``),
then 16 bytes ``qs`` (low 4 bits; byte ``j`` = weight ``j`` low nibble, weight ``j + 16`` high
nibble). A weight is ``d * (q - 16)``.

Quantization (no imatrix) is bit-identical to ``gguf.quants.Q5_0`` and to
``quantize_row_q5_0_ref`` in ggml-quants.c: ``d = max / -16`` with ``max`` the signed weight of
largest magnitude, ``q = min(31, trunc(x / d + 16.5))``. With an imatrix it follows
``quantize_row_q5_0_impl`` (``make_qx_quants`` with nmax 16).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ._common import (block_signed_absmax,
                      F16_TO_F32, F32, check_blocks, check_imatrix, check_rows, fp32_bits_to_fp16_bits,
                      get_fp16, get_u32, make_qx_quants, pack_q5, put_fp16, put_u32, row_sigma2,
                      to_byte)

QK = 32
TYPE_SIZE = 22


@nb.njit(cache=True, parallel=True)
def _quantize_ref(x, out):
    n_rows, n = x.shape
    for r in nb.prange(n_rows):
        dv = np.empty(1, np.float32)
        dvb = dv.view(np.uint32)
        for b in range(n // QK):
            off = b * QK
            mx = block_signed_absmax(x, r, off, QK)
            d = mx / F32(-16.0)
            idd = F32(1.0) / d if d != F32(0.0) else F32(0.0)
            dv[0] = d
            o = b * TYPE_SIZE
            put_fp16(out, r, o, fp32_bits_to_fp16_bits(dvb[0]))
            qh = np.int64(0)
            for j in range(QK // 2):
                q0 = min(to_byte(x[r, off + j] * idd + F32(16.5)), 31)
                q1 = min(to_byte(x[r, off + QK // 2 + j] * idd + F32(16.5)), 31)
                qh |= pack_q5(out, r, o + 6, j, q0, q1)
            put_u32(out, r, o + 2, qh)


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
            dv[0] = make_qx_quants(QK, 16, xr, off, L, w)
            o = b * TYPE_SIZE
            put_fp16(out, r, o, fp32_bits_to_fp16_bits(dvb[0]))
            qh = np.int64(0)
            for j in range(QK // 2):
                qh |= pack_q5(out, r, o + 6, j, L[j], L[j + QK // 2])
            put_u32(out, r, o + 2, qh)


@nb.njit(cache=True, parallel=True)
def _dequantize(q, tab, out):
    n_rows, nbytes = q.shape
    for r in nb.prange(n_rows):
        for b in range(nbytes // TYPE_SIZE):
            o = b * TYPE_SIZE
            d = tab[get_fp16(q, r, o)]
            qh = get_u32(q, r, o + 2)
            for j in range(QK // 2):
                byte = np.int64(q[r, o + 6 + j])
                q0 = (byte & 0xF) | (((qh >> j) & 1) << 4)
                q1 = (byte >> 4) | (((qh >> (j + QK // 2)) & 1) << 4)
                out[r, b * QK + j] = d * F32(q0 - 16)
                out[r, b * QK + QK // 2 + j] = d * F32(q1 - 16)


def quantize_rows(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 ``(n_rows, n)`` (``n % 32 == 0``) to Q5_0 bytes, uint8 ``(n_rows, n // 32 * 22)``.

    ``imatrix``: optional float32 ``(n,)`` importance weights; selects llama.cpp's weighted path
    (``quantize_row_q5_0_impl``), otherwise ``quantize_row_q5_0_ref``'s rounding.
    Raises ValueError on a bad shape.
    """
    x = check_rows(x, QK, "Q5_0")
    qw = check_imatrix(imatrix, x.shape[1], "Q5_0")
    out = np.empty((x.shape[0], x.shape[1] // QK * TYPE_SIZE), dtype=np.uint8)
    if qw is None:
        _quantize_ref(x, out)
    else:
        _quantize_imatrix(x, qw, out)
    return out


def dequantize_rows(q: np.ndarray) -> np.ndarray:
    """Q5_0 bytes uint8 ``(n_rows, k * 22)`` -> float32 ``(n_rows, k * 32)`` (``d * (q - 16)``)."""
    q = check_blocks(q, TYPE_SIZE, "Q5_0")
    out = np.empty((q.shape[0], q.shape[1] // TYPE_SIZE * QK), dtype=np.float32)
    _dequantize(q, F16_TO_F32, out)
    return out
