"""Q2_K: 2-bit weights with a 4-bit scale and min per 16, in 84-byte super-blocks of 256.

Block layout (ggml's ``block_q2_K``): 16 bytes of scales (low nibble) and mins (high nibble),
64 bytes ``qs`` (2 bits per weight), float16 ``d``, float16 ``dmin``. Weight ``i`` of
sub-block ``j`` is ``d*sc[j]*q - dmin*m[j]`` with ``q`` in 0..3.

Quantization follows llama.cpp's ggml-quants.c: ``quantize_row_q2_K_ref`` without an imatrix and
``quantize_row_q2_K_impl`` with one.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .kquant_search import (
    QK_K, WORK_SIZE, check_dequantize_args, check_quantize_args, fp16_round, get_f16, make_qkx2_quants,
    make_qkx3_quants, make_qp_quants, nearest_int, put_f16,
)
from .q3_k import pack_2bit

BLOCK_SIZE = 256
TYPE_SIZE = 84


@njit(cache=True, error_model="numpy", inline="always")
def _finish(x, out, L, d, dmin):
    # requantize with the stored scales and mins, then pack qs (shared by _ref and _impl)
    for j in range(16):
        s = np.int64(out[j])
        dj = d * np.float32(s & 0xF)
        if dj == 0:
            continue
        dm = dmin * np.float32(s >> 4)
        for ii in range(16):
            l = nearest_int((x[16 * j + ii] + dm) / dj)
            L[16 * j + ii] = max(0, min(3, l))
    pack_2bit(L, out[16:80])


@njit(cache=True, error_model="numpy")
def _quantize_block_ref(x, out, L, work, weights, scales, mins):
    # quantize_row_q2_K_ref, one super-block: x float32 (256,), out uint8 (84,)
    q4scale = np.float32(15.0)
    max_scale = np.float32(0.0)
    max_min = np.float32(0.0)
    for j in range(16):
        xs = x[16 * j:16 * j + 16]
        for l in range(16):
            weights[l] = abs(xs[l])
        s, m = make_qkx2_quants(16, 3, xs, weights, L[16 * j:16 * j + 16],
                                np.float32(-0.5), np.float32(0.1), 15, True, work)
        scales[j] = s
        mins[j] = m
        if s > max_scale:
            max_scale = s
        if m > max_min:
            max_min = m
    if max_scale > 0:
        iscale = q4scale / max_scale
        for j in range(16):
            out[j] = nearest_int(iscale * scales[j]) & 0xFF
        hd, d = fp16_round(max_scale / q4scale)
    else:
        for j in range(16):
            out[j] = 0
        hd, d = fp16_round(np.float32(0.0))
    if max_min > 0:
        iscale = q4scale / max_min
        for j in range(16):
            l = nearest_int(iscale * mins[j])
            out[j] = (np.int64(out[j]) | (l << 4)) & 0xFF
        hm, dmin = fp16_round(max_min / q4scale)
    else:
        hm, dmin = fp16_round(np.float32(0.0))
    put_f16(out, 80, hd)
    put_f16(out, 82, hm)
    _finish(x, out, L, d, dmin)


@njit(cache=True, error_model="numpy")
def _quantize_block_impl(x, qw, out, L, work, weight, scales, mins, sw, Ls, Lm):
    # quantize_row_q2_K_impl with quant_weights, one super-block
    sumx2 = np.float32(0.0)
    for j in range(QK_K):
        sumx2 += x[j] * x[j]
    sigma2 = sumx2 / np.float32(QK_K)
    for j in range(16):
        xs = x[16 * j:16 * j + 16]
        for l in range(16):
            weight[l] = qw[16 * j + l] * np.sqrt(sigma2 + xs[l] * xs[l])
        sumw = np.float32(0.0)
        for l in range(16):
            sumw += weight[l]
        sw[j] = sumw
        s, m = make_qkx3_quants(16, 3, xs, weight, L[16 * j:16 * j + 16],
                                np.float32(-0.9), np.float32(0.05), 36, False, work)
        scales[j] = s
        mins[j] = m
    dm = make_qp_quants(16, 15, scales, Ls, sw)
    mm = make_qp_quants(16, 15, mins, Lm, sw)
    hd, d = fp16_round(dm)
    hm, dmin = fp16_round(mm)
    put_f16(out, 80, hd)
    put_f16(out, 82, hm)
    for j in range(16):
        out[j] = (np.int64(Ls[j]) | (np.int64(Lm[j]) << 4)) & 0xFF
    _finish(x, out, L, d, dmin)


@njit(cache=True, error_model="numpy", parallel=True)
def _quantize_rows(x, out):
    nrows, n = x.shape
    nb = n // QK_K
    for r in prange(nrows):
        L = np.empty(QK_K, np.uint8)
        work = np.empty(WORK_SIZE, np.float32)
        weights = np.empty(16, np.float32)
        scales = np.empty(16, np.float32)
        mins = np.empty(16, np.float32)
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
        weight = np.empty(16, np.float32)
        scales = np.empty(16, np.float32)
        mins = np.empty(16, np.float32)
        sw = np.empty(16, np.float32)
        Ls = np.empty(16, np.uint8)
        Lm = np.empty(16, np.uint8)
        for i in range(nb):
            _quantize_block_impl(x[r, i * QK_K:(i + 1) * QK_K], qw[i * QK_K:(i + 1) * QK_K],
                                 out[r, i * TYPE_SIZE:(i + 1) * TYPE_SIZE], L, work, weight, scales, mins, sw, Ls, Lm)


@njit(cache=True, error_model="numpy", parallel=True)
def _dequantize_rows(q, y):
    nrows = q.shape[0]
    nb = q.shape[1] // TYPE_SIZE
    for r in prange(nrows):
        for i in range(nb):
            b = q[r, i * TYPE_SIZE:(i + 1) * TYPE_SIZE]
            o = y[r, i * QK_K:(i + 1) * QK_K]
            d = get_f16(b, 80)
            dmin = get_f16(b, 82)
            for j in range(16):
                s = np.int64(b[j])
                dl = d * np.float32(s & 0xF)
                ml = dmin * np.float32(s >> 4)
                for ii in range(16):
                    idx = 16 * j + ii
                    h = idx // 128
                    k = (idx % 128) // 32
                    l = idx % 32
                    qv = (np.int64(b[16 + 32 * h + l]) >> (2 * k)) & 3
                    o[idx] = dl * np.float32(qv) - ml


def quantize_rows(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 ``(n_rows, n)`` to Q2_K block bytes, uint8 ``(n_rows, n//256*84)``.

    Without ``imatrix``: llama.cpp's ``quantize_row_q2_K_ref`` (make_qkx2_quants per 16 with
    ``|x|`` weights and absolute error, 4-bit scales and mins relative to the largest). With
    ``imatrix`` (float32 ``(n,)``): ``quantize_row_q2_K_impl`` (make_qkx3_quants weighted by
    ``imatrix*sqrt(sigma2 + x**2)``, scales and mins by make_qp_quants). Parallel over rows.
    Raises ValueError if ``n`` is not a multiple of 256 or the imatrix length differs from ``n``.
    """
    x, imatrix = check_quantize_args(x, imatrix, "Q2_K")
    out = np.zeros((x.shape[0], x.shape[1] // QK_K * TYPE_SIZE), dtype=np.uint8)
    if imatrix is None:
        _quantize_rows(x, out)
    else:
        _quantize_rows_imatrix(x, imatrix, out)
    return out


def dequantize_rows(q: np.ndarray) -> np.ndarray:
    """Q2_K block bytes uint8 ``(n_rows, nbytes)`` -> float32 ``(n_rows, nbytes//84*256)``.

    Same arithmetic as ggml's ``dequantize_row_q2_K`` (``(d*sc)*q - dmin*m`` in float32).
    """
    q = check_dequantize_args(q, TYPE_SIZE, "Q2_K")
    y = np.empty((q.shape[0], q.shape[1] // TYPE_SIZE * QK_K), dtype=np.float32)
    _dequantize_rows(q, y)
    return y
