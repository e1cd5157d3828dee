"""compressed-tensors ``pack-quantized`` checkpoints (llm-compressor W4A16, W8A16, ...), 2, 4, 8 bits.

Per quantized linear layer ``P`` (float weight (out, in)):

* ``P.weight_packed``: int32 ``(out, ceil(in / (32 / bits)))``: each row's codes as one
  little-endian bit stream (code ``i`` at bits ``i*bits ..``), each code stored as
  ``q + 2^(bits-1)`` where ``q`` is the signed code in ``-2^(bits-1) .. 2^(bits-1)-1``;
* ``P.weight_scale``: ``(out, n_groups)`` in the model's float type (bf16, fp16 or f32);
  ``n_groups`` is ``in / group_size`` (strategy "group"), 1 (strategy "channel"), or a single
  scale (strategy "tensor");
* ``P.weight_zero_point`` (asymmetric only): the signed zero points, either packed like the codes
  but along the output dimension (int32 ``(ceil(out / (32 / bits)), n_groups)``, newer versions) or
  unpacked (int8 ``(out, n_groups)``);
* ``P.weight_g_idx`` (act-order only): int32 ``(in,)`` group of each input;
* ``P.weight_shape``: ``[out, in]``.

Decode: ``W[o, i] = s[o, g] * (q[o, i] - zp[o, g])`` with ``g = g_idx[i]``. See ``specs/gptq-awq.md``.
"""

from __future__ import annotations

import numpy as np

from ggq.convert.quantized import QuantizedInfo, QuantizedWeight, make_source, replace_tensors, unpack_bits
from ggq.errors import GGQError, show

BITS = (2, 4, 8)
#: ``pack-quantized``: codes bit-packed in int32; ``int-quantized`` / ``naive-quantized``: one int8 per
#: code in ``P.weight`` (llm-compressor's W8A8 output)
FORMATS = ("pack-quantized", "int-quantized", "naive-quantized")
_SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")


def _weights_args(qc: dict, where: str) -> dict:
    """The one ``weights`` scheme of the config's groups (GGQError if none, or several that differ)."""
    fmt = str(qc.get("format", "")).lower()
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        raise GGQError(f"{where}: compressed-tensors quantization_config has no config_groups")
    schemes = []
    for gname, g in groups.items():
        if not isinstance(g, dict) or not isinstance(g.get("weights"), dict):
            raise GGQError(f"{where}: compressed-tensors group {show(gname)} quantizes no weights")
        gfmt = str(g.get("format") or fmt).lower()
        if gfmt not in FORMATS:
            raise GGQError(f"{where}: compressed-tensors format {show(gfmt or 'unknown')} is not supported "
                           "(ggq imports pack-quantized and int-quantized integer weights, and float-quantized FP8)")
        w = g["weights"]
        if str(w.get("type", "int")).lower() != "int":
            raise GGQError(f"{where}: compressed-tensors weights of type {show(w.get('type'))} are not supported (int only)")
        key = {k: w.get(k) for k in ("num_bits", "symmetric", "strategy", "group_size", "actorder")}
        key["format"] = "pack-quantized" if gfmt == "pack-quantized" else "int-quantized"
        a = g.get("input_activations")
        key["activations"] = (f"{a.get('type')} {a.get('num_bits')}-bit {a.get('strategy')} "
                              f"{'dynamic' if a.get('dynamic') else 'static'}") if isinstance(a, dict) else "weights only"
        if key not in schemes:
            schemes.append(key)
    if len(schemes) > 1:
        raise GGQError(f"{where}: compressed-tensors config_groups with different weight schemes are not supported")
    return schemes[0]


def prepare_compressed(ck, qc: dict) -> QuantizedInfo:
    """Replace every ``P.weight_packed/...`` group of ``ck.tensors`` by ``P.weight``.

    Raises GGQError for a format other than pack-quantized, an unsupported width, a missing scale,
    or shapes that do not match the config.
    """
    where = f"{ck.path}/config.json"
    w = _weights_args(qc, where)
    bits = w.get("num_bits")
    if type(bits) is not int or bits not in BITS:
        raise GGQError(f"{where}: compressed-tensors with {w.get('num_bits')} bits is not supported "
                       f"(ggq imports {', '.join(map(str, BITS))}-bit pack-quantized)")
    strategy = str(w.get("strategy") or "tensor").lower()
    if strategy not in ("group", "channel", "tensor"):
        raise GGQError(f"{where}: compressed-tensors strategy {show(strategy)} is not supported (group, channel, tensor)")
    gs = w.get("group_size")
    if strategy == "group" and not (type(gs) is int and gs > 0):  # (not a string, float, NaN, list...)
        raise GGQError(f"{where}: compressed-tensors group strategy without a positive integer group_size "
                       f"(group_size {show(gs)})")
    group_size = gs if strategy == "group" else -1
    actorder = str(w.get("actorder") or "").lower()
    sym = bool(w.get("symmetric", True))
    packed = w["format"] == "pack-quantized"
    info = QuantizedInfo("compressed-tensors", bits, group_size, sym, actorder == "group", fmt=w["format"])
    info.stats["activations"] = w["activations"]
    offset = 1 << (bits - 1)
    per_word = 32 // bits
    repl = {}

    if packed:
        names = [k for k in ck.tensors if k.endswith(".weight_packed")]
    else:  # int-quantized: an int8 P.weight with a P.weight_scale
        names = [k for k, t in ck.tensors.items() if k.endswith(".weight") and t.dtype == "I8"
                 and f"{k}_scale" in ck.tensors]
    for pname in names:
        prefix = pname[: -len(".weight_packed" if packed else ".weight")]
        tp = ck.tensors[pname]
        ts = ck.tensors.get(f"{prefix}.weight_scale")
        tz = ck.tensors.get(f"{prefix}.weight_zero_point")
        tg = ck.tensors.get(f"{prefix}.weight_g_idx")
        tshape = ck.tensors.get(f"{prefix}.weight_shape")
        if ts is None:
            raise GGQError(f"{tp.origin}: {pname} has no {prefix}.weight_scale")
        if len(tp.shape) != 2 or tp.dtype not in (("I32", "U32") if packed else ("I8",)):
            raise GGQError(f"{tp.origin}: {pname} must be a 2-D {'int32' if packed else 'int8'} tensor "
                           f"(found {tp.dtype} {list(tp.shape)})")
        out = tp.shape[0]
        if not packed:
            n_in = tp.shape[1]
        elif tshape is not None:
            dims = [int(v) for v in np.asarray(tshape.load()).reshape(-1)]
            if len(dims) != 2 or dims[0] != out:
                raise GGQError(f"{tshape.origin}: {prefix}.weight_shape {dims} does not match weight_packed {list(tp.shape)}")
            n_in = dims[1]
        elif tg is not None:
            n_in = tg.shape[0]
        else:
            n_in = tp.shape[1] * per_word
        if out <= 0 or n_in <= 0:
            raise GGQError(f"{tp.origin}: {pname} has no weights (shape {list(tp.shape)}, {n_in} inputs)")
        if packed and -(-n_in // per_word) != tp.shape[1]:
            raise GGQError(f"{tp.origin}: {pname} has shape {list(tp.shape)}, which does not hold {bits}-bit codes "
                           f"of {n_in} inputs (quantization_config says num_bits={bits})")
        gs = n_in if group_size == -1 else group_size
        n_groups = -(-n_in // gs)
        s_shape = tuple(ts.shape)
        if strategy == "tensor":
            if int(np.prod(s_shape)) != 1:
                raise GGQError(f"{ts.origin}: {prefix}.weight_scale has shape {list(s_shape)}, tensor strategy needs one scale")
        elif tg is None and s_shape != (out, n_groups):
            raise GGQError(f"{ts.origin}: {prefix}.weight_scale has shape {list(s_shape)}, expected {[out, n_groups]} "
                           f"for {strategy} strategy over {n_in} inputs")
        elif len(s_shape) != 2 or s_shape[0] != out:
            raise GGQError(f"{ts.origin}: {prefix}.weight_scale has shape {list(s_shape)}, expected {out} rows")
        n_groups = 1 if strategy == "tensor" else s_shape[1]
        if not sym and tz is None:
            raise GGQError(f"{tp.origin}: {prefix}: asymmetric scheme without weight_zero_point")
        if tz is not None:
            zs = tuple(tz.shape)
            ok = ((tz.dtype in ("I32", "U32") and zs == (-(-out // per_word), n_groups))
                  or (tz.dtype in ("I8", "U8", "I32") and zs == (out, n_groups))
                  or (strategy == "tensor" and int(np.prod(zs)) == 1))
            if not ok:
                raise GGQError(f"{tz.origin}: {prefix}.weight_zero_point has shape {list(zs)} ({tz.dtype}), "
                               f"expected packed {[-(-out // per_word), n_groups]} or unpacked {[out, n_groups]}")

        def decode(tp=tp, ts=ts, tz=tz, tg=tg, n_in=n_in, out=out, gs=gs, n_groups=n_groups):
            if packed:
                q = unpack_bits(tp.load(), bits, n_in, axis=1)           # (out, in), stored q + offset
            else:
                q = np.asarray(tp.load()).astype(np.int16) + offset      # signed int8 codes + offset
                if q.min(initial=offset) < 0 or q.max(initial=offset) >= 2 * offset:
                    raise GGQError(f"{tp.origin}: {tp.name} has codes outside the {bits}-bit range")
                q = q.astype(np.uint8)
            s = np.asarray(ts.load()).astype(np.float32).reshape(-1, n_groups)
            s = np.broadcast_to(s, (out, n_groups))
            if tz is None:
                z = np.full((out, n_groups), offset, np.int16)
            else:
                raw = np.asarray(tz.load())
                if tz.dtype in ("I32", "U32") and raw.shape == (-(-out // per_word), n_groups) and raw.shape != (out, n_groups):
                    z = unpack_bits(raw, bits, out, axis=0).astype(np.int16)  # stored zp + offset
                elif tz.dtype in ("I32", "U32") and per_word == 1:
                    z = raw.astype(np.int16) + offset
                else:
                    z = raw.astype(np.int16).reshape(-1, n_groups) + offset
                z = np.broadcast_to(z, (out, n_groups))
            if tg is not None:
                g = np.asarray(tg.load()).astype(np.int64)
                if g.shape != (n_in,) or g.min(initial=0) < 0 or g.max(initial=0) >= n_groups:
                    raise GGQError(f"{tg.origin}: {tg.name} does not give a group in 0..{n_groups - 1} for each of {n_in} inputs")
            else:
                g = np.arange(n_in) // gs if n_groups > 1 else np.zeros(n_in, np.int64)
            return QuantizedWeight(np.ascontiguousarray(q), np.ascontiguousarray(s), np.ascontiguousarray(z), g)

        name = f"{prefix}.weight"
        repl[pname] = (make_source(name, (out, n_in), "COMPRESSED", decode, info, tp.origin,
                                   [tp, ts, tz, tg, tshape]),
                       [f"{prefix}.{p}" for p in (*_SUFFIXES, "weight", "input_scale", "input_zero_point")])
    replace_tensors(ck, repl, info)
    return info
