"""F32, F16 and BF16 "quantization": plain float storage, converted the way gguf-py and ggml do.

* F32: float32 as is.
* F16: IEEE half, round to nearest even (numpy's ``astype(np.float16)``, which is also what
  ggml's ``GGML_FP32_TO_FP16`` gives for finite values and quiet NaNs).
* BF16: the top 16 bits of the float32, rounded to nearest even; NaNs are forced quiet (bit 22
  set) first. Same as ``ggml_compute_fp32_to_bf16`` in ggml-impl.h and ``gguf.quants.BF16``.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from gguf import GGMLQuantizationType

T = GGMLQuantizationType


@nb.njit(cache=True, parallel=True)
def _to_bf16(bits, out):
    n = bits.shape[0]
    chunk = 1 << 16
    for c in nb.prange((n + chunk - 1) // chunk):
        for i in range(c * chunk, min(n, (c + 1) * chunk)):
            u = np.int64(bits[i])
            if (u & 0x7FFFFFFF) > 0x7F800000:  # NaN -> quiet NaN, keep sign and top payload
                u = (u & 0xFFFF0000) | 0x400000
            out[i] = (u + 0x7FFF + ((u >> 16) & 1)) >> 16


@nb.njit(cache=True, parallel=True)
def _from_bf16(h, out):
    n = h.shape[0]
    chunk = 1 << 16
    for c in nb.prange((n + chunk - 1) // chunk):
        for i in range(c * chunk, min(n, (c + 1) * chunk)):
            out[i] = np.uint32(h[i]) << np.uint32(16)


def quantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Convert float ``data`` of any shape ``(..., n)`` to F32/F16/BF16 storage.

    Returns float32 ``(..., n)`` for F32, float16 ``(..., n)`` for F16 and uint8 ``(..., 2n)``
    (little-endian bf16 bytes) for BF16 -- the same dtypes, shapes and bits as
    ``gguf.quants.quantize``. Raises ValueError for any other type.
    """
    qtype = GGMLQuantizationType(qtype)
    data = np.asarray(data)
    if qtype == T.F32:
        return data.astype(np.float32, copy=False)
    if qtype == T.F16:
        return data.astype(np.float16, copy=False)
    if qtype == T.BF16:
        x = np.ascontiguousarray(data, dtype=np.float32)
        out = np.empty(x.shape, dtype=np.uint16)
        _to_bf16(x.reshape(-1).view(np.uint32), out.reshape(-1))
        return out.view(np.uint8).reshape(*x.shape[:-1], 2 * x.shape[-1]) if x.ndim else out.view(np.uint8)
    raise ValueError(f"floats.quantize handles F32/F16/BF16, not {qtype.name}")


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """F32/F16/BF16 storage -> float32.

    ``data`` may be the type's own dtype (float32 for F32, float16 for F16, uint16/int16 for
    BF16) with shape ``(..., n)``, or raw little-endian bytes (uint8 ``(..., n * type_size)``).
    Any other float array is converted to float32 by value. Raises ValueError for another type or
    a byte row that is not a whole number of elements.
    """
    qtype = GGMLQuantizationType(qtype)
    data = np.asarray(data)
    if qtype not in (T.F32, T.F16, T.BF16):
        raise ValueError(f"floats.dequantize handles F32/F16/BF16, not {qtype.name}")
    if data.dtype == np.uint8:
        size = {T.F32: 4, T.F16: 2, T.BF16: 2}[qtype]
        if data.ndim == 0 or data.shape[-1] % size:
            raise ValueError(f"{data.shape[-1] if data.ndim else 0} bytes per row is not a whole number of {qtype.name} values")
        data = np.ascontiguousarray(data).view({T.F32: np.float32, T.F16: np.float16, T.BF16: np.uint16}[qtype])
    if qtype == T.BF16:
        if data.dtype.kind in "iu" and data.dtype.itemsize == 2:
            h = np.ascontiguousarray(data).view(np.uint16)
            out = np.empty(h.shape, dtype=np.uint32)
            _from_bf16(h.reshape(-1), out.reshape(-1))
            return out.view(np.float32)
        return data.astype(np.float32)
    return data.astype(np.float32, copy=False)
