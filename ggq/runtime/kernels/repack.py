"""Load-time repacking of GGUF tensors into the runtime's row-interleaved layouts.

Decoding a token reads every weight once, so the repacked weights take no more memory than the
file's blocks (within 3%): the codes keep their bits and the scales stay in the file's form (fp16,
or a K-quant's 4/6/8-bit sub-block scales with the super-block's fp16 ``d``/``dmin``); only their
order changes. Each quantized ggml type is first decoded (numpy, a few rows at a time) into integer
codes and scale fields, following the block layouts of ggml-common.h (the decoding of
``gguf.quants``' dequantizers, stopped before the multiply), then stored with the rows of a matrix
interleaved by ``G`` (so the compiled kernels work on 8 or 16 rows per vector) and the 32-weight blocks
kept whole. Codes are stored in *quads*: for each block, ``[j][G rows][4 bytes]``, so that one
32-byte load holds 4 consecutive weights of 8 rows, the operand of the int8 dot-product
instructions (:mod:`.simd`), like llama.cpp's repacked block_q4_0x8:

=========  ====================================================  ==============================
family     code planes ([group][block][...] each)                ggml types
=========  ====================================================  ==============================
``N4``     nibbles u8 [4][G][4]: byte i of quad j holds weights  Q4_0, Q4_1, Q4_K (scales per
           4j + i (lo) and 4j + i + 16 (hi)                      32); Q2_K, Q3_K (per 16)
``N5``     nibbles + high bits u8 [1][G][4] (bit 2j + h of byte  Q5_0, Q5_1, Q5_K
           i: quad j's lo (h = 0) or hi weight)
``N6``     nibbles + 2-bit highs u8 [2][G][4] (byte i of plane   Q6_K (scales per 16)
           m: 2-bit fields for quads 2m lo, 2m hi, 2m+1 lo, hi)
``I8``     int8 codes [8][G][4] (weights 4j .. 4j + 3)            Q8_0, IQ4_NL
=========  ====================================================  ==============================

Every matrix has ``w = sc * q + mn`` per group of 16 or 32 weights, with the scale fields in one
of three *kinds*:

- ``SK_F16``: ``sc`` fp16 per 32 ([group][block][G], u16); ``mn`` an fp16 plane (Q4_1, Q5_1) or
  ``moff * sc`` (Q4_0: -8, Q5_0: -16; Q8_0 and IQ4_NL have none).
- ``SK_K``: ``sc = d * s``, ``mn = -dmin * m`` with ``s``, ``m`` u8 per group ([group][block][k][G])
  and ``d``, ``dmin`` fp16 per 256-weight super-block ([group][super-block][G]): Q2_K, Q4_K, Q5_K.
- ``SK_K6``: ``sc = d * s`` with ``s`` int8 per 16 (stored as u8 bits), ``mn = moff * sc``
  (Q3_K: -4, Q6_K: -32, the codes being stored unsigned, Q6_K's plus 32).

The float scale of a K-quant sub-block (fp16 d times a 6/8-bit scale) is exact in float32, so the
repacked weights equal ``gguf.quants.dequantize`` bit for bit. Float rows (F32, F16/BF16 kept as
uint16 bit patterns, converted in the kernel) are interleaved the same way, ``[group][k][G]``: one
vector load is column ``k`` of 8 or 16 consecutive rows (:func:`.floats.mm_f32`, :func:`.floats.mm_half`).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

#: rows interleaved per group (8 vectors of 8 lanes)
G = 64

FAM_F32, FAM_F16, FAM_BF16, FAM_N4, FAM_N5, FAM_N6, FAM_I8 = range(7)
FAMILY_NAMES = ("F32", "F16", "BF16", "N4", "N5", "N6", "I8")
SK_F16, SK_K, SK_K6 = range(3)

FAMILY_OF = {
    T.F32: FAM_F32, T.F16: FAM_F16, T.BF16: FAM_BF16,
    T.Q4_0: FAM_N4, T.Q4_1: FAM_N4, T.Q4_K: FAM_N4, T.Q2_K: FAM_N4, T.Q3_K: FAM_N4,
    T.Q5_0: FAM_N5, T.Q5_1: FAM_N5, T.Q5_K: FAM_N5,
    T.Q6_K: FAM_N6,
    T.Q8_0: FAM_I8, T.IQ4_NL: FAM_I8,
}

#: (scale kind, weights per scale group, has an mn plane, moff) of each quantized type
LAYOUT = {
    T.Q4_0: (SK_F16, 32, False, -8), T.Q4_1: (SK_F16, 32, True, 0),
    T.Q5_0: (SK_F16, 32, False, -16), T.Q5_1: (SK_F16, 32, True, 0),
    T.Q8_0: (SK_F16, 32, False, 0), T.IQ4_NL: (SK_F16, 32, False, 0),
    T.Q2_K: (SK_K, 16, True, 0), T.Q4_K: (SK_K, 32, True, 0), T.Q5_K: (SK_K, 32, True, 0),
    T.Q3_K: (SK_K6, 16, False, -4), T.Q6_K: (SK_K6, 16, False, -32),
}

IQ4_NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)


def _f16bits(b: np.ndarray) -> np.ndarray:
    """uint8 (..., 2) little-endian fp16 bytes -> uint16 (...) bit patterns."""
    return np.ascontiguousarray(b).view(np.uint16)[..., 0]


def _nibbles32(qs: np.ndarray) -> np.ndarray:
    """uint8 (..., 16) packed 32-weight block (lo nibble = w[j], hi = w[j+16]) -> uint8 (..., 32)."""
    return np.concatenate([qs & 15, qs >> 4], axis=-1)


def _k_scale_min(sc12: np.ndarray):
    """Q4_K/Q5_K 12-byte scales (n, 12) -> (scale, min) uint8 (n, 8) each (get_scale_min_k4)."""
    s = sc12.reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def decode(qtype: T, raw: np.ndarray, n_cols: int) -> dict:
    """Decode GGUF block bytes ``raw`` (uint8 (n, row_bytes)) of ``qtype`` into codes and scale
    fields (block layouts of ggml-common.h, block_q4_0 ... block_q6_K).

    Returns a dict: ``q`` (n, n_cols) codes in the natural weight order (uint8; int8 for Q8_0 and
    IQ4_NL; Q3_K's 0..7 and Q6_K's 0..63 unsigned, see :data:`LAYOUT`'s ``moff``); ``sc`` and ``mn``
    (n, groups): fp16 bit patterns (uint16) for the SK_F16 kind, the u8/int8 sub-block scales for the
    K kinds; ``d`` and ``dm`` (n, n_cols // 256) fp16 bit patterns for the K kinds. Keys that do not
    apply are absent.
    """
    n = raw.shape[0]
    if qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.IQ4_NL):
        nb = n_cols // 32
        blk = raw.reshape(n, nb, -1)
        out = {"sc": _f16bits(blk[..., 0:2])}
        if qtype == T.Q8_0:
            out["q"] = blk[..., 2:].copy().view(np.int8).reshape(n, n_cols)
            return out
        if qtype == T.IQ4_NL:
            out["q"] = IQ4_NL_VALUES[_nibbles32(blk[..., 2:])].reshape(n, n_cols)
            return out
        p = 2
        if qtype in (T.Q4_1, T.Q5_1):
            out["mn"] = _f16bits(blk[..., 2:4])
            p = 4
        if qtype in (T.Q5_0, T.Q5_1):
            qh = np.ascontiguousarray(blk[..., p:p + 4]).view("<u4")  # (n, nb, 1)
            bits = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
            q = _nibbles32(blk[..., p + 4:]) | (bits << 4)
        else:
            q = _nibbles32(blk[..., p:])
        out["q"] = q.reshape(n, n_cols)
        return out

    nb = n_cols // 256
    blk = raw.reshape(n * nb, -1)
    if qtype == T.Q2_K:
        scales, qs = blk[:, :16], blk[:, 16:80]
        q = (qs.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
        return {"q": q.reshape(n, n_cols), "sc": (scales & 15).reshape(n, -1), "mn": (scales >> 4).reshape(n, -1),
                "d": _f16bits(blk[:, 80:82]).reshape(n, nb), "dm": _f16bits(blk[:, 82:84]).reshape(n, nb)}
    if qtype == T.Q3_K:
        hmask, qs, s12 = blk[:, :32], blk[:, 32:96], blk[:, 96:108]
        lo = (s12[:, :8].reshape(-1, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)).reshape(-1, 16) & 15
        hi = (s12[:, 8:].reshape(-1, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)).reshape(-1, 16) & 3
        s = ((lo | (hi << 4)).astype(np.int16) - 32).astype(np.int8)
        ql = ((qs.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3).reshape(-1, 256)
        qh = ((hmask.reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1).reshape(-1, 256)
        q = ql | (qh << 2)  # 0..7, w = sc * (q - 4)
        return {"q": q.reshape(n, n_cols), "sc": s.reshape(n, -1).view(np.uint8), "d": _f16bits(blk[:, 108:110]).reshape(n, nb)}
    if qtype in (T.Q4_K, T.Q5_K):
        s, m = _k_scale_min(blk[:, 4:16])
        if qtype == T.Q4_K:
            qs = blk[:, 16:144]
            q = (qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 15
        else:
            qh, qs = blk[:, 16:48], blk[:, 48:176]
            ql = (qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 15
            h = (qh.reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
            q = ql.reshape(-1, 256) | (h.reshape(-1, 256) << 4)
        return {"q": q.reshape(n, n_cols), "sc": s.reshape(n, -1), "mn": m.reshape(n, -1),
                "d": _f16bits(blk[:, 0:2]).reshape(n, nb), "dm": _f16bits(blk[:, 2:4]).reshape(n, nb)}
    if qtype == T.Q6_K:
        ql, qh, scales = blk[:, :128], blk[:, 128:192], blk[:, 192:208]
        lo = ((ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 15).reshape(-1, 2, 4, 32)
        hi = ((qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3).reshape(-1, 2, 4, 32)
        q = lo | (hi << 4)  # 0..63, w = sc * (q - 32)
        return {"q": q.reshape(n, n_cols), "sc": scales.reshape(n, -1).copy(), "d": _f16bits(blk[:, 208:210]).reshape(n, nb)}
    raise NotImplementedError(qtype)


def planes(qtype: T, n_rows: int, n_cols: int) -> list[tuple[str, str, int]]:
    """The planes a matrix takes: ``(key, arena, element count)`` with key in q/qh/sc/mn/d/dm/w
    (see :func:`pack_rows`) and arena in u8/i8/f32/u16 (fp16 scale fields)/h16 (F16, BF16 rows)."""
    qtype = T(qtype)
    fam = FAMILY_OF[qtype]
    ng = -(-n_rows // G)
    nb = n_cols // 32
    if fam == FAM_F32:
        return [("w", "f32", ng * G * n_cols)]
    if fam in (FAM_F16, FAM_BF16):
        return [("w", "h16", ng * G * n_cols)]
    kind, gs, has_mn, _ = LAYOUT[qtype]
    k = 32 // gs
    if fam == FAM_I8:
        out = [("q", "i8", ng * nb * 32 * G)]
    else:
        out = [("q", "u8", ng * nb * 16 * G)]
        if fam == FAM_N5:
            out.append(("qh", "u8", ng * nb * 4 * G))
        elif fam == FAM_N6:
            out.append(("qh", "u8", ng * nb * 8 * G))
    sarena = "u16" if kind == SK_F16 else "u8"
    out.append(("sc", sarena, ng * nb * k * G))
    if has_mn:
        out.append(("mn", sarena, ng * nb * k * G))
    if kind != SK_F16:
        out.append(("d", "u16", ng * (nb // 8) * G))
        if kind == SK_K:
            out.append(("dm", "u16", ng * (nb // 8) * G))
    return out


def _interleave(a: np.ndarray, ng: int) -> np.ndarray:
    """(ng*G, *rest) -> flat (ng, *rest, G): rows of a group become the innermost axis."""
    a = a.reshape(ng, G, *a.shape[1:])
    axes = (0,) + tuple(range(2, a.ndim)) + (1,)
    return np.ascontiguousarray(a.transpose(axes)).reshape(-1)


def _quads(codes: np.ndarray, ng: int) -> np.ndarray:
    """(ng*G, nb, nbytes) code bytes -> flat [g][b][nbytes / 4][G][4] (the kernels' quads)."""
    nb, nbytes = codes.shape[1], codes.shape[2]
    a = codes.reshape(ng, G, nb, nbytes // 4, 4)
    return np.ascontiguousarray(a.transpose(0, 2, 3, 1, 4)).reshape(-1)


def _pad_rows(a: np.ndarray, pad: int) -> np.ndarray:
    return np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) if pad else a


def pack_rows(qtype: T, raw: np.ndarray, n_cols: int, dst: dict[str, np.ndarray]):
    """Repack ``raw`` (uint8 (n, row_bytes), n a multiple of G except for the last chunk) into the
    planes ``dst`` (views of the arenas for exactly these rows' groups, keys of :func:`planes`)."""
    qtype = T(qtype)
    fam = FAMILY_OF[qtype]
    n = raw.shape[0]
    ng = -(-n // G)
    pad = ng * G - n
    if fam in (FAM_F32, FAM_F16, FAM_BF16):  # [group][k][G rows]
        dst["w"][:] = _interleave(_pad_rows(raw.view(np.float32 if fam == FAM_F32 else np.uint16), pad), ng)
        return
    f = decode(qtype, raw, n_cols)
    nb = n_cols // 32
    q = _pad_rows(f["q"], pad).reshape(ng * G, nb, 32)
    if fam == FAM_I8:
        dst["q"][:] = _quads(q.view(np.int8), ng)
    else:
        lo = q & 15
        dst["q"][:] = _quads(lo[..., :16] | (lo[..., 16:] << 4), ng)
        if fam == FAM_N5:  # bit 2j + h of byte i: weight 4j + i + 16 h
            hb = (q >> 4).reshape(ng * G, nb, 2, 4, 4)  # [h][j][i]
            byte = np.zeros((ng * G, nb, 4), np.uint8)
            for j in range(4):
                for h in range(2):
                    byte |= hb[:, :, h, j, :] << (2 * j + h)
            dst["qh"][:] = _quads(byte, ng)
        elif fam == FAM_N6:  # byte i of plane m: fields (2 bits) quad 2m lo, 2m hi, 2m+1 lo, 2m+1 hi
            hb = (q >> 4).reshape(ng * G, nb, 2, 4, 4)  # [h][j][i]
            byte = np.zeros((ng * G, nb, 2, 4), np.uint8)
            for m in range(2):
                for e in range(2):
                    for h in range(2):
                        byte[:, :, m, :] |= hb[:, :, h, 2 * m + e, :] << (4 * e + 2 * h)
            dst["qh"][:] = _quads(byte.reshape(ng * G, nb, 8), ng)
    for key in ("sc", "mn"):
        if key in dst:
            a = _pad_rows(f[key], pad)
            dst[key][:] = _interleave(a.reshape(ng * G, -1), ng)
    for key in ("d", "dm"):
        if key in dst:
            dst[key][:] = _interleave(_pad_rows(f[key], pad), ng)


#: columns of the int64 ``mats`` table (:class:`ggq.runtime.kernels.WeightArena`): family, ggml
#: type, shape, plane offsets (-1: none) into their arenas, scale kind, weights per scale group,
#: the ``moff`` of :data:`LAYOUT`
(C_FAM, C_QT, C_ROWS, C_COLS, C_OQ, C_OQH, C_OSC, C_OMN, C_OD, C_ODM, C_KIND, C_GS, C_MOFF) = range(13)
N_COLS_TABLE = 13
PLANE_COL = {"q": C_OQ, "w": C_OQ, "qh": C_OQH, "sc": C_OSC, "mn": C_OMN, "d": C_OD, "dm": C_ODM}
