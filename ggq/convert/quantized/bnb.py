"""BitsAndBytes checkpoints written by transformers' ``save_pretrained``: 4-bit NF4/FP4 and 8-bit LLM.int8.

Read with numpy from the safetensors files; neither bitsandbytes nor torch is needed. The formats
(bitsandbytes 0.50 ``functional.QuantState.as_dict(packed=True)`` and ``nn.Linear8bitLt``, as
transformers saves them; described in ``specs/imports.md``):

**4-bit** (``load_in_4bit``), per linear layer ``P`` with float weight ``(out, in)``, ``n = out * in``:

* ``P.weight``: uint8 ``(ceil(n / 2), 1)``: two 4-bit codes per byte over the row-major weights,
  weight ``2k`` in the high nibble, ``2k + 1`` in the low one;
* ``P.weight.absmax``: float32 ``(ceil(n / blocksize),)``, one scale per ``blocksize`` weights, or,
  with double quantization, uint8 codes of the scales;
* ``P.weight.quant_map``: float32 ``(16,)`` the code book (NF4 or FP4 levels in ``[-1, 1]``);
* ``P.weight.nested_absmax`` float32 ``(ceil(n_blocks / nested_blocksize),)`` and
  ``P.weight.nested_quant_map`` float32 ``(256,)`` (double quantization only);
* ``P.weight.quant_state.bitsandbytes__nf4`` (or ``__fp4``): uint8 bytes of a JSON object with
  ``quant_type``, ``blocksize``, ``dtype``, ``shape`` and, for double quantization,
  ``nested_blocksize``, ``nested_dtype``, ``nested_offset``.

Decode (``bitsandbytes.functional.dequantize_4bit``): ``absmax = nested_quant_map[a] *
nested_absmax[b // nested_blocksize] + nested_offset`` when nested (float32), then
``w = table[code] * absmax[i // blocksize]`` in float32, rounded to ``dtype``. bitsandbytes' CPU
and CUDA kernels use their built-in NF4/FP4 tables, not the stored ``quant_map``; ggq checks that
the stored map is that table and decodes with it.

**8-bit** (``load_in_8bit``): ``P.weight`` int8 ``(out, in)``, ``P.SCB`` float32 ``(out,)`` (the
absolute maximum of each row), ``P.weight_format`` uint8 scalar (0 = "row", the only layout saved).
Decode (``bitsandbytes.functional.int8_vectorwise_dequant``): ``w = (q * SCB) * (1/127)`` in
float32, ``1/127`` rounded to float32.
"""

from __future__ import annotations

import json
import math

import numpy as np
from gguf import GGMLQuantizationType

from ggq.convert.quantized import QuantizedInfo, _as_ggml_type, replace_tensors, write_blocks
from ggq.errors import GGQError, show

T = GGMLQuantizationType

#: bitsandbytes' NF4 levels (``functional.get_4bit_type("nf4")``, QLoRA, Dettmers et al. 2023), float32
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)
#: bitsandbytes' FP4 levels (``get_4bit_type("fp4")``: e2m1 with bias 2, in bit-pattern order, divided by 12)
FP4 = (np.array([0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
                np.float32) / np.float32(12.0)).astype(np.float32)
TABLES = {"nf4": NF4, "fp4": FP4}
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = ("float32", "float16", "bfloat16")
#: float32(1 / 127) as bitsandbytes multiplies by it (``7.874015718698502e-3``)
INV127 = np.float32(7.874015718698502e-3)
_QS_PREFIX = ".quant_state.bitsandbytes__"
_QS_MAX_BYTES = 4096


# ------------------------------------------------------------------------ decoding (pure numpy)

def round_to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 ``x`` rounded to ``dtype`` ("float32", "float16", "bfloat16"; round to nearest even,
    as torch's ``Tensor.to``) and returned as float32 of the same shape."""
    x = np.asarray(x, np.float32)
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        b = x.view(np.uint32).astype(np.uint64)
        b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16 << 16
        return b.astype(np.uint32).view(np.float32)
    return x


def unpack_nibbles(packed: np.ndarray, n: int) -> np.ndarray:
    """uint8 ``(ceil(n / 2),)`` (any shape, flattened) -> uint8 ``(n,)`` codes: byte ``k`` holds code
    ``2k`` in its high nibble and ``2k + 1`` in its low nibble (bitsandbytes' packing)."""
    p = np.asarray(packed, np.uint8).reshape(-1)
    out = np.empty(p.size * 2, np.uint8)
    out[0::2] = p >> 4
    out[1::2] = p & 0xF
    return out[:n]


def nested_absmax(codes: np.ndarray, code_book: np.ndarray, nested: np.ndarray, nested_blocksize: int,
                  offset: float) -> np.ndarray:
    """Double-quantized 4-bit scales: uint8 ``codes`` (n_blocks,), float32 ``code_book`` (256,),
    float32 ``nested`` (ceil(n_blocks / nested_blocksize),) -> float32 (n_blocks,)
    ``code_book[codes] * nested[i // nested_blocksize] + offset``, rounded as bitsandbytes rounds it
    (``dequantize_blockwise`` in float32, then ``+= offset`` in float32)."""
    c = np.asarray(codes, np.uint8).reshape(-1)
    s = np.repeat(np.asarray(nested, np.float32), nested_blocksize)[: c.size]
    return (code_book.astype(np.float32)[c] * s) + np.float32(offset)


def dequantize_4bit(packed: np.ndarray, absmax: np.ndarray, quant_type: str, blocksize: int,
                    shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Dequantize a bitsandbytes 4-bit tensor exactly as ``bitsandbytes.functional.dequantize_4bit``.

    ``packed``: uint8 holding ``prod(shape)`` codes (see :func:`unpack_nibbles`); ``absmax``: float32
    ``(ceil(n / blocksize),)`` (already un-nested); ``quant_type``: "nf4" or "fp4"; ``dtype``: the
    quant state's dtype, to which bitsandbytes rounds its output. Returns float32 ``shape``.
    """
    n = math.prod(shape)
    codes = unpack_nibbles(packed, n)
    scale = np.repeat(np.asarray(absmax, np.float32), blocksize)[:n]
    return round_to_dtype(TABLES[quant_type][codes] * scale, dtype).reshape(shape)


def dequantize_int8(q: np.ndarray, scb: np.ndarray) -> np.ndarray:
    """LLM.int8 weights: int8 ``q`` (out, in), float32 ``scb`` (out,) -> float32 (out, in)
    ``(q * scb) * float32(1/127)``, each product rounded to float32 as
    ``bitsandbytes.functional.int8_vectorwise_dequant`` computes it."""
    return (q.astype(np.float32) * np.asarray(scb, np.float32)[:, None]) * INV127


def _fp16(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return np.asarray(x).astype(np.float16).astype(np.float64)


def int8_to_q8_0(q: np.ndarray, scb: np.ndarray, baseline: np.ndarray | None = None) -> tuple[np.ndarray, dict]:
    """Map LLM.int8 rows onto Q8_0 blocks with the least squared error per block.

    ``q``: int8 (out, in), ``in % 32 == 0``; ``scb``: float32 (out,). The exact weights are
    ``w = s * q`` with the row scale ``s = SCB / 127``. A Q8_0 block stores ``d * c`` with ``d`` an
    fp16 and ``c`` int8, so for each row and each integer ``r`` with ``r * max|q| <= 127`` in the
    block, ``c = r * q`` and ``d = fp16(s / r)`` decode to ``w * (r * fp16(s / r) / s)``: every
    weight of the block carries the same relative error ``e(r) = |r * fp16(s / r) - s| / s``. For
    ``r = 1`` that is fp16's rounding of ``s`` (at most 2^-11); other ``r`` round ``s / r``
    differently and are often closer. Each block takes the ``r`` with the least ``e(r)`` allowed by
    its largest code (the sum of squares of the block's errors is ``e(r)^2 * s^2 * sum(q^2)``).
    ``baseline``: optional uint8 Q8_0 bytes of the same tensor (ggq's quantizer run on the
    dequantized weights); a block whose baseline has a smaller squared error against the float32
    dequantization (:func:`dequantize_int8`) keeps the baseline block, so the result is never
    worse than dequantize-then-quantize, block for block.

    Returns (uint8 (out, in // 32 * 34) Q8_0 bytes, stats) with stats ``{"r>1": fraction of blocks
    using a multiple, "baseline": fraction taken from the baseline}``.
    """
    out, n_in = q.shape
    nb = n_in // 32
    s = np.asarray(scb, np.float64) / 127.0                      # (out,) exact row scales
    r = np.arange(1, 128, dtype=np.float64)                      # (127,)
    d_r = _fp16(s[:, None] / r[None, :])                         # (out, 127)
    with np.errstate(invalid="ignore", divide="ignore"):
        err = np.abs(d_r * r[None, :] - s[:, None])
    err[~np.isfinite(err)] = np.inf
    # best r among 1..R for every R: running argmin along r
    best_r = np.empty((out, 127), np.int64)
    cur_e = np.full(out, np.inf)
    cur_r = np.ones(out, np.int64)
    for j in range(127):
        better = err[:, j] < cur_e
        cur_e = np.where(better, err[:, j], cur_e)
        cur_r = np.where(better, j + 1, cur_r)
        best_r[:, j] = cur_r
    qb = q.reshape(out, nb, 32).astype(np.int32)
    m = np.abs(qb).max(axis=-1)                                  # (out, nb)
    r_max = np.minimum(127 // np.maximum(m, 1), 127)             # (out, nb)
    rb = np.take_along_axis(best_r, r_max - 1, axis=1)           # (out, nb)
    d = np.take_along_axis(d_r, rb - 1, axis=1)                  # (out, nb)
    c = qb * rb[..., None]
    data = write_blocks(T.Q8_0, c.reshape(out, n_in), d.astype(np.float32)).reshape(out, nb, 34)
    stats = {"r>1": float((rb > 1).mean()) if rb.size else 0.0, "baseline": 0.0}
    if baseline is not None:
        from ggq import quants

        w = dequantize_int8(q, scb).astype(np.float64).reshape(out, nb, 32)
        mine = quants.dequantize(data.reshape(out, -1), T.Q8_0).astype(np.float64).reshape(out, nb, 32)
        base = quants.dequantize(baseline, T.Q8_0).astype(np.float64).reshape(out, nb, 32)
        e_mine = ((mine - w) ** 2).sum(-1)
        e_base = ((base - w) ** 2).sum(-1)
        take = ~(e_mine <= e_base)
        if take.any():
            data[take] = baseline.reshape(out, nb, 34)[take]
        stats["baseline"] = float(take.mean()) if take.size else 0.0
    return data.reshape(out, nb * 34), stats


# ------------------------------------------------------------------------ reading the checkpoint

def _is_int(v) -> bool:
    return type(v) is int


def read_quant_state(src, origin: str) -> dict:
    """Parse and check the JSON quant state tensor ``src`` (uint8 1-D).

    Returns the dict with ``quant_type`` (str), ``blocksize`` (int), ``dtype`` (str), ``shape``
    (tuple of 2 ints) and, when nested, ``nested_blocksize``, ``nested_dtype``, ``nested_offset``.
    Raises GGQError naming ``origin`` for a field that is missing or out of range.
    """
    what = f"{origin}: {show(src.name)}"
    if src.dtype != "U8" or len(src.shape) != 1 or not 0 < src.shape[0] <= _QS_MAX_BYTES:
        raise GGQError(f"{what}: a quant state must be a uint8 vector of at most {_QS_MAX_BYTES} bytes "
                       f"(found {src.dtype} {list(src.shape)})")
    raw = bytes(np.asarray(src.load(), np.uint8))
    try:
        qs = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise GGQError(f"{what}: quant state is not JSON ({show(raw[:40])})") from None
    if not isinstance(qs, dict):
        raise GGQError(f"{what}: quant state is not a JSON object")
    qt = qs.get("quant_type")
    if qt not in TABLES or not src.name.endswith(qt):
        raise GGQError(f"{what}: quant_type {show(qt)} (ggq reads nf4 and fp4, named in the tensor's suffix)")
    if not _is_int(qs.get("blocksize")) or qs["blocksize"] not in BLOCKSIZES:
        raise GGQError(f"{what}: blocksize {show(qs.get('blocksize'))} is not one of {', '.join(map(str, BLOCKSIZES))}")
    if qs.get("dtype") not in FLOAT_DTYPES:
        raise GGQError(f"{what}: dtype {show(qs.get('dtype'))} is not one of {', '.join(FLOAT_DTYPES)}")
    shape = qs.get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(_is_int(v) and 0 < v <= 2**31 for v in shape)):
        raise GGQError(f"{what}: shape {show(shape)} is not [out_features, in_features]")
    qs["shape"] = tuple(shape)
    if "nested_blocksize" in qs or "nested_offset" in qs:
        if not _is_int(qs.get("nested_blocksize")) or qs["nested_blocksize"] not in BLOCKSIZES:
            raise GGQError(f"{what}: nested_blocksize {show(qs.get('nested_blocksize'))} is not one of "
                           f"{', '.join(map(str, BLOCKSIZES))}")
        if qs.get("nested_dtype", "float32") != "float32":
            raise GGQError(f"{what}: nested_dtype {show(qs.get('nested_dtype'))} is not float32")
        off = qs.get("nested_offset")
        if type(off) not in (int, float) or not math.isfinite(off):
            raise GGQError(f"{what}: nested_offset {show(off)} is not a finite number")
    return qs


class BnbInfo(QuantizedInfo):
    """:class:`QuantizedInfo` for bitsandbytes: ``fmt`` is "nf4", "fp4" or "int8".

    4-bit levels are not uniform, so no ggml block holds them: every target type requantizes the
    exact dequantization. 8-bit codes are kept in Q8_0 with the row scale rounded to fp16 per block
    (see :func:`int8_to_q8_0`).
    """

    def holds(self, qtype) -> bool:
        return self.fmt == "int8" and _as_ggml_type(qtype) == T.Q8_0

    def lost(self, qtype) -> str | None:
        name = qtype.name if isinstance(qtype, GGMLQuantizationType) else str(qtype).upper()
        qt = _as_ggml_type(qtype)
        if qt == T.F32:
            return None
        if self.fmt == "int8":
            if qt == T.Q8_0:
                return ("Q8_0 keeps the bitsandbytes int8 codes (or a multiple of them); each block's scale is the fp16 "
                        "nearest SCB/127 (relative error at most 2^-11, often far less)")
            return f"bitsandbytes int8 weights dequantized and stored as {name} (the codes are not kept)"
        what = f"bitsandbytes {self.fmt.upper()}"
        if qt in (T.F16, T.BF16):
            exact = {"F16": ("float16",), "BF16": ("bfloat16",)}[name]
            return None if self.stats.get("dtype") in exact else f"{what} weights rounded to {name}"
        return (f"{what} levels are not uniform, no ggml block holds them: weights dequantized exactly "
                "(as bitsandbytes does) and quantized again")


def _check_f32(src, shape: tuple[int, ...], what: str, dtypes=("F32",)) -> None:
    if src.dtype not in dtypes or tuple(src.shape) != shape:
        raise GGQError(f"{src.origin}: {show(src.name)} is {src.dtype} {list(src.shape)}, {what} need "
                       f"{'/'.join(dtypes)} {list(shape)}")


def _finite(a: np.ndarray, src) -> np.ndarray:
    if not np.isfinite(a).all():
        raise GGQError(f"{src.origin}: {show(src.name)} has non-finite values")
    return a


def _source_4bit(ck, wname: str, qsname: str, info: BnbInfo):
    """The logical TensorSource of one 4-bit layer (validated), and the names it replaces."""
    from ggq.convert.checkpoint import TensorSource

    tq = ck.tensors[qsname]
    tw = ck.tensors[wname]
    qs = read_quant_state(tq, tq.origin)
    out, n_in = qs["shape"]
    n = out * n_in
    bs = qs["blocksize"]
    n_blocks = -(-n // bs)
    origin = tw.origin
    if tw.dtype != "U8" or math.prod(tw.shape) != -(-n // 2):
        raise GGQError(f"{origin}: {show(wname)} is {tw.dtype} {list(tw.shape)}; the quant state's shape "
                       f"{[out, n_in]} needs {-(-n // 2)} uint8 bytes (only bnb_4bit_quant_storage=uint8 is read)")
    parts = {}
    for p in ("absmax", "quant_map", "nested_absmax", "nested_quant_map"):
        parts[p] = ck.tensors.get(f"{wname}.{p}")
    if parts["absmax"] is None or parts["quant_map"] is None:
        raise GGQError(f"{origin}: {show(wname)} has no {'absmax' if parts['absmax'] is None else 'quant_map'} tensor")
    _check_f32(parts["quant_map"], (16,), "the 16 levels of a 4-bit code book")
    nested = "nested_blocksize" in qs
    if nested:
        for p in ("nested_absmax", "nested_quant_map"):
            if parts[p] is None:
                raise GGQError(f"{origin}: {show(wname)}: quant state is double-quantized but {p} is missing")
        _check_f32(parts["absmax"], (n_blocks,), "double-quantized absmax codes", ("U8",))
        _check_f32(parts["nested_absmax"], (-(-n_blocks // qs["nested_blocksize"]),), "the nested scales")
        _check_f32(parts["nested_quant_map"], (256,), "the 256 levels of the nested code book")
    else:
        if parts["nested_absmax"] is not None:
            raise GGQError(f"{origin}: {show(wname)} has nested_absmax but its quant state has no nested_blocksize")
        _check_f32(parts["absmax"], (n_blocks,), f"scales for blocksize {bs} over {n} weights")
    table = TABLES[qs["quant_type"]]
    stored = _finite(np.asarray(parts["quant_map"].load(), np.float32), parts["quant_map"])
    if np.abs(stored - table).max() > 1e-4:
        raise GGQError(f"{parts['quant_map'].origin}: {show(parts['quant_map'].name)} is not bitsandbytes' "
                       f"{qs['quant_type'].upper()} code book (its kernels decode with the built-in one)")
    info.stats.setdefault("dtype", qs["dtype"])
    info.stats.setdefault("blocksizes", set()).add(bs)
    info.stats["nested"] = info.stats.get("nested", False) or nested

    def loader(tw=tw, parts=parts, qs=qs) -> np.ndarray:
        if nested:
            book = _finite(np.asarray(parts["nested_quant_map"].load(), np.float32), parts["nested_quant_map"])
            top = _finite(np.asarray(parts["nested_absmax"].load(), np.float32), parts["nested_absmax"])
            with np.errstate(over="ignore", invalid="ignore"):  # checked on the weights below
                absmax = nested_absmax(parts["absmax"].load(), book, top, qs["nested_blocksize"], qs["nested_offset"])
        else:
            absmax = _finite(np.asarray(parts["absmax"].load(), np.float32), parts["absmax"])
        with np.errstate(over="ignore", invalid="ignore"):
            w = dequantize_4bit(tw.load(), absmax, qs["quant_type"], bs, (out, n_in), qs["dtype"])
        if not np.isfinite(w).all():  # finite scales whose product leaves the model's float type
            names = "absmax" + (", nested_absmax, nested_offset" if nested else "")
            raise GGQError(f"{origin}: the scales of {show(wname)} ({names}) put its weights beyond "
                           f"{qs['dtype']}'s range")
        return w

    def releaser() -> None:
        for p in (tw, *parts.values()):
            if p is not None:
                p.release()

    src = TensorSource(wname, (out, n_in), "BNB4", loader, lambda qtype: None, origin)
    src.releaser = releaser
    removed = [wname, qsname, *(f"{wname}.{p}" for p in parts)]
    return src, removed


def _source_int8(ck, prefix: str, info: BnbInfo):
    from ggq.convert.checkpoint import TensorSource

    wname = f"{prefix}.weight"
    tw, ts = ck.tensors[wname], ck.tensors[f"{prefix}.SCB"]
    tf = ck.tensors.get(f"{prefix}.weight_format")
    origin = tw.origin
    if tw.dtype != "I8" or len(tw.shape) != 2:
        raise GGQError(f"{origin}: {show(wname)} is {tw.dtype} {list(tw.shape)}, an 8-bit layer needs an int8 matrix")
    out, n_in = tw.shape
    _check_f32(ts, (out,), f"the row scales of {show(wname)}", ("F32", "F16", "BF16"))
    if tf is not None:
        fmt = np.asarray(tf.load()).reshape(-1)
        if tf.dtype not in ("U8", "I8", "I32", "I64") or fmt.size != 1 or int(fmt[0]) != 0:
            raise GGQError(f"{tf.origin}: {show(tf.name)} is not 0 (\"row\"), the only int8 layout ggq reads")

    def scb() -> np.ndarray:
        s = _finite(np.asarray(ts.load(), np.float32), ts)
        if (s < 0).any():
            raise GGQError(f"{ts.origin}: {show(ts.name)} has negative row scales")
        return s

    def loader() -> np.ndarray:
        with np.errstate(over="ignore", invalid="ignore"):
            w = dequantize_int8(np.asarray(tw.load()), scb())
        if not np.isfinite(w).all():
            raise GGQError(f"{ts.origin}: {show(ts.name)} puts the weights of {show(wname)} beyond float32's range")
        return w

    def native(qtype):
        if _as_ggml_type(qtype) != T.Q8_0 or n_in % 32:
            return None
        from ggq import quants

        q, s = np.asarray(tw.load()), scb()
        if s.max(initial=0.0) / 127 > 65504:  # no fp16 block scale: the generic path reports it
            return None
        base = quants.quantize(dequantize_int8(q, s), T.Q8_0)
        data, st = int8_to_q8_0(q, s, base)
        info.stats.setdefault("int8", {})[wname] = st
        return data

    def releaser() -> None:
        for p in (tw, ts, tf):
            if p is not None:
                p.release()

    src = TensorSource(wname, (out, n_in), "BNB8", loader, native, origin)
    src.releaser = releaser
    return src, [wname, f"{prefix}.SCB", f"{prefix}.weight_format"]


def prepare_bnb(ck, qc: dict) -> BnbInfo:
    """Replace every bitsandbytes layer of ``ck.tensors`` by one logical ``P.weight`` (float32 loader).

    ``qc``: the quantization_config dict (``quant_method: bitsandbytes``). 4-bit layers are found by
    their ``P.weight.quant_state.bitsandbytes__nf4/fp4`` tensor, 8-bit layers by ``P.SCB``.
    Raises GGQError for a config that loads neither 4 nor 8 bits, a layer kind the config does not
    announce, or any tensor whose dtype, shape or quant state does not match (see module doc).
    """
    where = f"{ck.path}/config.json"
    four = bool(qc.get("load_in_4bit") or qc.get("_load_in_4bit"))
    eight = bool(qc.get("load_in_8bit") or qc.get("_load_in_8bit"))
    if four == eight:
        raise GGQError(f"{where}: bitsandbytes quantization_config must set exactly one of load_in_4bit and load_in_8bit")
    qt_cfg = str(qc.get("bnb_4bit_quant_type", "fp4")).lower()
    if four and qt_cfg not in TABLES:
        raise GGQError(f"{where}: bnb_4bit_quant_type {show(qc.get('bnb_4bit_quant_type'))} is not supported (nf4, fp4)")
    storage = str(qc.get("bnb_4bit_quant_storage", "uint8")).replace("torch.", "")
    if four and storage != "uint8":
        raise GGQError(f"{where}: bnb_4bit_quant_storage {show(storage)} is not supported (ggq reads uint8)")
    info = BnbInfo("bitsandbytes", 4 if four else 8, -1, True, False, fmt=qt_cfg if four else "int8")
    repl = {}
    qs_names = [k for k in ck.tensors if _QS_PREFIX in k]
    scb_names = [k for k in ck.tensors if k.endswith(".SCB")]
    if four and scb_names or eight and qs_names:
        k = (scb_names or qs_names)[0]
        raise GGQError(f"{ck.tensors[k].origin}: {show(k)} is a {'8' if four else '4'}-bit layer, "
                       f"config.json says load_in_{4 if four else 8}bit")
    for k in qs_names:
        wname = k.split(_QS_PREFIX)[0]
        if wname not in ck.tensors:
            raise GGQError(f"{ck.tensors[k].origin}: {show(k)} has no packed weight {show(wname)}")
        if not k.endswith(qt_cfg):
            raise GGQError(f"{ck.tensors[k].origin}: {show(k)} is not the {qt_cfg} that config.json announces")
        repl[wname] = _source_4bit(ck, wname, k, info)
    for k in scb_names:
        prefix = k[: -len(".SCB")]
        if f"{prefix}.weight" not in ck.tensors:
            raise GGQError(f"{ck.tensors[k].origin}: {show(k)} has no int8 weight {show(prefix + '.weight')}")
        repl[f"{prefix}.weight"] = _source_int8(ck, prefix, info)
    bs = sorted(info.stats.get("blocksizes", ()))
    info.group_size = bs[0] if len(bs) == 1 else -1
    _choose_default(info)
    replace_tensors(ck, repl, info)
    return info


#: default ``--type`` for 4-bit checkpoints; the measurements behind it are in specs/imports.md
DEFAULT_4BIT = "Q4_K_M"


def _choose_default(info: BnbInfo) -> None:
    if info.fmt == "int8":
        info.default_type = "Q8_0"
        info.reason = "keeps the int8 codes; the fp16 block scale is chosen for the least error"
    else:
        info.default_type = DEFAULT_4BIT
        info.reason = ("NF4/FP4 levels fit no ggml block; Q4_K_M adds the least error against bitsandbytes' "
                       "dequantization of the types of about 4.5 bits per weight (specs/imports.md)")
