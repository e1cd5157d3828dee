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

from .repack import G
from .simd import MW, add_v, at, fma_s, fzero_m, load_bf_m, load_w_m, store_f



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


# ------------------------------------------------------------------------ float weight matrices
# Rows interleaved like the quantized families (:mod:`.repack`): a group of G rows is stored
# [k][G rows], so one vector load is column k of MW consecutive rows.

#: element kinds of a float matrix (compile-time constants of the inlined tile loops)
K_F32, K_F16, K_BF16 = 0, 1, 2
#: tokens per register tile of a prompt batch (2 vectors of rows x _TT tokens: 12 accumulators,
#: which AVX2's 16 registers still hold with the 2 weight vectors and a broadcast)
_TT = 6


@njit(cache=True, fastmath=True, inline="always")
def _ldw(w, i, kind):
    """MW float32 lanes of column data at ``w[i]``: F32 as they are, F16 converted, BF16 shifted."""
    if kind == K_BF16:
        return load_bf_m(w, i)
    return load_w_m(w, i)


@njit(cache=True, fastmath=True, inline="always")
def _store_rows(out, t, c0, c1, a, tmp):
    """out[t, c0:c1] = the first c1 - c0 lanes of ``a`` (a whole vector when it fits the row)."""
    if c1 - c0 == MW:
        store_f(out, t * out.shape[1] + c0, a)
    else:
        store_f(tmp, 0, a)
        for i in range(c1 - c0):
            out[t, c0 + i] = tmp[i]


@njit(cache=True, fastmath=True, inline="always")
def _group_rows(w, kind, g, n_rows, x, out):
    """out[:, rows of group g] for the float matrix ``w`` ([group][k][G] layout) and all tokens of
    ``x`` (T, K), T > 1: per pair of row vectors, tiles of _TT tokens (each k: two weight loads,
    _TT broadcasts, 2 _TT FMAs; no horizontal sums), then the remaining tokens one at a time."""
    T, K = x.shape[0], x.shape[1]
    base = g * K * G
    r1 = min(G, n_rows - g * G)
    tmp = np.empty(MW, np.float32)
    for v in range(0, r1, 2 * MW):
        c0 = g * G + v
        ca, cb = min(c0 + MW, g * G + r1), min(c0 + 2 * MW, g * G + r1)
        t0 = 0
        while t0 + _TT <= T:
            a0 = a1 = a2 = a3 = a4 = a5 = b0 = b1 = b2 = b3 = b4 = b5 = fzero_m()
            xo = t0 * K
            for k in range(K):
                o = base + k * G + v
                w0 = _ldw(w, o, kind)
                w1 = _ldw(w, o + MW, kind)
                x0, x1, x2 = at(x, xo + k), at(x, xo + K + k), at(x, xo + 2 * K + k)
                a0 = fma_s(a0, w0, x0)
                b0 = fma_s(b0, w1, x0)
                a1 = fma_s(a1, w0, x1)
                b1 = fma_s(b1, w1, x1)
                a2 = fma_s(a2, w0, x2)
                b2 = fma_s(b2, w1, x2)
                x3, x4, x5 = at(x, xo + 3 * K + k), at(x, xo + 4 * K + k), at(x, xo + 5 * K + k)
                a3 = fma_s(a3, w0, x3)
                b3 = fma_s(b3, w1, x3)
                a4 = fma_s(a4, w0, x4)
                b4 = fma_s(b4, w1, x4)
                a5 = fma_s(a5, w0, x5)
                b5 = fma_s(b5, w1, x5)
            _store_rows(out, t0, c0, ca, a0, tmp)
            _store_rows(out, t0 + 1, c0, ca, a1, tmp)
            _store_rows(out, t0 + 2, c0, ca, a2, tmp)
            _store_rows(out, t0 + 3, c0, ca, a3, tmp)
            _store_rows(out, t0 + 4, c0, ca, a4, tmp)
            _store_rows(out, t0 + 5, c0, ca, a5, tmp)
            if cb > ca:
                _store_rows(out, t0, ca, cb, b0, tmp)
                _store_rows(out, t0 + 1, ca, cb, b1, tmp)
                _store_rows(out, t0 + 2, ca, cb, b2, tmp)
                _store_rows(out, t0 + 3, ca, cb, b3, tmp)
                _store_rows(out, t0 + 4, ca, cb, b4, tmp)
                _store_rows(out, t0 + 5, ca, cb, b5, tmp)
            t0 += _TT
        if t0 < T:
            _rows_one_by_one(w, kind, g, n_rows, x, out, t0, v, c0, ca, cb, tmp)


@njit(cache=True, fastmath=True, inline="always")
def _rows_one_by_one(w, kind, g, n_rows, x, out, t0, v, c0, ca, cb, tmp):
    """Tokens t0.. of x (fewer than a tile: decode, a batch's last tokens) for the row vectors v,
    v + MW of group g: k in pairs, 4 chains."""
    T, K = x.shape[0], x.shape[1]
    base = g * K * G
    for t in range(t0, T):
        a0 = a1 = b0 = b1 = fzero_m()
        xo = t * K
        k = 0
        while k + 1 < K:
            o = base + k * G + v
            x0, x1 = at(x, xo + k), at(x, xo + k + 1)
            a0 = fma_s(a0, _ldw(w, o, kind), x0)
            b0 = fma_s(b0, _ldw(w, o + MW, kind), x0)
            a1 = fma_s(a1, _ldw(w, o + G, kind), x1)
            b1 = fma_s(b1, _ldw(w, o + G + MW, kind), x1)
            k += 2
        if k < K:
            o = base + k * G + v
            a0 = fma_s(a0, _ldw(w, o, kind), at(x, xo + k))
            b0 = fma_s(b0, _ldw(w, o + MW, kind), at(x, xo + k))
        _store_rows(out, t, c0, ca, add_v(a0, a1), tmp)
        if cb > ca:
            _store_rows(out, t, ca, cb, add_v(b0, b1), tmp)


@njit(cache=True, fastmath=True, inline="always")
def _group_decode(w, kind, g, n_rows, x, out):
    """One token (decode) times the G rows of group g in one pass over k: the group's [k][G]
    weights are read as one contiguous stream (a pass per pair of row vectors would read every
    other cache line, which halved the DRAM bandwidth), 64 rows = 4 (AVX-512) or 8 vectors of
    accumulators."""
    K = x.shape[1]
    base = g * K * G
    r1 = min(G, n_rows - g * G)
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = fzero_m()
    for k in range(K):
        o = base + k * G
        xk = at(x, k)
        a0 = fma_s(a0, _ldw(w, o, kind), xk)
        a1 = fma_s(a1, _ldw(w, o + MW, kind), xk)
        a2 = fma_s(a2, _ldw(w, o + 2 * MW, kind), xk)
        a3 = fma_s(a3, _ldw(w, o + 3 * MW, kind), xk)
        if MW == 8:  # a compile-time constant: 8 vectors of 8 rows
            a4 = fma_s(a4, _ldw(w, o + 4 * MW, kind), xk)
            a5 = fma_s(a5, _ldw(w, o + 5 * MW, kind), xk)
            a6 = fma_s(a6, _ldw(w, o + 6 * MW, kind), xk)
            a7 = fma_s(a7, _ldw(w, o + 7 * MW, kind), xk)
    c0 = g * G
    if r1 == G:  # a whole group: straight vector stores (no buffer to allocate per group and token)
        store_f(out, c0, a0)
        store_f(out, c0 + MW, a1)
        store_f(out, c0 + 2 * MW, a2)
        store_f(out, c0 + 3 * MW, a3)
        if MW == 8:
            store_f(out, c0 + 4 * MW, a4)
            store_f(out, c0 + 5 * MW, a5)
            store_f(out, c0 + 6 * MW, a6)
            store_f(out, c0 + 7 * MW, a7)
        return
    tmp = np.empty(MW, np.float32)
    for i in range(G // MW):
        a = a0 if i == 0 else a1 if i == 1 else a2 if i == 2 else a3 if i == 3 else a4 if i == 4 else a5 if i == 5 else a6 if i == 6 else a7
        lo, hi = c0 + i * MW, min(c0 + (i + 1) * MW, c0 + r1)
        if hi > lo:
            _store_rows(out, 0, lo, hi, a, tmp)


@njit(cache=True, parallel=True, fastmath=True)
def mm_f32(w, n_rows, x, out):
    """out[t, r] = sum_k W[r, k] * x[t, k] for an F32 matrix: ``w`` its float32 plane in the
    [group][k][G rows] layout, ``x`` float32 (T, K), ``out`` float32 (T, n_rows). Parallel over
    64-row groups. A function of its own (not a ``kind`` of :func:`mm_half`): a file compiles only
    the tile loops of its own element types, which are most of a float file's first-run compile."""
    ng = (n_rows + G - 1) // G
    if x.shape[0] == 1:
        for g in prange(ng):
            _group_decode(w, K_F32, g, n_rows, x, out)
    else:
        for g in prange(ng):
            _group_rows(w, K_F32, g, n_rows, x, out)


@njit(cache=True, parallel=True, fastmath=True)
def mm_half(w, kind, n_rows, x, out):
    """As :func:`mm_f32` for F16 (``kind`` K_F16) or BF16 (K_BF16) matrices: ``w`` their uint16 bit
    patterns, converted as they are loaded (``vcvtph2ps``; BF16 a shift) and multiplied in float32
    (llama.cpp rounds the activations to F16 for F16 weights; float32 is more accurate)."""
    ng = (n_rows + G - 1) // G
    if x.shape[0] == 1:
        for g in prange(ng):
            if kind == K_BF16:  # one inlined copy per kind: no branch per load
                _group_decode(w, K_BF16, g, n_rows, x, out)
            else:
                _group_decode(w, K_F16, g, n_rows, x, out)
    else:
        for g in prange(ng):
            if kind == K_BF16:
                _group_rows(w, K_BF16, g, n_rows, x, out)
            else:
                _group_rows(w, K_F16, g, n_rows, x, out)
