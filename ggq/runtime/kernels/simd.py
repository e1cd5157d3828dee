"""SIMD values and the int8 dot-product instructions, as Numba intrinsics.

LLVM does not turn plain loops of ``u8 * s8`` products into the x86 dot-product instructions
(``vpmaddubsw``, ``vpdpbusd``), which is where llama.cpp's quantized kernels get their speed. This
module gives the kernels register types of ``n`` lanes, ``i32x{n}`` (``<n x i32>``) and
``f32x{n}`` (``<n x float>``), and intrinsics on them, so a kernel written in Numba can use those
instructions directly. The arithmetic intrinsics take vectors of any width and return the same
width; the loads come in two widths: 8 lanes (:data:`i32x8`, :data:`f32x8`: ``load_bytes``,
``load_f``, ... for the float kernels and attention, whose tiles are written for 8 lanes) and
:data:`MW` lanes (``load_bytes_m``, ``load_f_m``, ...: the quantized matrix products), 16 where
the target has AVX-512 with VNNI (one ``zmm`` ``vpdpbusd`` does 64 products: twice the work per
instruction of the 256-bit form, which is how llama.cpp's AVX-512 Q4_0/Q8_0 GEMMs win), else 8.

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

#: lanes of the 8-lane vectors (int32 / float32): one 256-bit register
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
    """'vnni512' (AVX-512 VNNI on 512-bit registers), 'vnni' (the same on 256-bit registers, or
    AVX-VNNI), 'avx2', or 'generic'; the environment variable ``GGQ_SIMD`` picks a lower one (for
    measurements; part of the compile cache's key)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return "generic"
    f = _target_features()
    levels = ["generic"]
    if "avx2" in f:
        levels.append("avx2")
        if ("avx512vnni" in f and "avx512vl" in f) or "avxvnni" in f:
            levels.append("vnni")
        if {"avx512f", "avx512bw", "avx512vnni"} <= f:
            levels.append("vnni512")
    want = os.environ.get("GGQ_SIMD", "")
    return want if want in levels else levels[-1]


#: the dot-product code path compiled for this process's target
ISA = _isa()

#: lanes of the quantized matrix products' vectors: 16 with AVX-512 VNNI, else 8
MW = 16 if ISA == "vnni512" else 8


class _IVec(types.Type):
    """``<n x i32>``: 32-bit integer lanes (the int8 dot products' accumulators)."""

    def __init__(self, n):
        self.n = n
        super().__init__(name=f"i32x{n}")


class _FVec(types.Type):
    """``<n x float>``."""

    def __init__(self, n):
        self.n = n
        super().__init__(name=f"f32x{n}")


_I8, _I16, _I32, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.FloatType()


@register_model(_IVec)
class _IVecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(_I32, fe_type.n))


@register_model(_FVec)
class _FVecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, ir.VectorType(_F32, fe_type.n))


i32x8, f32x8 = _IVec(8), _FVec(8)
#: the matrix products' vector types (:data:`MW` lanes)
i32xm, f32xm = _IVec(MW), _FVec(MW)


def _vi(n):
    return ir.VectorType(_I32, n)


def _vf(n):
    return ir.VectorType(_F32, n)


def _ci(n, v):
    return ir.Constant(_vi(n), [v] * n)


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


def _isv(*vs):
    """The common lane count of integer vectors ``vs``, or None."""
    n = {v.n for v in vs if isinstance(v, _IVec)}
    return n.pop() if len(n) == 1 and all(isinstance(v, _IVec) for v in vs) else None


def _fsv(*vs):
    """The common lane count of float vectors ``vs``, or None."""
    n = {v.n for v in vs if isinstance(v, _FVec)}
    return n.pop() if len(n) == 1 and all(isinstance(v, _FVec) for v in vs) else None


def _load(context, builder, sig, args, ety, n, align=1):
    p = _elem_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1])
    return builder.load(builder.bitcast(p, ir.VectorType(ety, n).as_pointer()), align=align)


def _hf_ir(builder, h):
    """IR: <n x i16> fp16 bit patterns -> <n x float> (hardware conversion where the CPU has it)."""
    from .floats import HARDWARE_F16

    n = h.type.count
    if HARDWARE_F16:
        return builder.fpext(builder.bitcast(h, ir.VectorType(ir.HalfType(), n)), _vf(n))
    u = builder.zext(h, _vi(n))
    mag = builder.shl(builder.and_(u, _ci(n, 0x7FFF)), _ci(n, 13))
    val = builder.fmul(builder.bitcast(mag, _vf(n)), ir.Constant(_vf(n), [2.0 ** 112] * n))
    sign = builder.shl(builder.and_(u, _ci(n, 0x8000)), _ci(n, 16))
    special = builder.select(builder.icmp_unsigned("==", builder.and_(u, _ci(n, 0x7C00)), _ci(n, 0x7C00)),
                             _ci(n, 0x7F800000), _ci(n, 0))
    return builder.bitcast(builder.or_(builder.or_(builder.bitcast(val, _vi(n)), sign), special), _vf(n))


# ------------------------------------------------------------------------ loads, stores, constants
# One function per width (Numba intrinsics cannot take the width as an argument): ``_loads(n)``
# returns them, exported below without a suffix for 8 lanes and with ``_m`` for :data:`MW` lanes.

def _loads(n):
    iv, fv = _IVec(n), _FVec(n)
    vi, vf = _vi(n), _vf(n)

    @intrinsic
    def load_bytes(typingctx, arr, idx):
        if not _is_arr(arr, idx) or arr.dtype.bitwidth != 8:
            return None

        def codegen(context, builder, sig, args):
            return _load(context, builder, sig, args, _I32, n)

        return iv(arr, idx), codegen

    @intrinsic
    def bcast4(typingctx, arr, idx):
        if not _is_arr(arr, idx) or arr.dtype.bitwidth != 8:
            return None

        def codegen(context, builder, sig, args):
            p = _elem_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1])
            return _splat(builder, builder.load(builder.bitcast(p, _I32.as_pointer()), align=1), vi)

        return iv(arr, idx), codegen

    @intrinsic
    def load_f(typingctx, arr, idx):
        if not _is_arr(arr, idx) or arr.dtype != types.float32:
            return None

        def codegen(context, builder, sig, args):
            return _load(context, builder, sig, args, _F32, n, align=4)

        return fv(arr, idx), codegen

    @intrinsic
    def izero(typingctx):
        def codegen(context, builder, sig, args):
            return ir.Constant(vi, [0] * n)

        return iv(), codegen

    @intrinsic
    def fzero(typingctx):
        def codegen(context, builder, sig, args):
            return ir.Constant(vf, [0.0] * n)

        return fv(), codegen

    @intrinsic
    def load_hf(typingctx, arr, idx):
        if not _is_arr(arr, idx) or arr.dtype != types.uint16:
            return None

        def codegen(context, builder, sig, args):
            return _hf_ir(builder, _load(context, builder, sig, args, _I16, n))

        return fv(arr, idx), codegen

    @intrinsic
    def load_u8f(typingctx, arr, idx):
        if not _is_arr(arr, idx) or arr.dtype != types.uint8:
            return None

        def codegen(context, builder, sig, args):
            return builder.uitofp(_load(context, builder, sig, args, _I8, n), vf)

        return fv(arr, idx), codegen

    @intrinsic
    def load_s8f(typingctx, arr, idx):
        if not _is_arr(arr, idx) or arr.dtype != types.uint8:
            return None

        def codegen(context, builder, sig, args):
            return builder.sitofp(_load(context, builder, sig, args, _I8, n), vf)

        return fv(arr, idx), codegen

    @intrinsic
    def load_kv(typingctx, arr, idx):
        if not _is_arr(arr, idx) or arr.dtype not in (types.float32, types.uint16):
            return None

        def codegen(context, builder, sig, args):
            if sig.args[0].dtype == types.float32:
                return _load(context, builder, sig, args, _F32, n, align=4)
            return _hf_ir(builder, _load(context, builder, sig, args, _I16, n))

        return fv(arr, idx), codegen

    @intrinsic
    def load_bf(typingctx, arr, idx):
        if not _is_arr(arr, idx) or arr.dtype not in (types.float32, types.uint16):
            return None

        def codegen(context, builder, sig, args):
            if sig.args[0].dtype == types.float32:
                return _load(context, builder, sig, args, _F32, n, align=4)
            u = builder.zext(_load(context, builder, sig, args, _I16, n), _vi(n))
            return builder.bitcast(builder.shl(u, _ci(n, 16)), _vf(n))

        return fv(arr, idx), codegen

    docs = dict(
        load_bytes=f"The {4 * n} bytes at ``arr[idx]`` (any 1-byte dtype; unaligned) as an ``i32x{n}``.",
        bcast4="The 4 bytes at ``arr[idx]`` (a 1-byte dtype) as one int32, in every lane.",
        load_f=f"``arr[idx:idx + {n}]`` (float32 array; unaligned) as an ``f32x{n}``.",
        izero=f"An ``i32x{n}`` of zeros.",
        fzero=f"An ``f32x{n}`` of zeros.",
        load_hf=f"``arr[idx:idx + {n}]`` fp16 bit patterns (uint16 array) as float32 lanes (``vcvtph2ps`` "
                "with F16C; an exact bit manipulation elsewhere, as :func:`.floats.f16_to_f32`).",
        load_u8f=f"``arr[idx:idx + {n}]`` (uint8 array) as float32 lanes.",
        load_s8f=f"``arr[idx:idx + {n}]`` (a uint8 array holding int8 bit patterns) as signed float32 lanes.",
        load_kv=f"``arr[idx:idx + {n}]`` of a KV cache or a float weight plane (float32 as it is, or uint16 "
                "fp16 bit patterns, converted) as float32 lanes.",
        load_bf=f"``arr[idx:idx + {n}]`` of BF16 bit patterns (uint16) as float32 lanes (shifted up 16 bits); a "
                "float32 array's values as they are (so code shared with F32 weights types).",
    )
    out = dict(load_bytes=load_bytes, bcast4=bcast4, load_f=load_f, izero=izero, fzero=fzero, load_hf=load_hf,
               load_u8f=load_u8f, load_s8f=load_s8f, load_kv=load_kv, load_bf=load_bf)
    for k, f in out.items():
        f.__doc__ = docs[k]
    return out


_L8 = _loads(8)
_LM = _L8 if MW == 8 else _loads(MW)
load_bytes, bcast4, load_f, izero, fzero = (_L8[k] for k in ("load_bytes", "bcast4", "load_f", "izero", "fzero"))
load_hf, load_u8f, load_s8f, load_kv = (_L8[k] for k in ("load_hf", "load_u8f", "load_s8f", "load_kv"))
load_bytes_m, bcast4_m, load_f_m, izero_m, fzero_m = (_LM[k] for k in ("load_bytes", "bcast4", "load_f", "izero", "fzero"))
load_hf_m, load_u8f_m, load_s8f_m = (_LM[k] for k in ("load_hf", "load_u8f", "load_s8f"))
#: float weight loads of MW lanes (:func:`.floats.mm_f32`, :func:`.floats.mm_half`): F32 or F16 (the KV load), BF16
load_w_m, load_bf_m = _LM["load_kv"], _LM["load_bf"]


@intrinsic
def store_f(typingctx, arr, idx, v):
    """``arr[idx:idx + n] = v`` (float32 array, ``v`` an ``f32x{n}``)."""
    if not _is_arr(arr, idx) or arr.dtype != types.float32 or _fsv(v) is None:
        return None

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        builder.store(args[2], builder.bitcast(p, args[2].type.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(arr, idx, v), codegen


@intrinsic
def at(typingctx, arr, idx):
    """``arr.flat[idx]`` (a C-contiguous array of any dtype) without Numba's negative-index
    wraparound: for inner loops whose index the compiler cannot prove non-negative."""
    if not _is_arr(arr, idx):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_elem_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1]))

    return arr.dtype(arr, idx), codegen


# ------------------------------------------------------------------------ integer lanes

@intrinsic
def nib_lo(typingctx, v):
    """The low nibble of every byte of ``v``."""
    if _isv(v) is None:
        return None

    def codegen(context, builder, sig, args):
        return builder.and_(args[0], _ci(v.n, 0x0F0F0F0F))

    return v(v), codegen


@intrinsic
def nib_hi(typingctx, v):
    """The high nibble of every byte of ``v``."""
    if _isv(v) is None:
        return None

    def codegen(context, builder, sig, args):
        return builder.and_(builder.lshr(args[0], _ci(v.n, 4)), _ci(v.n, 0x0F0F0F0F))

    return v(v), codegen


def _dp_ir(builder, acc, w, x):
    """IR for acc + per-lane sum of 4 products u8(w) * s8(x)."""
    m = builder.module
    n = acc.type.count
    vb, vw, vi = ir.VectorType(_I8, 4 * n), ir.VectorType(_I16, 2 * n), _vi(n)
    if ISA in ("vnni", "vnni512") and n in (8, 16):
        fn = cgutils.get_or_insert_function(m, ir.FunctionType(vi, [vi, vi, vi]), f"llvm.x86.avx512.vpdpbusd.{32 * n}")
        return builder.call(fn, [acc, w, x])
    if ISA in ("avx2", "vnni", "vnni512") and n == 8:
        f1 = cgutils.get_or_insert_function(m, ir.FunctionType(vw, [vb, vb]), "llvm.x86.avx2.pmadd.ub.sw")
        f2 = cgutils.get_or_insert_function(m, ir.FunctionType(vi, [vw, vw]), "llvm.x86.avx2.pmadd.wd")
        p = builder.call(f1, [builder.bitcast(w, vb), builder.bitcast(x, vb)])
        return builder.add(acc, builder.call(f2, [p, ir.Constant(vw, [1] * (2 * n))]))
    # generic: widen, multiply, add the 4 products of each lane
    v32 = ir.VectorType(_I32, 4 * n)
    prod = builder.mul(builder.zext(builder.bitcast(w, vb), v32), builder.sext(builder.bitcast(x, vb), v32))
    s = None
    for i in range(4):
        part = builder.shuffle_vector(prod, ir.Constant(v32, ir.Undefined),
                                      ir.Constant(vi, [4 * lane + i for lane in range(n)]))
        s = part if s is None else builder.add(s, part)
    return builder.add(acc, s)


@intrinsic
def dp4(typingctx, acc, w, x):
    """``acc`` + per 32-bit lane the sum of 4 products ``u8(w byte) * s8(x byte)``.

    AVX2 saturates each pair sum to int16: keep ``w`` bytes <= 63 with ``x`` in -127..127."""
    if _isv(acc, w, x) is None:
        return None

    def codegen(context, builder, sig, args):
        return _dp_ir(builder, *args)

    return acc(acc, w, x), codegen


def _dp_sum_ir(builder, pairs):
    """IR for the per-lane sum of ``dp4(0, w, x)`` over ``pairs`` [(w, x), ...].

    AVX2: the ``vpmaddubsw`` int16 pair sums of all pairs are added as int16 and widened once
    (``vpmaddwd`` by ones), which the caller makes exact by keeping ``2 * len(pairs) * max(w) *
    127 < 2**15``: one widening per 2, 4 or 8 products instead of one each. VNNI: ``vpdpbusd``
    in up to four independent chains; generic: plain IR."""
    n = pairs[0][0].type.count
    if ISA == "avx2" and n == 8:
        m = builder.module
        vb, vw, vi = ir.VectorType(_I8, 4 * n), ir.VectorType(_I16, 2 * n), _vi(n)
        f1 = cgutils.get_or_insert_function(m, ir.FunctionType(vw, [vb, vb]), "llvm.x86.avx2.pmadd.ub.sw")
        f2 = cgutils.get_or_insert_function(m, ir.FunctionType(vi, [vw, vw]), "llvm.x86.avx2.pmadd.wd")
        ps = [builder.call(f1, [builder.bitcast(w, vb), builder.bitcast(x, vb)]) for w, x in pairs]
        while len(ps) > 1:  # a tree of vpaddw
            ps = [builder.add(ps[i], ps[i + 1]) if i + 1 < len(ps) else ps[i] for i in range(0, len(ps), 2)]
        return builder.call(f2, [ps[0], ir.Constant(vw, [1] * (2 * n))])
    zero = _ci(n, 0)
    nch = max(1, min(4, len(pairs) // 2))  # independent chains of two (a vpdpbusd chain is latency bound)
    chains = [zero] * nch
    for i, (w, x) in enumerate(pairs):
        chains[i % nch] = _dp_ir(builder, chains[i % nch], w, x)
    while len(chains) > 1:
        chains = [builder.add(chains[i], chains[i + 1]) if i + 1 < len(chains) else chains[i]
                  for i in range(0, len(chains), 2)]
    return chains[0]


def _dp_sum(n, limit):
    """An intrinsic of 2n integer-vector arguments ``w0, x0, w1, x1, ...`` (Numba's intrinsics
    take no ``*args``, so the signature is written out)."""
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
    if _isv(*args) is None:
        return None

    def codegen(context, builder, sig, vals):
        return _dp_sum_ir(builder, [(vals[i], vals[i + 1]) for i in range(0, len(vals), 2)])

    return args[0](*args), codegen


#: sums of 2, 4 and 8 dot products of 4 bytes: code bounds 63 (6 bits), 31 (5 bits), 15 (4 bits)
dp2x = _dp_sum(2, 63)
dp4x = _dp_sum(4, 31)
dp8x = _dp_sum(8, 15)


@intrinsic
def dp4s(typingctx, acc, w, x):
    """``acc`` + per 32-bit lane the sum of 4 products ``s8(w byte) * s8(x byte)`` (``x`` in
    -127..127): ``|w| * (x with w's sign)``, exact on every path."""
    if _isv(acc, w, x) is None:
        return None

    def codegen(context, builder, sig, args):
        acc, w, x = args
        vb = ir.VectorType(_I8, 4 * acc.type.count)
        wb, xb = builder.bitcast(w, vb), builder.bitcast(x, vb)
        zero = ir.Constant(vb, [0] * vb.count)
        neg = builder.icmp_signed("<", wb, zero)
        aw = builder.select(neg, builder.sub(zero, wb), wb)           # vpabsb (|-128| = 128 as u8)
        if ISA != "generic" and acc.type.count == 8:                  # vpsignb (LLVM emits xor + sub for the select)
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vb, [vb, vb]), "llvm.x86.avx2.psign.b")
            sx = builder.call(fn, [xb, wb])
        else:                                                         # AVX-512 has no vpsignb: a masked vpsubb
            sx = builder.select(neg, builder.sub(zero, xb), xb)       # (w = 0 adds 0 anyway)
        return _dp_ir(builder, acc, builder.bitcast(aw, acc.type), builder.bitcast(sx, acc.type))

    return acc(acc, w, x), codegen


def _lanewise(lanes, op, doc):
    """An intrinsic ``f(a, b)`` of two vectors of one width whose lanes ``lanes`` accepts
    (:func:`_isv` or :func:`_fsv`), built by ``op(builder, a, b)`` (an IRBuilder method)."""
    def typer(typingctx, a, b):
        if lanes(a, b) is None:
            return None

        def codegen(context, builder, sig, args):
            return op(builder, args[0], args[1])

        return a(a, b), codegen

    typer.__doc__ = doc
    return intrinsic(typer)


iadd = _lanewise(_isv, ir.IRBuilder.add, "``a + b`` for int32 vectors.")
ior = _lanewise(_isv, ir.IRBuilder.or_, "``a | b`` for int32 vectors.")
mul_v = _lanewise(_fsv, ir.IRBuilder.fmul, "``a * b`` for float vectors.")
add_v = _lanewise(_fsv, ir.IRBuilder.fadd, "``a + b`` for float vectors.")


@intrinsic
def field(typingctx, v, sr, mask, sl):
    """``((v >> sr) & mask) << sl`` per 32-bit lane (logical shifts; integer scalars)."""
    if _isv(v) is None or not all(isinstance(a, types.Integer) for a in (sr, mask, sl)):
        return None

    def codegen(context, builder, sig, args):
        vi = args[0].type
        s = [_splat(builder, context.cast(builder, a, t, types.int32), vi) for a, t in zip(args[1:], sig.args[1:])]
        return builder.shl(builder.and_(builder.lshr(args[0], s[0]), s[1]), s[2])

    return v(v, sr, mask, sl), codegen


# ------------------------------------------------------------------------ float lanes

@intrinsic
def to_f(typingctx, v):
    """int32 lanes -> float32 lanes."""
    if _isv(v) is None:
        return None
    fv = _FVec(v.n)

    def codegen(context, builder, sig, args):
        return builder.sitofp(args[0], _vf(v.n))

    return fv(v), codegen


@intrinsic
def fma_s(typingctx, acc, a, s):
    """``acc + a * s`` for vectors ``acc``, ``a`` and a float32 scalar ``s`` (contractable)."""
    if _fsv(acc, a) is None or not isinstance(s, types.Float):
        return None

    def codegen(context, builder, sig, args):
        sv = _splat(builder, context.cast(builder, args[2], sig.args[2], types.float32), args[0].type)
        return builder.fadd(args[0], builder.fmul(args[1], sv, flags=("contract",)), flags=("contract",))

    return acc(acc, a, s), codegen


@intrinsic
def fma_v(typingctx, acc, a, b):
    """``acc + a * b`` for vectors (contractable to one FMA)."""
    if _fsv(acc, a, b) is None:
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], builder.fmul(args[1], args[2], flags=("contract",)), flags=("contract",))

    return acc(acc, a, b), codegen


@intrinsic
def fneg(typingctx, a):
    """``-a`` for float vectors."""
    if _fsv(a) is None:
        return None

    def codegen(context, builder, sig, args):
        return builder.fneg(args[0])

    return a(a), codegen


@intrinsic
def mul_s(typingctx, a, s):
    """``a * s`` for a float vector and a scalar."""
    if _fsv(a) is None or not isinstance(s, types.Float):
        return None

    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], _splat(builder, context.cast(builder, args[1], sig.args[1], types.float32),
                                            args[0].type))

    return a(a, s), codegen


@intrinsic
def hsum(typingctx, a):
    """The sum of the lanes of ``a`` (float32)."""
    if _fsv(a) is None:
        return None

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32, [_F32, args[0].type]),
                                            f"llvm.vector.reduce.fadd.v{a.n}f32")
        return builder.call(fn, [ir.Constant(_F32, 0.0), args[0]], flags=("reassoc",))

    return types.float32(a), codegen


# ------------------------------------------------------------------------ activation quantization

@intrinsic
def fabs_v(typingctx, a):
    """``|a|`` per lane (float vector)."""
    if _fsv(a) is None:
        return None

    def codegen(context, builder, sig, args):
        t = args[0].type
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(t, [t]), f"llvm.fabs.v{a.n}f32")
        return builder.call(fn, [args[0]])

    return a(a), codegen


@intrinsic
def fmax_v(typingctx, a, b):
    """Per lane ``max(a, b)``; a NaN lane gives the other operand (``llvm.maxnum``)."""
    if _fsv(a, b) is None:
        return None

    def codegen(context, builder, sig, args):
        t = args[0].type
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(t, [t, t]), f"llvm.maxnum.v{a.n}f32")
        return builder.call(fn, list(args))

    return a(a, b), codegen


@intrinsic
def hmax(typingctx, a):
    """The largest lane of ``a`` (float32; NaN lanes ignored unless all are NaN)."""
    if _fsv(a) is None:
        return None

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32, [args[0].type]),
                                            f"llvm.vector.reduce.fmax.v{a.n}f32")
        return builder.call(fn, [args[0]])

    return types.float32(a), codegen


@intrinsic
def rint_i(typingctx, a):
    """Round each lane to the nearest integer, ties to even (``vroundps``, the current rounding
    mode, as ``_mm256_round_ps(.., _MM_ROUND_NEAREST)`` in ggml), as int32 lanes."""
    if _fsv(a) is None:
        return None
    iv = _IVec(a.n)

    def codegen(context, builder, sig, args):
        t = args[0].type
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(t, [t]), f"llvm.rint.v{a.n}f32")
        return builder.fptosi(builder.call(fn, [args[0]]), _vi(a.n))

    return iv(a), codegen


@intrinsic
def store_i8(typingctx, arr, idx, v):
    """``arr[idx:idx + n]`` = the int32 lanes of ``v`` truncated to 8 bits (int8 array)."""
    if not _is_arr(arr, idx) or arr.dtype != types.int8 or _isv(v) is None:
        return None

    def codegen(context, builder, sig, args):
        p = _elem_ptr(context, builder, sig.args[0], args[0], sig.args[1], args[1])
        b = builder.trunc(args[2], ir.VectorType(_I8, v.n))
        builder.store(b, builder.bitcast(p, b.type.as_pointer()), align=1)
        return context.get_dummy_value()

    return types.void(arr, idx, v), codegen


@intrinsic
def hsum_i(typingctx, a):
    """The sum of the int32 lanes of ``a`` (as int64)."""
    if _isv(a) is None:
        return None

    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_I32, [args[0].type]),
                                            f"llvm.vector.reduce.add.v{a.n}i32")
        return builder.sext(builder.call(fn, [args[0]]), ir.IntType(64))

    return types.int64(a), codegen
