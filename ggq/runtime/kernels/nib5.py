"""Dot products for the 5-bit family N5 (Q5_0, Q5_1, Q5_K).

The 5-bit codes (0..31) are stored pre-expanded, one int8 per weight, ``G`` rows interleaved
(int8 [g][b][32][G], see repack), with ``w = sc * q + mn`` (f32 per 32). A block contributes
``sc * xd * sum(q * xq) + mn * xs``, the scheme of ggml_vec_dot_q5_1_q8_1 in ggml-cpu/quants.c;
the integer sum is the int8 kernel of int8.py (exact products summed in float32 lanes:
|q * xq| <= 31 * 128, 32 of them far below 2**24). Unpacking the fifth bit in the inner loop ran
at a third of this speed; the expansion costs 1.25 instead of 1.0 bytes per weight in memory.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .prefetch import PF_BLOCKS, prefetch_span
from .repack import G


@njit(cache=True, parallel=True, fastmath=True)
def mm_n5(q, sc, mn, n_rows, nb, xq, xd, xs32, out):
    """out[t, r] = sum_k W[r, k] * x[t, k] for N5 planes ``q`` (int8 codes 0..31 [g][b][32][G]),
    ``sc``/``mn`` (f32 per 32). ``xq`` int8 (T, 32 nb), ``xd``/``xs32`` float32 (T, nb);
    ``out`` float32 (T, n_rows)."""
    T = xq.shape[0]
    ng = (n_rows + G - 1) // G
    for g in prange(ng):
        acc = np.zeros((T, G), np.float32)
        for b in range(nb):
            base = g * nb + b
            prefetch_span(q, (base + PF_BLOCKS) * 32 * G, 32 * G)
            prefetch_span(sc, (base + PF_BLOCKS) * G, G)
            prefetch_span(mn, (base + PF_BLOCKS) * G, G)
            qb = q[base * 32 * G:(base + 1) * 32 * G]
            sb = sc[base * G:(base + 1) * G]
            mb = mn[base * G:(base + 1) * G]
            for t in range(T):
                xb = xq[t, b * 32:b * 32 + 32]
                xdb = xd[t, b]
                xsb = xs32[t, b]
                a = acc[t]
                for r in range(G):
                    s = np.float32(0.0)
                    for j in range(32):
                        s += np.float32(qb[j * G + r]) * np.float32(xb[j])
                    a[r] += sb[r] * xdb * s + mb[r] * xsb
        r1 = min(G, n_rows - g * G)
        for t in range(T):
            for r in range(r1):
                out[t, g * G + r] = acc[t, r]
