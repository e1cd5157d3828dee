"""GPTQ checkpoints (AutoGPTQ / GPTQModel ``gptq`` and ``gptq_v2`` formats), 2, 3, 4 and 8 bits.

Per linear layer ``P`` (``P.weight`` of the float model, shape (out, in)) the checkpoint stores:

* ``P.qweight``: int32 ``(in * bits / 32, out)``: for each output column, the input codes as one
  little-endian bit stream (code ``i`` at stream bits ``i*bits ..``; 3-bit codes straddle words);
* ``P.qzeros``: int32 ``(n_groups, out * bits / 32)``: zero points packed the same way along the
  output dimension. Format ``gptq`` (v1) stores ``z - 1`` (decode: stored + 1, so a stored
  all-ones reads as ``2^bits``); ``gptq_v2`` stores ``z``;
* ``P.scales``: fp16 ``(n_groups, out)``;
* ``P.g_idx``: int32 ``(in,)`` group of each input (optional; default ``i // group_size``;
  not sorted with act-order, ``desc_act``).

Decode: ``W[o, i] = scales[g_idx[i], o] * (q[i, o] - z[g_idx[i], o])``. See ``specs/gptq-awq.md``.
"""

from __future__ import annotations

import numpy as np

from ggq.convert.quantized import QuantizedInfo, QuantizedWeight, make_source, replace_tensors, unpack_bits
from ggq.errors import GGQError, show

BITS = (2, 3, 4, 8)


def _as_f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(np.float32)


def prepare_gptq(ck, qc: dict) -> QuantizedInfo:
    """Replace every ``P.qweight/qzeros/scales/g_idx`` group of ``ck.tensors`` by ``P.weight``.

    ``qc``: the quantization_config dict. Raises GGQError for an unsupported width or pack dtype,
    a missing companion tensor, or shapes that do not match ``bits``/``group_size``.
    """
    where = f"{ck.path}/config.json"
    try:
        bits = int(qc.get("bits", qc.get("w_bit", 4)))
        group_size = int(qc.get("group_size", 128))
    except (TypeError, ValueError):
        raise GGQError(f"{where}: quantization_config bits/group_size are not integers") from None
    if bits not in BITS:
        raise GGQError(f"{where}: GPTQ with {bits} bits is not supported (ggq imports {', '.join(map(str, BITS))}-bit GPTQ)")
    if group_size == 0 or group_size < -1:
        raise GGQError(f"{where}: invalid GPTQ group_size {group_size}")
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise GGQError(f"{where}: GPTQ checkpoint_format {show(fmt)} is not supported (ggq reads gptq and gptq_v2)")
    pack_dtype = str(qc.get("pack_dtype", "int32")).replace("torch.", "")
    if pack_dtype != "int32":
        raise GGQError(f"{where}: GPTQ pack_dtype {pack_dtype} is not supported (ggq reads int32 packing)")
    info = QuantizedInfo("gptq", bits, group_size, bool(qc.get("sym", True)), bool(qc.get("desc_act", False)), fmt=fmt)
    offset = 1 if fmt == "gptq" else 0
    repl = {}

    for qname in [k for k in ck.tensors if k.endswith(".qweight")]:
        prefix = qname[: -len(".qweight")]
        tq = ck.tensors[qname]
        parts = {}
        for part in ("qzeros", "scales"):
            t = ck.tensors.get(f"{prefix}.{part}")
            if t is None:
                raise GGQError(f"{tq.origin}: {qname} has no {prefix}.{part} (not a GPTQ layer?)")
            parts[part] = t
        tg = ck.tensors.get(f"{prefix}.g_idx")
        if len(tq.shape) != 2 or len(parts["scales"].shape) != 2 or len(parts["qzeros"].shape) != 2:
            raise GGQError(f"{tq.origin}: {prefix}: qweight, qzeros and scales must be 2-D")
        if tq.dtype not in ("I32", "U32"):
            raise GGQError(f"{tq.origin}: {qname} is {tq.dtype}, GPTQ qweight must be int32")
        words, out = tq.shape
        if tg is not None:
            n_in = tg.shape[0] if len(tg.shape) == 1 else -1
        else:
            n_in = words * 32 // bits
        if n_in <= 0 or -(-n_in * bits // 32) != words:
            raise GGQError(f"{tq.origin}: {qname} has shape {list(tq.shape)}, which does not hold {bits}-bit codes "
                           f"of {n_in} inputs (quantization_config says bits={bits})")
        gs = n_in if group_size == -1 else group_size
        n_groups = -(-n_in // gs)
        if parts["scales"].shape[0] != n_groups:
            raise GGQError(f"{parts['scales'].origin}: {prefix}.scales has {parts['scales'].shape[0]} groups, "
                           f"group_size={group_size} over {n_in} inputs needs {n_groups}")
        n_groups = parts["scales"].shape[0]
        if parts["scales"].shape[1] != out:
            raise GGQError(f"{parts['scales'].origin}: {prefix}.scales has shape {list(parts['scales'].shape)}, "
                           f"qweight has {out} outputs")
        zw = -(-out * bits // 32)
        if tuple(parts["qzeros"].shape) != (n_groups, zw):
            raise GGQError(f"{parts['qzeros'].origin}: {prefix}.qzeros has shape {list(parts['qzeros'].shape)}, "
                           f"expected {[n_groups, zw]} for {bits}-bit zeros of {out} outputs")

        def decode(tq=tq, tz=parts["qzeros"], ts=parts["scales"], tg=tg, n_in=n_in, out=out, gs=gs, n_groups=n_groups):
            q = unpack_bits(tq.load(), bits, n_in, axis=0)            # (in, out)
            z = unpack_bits(tz.load(), bits, out, axis=1).astype(np.int16) + offset  # (groups, out)
            s = _as_f32(ts.load())                                      # (groups, out)
            if tg is not None:
                g = np.asarray(tg.load()).astype(np.int64)
                if g.min(initial=0) < 0 or g.max(initial=0) >= n_groups:
                    raise GGQError(f"{tg.origin}: {tg.name} has group indices outside 0..{n_groups - 1}")
            else:
                g = np.arange(n_in) // gs
            return QuantizedWeight(np.ascontiguousarray(q.T), np.ascontiguousarray(s.T),
                                   np.ascontiguousarray(z.T), g)

        name = f"{prefix}.weight"
        repl[qname] = (make_source(name, (out, n_in), "GPTQ", decode, info, tq.origin,
                                   [tq, tg, *parts.values()]),
                       [f"{prefix}.{p}" for p in ("qweight", "qzeros", "scales", "g_idx")])
    replace_tensors(ck, repl, info)
    return info
