"""Q5_1: 32 weights per 24-byte block, asymmetric 5-bit quants with a float16 scale and minimum.

Block bytes: ``d`` (float16), ``m`` (float16), ``qh`` (uint32 little-endian: bit ``j`` is bit 4
of weight ``j``), then 16 bytes ``qs`` (low 4 bits; byte ``j`` = weight ``j`` low nibble, weight
``j + 16`` high nibble). A weight is ``d * q + m``.

Quantization (no imatrix) is bit-identical to ``gguf.quants.Q5_1`` and to
``quantize_row_q5_1_ref`` in ggml-quants.c: ``m = min``, ``d = (max - min) / 31``, ``q = min(31,
trunc((x - min) / d + 0.5))`` (the C reference does not clamp; for finite input the value never
exceeds 31). With an imatrix it follows ``quantize_row_q5_1_impl`` (``make_qkx3_quants`` with
rmin -0.9, rdelta 0.05, 36 steps).
"""

from __future__ import annotations

import numba as nb
import numpy as np

from ._common import (block_min_max,
                      F16_TO_F32, F32, check_blocks, check_imatrix, check_rows, fp32_bits_to_fp16_bits,
                      get_fp16, get_u32, make_qkx3_quants, pack_q5, put_fp16, put_u32, row_sigma2,
                      to_byte)

QK = 32
TYPE_SIZE = 24


@nb.njit(cache=True, parallel=True)
def _quantize_ref(x, out):
    n_rows, n = x.shape
    for r in nb.prange(n_rows):
        dv = np.empty(2, np.float32)
        dvb = dv.view(np.uint32)
        for b in range(n // QK):
            off = b * QK
            mn, mx = block_min_max(x, r, off, QK)
            d = (mx - mn) / F32(31.0)
            idd = F32(1.0) / d if d != F32(0.0) else F32(0.0)
            dv[0] = d
            dv[1] = mn
            o = b * TYPE_SIZE
            put_fp16(out, r, o, fp32_bits_to_fp16_bits(dvb[0]))
            put_fp16(out, r, o + 2, fp32_bits_to_fp16_bits(dvb[1]))
            qh = np.int64(0)
            for j in range(QK // 2):
                q0 = min(to_byte((x[r, off + j] - mn) * idd + F32(0.5)), 31)
                q1 = min(to_byte((x[r, off + QK // 2 + j] - mn) * idd + F32(0.5)), 31)
                qh |= pack_q5(out, r, o + 8, j, q0, q1)
            put_u32(out, r, o + 4, qh)


@nb.njit(cache=True, parallel=True)
def _quantize_imatrix(x, qw, out):
    n_rows, n = x.shape
    for r in nb.prange(n_rows):
        dv = np.empty(2, np.float32)
        dvb = dv.view(np.uint32)
        w = np.empty(QK, np.float32)
        L = np.empty(QK, np.int64)
        Laux = np.empty(QK, np.int64)
        xr = x[r]
        sigma2 = row_sigma2(x, r, n)
        for b in range(n // QK):
            off = b * QK
            for j in range(QK):
                v = xr[off + j]
                w[j] = qw[off + j] * np.sqrt(sigma2 + v * v)
            scale, the_min = make_qkx3_quants(QK, 31, xr, off, w, L, Laux, F32(-0.9), F32(0.05), 36)
            dv[0] = scale
            dv[1] = -the_min
            o = b * TYPE_SIZE
            put_fp16(out, r, o, fp32_bits_to_fp16_bits(dvb[0]))
            put_fp16(out, r, o + 2, fp32_bits_to_fp16_bits(dvb[1]))
            qh = np.int64(0)
            for j in range(QK // 2):
                qh |= pack_q5(out, r, o + 8, j, L[j], L[j + QK // 2])
            put_u32(out, r, o + 4, qh)


@nb.njit(cache=True, parallel=True)
def _dequantize(q, tab, out):
    n_rows, nbytes = q.shape
    for r in nb.prange(n_rows):
        for b in range(nbytes // TYPE_SIZE):
            o = b * TYPE_SIZE
            d = tab[get_fp16(q, r, o)]
            m = tab[get_fp16(q, r, o + 2)]
            qh = get_u32(q, r, o + 4)
            for j in range(QK // 2):
                byte = np.int64(q[r, o + 8 + j])
                q0 = (byte & 0xF) | (((qh >> j) & 1) << 4)
                q1 = (byte >> 4) | (((qh >> (j + QK // 2)) & 1) << 4)
                out[r, b * QK + j] = d * F32(q0) + m
                out[r, b * QK + QK // 2 + j] = d * F32(q1) + m


def quantize_rows(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 ``(n_rows, n)`` (``n % 32 == 0``) to Q5_1 bytes, uint8 ``(n_rows, n // 32 * 24)``.

    ``imatrix``: optional float32 ``(n,)`` importance weights; selects llama.cpp's weighted path
    (``quantize_row_q5_1_impl``), otherwise ``quantize_row_q5_1_ref``'s rounding.
    Raises ValueError on a bad shape.
    """
    x = check_rows(x, QK, "Q5_1")
    qw = check_imatrix(imatrix, x.shape[1], "Q5_1")
    out = np.empty((x.shape[0], x.shape[1] // QK * TYPE_SIZE), dtype=np.uint8)
    if qw is None:
        _quantize_ref(x, out)
    else:
        _quantize_imatrix(x, qw, out)
    return out


def dequantize_rows(q: np.ndarray) -> np.ndarray:
    """Q5_1 bytes uint8 ``(n_rows, k * 24)`` -> float32 ``(n_rows, k * 32)`` (``d * q + m``)."""
    q = check_blocks(q, TYPE_SIZE, "Q5_1")
    out = np.empty((q.shape[0], q.shape[1] // TYPE_SIZE * QK), dtype=np.float32)
    _dequantize(q, F16_TO_F32, out)
    return out
