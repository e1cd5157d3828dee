"""Importing GPTQ, AWQ and compressed-tensors checkpoints, keeping their integer codes.

:func:`prepare` is called by the converter right after :func:`ggq.convert.checkpoint.open_checkpoint`.
For a quantized checkpoint it replaces, in ``ck.tensors``, each group of packed tensors
(``qweight``/``qzeros``/``scales``/``g_idx``, or ``weight_packed``/``weight_scale``/...) by one
logical :class:`~ggq.convert.checkpoint.TensorSource` named like the float weight
(``model.layers.0.self_attn.q_proj.weight``), of shape ``(out_features, in_features)``, whose

* ``loader()`` returns the float32 weights ``s * (q - z)`` the checkpoint decodes to, computed
  exactly (an fp16 scale times an integer of at most 9 bits is exact in float32);
* ``native(qtype)`` returns the ggml block bytes (uint8 ``(out_features, row_bytes)``, one row
  per output feature) that decode to exactly those weights when the codes fit ``qtype``, or None.

Every checkpoint format decodes a weight as ``w = s[g] * (q - z[g])`` with ``q`` the integer
code, ``g`` the weight's group (``g_idx[i]``, by default ``i // group_size``) and ``s``, ``z``
the group's scale and integer zero point. A 32-weight ggml block can hold that exactly when the
32 inputs of the block share one group (``group_size % 32 == 0`` and ``g_idx`` sorted, i.e. no
act-order) and ``d = s`` survives fp16:

========  =====================================  ==========================================
type      block value                            holds the codes when
========  =====================================  ==========================================
Q4_0      ``d * (c - 8)``, c in 0..15             ``q - z`` in -8..7 (sym <= 4 bit, asym <= 3)
Q5_0      ``d * (c - 16)``, c in 0..31            ``q - z`` in -16..15 (every 4-bit code)
Q8_0      ``d * c``, c in -128..127               ``q - z`` in -128..127 (every code up to 7 bit)
Q4_1/Q5_1 ``d * c + m``, c = q, m = -s*z in fp16  q fits; ``m`` is rounded to fp16 (see lost)
========  =====================================  ==========================================

The format descriptions are in ``specs/gptq-awq.md``.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGMLQuantizationType

from ggq.errors import GGQError, show

T = GGMLQuantizationType

__all__ = ["QuantizedInfo", "prepare", "unpack_bits", "QuantizedWeight"]


# ------------------------------------------------------------------------ bit unpacking

def unpack_bits(packed: np.ndarray, bits: int, n: int, axis: int = 0) -> np.ndarray:
    """Unpack ``bits``-bit unsigned codes from int32 words along ``axis``.

    ``packed``: int32/uint32 2-D array; along ``axis`` the words form one little-endian bit stream
    per line (code ``k`` occupies bits ``k*bits .. k*bits+bits-1`` of the stream, word ``j`` holding
    stream bits ``32*j .. 32*j+31``), which is how GPTQ packs every width, 3-bit included (its
    codes straddle words), and how compressed-tensors and AWQ-GEMV pack 2/4/8 bits.
    Returns uint8 with ``n`` codes along ``axis`` (the other axis unchanged).
    Raises ValueError when ``packed`` is too short for ``n`` codes.
    """
    p = np.ascontiguousarray(packed).view(np.uint32)
    if axis == 1:
        return unpack_bits(p.T, bits, n, 0).T
    words, cols = p.shape
    g = math.gcd(bits, 32)
    per_period, wpp = 32 // g, bits // g  # codes and words in one repeating period
    n_periods = -(-n // per_period)
    need = -(-n * bits // 32)
    if words < need:
        raise ValueError(f"{words} packed words hold fewer than {n} codes of {bits} bits")
    if words < n_periods * wpp:
        p = np.concatenate([p, np.zeros((n_periods * wpp - words, cols), np.uint32)])
    p = p[: n_periods * wpp].reshape(n_periods, wpp, cols)
    mask = np.uint32((1 << bits) - 1)
    out = np.empty((n_periods, per_period, cols), np.uint8)
    for j in range(per_period):
        pos = j * bits
        w, off = divmod(pos, 32)
        v = p[:, w] >> np.uint32(off)
        if off + bits > 32:
            v = v | (p[:, w + 1] << np.uint32(32 - off))
        out[:, j] = v & mask
    return out.reshape(n_periods * per_period, cols)[:n]


# ------------------------------------------------------------------------ ggml block writers

def _blocks(codes: np.ndarray) -> np.ndarray:
    rows, n = codes.shape
    return codes.reshape(rows, n // 32, 32)


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.astype(np.float16)).view(np.uint8).reshape(*x.shape, 2)


def _nibbles(c: np.ndarray) -> np.ndarray:
    """(rows, nb, 32) codes 0..15 -> (rows, nb, 16) bytes: low nibble weight j, high nibble j+16."""
    c = c.astype(np.uint8)
    return (c[..., :16] & 0xF) | ((c[..., 16:] & 0xF) << 4)


def _qh(c: np.ndarray) -> np.ndarray:
    """(rows, nb, 32) 5-bit codes -> (rows, nb, 4) little-endian uint32 of their fifth bits."""
    hi = ((c.astype(np.uint32) >> 4) & 1) << np.arange(32, dtype=np.uint32)
    return np.ascontiguousarray(hi.sum(axis=-1, dtype=np.uint32)).view(np.uint8).reshape(*c.shape[:-1], 4)


def write_blocks(qtype: GGMLQuantizationType, codes: np.ndarray, d: np.ndarray, m: np.ndarray | None = None) -> np.ndarray:
    """Assemble ggml block bytes from integer codes and per-block fp16 scales.

    ``codes``: int (rows, n) with n % 32 == 0: the block's stored value *before* its offset, i.e.
    ``c - 8`` for Q4_0 (-8..7), ``c - 16`` for Q5_0, the int8 value for Q8_0, the unsigned code for
    Q4_1 (0..15) / Q5_1 (0..31). ``d`` (and ``m`` for Q4_1/Q5_1): float (rows, n // 32), stored as
    fp16. Layouts as block_q4_0 / block_q4_1 / block_q5_0 / block_q5_1 / block_q8_0 in ggml-common.h
    (weight j in the low nibble of byte j, weight j+16 in the high nibble; Q5 fifth bits in qh).
    Returns uint8 (rows, n // 32 * type_size).
    """
    qtype = T(qtype)
    c = _blocks(np.asarray(codes))
    rows, nb, _ = c.shape
    dd = _fp16_bytes(d.reshape(rows, nb))
    if qtype == T.Q4_0:
        parts = [dd, _nibbles(c + 8)]
    elif qtype == T.Q5_0:
        u = c + 16
        parts = [dd, _qh(u), _nibbles(u)]
    elif qtype == T.Q8_0:
        parts = [dd, c.astype(np.int8).view(np.uint8)]
    elif qtype == T.Q4_1:
        parts = [dd, _fp16_bytes(m.reshape(rows, nb)), _nibbles(c)]
    elif qtype == T.Q5_1:
        parts = [dd, _fp16_bytes(m.reshape(rows, nb)), _qh(c), _nibbles(c)]
    else:
        raise ValueError(f"no block writer for {qtype.name}")
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


# ------------------------------------------------------------------------ one quantized linear

#: codes ``q - z`` each type holds: (lowest, highest); None = unsigned code with fp16 m
_SIGNED_RANGE = {T.Q4_0: (-8, 7), T.Q5_0: (-16, 15), T.Q8_0: (-128, 127)}
_UNSIGNED_MAX = {T.Q4_1: 15, T.Q5_1: 31}
NATIVE_TYPES = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)


def _as_ggml_type(qtype) -> GGMLQuantizationType | None:
    if isinstance(qtype, GGMLQuantizationType):
        return qtype
    if isinstance(qtype, str):
        try:
            return T[qtype.upper()]
        except KeyError:
            return None  # a file type such as Q4_K_M
    try:
        return T(int(qtype))
    except (ValueError, TypeError):
        return None


@dataclass
class QuantizedWeight:
    """One quantized linear layer's decoded parts, all in torch order (row = output feature).

    ``q``: uint8 (out, in) unsigned codes; ``scales``: float32 (out, n_groups) (exact copies of the
    stored fp16/bf16/f32 scales); ``zeros``: int16 (out, n_groups) integer zero points (after the
    format's offset); ``g_idx``: int (in,) group of each input feature.
    """

    q: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    g_idx: np.ndarray

    def dequantize(self) -> np.ndarray:
        """float32 (out, in): ``scales[:, g_idx] * (q - zeros[:, g_idx])``, exact in float32."""
        s = self.scales[:, self.g_idx]
        z = self.zeros[:, self.g_idx].astype(np.float32)
        return s * (self.q.astype(np.float32) - z)

    def block_groups(self) -> np.ndarray | None:
        """int (in // 32,) group of each 32-weight block, or None when a block spans two groups."""
        n = self.g_idx.shape[0]
        if n % 32:
            return None
        g = self.g_idx.reshape(-1, 32)
        if not (g == g[:, :1]).all():
            return None
        return g[:, 0]

    def to_blocks(self, qtype) -> tuple[np.ndarray | None, str]:
        """(block bytes or None, reason). Bytes are uint8 (out, row_bytes) when the codes map to
        ``qtype``: every block in one group, the scale exact in fp16, the codes in range."""
        qt = _as_ggml_type(qtype)
        if qt not in NATIVE_TYPES:
            return None, f"{qtype} has no block that holds these codes"
        bg = self.block_groups()
        if bg is None:
            return None, "blocks of 32 inputs span several groups (act-order or group size not a multiple of 32)"
        s = self.scales[:, bg]  # (out, nb) float32
        with np.errstate(over="ignore"):  # a scale beyond fp16 is simply not exact in it
            exact = np.array_equal(s.astype(np.float16).astype(np.float32), s)
        if not exact:
            return None, "scales are not exact in fp16"
        z = self.zeros[:, bg].astype(np.int32)
        out, n = self.q.shape
        q = self.q.reshape(out, n // 32, 32).astype(np.int32)
        if qt in _SIGNED_RANGE:
            lo, hi = _SIGNED_RANGE[qt]
            c = q - z[..., None]
            if c.min(initial=0) < lo or c.max(initial=0) > hi:
                return None, f"codes q - z span {c.min()}..{c.max()}, beyond {qt.name}'s {lo}..{hi}"
            return write_blocks(qt, c.reshape(out, n), s), ""
        if q.max(initial=0) > _UNSIGNED_MAX[qt]:
            return None, f"codes exceed {qt.name}'s {_UNSIGNED_MAX[qt]}"
        m = -s * z.astype(np.float32)
        if not np.isfinite(m.astype(np.float16)).all():
            return None, "m = -s*z overflows fp16"
        return write_blocks(qt, q.reshape(out, n), s, m), ""


# ------------------------------------------------------------------------ info

@dataclass
class QuantizedInfo:
    """What :func:`prepare` found: the checkpoint's quantization and the type that keeps it.

    ``method``: "gptq", "awq" or "compressed-tensors"; ``bits``; ``group_size`` (-1: one group
    per row); ``sym``; ``desc_act`` (act-order: ``g_idx`` not sorted); ``default_type``: the ggml
    file type used when the user gives none; ``fmt``: the packing ("gptq", "gptq_v2", "gemm",
    "gemv", "pack-quantized"); ``reason``: why ``default_type`` was chosen.
    ``m_error``: filled by ``native(Q4_1/Q5_1)`` calls: the largest ``|fp16(m) - m| / s`` seen
    (the shift of a block in units of its quantization step).
    """

    method: str
    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    default_type: str = "Q8_0"
    fmt: str = ""
    reason: str = ""
    m_error: float = 0.0
    n_tensors: int = 0
    stats: dict = field(default_factory=dict)

    def _blocks_ok(self) -> bool:
        return not self.desc_act and (self.group_size == -1 or self.group_size % 32 == 0)

    def _code_range(self) -> tuple[int, int]:
        """Range of ``q - z`` this configuration can produce."""
        top = (1 << self.bits) - 1
        if self.sym:
            half = 1 << (self.bits - 1)
            return -half, top - half
        zmax = top + 1 if self.fmt == "gptq" else top  # GPTQ v1 stores z - 1, so z reaches 2^bits
        return -zmax, top

    def holds(self, qtype) -> bool:
        """True if every tensor of such a checkpoint maps losslessly (up to fp16 m for Q4_1/Q5_1)."""
        qt = _as_ggml_type(qtype)
        if qt not in NATIVE_TYPES or not self._blocks_ok():
            return False
        if qt in _SIGNED_RANGE:
            lo, hi = self._code_range()
            return _SIGNED_RANGE[qt][0] <= lo and hi <= _SIGNED_RANGE[qt][1]
        return (1 << self.bits) - 1 <= _UNSIGNED_MAX[qt]

    def lost(self, qtype) -> str | None:
        """One line saying what converting to ``qtype`` (a ggml type or file type name) loses.

        None when the GGUF decodes to exactly the checkpoint's weights. For Q4_1/Q5_1 the codes
        and scales are kept but ``m = -s*z`` is rounded to fp16 (at most 2^-11 |m|, i.e. a shift of
        at most 2^(bits-11) quantization steps per block).
        """
        name = qtype.name if isinstance(qtype, GGMLQuantizationType) else str(qtype).upper()
        qt = _as_ggml_type(qtype)
        what = f"{self.method} {self.bits}-bit"
        if qt in (T.F32,):
            return None
        if qt in (T.F16, T.BF16):
            return f"{what} weights stored as {name}: scales times codes rounded to {name} (the codes are not kept)"
        if self.holds(qtype):
            if qt in _UNSIGNED_MAX and not self.sym:
                steps = 2.0 ** (self.bits + (1 if self.fmt == "gptq" else 0) - 11)
                return (f"{name} keeps the {what} codes and scales but rounds m = -s*z to fp16: each block "
                        f"shifts by up to {steps:g} of a quantization step (Q5_0 and Q8_0 keep them exactly)")
            return None
        if not self._blocks_ok():  # the same for every type: one warning
            why = ("act-order (g_idx not sorted): 32-weight blocks mix groups" if self.desc_act
                   else f"group size {self.group_size} is not a multiple of 32")
            return f"{what} codes cannot be kept in ggml blocks ({why}): weights dequantized and quantized again"
        if qt in NATIVE_TYPES:
            why = f"its blocks cannot hold {self.bits}-bit {'symmetric' if self.sym else 'asymmetric'} codes"
        else:
            why = f"{name} blocks cannot hold the codes"
        return f"{what} codes are not kept in {name} ({why}): weights dequantized and quantized again"


def _pick_default(info: QuantizedInfo) -> None:
    """Choose ``info.default_type``: the smallest type that keeps the codes, else a requantization target."""
    for t, why in (("Q4_0", "holds the codes exactly"), ("Q4_1", "holds the 4-bit codes and scales, m in fp16"),
                   ("Q5_0", "holds the codes exactly"), ("Q8_0", "holds the codes exactly")):
        if info.holds(t):
            if t == "Q4_1" and info.sym:
                continue
            info.default_type, info.reason = t, why
            return
    # codes cannot be kept: requantize to the type nearest in size with the least added error
    import importlib.util

    if info.bits <= 4 and importlib.util.find_spec("ggq.quants.q4_k") is not None:
        info.default_type = "Q4_K_M"
        info.reason = "codes cannot be kept; Q4_K_M is the nearest size with the least requantization error"
    else:
        info.default_type = "Q8_0"
        info.reason = "codes cannot be kept; Q8_0 adds the least requantization error"


# ------------------------------------------------------------------------ detection

def _read_qconfig(ck) -> dict | None:
    qc = ck.config.get("quantization_config")
    if isinstance(qc, dict) and qc:
        return qc
    p = Path(ck.path) / "quantize_config.json"
    if p.is_file():
        try:
            qc = json.loads(p.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise GGQError(f"{p}: invalid JSON ({e})") from None
        if not isinstance(qc, dict):
            raise GGQError(f"{p}: not a JSON object")
        qc.setdefault("quant_method", "gptq")  # AutoGPTQ's file predates the key
        return qc
    return None


def _ct_format(qc: dict) -> str:
    """compressed-tensors' format: the config's, else the first group's ("" if none)."""
    fmt = qc.get("format")
    groups = qc.get("config_groups")
    if not fmt and isinstance(groups, dict):
        fmt = next((g.get("format") for g in groups.values() if isinstance(g, dict) and g.get("format")), None)
    return str(fmt or "").lower()


def _ct_float(qc: dict) -> bool:
    """True when a compressed-tensors config quantizes weights to a float type (FP8)."""
    groups = qc.get("config_groups")
    return isinstance(groups, dict) and any(
        isinstance(g, dict) and isinstance(g.get("weights"), dict) and str(g["weights"].get("type")).lower() == "float"
        for g in groups.values())


def prepare(ck) -> QuantizedInfo | None:
    """Detect a quantized checkpoint and replace its packed tensors by logical weights.

    ``ck``: a :class:`ggq.convert.checkpoint.Checkpoint`, modified in place. Returns None for a
    plain float checkpoint (no ``quantization_config`` in config.json and no
    ``quantize_config.json``), else a :class:`QuantizedInfo`. Raises GGQError for an unknown
    ``quant_method``, an unsupported bit width or format, or tensors that do not match the config.
    """
    qc = _read_qconfig(ck)
    if qc is None:
        return None
    method = str(qc.get("quant_method", "")).lower().replace("_", "-")
    where = f"{ck.path}/config.json"
    if method == "gptq":
        from ggq.convert.quantized.gptq import prepare_gptq as run
    elif method == "awq":
        from ggq.convert.quantized.awq import prepare_awq as run
    elif method == "compressed-tensors" and _ct_format(qc) in ("float-quantized", "naive-quantized") and _ct_float(qc):
        from ggq.convert.quantized.fp8 import prepare_ct_float as run
    elif method == "compressed-tensors":
        from ggq.convert.quantized.compressed import prepare_compressed as run
    elif method == "fp8":
        from ggq.convert.quantized.fp8 import prepare_fp8 as run
    elif method == "bitsandbytes":
        from ggq.convert.quantized.bnb import prepare_bnb as run
    else:
        raise GGQError(f"{where}: quantization_config.quant_method {show(qc.get('quant_method'))} is not supported "
                       "(ggq imports gptq, awq, compressed-tensors, bitsandbytes and fp8)")
    info = run(ck, qc)
    if info.n_tensors == 0:
        raise GGQError(f"{where}: quantization_config says {method}, but no tensor of the checkpoint is packed that way")
    if not info.reason:  # a format module may have chosen its default itself
        _pick_default(info)
    return info


def make_source(name: str, shape: tuple[int, int], dtype: str, decode: Callable[[], QuantizedWeight],
                info: QuantizedInfo, origin: str, parts=()):
    """A TensorSource whose loader dequantizes and whose native(qtype) maps the codes (see module doc).

    ``parts``: the packed TensorSources it reads (released together with it)."""
    from ggq.convert.checkpoint import TensorSource

    parts = [p for p in parts if p is not None]

    def releaser() -> None:
        for p in parts:
            if hasattr(p, "release"):
                p.release()

    def checked() -> QuantizedWeight:
        qw = decode()
        if not np.isfinite(qw.scales).all():
            raise GGQError(f"{origin}: the scales of {show(name)} are not all finite")
        return qw

    def loader() -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            w = checked().dequantize()
        if not np.isfinite(w).all():
            raise GGQError(f"{origin}: the scales of {show(name)} put its weights beyond float32's range")
        return w

    def native(qtype):
        qt = _as_ggml_type(qtype)
        if qt not in NATIVE_TYPES:
            return None
        qw = checked()
        data, why = qw.to_blocks(qt)
        if data is None:
            info.stats.setdefault("not_native", {})[name] = why
            if info.holds(qt) and why not in info.stats.setdefault("warned", set()):
                # the config promised a lossless mapping but this tensor's data does not fit it
                info.stats["warned"].add(why)
                print(f"ggq: warning: {origin}: {name} is not kept in {qt.name} ({why}): dequantized and "
                      "quantized again", file=sys.stderr)
            return None
        if qt in _UNSIGNED_MAX:
            bg = qw.block_groups()
            s = qw.scales[:, bg]
            m = -s * qw.zeros[:, bg].astype(np.float32)
            with np.errstate(over="ignore", invalid="ignore"):
                err = np.abs(m.astype(np.float16).astype(np.float32) - m) / np.where(s == 0, 1, np.abs(s))
            e = float(err.max(initial=0.0))
            info.m_error = max(info.m_error, e)
            info.stats.setdefault("m_error", {})[name] = e
        return data

    src = TensorSource(name, tuple(shape), dtype, loader, native, origin)
    if hasattr(src, "releaser"):
        src.releaser = releaser
    return src


def replace_tensors(ck, repl: dict, info: QuantizedInfo) -> None:
    """Rebuild ``ck.tensors`` with each ``repl[first] = (source, removed_names)`` group replaced by
    ``source`` at the position of ``first``, keeping the order of every other tensor."""
    gone = {n for _, removed in repl.values() for n in removed}
    new = {}
    for k, t in ck.tensors.items():
        if k in repl:
            src = repl[k][0]
            if src.name in ck.tensors and src.name not in gone:
                raise GGQError(f"{t.origin}: {src.name} is stored both as a float tensor and packed")
            new[src.name] = src
        elif k not in gone:
            new[k] = t
    ck.tensors.clear()
    ck.tensors.update(new)
    info.n_tensors += len(repl)
