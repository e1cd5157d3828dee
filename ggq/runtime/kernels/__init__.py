"""Compiled matrix products for every ggml type the runtime reads.

Weights are repacked at load time (:mod:`.repack`) into five integer families plus float rows,
all stored in five flat *arenas* (uint8, int8, float32, uint16, uint32 arrays) described by an
int64 table ``mats`` (one row per matrix: family, n_rows, n_cols and plane offsets). One compiled
function, :func:`matmul`, dispatches on the family, so the whole forward pass can run inside a
single compiled call. Modules: ``act`` (activation quantization), ``floats`` (F32/F16/BF16),
``nib`` (Q4_0/Q4_1/Q4_K, Q2_K/Q3_K), ``nib5`` (Q5_0/Q5_1/Q5_K), ``int8`` (Q8_0/IQ4_NL, Q6_K):
the integer kernels, used for decoding and batches of fewer than ``FLOAT_BATCH_MIN`` tokens;
``dequant``: larger prompt batches of the integer families (rows dequantized, float product
with the same 8-bit activations).

:class:`WeightArena` builds the arenas; ``WeightArena.matmul`` is the Python entry the tests use.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit

from .act import quantize_act, quantize_act_par
from .dequant import FLOAT_BATCH_MIN, mm_dequant
from .floats import bf16_to_f32, f16_to_f32, mm_f32, mm_half
from .int8 import mm_i8_16, mm_i8_32
from .nib import mm_n16, mm_n32
from .nib5 import mm_n5
from .repack import (FAM_BF16, FAM_F16, FAM_F32, FAM_I8_16, FAM_I8_32, FAM_N5, FAM_N16, FAM_N32, FAMILY_OF, G,
                     pack_rows, planes)

#: columns of the ``mats`` table
C_FAM, C_ROWS, C_COLS, C_OQ, C_OSC, C_OMN, C_OH = range(7)
_N_C = 7
_PLANE_COL = {"q": C_OQ, "w": C_OQ, "sc": C_OSC, "mn": C_OMN, "h": C_OH}

SUPPORTED_TYPES = tuple(FAMILY_OF)


@njit(cache=True)
def matmul(m, mats, u8, i8, f32, u16, u32, x, xq, xd, xs16, xs32, out):
    """out (T, n_rows) = x (T, n_cols) @ W[m].T for matrix ``m`` of ``mats``.

    Integer families read the quantized activations ``xq``/``xd``/``xs16``/``xs32`` (from
    :func:`quantize_act` of ``x``); float families read ``x``."""
    fam = mats[m, C_FAM]
    n_rows = mats[m, C_ROWS]
    n_cols = mats[m, C_COLS]
    oq = mats[m, C_OQ]
    osc = mats[m, C_OSC]
    omn = mats[m, C_OMN]
    nb = n_cols // 32
    ng = (n_rows + G - 1) // G
    if fam >= FAM_N32 and x.shape[0] >= FLOAT_BATCH_MIN:  # prompt batch: dequantize rows, float product
        ls = ng * nb * G
        n_sc = 2 * ls if fam == FAM_N16 or fam == FAM_I8_16 else ls
        nibbles = fam == FAM_N32 or fam == FAM_N16
        qu = u8[oq:oq + 16 * ls] if nibbles else u8[0:0]
        qi = i8[0:0] if nibbles else i8[oq:oq + 32 * ls]
        mnp = f32[omn:omn + n_sc] if fam == FAM_N32 or fam == FAM_N16 or fam == FAM_N5 else f32[0:0]
        mm_dequant(fam, qu, qi, f32[osc:osc + n_sc], mnp, n_rows, nb, xq, xd, out)
    elif fam == FAM_F32:
        mm_f32(f32[oq:oq + n_rows * n_cols], n_rows, n_cols, x, out)
    elif fam == FAM_F16 or fam == FAM_BF16:
        mm_half(u16[oq:oq + n_rows * n_cols], fam == FAM_BF16, n_rows, n_cols, x, out)
    elif fam == FAM_N32:
        ls = ng * nb * G
        mm_n32(u8[oq:oq + 16 * ls], f32[osc:osc + ls], f32[omn:omn + ls], n_rows, nb, xq, xd, xs32, out)
    elif fam == FAM_N16:
        ls = ng * nb * G
        mm_n16(u8[oq:oq + 16 * ls], f32[osc:osc + 2 * ls], f32[omn:omn + 2 * ls], n_rows, nb, xq, xd, xs16, out)
    elif fam == FAM_N5:
        ls = ng * nb * G
        mm_n5(i8[oq:oq + 32 * ls], f32[osc:osc + ls], f32[omn:omn + ls], n_rows, nb, xq, xd, xs32, out)
    elif fam == FAM_I8_32:
        ls = ng * nb * G
        mm_i8_32(i8[oq:oq + 32 * ls], f32[osc:osc + ls], n_rows, nb, xq, xd, out)
    elif fam == FAM_I8_16:
        ls = ng * nb * G
        mm_i8_16(i8[oq:oq + 32 * ls], f32[osc:osc + 2 * ls], n_rows, nb, xq, xd, out)


@njit(cache=True)
def get_row(m, mats, u8, i8, f32, u16, u32, r, out):
    """Dequantize row ``r`` of matrix ``m`` into float32 ``out`` (n_cols,) (embedding lookup)."""
    fam = mats[m, C_FAM]
    n_cols = mats[m, C_COLS]
    oq = mats[m, C_OQ]
    osc = mats[m, C_OSC]
    omn = mats[m, C_OMN]
    nb = n_cols // 32
    if fam == FAM_F32:
        for k in range(n_cols):
            out[k] = f32[oq + r * n_cols + k]
        return
    if fam == FAM_F16:
        for k in range(n_cols):
            out[k] = f16_to_f32(u16[oq + r * n_cols + k])
        return
    if fam == FAM_BF16:
        for k in range(n_cols):
            out[k] = bf16_to_f32(u16[oq + r * n_cols + k])
        return
    g = r // G
    rr = r % G
    for b in range(nb):
        base = g * nb + b
        if fam == FAM_N32 or fam == FAM_N16:
            if fam == FAM_N16:
                s0 = f32[osc + (2 * base) * G + rr]
                s1 = f32[osc + (2 * base + 1) * G + rr]
                m0 = f32[omn + (2 * base) * G + rr]
                m1 = f32[omn + (2 * base + 1) * G + rr]
            else:
                s0 = f32[osc + base * G + rr]
                s1 = s0
                m0 = f32[omn + base * G + rr]
                m1 = m0
            for j in range(16):
                v = np.int64(u8[oq + (base * 16 + j) * G + rr])
                lo = v & 15
                hi = v >> 4
                out[b * 32 + j] = s0 * np.float32(lo) + m0
                out[b * 32 + 16 + j] = s1 * np.float32(hi) + m1
        elif fam == FAM_N5:
            s0 = f32[osc + base * G + rr]
            m0 = f32[omn + base * G + rr]
            for j in range(32):
                out[b * 32 + j] = s0 * np.float32(i8[oq + (base * 32 + j) * G + rr]) + m0
        else:
            if fam == FAM_I8_16:
                s0 = f32[osc + (2 * base) * G + rr]
                s1 = f32[osc + (2 * base + 1) * G + rr]
            else:
                s0 = f32[osc + base * G + rr]
                s1 = s0
            for j in range(32):
                s = s0 if j < 16 else s1
                out[b * 32 + j] = s * np.float32(i8[oq + (base * 32 + j) * G + rr])


class WeightArena:
    """Repacked weights of many matrices in five flat arenas plus the int64 ``mats`` table.

    ``specs``: list of ``(qtype, n_rows, n_cols)``. Call :meth:`fill` for each matrix with its GGUF
    block bytes (uint8 (n_rows, row_bytes), e.g. a memmap view); rows are repacked ``chunk`` at a
    time so the temporary memory stays small. Raises ValueError for a type without a kernel.
    """

    def __init__(self, specs):
        sizes = dict(u8=0, i8=0, f32=0, u16=0, u32=0)
        self.mats = np.full((max(len(specs), 1), _N_C), -1, np.int64)
        self.specs = list(specs)
        for i, (qtype, n_rows, n_cols) in enumerate(self.specs):
            qtype = T(qtype)
            if qtype not in FAMILY_OF:
                raise ValueError(f"no kernel for {qtype.name}")
            fam = FAMILY_OF[qtype]
            if fam >= FAM_N32 and n_cols % 32:
                raise ValueError(f"{qtype.name} row length {n_cols} is not a multiple of 32")
            self.mats[i, C_FAM] = fam
            self.mats[i, C_ROWS] = n_rows
            self.mats[i, C_COLS] = n_cols
            for key, arena, count in planes(fam, n_rows, n_cols):
                # keep every plane 64-byte aligned
                align = 64 // np.dtype(_DT[arena]).itemsize
                sizes[arena] = -(-sizes[arena] // align) * align
                self.mats[i, _PLANE_COL[key]] = sizes[arena]
                sizes[arena] += count
        self.arenas = {k: _aligned_empty(max(v, 16), _DT[k]) for k, v in sizes.items()}
        self.nbytes = sum(a.nbytes for a in self.arenas.values())

    def fill(self, i: int, raw: np.ndarray, chunk: int = 64 * G):
        """Repack GGUF block bytes ``raw`` (uint8 (n_rows, row_bytes)) into matrix ``i``."""
        qtype, n_rows, n_cols = self.specs[i]
        fam = int(self.mats[i, C_FAM])
        for r0 in range(0, n_rows, chunk):
            r1 = min(n_rows, r0 + chunk)
            dst = {}
            for key, arena, count in planes(fam, n_rows, n_cols):
                off = int(self.mats[i, _PLANE_COL[key]])
                per_row = count // (n_rows if key == "w" else -(-n_rows // G) * G)
                a0 = off + r0 * per_row
                if key == "w":
                    dst[key] = self.arenas[arena][a0:off + r1 * per_row]
                else:
                    dst[key] = self.arenas[arena][a0:off + (-(-r1 // G) * G) * per_row]
            pack_rows(fam, T(qtype), np.asarray(raw[r0:r1]), n_cols, dst)

    @property
    def args(self):
        """The arena arguments of :func:`matmul`/:func:`get_row`: mats, u8, i8, f32, u16, u32."""
        a = self.arenas
        return self.mats, a["u8"], a["i8"], a["f32"], a["u16"], a["u32"]

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


_DT = dict(u8=np.uint8, i8=np.int8, f32=np.float32, u16=np.uint16, u32=np.uint32)


def _aligned_empty(n: int, dtype) -> np.ndarray:
    """np.empty of ``n`` elements whose data starts on a 64-byte boundary."""
    dt = np.dtype(dtype)
    raw = np.empty(n * dt.itemsize + 64, np.uint8)
    off = (-raw.ctypes.data) % 64
    return raw[off:off + n * dt.itemsize].view(dt)


def act_buffers(n_tok: int, n_cols: int):
    """Empty activation-quantization buffers (xq, xd, xs16, xs32) for ``n_tok`` rows of ``n_cols``."""
    nb = max(n_cols // 32, 1)
    return (np.zeros((n_tok, nb * 32), np.int8), np.zeros((n_tok, nb), np.float32),
            np.zeros((n_tok, 2 * nb), np.float32), np.zeros((n_tok, nb), np.float32))


__all__ = ["WeightArena", "matmul", "get_row", "quantize_act", "quantize_act_par", "act_buffers", "SUPPORTED_TYPES", "G"]
