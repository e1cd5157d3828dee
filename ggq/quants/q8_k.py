"""Q8_K: 8-bit weights with one float32 scale per 256, plus int16 sums per 16 (292-byte blocks).

Block layout (ggml's ``block_q8_K``): float32 ``d``, 256 int8 ``qs``, 16 int16 ``bsums`` (sum of
each run of 16 ``qs``, used by the K-quant dot products). Weight ``i`` is ``d*qs[i]``. ggml uses
Q8_K for activations only, so llama.cpp has no weighted path: ``imatrix`` is ignored.

Quantization follows llama.cpp's ``quantize_row_q8_K_ref`` (scale ``max/-127`` from the
signed value of largest magnitude). ``ggml_quantize_chunk`` does not handle Q8_K; tests compare
with ``quantize_row_q8_K_ref`` directly. For an all-zero block ggml leaves ``bsums`` unwritten
(whatever the buffer held); we write zeros.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .kquant_search import QK_K, check_dequantize_args, check_quantize_args, f32_bits, bits_f32, nearest_int

BLOCK_SIZE = 256
TYPE_SIZE = 292


@njit(cache=True, error_model="numpy")
def _quantize_block(x, out):
    out[:] = 0
    mx = np.float32(0.0)
    amax = np.float32(0.0)
    for j in range(QK_K):
        ax = abs(x[j])
        if ax > amax:
            amax = ax
            mx = x[j]
    if amax == 0:
        return
    iscale = np.float32(-127.0) / mx
    for j in range(16):
        s = 0
        for ii in range(16):
            v = min(127, nearest_int(iscale * x[16 * j + ii]))
            out[4 + 16 * j + ii] = v & 0xFF
            s += ((v + 128) & 0xFF) - 128  # the stored int8 value, branch-free
        out[260 + 2 * j] = s & 0xFF
        out[261 + 2 * j] = (s >> 8) & 0xFF
    bits = np.int64(f32_bits(np.float32(1.0) / iscale))
    for k in range(4):
        out[k] = (bits >> (8 * k)) & 0xFF


@njit(cache=True, error_model="numpy", parallel=True)
def _quantize_rows(x, out):
    nrows, n = x.shape
    nb = n // QK_K
    for r in prange(nrows):
        for i in range(nb):
            _quantize_block(x[r, i * QK_K:(i + 1) * QK_K], out[r, i * TYPE_SIZE:(i + 1) * TYPE_SIZE])


@njit(cache=True, error_model="numpy", parallel=True)
def _dequantize_rows(q, y):
    nrows = q.shape[0]
    nb = q.shape[1] // TYPE_SIZE
    for r in prange(nrows):
        for i in range(nb):
            b = q[r, i * TYPE_SIZE:(i + 1) * TYPE_SIZE]
            bits = np.int64(b[0]) | (np.int64(b[1]) << 8) | (np.int64(b[2]) << 16) | (np.int64(b[3]) << 24)
            d = bits_f32(bits)
            for j in range(QK_K):
                v = np.int64(b[4 + j])
                if v > 127:
                    v -= 256
                y[r, i * QK_K + j] = d * np.float32(v)


def quantize_rows(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize float32 ``(n_rows, n)`` to Q8_K block bytes, uint8 ``(n_rows, n//256*292)``.

    Same rounding as llama.cpp's ``quantize_row_q8_K_ref``; ``imatrix`` is accepted and ignored
    (Q8_K has no weighted path). Parallel over rows. Raises ValueError if ``n`` is not a
    multiple of 256.
    """
    x, _ = check_quantize_args(x, None, "Q8_K")
    out = np.zeros((x.shape[0], x.shape[1] // QK_K * TYPE_SIZE), dtype=np.uint8)
    _quantize_rows(x, out)
    return out


def dequantize_rows(q: np.ndarray) -> np.ndarray:
    """Q8_K block bytes uint8 ``(n_rows, nbytes)`` -> float32 ``(n_rows, nbytes//292*256)``.

    Same arithmetic as ggml's ``dequantize_row_q8_K`` (``d*qs`` in float32).
    """
    q = check_dequantize_args(q, TYPE_SIZE, "Q8_K")
    y = np.empty((q.shape[0], q.shape[1] // TYPE_SIZE * QK_K), dtype=np.float32)
    _dequantize_rows(q, y)
    return y
