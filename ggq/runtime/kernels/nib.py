"""Matrix products for the nibble families: N4 (Q4_0, Q4_1, Q4_K, Q2_K, Q3_K), N5 (Q5_0, Q5_1,
Q5_K: nibbles plus a plane of fifth bits) and N6 (Q6_K: nibbles plus 2-bit highs).

A block of ``G`` rows is stored as 4 quads ``[j][G rows][4 bytes]``: byte ``i`` of row ``r`` in
quad ``j`` holds weights ``4j + i`` (lo nibble) and ``4j + i + 16`` (hi nibble) (see
:mod:`.repack`). One 32-byte (64-byte) load is 4 weights of each of 8 (16) rows; the high bits, where the type has
them, are ORed in above the nibble (``vpsrld``/``vpand``/``vpor``), and the codes (at most 63) go
into the int8 dot-product instructions (:func:`.simd.dp8x` and kin: ``vpdpbusd``, or ``vpmaddubsw`` +
``vpmaddwd``) with the 4 matching activation bytes broadcast to every lane; the layout of
llama.cpp's repacked GEMV kernels (block_q4_0x8 in ggml-cpu/repack.cpp), a 32-weight block per step.

A row's block contributes ``sc * xd * sum(q * xq) + mn * xs`` per scale group (16 or 32 weights):
integer dot product, then one scale multiply (the scheme of ggml_vec_dot_q4_1_q8_1). The scales
are rebuilt per block from the file's fields (:data:`.repack.LAYOUT`: fp16, or a K-quant's
sub-block scale times the super-block's fp16 ``d``), so the weights take the file's bytes. The
products of a block are summed in four independent int32 chains (a ``vpdpbusd`` chain is latency
bound). The vectors are :data:`.simd.MW` rows wide: 16 (``zmm``) where the CPU has AVX-512 VNNI,
else 8. Decode (T = 1) and prompt batches run the same loop: for a batch every weight vector is
decoded once and reused for up to ``TB`` tokens, whose float accumulators stay in L1.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .prefetch import PF_BLOCKS, prefetch_span
from .repack import (C_COLS, C_FAM, C_GS, C_KIND, C_MOFF, C_OD, C_ODM, C_OMN, C_OQ, C_OQH, C_OSC, C_ROWS, FAM_N5,
                     FAM_N6, G, SK_F16, SK_K)
from .simd import MW as W  # vectors of MW rows (16 with AVX-512 VNNI, else 8)
from .simd import bcast4_m as bcast4
from .simd import at, dp2x, dp4x, dp8x, field, fma_s, fneg, iadd, ior, mul_s, mul_v, nib_hi, nib_lo, store_f, to_f
from .simd import izero_m as izero
from .simd import load_bytes_m as load_bytes
from .simd import load_f_m as load_f
from .simd import load_hf_m as load_hf
from .simd import load_s8f_m as load_s8f
from .simd import load_u8f_m as load_u8f

#: tokens whose accumulators are kept while a group's weights are streamed once
TB = 64

_M1 = 0x01010101
_M2 = 0x03030303


@njit(cache=True, inline="always")
def store_tile(acc, out, t0, tn, g, n_rows):
    """out[t0 + t, rows of group g] = acc[t, :] for the ``tn`` tokens of a tile (the group's real
    rows only: a last, partial group has padding rows)."""
    r1 = min(G, n_rows - g * G)
    for t in range(tn):
        for r in range(r1):
            out[t0 + t, g * G + r] = acc[t, r]


#: the code widths of :func:`_tokens` (compile-time constants of its inlined copies)
_DP_N4, _DP_N5, _DP_16, _DP_N6 = range(4)


@njit(cache=True, fastmath=True, inline="always")
def _tokens(mode, xq, xd, xs16, xs32, acc, t0, tn, K, nb, b, ao, l0, h0, l1, h1, l2, h2, l3, h3, s0, s1, m0, m1):
    """acc[t, ao:ao + W] += the block ``b`` of one vector of rows (codes l0..h3: lo nibbles are
    weights 0..15, hi 16..31; scales s0/s1 and offsets m0/m1 of the first/second 16 weights) times
    tokens t0 .. t0 + tn of the quantized activations. ``mode`` (a constant at each call, so the
    inlined copy has no branch per token): _DP_N4 4-bit codes summed as one group of 32, _DP_N5
    5-bit codes, _DP_16 groups of 16 (Q2_K, Q3_K), _DP_N6 6-bit codes in groups of 16 (Q6_K);
    the code width bounds AVX2's int16 partial sums (:func:`.simd.dp8x`)."""
    for t in range(tn):
        tt = t0 + t
        xo = tt * K + b * 32
        x0, x1, x2, x3 = bcast4(xq, xo), bcast4(xq, xo + 4), bcast4(xq, xo + 8), bcast4(xq, xo + 12)
        x4, x5 = bcast4(xq, xo + 16), bcast4(xq, xo + 20)
        x6, x7 = bcast4(xq, xo + 24), bcast4(xq, xo + 28)
        xdt = at(xd, tt * nb + b)
        a = load_f(acc, t * G + ao)
        if mode == _DP_N6:
            ilo = iadd(dp2x(l0, x0, l1, x1), dp2x(l2, x2, l3, x3))
            ihi = iadd(dp2x(h0, x4, h1, x5), dp2x(h2, x6, h3, x7))
        elif mode == _DP_N4:
            ilo = dp8x(l0, x0, l1, x1, l2, x2, l3, x3, h0, x4, h1, x5, h2, x6, h3, x7)
            ihi = izero()
        else:
            ilo = dp4x(l0, x0, l1, x1, l2, x2, l3, x3)
            ihi = dp4x(h0, x4, h1, x5, h2, x6, h3, x7)
        if mode == _DP_N6 or mode == _DP_16:  # lo nibbles: the block's first 16 weights, hi: the second 16
            a = fma_s(a, mul_v(to_f(ilo), s0), xdt)
            a = fma_s(a, mul_v(to_f(ihi), s1), xdt)
            a = fma_s(a, m0, at(xs16, tt * 2 * nb + 2 * b))
            a = fma_s(a, m1, at(xs16, tt * 2 * nb + 2 * b + 1))
        else:
            a = fma_s(a, mul_v(to_f(iadd(ilo, ihi)), s0), xdt)
            a = fma_s(a, m0, at(xs32, tt * nb + b))
        store_f(acc, t * G + ao, a)


@njit(cache=True, parallel=True, fastmath=True)
def mm_nib(u8, u16, o, xq, xd, xs16, xs32, out):
    """out[t, r] = sum_k W[r, k] * x[t, k] for the nibble-family matrix described by ``o`` (its
    row of the ``mats`` table: planes in the ``u8``/``u16`` arenas). ``xq`` int8 (T, n_cols),
    ``xd``/``xs32`` float32 (T, n_cols / 32), ``xs16`` (T, n_cols / 16) from
    :func:`.act.quantize_act`; ``out`` float32 (T, n_rows)."""
    fam, kind, per16, moff = o[C_FAM], o[C_KIND], o[C_GS] == 16, np.float32(o[C_MOFF])
    oq, oqh, osc, omn, od, odm = o[C_OQ], o[C_OQH], o[C_OSC], o[C_OMN], o[C_OD], o[C_ODM]
    n_rows, nb = o[C_ROWS], o[C_COLS] // 32
    k = 2 if per16 else 1
    nsb = nb // 8
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
                prefetch_span(u8, oq + (base + PF_BLOCKS) * 16 * G, 16 * G)
                if oqh >= 0:
                    prefetch_span(u8, oqh + (base + PF_BLOCKS) * 4 * (fam - FAM_N5 + 1) * G, 4 * (fam - FAM_N5 + 1) * G)
                sb = (g * nsb + b // 8) * G
                for v in range(0, G, W):
                    si = base * k * G + v
                    if kind == SK_F16:
                        s0 = load_hf(u16, osc + si)
                        m0 = load_hf(u16, omn + si) if omn >= 0 else mul_s(s0, moff)
                        s1 = s0
                        m1 = m0
                    elif kind == SK_K:
                        dd = load_hf(u16, od + sb + v)
                        dm = load_hf(u16, odm + sb + v)
                        s0 = mul_v(dd, load_u8f(u8, osc + si))
                        m0 = fneg(mul_v(dm, load_u8f(u8, omn + si)))
                        if per16:
                            s1 = mul_v(dd, load_u8f(u8, osc + si + G))
                            m1 = fneg(mul_v(dm, load_u8f(u8, omn + si + G)))
                        else:
                            s1 = s0
                            m1 = m0
                    else:  # SK_K6: int8 scales per 16, mn = moff * sc
                        dd = load_hf(u16, od + sb + v)
                        s0 = mul_v(dd, load_s8f(u8, osc + si))
                        s1 = mul_v(dd, load_s8f(u8, osc + si + G))
                        m0 = mul_s(s0, moff)
                        m1 = mul_s(s1, moff)
                    qo = oq + base * 16 * G + v * 4
                    w0 = load_bytes(u8, qo)
                    w1 = load_bytes(u8, qo + 4 * G)
                    w2 = load_bytes(u8, qo + 8 * G)
                    w3 = load_bytes(u8, qo + 12 * G)
                    l0, h0, l1, h1 = nib_lo(w0), nib_hi(w0), nib_lo(w1), nib_hi(w1)
                    l2, h2, l3, h3 = nib_lo(w2), nib_hi(w2), nib_lo(w3), nib_hi(w3)
                    if fam == FAM_N5:  # bit 2j + h: the fifth bit of quad j's lo (h = 0) / hi weight
                        hv = load_bytes(u8, oqh + (base * G + v) * 4)
                        l0, h0 = ior(l0, field(hv, 0, _M1, 4)), ior(h0, field(hv, 1, _M1, 4))
                        l1, h1 = ior(l1, field(hv, 2, _M1, 4)), ior(h1, field(hv, 3, _M1, 4))
                        l2, h2 = ior(l2, field(hv, 4, _M1, 4)), ior(h2, field(hv, 5, _M1, 4))
                        l3, h3 = ior(l3, field(hv, 6, _M1, 4)), ior(h3, field(hv, 7, _M1, 4))
                    elif fam == FAM_N6:  # 2-bit fields: quads 2m lo, 2m hi, 2m+1 lo, 2m+1 hi of plane m
                        ha = load_bytes(u8, oqh + (2 * base * G + v) * 4)
                        hb = load_bytes(u8, oqh + ((2 * base + 1) * G + v) * 4)
                        l0, h0 = ior(l0, field(ha, 0, _M2, 4)), ior(h0, field(ha, 2, _M2, 4))
                        l1, h1 = ior(l1, field(ha, 4, _M2, 4)), ior(h1, field(ha, 6, _M2, 4))
                        l2, h2 = ior(l2, field(hb, 0, _M2, 4)), ior(h2, field(hb, 2, _M2, 4))
                        l3, h3 = ior(l3, field(hb, 4, _M2, 4)), ior(h3, field(hb, 6, _M2, 4))
                    ao = v
                    if fam == FAM_N6:  # loops unswitched by code form: no branch per token
                        _tokens(_DP_N6, xq, xd, xs16, xs32, acc, t0, tn, K, nb, b, ao,
                                l0, h0, l1, h1, l2, h2, l3, h3, s0, s1, m0, m1)
                    elif per16:
                        _tokens(_DP_16, xq, xd, xs16, xs32, acc, t0, tn, K, nb, b, ao,
                                l0, h0, l1, h1, l2, h2, l3, h3, s0, s1, m0, m1)
                    elif fam == FAM_N5:
                        _tokens(_DP_N5, xq, xd, xs16, xs32, acc, t0, tn, K, nb, b, ao,
                                l0, h0, l1, h1, l2, h2, l3, h3, s0, s1, m0, m1)
                    else:
                        _tokens(_DP_N4, xq, xd, xs16, xs32, acc, t0, tn, K, nb, b, ao,
                                l0, h0, l1, h1, l2, h2, l3, h3, s0, s1, m0, m1)
            store_tile(acc, out, t0, tn, g, n_rows)
