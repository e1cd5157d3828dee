"""Q4_K: 4-bit weights with a 6-bit scale and min per 32, in 144-byte super-blocks of 256.

Block layout (ggml's ``block_q4_K``): float16 ``d``, float16 ``dmin``, 12 bytes of packed 6-bit
sub-block scales and mins, 128 bytes of nibbles. Weight ``i`` of sub-block ``j`` is
``d*sc[j]*q - dmin*m[j]``.

Quantization follows llama.cpp's ggml-quants.c: ``quantize_row_q4_K_ref`` without an imatrix
(what ``ggml_quantize_chunk`` does when given none) and ``quantize_row_q4_K_impl`` with one.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .kquant_search import (
    QK_K, WORK_SIZE, check_dequantize_args, check_quantize_args, fp16_round, get_f16, make_qkx2_quants,
    make_qkx3_quants, make_qp_quants, nearest_int, put_f16,
)

BLOCK_SIZE = 256
TYPE_SIZE = 144


@njit(cache=True, error_model="numpy", inline="always")
def pack_scale_min_k4(sc, j, ls, lm):
    """Write 6-bit scale ``ls`` and min ``lm`` of sub-block ``j`` (0..7) into the 12 bytes ``sc``.

    ``sc`` must start zeroed; same packing as quantize_row_q4_K_ref (shared with Q5_K).
    """
    if j < 4:
        sc[j] = ls
        sc[j + 4] = lm
    else:
        sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
        sc[j - 4] |= (ls >> 4) << 6
        sc[j] |= (lm >> 4) << 6


@njit(cache=True, error_model="numpy", inline="always")
def get_scale_min_k4(j, sc):
    """(scale, min) 6-bit values of sub-block ``j`` from the 12 packed bytes ``sc`` (ggml's get_scale_min_k4)."""
    if j < 4:
        return np.int64(sc[j] & 63), np.int64(sc[j + 4] & 63)
    d = (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4)
    m = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)
    return np.int64(d), np.int64(m)


@njit(cache=True, error_model="numpy", inline="always")
def requantize_k4(x, out, sc, d, dmin, L, nmax):
    """Final levels of the 8 sub-blocks of 32 given the stored scales (shared with Q5_K)."""
    for j in range(8):
        s, m = get_scale_min_k4(j, sc)
        dj = d * np.float32(s)
        if dj == 0:
            continue
        dm = dmin * np.float32(m)
        for ii in range(32):
            l = nearest_int((x[32 * j + ii] + dm) / dj)
            L[32 * j + ii] = max(0, min(nmax, l))


@njit(cache=True, error_model="numpy")
def _quantize_block_ref(x, out, L, work, weights, scales, mins):
    # quantize_row_q4_K_ref, one super-block: x float32 (256,), out uint8 (144,)
    max_scale = np.float32(0.0)
    max_min = np.float32(0.0)
    for j in range(8):
        xs = x[32 * j:32 * j + 32]
        sum_x2 = np.float32(0.0)
        for l in range(32):
            sum_x2 += xs[l] * xs[l]
        av_x = np.sqrt(sum_x2 / np.float32(32.0))
        for l in range(32):
            weights[l] = av_x + abs(xs[l])
        s, m = make_qkx2_quants(32, 15, xs, weights, L[32 * j:32 * j + 32],
                                np.float32(-1.0), np.float32(0.1), 20, False, work)
        scales[j] = s
        mins[j] = m
        if s > max_scale:
            max_scale = s
        if m > max_min:
            max_min = m
    inv_scale = np.float32(63.0) / max_scale if max_scale > 0 else np.float32(0.0)
    inv_min = np.float32(63.0) / max_min if max_min > 0 else np.float32(0.0)
    sc = out[4:16]
    sc[:] = 0
    for j in range(8):
        ls = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)
        lm = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
        pack_scale_min_k4(sc, j, ls, lm)
    hd, d = fp16_round(max_scale / np.float32(63.0))
    hm, dmin = fp16_round(max_min / np.float32(63.0))
    put_f16(out, 0, hd)
    put_f16(out, 2, hm)
    requantize_k4(x, out, sc, d, dmin, L, 15)
    _pack_q4(L, out)


@njit(cache=True, error_model="numpy", inline="always")
def _pack_q4(L, out):
    for j in range(4):
        for l in range(32):
            out[16 + 32 * j + l] = L[64 * j + l] | (L[64 * j + l + 32] << 4)


@njit(cache=True, error_model="numpy")
def _quantize_block_impl(x, qw, out, L, work, weights, scales, mins, sw, Ls, Lm):
    # quantize_row_q4_K_impl with quant_weights, one super-block
    sum_x2 = np.float32(0.0)
    for l in range(QK_K):
        sum_x2 += x[l] * x[l]
    sigma2 = np.float32(2.0) * sum_x2 / np.float32(QK_K)
    for j in range(8):
        xs = x[32 * j:32 * j + 32]
        for l in range(32):
            weights[l] = qw[32 * j + l] * np.sqrt(sigma2 + xs[l] * xs[l])
        sumw = np.float32(0.0)
        for l in range(32):
            sumw += weights[l]
        sw[j] = sumw
        s, m = make_qkx3_quants(32, 15, xs, weights, L[32 * j:32 * j + 32],
                                np.float32(-0.9), np.float32(0.05), 36, False, work)
        scales[j] = s
        mins[j] = m
    d_block = make_qp_quants(8, 63, scales, Ls, sw)
    m_block = make_qp_quants(8, 63, mins, Lm, sw)
    sc = out[4:16]
    sc[:] = 0
    for j in range(8):
        pack_scale_min_k4(sc, j, Ls[j], Lm[j])
    hd, d = fp16_round(d_block)
    hm, dmin = fp16_round(m_block)
    put_f16(out, 0, hd)
    put_f16(out, 2, hm)
    requantize_k4(x, out, sc, d, dmin, L, 15)
    _pack_q4(L, out)


@njit(cache=True, error_model="numpy", parallel=True)
def _quantize_rows(x, out):
    nrows, n = x.shape
    nb = n // QK_K
    for r in prange(nrows):
        L = np.empty(QK_K, np.uint8)
        work = np.empty(WORK_SIZE, np.float32)
        weights = np.empty(32, np.float32)
        scales = np.empty(8, np.float32)
        mins = np.empty(8, np.float32)
        for i in range(nb):
            _quantize_block_ref(x[r, i * QK_K:(i + 1) * QK_K], out[r, i * TYPE_SIZE:(i + 1) * TYPE_SIZE],
                                L, work, weights, scales, mins)


@njit(cache=True, error_model="numpy", parallel=True)
def _quantize_rows_imatrix(x, qw, out):
    nrows, n = x.shape
    nb = n // QK_K
    for r in prange(nrows):
        L = np.empty(QK_K, np.uint8)
        work = np.empty(WORK_SIZE, np.float32)
        weights = np.empty(32, np.float32)
        scales = np.empty(8, np.float32)
        mins = np.empty(8, np.float32)
        sw = np.empty(8, np.float32)
        Ls = np.empty(8, np.uint8)
        Lm = np.empty(8, np.uint8)
        for i in range(nb):
            _quantize_block_impl(x[r, i * QK_K:(i + 1) * QK_K], qw[i * QK_K:(i + 1) * QK_K],
                                 out[r, i * TYPE_SIZE:(i + 1) * TYPE_SIZE], L, work, weights, scales, mins, sw, Ls, Lm)


@njit(cache=True, error_model="numpy", parallel=True)
def _dequantize_rows(q, y):
    nrows = q.shape[0]
    nb = q.shape[1] // TYPE_SIZE
    for r in prange(nrows):
        for i in range(nb):
            b = q[r, i * TYPE_SIZE:(i + 1) * TYPE_SIZE]
            o = y[r, i * QK_K:(i + 1) * QK_K]
            d = get_f16(b, 0)
            dmin = get_f16(b, 2)
            sc = b[4:16]
            for j in range(8):
                s, m = get_scale_min_k4(j, sc)
                dj = d * np.float32(s)
                mj = dmin * np.float32(m)
                shift = 4 * (j & 1)
                base = 16 + 32 * (j >> 1)
                for l in range(32):
                    o[32 * j + l] = dj * np.float32((b[base + l] >> shift) & 0xF) - mj


def quantize_rows(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 ``(n_rows, n)`` to Q4_K block bytes, uint8 ``(n_rows, n//256*144)``.

    Without ``imatrix``: llama.cpp's ``quantize_row_q4_K_ref`` (make_qkx2_quants per 32 with
    weights ``rms + |x|``, 6-bit scales relative to the largest). With ``imatrix`` (float32
    ``(n,)``): ``quantize_row_q4_K_impl`` (make_qkx3_quants with weights
    ``imatrix*sqrt(sigma2 + x**2)``, scales and mins by make_qp_quants). Parallel over rows.
    Raises ValueError if ``n`` is not a multiple of 256 or the imatrix length differs from ``n``.
    """
    x, imatrix = check_quantize_args(x, imatrix, "Q4_K")
    out = np.zeros((x.shape[0], x.shape[1] // QK_K * TYPE_SIZE), dtype=np.uint8)
    if imatrix is None:
        _quantize_rows(x, out)
    else:
        _quantize_rows_imatrix(x, imatrix, out)
    return out


def dequantize_rows(q: np.ndarray) -> np.ndarray:
    """Q4_K block bytes uint8 ``(n_rows, nbytes)`` -> float32 ``(n_rows, nbytes//144*256)``.

    Same arithmetic as ggml's ``dequantize_row_q4_K`` (``(d*sc)*q - dmin*m`` in float32).
    """
    q = check_dequantize_args(q, TYPE_SIZE, "Q4_K")
    y = np.empty((q.shape[0], q.shape[1] // TYPE_SIZE * QK_K), dtype=np.float32)
    _dequantize_rows(q, y)
    return y
