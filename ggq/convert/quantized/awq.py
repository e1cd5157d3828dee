"""AWQ checkpoints (AutoAWQ / GPTQModel), 4 bits, GEMM and GEMV packings.

GEMM (``version``/``format`` "gemm", the common one), per linear layer ``P`` (float weight (out, in)):

* ``P.qweight``: int32 ``(in, out / 8)``: eight output columns per word, nibble ``k`` (bits
  ``4k..4k+3``) holding column ``8w + [0, 2, 4, 6, 1, 3, 5, 7][k]`` of word ``w``;
* ``P.qzeros``: int32 ``(n_groups, out / 8)``, packed the same way; zero points stored as is;
* ``P.scales``: fp16 ``(n_groups, out)``.

GEMV (``version`` "gemv"): ``P.qweight`` int32 ``(out, in / 8)`` with eight consecutive inputs per
word (nibble ``k`` = input ``8w + k``); ``P.qzeros`` int32 ``(out, W)`` with the zero points of
consecutive groups packed the same way; ``P.scales`` fp16 ``(out, 8 W)``; both padded past
``in / group_size`` groups (the padding is ignored).

Decode: ``W[o, i] = s[g, o] * (q[i, o] - z[g, o])`` with ``g = i // group_size``.
See ``specs/gptq-awq.md``.
"""

from __future__ import annotations

import numpy as np

from ggq.convert.quantized import QuantizedInfo, QuantizedWeight, make_source, replace_tensors, unpack_bits
from ggq.errors import GGQError, show

#: nibble k of a GEMM word holds column ORDER[k] of its eight
ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])
#: column c of a GEMM word sits in nibble REVERSE[c]
REVERSE = np.argsort(ORDER)


def unpack_gemm(packed: np.ndarray, n_cols: int) -> np.ndarray:
    """int32 (rows, n_cols / 8) AWQ-GEMM words -> uint8 (rows, n_cols) 4-bit codes in column order."""
    nib = unpack_bits(packed, 4, n_cols, axis=1)  # nibble order
    rows = nib.shape[0]
    return np.ascontiguousarray(nib.reshape(rows, n_cols // 8, 8)[:, :, REVERSE].reshape(rows, n_cols))


def prepare_awq(ck, qc: dict) -> QuantizedInfo:
    """Replace every ``P.qweight/qzeros/scales`` group of ``ck.tensors`` by ``P.weight``.

    Raises GGQError for a width other than 4, an unknown version, a missing companion tensor, or
    shapes that do not match ``group_size``.
    """
    where = f"{ck.path}/config.json"
    try:
        bits = int(qc.get("bits", qc.get("w_bit", 4)))
        group_size = int(qc.get("group_size", qc.get("q_group_size", 128)))
    except (TypeError, ValueError):
        raise GGQError(f"{where}: quantization_config bits/group_size are not integers") from None
    if bits != 4:
        raise GGQError(f"{where}: AWQ with {bits} bits is not supported (AWQ packs 4-bit codes)")
    version = str(qc.get("version") or qc.get("format") or "gemm").lower()
    if version not in ("gemm", "gemv"):
        raise GGQError(f"{where}: AWQ version {show(version)} is not supported (ggq reads gemm and gemv)")
    if group_size <= 0 and group_size != -1:
        raise GGQError(f"{where}: invalid AWQ group_size {group_size}")
    zero_point = bool(qc.get("zero_point", True))
    info = QuantizedInfo("awq", bits, group_size, not zero_point, False, fmt=version)
    repl = {}

    for qname in [k for k in ck.tensors if k.endswith(".qweight")]:
        prefix = qname[: -len(".qweight")]
        tq = ck.tensors[qname]
        tz, ts = ck.tensors.get(f"{prefix}.qzeros"), ck.tensors.get(f"{prefix}.scales")
        if tz is None or ts is None:
            raise GGQError(f"{tq.origin}: {qname} has no {prefix}.{'qzeros' if tz is None else 'scales'} (not an AWQ layer?)")
        if not (len(tq.shape) == len(tz.shape) == len(ts.shape) == 2):
            raise GGQError(f"{tq.origin}: {prefix}: qweight, qzeros and scales must be 2-D")
        if tq.dtype not in ("I32", "U32") or tz.dtype not in ("I32", "U32"):
            raise GGQError(f"{tq.origin}: {prefix}: AWQ qweight/qzeros must be int32 (found {tq.dtype}/{tz.dtype})")
        if version == "gemm":
            n_in, out = tq.shape[0], tq.shape[1] * 8
            gs = n_in if group_size == -1 else group_size
            n_groups = n_in // gs
            if n_in % gs or tuple(ts.shape) != (n_groups, out) or tuple(tz.shape) != (n_groups, out // 8):
                raise GGQError(f"{tq.origin}: {prefix}: qweight {list(tq.shape)}, qzeros {list(tz.shape)}, scales "
                               f"{list(ts.shape)} do not match AWQ GEMM 4-bit packing with group_size={group_size} "
                               f"(expected qzeros {[n_groups, out // 8]}, scales {[n_groups, out]})")
        else:
            out, n_in = tq.shape[0], tq.shape[1] * 8
            gs = n_in if group_size == -1 else group_size
            n_groups = n_in // gs
            if n_in % gs or ts.shape[0] != out or tz.shape[0] != out or ts.shape[1] < n_groups or tz.shape[1] * 8 < n_groups:
                raise GGQError(f"{tq.origin}: {prefix}: qweight {list(tq.shape)}, qzeros {list(tz.shape)}, scales "
                               f"{list(ts.shape)} do not match AWQ GEMV 4-bit packing with group_size={group_size}")

        def decode(tq=tq, tz=tz, ts=ts, n_in=n_in, out=out, gs=gs, n_groups=n_groups):
            g = np.arange(n_in) // gs
            if version == "gemm":
                q = unpack_gemm(tq.load(), out).T                       # (out, in)
                z = unpack_gemm(tz.load(), out).T                       # (out, groups)
                s = np.asarray(ts.load()).astype(np.float32).T          # (out, groups)
            else:
                q = unpack_bits(tq.load(), 4, n_in, axis=1)             # (out, in)
                z = unpack_bits(tz.load(), 4, n_groups, axis=1)         # (out, groups)
                s = np.asarray(ts.load()).astype(np.float32)[:, :n_groups]
            return QuantizedWeight(np.ascontiguousarray(q), np.ascontiguousarray(s),
                                   np.ascontiguousarray(z.astype(np.int16)), g)

        name = f"{prefix}.weight"
        repl[qname] = (make_source(name, (out, n_in), "AWQ", decode, info, tq.origin, [tq, tz, ts]),
                       [f"{prefix}.{p}" for p in ("qweight", "qzeros", "scales")])
    replace_tensors(ck, repl, info)
    return info
