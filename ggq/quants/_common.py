"""Numba helpers shared by the block quantization kernels.

Everything here works in float32 exactly the way numpy (and so ``gguf.quants``) and ggml's C
reference do: no ``fastmath`` (it would let LLVM reassociate sums, turn ``x / 127`` into
``x * (1/127)`` or fuse multiply-adds, any of which changes bits), constants are ``np.float32``
so numba never widens an expression to float64.

* :func:`fp32_bits_to_fp16_bits` -- IEEE round-to-nearest-even float32 -> float16, same bits as
  numpy's ``astype(np.float16)`` (npy_floatbits_to_halfbits), subnormals, inf and NaN payloads
  included.
* :data:`F16_TO_F32` -- 65536-entry float16 -> float32 table built with numpy (exact).
* :func:`roundf` -- C's ``roundf``: round half away from zero.
* :func:`to_byte` -- what numpy's float32 -> uint8/int8 ``astype`` gives on x86-64 (the low byte
  of a truncating int32 conversion; NaN, inf and out-of-range values give 0).
* :func:`nearest_int` -- ggml's ``nearest_int`` (round half to even via the 1.5*2^23 trick).
* :func:`make_qx_quants`, :func:`make_qkx3_quants` -- the weighted scale searches of
  ggml-quants.c used by the imatrix paths of Q4_0/Q5_0 and Q4_1/Q5_1.
"""

from __future__ import annotations

import numba as nb
import numpy as np

#: float16 bits -> float32 value, exactly numpy's conversion (index with a uint16 / int64).
F16_TO_F32: np.ndarray = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)

F32 = np.float32


@nb.njit(cache=True, inline="always")
def fp32_bits_to_fp16_bits(f):
    """float32 bits (any int) -> float16 bits (int64), round to nearest even like numpy.

    Overflow (|x| >= 65520) gives signed inf; values below half the smallest float16 subnormal
    give signed zero; NaN keeps the top 10 payload bits (and stays NaN if those are all zero).
    """
    f = np.int64(f) & 0xFFFFFFFF
    sign = (f >> 16) & 0x8000
    e = (f >> 23) & 0xFF
    m = f & 0x7FFFFF
    if e == 0xFF:
        if m == 0:
            return sign | 0x7C00
        h = 0x7C00 | (m >> 13)
        if h == 0x7C00:
            h = 0x7C01
        return sign | h
    if e >= 143:  # 2^16 and above: overflow
        return sign | 0x7C00
    if e <= 112:  # result is a float16 subnormal or zero
        if e < 102:
            return sign
        sig = m | 0x800000
        shift = 126 - e  # 14 .. 24
        h = sig >> shift
        rem = sig & ((np.int64(1) << shift) - 1)
        half = np.int64(1) << (shift - 1)
        if rem > half or (rem == half and (h & 1) == 1):
            h += 1
        return sign | h
    h = ((e - 112) << 10) | (m >> 13)
    rem = m & 0x1FFF
    if rem > 0x1000 or (rem == 0x1000 and (h & 1) == 1):
        h += 1  # a carry into the exponent is the right answer (up to inf)
    return sign | h


@nb.njit(cache=True, inline="always")
def put_fp16(out, r, o, bits):
    """Store float16 ``bits`` little-endian at ``out[r, o:o+2]``."""
    out[r, o] = bits & 0xFF
    out[r, o + 1] = (bits >> 8) & 0xFF


@nb.njit(cache=True, inline="always")
def get_fp16(q, r, o):
    """float16 bits stored little-endian at ``q[r, o:o+2]`` (int64)."""
    return np.int64(q[r, o]) | (np.int64(q[r, o + 1]) << 8)


@nb.njit(cache=True, inline="always")
def put_u32(out, r, o, v):
    """Store the low 32 bits of ``v`` little-endian at ``out[r, o:o+4]``."""
    for k in range(4):
        out[r, o + k] = (v >> (8 * k)) & 0xFF


@nb.njit(cache=True, inline="always")
def get_u32(q, r, o):
    """uint32 stored little-endian at ``q[r, o:o+4]`` (int64)."""
    return (np.int64(q[r, o]) | (np.int64(q[r, o + 1]) << 8) | (np.int64(q[r, o + 2]) << 16)
            | (np.int64(q[r, o + 3]) << 24))


@nb.njit(cache=True, inline="always")
def pack_q5(out, r, oqs, j, q0, q1):
    """Q5_0/Q5_1 packing of weights ``j`` and ``j + 16`` (5-bit ``q0``, ``q1``) of a block.

    Writes their low nibbles to ``out[r, oqs + j]`` (``q0`` low, ``q1`` high) and returns their
    bit-4s placed at bits ``j`` and ``j + 16`` of the block's ``qh`` word.
    """
    out[r, oqs + j] = (q0 & 0xF) | ((q1 & 0xF) << 4)
    return (((q0 >> 4) & 1) << j) | (((q1 >> 4) & 1) << (j + 16))


@nb.njit(cache=True, inline="always")
def roundf(x):
    """C ``roundf`` on a float32: nearest integer, halves away from zero (float32 result)."""
    a = abs(x)
    fl = np.floor(a)
    if a - fl >= F32(0.5):
        fl += F32(1.0)
    return fl if x >= F32(0.0) else -fl


@nb.njit(cache=True, inline="always")
def to_byte(x):
    """numpy's x86-64 float32 -> uint8 ``astype`` as an int64 in 0..255.

    Truncates toward zero and keeps the low byte; NaN, +-inf and |x| >= 2^31 give 0 (the
    conversion's "integer indefinite" 0x80000000 has a zero low byte).
    """
    if x >= F32(-2147483648.0) and x < F32(2147483648.0):
        return np.int64(x) & 0xFF
    return np.int64(0)


@nb.njit(cache=True, inline="always")
def nearest_int(x):
    """ggml's ``nearest_int``: round to nearest, ties to even, for |x| <= 4194303 (float32 in)."""
    v = x + F32(12582912.0)
    return np.int64(v - F32(12582912.0))


@nb.njit(cache=True, inline="always")
def row_sigma2(x, r, n):
    """``sum(x[r]**2) / n`` accumulated in float32 in index order (quantize_row_*_impl)."""
    s = F32(0.0)
    for j in range(n):
        v = x[r, j]
        s += v * v
    return s / F32(n)


@nb.njit(cache=True)
def make_qx_quants(n, nmax, x, off, L, w):
    """Weighted symmetric scale search, rmse_type 1 of make_qx_quants in ggml-quants.c.

    ``x[off:off+n]`` (float32) are the weights of one block, ``w`` (float32, n) their importance.
    Writes ``L[i]`` = quant + nmax (0 .. 2*nmax-1) and returns the float32 scale. All-(near-)zero
    blocks (max |x| < 1e-15) give L = 0 and scale 0.
    """
    mx = F32(0.0)
    amax = F32(0.0)
    for i in range(n):
        ax = abs(x[off + i])
        if ax > amax:
            amax = ax
            mx = x[off + i]
    if amax < F32(1e-15):
        for i in range(n):
            L[i] = 0
        return F32(0.0)
    fnmax = F32(nmax)
    iscale = -fnmax / mx
    sumlx = F32(0.0)
    suml2 = F32(0.0)
    for i in range(n):
        l = nearest_int(iscale * x[off + i])
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l + nmax
        fl = F32(l)
        sumlx += w[i] * x[off + i] * fl
        suml2 += w[i] * fl * fl
    scale = sumlx / suml2 if suml2 != F32(0.0) else F32(0.0)
    best = scale * sumlx
    for ist in range(-9, 10):
        if ist == 0:
            continue
        iscale = -(fnmax + F32(0.1) * F32(ist)) / mx
        sumlx = F32(0.0)
        suml2 = F32(0.0)
        for i in range(n):
            l = nearest_int(iscale * x[off + i])
            l = max(-nmax, min(nmax - 1, l))
            fl = F32(l)
            sumlx += w[i] * x[off + i] * fl
            suml2 += w[i] * fl * fl
        if suml2 > F32(0.0) and sumlx * sumlx > best * suml2:
            for i in range(n):
                l = nearest_int(iscale * x[off + i])
                L[i] = nmax + max(-nmax, min(nmax - 1, l))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@nb.njit(cache=True)
def make_qkx3_quants(n, nmax, x, off, w, L, Laux, rmin, rdelta, nstep):
    """Weighted asymmetric (scale, min) search: make_qkx3_quants of ggml-quants.c, use_mad=false.

    ``x[off:off+n]`` float32 values, ``w`` float32 (n) importance. Writes ``L`` (0..nmax) and
    returns ``(scale, the_min)`` as float32 where a value is ``scale * L - the_min``.
    """
    mn = x[off]
    mx = x[off]
    sum_w = w[0]
    sum_x = sum_w * x[off]
    for i in range(1, n):
        v = x[off + i]
        if v < mn:
            mn = v
        if v > mx:
            mx = v
        sum_w += w[i]
        sum_x += w[i] * v
    if mn > F32(0.0):
        mn = F32(0.0)
    if mx <= mn:
        for i in range(n):
            L[i] = 0
        return F32(0.0), -mn
    fnmax = F32(nmax)
    iscale = fnmax / (mx - mn)
    scale = F32(1.0) / iscale
    best_mad = F32(0.0)
    for i in range(n):
        l = nearest_int(iscale * (x[off + i] - mn))
        l = max(0, min(nmax, l))
        L[i] = l
        diff = scale * F32(l) + mn - x[off + i]
        diff = diff * diff
        best_mad += w[i] * diff
    if nstep < 1:
        return scale, -mn
    for ist in range(nstep + 1):
        iscale = (rmin + rdelta * F32(ist) + fnmax) / (mx - mn)
        sum_l = F32(0.0)
        sum_l2 = F32(0.0)
        sum_xl = F32(0.0)
        for i in range(n):
            l = nearest_int(iscale * (x[off + i] - mn))
            l = max(0, min(nmax, l))
            Laux[i] = l
            fl = F32(l)
            sum_l += w[i] * fl
            sum_l2 += w[i] * fl * fl
            sum_xl += w[i] * fl * x[off + i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > F32(0.0):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > F32(0.0):
                this_min = F32(0.0)
                this_scale = sum_xl / sum_l2
            mad = F32(0.0)
            for i in range(n):
                diff = this_scale * F32(Laux[i]) + this_min - x[off + i]
                diff = diff * diff
                mad += w[i] * diff
            if mad < best_mad:
                for i in range(n):
                    L[i] = Laux[i]
                best_mad = mad
                scale = this_scale
                mn = this_min
    return scale, -mn


def check_rows(x: np.ndarray, block: int, name: str) -> np.ndarray:
    """Validate ``x`` for ``quantize_rows``: 2-D, row length a multiple of ``block``; returns it
    as C-contiguous float32. Raises ValueError otherwise."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name}.quantize_rows wants a 2-D (n_rows, n_per_row) array, got shape {x.shape}")
    if x.shape[1] % block:
        raise ValueError(f"row length {x.shape[1]} is not a multiple of the {name} block size {block}")
    return np.ascontiguousarray(x, dtype=np.float32)


def check_imatrix(imatrix, n: int, name: str):
    """None, or ``imatrix`` as C-contiguous float32 ``(n,)``; ValueError on a length mismatch."""
    if imatrix is None:
        return None
    imatrix = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
    if imatrix.shape[0] != n:
        raise ValueError(f"{name} imatrix has {imatrix.shape[0]} weights for rows of {n}")
    return imatrix


def check_blocks(q: np.ndarray, type_size: int, name: str) -> np.ndarray:
    """Validate ``q`` for ``dequantize_rows``: 2-D bytes, whole blocks per row; returns uint8."""
    q = np.asarray(q)
    if q.ndim != 2:
        raise ValueError(f"{name}.dequantize_rows wants a 2-D (n_rows, n_bytes) array, got shape {q.shape}")
    q = np.ascontiguousarray(q).view(np.uint8)
    if q.shape[1] % type_size:
        raise ValueError(f"{q.shape[1]} bytes per row is not a whole number of {name} blocks ({type_size} bytes)")
    return q


@nb.njit(cache=True, inline="always")
def block_signed_absmax(x, r, off, qk):
    """The signed value of largest magnitude in ``x[r, off:off+qk]`` (first one on ties), or the
    first NaN: what numpy's ``argmax(abs(block))`` picks in gguf.quants (Q4_0, Q5_0)."""
    mx = x[r, off]
    amax = abs(mx)
    if amax == amax:
        for j in range(1, qk):
            v = x[r, off + j]
            av = abs(v)
            if av != av:
                return v
            if av > amax:
                amax = av
                mx = v
    return mx


@nb.njit(cache=True, inline="always")
def block_min_max(x, r, off, qk):
    """``(min, max)`` of ``x[r, off:off+qk]``; both are the first NaN if there is one, as numpy's
    ``min``/``max`` propagate it in gguf.quants (Q4_1, Q5_1)."""
    mn = x[r, off]
    mx = mn
    if mn == mn:
        for j in range(1, qk):
            v = x[r, off + j]
            if v != v:
                return v, v
            if v < mn:
                mn = v
            if v > mx:
                mx = v
    return mn, mx
