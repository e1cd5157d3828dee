"""Dot products for the 5-bit family N5 (Q5_0, Q5_1, Q5_K).

As the N32 family (see nib.py) with the fifth bits in a second byte plane (byte j: weights j, j+8, j+16,
j+24, so every shift is a constant), OR-ed into the nibble before the integer multiply,
the scheme of ggml_vec_dot_q5_1_q8_1 in ggml-cpu/quants.c. Pair products in int16
(31 * 128 * 2 < 32768), block sums in int32.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .repack import G


@njit(cache=True, parallel=True, fastmath=True)
def mm_n5(q, qh, sc, mn, n_rows, nb, xq, xd, xs32, out):
    """out[t, r] = sum_k W[r, k] * x[t, k] for N5 planes ``q`` (u8 nibbles), ``qh`` (u8 [8] high
    bits), ``sc``/``mn`` (f32 per 32). ``xq`` int8 (T, 32 nb), ``xd``/``xs32`` float32 (T, nb)."""
    T = xq.shape[0]
    ng = (n_rows + G - 1) // G
    for g in prange(ng):
        acc = np.zeros((T, G), np.float32)
        for b in range(nb):
            base = g * nb + b
            qb = q[base * 16 * G:(base + 1) * 16 * G]
            hb = qh[base * 8 * G:(base + 1) * 8 * G]
            sb = sc[base * G:(base + 1) * G]
            mb = mn[base * G:(base + 1) * G]
            for t in range(T):
                xb = xq[t, b * 32:b * 32 + 32]
                xdb = xd[t, b]
                xsb = xs32[t, b]
                a = acc[t]
                for r in range(G):
                    s = np.int32(0)
                    for j in range(8):
                        h = np.int16(hb[j * G + r])
                        v = np.int16(qb[j * G + r])
                        lo = (v & np.int16(15)) | ((h & np.int16(1)) << np.int16(4))
                        hi = (v >> np.int16(4)) | ((h & np.int16(4)) << np.int16(2))
                        s += np.int32(lo * np.int16(xb[j]) + hi * np.int16(xb[j + 16]))
                        v = np.int16(qb[(j + 8) * G + r])
                        lo = (v & np.int16(15)) | ((h & np.int16(2)) << np.int16(3))
                        hi = (v >> np.int16(4)) | ((h & np.int16(8)) << np.int16(1))
                        s += np.int32(lo * np.int16(xb[j + 8]) + hi * np.int16(xb[j + 24]))
                    a[r] += sb[r] * xdb * np.float32(s) + mb[r] * xsb
        r1 = min(G, n_rows - g * G)
        for t in range(T):
            for r in range(r1):
                out[t, g * G + r] = acc[t, r]
