"""Q6_K: 6-bit weights with an 8-bit scale per 16, in 210-byte super-blocks of 256.

Block layout (ggml's ``block_q6_K``): 128 bytes of low nibbles ``ql``, 64 bytes of high 2-bit
pairs ``qh``, 16 int8 sub-block scales, float16 ``d``. Weight ``i`` of sub-block ``j`` is
``d*scale[j]*(q - 32)`` with ``q`` in 0..63.

Quantization follows llama.cpp's ggml-quants.c: ``quantize_row_q6_K_ref`` without an imatrix and
``quantize_row_q6_K_impl`` with one (make_qx_quants weighted by the imatrix directly).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .kquant_search import (
    GROUP_MAX_EPS, QK_K, WORK_SIZE, check_dequantize_args, check_quantize_args, fp16_round, get_f16,
    make_qx_quants, nearest_int, put_f16,
)

BLOCK_SIZE = 256
TYPE_SIZE = 210


@njit(cache=True, error_model="numpy")
def _quantize_block(x, qw, out, L, scales, work):
    # quantize_row_q6_K_ref (qw is None) / quantize_row_q6_K_impl, one super-block
    max_scale = np.float32(0.0)
    max_abs_scale = np.float32(0.0)
    for ib in range(16):
        if qw is None:
            s = make_qx_quants(16, 32, x[16 * ib:16 * ib + 16], L[16 * ib:16 * ib + 16], 1, None, work)
        else:
            s = make_qx_quants(16, 32, x[16 * ib:16 * ib + 16], L[16 * ib:16 * ib + 16], 1, qw[16 * ib:16 * ib + 16], work)
        scales[ib] = s
        a = abs(s)
        if a > max_abs_scale:
            max_abs_scale = a
            max_scale = s
    out[:] = 0
    if max_abs_scale < GROUP_MAX_EPS:
        return
    iscale = np.float32(-128.0) / max_scale
    hd, d = fp16_round(np.float32(1.0) / iscale)
    put_f16(out, 208, hd)
    for ib in range(16):
        v = min(127, nearest_int(iscale * scales[ib]))
        out[192 + ib] = v & 0xFF  # int8 stored as its byte
    for j in range(16):
        s8 = np.int64(out[192 + j])
        if s8 > 127:
            s8 -= 256
        dj = d * np.float32(s8)
        if dj == 0:
            continue
        for ii in range(16):
            l = nearest_int(x[16 * j + ii] / dj)
            L[16 * j + ii] = max(-32, min(31, l)) + 32
    for h in range(2):
        j = 128 * h
        for l in range(32):
            q1 = L[j + l] & 0xF
            q2 = L[j + l + 32] & 0xF
            q3 = L[j + l + 64] & 0xF
            q4 = L[j + l + 96] & 0xF
            out[64 * h + l] = q1 | (q3 << 4)
            out[64 * h + l + 32] = q2 | (q4 << 4)
            out[128 + 32 * h + l] = ((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2)
                                     | ((L[j + l + 64] >> 4) << 4) | ((L[j + l + 96] >> 4) << 6))


@njit(cache=True, error_model="numpy", parallel=True)
def _quantize_rows(x, qw, out):
    nrows, n = x.shape
    nb = n // QK_K
    for r in prange(nrows):
        L = np.empty(QK_K, np.int8)
        scales = np.empty(16, np.float32)
        work = np.empty(WORK_SIZE, np.float32)
        for i in range(nb):
            if qw is None:
                _quantize_block(x[r, i * QK_K:(i + 1) * QK_K], None, out[r, i * TYPE_SIZE:(i + 1) * TYPE_SIZE], L, scales, work)
            else:
                _quantize_block(x[r, i * QK_K:(i + 1) * QK_K], qw[i * QK_K:(i + 1) * QK_K],
                                out[r, i * TYPE_SIZE:(i + 1) * TYPE_SIZE], L, scales, work)


@njit(cache=True, error_model="numpy", parallel=True)
def _dequantize_rows(q, y):
    nrows = q.shape[0]
    nb = q.shape[1] // TYPE_SIZE
    for r in prange(nrows):
        for i in range(nb):
            b = q[r, i * TYPE_SIZE:(i + 1) * TYPE_SIZE]
            o = y[r, i * QK_K:(i + 1) * QK_K]
            d = get_f16(b, 208)
            for h in range(2):
                for l in range(32):
                    qh = np.int64(b[128 + 32 * h + l])
                    ql0 = np.int64(b[64 * h + l])
                    ql1 = np.int64(b[64 * h + l + 32])
                    qv = ((ql0 & 0xF) | (((qh >> 0) & 3) << 4),
                          (ql1 & 0xF) | (((qh >> 2) & 3) << 4),
                          (ql0 >> 4) | (((qh >> 4) & 3) << 4),
                          (ql1 >> 4) | (((qh >> 6) & 3) << 4))
                    for k in range(4):
                        ib = 8 * h + 2 * k + l // 16
                        s8 = np.int64(b[192 + ib])
                        if s8 > 127:
                            s8 -= 256
                        o[128 * h + 32 * k + l] = (d * np.float32(s8)) * np.float32(qv[k] - 32)


def quantize_rows(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 ``(n_rows, n)`` to Q6_K block bytes, uint8 ``(n_rows, n//256*210)``.

    Without ``imatrix``: llama.cpp's ``quantize_row_q6_K_ref`` (make_qx_quants per 16 with x**2
    weights, int8 scales relative to the largest). With ``imatrix`` (float32 ``(n,)``):
    ``quantize_row_q6_K_impl`` (the same search weighted by the imatrix). Parallel over rows.
    Raises ValueError if ``n`` is not a multiple of 256 or the imatrix length differs from ``n``.
    """
    x, imatrix = check_quantize_args(x, imatrix, "Q6_K")
    out = np.zeros((x.shape[0], x.shape[1] // QK_K * TYPE_SIZE), dtype=np.uint8)
    _quantize_rows(x, imatrix, out)
    return out


def dequantize_rows(q: np.ndarray) -> np.ndarray:
    """Q6_K block bytes uint8 ``(n_rows, nbytes)`` -> float32 ``(n_rows, nbytes//210*256)``.

    Same arithmetic as ggml's ``dequantize_row_q6_K`` (``(d*scale)*(q-32)`` in float32).
    """
    q = check_dequantize_args(q, TYPE_SIZE, "Q6_K")
    y = np.empty((q.shape[0], q.shape[1] // TYPE_SIZE * QK_K), dtype=np.float32)
    _dequantize_rows(q, y)
    return y
