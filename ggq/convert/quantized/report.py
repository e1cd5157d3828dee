"""Per-tensor error of an imported quantized checkpoint's GGUF against the checkpoint's own dequantization.

For every imported tensor the converter calls :func:`measure` with the bytes it wrote and the
float32 weights the checkpoint decodes to (``TensorSource.load()``: for bitsandbytes, exactly what
``bitsandbytes.functional`` dequantizes to). When the bytes came from a native mapping (codes kept,
e.g. LLM.int8 -> Q8_0), the dequantize-then-quantize baseline (ggq's quantizer on the same
weights) is measured too. :func:`summary` is the line printed after conversion; :func:`write_tsv`
writes the table behind ``ggq convert --import-report FILE``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from ggq.errors import GGQError

T = GGMLQuantizationType


@dataclass
class TensorError:
    """Errors of one tensor (GGUF name), all against the checkpoint's dequantized float32 weights.

    ``rms``: root mean square of ``gguf - ref``; ``max``: largest ``|gguf - ref|``; ``ref_rms``: RMS
    of ``ref``; ``base_rms``/``base_max``: the same for dequantize-then-quantize (equal to ``rms``/
    ``max`` when the tensor was requantized, i.e. no native mapping); ``native``: codes kept."""

    name: str
    qtype: str
    rms: float
    max: float
    ref_rms: float
    base_rms: float
    base_max: float
    native: bool


def decode(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """The float32 values of a tensor the converter wrote (block bytes or F32/F16/BF16 arrays)."""
    from ggq import quants

    if qtype == T.F32:
        return np.asarray(data, np.float32)
    if qtype == T.F16:
        return np.asarray(data).view(np.float16).astype(np.float32)
    if qtype == T.BF16:
        return (np.asarray(data).view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return quants.dequantize(np.asarray(data, np.uint8), qtype)


def _rms_max(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = a.astype(np.float64) - b.astype(np.float64)
    return float(np.sqrt(np.mean(d * d))) if d.size else 0.0, float(np.abs(d).max(initial=0.0))


def measure(info, name: str, qtype: GGMLQuantizationType, data: np.ndarray, ref: np.ndarray, native: bool) -> TensorError:
    """Record in ``info.stats["errors"]`` the error of ``data`` (what was written, ``qtype``) against
    ``ref`` (float32, the same shape and row order as the written tensor); ``native``: the bytes
    came from a native mapping, so the dequantize-then-quantize baseline is measured as well."""
    from ggq import quants

    qtype = T(qtype)
    ref = np.asarray(ref, np.float32)
    got = decode(data, qtype).reshape(ref.shape)
    rms, mx = _rms_max(got, ref)
    base_rms, base_max = rms, mx
    if native:
        base = decode(quants.quantize(ref, qtype), qtype).reshape(ref.shape)
        base_rms, base_max = _rms_max(base, ref)
    ref_rms = float(np.sqrt(np.mean(ref.astype(np.float64) ** 2))) if ref.size else 0.0
    e = TensorError(name, qtype.name, rms, mx, ref_rms, base_rms, base_max, native)
    info.stats.setdefault("errors", {})[name] = e
    return e


def _rel(x: float, ref: float) -> float:
    return x / ref if ref > 0 else 0.0


def summary(info) -> str | None:
    """One line: tensors measured, the mean and worst relative RMS error and the baseline's."""
    errs: dict = info.stats.get("errors") or {}
    if not errs:
        return None
    rel = {k: _rel(e.rms, e.ref_rms) for k, e in errs.items()}
    base = [_rel(e.base_rms, e.ref_rms) for e in errs.values()]
    worst = max(rel, key=rel.get)
    n_native = sum(e.native for e in errs.values())
    line = (f"{info.method} import: {len(errs)} tensors, error against the checkpoint's own dequantization: "
            f"relative RMS mean {np.mean(list(rel.values())):.3g}, worst {rel[worst]:.3g} ({worst})")
    if n_native:
        line += (f"; {n_native} kept their codes (dequantize-then-quantize would give mean "
                 f"{np.mean(base):.3g})")
    acts = info.stats.get("activations")
    if acts and acts != "weights only":
        line += f"; the checkpoint's activation quantization ({acts}) is ignored: ggq's runtime quantizes activations itself"
    return line


def write_tsv(info, path: str | Path) -> None:
    """Write the per-tensor errors as a tab-separated table (one header line)."""
    errs: dict = info.stats.get("errors") or {}
    lines = ["tensor\ttype\tcodes_kept\trms\tmax_abs\trel_rms\tbaseline_rms\tbaseline_max_abs\tbaseline_rel_rms"]
    for e in errs.values():
        lines.append(f"{e.name}\t{e.qtype}\t{int(e.native)}\t{e.rms:.6g}\t{e.max:.6g}\t{_rel(e.rms, e.ref_rms):.6g}\t"
                     f"{e.base_rms:.6g}\t{e.base_max:.6g}\t{_rel(e.base_rms, e.ref_rms):.6g}")
    try:
        Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
    except OSError as e:
        raise GGQError(f"{path}: cannot write the import report ({e.strerror})") from None
