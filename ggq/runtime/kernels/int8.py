"""Dot products for the 8-bit families I8_32 (Q8_0, IQ4_NL) and I8_16 (Q6_K).

Weights are int8 codes times a float scale per 32 (I8_32) or per 16 (I8_16) weights, ``G`` rows
interleaved (see repack). A block contributes ``sc * xd * sum(q * xq)``: integer products, one
scale multiply per block, as ggml_vec_dot_q8_0_q8_0 and ggml_vec_dot_q6_K_q8_K do. The
integer products are summed in float32 lanes, which is exact here (|w * xq| <= 128 * 127, 32 of
them stay far below 2**24) and vectorizes better than int16/int32 arithmetic (~1.7x).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .prefetch import PF_BLOCKS, prefetch_span
from .repack import G


@njit(cache=True, parallel=True, fastmath=True)
def mm_i8_32(q, sc, n_rows, nb, xq, xd, out):
    """out[t, r] = sum_k W[r, k] * x[t, k] for I8_32 planes ``q`` (int8 [g][b][32][G]), ``sc``.

    ``xq`` int8 (T, 32 nb), ``xd`` float32 (T, nb); ``out`` float32 (T, n_rows)."""
    T = xq.shape[0]
    ng = (n_rows + G - 1) // G
    for g in prange(ng):
        acc = np.zeros((T, G), np.float32)
        for b in range(nb):
            base = g * nb + b
            prefetch_span(q, (base + PF_BLOCKS) * 32 * G, 32 * G)
            prefetch_span(sc, (base + PF_BLOCKS) * G, G)
            qb = q[base * 32 * G:(base + 1) * 32 * G]
            sb = sc[base * G:(base + 1) * G]
            for t in range(T):
                xb = xq[t, b * 32:b * 32 + 32]
                xdb = xd[t, b]
                a = acc[t]
                for r in range(G):
                    s = np.float32(0.0)
                    for j in range(32):
                        s += np.float32(qb[j * G + r]) * np.float32(xb[j])
                    a[r] += sb[r] * xdb * s
        r1 = min(G, n_rows - g * G)
        for t in range(T):
            for r in range(r1):
                out[t, g * G + r] = acc[t, r]


@njit(cache=True, parallel=True, fastmath=True)
def mm_i8_16(q, sc, n_rows, nb, xq, xd, out):
    """As :func:`mm_i8_32` with a scale per 16 weights (sc plane [g][b][2][G])."""
    T = xq.shape[0]
    ng = (n_rows + G - 1) // G
    for g in prange(ng):
        acc = np.zeros((T, G), np.float32)
        for b in range(nb):
            base = g * nb + b
            prefetch_span(q, (base + PF_BLOCKS) * 32 * G, 32 * G)
            prefetch_span(sc, (base + PF_BLOCKS) * 2 * G, 2 * G)
            qb = q[base * 32 * G:(base + 1) * 32 * G]
            s0b = sc[2 * base * G:(2 * base + 1) * G]
            s1b = sc[(2 * base + 1) * G:(2 * base + 2) * G]
            for t in range(T):
                xb = xq[t, b * 32:b * 32 + 32]
                xdb = xd[t, b]
                a = acc[t]
                for r in range(G):
                    s0 = np.float32(0.0)
                    s1 = np.float32(0.0)
                    for j in range(16):
                        s0 += np.float32(qb[j * G + r]) * np.float32(xb[j])
                        s1 += np.float32(qb[(j + 16) * G + r]) * np.float32(xb[j + 16])
                    a[r] += xdb * (s0b[r] * s0 + s1b[r] * s1)
        r1 = min(G, n_rows - g * G)
        for t in range(T):
            for r in range(r1):
                out[t, g * G + r] = acc[t, r]
