"""Dot products for the 5-bit family N5 (Q5_0, Q5_1, Q5_K).

As the N32 family (see nib.py) with a fifth bit per weight kept in one uint32 per row and block
(bit j for weight j, like block_q5_1's ``qh``), OR-ed into the nibble before the integer multiply,
the scheme of ggml_vec_dot_q5_1_q8_1 in ggml-cpu/quants.c.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .repack import G


@njit(cache=True, parallel=True, fastmath=True)
def mm_n5(q, qh, sc, mn, n_rows, nb, xq, xd, xs32, out):
    """out[t, r] = sum_k W[r, k] * x[t, k] for N5 planes ``q`` (u8), ``qh`` (u32), ``sc``/``mn``.

    ``xq`` int8 (T, 32 nb), ``xd``/``xs32`` float32 (T, nb); ``out`` float32 (T, n_rows)."""
    T = xq.shape[0]
    ng = (n_rows + G - 1) // G
    for g in prange(ng):
        acc = np.zeros((T, G), np.float32)
        for b in range(nb):
            base = g * nb + b
            qb = q[base * 16 * G:(base + 1) * 16 * G]
            hb = qh[base * G:(base + 1) * G]
            sb = sc[base * G:(base + 1) * G]
            mb = mn[base * G:(base + 1) * G]
            for t in range(T):
                xb = xq[t, b * 32:b * 32 + 32]
                xdb = xd[t, b]
                xsb = xs32[t, b]
                a = acc[t]
                for r in range(G):
                    h = np.int64(hb[r])
                    s = np.int32(0)
                    for j in range(16):
                        v = np.int32(qb[j * G + r])
                        lo = (v & 15) | (np.int32((h >> j) & 1) << 4)
                        hi = (v >> 4) | (np.int32((h >> (j + 16)) & 1) << 4)
                        s += lo * np.int32(xb[j]) + hi * np.int32(xb[j + 16])
                    a[r] += sb[r] * xdb * np.float32(s) + mb[r] * xsb
        r1 = min(G, n_rows - g * G)
        for t in range(T):
            for r in range(r1):
                out[t, g * G + r] = acc[t, r]
