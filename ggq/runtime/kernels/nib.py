"""Dot products for the 4-bit nibble families N32 (Q4_0, Q4_1, Q4_K) and N16 (Q2_K, Q3_K).

Weights are ``w = sc * q + mn`` with ``q`` in 0..15 stored two per byte (lo nibble = weight j,
hi nibble = weight j + 16 of a 32-weight block) and ``G`` rows interleaved (see repack). Against an
activation block (int8 ``xq``, scale ``xd``, scaled sum ``xs``) a row's block contributes
``sc * xd * sum(q * xq) + mn * xs``: the integer sum is one vectorized loop over G rows, then one
scale multiply per block, the scheme of ggml_vec_dot_q4_1_q8_1 in ggml-cpu/quants.c.
Products and partial sums stay in int16 (|q * xq| <= 15 * 127, so 16 products fit below 2**15;
``xq`` is in -127..127) and are widened to int32 once per half block: 32 SIMD lanes per
register instead of 16 (1.3x the int32-accumulating loop). Prompt
batches (T > 1) reuse each block of weights (L1-resident) for all T activation rows.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .prefetch import PF_BLOCKS, prefetch_span
from .repack import G


@njit(cache=True, parallel=True, fastmath=True)
def mm_n32(q, sc, mn, n_rows, nb, xq, xd, xs32, out):
    """out[t, r] = sum_k W[r, k] * x[t, k] for N32 planes ``q`` (u8), ``sc``/``mn`` (f32 per 32).

    ``xq`` int8 (T, 32 nb), ``xd``/``xs32`` float32 (T, nb); ``out`` float32 (T, n_rows)."""
    T = xq.shape[0]
    ng = (n_rows + G - 1) // G
    for g in prange(ng):
        acc = np.zeros((T, G), np.float32)
        for b in range(nb):
            base = g * nb + b
            prefetch_span(q, (base + PF_BLOCKS) * 16 * G, 16 * G)
            prefetch_span(sc, (base + PF_BLOCKS) * G, G)
            prefetch_span(mn, (base + PF_BLOCKS) * G, G)
            qb = q[base * 16 * G:(base + 1) * 16 * G]
            sb = sc[base * G:(base + 1) * G]
            mb = mn[base * G:(base + 1) * G]
            for t in range(T):
                xb = xq[t, b * 32:b * 32 + 32]
                xdb = xd[t, b]
                xsb = xs32[t, b]
                a = acc[t]
                for r in range(G):
                    # int16 partial sums: 8 pairs of at most 15 * 127 each stay below 2**15
                    s0 = np.int16(0)
                    s1 = np.int16(0)
                    for j in range(8):
                        v = np.int16(qb[j * G + r])
                        s0 = np.int16(s0 + np.int16((v & np.int16(15)) * np.int16(xb[j]))
                                      + np.int16((v >> np.int16(4)) * np.int16(xb[j + 16])))
                    for j in range(8, 16):
                        v = np.int16(qb[j * G + r])
                        s1 = np.int16(s1 + np.int16((v & np.int16(15)) * np.int16(xb[j]))
                                      + np.int16((v >> np.int16(4)) * np.int16(xb[j + 16])))
                    a[r] += sb[r] * xdb * np.float32(np.int32(s0) + np.int32(s1)) + mb[r] * xsb
        r1 = min(G, n_rows - g * G)
        for t in range(T):
            for r in range(r1):
                out[t, g * G + r] = acc[t, r]


@njit(cache=True, parallel=True, fastmath=True)
def mm_n16(q, sc, mn, n_rows, nb, xq, xd, xs16, out):
    """As :func:`mm_n32` with a scale and offset per 16 weights (sc/mn planes [g][b][2][G])."""
    T = xq.shape[0]
    ng = (n_rows + G - 1) // G
    for g in prange(ng):
        acc = np.zeros((T, G), np.float32)
        for b in range(nb):
            base = g * nb + b
            prefetch_span(q, (base + PF_BLOCKS) * 16 * G, 16 * G)
            prefetch_span(sc, (base + PF_BLOCKS) * 2 * G, 2 * G)
            prefetch_span(mn, (base + PF_BLOCKS) * 2 * G, 2 * G)
            qb = q[base * 16 * G:(base + 1) * 16 * G]
            s0b = sc[2 * base * G:(2 * base + 1) * G]
            s1b = sc[(2 * base + 1) * G:(2 * base + 2) * G]
            m0b = mn[2 * base * G:(2 * base + 1) * G]
            m1b = mn[(2 * base + 1) * G:(2 * base + 2) * G]
            for t in range(T):
                xb = xq[t, b * 32:b * 32 + 32]
                xdb = xd[t, b]
                xs0 = xs16[t, 2 * b]
                xs1 = xs16[t, 2 * b + 1]
                a = acc[t]
                for r in range(G):
                    # int16 sums: 16 products of at most 15 * 127 stay below 2**15
                    s0 = np.int16(0)
                    s1 = np.int16(0)
                    for j in range(16):
                        v = np.int16(qb[j * G + r])
                        s0 = np.int16(s0 + np.int16((v & np.int16(15)) * np.int16(xb[j])))
                        s1 = np.int16(s1 + np.int16((v >> np.int16(4)) * np.int16(xb[j + 16])))
                    a[r] += xdb * (s0b[r] * np.float32(s0) + s1b[r] * np.float32(s1)) + m0b[r] * xs0 + m1b[r] * xs1
        r1 = min(G, n_rows - g * G)
        for t in range(T):
            for r in range(r1):
                out[t, g * G + r] = acc[t, r]
