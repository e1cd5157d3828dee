"""Float weights: F32 rows used as they are, F16 and BF16 rows converted in the kernel.

F16 -> F32 is LLVM's ``fpext half to float`` (:func:`f16_to_f32`, a Numba intrinsic: Numba has no
float16 type), which x86 CPUs with F16C lower to ``vcvtph2ps`` and AArch64 to ``fcvtl``, eight
to sixteen values per instruction, as ggml's GGML_CPU_FP16_TO_FP32 does with F16C. On a CPU
without a hardware conversion the intrinsic emits an exact bit manipulation instead. BF16 is
the upper half of a float32 (shift by 16). Activations stay float32 (llama.cpp rounds them to
F16 for F16 weights; keeping float32 is slightly more accurate); sums are float32 (fastmath
lets LLVM reorder them into SIMD lanes).
"""

from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

_RB = 16  # rows converted per chunk (prompt batches)


def _hardware_f16() -> bool:
    """True when LLVM lowers half -> float to an instruction on this CPU (x86 F16C, AArch64)."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return True
    try:
        from llvmlite import binding

        return bool(binding.get_host_cpu_features().get("f16c", False))
    except Exception:  # pragma: no cover - unusual llvmlite builds
        return False


HARDWARE_F16 = _hardware_f16()


def _h2f_ir(builder, h):
    """IR for float32(fp16 bits ``h`` (i16)): ``fpext half`` where the CPU converts in hardware;
    else an exact bit manipulation: the 15 magnitude bits placed in a float32's exponent and
    mantissa, scaled by 2**112 (exact, subnormal halves included), then the sign and, for inf/nan
    halves, the all-ones exponent ORed in."""
    f32, i32 = ir.FloatType(), ir.IntType(32)
    if HARDWARE_F16:
        return builder.fpext(builder.bitcast(h, ir.HalfType()), f32)
    u = builder.zext(h, i32)
    mag = builder.shl(builder.and_(u, ir.Constant(i32, 0x7FFF)), ir.Constant(i32, 13))
    val = builder.fmul(builder.bitcast(mag, f32), ir.Constant(f32, 2.0 ** 112))
    sign = builder.shl(builder.and_(u, ir.Constant(i32, 0x8000)), ir.Constant(i32, 16))
    is_special = builder.icmp_unsigned("==", builder.and_(u, ir.Constant(i32, 0x7C00)), ir.Constant(i32, 0x7C00))
    special = builder.select(is_special, ir.Constant(i32, 0x7F800000), ir.Constant(i32, 0))
    bits = builder.or_(builder.or_(builder.bitcast(val, i32), sign), special)
    return builder.bitcast(bits, f32)


@intrinsic
def f16_to_f32(typingctx, h):
    """float32 value of the fp16 bit pattern ``h`` (uint16): exact, inf/nan/subnormals included."""
    if h != types.uint16:
        return None

    def codegen(context, builder, signature, args):
        return _h2f_ir(builder, args[0])

    return types.float32(types.uint16), codegen


@intrinsic
def _f32_to_f16_hw(typingctx, v):
    """fp16 bits (uint16) of float32 ``v``, round to nearest even (LLVM ``fptrunc``: vcvtps2ph)."""
    if v != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def f32_bits(typingctx, v):
    """The IEEE bits of float32 ``v`` as uint32 (a bitcast)."""
    if v != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def bits_f32(typingctx, v):
    """The float32 whose IEEE bits are the low 32 bits of the integer ``v`` (a bitcast)."""
    if not isinstance(v, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        x = args[0]
        if v.bitwidth > 32:
            x = builder.trunc(x, ir.IntType(32))
        elif v.bitwidth < 32:
            x = builder.zext(x, ir.IntType(32))
        return builder.bitcast(x, ir.FloatType())

    return types.float32(v), codegen


@njit(cache=True, inline="always")
def _f32_to_f16_sw(v):
    """fp16 bits of float32 ``v`` without a conversion instruction: round to nearest even,
    overflow to inf, subnormal halves, NaN kept quiet (as numpy's float32 -> float16)."""
    x = f32_bits(v)
    sign = np.uint16((x >> np.uint32(16)) & np.uint32(0x8000))
    a = x & np.uint32(0x7FFFFFFF)
    if a >= np.uint32(0x7F800000):  # inf / nan
        return sign | np.uint16(0x7C00) | (np.uint16(0x200) if a > np.uint32(0x7F800000) else np.uint16(0))
    if a >= np.uint32(0x477FF000):  # rounds to >= 65520: inf
        return sign | np.uint16(0x7C00)
    if a < np.uint32(0x38800000):  # below 2**-14: a multiple of 2**-24 (round half even)
        return sign | np.uint16(np.rint(abs(np.float64(v)) * 16777216.0))
    h = ((a >> np.uint32(23)) - np.uint32(112)) << np.uint32(10) | ((a >> np.uint32(13)) & np.uint32(0x3FF))
    rem = a & np.uint32(0x1FFF)
    if rem > np.uint32(0x1000) or (rem == np.uint32(0x1000) and (h & np.uint32(1))):
        h += np.uint32(1)
    return sign | np.uint16(h)


@njit(cache=True, inline="always")
def bf16_to_f32(h):
    """float32 value of the bf16 bit pattern ``h`` (uint16): its upper half."""
    return bits_f32(np.uint32(h) << np.uint32(16))


#: float32 -> fp16 bits (uint16), round to nearest even: the instruction where the CPU has one
f32_to_f16 = _f32_to_f16_hw if HARDWARE_F16 else _f32_to_f16_sw


@njit(cache=True, parallel=True, fastmath=True)
def _mv_half(w, bf16, n_rows, n_cols, x, out):
    """Decode (T = 1): each F16/BF16 weight is converted as it is read, one row per iteration."""
    x0 = x[0]
    for r in prange(n_rows):
        wr = w[r * n_cols:(r + 1) * n_cols]
        s = np.float32(0.0)
        if bf16:
            for k in range(n_cols):
                s += bf16_to_f32(wr[k]) * x0[k]
        else:
            for k in range(n_cols):
                s += f16_to_f32(wr[k]) * x0[k]
        out[0, r] = s


@njit(cache=True, parallel=True, fastmath=True)
def _mv_f32(w, n_rows, n_cols, x, out):
    """Decode (T = 1) for F32 rows."""
    x0 = x[0]
    for r in prange(n_rows):
        wr = w[r * n_cols:(r + 1) * n_cols]
        s = np.float32(0.0)
        for k in range(n_cols):
            s += wr[k] * x0[k]
        out[0, r] = s


@njit(cache=True, fastmath=True, inline="always")
def _dot4x4(w0, w1, w2, w3, x0, x1, x2, x3, n):
    """The 16 dot products of rows w0..w3 with x0..x3 (float32 (n,) each) in one pass over k:
    each loaded vector is used four times (a register-tiled micro-kernel, like tinyBLAS's)."""
    s00 = s01 = s02 = s03 = s10 = s11 = s12 = s13 = np.float32(0.0)
    s20 = s21 = s22 = s23 = s30 = s31 = s32 = s33 = np.float32(0.0)
    for k in range(n):
        a0, a1, a2, a3 = w0[k], w1[k], w2[k], w3[k]
        b0, b1, b2, b3 = x0[k], x1[k], x2[k], x3[k]
        s00 += a0 * b0
        s01 += a0 * b1
        s02 += a0 * b2
        s03 += a0 * b3
        s10 += a1 * b0
        s11 += a1 * b1
        s12 += a1 * b2
        s13 += a1 * b3
        s20 += a2 * b0
        s21 += a2 * b1
        s22 += a2 * b2
        s23 += a2 * b3
        s30 += a3 * b0
        s31 += a3 * b1
        s32 += a3 * b2
        s33 += a3 * b3
    return (s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23, s30, s31, s32, s33)


@njit(cache=True, fastmath=True)
def rows_times_x(buf, nr, r0, x, out):
    """out[t, r0 + i] = buf[i] . x[t] for i < nr (``buf`` float32 (>= nr, n)), in 4x4 tiles."""
    T = x.shape[0]
    n = x.shape[1]
    i4 = nr - nr % 4
    t4 = T - T % 4
    for t in range(0, t4, 4):
        for i in range(0, i4, 4):
            s = _dot4x4(buf[i], buf[i + 1], buf[i + 2], buf[i + 3], x[t], x[t + 1], x[t + 2], x[t + 3], n)
            for a in range(4):
                for b in range(4):
                    out[t + b, r0 + i + a] = s[4 * a + b]
    for t in range(T):
        lo = i4 if t < t4 else 0
        xt = x[t]
        for i in range(lo, nr):
            wi = buf[i]
            acc = np.float32(0.0)
            for k in range(n):
                acc += wi[k] * xt[k]
            out[t, r0 + i] = acc


@njit(cache=True, fastmath=True, inline="always")
def _dot_n(a, b, n):
    """sum(a[:n] * b[:n]) in float32."""
    acc = np.float32(0.0)
    for k in range(n):
        acc += a[k] * b[k]
    return acc


@njit(cache=True, fastmath=True)
def causal_rows_times_x(buf, x, out, base, shorten):
    """Causal variants of :func:`rows_times_x` (``r0`` = 0) for attention, where token ``t`` sees
    the first ``base + t + 1`` keys: with ``shorten`` False, out[t, i] = buf[i] . x[t] only for rows
    ``i < base + t + 1`` (scores Q K^T: buf = keys); with ``shorten`` True, the dot products of
    token ``t`` stop at ``k < base + t + 1`` (P V: buf = V^T, x = probabilities, zero beyond).
    Entries not computed are left as they are; a 4-token tile computes up to its last token's
    limit."""
    T = x.shape[0]
    nr = buf.shape[0]
    n = x.shape[1]
    t4 = T - T % 4
    for t in range(0, t4, 4):
        lim = min(base + t + 4, n if shorten else nr)
        ni = nr if shorten else lim
        nk = lim if shorten else n
        i4 = ni - ni % 4
        for i in range(0, i4, 4):
            s = _dot4x4(buf[i], buf[i + 1], buf[i + 2], buf[i + 3], x[t], x[t + 1], x[t + 2], x[t + 3], nk)
            for a in range(4):
                for b in range(4):
                    out[t + b, i + a] = s[4 * a + b]
        for tt in range(t, t + 4):
            for i in range(i4, ni):
                out[tt, i] = _dot_n(buf[i], x[tt], nk)
    for t in range(t4, T):
        lim = min(base + t + 1, n if shorten else nr)
        ni = nr if shorten else lim
        nk = lim if shorten else n
        for i in range(ni):
            out[t, i] = _dot_n(buf[i], x[t], nk)


@njit(cache=True, parallel=True, fastmath=True)
def _mm_f32_rows(w, n_rows, n_cols, x, out):
    nch = (n_rows + _RB - 1) // _RB
    for c in prange(nch):
        r0 = c * _RB
        nr = min(n_rows, r0 + _RB) - r0
        rows_times_x(w[r0 * n_cols:(r0 + nr) * n_cols].reshape((nr, n_cols)), nr, r0, x, out)


@njit(cache=True, parallel=True, fastmath=True)
def _mm_half_rows(w, bf16, n_rows, n_cols, x, out):
    """Prompt batches: convert ``_RB`` rows at a time into a float32 buffer, then multiply them
    with every token in 4 x 4 register tiles."""
    nch = (n_rows + _RB - 1) // _RB
    for c in prange(nch):
        buf = np.empty((_RB, n_cols), np.float32)
        r0 = c * _RB
        nr = min(n_rows, r0 + _RB) - r0
        for i in range(nr):
            wr = w[(r0 + i) * n_cols:(r0 + i + 1) * n_cols]
            bi = buf[i]
            if bf16:
                bu = bi.view(np.uint32)
                for k in range(n_cols):
                    bu[k] = np.uint32(wr[k]) << 16
            else:
                for k in range(n_cols):
                    bi[k] = f16_to_f32(wr[k])
        rows_times_x(buf, nr, r0, x, out)


@njit(cache=True)
def mm_f32(w, n_rows, n_cols, x, out):
    """out[t, r] = sum_k w[r, k] * x[t, k]; ``w`` float32 flat (n_rows * n_cols), ``x`` (T, n_cols)
    float32, ``out`` (T, n_rows). Decode: parallel over rows; prompt batches: parallel over
    chunks of ``_RB`` rows in 4 x 4 register tiles."""
    if x.shape[0] == 1:
        _mv_f32(w, n_rows, n_cols, x, out)
    else:
        _mm_f32_rows(w, n_rows, n_cols, x, out)


@njit(cache=True)
def mm_half(w, bf16, n_rows, n_cols, x, out):
    """As :func:`mm_f32` for uint16 ``w`` holding F16 (``bf16`` False) or BF16 bit patterns."""
    if x.shape[0] == 1:
        _mv_half(w, bf16, n_rows, n_cols, x, out)
    else:
        _mm_half_rows(w, bf16, n_rows, n_cols, x, out)
