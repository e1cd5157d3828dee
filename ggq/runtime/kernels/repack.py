"""Load-time repacking of GGUF tensors into the runtime's row-interleaved layouts.

Every quantized ggml type is first decoded (numpy, a few rows at a time) into integer codes ``q``
and per-group float scales/offsets with ``w = sc * q + mn`` exactly (group = 16 or 32 weights),
following the block layouts of ggml-common.h (the same decoding as ``gguf.quants``' dequantizers,
stopped before the multiply). The codes are then stored in one of five *families*, with the rows
of a matrix interleaved by ``G`` (so the compiled dot products vectorize over ``G`` rows) and the
32-weight blocks kept whole:

=========  ===========================================  ==============================
family     planes ([group][block][...][G] each)          ggml types
=========  ===========================================  ==============================
``N32``    nibbles u8 [16] (lo = w[j], hi = w[j+16]),   Q4_0, Q4_1, Q4_K
           sc, mn f32 per 32
``N16``    nibbles u8 [16], sc, mn f32 per 16 ([2])     Q2_K, Q3_K
``N5``     codes 0..31 int8 [32], sc, mn f32 per 32       Q5_0, Q5_1, Q5_K
``I8_32``  int8 [32], sc f32 per 32                     Q8_0, IQ4_NL
``I8_16``  int8 [32], sc f32 per 16 ([2])               Q6_K
=========  ===========================================  ==============================

F32 rows are copied as they are, F16/BF16 rows kept as uint16 (converted in the kernel). The
float scale of a K-quant sub-block (fp16 d times a 6/8-bit scale) is exact in float32, so the
repacked weights equal ``gguf.quants.dequantize`` bit for bit.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T

#: rows interleaved per group (the vector width the kernels are written for)
G = 64

FAM_F32, FAM_F16, FAM_BF16, FAM_N32, FAM_N16, FAM_N5, FAM_I8_32, FAM_I8_16 = range(8)
FAMILY_NAMES = ("F32", "F16", "BF16", "N32", "N16", "N5", "I8_32", "I8_16")

FAMILY_OF = {
    T.F32: FAM_F32, T.F16: FAM_F16, T.BF16: FAM_BF16,
    T.Q4_0: FAM_N32, T.Q4_1: FAM_N32, T.Q4_K: FAM_N32,
    T.Q2_K: FAM_N16, T.Q3_K: FAM_N16,
    T.Q5_0: FAM_N5, T.Q5_1: FAM_N5, T.Q5_K: FAM_N5,
    T.Q8_0: FAM_I8_32, T.IQ4_NL: FAM_I8_32,
    T.Q6_K: FAM_I8_16,
}

IQ4_NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)


def _f16(b: np.ndarray) -> np.ndarray:
    """uint8 (..., 2) little-endian fp16 bytes -> float32 (...)."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


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


def decode(qtype: T, raw: np.ndarray, n_cols: int):
    """Decode GGUF block bytes ``raw`` (uint8 (n, row_bytes)) of ``qtype`` into codes and scales.

    Returns ``(q, sc, mn, gs)``: ``q`` uint8 (or int8 for the I8 families) (n, n_cols) in the
    natural weight order, ``sc``/``mn`` float32 (n, n_cols // gs) with ``w = sc * q + mn`` (``mn``
    None for the I8 families), ``gs`` the group size (16 or 32). Block layouts follow
    ggml-common.h (block_q4_0 ... block_q6_K).
    """
    n = raw.shape[0]
    if qtype in (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.IQ4_NL):
        nb = n_cols // 32
        blk = raw.reshape(n, nb, -1)
        if qtype == T.Q8_0:
            return blk[..., 2:].copy().view(np.int8).reshape(n, n_cols), _f16(blk[..., 0:2]), None, 32
        if qtype == T.IQ4_NL:
            q = IQ4_NL_VALUES[_nibbles32(blk[..., 2:])]
            return q.reshape(n, n_cols), _f16(blk[..., 0:2]), None, 32
        d = _f16(blk[..., 0:2])
        if qtype in (T.Q4_1, T.Q5_1):
            mn = _f16(blk[..., 2:4])
            p = 4
        else:
            mn = d * np.float32(-8.0 if qtype == T.Q4_0 else -16.0)
            p = 2
        if qtype in (T.Q5_0, T.Q5_1):
            qh = np.ascontiguousarray(blk[..., p:p + 4]).view("<u4")  # (n, nb, 1)
            bits = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)
            q = _nibbles32(blk[..., p + 4:]) | (bits << 4)
        else:
            q = _nibbles32(blk[..., p:])
        return q.reshape(n, n_cols), d, mn, 32

    nb = n_cols // 256
    blk = raw.reshape(n * nb, -1)
    if qtype == T.Q2_K:
        scales, qs = blk[:, :16], blk[:, 16:80]
        d, dmin = _f16(blk[:, 80:82])[:, None], _f16(blk[:, 82:84])[:, None]
        sc = d * (scales & 15).astype(np.float32)
        mn = -dmin * (scales >> 4).astype(np.float32)
        q = (qs.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
        return q.reshape(n, n_cols), sc.reshape(n, -1), mn.reshape(n, -1), 16
    if qtype == T.Q3_K:
        hmask, qs, s12 = blk[:, :32], blk[:, 32:96], blk[:, 96:108]
        d = _f16(blk[:, 108:110])[:, None]
        lo = (s12[:, :8].reshape(-1, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)).reshape(-1, 16) & 15
        hi = (s12[:, 8:].reshape(-1, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)).reshape(-1, 16) & 3
        s = (lo | (hi << 4)).astype(np.float32) - 32.0
        sc = d * s
        ql = ((qs.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3).reshape(-1, 256)
        qh = ((hmask.reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1).reshape(-1, 256)
        q = ql | (qh << 2)  # 0..7, w = sc * (q - 4)
        return q.reshape(n, n_cols), sc.reshape(n, -1), (-4.0 * sc).reshape(n, -1), 16
    if qtype in (T.Q4_K, T.Q5_K):
        d, dmin = _f16(blk[:, 0:2])[:, None], _f16(blk[:, 2:4])[:, None]
        s, m = _k_scale_min(blk[:, 4:16])
        sc = d * s.astype(np.float32)
        mn = -dmin * m.astype(np.float32)
        if qtype == T.Q4_K:
            qs = blk[:, 16:144]
            q = (qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 15
        else:
            qh, qs = blk[:, 16:48], blk[:, 48:176]
            ql = (qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 15
            h = (qh.reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
            q = ql.reshape(-1, 256) | (h.reshape(-1, 256) << 4)
        return q.reshape(n, n_cols), sc.reshape(n, -1), mn.reshape(n, -1), 32
    if qtype == T.Q6_K:
        ql, qh, scales = blk[:, :128], blk[:, 128:192], blk[:, 192:208]
        d = _f16(blk[:, 208:210])[:, None]
        sc = d * scales.view(np.int8).astype(np.float32)
        lo = ((ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 15).reshape(-1, 2, 4, 32)
        hi = ((qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3).reshape(-1, 2, 4, 32)
        q = ((lo | (hi << 4)).astype(np.int16) - 32).astype(np.int8)
        return q.reshape(n, n_cols), sc.reshape(n, -1), None, 16
    raise NotImplementedError(qtype)


def planes(fam: int, n_rows: int, n_cols: int) -> list[tuple[str, str, int]]:
    """The planes a matrix of family ``fam`` takes: ``(key, arena, element count)`` with key in
    q/h/sc/mn/w (see :func:`pack_rows`) and arena in u8/i8/f32/u16/u32."""
    ng = -(-n_rows // G)
    nb = n_cols // 32
    if fam == FAM_F32:
        return [("w", "f32", n_rows * n_cols)]
    if fam in (FAM_F16, FAM_BF16):
        return [("w", "u16", n_rows * n_cols)]
    if fam in (FAM_N32, FAM_N16):
        k = 2 if fam == FAM_N16 else 1
        return [("q", "u8", ng * nb * 16 * G), ("sc", "f32", ng * nb * k * G), ("mn", "f32", ng * nb * k * G)]
    if fam == FAM_N5:
        return [("q", "i8", ng * nb * 32 * G), ("sc", "f32", ng * nb * G), ("mn", "f32", ng * nb * G)]
    k = 2 if fam == FAM_I8_16 else 1
    return [("q", "i8", ng * nb * 32 * G), ("sc", "f32", ng * nb * k * G)]


def _interleave(a: np.ndarray, ng: int) -> np.ndarray:
    """(ng*G, nb, *rest) -> (ng, nb, *rest, G): rows of a group become the innermost axis."""
    a = a.reshape(ng, G, *a.shape[1:])
    axes = (0,) + tuple(range(2, a.ndim)) + (1,)
    return a.transpose(axes)


def pack_rows(fam: int, qtype: T, raw: np.ndarray, n_cols: int, dst: dict[str, np.ndarray]):
    """Repack ``raw`` (uint8 (n, row_bytes), n a multiple of G except for the last chunk) into the
    family planes ``dst`` (views of the arenas for exactly these rows' groups): ``q`` (u8 nibbles
    or int8 codes), ``h`` (u32 high bits, N5), ``sc``/``mn`` (f32 per group), ``w`` (float rows)."""
    n = raw.shape[0]
    if fam == FAM_F32:
        dst["w"][:] = raw.view(np.float32).reshape(-1)
        return
    if fam in (FAM_F16, FAM_BF16):
        dst["w"][:] = raw.view(np.uint16).reshape(-1)
        return
    q, sc, mn, gs = decode(qtype, raw, n_cols)
    ng = -(-n // G)
    pad = ng * G - n
    nb = n_cols // 32
    if pad:
        q = np.concatenate([q, np.zeros((pad, n_cols), q.dtype)])
        sc = np.concatenate([sc, np.zeros((pad, sc.shape[1]), np.float32)])
        if mn is not None:
            mn = np.concatenate([mn, np.zeros((pad, mn.shape[1]), np.float32)])
    q = q.reshape(ng * G, nb, 32)
    k = 32 // gs  # scale groups per 32-weight block
    dst["sc"][:] = _interleave(sc.reshape(ng * G, nb, k), ng).reshape(-1)
    if fam in (FAM_N32, FAM_N16):
        nib = (q[..., :16] & 15) | ((q[..., 16:] & 15) << 4)
        dst["q"][:] = _interleave(nib, ng).reshape(-1)
        dst["mn"][:] = _interleave(mn.reshape(ng * G, nb, k), ng).reshape(-1)
    elif fam == FAM_N5:  # 5-bit codes 0..31 kept one per int8 (the kernel's fast path)
        dst["q"][:] = _interleave(q.view(np.int8), ng).reshape(-1)
        dst["mn"][:] = _interleave(mn.reshape(ng * G, nb, k), ng).reshape(-1)
    else:
        dst["q"][:] = _interleave(q.view(np.int8), ng).reshape(-1)
