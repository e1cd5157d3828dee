"""Scale searches shared by the K-quant kernels (Q2_K..Q6_K), in float32 like llama.cpp.

Our own Numba implementations of the helpers in llama.cpp's ``ggml-quants.c``: ``nearest_int``,
``make_qx_quants``, ``make_q3_quants``, ``make_qkx2_quants``, ``make_qkx3_quants`` and
``make_qp_quants``, plus the float16 conversions the block formats need (``GGML_FP32_TO_FP16``
rounds to nearest even; ``GGML_FP16_TO_FP32`` is exact).

Float semantics: llama.cpp does all of this in float32 without FMA contraction, summing left to
right. Every function here keeps every intermediate in float32 (constants are ``np.float32``,
integers are converted with ``np.float32(l)`` before they meet a float), and no function uses
``fastmath``, so the same inputs give the same bits. ``nearest_int`` reproduces C's
``fval + 12582912.f`` bit trick exactly, including its wrap-around for out-of-range values, and
integer results stored into ``int8``/``uint8`` arrays truncate as the C assignments do.

All functions take 1-D contiguous float32 arrays (slices of a row are fine) and write the chosen
integer levels into the ``L`` array given; they allocate nothing (``work`` is caller scratch).

Speed: the searches evaluate their candidate scales side by side (vectorizing across candidates)
and then take llama.cpp's decisions in llama.cpp's order, which keeps every bit while running
faster than the C loops. Development note: Numba's on-disk cache of the ``q*_k`` kernels does not
notice edits to this file; delete ``ggq/quants/__pycache__/*.nb[ic]`` after changing it.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

F = np.float32
GROUP_MAX_EPS = np.float32(1e-15)


@intrinsic
def f32_bits(typingctx, x):
    """Bit pattern of a float32 as int32 (C's memcpy float -> int). Only accepts float32."""
    if x != types.float32:
        return None
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def bits_f32(typingctx, i):
    """float32 whose bit pattern is the low 32 bits of integer ``i``."""
    if not isinstance(i, types.Integer):
        return None
    sig = types.float32(i)

    def codegen(context, builder, signature, args):
        v = args[0]
        if v.type.width > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif v.type.width < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return sig, codegen


@njit(cache=True, error_model="numpy", inline="always")
def nearest_int(fval):
    """Round float32 ``fval`` to the nearest int, ties to even (llama.cpp's ``nearest_int``).

    Same bit trick as ggml-quants.c: add 1.5 * 2**23 in float32 and read the mantissa. Exact for
    ``|fval| <= 4194303``; outside that range it returns the same wrapped value C does.
    """
    val = fval + np.float32(12582912.0)
    return (np.int64(f32_bits(val)) & 0x007FFFFF) - 0x00400000


#: float16 bit pattern -> float32 value (exact, as GGML_FP16_TO_FP32 and numpy do)
F16_TO_F32 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


@njit(cache=True, error_model="numpy", inline="always")
def fp16_to_fp32(h):
    """float32 value of the float16 bit pattern ``h`` (0..65535)."""
    return F16_TO_F32[h]


@njit(cache=True, error_model="numpy")
def fp32_to_fp16(f):
    """float16 bit pattern (int) of float32 ``f``, rounded to nearest even like GGML_FP32_TO_FP16.

    Overflow gives +-inf (0x7C00), NaN gives 0x7E00 with the sign, like ggml's software conversion.
    """
    bits = np.int64(f32_bits(f)) & 0xFFFFFFFF
    sign = (bits >> 16) & 0x8000
    e = (bits >> 23) & 0xFF
    m = bits & 0x7FFFFF
    if e == 255:
        return sign | (0x7E00 if m != 0 else 0x7C00)
    if e >= 143:  # >= 2**16: inf
        return sign | 0x7C00
    if e < 113:  # half subnormal or zero
        if e < 102:
            return sign
        m |= 0x800000
        shift = 126 - e
        h = m >> shift
        rem = m & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        if rem > half or (rem == half and (h & 1) == 1):
            h += 1
        return sign | h
    h = ((e - 112) << 10) | (m >> 13)
    rem = m & 0x1FFF
    if rem > 0x1000 or (rem == 0x1000 and (h & 1) == 1):
        h += 1  # a carry into the exponent is right, up to 0x7C00 = inf
    return sign | h


@njit(cache=True, error_model="numpy", inline="always")
def fp16_round(f):
    """(bits, value): ``f`` rounded through float16 as ``GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(f))``."""
    h = fp32_to_fp16(f)
    return h, F16_TO_F32[h]


@njit(cache=True, error_model="numpy", inline="always")
def _qx_weight(x, i, rmse_type, qw):
    if qw is None:
        if rmse_type == 1:
            return x[i] * x[i]
        elif rmse_type == 2:
            return np.float32(1.0)
        elif rmse_type == 3:
            return abs(x[i])
        else:
            return np.sqrt(abs(x[i]))
    else:
        return qw[i]


#: float32 scratch length the searches need (``work`` argument); allocate once per row
WORK_SIZE = 320  # 7 arrays of up to 37 candidates (make_qkx3_quants), 3 of 18 (make_qx_quants)


@njit(cache=True, error_model="numpy")
def make_qx_quants(n, nmax, x, L, rmse_type, qw, work):
    """Symmetric levels in [-nmax, nmax-1] for ``x[:n]``; writes ``L`` (int8, offset by +nmax).

    Returns the float32 scale. Same search as llama.cpp's ``make_qx_quants``: start at
    ``-nmax/max``, refine the scale by weighted least squares, then try 18 nearby inverse scales
    and keep the best weighted fit. Weights are ``qw`` when given (float32 array, or ``None``),
    else x**2 / 1 / |x| / sqrt|x| for ``rmse_type`` 1 / 2 / 3 / other. ``rmse_type == 0``: plain
    rounding; negative: return early after the first refinement. ``work``: float32 scratch of at
    least :data:`WORK_SIZE`.

    The 18 candidates do not depend on one another, so their sums are accumulated side by side
    (each still in llama.cpp's element order, so bit-identical) and compared afterwards in
    llama.cpp's order; this vectorizes across candidates.
    """
    mx = np.float32(0.0)
    amax = np.float32(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return np.float32(0.0)
    iscale = np.float32(-nmax) / mx
    if rmse_type == 0:
        for i in range(n):
            l = nearest_int(iscale * x[i])
            L[i] = nmax + max(-nmax, min(nmax - 1, l))
        return np.float32(1.0) / iscale
    return_early = False
    if rmse_type < 0:
        rmse_type = -rmse_type
        return_early = True
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l + nmax
        w = _qx_weight(x, i, rmse_type, qw)
        fl = np.float32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != 0 else np.float32(0.0)
    if return_early:
        if suml2 > 0:
            return np.float32(0.5) * (scale + np.float32(1.0) / iscale)
        return np.float32(1.0) / iscale
    best = scale * sumlx
    isc = work[0:18]
    sx = work[18:36]
    s2 = work[36:54]
    for k in range(18):
        is_ = k - 9 if k < 9 else k - 8  # -9..-1, 1..9
        isc[k] = -(np.float32(nmax) + np.float32(0.1) * np.float32(is_)) / mx
        sx[k] = np.float32(0.0)
        s2[k] = np.float32(0.0)
    for i in range(n):
        xi = x[i]
        w = _qx_weight(x, i, rmse_type, qw)
        wx = w * xi
        for k in range(18):
            l = nearest_int(isc[k] * xi)
            fl = np.float32(max(-nmax, min(nmax - 1, l)))
            sx[k] += wx * fl
            s2[k] += w * fl * fl
    best_k = -1
    for k in range(18):
        if s2[k] > 0 and sx[k] * sx[k] > best * s2[k]:
            best_k = k
            scale = sx[k] / s2[k]
            best = scale * sx[k]
    if best_k >= 0:
        iscale = isc[best_k]
        for i in range(n):
            l = nearest_int(iscale * x[i])
            L[i] = nmax + max(-nmax, min(nmax - 1, l))
    return scale


@njit(cache=True, error_model="numpy")
def make_q3_quants(n, nmax, x, L, do_rmse):
    """Symmetric levels for Q3_K's reference path (llama.cpp's ``make_q3_quants``).

    Writes ``L`` (int8, levels in [0, 2*nmax-1], i.e. offset by +nmax) and returns the float32
    scale. With ``do_rmse``, coordinate descent on the x**2-weighted error, up to 5 sweeps.
    """
    mx = np.float32(0.0)
    amax = np.float32(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return np.float32(0.0)
    iscale = np.float32(-nmax) / mx
    if do_rmse:
        sumlx = np.float32(0.0)
        suml2 = np.float32(0.0)
        for i in range(n):
            l = nearest_int(iscale * x[i])
            l = max(-nmax, min(nmax - 1, l))
            L[i] = l
            w = x[i] * x[i]
            fl = np.float32(l)
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        for itry in range(5):
            n_changed = 0
            for i in range(n):
                w = x[i] * x[i]
                fLi = np.float32(L[i])
                slx = sumlx - w * x[i] * fLi
                if slx > 0:
                    sl2 = suml2 - w * fLi * fLi
                    new_l = nearest_int(x[i] * sl2 / slx)
                    new_l = max(-nmax, min(nmax - 1, new_l))
                    if new_l != L[i]:
                        fnl = np.float32(new_l)
                        slx += w * x[i] * fnl
                        sl2 += w * fnl * fnl
                        if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                            L[i] = new_l
                            sumlx = slx
                            suml2 = sl2
                            n_changed += 1
            if n_changed == 0:
                break
        for i in range(n):
            L[i] += nmax
        return sumlx / suml2 if suml2 > 0 else np.float32(0.0)
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l + nmax
    return np.float32(1.0) / iscale


_QKX_CHUNK = 16  # candidates evaluated per pass: one AVX-512 vector, and bounds the re-evaluation after a min change


@njit(cache=True, error_model="numpy")
def _qkx_search(n, nmax, x, weights, L, rmin, rdelta, nstep, use_mad, strict, work):
    # Shared body of make_qkx2_quants (strict=False: max == min test) and make_qkx3_quants
    # (strict=True: max <= min test); returns (scale, the_min).
    #
    # llama.cpp tries the candidate inverse scales one after the other, and a candidate that
    # wins replaces `min`, which the later candidates then use. We evaluate all remaining
    # candidates side by side for the current `min` (each sum still in llama.cpp's element
    # order), walk them in llama.cpp's order, and when a winner changes `min` we re-evaluate the
    # candidates after it with the new `min`. Same arithmetic on the same values, so the same bits.
    rmin = np.float32(rmin)
    rdelta = np.float32(rdelta)
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if mn > 0:
        mn = np.float32(0.0)
    if (mx <= mn) if strict else (mx == mn):
        for i in range(n):
            L[i] = 0
        return np.float32(0.0), -mn
    iscale = np.float32(nmax) / (mx - mn)
    scale = np.float32(1.0) / iscale
    best_error = np.float32(0.0)
    for i in range(n):
        l = nearest_int(iscale * (x[i] - mn))
        l = max(0, min(nmax, l))
        L[i] = l
        diff = scale * np.float32(l) + mn - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += weights[i] * diff
    if nstep < 1:
        return scale, -mn
    nc_all = nstep + 1
    isc = work[0:nc_all]
    sl = work[nc_all:2 * nc_all]
    sl2 = work[2 * nc_all:3 * nc_all]
    sxl = work[3 * nc_all:4 * nc_all]
    tsc = work[4 * nc_all:5 * nc_all]
    tmn = work[5 * nc_all:6 * nc_all]
    err = work[6 * nc_all:7 * nc_all]
    best_isc = np.float32(0.0)
    best_base = mn
    found = False
    start = 0
    while start < nc_all:
        nc = min(nc_all - start, _QKX_CHUNK)
        base = mn  # the min every candidate from `start` on is evaluated with
        rng = mx - base
        for k in range(nc):
            isc[k] = (rmin + rdelta * np.float32(start + k) + np.float32(nmax)) / rng
            sl[k] = np.float32(0.0)
            sl2[k] = np.float32(0.0)
            sxl[k] = np.float32(0.0)
            err[k] = np.float32(0.0)
        for i in range(n):
            xi = x[i]
            xm = xi - base
            w = weights[i]
            for k in range(nc):
                fl = np.float32(max(0, min(nmax, nearest_int(isc[k] * xm))))
                wl = w * fl
                sl[k] += wl
                sl2[k] += wl * fl
                sxl[k] += wl * xi
        for k in range(nc):
            D = sum_w * sl2[k] - sl[k] * sl[k]
            ts = np.float32(0.0)
            tm = np.float32(0.0)
            if D > 0:
                ts = (sum_w * sxl[k] - sum_x * sl[k]) / D
                tm = (sl2[k] * sum_x - sl[k] * sxl[k]) / D
                if tm > 0:
                    tm = np.float32(0.0)
                    ts = sxl[k] / sl2[k]
            else:
                sl[k] = np.float32(np.nan)  # marks "D <= 0: skipped"
            tsc[k] = ts
            tmn[k] = tm
        for i in range(n):
            xi = x[i]
            xm = xi - base
            w = weights[i]
            for k in range(nc):
                fl = np.float32(max(0, min(nmax, nearest_int(isc[k] * xm))))
                diff = tsc[k] * fl + tmn[k] - xi
                diff = abs(diff) if use_mad else diff * diff
                err[k] += w * diff
        nxt = start + nc
        for k in range(nc):
            if sl[k] != sl[k]:  # D <= 0
                continue
            if err[k] < best_error:
                best_error = err[k]
                scale = tsc[k]
                best_isc = isc[k]
                best_base = base
                found = True
                mn = tmn[k]
                if mn != base:  # later candidates need the new min
                    nxt = start + k + 1
                    break
        start = nxt
    if found:
        for i in range(n):
            L[i] = max(0, min(nmax, nearest_int(best_isc * (x[i] - best_base))))
    return scale, -mn


@njit(cache=True, error_model="numpy")
def make_qkx2_quants(n, nmax, x, weights, L, rmin, rdelta, nstep, use_mad, work):
    """Asymmetric levels in [0, nmax] with a min, for Q2_K/Q4_K/Q5_K (llama.cpp's ``make_qkx2_quants``).

    ``x``, ``weights``: float32 ``(n,)``; ``L``: uint8 ``(n,)`` output; ``work``: float32 scratch
    of at least :data:`WORK_SIZE`. ``rmin``, ``rdelta``: float32; tries inverse scales
    ``(rmin + rdelta*is + nmax)/(max - min)`` for ``is`` in ``0..nstep``, fitting scale and min
    by weighted least squares each time, and keeps the lowest weighted squared (or absolute,
    ``use_mad``) error. Returns ``(scale, the_min)`` with ``x ~= scale*L - the_min``.
    """
    return _qkx_search(n, nmax, x, weights, L, rmin, rdelta, nstep, use_mad, False, work)


@njit(cache=True, error_model="numpy")
def make_qkx3_quants(n, nmax, x, weights, L, rmin, rdelta, nstep, use_mad, work):
    """llama.cpp's ``make_qkx3_quants`` (the weighted search of the imatrix paths).

    Same search as :func:`make_qkx2_quants`; differs only in treating ``max <= min`` (not just
    ``==``) as a constant block. ``weights`` must be given: llama.cpp's NULL case (x**2 weights)
    is never used by the K-quants. Returns ``(scale, the_min)``.
    """
    return _qkx_search(n, nmax, x, weights, L, rmin, rdelta, nstep, use_mad, True, work)


@njit(cache=True, error_model="numpy")
def make_qp_quants(n, nmax, x, L, quant_weights):
    """Non-negative levels in [0, nmax] for non-negative ``x`` (llama.cpp's ``make_qp_quants``).

    Used to quantize the sub-block scales and mins of the weighted K-quant paths. ``x``,
    ``quant_weights``: float32 ``(n,)``; writes uint8 ``L``; returns the float32 scale. Tries
    9 inverse scales around ``nmax/max``, then up to 5 sweeps of weighted coordinate descent.
    """
    mx = np.float32(0.0)
    for i in range(n):
        mx = mx if mx > x[i] else x[i]
    if mx < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return np.float32(0.0)
    iscale = np.float32(nmax) / mx
    for i in range(n):
        L[i] = nearest_int(iscale * x[i])
    scale = np.float32(1.0) / iscale
    best_mse = np.float32(0.0)
    for i in range(n):
        diff = x[i] - scale * np.float32(L[i])
        best_mse += quant_weights[i] * diff * diff
    for is_ in range(-4, 5):
        if is_ == 0:
            continue
        iscale_is = (np.float32(0.1) * np.float32(is_) + np.float32(nmax)) / mx
        scale_is = np.float32(1.0) / iscale_is
        mse = np.float32(0.0)
        for i in range(n):
            l = min(nmax, nearest_int(iscale_is * x[i]))
            diff = x[i] - scale_is * np.float32(l)
            mse += quant_weights[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = np.float32(0.0)
    suml2 = np.float32(0.0)
    for i in range(n):
        l = min(nmax, nearest_int(iscale * x[i]))
        L[i] = l
        w = quant_weights[i]
        fl = np.float32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    for itry in range(5):
        n_changed = 0
        for i in range(n):
            w = quant_weights[i]
            fLi = np.float32(L[i])
            slx = sumlx - w * x[i] * fLi
            sl2 = suml2 - w * fLi * fLi
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    fnl = np.float32(new_l)
                    slx += w * x[i] * fnl
                    sl2 += w * fnl * fnl
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > 0 else np.float32(0.0)


# ----------------------------------------------------------------------------------------------
# Shared by the K-quant modules: argument checks and float16 byte packing.

QK_K = 256


def check_quantize_args(x, imatrix, type_name: str):
    """Validate ``quantize_rows`` arguments; return (x, imatrix) as C-contiguous float32.

    ``x`` must be 2-D with a row length that is a multiple of 256; ``imatrix``, when given, must
    hold one float32 importance per column. Raises ValueError naming ``type_name`` otherwise.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{type_name}: quantize_rows expects a 2-D (n_rows, n_per_row) array, got shape {x.shape}")
    if x.shape[1] % QK_K:
        raise ValueError(f"{type_name}: row length {x.shape[1]} is not a multiple of the super-block size {QK_K}")
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if imatrix.shape[0] != x.shape[1]:
            raise ValueError(f"{type_name}: imatrix has {imatrix.shape[0]} entries for rows of {x.shape[1]} weights")
    return x, imatrix


def check_dequantize_args(q, type_size: int, type_name: str):
    """Validate ``dequantize_rows`` arguments; return ``q`` as C-contiguous uint8 ``(n_rows, nbytes)``."""
    q = np.ascontiguousarray(q).view(np.uint8)
    if q.ndim != 2:
        raise ValueError(f"{type_name}: dequantize_rows expects a 2-D (n_rows, n_bytes) array, got shape {q.shape}")
    if q.shape[1] % type_size:
        raise ValueError(f"{type_name}: row of {q.shape[1]} bytes is not a whole number of {type_size}-byte blocks")
    return q


@njit(cache=True, error_model="numpy", inline="always")
def put_f16(out, pos, h):
    """Store float16 bits ``h`` little-endian at ``out[pos:pos+2]``."""
    out[pos] = h & 0xFF
    out[pos + 1] = (h >> 8) & 0xFF


@njit(cache=True, error_model="numpy", inline="always")
def get_f16(q, pos):
    """float32 value of the little-endian float16 at ``q[pos:pos+2]``."""
    return F16_TO_F32[np.int64(q[pos]) | (np.int64(q[pos + 1]) << 8)]
