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

import math

import numpy as np
from numba import njit, prange


@njit(cache=True, inline="always")
def round_f16(v):
    """Round float ``v`` to the nearest fp16 value (ties to even), returned as float32, like
    GGML_FP32_TO_FP16 then back (no overflow handling: activation scales are far below 65504)."""
    if v == 0.0:
        return np.float32(0.0)
    m, e = math.frexp(v)
    if e < -13:  # fp16 subnormal: multiples of 2**-24
        return np.float32(np.rint(v * 16777216.0) / 16777216.0)
    return np.float32(math.ldexp(np.rint(m * 2048.0), e - 11))


@njit(cache=True, inline="always")
def _quantize_row(x, xq, xd, xs16, xs32):
    nb = x.shape[0] // 32
    for b in range(nb):
        amax = np.float32(0.0)
        for j in range(32):
            v = abs(x[b * 32 + j])
            if v > amax:
                amax = v
        d = amax / np.float32(127.0)
        idv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
        s0 = 0
        s1 = 0
        for j in range(16):
            q = np.int32(np.rint(x[b * 32 + j] * idv))
            xq[b * 32 + j] = q
            s0 += q
        for j in range(16, 32):
            q = np.int32(np.rint(x[b * 32 + j] * idv))
            xq[b * 32 + j] = q
            s1 += q
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
