"""Compiled load-time repacking: GGUF blocks straight into the kernels' planes.

:func:`.repack.pack_rows` (numpy) decodes a tensor into full code arrays and reorders them in
several passes: ~8 s for a 1 GB Q4_K_M file. These loops write each block's codes and scale
fields directly into the planes (:mod:`.repack`'s layouts) in one pass, parallel over groups of
``G`` rows: the time to first token of a large file is then the time to read it. One compiled
function per block size (32-weight legacy blocks, 256-weight K-quant super-blocks), compiled on
first use; the numpy path stays the reference they are tested against (equal planes, byte for
byte). Block layouts: ggml-common.h; decoding order: ``gguf.quants``' dequantizers.
"""

from __future__ import annotations

import os

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from numba import njit, prange

from .repack import FAM_N5, FAM_N6, G, IQ4_NL_VALUES

_LEGACY = {int(T.Q4_0): 0, int(T.Q4_1): 1, int(T.Q5_0): 2, int(T.Q5_1): 3, int(T.Q8_0): 4, int(T.IQ4_NL): 5}
_KQ = {int(T.Q2_K): 0, int(T.Q3_K): 1, int(T.Q4_K): 2, int(T.Q5_K): 3, int(T.Q6_K): 4}
#: float rows, moved as bit patterns: F32 as uint32, F16 and BF16 as uint16
_FLOAT = {int(T.F32): np.uint32, int(T.F16): np.uint16, int(T.BF16): np.uint16}


@njit(cache=True, inline="always")
def _put_block(codes, fam, base, rr, q, qh):
    """Write one 32-weight block's codes (uint8 (32,), natural order) of row ``rr`` (in its group)
    at block index ``base`` into the nibble quads ``q`` and, for N5/N6, the high-bit plane ``qh``."""
    for k in range(16):
        j, i = k // 4, k % 4
        q[((base * 4 + j) * G + rr) * 4 + i] = (np.int64(codes[k]) & 15) | ((np.int64(codes[k + 16]) & 15) << 4)
    if fam == FAM_N5:
        for i in range(4):
            byte = 0
            for j in range(4):
                byte |= ((np.int64(codes[4 * j + i]) >> 4) & 1) << (2 * j)
                byte |= ((np.int64(codes[4 * j + i + 16]) >> 4) & 1) << (2 * j + 1)
            qh[(base * G + rr) * 4 + i] = byte
    elif fam == FAM_N6:
        for m in range(2):
            for i in range(4):
                byte = 0
                for e in range(2):
                    j = 2 * m + e
                    byte |= ((np.int64(codes[4 * j + i]) >> 4) & 3) << (4 * e)
                    byte |= ((np.int64(codes[4 * j + i + 16]) >> 4) & 3) << (4 * e + 2)
                qh[((base * 2 + m) * G + rr) * 4 + i] = byte


@njit(cache=True, inline="always")
def _b(raw, r, o):
    """Byte ``o`` of row ``r`` as int64 (no unsigned/signed mixing in the arithmetic)."""
    return np.int64(raw[r, o])


@njit(cache=True, inline="always")
def _h(raw, r, o):
    """The fp16 bit pattern (uint16) at byte ``o`` of row ``r``."""
    return np.uint16(raw[r, o] | (np.uint16(raw[r, o + 1]) << np.uint16(8)))


@njit(cache=True, parallel=True)
def pack_legacy(kind, fam, raw, n_cols, q, qi, qh, sc, mn):
    """Rows of 32-weight blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL by ``kind``) -> planes. ``raw``
    uint8 (n, row_bytes), n rows starting at a group boundary; ``q``/``qh`` uint8, ``qi`` the int8
    code plane of Q8_0/IQ4_NL viewed as uint8, ``sc``/``mn`` uint16 fp16 patterns: views for
    exactly these rows' groups."""
    n = raw.shape[0]
    nb = n_cols // 32
    bs = raw.shape[1] // nb
    ng = (n + G - 1) // G
    lut = IQ4_NL_VALUES.view(np.uint8)
    for g in prange(ng):
        codes = np.empty(32, np.uint8)
        for rr in range(min(G, n - g * G)):
            r = g * G + rr
            for b in range(nb):
                o = b * bs
                base = g * nb + b
                si = base * G + rr
                sc[si] = _h(raw, r, o)
                if kind == 4:  # Q8_0: the 32 code bytes, 4 at a time, straight into the quads
                    for j in range(8):
                        dq = ((base * 8 + j) * G + rr) * 4
                        for i in range(4):
                            qi[dq + i] = raw[r, o + 2 + 4 * j + i]
                    continue
                if kind == 5:  # IQ4_NL: nibbles through the non-linear table
                    for k in range(32):
                        v = _b(raw, r, o + 2 + k % 16)
                        qi[((base * 8 + k // 4) * G + rr) * 4 + k % 4] = lut[(v >> 4) if k >= 16 else (v & 15)]
                    continue
                p = o + 2
                if kind == 1 or kind == 3:
                    mn[si] = _h(raw, r, o + 2)
                    p = o + 4
                qhv = np.uint32(0)
                if kind == 2 or kind == 3:
                    qhv = (np.uint32(_b(raw, r, p)) | (np.uint32(_b(raw, r, p + 1)) << 8) | (np.uint32(_b(raw, r, p + 2)) << 16)
                           | (np.uint32(_b(raw, r, p + 3)) << 24))
                    p += 4
                for k in range(16):
                    v = _b(raw, r, p + k)
                    codes[k] = v & 15
                    codes[k + 16] = v >> 4
                if kind == 2 or kind == 3:
                    for k in range(32):
                        codes[k] = np.int64(codes[k]) | (np.int64((qhv >> np.uint32(k)) & np.uint32(1)) << 4)
                _put_block(codes, fam, base, rr, q, qh)


@njit(cache=True, parallel=True)
def pack_k(kind, fam, raw, n_cols, q, qh, sc, mn, d, dm):
    """Rows of 256-weight K-quant super-blocks (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K by ``kind``) ->
    planes: codes, sub-block scales ``sc``/``mn`` (uint8; Q3_K/Q6_K's signed scales as int8 bit
    patterns), super-block ``d``/``dm`` (uint16 fp16 patterns). As :func:`pack_legacy`."""
    n = raw.shape[0]
    nsb = n_cols // 256
    nb = nsb * 8
    bs = raw.shape[1] // nsb
    ng = (n + G - 1) // G
    for g in prange(ng):
        codes = np.empty(256, np.uint8)
        s = np.empty(16, np.uint8)
        m = np.empty(16, np.uint8)
        for rr in range(min(G, n - g * G)):
            r = g * G + rr
            for sb in range(nsb):
                o = sb * bs
                di = (g * nsb + sb) * G + rr
                if kind == 0:  # Q2_K: scales[16], qs[64], d, dmin
                    for i in range(16):
                        s[i] = _b(raw, r, o + i) & 15
                        m[i] = _b(raw, r, o + i) >> 4
                    for h in range(2):
                        for sh in range(4):
                            for l in range(32):
                                codes[128 * h + 32 * sh + l] = (_b(raw, r, o + 16 + 32 * h + l) >> (2 * sh)) & 3
                    d[di] = _h(raw, r, o + 80)
                    dm[di] = _h(raw, r, o + 82)
                elif kind == 1:  # Q3_K: hmask[32], qs[64], scales[12], d
                    for i in range(16):
                        lo = (_b(raw, r, o + 96 + i % 8) >> (4 * (i // 8))) & 15
                        hi = (_b(raw, r, o + 104 + i % 4) >> (2 * (i // 4))) & 3
                        s[i] = ((lo | (hi << 4)) - 32) & 255
                    for h in range(2):
                        for sh in range(4):
                            for l in range(32):
                                nn = 128 * h + 32 * sh + l
                                ql = (_b(raw, r, o + 32 + 32 * h + l) >> (2 * sh)) & 3
                                hb = (_b(raw, r, o + l) >> (4 * h + sh)) & 1
                                codes[nn] = ql | (hb << 2)
                    d[di] = _h(raw, r, o + 108)
                elif kind == 2 or kind == 3:  # Q4_K / Q5_K: d, dmin, scales[12], (qh[32]), qs[128]
                    for i in range(4):
                        s[i] = _b(raw, r, o + 4 + i) & 63
                        m[i] = _b(raw, r, o + 8 + i) & 63
                        s[i + 4] = (_b(raw, r, o + 12 + i) & 15) | ((_b(raw, r, o + 4 + i) >> 6) << 4)
                        m[i + 4] = (_b(raw, r, o + 12 + i) >> 4) | ((_b(raw, r, o + 8 + i) >> 6) << 4)
                    p = o + 16 if kind == 2 else o + 48
                    for c in range(4):
                        for l in range(32):
                            v = _b(raw, r, p + 32 * c + l)
                            codes[64 * c + l] = v & 15
                            codes[64 * c + 32 + l] = v >> 4
                    if kind == 3:
                        for nn in range(256):
                            codes[nn] = np.int64(codes[nn]) | (((_b(raw, r, o + 16 + nn % 32) >> (nn // 32)) & 1) << 4)
                    d[di] = _h(raw, r, o)
                    dm[di] = _h(raw, r, o + 2)
                else:  # Q6_K: ql[128], qh[64], scales[16] (int8), d
                    for i in range(16):
                        s[i] = _b(raw, r, o + 192 + i)
                    for h in range(2):
                        for l in range(32):
                            a = _b(raw, r, o + 64 * h + l)
                            b = _b(raw, r, o + 64 * h + 32 + l)
                            hq = _b(raw, r, o + 128 + 32 * h + l)
                            codes[128 * h + l] = (a & 15) | ((hq & 3) << 4)
                            codes[128 * h + 32 + l] = (b & 15) | (((hq >> 2) & 3) << 4)
                            codes[128 * h + 64 + l] = (a >> 4) | (((hq >> 4) & 3) << 4)
                            codes[128 * h + 96 + l] = (b >> 4) | (((hq >> 6) & 3) << 4)
                    d[di] = _h(raw, r, o + 208)
                per16 = kind == 0 or kind == 1 or kind == 4
                for b8 in range(8):
                    base = g * nb + sb * 8 + b8
                    if per16:
                        for hh in range(2):
                            sc[(base * 2 + hh) * G + rr] = s[2 * b8 + hh]
                            if kind == 0:
                                mn[(base * 2 + hh) * G + rr] = m[2 * b8 + hh]
                    else:
                        sc[base * G + rr] = s[b8]
                        mn[base * G + rr] = m[b8]
                    _put_block(codes[32 * b8:32 * b8 + 32], fam, base, rr, q, qh)


@njit(cache=True, parallel=True)
def pack_float(raw, w):
    """Float rows -> the ``[group][k][G rows]`` plane of :mod:`.repack` (its ``_interleave``): ``raw``
    uint16 or uint32 (n, n_cols) element bit patterns, n rows from a group boundary; ``w`` the same
    dtype, the plane for exactly these rows' groups (a last group's padding rows stay as they are:
    zero). Per group, column by column: contiguous writes, and the G rows' cache lines being read
    stay in L1 for the next columns."""
    n, n_cols = raw.shape
    ng = (n + G - 1) // G
    for g in prange(ng):
        m = min(G, n - g * G)
        r0 = g * G
        base = g * n_cols * G
        for k in range(n_cols):
            o = base + k * G
            for rr in range(m):
                w[o + rr] = raw[r0 + rr, k]


def pack_rows_fast(qtype: T, fam: int, raw: np.ndarray, n_cols: int, dst: dict[str, np.ndarray]) -> bool:
    """Repack ``raw`` into ``dst`` (as :func:`.repack.pack_rows`) with the compiled loops; False
    for a type they do not cover (the caller falls back to numpy)."""
    qt = int(qtype)
    e8 = np.empty(0, np.uint8)
    e16 = np.empty(0, np.uint16)
    raw = np.ascontiguousarray(raw)
    if qt in _FLOAT:
        dt = _FLOAT[qt]
        pack_float(raw.view(dt).reshape(raw.shape[0], n_cols), dst["w"].view(dt))
        return True
    if qt in _LEGACY:
        kind = _LEGACY[qt]
        i8 = kind >= 4
        pack_legacy(kind, fam, raw, n_cols, e8 if i8 else dst["q"], dst["q"].view(np.uint8) if i8 else e8,
                    dst.get("qh", e8), dst["sc"], dst.get("mn", e16))
        return True
    if qt in _KQ:
        pack_k(_KQ[qt], fam, raw, n_cols, dst["q"], dst.get("qh", e8), dst["sc"], dst.get("mn", e8), dst["d"],
               dst.get("dm", e16))
        return True
    return False


def _packer(qtype):
    qt = int(qtype)
    return pack_legacy if qt in _LEGACY else pack_k if qt in _KQ else pack_float if qt in _FLOAT else None


def ready(qtype: T) -> bool:
    """Whether the compiled packer of ``qtype`` costs no compile now: already compiled in this
    process or in Numba's on-disk cache. On a fresh install the loader repacks with numpy instead
    (a compile takes ~7 s, longer than numpy needs for a small file), and :func:`precompile` builds
    the packers in the background for the next load."""
    fn = _packer(qtype)
    if fn is None:
        return False
    if fn.signatures:
        return True
    try:
        return os.path.exists(fn._cache._cache_file._index_path)
    except AttributeError:  # a Numba without this cache layout: compile on use
        return True


def precompile(qtypes) -> None:
    """Compile (or load) the packers of ``qtypes`` by repacking one zero block of each."""
    from . import WeightArena

    for qt in qtypes:
        if _packer(qt) is None:
            continue
        a = WeightArena([(qt, G, 256)])
        a.compiled_pack = True
        bs, ts = GGML_QUANT_SIZES[T(qt)]
        row_bytes = 256 // bs * ts
        raw = np.zeros((G, row_bytes), np.uint8)
        raw.flags.writeable = False  # the loader's rows are read-only views of the map: same signature
        a.fill(0, raw)

