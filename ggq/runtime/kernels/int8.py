"""Matrix products for the I8 family (Q8_0, IQ4_NL): signed 8-bit codes, an fp16 scale per 32.

A block of ``G`` rows is stored as 8 quads ``[j][G rows][4 bytes]`` (weights ``4j .. 4j + 3`` of
each row, see :mod:`.repack`), so one 32-byte load is the operand of the int8 dot-product
instruction for 8 (AVX-512: 16) rows (:mod:`.simd`), as in :mod:`.nib`. The full-range signed codes use
:func:`.simd.dp4s` (``|w|`` times ``x`` with ``w``'s sign: ggml's ``mul_sum_i8_pairs``). A block
contributes ``sc * xd * sum(q * xq)``, as in ggml_vec_dot_q8_0_q8_0.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .nib import TB, store_tile
from .prefetch import PF_BLOCKS, prefetch_span
from .repack import C_COLS, C_OQ, C_OSC, C_ROWS, G
from .simd import MW as W  # vectors of MW rows (16 with AVX-512 VNNI, else 8)
from .simd import bcast4_m as bcast4
from .simd import at, dp4s, fma_s, iadd, mul_v, store_f, to_f
from .simd import izero_m as izero
from .simd import load_bytes_m as load_bytes
from .simd import load_f_m as load_f
from .simd import load_hf_m as load_hf


@njit(cache=True, parallel=True, fastmath=True)
def mm_i8(i8, u16, o, xq, xd, out):
    """out[t, r] = sum_k W[r, k] * x[t, k] for the I8 matrix described by ``o`` (its row of the
    ``mats`` table: codes in ``i8``, fp16 scales in ``u16``). ``xq`` int8 (T, n_cols), ``xd``
    float32 (T, n_cols / 32); ``out`` float32 (T, n_rows)."""
    oq, osc = o[C_OQ], o[C_OSC]
    n_rows, nb = o[C_ROWS], o[C_COLS] // 32
    T = xq.shape[0]
    K = xq.shape[1]
    ng = (n_rows + G - 1) // G
    for g in prange(ng):
        acc = np.empty((TB, G), np.float32)
        for t0 in range(0, T, TB):
            tn = min(T, t0 + TB) - t0
            acc[:] = 0.0
            for b in range(nb):
                base = g * nb + b
                prefetch_span(i8, oq + (base + PF_BLOCKS) * 32 * G, 32 * G)
                qo = oq + base * 32 * G
                for v in range(0, G, W):
                    s = load_hf(u16, osc + base * G + v)
                    for h in range(2):  # half a block per pass: 4 weight vectors stay in registers
                        q0 = qo + (4 * h * G + v) * 4
                        w0 = load_bytes(i8, q0)
                        w1 = load_bytes(i8, q0 + 4 * G)
                        w2 = load_bytes(i8, q0 + 8 * G)
                        w3 = load_bytes(i8, q0 + 12 * G)
                        for t in range(tn):
                            tt = t0 + t
                            xo = tt * K + b * 32 + 16 * h
                            ia = dp4s(izero(), w0, bcast4(xq, xo))
                            ib = dp4s(izero(), w1, bcast4(xq, xo + 4))
                            ia = dp4s(ia, w2, bcast4(xq, xo + 8))
                            ib = dp4s(ib, w3, bcast4(xq, xo + 12))
                            ao = t * G + v
                            store_f(acc, ao, fma_s(load_f(acc, ao), mul_v(to_f(iadd(ia, ib)), s), at(xd, tt * nb + b)))
            store_tile(acc, out, t0, tn, g, n_rows)
