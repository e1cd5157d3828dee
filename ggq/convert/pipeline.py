"""``ggq convert``: a Hugging Face checkpoint (or a GGUF file) to a GGUF file, streaming.

The pipeline plans every output tensor first (GGUF name, shape, ggml type), writes the header,
metadata and tensor table, then loads, converts and writes one tensor at a time into a temporary
file that is renamed into place at the end. Peak memory stays near the largest tensor.
"""

from __future__ import annotations

import logging
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from ggq import models, quants
from ggq.convert import arch as archmod
from ggq.convert import validate
from ggq.convert.checkpoint import Checkpoint, TensorSource, open_checkpoint, resolve_source
from ggq.errors import GGQError, show
from ggq.format.output import atomic_output, check_output
from ggq.models.base import Family, TensorRule

T = gguf.GGMLQuantizationType
FT = gguf.LlamaFileType
log = logging.getLogger("ggq.convert")

#: --type values that map every 2-D weight to one ggml type (llama.cpp's converter for the floats
#: and Q8_0; llama-quantize's per-tensor rules for the others come from ggq.convert.mixes)
BASIC_TYPES: dict[str, tuple[FT, T]] = {
    "F32": (FT.ALL_F32, T.F32),
    "F16": (FT.MOSTLY_F16, T.F16),
    "BF16": (FT.MOSTLY_BF16, T.BF16),
    "Q8_0": (FT.MOSTLY_Q8_0, T.Q8_0),
    "Q4_0": (FT.MOSTLY_Q4_0, T.Q4_0),
    "Q4_1": (FT.MOSTLY_Q4_1, T.Q4_1),
    "Q5_0": (FT.MOSTLY_Q5_0, T.Q5_0),
    "Q5_1": (FT.MOSTLY_Q5_1, T.Q5_1),
}


@dataclass
class PlannedTensor:
    """One output tensor: its GGUF name, numpy-order shape, source and how to transform it."""

    name: str
    shape: tuple[int, ...]
    source: TensorSource | None
    rule: TensorRule | None = None  # the family's transformation (Q/K permutation, norm shift, rows kept)
    data: np.ndarray | None = None  # for generated tensors (rope_freqs)
    qtype: T = T.F32
    native_used: bool = False  # an imported quantized tensor's codes were kept (TensorSource.native)
    lora: list | None = None  # (Adapter, scale) pairs merged into this tensor (ggq.convert.lora), or None

    @property
    def ne(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))

    @property
    def nbytes(self) -> int:
        n_rows = int(np.prod(self.shape[:-1], dtype=np.int64)) if len(self.shape) > 1 else 1
        return n_rows * quants.row_bytes(self.qtype, self.shape[-1])


def parse_type(name: str) -> str:
    """Normalise a ``--type`` value (case-insensitive) to its canonical name; GGQError if unknown."""
    try:
        from ggq.convert import mixes
    except ImportError:
        mixes = None
    key = name.strip().upper()
    if key in BASIC_TYPES:
        return key
    if mixes is not None:
        return mixes.parse_file_type(name).name.replace("MOSTLY_", "").replace("ALL_", "")
    raise GGQError(f"unknown --type {name!r} (valid: {', '.join(BASIC_TYPES)})")


def _basic_plan(planned: list[PlannedTensor], qtype: T) -> None:
    """Per-tensor types for a single-type file, as llama.cpp's converter chooses them: 1-D tensors
    and norms F32; a row length the block size does not divide falls back to F16 (F32 for F32)."""
    for p in planned:
        if len(p.shape) <= 1 or p.name.endswith("_norm.weight") or p.name == "rope_freqs.weight":
            p.qtype = T.F32
        elif p.shape[-1] % quants.block_size(qtype):
            p.qtype = T.F16
        else:
            p.qtype = qtype


def _plan_types(planned: list[PlannedTensor], type_name: str, fam: Family, hp, overrides, src_float: T,
                has_imatrix: bool = False) -> FT:
    if type_name in BASIC_TYPES and type_name in ("F32", "F16", "BF16", "Q8_0") and overrides is None:
        ftype, qtype = BASIC_TYPES[type_name]
        _basic_plan(planned, qtype)
        return ftype
    try:
        from ggq.convert import mixes
    except ImportError:
        ftype, qtype = BASIC_TYPES[type_name]
        _basic_plan(planned, qtype)
        return ftype
    ftype = mixes.parse_file_type(type_name)
    hparams = {"n_layer": hp.n_layer, "n_head": hp.n_head, "n_head_kv": hp.n_head_kv, "n_embd": hp.n_embd,
               "n_ff": hp.n_ff, "n_expert": 0, "n_vocab": hp.vocab_size}
    types = mixes.plan_types([(p.name, p.ne) for p in planned], ftype, fam.name, hparams, overrides,
                             source_float_type=src_float, has_imatrix=has_imatrix)
    for p in planned:
        p.qtype = types[p.name]
    return ftype


def plan_checkpoint(ck: Checkpoint, fam: Family, hp: archmod.HParams) -> list[PlannedTensor]:
    """Every output tensor in file order, with GGUF names and shapes (types not yet chosen): the
    family's generated tensors first, then the checkpoint's as its :meth:`~Family.tensor_rule` maps them."""
    names = archmod.NameMap(fam.gguf_arch, hp.n_layer, (ck.config.get("architectures") or [""])[0])
    planned: list[PlannedTensor] = [PlannedTensor(n, tuple(d.shape), None, data=d)
                                    for n, d in fam.extra_tensors(hp, ck.path)]
    seen: dict[str, str] = {}
    dropped: list[str] = []
    for hf_name in sorted(ck.tensors, key=archmod.natural_key):
        src = ck.tensors[hf_name]
        if hp.tie_embeddings and hf_name == "lm_head.weight":
            continue  # llama.cpp uses token_embd when output.weight is absent
        try:
            rule = fam.tensor_rule(hf_name, hp, names)
        except GGQError as e:
            raise GGQError(f"{ck.path}: {e}") from None
        if rule is None:
            dropped.append(hf_name)
            continue
        if rule.name in seen:
            raise GGQError(f"{ck.path}: tensors {show(seen[rule.name])} and {show(hf_name)} both map to {rule.name}")
        seen[rule.name] = hf_name
        if src.dtype.startswith("F8_"):
            raise GGQError(f"{src.origin or ck.path}: tensor {show(hf_name)} is {src.dtype}, but config.json has no fp8 "
                           "quantization_config that says how to scale it")
        if src.dtype not in ("F32", "F16", "BF16", "F64") and src.native is None and not src.dtype.isupper():
            raise GGQError(f"{src.origin or ck.path}: tensor {show(hf_name)} has non-float dtype {show(src.dtype)}")
        shape = tuple(src.shape)
        if rule.rows is not None and shape:
            shape = (min(rule.rows, shape[0]), *shape[1:])
        planned.append(PlannedTensor(rule.name, shape, src, rule=rule))
    if not any(p.name == "token_embd.weight" for p in planned):
        raise GGQError(f"{ck.path}: no token embedding tensor (model.embed_tokens.weight)")
    note = fam.dropped_note(dropped)
    if note:
        print(f"ggq: note: {ck.path}: {note}", file=sys.stderr)
    return planned


def _rows(p: PlannedTensor, arr: np.ndarray) -> np.ndarray:
    """Row selection and Q/K row permutation of the family's rule (block bytes or values)."""
    r = p.rule
    if r is None:
        return arr
    if r.rows is not None:
        arr = arr[:r.rows]
    return archmod.permute_qk_rows(arr, r.permute_heads) if r.permute_heads else arr


def _values(p: PlannedTensor) -> np.ndarray:
    """The source tensor's values after the family's rule (the shift in the stored float type, as
    llama.cpp adds it to the torch tensor), checked against the planned shape."""
    src = p.source
    assert src is not None
    arr = src.load()
    if p.rule is not None and p.rule.add:
        if arr.dtype not in (np.float16, np.float32):
            arr = arr.astype(np.float32)
        arr = arr + arr.dtype.type(p.rule.add)
    arr = _rows(p, arr)
    if tuple(arr.shape) != p.shape:
        raise GGQError(f"{src.origin}: tensor {show(src.name)} has shape {arr.shape}, expected {p.shape}")
    if p.lora:
        from ggq.convert.lora import merge

        arr = merge(arr, p.lora, p.name)  # float32, GGUF row order like the adapter's lora_b
    return arr


def _native(p: PlannedTensor) -> np.ndarray | None:
    """Block bytes an imported quantized tensor (GPTQ/AWQ) keeps in ``p.qtype``, or None."""
    src = p.source
    if src is None or src.native is None or (p.rule is not None and p.rule.add) or p.lora:
        return None
    raw = src.native(p.qtype)
    return None if raw is None else _rows(p, raw)


def _what(p: PlannedTensor) -> str:
    """``file: tensor name`` of a planned tensor's source, for messages."""
    src = p.source
    return f"{getattr(src, 'origin', None) or 'checkpoint'}: tensor {src.name if src is not None else p.name}"


def _produce(p: PlannedTensor) -> np.ndarray:
    """Load, transform and encode one tensor into the array written to the file."""
    if p.data is not None:
        return p.data.astype(np.float32)
    if p.qtype not in (T.F32, T.F16, T.BF16):
        raw = _native(p)
        if raw is not None:
            p.native_used = True
            return raw
    arr = _values(p)
    if arr.dtype != np.float16 or p.qtype != T.F16:
        arr = arr.astype(np.float32, copy=False)
    validate.check_finite(arr, p.qtype, _what(p))
    if p.qtype == T.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    return quants.quantize(arr, p.qtype)


def default_output(model_dir: Path, type_name: str) -> Path:
    return Path.cwd() / f"{model_dir.name}-{type_name}.gguf"


def convert(src: str | Path, out: str | Path | None = None, qtype: str | None = None, force: bool = False,
            progress: bool = True, overrides=None, imatrix: str | Path | None = None,
            allow_requantize: bool = False, import_report: str | Path | None = None,
            loras: list[str] | None = None) -> Path:
    """Convert the checkpoint ``src`` (folder, hub id, or a ``.gguf`` file) to the GGUF file ``out``.

    ``qtype``: a file type name (``F16``, ``Q8_0``, ``Q4_K_M``, ...), default: the checkpoint's own
    float type (or, for a GPTQ/AWQ checkpoint, the type that keeps its codes). ``overrides``: a
    :class:`ggq.convert.mixes.MixOverrides`; ``imatrix``: an imatrix file for the K-quants.
    ``import_report``: for a quantized checkpoint (GPTQ, AWQ, bitsandbytes, ...), a file to write the
    per-tensor error table to (:mod:`ggq.convert.quantized.report`; a one-line summary is always printed).
    ``loras``: ``ADAPTER[:SCALE]`` specs (PEFT folders or GGUF adapters) merged into the weights in
    float32 before quantization (:func:`ggq.convert.lora.merge`); a quantized checkpoint is
    dequantized first (QLoRA), and its merged tensors no longer keep their codes.
    Returns the output path. Raises GGQError for any bad input; never leaves a partial ``out``.
    """
    src_s = str(src)
    if src_s.endswith(".gguf") and Path(src_s).is_file():
        from ggq.convert.requantize import requantize

        if qtype is None:
            raise GGQError(f"{src_s}: converting a GGUF file needs --type")
        if loras:
            raise GGQError(f"{src_s}: --lora needs a Hugging Face checkpoint; for a GGUF model pass the adapter to "
                           "ggq run/generate/serve --lora")
        out_p = Path(out) if out else Path.cwd() / f"{Path(src_s).stem}-{parse_type(qtype)}.gguf"
        return requantize(src_s, out_p, qtype, allow_requantize=allow_requantize, overrides=overrides,
                          imatrix=imatrix, force=force, progress=progress)

    type_name = parse_type(qtype) if qtype is not None else None  # fail fast on a bad --type
    if out is not None:
        check_output(Path(out), force)
    model_dir = resolve_source(src_s)
    ck = open_checkpoint(model_dir)
    fam = models.for_checkpoint(ck.config, str(model_dir / "config.json"))
    hp = fam.hparams(ck.config, model_dir)

    qinfo = None
    try:
        from ggq.convert import quantized
    except ImportError:
        quantized = None
    if quantized is not None:
        qinfo = quantized.prepare(ck)
    elif "quantization_config" in ck.config:
        raise GGQError(f"{model_dir}: quantized checkpoints are not supported by this build")
    if import_report is not None and qinfo is None:
        raise GGQError(f"{model_dir}: --import-report needs a quantized checkpoint (config.json has no quantization_config)")

    if type_name is None:
        type_name = qinfo.default_type if qinfo is not None else ck.float_type
    out_p = Path(out) if out else default_output(model_dir, type_name)
    check_output(out_p, force)

    where = str(model_dir / "config.json")
    validate.check_sizes(hp, {n: t.shape for n, t in ck.tensors.items()}, where)
    planned = plan_checkpoint(ck, fam, hp)
    validate.check_plan(planned, fam, hp, where)
    if loras:
        _attach_loras(planned, loras, model_dir, fam)
    emb = next(p for p in planned if p.name == "token_embd.weight")
    if emb.source is not None and emb.source.shape[0] != hp.vocab_size:
        raise GGQError(f"{where}: vocab_size is {hp.vocab_size} but {emb.source.name} has {emb.source.shape[0]} rows")
    src_float = {"F16": T.F16, "BF16": T.BF16}.get(ck.float_type, T.F32)
    ftype = _plan_types(planned, type_name, fam, hp, overrides, src_float, has_imatrix=imatrix is not None)
    if qinfo is not None:
        warned = set()
        for p in planned:
            if p.source is not None and p.source.native is not None:
                msg = qinfo.lost(p.qtype)
                if msg and msg not in warned:
                    warned.add(msg)
                    print(f"ggq: warning: {msg}", file=sys.stderr)

    imat = None
    if imatrix is not None:
        from ggq.convert.imatrix import load_imatrix

        imat = load_imatrix(imatrix)

    w = gguf.GGUFWriter(None, fam.name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(model_dir.name)
    fam.write_hparams(w, hp)
    w.add_file_type(int(ftype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    fam.write_vocab(w, model_dir, ck.config)
    validate.check_vocab_written(w, emb.ne[1], model_dir)
    for p in planned:
        w.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)

    total = sum(p.nbytes for p in planned)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"{out_p.name}", file=sys.stderr,
                   dynamic_ncols=True, leave=False)
    try:
        with atomic_output(out_p, force) as tmp:
            w.write_header_to_file(tmp)
            try:
                w.write_kv_data_to_file()
            except (struct.error, OverflowError, ValueError, TypeError) as e:  # a value its key's type cannot hold
                raise GGQError(f"{where}: a value does not fit its GGUF key ({e})") from None
            w.write_ti_data_to_file()
            for i, p in enumerate(planned):
                if bar is not None:
                    bar.set_postfix_str(f"{i + 1}/{len(planned)} {p.name} {p.qtype.name}", refresh=False)
                if imat is not None and p.name in imat and p.qtype not in (T.F32, T.F16, T.BF16):
                    data = _produce_weighted(p, imat[p.name])
                else:
                    data = _produce(p)
                if data.nbytes != p.nbytes:
                    raise GGQError(f"internal error: {p.name} encodes to {data.nbytes} bytes, planned {p.nbytes}")
                if qinfo is not None and p.source is not None and p.source.native is not None:
                    from ggq.convert.quantized import report

                    report.measure(qinfo, p.name, p.qtype, data, _values(p), p.native_used)
                w.write_tensor_data(data)
                if p.source is not None:
                    p.source.release()
                if bar is not None:
                    bar.update(p.nbytes)
            w.close()
    finally:
        if bar is not None:
            bar.close()
        if w.fout:
            for f in w.fout:
                f.close()
    if qinfo is not None:
        from ggq.convert.quantized import report

        line = report.summary(qinfo)
        if line:
            merged = " (against the weights merged with the --lora adapters)" if loras else ""
            print(f"ggq: {line}{merged}", file=sys.stderr)
        if import_report is not None:
            report.write_tsv(qinfo, import_report)
    return out_p


def _attach_loras(planned: list[PlannedTensor], specs: list[str], model_dir: Path, fam: Family) -> None:
    """Read the ``--lora`` adapters and mark the planned tensors they adapt (GGQError for an adapter
    tensor the plan does not hold, or of another shape)."""
    from ggq.convert.lora import load_for_convert

    adapters = load_for_convert(specs, model_dir, fam.name)
    by_name = {p.name: p for p in planned}
    for ad, scale in adapters:
        for name, pair in ad.pairs.items():
            p = by_name.get(name)
            if p is None or p.source is None:
                raise GGQError(f"{ad.path}: the adapter's tensor {name} is not in the converted model")
            want = (pair.b.shape[0], pair.a.shape[1])
            if p.shape != want:
                raise GGQError(f"{ad.path}: {name}: lora_b @ lora_a is {list(want)}, the model's tensor is {list(p.shape)}")
            p.lora = (p.lora or []) + [(ad, scale)]


def _produce_weighted(p: PlannedTensor, weights: np.ndarray) -> np.ndarray:
    """Like :func:`_produce`, quantizing with importance weights (float32 ``(n_per_row,)``)."""
    raw = _native(p)  # a GPTQ/AWQ tensor whose codes fit keeps them; the imatrix is moot
    if raw is not None:
        p.native_used = True
        return raw
    arr = _values(p).astype(np.float32, copy=False)
    validate.check_finite(arr, p.qtype, _what(p))
    if weights.shape != (p.shape[-1],):
        raise GGQError(f"imatrix entry for {p.name} has {weights.shape[0]} columns, the tensor has {p.shape[-1]}")
    return quants.quantize(arr, p.qtype, imatrix=weights)
