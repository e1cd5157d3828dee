"""Q5_K: 5-bit weights with a 6-bit scale and min per 32, in 176-byte super-blocks of 256.

Block layout (ggml's ``block_q5_K``): float16 ``d``, float16 ``dmin``, 12 bytes of packed 6-bit
sub-block scales and mins (as Q4_K), 32 bytes of high bits ``qh``, 128 bytes of low nibbles.
Weight ``i`` of sub-block ``j`` is ``d*sc[j]*q - dmin*m[j]`` with ``q`` in 0..31.

Quantization follows llama.cpp's ggml-quants.c: ``quantize_row_q5_K_ref`` without an imatrix and
``quantize_row_q5_K_impl`` with one.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .kquant_search import (
    QK_K, WORK_SIZE, check_dequantize_args, check_quantize_args, fp16_round, get_f16, make_qkx2_quants,
    make_qkx3_quants, make_qp_quants, nearest_int, put_f16,
)
from .q4_k import get_scale_min_k4, pack_scale_min_k4, requantize_k4

BLOCK_SIZE = 256
TYPE_SIZE = 176


@njit(cache=True, error_model="numpy", inline="always")
def _pack_q5(L, out):
    # levels 0..31: low nibbles to ql, fifth bit of the level of sub-block j to bit j of qh
    # (branch-free: the bits are data-dependent)
    qh = out[16:48]
    ql = out[48:176]
    for j in range(32):
        b = 0
        for n in range(4):
            l1 = np.int64(L[64 * n + j])
            l2 = np.int64(L[64 * n + j + 32])
            b |= ((l1 >> 4) & 1) << (2 * n)
            b |= ((l2 >> 4) & 1) << (2 * n + 1)
            ql[32 * n + j] = (l1 & 0xF) | ((l2 & 0xF) << 4)
        qh[j] = b


@njit(cache=True, error_model="numpy")
def _quantize_block_ref(x, out, L, work, weights, scales, mins):
    # quantize_row_q5_K_ref, one super-block: x float32 (256,), out uint8 (176,)
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
        s, m = make_qkx2_quants(32, 31, xs, weights, L[32 * j:32 * j + 32],
                                np.float32(-0.5), np.float32(0.1), 15, False, work)
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
    requantize_k4(x, out, sc, d, dmin, L, 31)
    _pack_q5(L, out)


@njit(cache=True, error_model="numpy")
def _quantize_block_impl(x, qw, out, L, work, weights, scales, mins, sw, Ls, Lm):
    # quantize_row_q5_K_impl with quant_weights, one super-block
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
        s, m = make_qkx3_quants(32, 31, xs, weights, L[32 * j:32 * j + 32],
                                np.float32(-0.9), np.float32(0.05), 36, False, work)
        scales[j] = s
        mins[j] = m
    d_block = make_qp_quants(8, 63, scales, Ls, sw)
    m_block = make_qp_quants(8, 63, mins, Lm, sw)
    sc = out[4:16]
    sc[:] = 0
    for j in range(8):
        pack_scale_min_k4(sc, j, min(63, np.int64(Ls[j])), min(63, np.int64(Lm[j])))
    hd, d = fp16_round(d_block)
    hm, dmin = fp16_round(m_block)
    put_f16(out, 0, hd)
    put_f16(out, 2, hm)
    requantize_k4(x, out, sc, d, dmin, L, 31)
    _pack_q5(L, out)


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
                base = 48 + 32 * (j >> 1)
                for l in range(32):
                    qv = ((np.int64(b[base + l]) >> shift) & 0xF) | (((np.int64(b[16 + l]) >> j) & 1) << 4)
                    o[32 * j + l] = dj * np.float32(qv) - mj


def quantize_rows(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 ``(n_rows, n)`` to Q5_K block bytes, uint8 ``(n_rows, n//256*176)``.

    Without ``imatrix``: llama.cpp's ``quantize_row_q5_K_ref`` (make_qkx2_quants per 32, nmax 31,
    weights ``rms + |x|``). With ``imatrix`` (float32 ``(n,)``): ``quantize_row_q5_K_impl``
    (make_qkx3_quants weighted by ``imatrix*sqrt(sigma2 + x**2)``, scales and mins by
    make_qp_quants). Parallel over rows. Raises ValueError if ``n`` is not a multiple of 256 or
    the imatrix length differs from ``n``.
    """
    x, imatrix = check_quantize_args(x, imatrix, "Q5_K")
    out = np.zeros((x.shape[0], x.shape[1] // QK_K * TYPE_SIZE), dtype=np.uint8)
    if imatrix is None:
        _quantize_rows(x, out)
    else:
        _quantize_rows_imatrix(x, imatrix, out)
    return out


def dequantize_rows(q: np.ndarray) -> np.ndarray:
    """Q5_K block bytes uint8 ``(n_rows, nbytes)`` -> float32 ``(n_rows, nbytes//176*256)``.

    Same arithmetic as ggml's ``dequantize_row_q5_K`` (``(d*sc)*q - dmin*m`` in float32).
    """
    q = check_dequantize_args(q, TYPE_SIZE, "Q5_K")
    y = np.empty((q.shape[0], q.shape[1] // TYPE_SIZE * QK_K), dtype=np.float32)
    _dequantize_rows(q, y)
    return y
