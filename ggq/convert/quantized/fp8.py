"""FP8 checkpoints: ``quant_method: fp8`` (DeepSeek-V3 / Qwen3 / transformers' ``FineGrainedFP8Config``)
and compressed-tensors ``float-quantized`` (llm-compressor's FP8, FP8_DYNAMIC, FP8_BLOCK schemes).

Read with numpy; no torch needed. Per quantized linear layer ``P`` (float weight ``(out, in)``):

* ``P.weight``: float8 ``(out, in)``, ``F8_E4M3`` (e4m3fn: bias 7, no infinities, ``S.1111.111`` is
  NaN) or ``F8_E5M2`` (IEEE-like, bias 15);
* ``quant_method: fp8``: ``P.weight_scale_inv`` float32 ``(ceil(out / bm), ceil(in / bn))`` for
  ``weight_block_size: [bm, bn]`` (DeepSeek: 128 x 128), or one value (per tensor) without a
  block size; UE8M0 scales (``F8_E8M0``: ``2^(b - 127)``) are read too; AutoFP8-style checkpoints
  call it ``P.weight_scale`` (one value, or one per row). Despite the name the
  scale multiplies: ``w = fp8(q) * s`` (transformers' ``_dequantize_fp8_weight``, DeepSeek's
  ``weight_dequant``), computed in float32;
* compressed-tensors: ``P.weight_scale`` in the model's float type, ``(1,)`` (strategy
  ``tensor``), ``(out, 1)`` (``channel``), ``(out, in / group_size)`` (``group``) or
  ``(ceil(out / bm), ceil(in / bn))`` (``block``); decode ``w = fp8(q) * s``, exact in float32
  (4 significant bits times the scale's 8 or 11): compressed-tensors' ``dequantize`` with a
  float32 scale. (Its default, the scale's own dtype, rounds the product once more to bf16.)

Activation settings (``activation_scheme``, ``input_activations``, ``P.input_scale``) only matter
to an FP8 runtime; they are reported and ignored (ggq's runtime quantizes activations itself).
See ``specs/imports.md``.
"""

from __future__ import annotations

import math

import numpy as np
from gguf import GGMLQuantizationType

from ggq.convert.quantized import QuantizedInfo, _as_ggml_type, replace_tensors, write_blocks
from ggq.convert.quantized.bnb import round_to_dtype
from ggq.errors import GGQError, show

T = GGMLQuantizationType


def _fp8_table(exp_bits: int, man_bits: int, fn: bool) -> np.ndarray:
    """float32 (256,) value of every byte of an fp8 format (OCP FP8: bias 2^(e-1) - 1; subnormals;
    ``fn``: e4m3fn, whose only non-finite pattern is all ones (NaN); otherwise the top exponent is
    inf/NaN as in IEEE)."""
    bias = (1 << (exp_bits - 1)) - 1
    b = np.arange(256)
    sign = np.where(b & 0x80, -1.0, 1.0)
    e = (b >> man_bits) & ((1 << exp_bits) - 1)
    m = b & ((1 << man_bits) - 1)
    frac = m / float(1 << man_bits)
    val = np.where(e == 0, frac * 2.0 ** (1 - bias), (1 + frac) * 2.0 ** (e - bias))
    top = (1 << exp_bits) - 1
    if fn:
        val = np.where((e == top) & (m == (1 << man_bits) - 1), np.nan, val)
    else:
        val = np.where(e == top, np.where(m == 0, np.inf, np.nan), val)
    return (sign * val).astype(np.float32)


E4M3 = _fp8_table(4, 3, fn=True)
E5M2 = _fp8_table(5, 2, fn=False)
TABLES = {"F8_E4M3": E4M3, "F8_E5M2": E5M2}


def fp8_values(raw: np.ndarray, dtype: str) -> np.ndarray:
    """uint8 fp8 bytes (any shape) of safetensors dtype ``F8_E4M3``/``F8_E5M2`` -> float32 values."""
    return TABLES[dtype][np.asarray(raw, np.uint8)]


def e8m0_values(raw: np.ndarray) -> np.ndarray:
    """UE8M0 scale bytes -> float32 ``2^(b - 127)`` (255 is NaN)."""
    b = np.asarray(raw, np.uint8).astype(np.int32)
    out = np.ldexp(1.0, np.minimum(b, 254) - 127).astype(np.float32)  # 2^127 fits float32
    return np.where(b == 255, np.float32(np.nan), out)


def expand_scale(scale: np.ndarray, shape: tuple[int, int], block: tuple[int, int]) -> np.ndarray:
    """Per-block scales ``(ceil(out / bm), ceil(in / bn))`` -> float32 per-weight scales ``shape``."""
    out, n_in = shape
    bm, bn = block
    s = np.repeat(np.repeat(np.asarray(scale, np.float32), bm, axis=0)[:out], bn, axis=1)[:, :n_in]
    return np.ascontiguousarray(s)


#: extra Q8_0 candidates ``d = max|w| / k`` tried per block (ggml's own quantizer uses k = 127)
EXTRA_STEPS = (127, 126, 125, 124, 123, 122, 121, 120)


def fp8_to_q8_0(v: np.ndarray, s: np.ndarray, w: np.ndarray, baseline: np.ndarray | None = None,
                chunk: int = 256, aligned: bool = True) -> tuple[np.ndarray, dict]:
    """Map FP8 weights onto Q8_0 blocks with the least squared error per block.

    ``v``: float32 (out, in) fp8 values (unscaled), ``in % 32 == 0``; ``s``: float32 (out, in) the
    scale of each weight; ``w``: float32 (out, in) the dequantized weights the error is measured
    against. An fp8 value is ``(1 + f / 2^m) * 2^p`` (``m`` = 3 mantissa bits for e4m3, 2 for
    e5m2). In a 32-weight block with one scale ``s`` and largest ``|v| = M``, ``2^p <= M < 2^(p+1)``,
    ``d = s * 2^(p - 6)`` makes ``c = v / 2^(p - 6)`` an integer of at most 120 (e4m3; 112 for
    e5m2) for every value within ``6 - m`` binades of ``M``: those are kept exactly, smaller ones
    are rounded to the nearest multiple of ``d``, and ``d`` itself is rounded to fp16. ggq tries
    the fp16 nearest ``s * 2^(p - 6)`` and its two fp16 neighbours (``c = round(w / d)`` for each),
    plus, given ``baseline`` (ggq's Q8_0 quantizer on ``w``), the baseline block, and keeps per
    block the one with the least squared error against ``w``: never worse than
    dequantize-then-quantize. Blocks whose scale changes inside the block use the baseline. The
    steps ``d = max|w| / k`` for k in :data:`EXTRA_STEPS` are tried as well (they help blocks whose
    values span more binades than a Q8_0 block holds); ``aligned=False`` leaves out the FP8-aligned
    steps (for measuring what they add).

    Returns (uint8 (out, in // 32 * 34), stats ``{"baseline": fraction of blocks from the baseline,
    "exact": fraction of blocks decoding to ``w`` exactly}``).
    """
    out, n_in = v.shape
    nb = n_in // 32
    data = np.empty((out, nb, 34), np.uint8)
    n_base = n_exact = 0
    for r0 in range(0, out, chunk):
        r1 = min(out, r0 + chunk)
        vb = v[r0:r1].reshape(-1, nb, 32).astype(np.float64)
        sb = s[r0:r1].reshape(-1, nb, 32).astype(np.float64)
        wb = w[r0:r1].reshape(-1, nb, 32).astype(np.float64)
        one_scale = (sb == sb[..., :1]).all(-1)
        m = np.abs(vb).max(-1)
        _, ex = np.frexp(m)                                  # m = f * 2^ex, f in [0.5, 1): p = ex - 1
        d0 = sb[..., 0] * np.ldexp(1.0, ex - 7)
        amax = np.abs(wb).max(-1)
        with np.errstate(over="ignore", invalid="ignore"):
            h = d0.astype(np.float16)
            cands = [h, np.nextafter(h, np.float16(np.inf)), np.nextafter(h, np.float16(-np.inf))] if aligned else []
            cands += [(amax / k).astype(np.float16) for k in EXTRA_STEPS]
        best_e = np.full(m.shape, np.inf)
        best_d = np.zeros(m.shape)
        best_c = np.zeros(vb.shape)
        for h in cands:
            d = h.astype(np.float64)
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                c = np.clip(np.rint(np.where(d[..., None] != 0, wb / d[..., None], 0.0)), -127, 127)
                e = ((d[..., None] * c - wb) ** 2).sum(-1)
            e = np.where(np.isfinite(e) & np.isfinite(d) & one_scale, e, np.inf)
            better = e < best_e
            best_e = np.where(better, e, best_e)
            best_d = np.where(better, d, best_d)
            best_c = np.where(better[..., None], c, best_c)
        blk = write_blocks(T.Q8_0, best_c.reshape(r1 - r0, n_in).astype(np.int32),
                           best_d.astype(np.float32)).reshape(r1 - r0, nb, 34)
        if baseline is not None:
            from ggq import quants

            base = baseline[r0:r1].reshape(r1 - r0, nb, 34)
            bw = quants.dequantize(base.reshape(r1 - r0, -1), T.Q8_0).astype(np.float64).reshape(wb.shape)
            e_base = ((bw - wb) ** 2).sum(-1)
            take = ~(best_e <= e_base)
            blk[take] = base[take]
            n_base += int(take.sum())
            best_e = np.where(take, e_base, best_e)
        elif not np.isfinite(best_e).all():
            raise ValueError("fp8_to_q8_0: a block has no finite fp16 scale; pass a baseline")
        n_exact += int((best_e == 0).sum())
        data[r0:r1] = blk
    total = max(out * nb, 1)
    return data.reshape(out, nb * 34), {"baseline": n_base / total, "exact": n_exact / total}


# ------------------------------------------------------------------------ reading the checkpoint

def _binades(dtypes) -> str:
    """How many binades below a block's largest value Q8_0 keeps exactly, for the fp8 ``dtypes`` seen:
    ``6 - m`` with ``m`` mantissa bits (4 for e4m3, 5 for e5m2)."""
    n = sorted({{"F8_E4M3": 4, "F8_E5M2": 5}[d] for d in dtypes if d in TABLES}) or [4]
    return " or ".join(map(str, n)) + " binades"


class Fp8Info(QuantizedInfo):
    """:class:`QuantizedInfo` for FP8 (``fmt``: "fp8" or "float-quantized"); default Q8_0.
    ``stats["dtypes"]``: the fp8 dtypes of the checkpoint's weights (F8_E4M3, F8_E5M2)."""

    def holds(self, qtype) -> bool:
        return _as_ggml_type(qtype) == T.Q8_0

    def lost(self, qtype) -> str | None:
        name = qtype.name if isinstance(qtype, GGMLQuantizationType) else str(qtype).upper()
        qt = _as_ggml_type(qtype)
        if qt == T.F32:
            return None
        if qt == T.Q8_0:
            return (f"Q8_0 keeps each FP8 value within {_binades(self.stats.get('dtypes', ()))} of its block's largest "
                    "exactly (smaller ones are rounded to the block step); the block scale is rounded to fp16 (chosen "
                    "for the least error)")
        if qt in (T.F16, T.BF16):
            return f"FP8 weights times their scales rounded to {name}"
        return f"FP8 weights dequantized and quantized again to {name}"


def _check(src, shape: tuple, dtypes: tuple, what: str) -> None:
    if src.dtype not in dtypes or tuple(src.shape) != tuple(shape):
        raise GGQError(f"{src.origin}: {show(src.name)} is {src.dtype} {list(src.shape)}, {what} need "
                       f"{'/'.join(dtypes)} {list(shape)}")


def _scale_values(src) -> np.ndarray:
    raw = np.asarray(src.load())
    s = e8m0_values(raw) if src.dtype == "F8_E8M0" else raw.astype(np.float32)
    if not np.isfinite(s).all():
        raise GGQError(f"{src.origin}: {show(src.name)} has non-finite scales")
    return s


def _make_source(name, tw, ts, block, shape, out_dtype, info, extra=()):
    """The logical TensorSource of one FP8 layer: ``block`` (bm, bn) of the scale tensor."""
    from ggq.convert.checkpoint import TensorSource

    out, n_in = shape

    def parts():
        raw = np.asarray(tw.load())
        v = fp8_values(raw, tw.dtype)
        if not np.isfinite(v).all():
            raise GGQError(f"{tw.origin}: {show(tw.name)} has NaN or infinite fp8 values")
        s = expand_scale(_scale_values(ts).reshape(-(-out // block[0]), -(-n_in // block[1])), shape, block)
        with np.errstate(over="ignore"):
            if not np.isfinite(v * s).all():
                raise GGQError(f"{ts.origin}: {show(ts.name)} scales {show(tw.name)} beyond float32's range")
        return v, s

    def loader() -> np.ndarray:
        v, s = parts()
        return round_to_dtype(v * s, out_dtype)

    def native(qtype):
        if _as_ggml_type(qtype) != T.Q8_0 or n_in % 32:
            return None
        from ggq import quants

        v, s = parts()
        w = round_to_dtype(v * s, out_dtype)
        data, st = fp8_to_q8_0(v, s, w, quants.quantize(w, T.Q8_0))
        info.stats.setdefault("fp8", {})[name] = st
        return data

    def releaser() -> None:
        for p in (tw, ts, *extra):
            if p is not None:
                p.release()

    src = TensorSource(name, shape, "FP8", loader, native, tw.origin)
    src.releaser = releaser
    return src


def _block_of(qc_block, where: str) -> tuple[int, int] | None:
    if qc_block is None:
        return None
    if not (isinstance(qc_block, list) and len(qc_block) == 2 and all(type(b) is int and 0 < b <= 2**20 for b in qc_block)):
        raise GGQError(f"{where}: weight block size {show(qc_block)} is not two positive integers")
    return qc_block[0], qc_block[1]


def _fp8_weights(ck, suffix: str, info):
    """(prefix, weight TensorSource, scale TensorSource) for every fp8 weight with a ``suffix`` scale;
    the fp8 dtypes met go to ``info.stats["dtypes"]`` (the tensors decide the format, not ``fmt``)."""
    for k, t in list(ck.tensors.items()):
        if k.endswith(".weight") and t.dtype in TABLES:
            dts = info.stats.setdefault("dtypes", [])
            if t.dtype not in dts:
                dts.append(t.dtype)
            prefix = k[: -len(".weight")]
            ts = ck.tensors.get(f"{prefix}.{suffix}")
            if ts is None:
                raise GGQError(f"{t.origin}: {show(k)} is {t.dtype} but has no {show(prefix + '.' + suffix)}")
            if len(t.shape) != 2 or min(t.shape) <= 0:
                raise GGQError(f"{t.origin}: {show(k)} is {t.dtype} {list(t.shape)}, an fp8 layer needs a matrix")
            yield prefix, t, ts


def _activation_note(info, what) -> None:
    if what:
        info.stats["activations"] = what


def prepare_fp8(ck, qc: dict) -> Fp8Info:
    """``quant_method: fp8`` (DeepSeek-V3 layout): every ``P.weight`` (float8) + ``P.weight_scale_inv``
    becomes one logical ``P.weight``. Raises GGQError for an unknown ``fmt``, a bad block size or
    scale shape."""
    where = f"{ck.path}/config.json"
    fmt = str(qc.get("fmt", "e4m3")).lower()
    if fmt not in ("e4m3", "e5m2"):
        raise GGQError(f"{where}: fp8 fmt {show(qc.get('fmt'))} is not supported (e4m3, e5m2)")
    block = _block_of(qc.get("weight_block_size"), where)
    info = Fp8Info("fp8", 8, block[1] if block else -1, True, False, fmt="fp8")
    _activation_note(info, f"activation_scheme {qc.get('activation_scheme', 'dynamic')}")
    repl = {}
    # AutoFP8 / older vLLM checkpoints name the (multiplying) scale weight_scale: per tensor or per row
    suffix = "weight_scale_inv" if any(k.endswith(".weight_scale_inv") for k in ck.tensors) else "weight_scale"
    for prefix, tw, ts in _fp8_weights(ck, suffix, info):
        out, n_in = tw.shape
        if block is None and math.prod(ts.shape) == out and out > 1 and len(ts.shape) <= 2:
            _check(ts, ts.shape if ts.shape in ((out,), (out, 1)) else (out, 1), ("F32", "BF16", "F16"),
                   "per-row scales")
            blk = (1, n_in)
        elif block is None:
            _check(ts, ts.shape if math.prod(ts.shape) == 1 else (1,), ("F32", "BF16", "F16", "F8_E8M0"),
                   "a per-tensor scale (no weight_block_size in config.json) must")
            blk = (out, n_in)
        else:
            blk = block
            _check(ts, (-(-out // blk[0]), -(-n_in // blk[1])), ("F32", "BF16", "F16", "F8_E8M0"),
                   f"scales of {blk[0]}x{blk[1]} blocks")
        extra = [ck.tensors.get(f"{prefix}.{a}") for a in ("activation_scale", "input_scale")]
        src = _make_source(f"{prefix}.weight", tw, ts, blk, (out, n_in), "float32", info, extra)
        repl[f"{prefix}.weight"] = (src, [f"{prefix}.weight", f"{prefix}.{suffix}",
                                          f"{prefix}.activation_scale", f"{prefix}.input_scale"])
    info.default_type = "Q8_0"
    info.reason = f"keeps the FP8 values of each block's top {_binades(info.stats.get('dtypes', ()))} exactly"
    replace_tensors(ck, repl, info)
    return info


def prepare_ct_float(ck, qc: dict) -> Fp8Info:
    """compressed-tensors ``float-quantized``: every ``P.weight`` (float8) + ``P.weight_scale``
    becomes one logical ``P.weight``. Raises GGQError for a scheme other than symmetric 8-bit float
    weights with tensor/channel/group/block strategy, or scales of the wrong shape."""
    where = f"{ck.path}/config.json"
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        raise GGQError(f"{where}: compressed-tensors quantization_config has no config_groups")
    schemes = []
    acts = []
    for gname, g in groups.items():
        w = g.get("weights") if isinstance(g, dict) else None
        if not isinstance(w, dict):
            raise GGQError(f"{where}: compressed-tensors group {show(gname)} quantizes no weights")
        if str(w.get("type")).lower() != "float" or w.get("num_bits") != 8:
            raise GGQError(f"{where}: float-quantized weights of type {show(w.get('type'))} with {show(w.get('num_bits'))} "
                           "bits are not supported (8-bit float only)")
        if w.get("symmetric", True) is not True:
            raise GGQError(f"{where}: asymmetric float-quantized weights are not supported")
        strategy = str(w.get("strategy") or "tensor").lower()
        if strategy not in ("tensor", "channel", "group", "block"):
            raise GGQError(f"{where}: compressed-tensors strategy {show(strategy)} is not supported "
                           "(tensor, channel, group, block)")
        # (hashable whatever config.json holds: block_structure is validated below, group_size too)
        key = (strategy, w.get("group_size") if type(w.get("group_size")) is int else repr(w.get("group_size")),
               repr(w.get("block_structure")))
        if key not in schemes:
            schemes.append(key)
        a = g.get("input_activations")
        if isinstance(a, dict):
            acts.append(f"{a.get('type')} {a.get('num_bits')}-bit {a.get('strategy')} "
                        f"{'dynamic' if a.get('dynamic') else 'static'}")
    if len(schemes) > 1:
        raise GGQError(f"{where}: compressed-tensors config_groups with different weight schemes are not supported")
    strategy, group_size, _ = schemes[0]
    block_structure = next(iter(groups.values()))["weights"].get("block_structure")
    if strategy == "group" and not (type(group_size) is int and group_size > 0):
        raise GGQError(f"{where}: group strategy without a positive integer group_size")
    block = _block_of([] if block_structure is None else block_structure, where) if strategy == "block" else None
    info = Fp8Info("compressed-tensors", 8, group_size if strategy == "group" else -1, True, False,
                   fmt="float-quantized")
    _activation_note(info, "; ".join(sorted(set(acts))) or "weights only")
    info.stats["strategy"] = strategy
    repl = {}
    for prefix, tw, ts in _fp8_weights(ck, "weight_scale", info):
        out, n_in = tw.shape
        dt = ("F32", "BF16", "F16")
        if strategy == "tensor":
            _check(ts, ts.shape if math.prod(ts.shape) == 1 else (1,), dt, "a tensor-strategy scale must")
            blk = (out, n_in)
        elif strategy == "channel":
            _check(ts, (out, 1), dt, "channel-strategy scales")
            blk = (1, n_in)
        elif strategy == "group":
            _check(ts, (out, -(-n_in // group_size)), dt, f"scales of groups of {group_size}")
            blk = (1, group_size)
        else:
            blk = block
            _check(ts, (-(-out // blk[0]), -(-n_in // blk[1])), dt, f"scales of {blk[0]}x{blk[1]} blocks")
        tz = ck.tensors.get(f"{prefix}.weight_zero_point")
        if tz is not None and np.any(np.asarray(tz.load()) != 0):
            raise GGQError(f"{tz.origin}: {show(tz.name)} is not zero (asymmetric float weights are not supported)")
        out_dtype = "float32"  # the exact product, as compressed-tensors' fused kernels apply the scale
        extra = [tz, ck.tensors.get(f"{prefix}.input_scale"), ck.tensors.get(f"{prefix}.input_zero_point")]
        src = _make_source(f"{prefix}.weight", tw, ts, blk, (out, n_in), out_dtype, info, extra)
        repl[f"{prefix}.weight"] = (src, [f"{prefix}.weight", f"{prefix}.weight_scale", f"{prefix}.weight_zero_point",
                                          f"{prefix}.input_scale", f"{prefix}.input_zero_point"])
    info.default_type = "Q8_0"
    info.reason = f"keeps the FP8 values of each block's top {_binades(info.stats.get('dtypes', ()))} exactly"
    replace_tensors(ck, repl, info)
    return info
