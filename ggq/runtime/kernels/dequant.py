"""Prompt batches for the integer families: dequantize 16 rows at a time, then a float product.

For a batch of T tokens every weight is reused T times, so the work is the multiply-adds, not the
memory stream. Decoding a chunk of ``_RB`` rows once (``w = sc * q + mn``, exact in float32, as
:mod:`.repack` guarantees) into an L2-resident float32 buffer and multiplying it with the float32
activations in 4 x 4 register tiles (:func:`.floats.rows_times_x`, fused multiply-adds on full
SIMD vectors) runs at ~3x the integer kernels' rate once T >= ``FLOAT_BATCH_MIN``; the decode
(T = 1) and short batches keep the integer kernels, whose memory traffic is 4-8x smaller.

The activations are the same 8-bit values the integer kernels use (``xq * xd``), so a prompt
batch computes the decode path's function (up to float32 summation order), as llama.cpp's
batched kernels do with their Q8_0/Q8_1/Q8_K activations.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .floats import _RB, rows_times_x
from .repack import FAM_I8_32, FAM_N5, FAM_N16, FAM_N32, G

#: batches of at least this many tokens take the dequantize + float path
FLOAT_BATCH_MIN = 4


@njit(cache=True, inline="always")
def _fill_nib(qu, sc, mn, nb, g, l0, nr, per16, buf):
    """N32 (``per16`` False) / N16 rows ``l0 .. l0+nr`` of group ``g`` -> ``buf`` (nr, 32 nb)."""
    for b in range(nb):
        base = g * nb + b
        c0 = b * 32
        so0 = (2 * base if per16 else base) * G + l0
        so1 = so0 + G if per16 else so0
        for j in range(16):
            qo = (base * 16 + j) * G + l0
            for i in range(nr):
                v = qu[qo + i]
                buf[i, c0 + j] = sc[so0 + i] * np.float32(v & 15) + mn[so0 + i]
                buf[i, c0 + 16 + j] = sc[so1 + i] * np.float32(v >> 4) + mn[so1 + i]


@njit(cache=True, inline="always")
def _fill_i8(qi, sc, mn, nb, g, l0, nr, per16, offset, buf):
    """N5 (``offset``), I8_32, I8_16 (``per16``) rows ``l0 .. l0+nr`` of group ``g`` -> ``buf``."""
    for b in range(nb):
        base = g * nb + b
        c0 = b * 32
        for h in range(2):
            so = ((2 * base + h) if per16 else base) * G + l0
            for j in range(16 * h, 16 * h + 16):
                qo = (base * 32 + j) * G + l0
                if offset:
                    for i in range(nr):
                        buf[i, c0 + j] = sc[so + i] * np.float32(qi[qo + i]) + mn[so + i]
                else:
                    for i in range(nr):
                        buf[i, c0 + j] = sc[so + i] * np.float32(qi[qo + i])


@njit(cache=True, parallel=True)
def _rounded_activations(xq, xd):
    """The 8-bit activations as float32 values, ``xq * xd`` per 32-value block (T, 32 nb)."""
    T, n = xq.shape
    x = np.empty((T, n), np.float32)
    for t in prange(T):
        for k in range(n):
            x[t, k] = np.float32(xq[t, k]) * xd[t, k // 32]
    return x


@njit(cache=True, parallel=True, fastmath=True)
def mm_dequant(fam, qu, qi, sc, mn, n_rows, nb, xq, xd, out):
    """out (T, n_rows) = X @ W.T for an integer-family matrix W (planes as
    :func:`ggq.runtime.kernels.matmul` slices them; the unused code plane may be empty) and the
    8-bit activations X = ``xq * xd`` (int8 (T, 32 nb), float32 (T, nb) from
    :func:`.act.quantize_act`). Parallel over chunks of ``_RB`` rows; sums in float32."""
    x = _rounded_activations(xq, xd)
    n_cols = nb * 32
    nch = (n_rows + _RB - 1) // _RB
    for c in prange(nch):
        buf = np.empty((_RB, n_cols), np.float32)
        r0 = c * _RB
        nr = min(n_rows, r0 + _RB) - r0
        g, l0 = r0 // G, r0 % G
        if fam == FAM_N32:
            _fill_nib(qu, sc, mn, nb, g, l0, nr, False, buf)
        elif fam == FAM_N16:
            _fill_nib(qu, sc, mn, nb, g, l0, nr, True, buf)
        elif fam == FAM_N5:
            _fill_i8(qi, sc, mn, nb, g, l0, nr, False, True, buf)
        elif fam == FAM_I8_32:
            _fill_i8(qi, sc, mn, nb, g, l0, nr, False, False, buf)
        else:  # FAM_I8_16
            _fill_i8(qi, sc, mn, nb, g, l0, nr, True, False, buf)
        rows_times_x(buf, nr, r0, x, out)
