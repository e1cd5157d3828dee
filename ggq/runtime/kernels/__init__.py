"""Compiled matrix products for every ggml type the runtime reads.

Weights are repacked at load time (:mod:`.repack`) into five integer families plus float rows,
all stored in five flat *arenas* (uint8, int8, float32, uint16 fp16 fields, uint16 F16/BF16 rows) described by an
int64 table ``mats`` (one row per matrix: family, n_rows, n_cols and plane offsets). One compiled
function, :func:`matmul`, dispatches on the family, so the whole forward pass can run inside a
single compiled call. Modules: ``act`` (activation quantization), ``floats`` (F32/F16/BF16),
``simd`` (vector registers and the int8 dot-product instructions as Numba intrinsics), ``nib``
(Q4_0/Q4_1/Q4_K, Q2_K/Q3_K), ``codes8`` (Q5_0/Q5_1/Q5_K, Q6_K, Q8_0/IQ4_NL): the integer
kernels, used for decoding and prompt batches alike.

:class:`WeightArena` builds the arenas; ``WeightArena.matmul`` is the Python entry the tests use.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit

from .act import quantize_act, quantize_act_par
from .fastpack import pack_rows_fast
from .fastpack import ready as fastpack_ready
from .floats import K_BF16, K_F16, bf16_to_f32, f16_to_f32, mm_f32, mm_half
from .int8 import mm_i8
from .nib import mm_nib
from .repack import (C_COLS, C_FAM, C_GS, C_KIND, C_MOFF, C_OD, C_ODM, C_OMN, C_OQ, C_OQH, C_OSC, C_QT, C_ROWS,
                     FAM_BF16, FAM_F16, FAM_F32, FAM_I8, FAM_N5, FAM_N6, FAMILY_OF, LAYOUT, N_COLS_TABLE, PLANE_COL,
                     SK_F16, SK_K, G, pack_rows, planes)

SUPPORTED_TYPES = tuple(FAMILY_OF)


@njit(cache=True)
def matmul(m, mats, u8, i8, f32, u16, h16, x, xq, xd, xs16, xs32, out):
    """out (T, n_rows) = x (T, n_cols) @ W[m].T for matrix ``m`` of ``mats``.

    Integer families read the quantized activations ``xq``/``xd``/``xs16``/``xs32`` (from
    :func:`quantize_act` of ``x``); float families read ``x``. An arena the file does not use is
    None, and the kernels reading it are not compiled (Numba prunes ``is not None`` branches on
    arguments at compile time): a file compiles only its types' kernels."""
    fam = mats[m, C_FAM]
    n_rows = mats[m, C_ROWS]
    n_cols = mats[m, C_COLS]
    oq = mats[m, C_OQ]
    n_pad = (n_rows + G - 1) // G * G
    if fam == FAM_F32:
        if f32 is not None:
            mm_f32(f32[oq:oq + n_pad * n_cols], n_rows, x, out)
    elif fam == FAM_F16 or fam == FAM_BF16:
        if h16 is not None:
            mm_half(h16[oq:oq + n_pad * n_cols], K_BF16 if fam == FAM_BF16 else K_F16, n_rows, x, out)
    elif fam == FAM_I8:
        if i8 is not None and u16 is not None:
            mm_i8(i8, u16, mats[m], xq, xd, out)
    elif u8 is not None and u16 is not None:
        mm_nib(u8, u16, mats[m], xq, xd, xs16, xs32, out)


@njit(cache=True, inline="always")
def _qi(base, nq, k, rr):
    """Index of weight ``k`` (0 .. 4 nq - 1) of row ``rr`` of block ``base`` in a quads plane of
    ``nq`` quads per block ([b][j][G][4])."""
    return ((base * nq + k // 4) * G + rr) * 4 + k % 4


@njit(cache=True)
def get_row(m, mats, u8, i8, f32, u16, h16, r, out):
    """Dequantize row ``r`` of matrix ``m`` into float32 ``out`` (n_cols,) (embedding lookup);
    equal to ``gguf.quants.dequantize`` bit for bit. Arenas as in :func:`matmul`."""
    fam = mats[m, C_FAM]
    if fam == FAM_F32:  # float planes: [group][k][G rows]
        if f32 is not None:
            n_cols = mats[m, C_COLS]
            o = mats[m, C_OQ] + (r // G) * n_cols * G + r % G
            for k in range(n_cols):
                out[k] = f32[o + k * G]
    elif fam == FAM_F16 or fam == FAM_BF16:
        if h16 is not None:
            n_cols = mats[m, C_COLS]
            o = mats[m, C_OQ] + (r // G) * n_cols * G + r % G
            for k in range(n_cols):
                h = h16[o + k * G]
                out[k] = f16_to_f32(h) if fam == FAM_F16 else bf16_to_f32(h)
    elif fam == FAM_I8:
        if i8 is not None and u16 is not None:
            _row_i8(mats[m], i8, u16, r, out)
    elif u8 is not None and u16 is not None:
        _row_nib(mats[m], u8, u16, r, out)


@njit(cache=True)
def _row_i8(o, i8, u16, r, out):
    oq, osc, nb = o[C_OQ], o[C_OSC], o[C_COLS] // 32
    g, rr = r // G, r % G
    for b in range(nb):
        base = g * nb + b
        s = f16_to_f32(u16[osc + base * G + rr])
        for kk in range(32):
            out[b * 32 + kk] = s * np.float32(i8[oq + _qi(base, 8, kk, rr)])


@njit(cache=True)
def _row_nib(o, u8, u16, r, out):
    fam, kind, gs, moff = o[C_FAM], o[C_KIND], o[C_GS], o[C_MOFF]
    oq, oqh, osc, omn, od, odm = o[C_OQ], o[C_OQH], o[C_OSC], o[C_OMN], o[C_OD], o[C_ODM]
    nb = o[C_COLS] // 32
    k = 32 // gs
    g, rr = r // G, r % G
    for b in range(nb):
        base = g * nb + b
        sbi = (g * (nb // 8) + b // 8) * G + rr
        for h in range(k):
            si = (base * k + h) * G + rr
            if kind == SK_F16:
                s = f16_to_f32(u16[osc + si])
                mn = f16_to_f32(u16[omn + si]) if omn >= 0 else np.float32(0.0)
            elif kind == SK_K:
                s = f16_to_f32(u16[od + sbi]) * np.float32(u8[osc + si])
                mn = -(f16_to_f32(u16[odm + sbi]) * np.float32(u8[omn + si]))
            else:
                s = f16_to_f32(u16[od + sbi]) * np.float32(np.int8(u8[osc + si]))
                mn = np.float32(0.0)
            for kk in range(h * gs, (h + 1) * gs):
                hi = kk // 16
                j = (kk % 16) // 4
                i = kk % 4
                byte = np.int64(u8[oq + ((base * 4 + j) * G + rr) * 4 + i])
                c = (byte >> 4) if hi else (byte & 15)
                if fam == FAM_N5:
                    hb = np.int64(u8[oqh + (base * G + rr) * 4 + i])
                    c |= ((hb >> (2 * j + hi)) & 1) << 4
                elif fam == FAM_N6:
                    hb = np.int64(u8[oqh + ((base * 2 + j // 2) * G + rr) * 4 + i])
                    c |= ((hb >> (4 * (j % 2) + 2 * hi)) & 3) << 4
                if omn >= 0:
                    out[b * 32 + kk] = s * np.float32(c) + mn
                else:  # w = sc * (q + moff), as the dequantizers compute it
                    out[b * 32 + kk] = s * np.float32(c + moff)


class WeightArena:
    """Repacked weights of many matrices in five flat arenas plus the int64 ``mats`` table.

    ``specs``: list of ``(qtype, n_rows, n_cols)``. Call :meth:`fill` for each matrix with its GGUF
    block bytes (uint8 (n_rows, row_bytes), e.g. a memmap view); rows are repacked ``chunk`` at a
    time so the temporary memory stays small. Raises ValueError for a type without a kernel.
    """

    def __init__(self, specs):
        sizes = dict(u8=0, i8=0, f32=0, u16=0, h16=0)
        self.mats = np.full((max(len(specs), 1), N_COLS_TABLE), -1, np.int64)
        self.specs = list(specs)
        for i, (qtype, n_rows, n_cols) in enumerate(self.specs):
            qtype = T(qtype)
            if qtype not in FAMILY_OF:
                raise ValueError(f"no kernel for {qtype.name}")
            fam = FAMILY_OF[qtype]
            if fam > FAM_BF16:
                if n_cols % 32:
                    raise ValueError(f"{qtype.name} row length {n_cols} is not a multiple of 32")
                kind, gs, _, moff = LAYOUT[qtype]
                self.mats[i, C_KIND] = kind
                self.mats[i, C_GS] = gs
                self.mats[i, C_MOFF] = moff
            self.mats[i, C_FAM] = fam
            self.mats[i, C_QT] = int(qtype)
            self.mats[i, C_ROWS] = n_rows
            self.mats[i, C_COLS] = n_cols
            for key, arena, count in planes(qtype, n_rows, n_cols):
                # keep every plane 64-byte aligned
                align = 64 // np.dtype(_DT[arena]).itemsize
                sizes[arena] = -(-sizes[arena] // align) * align
                self.mats[i, PLANE_COL[key]] = sizes[arena]
                sizes[arena] += count
        self._used = {k: v > 0 for k, v in sizes.items()}
        self.arenas = {k: _aligned_empty(max(v, 16), _DT[k]) for k, v in sizes.items()}
        self.nbytes = sum(a.nbytes for a in self.arenas.values())

    #: repack with the compiled loops of :mod:`.fastpack`: None when they are compiled already
    #: (:func:`.fastpack.ready`), True always, False never (numpy's :func:`.repack.pack_rows`)
    compiled_pack = None

    def fill(self, i: int, raw: np.ndarray, chunk: int = 64 * G, row0: int = 0, release=None):
        """Repack GGUF block bytes ``raw`` (uint8 (n, row_bytes), rows ``row0 .. row0 + n`` of matrix
        ``i``; ``row0`` a multiple of G, so one stacked matrix can be filled part by part) into
        matrix ``i``, ``chunk`` rows at a time; ``release(r0, r1)`` is called after rows
        ``r0 .. r1`` of ``raw`` are repacked (the loader drops their file pages)."""
        qtype, n_rows, n_cols = self.specs[i]
        n_pad = -(-n_rows // G) * G
        n = raw.shape[0]
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            r0, r1 = row0 + c0, row0 + c1
            dst = {}
            for key, arena, count in planes(qtype, n_rows, n_cols):
                off = int(self.mats[i, PLANE_COL[key]])
                per_row = count // n_pad
                dst[key] = self.arenas[arena][off + r0 * per_row:off + (-(-r1 // G) * G) * per_row]
            chunk_raw = np.asarray(raw[c0:c1])
            fast = self.compiled_pack if self.compiled_pack is not None else fastpack_ready(T(qtype))
            if not (fast and pack_rows_fast(T(qtype), FAMILY_OF[T(qtype)], chunk_raw, n_cols, dst)):
                pack_rows(qtype, chunk_raw, n_cols, dst)
            if release is not None:
                release(c0, c1)

    @property
    def args(self):
        """The arena arguments of :func:`matmul`/:func:`get_row`: mats, u8, i8, f32, u16, h16
        (None for an arena no matrix uses)."""
        a = self.arenas
        return (self.mats,) + tuple(a[k] if self._used[k] else None for k in ("u8", "i8", "f32", "u16", "h16"))

    def matmul(self, i: int, x: np.ndarray) -> np.ndarray:
        """x float32 (T, n_cols) -> float32 (T, n_rows) = x @ W_i.T (activations quantized here)."""
        n_rows, n_cols = int(self.mats[i, C_ROWS]), int(self.mats[i, C_COLS])
        x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, n_cols)
        xq, xd, xs16, xs32 = act_buffers(x.shape[0], n_cols)
        if n_cols % 32 == 0:
            quantize_act_par(x, xq, xd, xs16, xs32)
        out = np.zeros((x.shape[0], n_rows), np.float32)
        matmul(i, *self.args, x, xq, xd, xs16, xs32, out)
        return out

    def row(self, i: int, r: int) -> np.ndarray:
        """Row ``r`` of matrix ``i`` dequantized to float32 (n_cols,)."""
        out = np.empty(int(self.mats[i, C_COLS]), np.float32)
        get_row(i, *self.args, r, out)
        return out


_DT = dict(u8=np.uint8, i8=np.int8, f32=np.float32, u16=np.uint16, h16=np.uint16)


def _aligned_empty(n: int, dtype) -> np.ndarray:
    """Zeros (pages the OS maps on first write) of ``n`` elements whose data starts on a 64-byte
    boundary; the padding rows of a last, partial 64-row group stay zero."""
    dt = np.dtype(dtype)
    raw = np.zeros(n * dt.itemsize + 64, np.uint8)
    off = (-raw.ctypes.data) % 64
    return raw[off:off + n * dt.itemsize].view(dt)


def act_buffers(n_tok: int, n_cols: int):
    """Empty activation-quantization buffers (xq, xd, xs16, xs32) for ``n_tok`` rows of ``n_cols``."""
    nb = max(n_cols // 32, 1)
    return (np.zeros((n_tok, nb * 32), np.int8), np.zeros((n_tok, nb), np.float32),
            np.zeros((n_tok, 2 * nb), np.float32), np.zeros((n_tok, nb), np.float32))


__all__ = ["WeightArena", "matmul", "get_row", "quantize_act", "quantize_act_par", "act_buffers", "SUPPORTED_TYPES", "G"]
