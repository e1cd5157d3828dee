"""Q3_K: 3-bit weights with a 6-bit signed scale per 16, in 110-byte super-blocks of 256.

Block layout (ggml's ``block_q3_K``): 32 bytes ``hmask`` (high bit of each weight), 64 bytes
``qs`` (low 2 bits), 12 bytes of packed 6-bit scales, float16 ``d``. Weight ``i`` of sub-block
``j`` is ``d*(scale[j] - 32)*(q - 4)`` with ``q`` in 0..7.

Quantization follows llama.cpp's ggml-quants.c: ``quantize_row_q3_K_ref`` (make_q3_quants)
without an imatrix and ``quantize_row_q3_K_impl`` (make_qx_quants, weighted) with one.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .kquant_search import (
    QK_K, WORK_SIZE, check_dequantize_args, check_quantize_args, fp16_round, get_f16, make_q3_quants,
    make_qx_quants, nearest_int, put_f16,
)

BLOCK_SIZE = 256
TYPE_SIZE = 110
_SC = 96  # offset of the 12 scale bytes


@njit(cache=True, error_model="numpy", inline="always")
def pack_2bit(L, qs):
    """Low 2 bits of 256 levels ``L`` into 64 bytes ``qs`` (ggml's Q2_K/Q3_K layout)."""
    for h in range(2):
        j = 128 * h
        for l in range(32):
            qs[32 * h + l] = ((L[j + l] & 3) | ((L[j + l + 32] & 3) << 2)
                              | ((L[j + l + 64] & 3) << 4) | ((L[j + l + 96] & 3) << 6))


@njit(cache=True, error_model="numpy", inline="always")
def _put_scale(sc, j, l):
    # 6-bit value l (0..63) of sub-block j into the 12 packed bytes
    if j < 8:
        sc[j] = l & 0xF
    else:
        sc[j - 8] |= (l & 0xF) << 4
    sc[j % 4 + 8] |= (l >> 4) << (2 * (j // 4))


@njit(cache=True, error_model="numpy", inline="always")
def _get_scale(sc, j):
    # signed scale (-32..31) of sub-block j
    if j < 8:
        lo = np.int64(sc[j]) & 0xF
    else:
        lo = np.int64(sc[j - 8]) >> 4
    return (lo | (((np.int64(sc[8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32


@njit(cache=True, error_model="numpy", inline="always")
def _finish(x, out, L, d):
    # requantize with the stored scales, then write hmask and qs (shared by _ref and _impl)
    sc = out[_SC:_SC + 12]
    for j in range(16):
        dj = d * np.float32(_get_scale(sc, j))
        if dj == 0:
            continue
        for ii in range(16):
            l = nearest_int(x[16 * j + ii] / dj)
            L[16 * j + ii] = max(-4, min(3, l)) + 4
    # high bit of level j (0..7) -> bit j//32 of hmask[j%32]; pack_2bit keeps the low 2 bits.
    # Branch-free: the level's bits are data-dependent and a branch here mispredicts half the time.
    for m in range(32):
        b = 0
        for k in range(8):
            b |= ((np.int64(L[32 * k + m]) >> 2) & 1) << k
        out[m] = b
    pack_2bit(L, out[32:96])


@njit(cache=True, error_model="numpy")
def _quantize_block_ref(x, out, L, scales):
    # quantize_row_q3_K_ref, one super-block: x float32 (256,), out uint8 (110,)
    max_scale = np.float32(0.0)
    amax = np.float32(0.0)
    for j in range(16):
        s = make_q3_quants(16, 4, x[16 * j:16 * j + 16], L[16 * j:16 * j + 16], True)
        scales[j] = s
        a = abs(s)
        if a > amax:
            amax = a
            max_scale = s
    sc = out[_SC:_SC + 12]
    sc[:] = 0
    if max_scale != 0:
        iscale = np.float32(-32.0) / max_scale
        for j in range(16):
            l = ((nearest_int(iscale * scales[j]) + 128) & 0xFF) - 128  # int8_t l = nearest_int(...)
            l = max(-32, min(31, l)) + 32
            _put_scale(sc, j, l)
        hd, d = fp16_round(np.float32(1.0) / iscale)
    else:
        hd, d = fp16_round(np.float32(0.0))
    put_f16(out, 108, hd)
    _finish(x, out, L, d)


@njit(cache=True, error_model="numpy")
def _quantize_block_impl(x, qw, out, L, scales, weight, sw, Ls, work):
    # quantize_row_q3_K_impl with quant_weights, one super-block
    sumx2 = np.float32(0.0)
    for j in range(QK_K):
        sumx2 += x[j] * x[j]
    sigma2 = np.float32(2.0) * sumx2 / np.float32(QK_K)
    for j in range(16):
        xs = x[16 * j:16 * j + 16]
        for l in range(16):
            weight[l] = qw[16 * j + l] * np.sqrt(sigma2 + xs[l] * xs[l])
        sumw = np.float32(0.0)
        for l in range(16):
            sumw += weight[l]
        sw[j] = sumw
        scales[j] = make_qx_quants(16, 4, xs, L[16 * j:16 * j + 16], 1, weight, work)
    sc = out[_SC:_SC + 12]
    sc[:] = 0
    d_block = make_qx_quants(16, 32, scales, Ls, 1, sw, work)
    for j in range(16):
        _put_scale(sc, j, np.int64(Ls[j]))
    hd, d = fp16_round(d_block)
    put_f16(out, 108, hd)
    _finish(x, out, L, d)


@njit(cache=True, error_model="numpy", parallel=True)
def _quantize_rows(x, out):
    nrows, n = x.shape
    nb = n // QK_K
    for r in prange(nrows):
        L = np.empty(QK_K, np.int8)
        scales = np.empty(16, np.float32)
        for i in range(nb):
            _quantize_block_ref(x[r, i * QK_K:(i + 1) * QK_K], out[r, i * TYPE_SIZE:(i + 1) * TYPE_SIZE], L, scales)


@njit(cache=True, error_model="numpy", parallel=True)
def _quantize_rows_imatrix(x, qw, out):
    nrows, n = x.shape
    nb = n // QK_K
    for r in prange(nrows):
        L = np.empty(QK_K, np.int8)
        scales = np.empty(16, np.float32)
        weight = np.empty(16, np.float32)
        sw = np.empty(16, np.float32)
        Ls = np.empty(16, np.int8)
        work = np.empty(WORK_SIZE, np.float32)
        for i in range(nb):
            _quantize_block_impl(x[r, i * QK_K:(i + 1) * QK_K], qw[i * QK_K:(i + 1) * QK_K],
                                 out[r, i * TYPE_SIZE:(i + 1) * TYPE_SIZE], L, scales, weight, sw, Ls, work)


@njit(cache=True, error_model="numpy", parallel=True)
def _dequantize_rows(q, y):
    nrows = q.shape[0]
    nb = q.shape[1] // TYPE_SIZE
    for r in prange(nrows):
        for i in range(nb):
            b = q[r, i * TYPE_SIZE:(i + 1) * TYPE_SIZE]
            o = y[r, i * QK_K:(i + 1) * QK_K]
            d = get_f16(b, 108)
            sc = b[_SC:_SC + 12]
            for j in range(16):
                # sub-block j covers weights 16j..16j+15: half h, 2-bit shift k, byte offset within 32
                dl = d * np.float32(_get_scale(sc, j))
                for ii in range(16):
                    idx = 16 * j + ii
                    h = idx // 128
                    k = (idx % 128) // 32
                    l = idx % 32
                    low = (np.int64(b[32 + 32 * h + l]) >> (2 * k)) & 3
                    hi = (np.int64(b[l]) >> (idx // 32)) & 1
                    o[idx] = dl * np.float32(low - (0 if hi else 4))


def quantize_rows(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 ``(n_rows, n)`` to Q3_K block bytes, uint8 ``(n_rows, n//256*110)``.

    Without ``imatrix``: llama.cpp's ``quantize_row_q3_K_ref`` (make_q3_quants per 16 with x**2
    weights, 6-bit scales relative to the largest). With ``imatrix`` (float32 ``(n,)``):
    ``quantize_row_q3_K_impl`` (make_qx_quants weighted by ``imatrix*sqrt(sigma2 + x**2)``,
    scales by a second weighted make_qx_quants). Parallel over rows. Raises ValueError if ``n``
    is not a multiple of 256 or the imatrix length differs from ``n``.
    """
    x, imatrix = check_quantize_args(x, imatrix, "Q3_K")
    out = np.zeros((x.shape[0], x.shape[1] // QK_K * TYPE_SIZE), dtype=np.uint8)
    if imatrix is None:
        _quantize_rows(x, out)
    else:
        _quantize_rows_imatrix(x, imatrix, out)
    return out


def dequantize_rows(q: np.ndarray) -> np.ndarray:
    """Q3_K block bytes uint8 ``(n_rows, nbytes)`` -> float32 ``(n_rows, nbytes//110*256)``.

    Same arithmetic as ggml's ``dequantize_row_q3_K`` (``(d*(sc-32))*(q-4)`` in float32).
    """
    q = check_dequantize_args(q, TYPE_SIZE, "Q3_K")
    y = np.empty((q.shape[0], q.shape[1] // TYPE_SIZE * QK_K), dtype=np.float32)
    _dequantize_rows(q, y)
    return y
