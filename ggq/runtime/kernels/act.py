"""Activation quantization: float32 rows -> 8-bit codes with a scale per 32 and sums per 16/32.

The format is Q8_1-like (llama.cpp's block_q8_1 stores d and s = d * sum(q) per 32 values): for
every 32 values ``d = amax / 127``, ``q = round(x / d)`` (round half to even, like the AVX path of
quantize_row_q8_0 in ggml-cpu/arch/x86/quants.c), plus ``d * sum(q)`` over each half (16 values,
what the K-quants with 16-weight groups need, as Q8_K's ``bsums`` do) and over the whole block.
One format serves every weight family: the weight offsets ``mn`` multiply these sums, the scales
multiply the integer dot products. As in llama.cpp's quantize_row_q8_1, the multiplier is
``127 / amax`` and ``d`` and the block sum are rounded to fp16, so the codes match llama.cpp's. (llama.cpp uses one scale per 256 values, Q8_K, for the
K-quants; a scale per 32 is slightly more accurate.)
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .floats import f16_to_f32, f32_to_f16
from .simd import fabs_v, fmax_v, hmax, hsum_i, iadd, load_f, mul_s, rint_i, store_i8


@njit(cache=True, inline="always")
def round_f16(v):
    """Round float32 ``v`` to the nearest fp16 value (ties to even; beyond 65504: inf), returned as
    float32: GGML_FP32_TO_FP16 then back, through the conversion instructions where the CPU has
    them (:func:`.floats.f32_to_f16`)."""
    return f16_to_f32(f32_to_f16(np.float32(v)))


@njit(cache=True, inline="always")
def _quantize_row(x, xq, xd, xs16, xs32):
    """One row: each block of 32 as four 8-lane vectors (``amax`` by vector max, codes by
    ``vroundps`` + ``vcvttps2dq``, as ggml's AVX quantize_row_q8_1); the same codes, scales and sums
    as the scalar formulas in the module docstring."""
    nb = x.shape[0] // 32
    for b in range(nb):
        o = b * 32
        v0, v1, v2, v3 = load_f(x, o), load_f(x, o + 8), load_f(x, o + 16), load_f(x, o + 24)
        amax = hmax(fmax_v(fmax_v(fabs_v(v0), fabs_v(v1)), fmax_v(fabs_v(v2), fabs_v(v3))))
        d = amax / np.float32(127.0)
        idv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
        q0, q1 = rint_i(mul_s(v0, idv)), rint_i(mul_s(v1, idv))
        q2, q3 = rint_i(mul_s(v2, idv)), rint_i(mul_s(v3, idv))
        store_i8(xq, o, q0)
        store_i8(xq, o + 8, q1)
        store_i8(xq, o + 16, q2)
        store_i8(xq, o + 24, q3)
        s0 = hsum_i(iadd(q0, q1))
        s1 = hsum_i(iadd(q2, q3))
        dh = round_f16(d)
        xd[b] = dh
        xs16[2 * b] = dh * np.float32(s0)
        xs16[2 * b + 1] = dh * np.float32(s1)
        xs32[b] = round_f16(d * np.float32(s0 + s1))


@njit(cache=True)
def quantize_act(x, xq, xd, xs16, xs32):
    """Quantize float32 ``x`` (T, n), n a multiple of 32, into ``xq`` int8 (T, n), ``xd`` float32
    (T, n/32) scales, ``xs16`` (T, n/16) and ``xs32`` (T, n/32) scaled sums. Serial (decode)."""
    for t in range(x.shape[0]):
        _quantize_row(x[t], xq[t], xd[t], xs16[t], xs32[t])


@njit(cache=True, parallel=True)
def quantize_act_par(x, xq, xd, xs16, xs32):
    """:func:`quantize_act`, parallel over the T rows (prompt batches)."""
    for t in prange(x.shape[0]):
        _quantize_row(x[t], xq[t], xd[t], xs16[t], xs32[t])
