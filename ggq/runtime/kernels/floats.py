"""Float weights: F32 rows used as they are, F16 and BF16 rows converted in the kernel.

F16 goes through a 65536-entry float32 table (llama.cpp's ggml_table_f32_f16 idea), BF16 is the
upper half of a float32 (shift by 16). Activations stay float32; sums are float32 (fastmath lets
LLVM reorder them into SIMD lanes).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

#: float32 value of every fp16 bit pattern
F16_TABLE = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)

_RB = 16  # rows converted per chunk


@njit(cache=True, parallel=True, fastmath=True)
def mm_f32(w, n_rows, n_cols, x, out):
    """out[t, r] = sum_k w[r, k] * x[t, k]; ``w`` float32 flat (n_rows * n_cols), ``x`` (T, n_cols)."""
    T = x.shape[0]
    for r in prange(n_rows):
        wr = w[r * n_cols:(r + 1) * n_cols]
        for t in range(T):
            xt = x[t]
            s = np.float32(0.0)
            for k in range(n_cols):
                s += wr[k] * xt[k]
            out[t, r] = s


_TWO112 = np.float32(2.0 ** 112)


@njit(cache=True, parallel=True, fastmath=True)
def mm_half(w, bf16, n_rows, n_cols, f16tab, x, out):
    """As :func:`mm_f32` for uint16 ``w`` holding F16 (``bf16`` False) or BF16 bit patterns."""
    T = x.shape[0]
    nch = (n_rows + _RB - 1) // _RB
    for c in prange(nch):
        buf = np.empty(n_cols, np.float32)
        bufu = buf.view(np.uint32)
        for r in range(c * _RB, min(n_rows, (c + 1) * _RB)):
            wr = w[r * n_cols:(r + 1) * n_cols]
            if bf16:
                for k in range(n_cols):
                    bufu[k] = np.uint32(wr[k]) << 16
            else:
                # F16 -> F32 without a table gather (vectorizes): place the 15 magnitude bits in a
                # float32's exponent/mantissa, scale by 2**112 (exact, subnormal halves included),
                # then OR in the sign and, for inf/nan halves, the all-ones exponent.
                for k in range(n_cols):
                    bufu[k] = (np.uint32(wr[k]) & np.uint32(0x7FFF)) << np.uint32(13)
                for k in range(n_cols):
                    buf[k] = buf[k] * _TWO112
                for k in range(n_cols):
                    h = np.uint32(wr[k])
                    inf_nan = np.uint32(0x7F800000) if (h & np.uint32(0x7C00)) == np.uint32(0x7C00) else np.uint32(0)
                    bufu[k] = bufu[k] | ((h & np.uint32(0x8000)) << np.uint32(16)) | inf_nan
            for t in range(T):
                xt = x[t]
                s = np.float32(0.0)
                for k in range(n_cols):
                    s += buf[k] * xt[k]
                out[t, r] = s
