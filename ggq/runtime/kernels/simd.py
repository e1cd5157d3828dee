"""8-lane SIMD values and the int8 dot-product instructions, as Numba intrinsics.

LLVM does not turn plain loops of ``u8 * s8`` products into the x86 dot-product instructions
(``vpmaddubsw``, ``vpdpbusd``), which is where llama.cpp's quantized kernels get their speed. This
module gives the kernels two register types, :data:`i32x8` (``<8 x i32>``) and :data:`f32x8`
(``<8 x float>``), and intrinsics on them, so a kernel written in Numba can use those instructions
directly:

- :func:`dp4`: ``acc + sum over 4 bytes of u8(w) * s8(x)`` per 32-bit lane. With AVX-512 VNNI
  (or AVX-VNNI) one ``vpdpbusd``; with AVX2 ``vpmaddubsw`` then ``vpmaddwd`` by ones, as
  ggml's ``mul_sum_us8_pairs_float`` in ggml-cpu/arch/x86/quants.c; elsewhere plain IR that the
  target's vectorizer lowers. ``vpmaddubsw`` saturates int16 pair sums: callers keep
  ``2 * max(w) * 127 < 2**15`` (codes of at most 6 bits; signed 8-bit weights go through
  :func:`dp4s`).
- :func:`dp4s`: the same for signed ``w``: ``|w|`` times ``x`` with ``w``'s sign (``vpsignb``),
  ggml's ``mul_sum_i8_pairs`` trick.

The instruction set is chosen from the CPU Numba compiles for (``NUMBA_CPU_NAME`` /
``NUMBA_CPU_FEATURES`` or the host), so an AVX2-only target never gets a VNNI instruction; Numba's
cache key includes the target features.
"""

from __future__ import annotations

import os
import platform

from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.extending import intrinsic, models, register_model

#: lanes of a vector (int32 / float32): one 256-bit register
W = 8


def _target_features() -> set[str]:
    """The CPU features Numba compiles for (``+name`` entries of its feature string)."""
    feats = config.CPU_FEATURES
    if feats is None:
        try:
            from numba.core.codegen import get_host_cpu_features

            feats = get_host_cpu_features()
        except Exception:  # pragma: no cover - unusual llvmlite builds
            feats = ""
    return {f[1:] for f in str(feats).split(",") if f.startswith("+")}


def _isa() -> str:
    """'vnni' (AVX-512 VNNI on 256-bit registers, or AVX-VNNI), 'avx2', or 'generic'; the
    environment variable ``GGQ_SIMD`` picks a lower one (for measurements; part of the compile
    cache's key)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return "generic"
    f = _target_features()
    levels = ["generic"]
    if "avx2" in f:
        levels.append("avx2")
        if ("avx512vnni" in f and "avx512vl" in f) or "avxvnni" in f:
            levels.append("vnni")
    want = os.environ.get("GGQ_SIMD", "")
    return want if want in levels else levels[-1]


#: the dot-product code path compiled for this process's target
ISA = _isa()


class _I32x8(types.Type):
    def __init__(self):
        super().__init__(name="i32x8")


class _F32x8(types.Type):
    def __init__(self):
        super().__init__(name="f32x8")


i32x8 = _I32x8()
f32x8 = _F32x8()

_I8, _I16, _I32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
_VI = ir.VectorType(_I32, W)
_VF = ir.VectorType(ir.FloatType(), W)
_VB = ir.VectorType(_I8, 4 * W)
_VW = ir.VectorType(_I16, 2 * W)


@register_model(_I32x8)
class _I32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VI)


@register_model(_F32x8)
class _F32x8Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VF)


def _elem_ptr(context, builder, aty, arr, ity, idx):
    """Pointer to element ``idx`` (flat, C order) of array ``arr``."""
    ary = context.make_array(aty)(context, builder, arr)
    return builder.gep(ary.data, [context.cast(builder, idx, ity, types.intp)])


def _splat(builder, v, vty):
    undef = ir.Constant(vty, ir.Undefined)
    v0 = builder.insert_element(undef, v, ir.Constant(_I32, 0))
    return builder.shuffle_vector(v0, undef, ir.Constant(ir.VectorType(_I32, vty.count), [0] * vty.count))


def _is_arr(a, idx):
    return isinstance(a, types.Array) and isinstance(idx, types.Integer)


@intrinsic
def load_bytes(typingctx, arr, idx):
    """The 32 bytes at ``arr[idx]`` (any 1-byte dtype; unaligned) as an :data:`i32x8`."""
    if not _is_arr(arr, idx) or arr.dtype.bitwidth != 8:
        return None

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        return builder.load(builder.bitcast(p, _VI.as_pointer()), align=1)

    return i32x8(arr, idx), codegen


@intrinsic
def bcast4(typingctx, arr, idx):
    """The 4 bytes at ``arr[idx]`` (int8 array) as one int32, in every lane."""
    if not _is_arr(arr, idx) or arr.dtype.bitwidth != 8:
        return None

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        return _splat(builder, builder.load(builder.bitcast(p, _I32.as_pointer()), align=1), _VI)

    return i32x8(arr, idx), codegen


@intrinsic
def load_f(typingctx, arr, idx):
    """``arr[idx:idx + 8]`` (float32 array; unaligned) as an :data:`f32x8`."""
    if not _is_arr(arr, idx) or arr.dtype != types.float32:
        return None

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        return builder.load(builder.bitcast(p, _VF.as_pointer()), align=4)

    return f32x8(arr, idx), codegen


@intrinsic
def store_f(typingctx, arr, idx, v):
    """``arr[idx:idx + 8] = v`` (float32 array)."""
    if not _is_arr(arr, idx) or arr.dtype != types.float32 or v != f32x8:
        return None

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        builder.store(args[2], builder.bitcast(p, _VF.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(arr, idx, v), codegen


@intrinsic
def izero(typingctx):
    """An :data:`i32x8` of zeros."""
    def codegen(context, builder, sig, args):
        return ir.Constant(_VI, [0] * W)

    return i32x8(), codegen


@intrinsic
def fzero(typingctx):
    """An :data:`f32x8` of zeros."""
    def codegen(context, builder, sig, args):
        return ir.Constant(_VF, [0.0] * W)

    return f32x8(), codegen


@intrinsic
def nib_lo(typingctx, v):
    """The low nibble of every byte of ``v``."""
    if v != i32x8:
        return None

    def codegen(context, builder, sig, args):
        return builder.and_(args[0], ir.Constant(_VI, [0x0F0F0F0F] * W))

    return i32x8(v), codegen


@intrinsic
def nib_hi(typingctx, v):
    """The high nibble of every byte of ``v``."""
    if v != i32x8:
        return None

    def codegen(context, builder, sig, args):
        return builder.and_(builder.lshr(args[0], ir.Constant(_VI, [4] * W)), ir.Constant(_VI, [0x0F0F0F0F] * W))

    return i32x8(v), codegen


def _dp_ir(builder, acc, w, x):
    """IR for acc + per-lane sum of 4 products u8(w) * s8(x)."""
    m = builder.module
    if ISA == "vnni":
        fn = cgutils.get_or_insert_function(m, ir.FunctionType(_VI, [_VI, _VI, _VI]), "llvm.x86.avx512.vpdpbusd.256")
        return builder.call(fn, [acc, w, x])
    if ISA == "avx2":
        f1 = cgutils.get_or_insert_function(m, ir.FunctionType(_VW, [_VB, _VB]), "llvm.x86.avx2.pmadd.ub.sw")
        f2 = cgutils.get_or_insert_function(m, ir.FunctionType(_VI, [_VW, _VW]), "llvm.x86.avx2.pmadd.wd")
        p = builder.call(f1, [builder.bitcast(w, _VB), builder.bitcast(x, _VB)])
        return builder.add(acc, builder.call(f2, [p, ir.Constant(_VW, [1] * (2 * W))]))
    # generic: widen, multiply, add the 4 products of each lane
    v32 = ir.VectorType(_I32, 4 * W)
    prod = builder.mul(builder.zext(builder.bitcast(w, _VB), v32), builder.sext(builder.bitcast(x, _VB), v32))
    s = None
    for i in range(4):
        part = builder.shuffle_vector(prod, ir.Constant(v32, ir.Undefined),
                                      ir.Constant(_VI, [4 * lane + i for lane in range(W)]))
        s = part if s is None else builder.add(s, part)
    return builder.add(acc, s)


@intrinsic
def dp4(typingctx, acc, w, x):
    """``acc`` + per 32-bit lane the sum of 4 products ``u8(w byte) * s8(x byte)``.

    AVX2 saturates each pair sum to int16: keep ``w`` bytes <= 63 with ``x`` in -127..127."""
    if acc != i32x8 or w != i32x8 or x != i32x8:
        return None

    def codegen(context, builder, sig, args):
        return _dp_ir(builder, *args)

    return i32x8(acc, w, x), codegen


def _dp_sum_ir(builder, pairs):
    """IR for the per-lane sum of ``dp4(0, w, x)`` over ``pairs`` [(w, x), ...].

    AVX2: the ``vpmaddubsw`` int16 pair sums of all pairs are added as int16 and widened once
    (``vpmaddwd`` by ones), which the caller makes exact by keeping ``2 * len(pairs) * max(w) *
    127 < 2**15``: one widening per 2, 4 or 8 products instead of one each. VNNI: ``vpdpbusd``
    in up to four independent chains; generic: plain IR."""
    if ISA == "avx2":
        m = builder.module
        f1 = cgutils.get_or_insert_function(m, ir.FunctionType(_VW, [_VB, _VB]), "llvm.x86.avx2.pmadd.ub.sw")
        f2 = cgutils.get_or_insert_function(m, ir.FunctionType(_VI, [_VW, _VW]), "llvm.x86.avx2.pmadd.wd")
        ps = [builder.call(f1, [builder.bitcast(w, _VB), builder.bitcast(x, _VB)]) for w, x in pairs]
        while len(ps) > 1:  # a tree of vpaddw
            ps = [builder.add(ps[i], ps[i + 1]) if i + 1 < len(ps) else ps[i] for i in range(0, len(ps), 2)]
        return builder.call(f2, [ps[0], ir.Constant(_VW, [1] * (2 * W))])
    zero = ir.Constant(_VI, [0] * W)
    nch = max(1, min(4, len(pairs) // 2))  # independent chains of two (a vpdpbusd chain is latency bound)
    chains = [zero] * nch
    for i, (w, x) in enumerate(pairs):
        chains[i % nch] = _dp_ir(builder, chains[i % nch], w, x)
    while len(chains) > 1:
        chains = [builder.add(chains[i], chains[i + 1]) if i + 1 < len(chains) else chains[i]
                  for i in range(0, len(chains), 2)]
    return chains[0]


def _dp_sum(n, limit):
    """An intrinsic of 2n i32x8 arguments ``w0, x0, w1, x1, ...`` (Numba's intrinsics take no
    ``*args``, so the signature is written out)."""
    names = [f"{c}{i}" for i in range(n) for c in "wx"]
    src = (f"def dp{n}x(typingctx, {', '.join(names)}):\n"
           f"    return _dp_sum_typer(({', '.join(names)},))\n")
    ns = {"_dp_sum_typer": _dp_sum_typer}
    exec(src, ns)
    fn = ns[f"dp{n}x"]
    fn.__doc__ = (f"Per 32-bit lane, the sum over {n} pairs ``(w, x)`` of ``dp4(0, w, x)`` (u8 ``w`` bytes "
                  f"<= {limit}, s8 ``x`` bytes in -127..127, so that AVX2's int16 partial sums are exact).")
    return intrinsic(fn)


def _dp_sum_typer(args):
    if any(a != i32x8 for a in args):
        return None

    def codegen(context, builder, sig, vals):
        return _dp_sum_ir(builder, [(vals[i], vals[i + 1]) for i in range(0, len(vals), 2)])

    return i32x8(*args), codegen


#: sums of 2, 4 and 8 dot products of 4 bytes: code bounds 63 (6 bits), 31 (5 bits), 15 (4 bits)
dp2x = _dp_sum(2, 63)
dp4x = _dp_sum(4, 31)
dp8x = _dp_sum(8, 15)


@intrinsic
def dp4s(typingctx, acc, w, x):
    """``acc`` + per 32-bit lane the sum of 4 products ``s8(w byte) * s8(x byte)`` (``x`` in
    -127..127): ``|w| * (x with w's sign)``, exact on every path."""
    if acc != i32x8 or w != i32x8 or x != i32x8:
        return None

    def codegen(context, builder, sig, args):
        acc, w, x = args
        wb, xb = builder.bitcast(w, _VB), builder.bitcast(x, _VB)
        zero = ir.Constant(_VB, [0] * (4 * W))
        neg = builder.icmp_signed("<", wb, zero)
        aw = builder.select(neg, builder.sub(zero, wb), wb)           # vpabsb (|-128| = 128 as u8)
        sx = builder.select(neg, builder.sub(zero, xb), xb)           # vpsignb (w = 0 adds 0 anyway)
        return _dp_ir(builder, acc, builder.bitcast(aw, _VI), builder.bitcast(sx, _VI))

    return i32x8(acc, w, x), codegen


@intrinsic
def to_f(typingctx, v):
    """int32 lanes -> float32 lanes."""
    if v != i32x8:
        return None

    def codegen(context, builder, sig, args):
        return builder.sitofp(args[0], _VF)

    return f32x8(v), codegen


@intrinsic
def fma_s(typingctx, acc, a, s):
    """``acc + a * s`` for vectors ``acc``, ``a`` and a float32 scalar ``s`` (contractable)."""
    if acc != f32x8 or a != f32x8 or not isinstance(s, types.Float):
        return None

    def codegen(context, builder, sig, args):
        sv = _splat(builder, context.cast(builder, args[2], sig.args[2], types.float32), _VF)
        return builder.fadd(args[0], builder.fmul(args[1], sv, flags=("contract",)), flags=("contract",))

    return f32x8(acc, a, s), codegen


@intrinsic
def fma_v(typingctx, acc, a, b):
    """``acc + a * b`` for vectors (contractable to one FMA)."""
    if acc != f32x8 or a != f32x8 or b != f32x8:
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], builder.fmul(args[1], args[2], flags=("contract",)), flags=("contract",))

    return f32x8(acc, a, b), codegen


@intrinsic
def mul_v(typingctx, a, b):
    """``a * b`` for vectors."""
    if a != f32x8 or b != f32x8:
        return None

    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], args[1])

    return f32x8(a, b), codegen


@intrinsic
def add_v(typingctx, a, b):
    """``a + b`` for vectors."""
    if a != f32x8 or b != f32x8:
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])

    return f32x8(a, b), codegen


@intrinsic
def iadd(typingctx, a, b):
    """``a + b`` for int32 vectors."""
    if a != i32x8 or b != i32x8:
        return None

    def codegen(context, builder, sig, args):
        return builder.add(args[0], args[1])

    return i32x8(a, b), codegen


@intrinsic
def ior(typingctx, a, b):
    """``a | b`` for int32 vectors."""
    if a != i32x8 or b != i32x8:
        return None

    def codegen(context, builder, sig, args):
        return builder.or_(args[0], args[1])

    return i32x8(a, b), codegen


@intrinsic
def field(typingctx, v, sr, mask, sl):
    """``((v >> sr) & mask) << sl`` per 32-bit lane (logical shifts; integer scalars)."""
    if v != i32x8 or not all(isinstance(a, types.Integer) for a in (sr, mask, sl)):
        return None

    def codegen(context, builder, sig, args):
        s = [_splat(builder, context.cast(builder, a, t, types.int32), _VI) for a, t in zip(args[1:], sig.args[1:])]
        return builder.shl(builder.and_(builder.lshr(args[0], s[0]), s[1]), s[2])

    return i32x8(v, sr, mask, sl), codegen


def _load8(context, builder, sig, args, ety):
    p = _elem_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1])
    return builder.load(builder.bitcast(p, ir.VectorType(ety, W).as_pointer()), align=1)


@intrinsic
def load_hf(typingctx, arr, idx):
    """``arr[idx:idx + 8]`` fp16 bit patterns (uint16 array) as float32 lanes (``vcvtph2ps`` with
    F16C; an exact bit manipulation elsewhere, as :func:`.floats.f16_to_f32`)."""
    if not _is_arr(arr, idx) or arr.dtype != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        return _hf_ir(builder, _load8(context, builder, sig, args, _I16))

    return f32x8(arr, idx), codegen


@intrinsic
def load_u8f(typingctx, arr, idx):
    """``arr[idx:idx + 8]`` (uint8 array) as float32 lanes."""
    if not _is_arr(arr, idx) or arr.dtype != types.uint8:
        return None

    def codegen(context, builder, sig, args):
        return builder.uitofp(_load8(context, builder, sig, args, _I8), _VF)

    return f32x8(arr, idx), codegen


@intrinsic
def load_s8f(typingctx, arr, idx):
    """``arr[idx:idx + 8]`` (a uint8 array holding int8 bit patterns) as signed float32 lanes."""
    if not _is_arr(arr, idx) or arr.dtype != types.uint8:
        return None

    def codegen(context, builder, sig, args):
        return builder.sitofp(_load8(context, builder, sig, args, _I8), _VF)

    return f32x8(arr, idx), codegen


@intrinsic
def fneg(typingctx, a):
    """``-a`` for float vectors."""
    if a != f32x8:
        return None

    def codegen(context, builder, sig, args):
        return builder.fneg(args[0])

    return f32x8(a), codegen


@intrinsic
def mul_s(typingctx, a, s):
    """``a * s`` for a float vector and a scalar."""
    if a != f32x8 or not isinstance(s, types.Float):
        return None

    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], _splat(builder, context.cast(builder, args[1], sig.args[1], types.float32), _VF))

    return f32x8(a, s), codegen


@intrinsic
def load_kv(typingctx, arr, idx):
    """``arr[idx:idx + 8]`` of a KV cache (float32, or uint16 fp16 bit patterns) as float32 lanes."""
    if not _is_arr(arr, idx) or arr.dtype not in (types.float32, types.uint16):
        return None

    def codegen(context, builder, sig, args):
        if sig.args[0].dtype == types.float32:
            p = _elem_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1])
            return builder.load(builder.bitcast(p, _VF.as_pointer()), align=4)
        return _hf_ir(builder, _load8(context, builder, sig, args, _I16))

    return f32x8(arr, idx), codegen


def _hf_ir(builder, h):
    """IR: <8 x i16> fp16 bit patterns -> <8 x float> (hardware conversion where the CPU has it)."""
    from .floats import HARDWARE_F16

    if HARDWARE_F16:
        return builder.fpext(builder.bitcast(h, ir.VectorType(ir.HalfType(), W)), _VF)
    u = builder.zext(h, _VI)
    c = lambda x: ir.Constant(_VI, [x] * W)  # noqa: E731
    mag = builder.shl(builder.and_(u, c(0x7FFF)), c(13))
    val = builder.fmul(builder.bitcast(mag, _VF), ir.Constant(_VF, [2.0 ** 112] * W))
    sign = builder.shl(builder.and_(u, c(0x8000)), c(16))
    special = builder.select(builder.icmp_unsigned("==", builder.and_(u, c(0x7C00)), c(0x7C00)), c(0x7F800000), c(0))
    return builder.bitcast(builder.or_(builder.or_(builder.bitcast(val, _VI), sign), special), _VF)


@intrinsic
def hsum(typingctx, a):
    """The sum of the 8 lanes of ``a`` (float32)."""
    if a != f32x8:
        return None

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.FloatType(), [ir.FloatType(), _VF]),
                                            "llvm.vector.reduce.fadd.v8f32")
        return builder.call(fn, [ir.Constant(ir.FloatType(), 0.0), args[0]], flags=("reassoc",))

    return types.float32(a), codegen
