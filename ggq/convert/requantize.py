"""Requantize a GGUF file to another mix: ``ggq quantize IN.gguf OUT.gguf Q4_K_M`` (llama-quantize).

What llama-quantize (``llama_model_quantize_impl`` in llama.cpp's ``src/llama-quant.cpp``) does,
re-implemented on ggq's kernels:

* the input is read and validated by :func:`ggq.format.gguf_reader.read_gguf` (and, for an
  architecture ggq runs, by the runtime's model validation) before anything is written;
* every metadata key is copied with its value and element types (split keys dropped), then
  ``general.quantization_version`` (2) and ``general.file_type`` are set, plus the
  ``quantize.imatrix.*`` keys when an importance matrix is used;
* tensors are written in llama.cpp's loader order (non-layer tensors, then by layer number, then
  by name) with the types of :func:`ggq.convert.mixes.plan_types_from`;
* a tensor whose type does not change is copied; the others are dequantized (F16/BF16/quantized
  -> float32) and quantized slab by slab (at most ~64 MiB of float32 rows at a time), so peak memory
  stays near one slab plus the mapped input;
* the output is written by :class:`ggq.format.gguf_writer.GGUFWriter` (gguf-py's writer) to a
  temporary file renamed into place at the end.
"""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, LlamaFileType

from ggq import quants
from ggq.convert import mixes
from ggq.errors import GGQError, show
from ggq.convert.validate import check_finite
from ggq.format.gguf_reader import read_gguf
from ggq.format.gguf_writer import GGUFWriter
from ggq.format.output import atomic_output, check_output

T = GGMLQuantizationType
FLOATS = (T.F32, T.F16, T.BF16)
SLAB_BYTES = 64 << 20  # float32 bytes per slab of rows
_DROP_KEYS = {"split.no", "split.count", "split.tensors.count",
              "general.quantization_version", "general.file_type"}


def _imatrix_arg(imatrix) -> tuple[dict | None, list[tuple[str, object, GGUFValueType]]]:
    """(per-tensor weights, extra metadata ``(key, value, type)``) for an imatrix given as a path or a dict."""
    if imatrix is None:
        return None, []
    U32, STR = GGUFValueType.UINT32, GGUFValueType.STRING
    if isinstance(imatrix, dict):
        return imatrix, [("quantize.imatrix.entries_count", len(imatrix), U32)]
    from ggq.convert.imatrix import load_imatrix, read_imatrix_info

    data = load_imatrix(imatrix)
    info = read_imatrix_info(imatrix)
    kv = [("quantize.imatrix.file", str(imatrix)[:127], STR)]
    if info.get("datasets"):
        kv.append(("quantize.imatrix.dataset", str(info["datasets"][0])[:127], STR))
    kv.append(("quantize.imatrix.entries_count", len(data), U32))
    if info.get("chunk_count", 0) > 0:
        kv.append(("quantize.imatrix.chunks_count", info["chunk_count"], U32))
    return data, kv


def requantize(src_gguf, out, ftype, *, allow_requantize: bool = False, overrides: mixes.MixOverrides | None = None,
               imatrix=None, force: bool = False, progress: bool = True) -> Path:
    """Write ``src_gguf`` as file type ``ftype`` (name like ``"Q4_K_M"`` or a ``LlamaFileType``) to ``out``.

    ``allow_requantize``: allow tensors that are already quantized (llama-quantize's
    ``--allow-requantize``); ``overrides``: :class:`ggq.convert.mixes.MixOverrides`;
    ``imatrix``: path of an imatrix file (GGUF or legacy ``.dat``) or ``{tensor name: float32
    (n_per_row,) or (n_expert * n_per_row,)}`` importance weights; ``force``: overwrite ``out``.

    Returns ``out``. Raises GGQError for a missing/malformed input, an existing output without
    ``force``, a quantized input without ``allow_requantize``, a split input, a tensor type ggq
    cannot convert, or an imatrix entry whose size does not match its tensor.
    """
    src_gguf, out = Path(src_gguf), Path(out)
    ft = mixes.parse_file_type(ftype) if isinstance(ftype, str) else LlamaFileType(ftype)
    check_output(out, force)
    if not src_gguf.is_file():
        raise GGQError(f"{src_gguf}: no such file")
    if out.exists() and out.resolve() == src_gguf.resolve():
        raise GGQError(f"{out}: output is the input file")
    hdr = read_gguf(src_gguf)
    md = hdr.metadata
    split = md.get("split.count")
    if split is not None and (not isinstance(split, int) or split > 1):
        raise GGQError(f"{src_gguf}: split GGUF files are not supported; merge them first (llama-gguf-split --merge)")
    arch = md.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        kind = md.get("general.type")
        raise GGQError(f"{src_gguf}: not a model file (no general.architecture"
                       + (f"; general.type is {show(kind)})" if kind else ")"))
    _check_model(src_gguf, arch, hdr)
    arch, hparams = mixes.hparams_from_gguf(md)
    for k, v in hparams.items():
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**31:
            raise GGQError(f"{src_gguf}: hyper-parameter {k} = {show(v)} is not a count")
    imat, imat_kv = _imatrix_arg(imatrix)

    src = {t.name: (t.offset, t.ne, t.qtype) for t in hdr.tensors.values()}
    try:
        plan = mixes.plan_types_from([(n, ne, ty) for n, (_, ne, ty) in src.items()], ft, arch, hparams,
                                     overrides, has_imatrix=imat is not None)
    except GGQError as e:
        raise GGQError(f"{src_gguf}: {e}") from None

    # refuse early, before writing anything (llama-quantize fails mid-way)
    for name, new in plan.items():
        _, ne, cur = src[name]
        if cur == new:
            continue
        if cur not in FLOATS and not allow_requantize:
            raise GGQError(f"{src_gguf}: tensor {show(name)} is already quantized ({cur.name}); requantizing loses "
                           f"quality, pass --allow-requantize to do it anyway")
        for ty in (cur, new):
            if not quants.supported(ty):
                raise GGQError(f"{src_gguf}: tensor {show(name)}: ggq cannot convert {ty.name}")
        if ne[0] % quants.block_size(new):
            raise GGQError(f"{src_gguf}: tensor {show(name)}: row length {ne[0]} is not a multiple of the "
                           f"{new.name} block size {quants.block_size(new)}")
        if imat is not None and name in imat:
            n_mat = ne[2] if len(ne) > 2 else 1
            size = int(np.asarray(imat[name]).size)
            if size != ne[0] * n_mat and name not in ("token_embd.weight", "per_layer_token_embd.weight"):
                raise GGQError(f"{src_gguf}: the imatrix entry for {show(name)} has {size} values, the tensor needs "
                               f"{ne[0] * n_mat}")

    w = GGUFWriter(None, "")  # "": the copied keys bring general.architecture, in their order
    w.data_alignment = hdr.alignment
    w.copy_metadata(hdr, skip=_DROP_KEYS)
    w.add_uint32("general.quantization_version", gguf.GGML_QUANT_VERSION)
    w.add_uint32("general.file_type", int(ft))
    for key, val, vt in imat_kv:
        w.add_key_value(key, val, vt)
    sizes = []
    for name, new in plan.items():
        _, ne, _ = src[name]
        n_rows = int(np.prod(ne[1:], dtype=np.int64))
        nbytes = n_rows * quants.row_bytes(new, ne[0])
        w.add_tensor_info(name, tuple(reversed(ne)), np.dtype(np.float32), nbytes, raw_dtype=new)
        sizes.append(nbytes)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, unit_divisor=1024, desc=out.name,
                   file=sys.stderr, dynamic_ncols=True, leave=False)
    try:
        with atomic_output(out, force) as tmp, open(src_gguf, "rb") as fin:
            w.write_header_to_file(tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for (name, new), nbytes in zip(plan.items(), sizes):
                off, ne, cur = src[name]
                if bar is not None:
                    bar.set_postfix_str(f"{name} {cur.name}->{new.name}", refresh=False)
                wts = imat.get(name) if imat is not None and new not in FLOATS else None
                what = f"{src_gguf}: tensor {show(name)}"
                w.write_tensor_stream(_tensor_parts(fin, off, ne, cur, new, wts, what), nbytes)
                if bar is not None:
                    bar.update(nbytes)
            w.close()
    finally:
        w.close_files()
        if bar is not None:
            bar.close()
    return out


def _check_model(path: Path, arch: str, hdr) -> None:
    """What ``quantize`` requires of its input, so that it does not write a file no runner loads:
    a ``tokenizer.ggml.tokens`` array (the vocabulary every runner loads); for an architecture
    ggq runs, the runtime's model validation (:func:`ggq.runtime.model.plan_model`:
    hyper-parameters, layers, tensor shapes, vocabulary), so that ``generate`` does not refuse the
    output. Other architectures (llama-quantize quantizes them too) get the reader's structural
    checks, an integer ``{arch}.block_count`` equal to the number of ``blk.N`` groups
    (llama_model_loader's hyper-parameters and tensor count), and the runtime's vocabulary checks
    against the token count (string tokens, arrays of equal length, special token ids in range)."""
    from ggq import models

    md = hdr.metadata
    if not isinstance(md.get("tokenizer.ggml.tokens"), list):
        raise GGQError(f"{path}: no tokenizer.ggml.tokens array (not a complete model file)")
    if models.find(gguf_arch=arch) is None:
        from ggq.runtime.model import check_layers, check_vocab

        n_layer = md.get(f"{arch}.block_count")
        if type(n_layer) is not int or not 1 <= n_layer < 2**31:
            raise GGQError(f"{path}: {arch}.block_count is missing or not a positive integer ({show(n_layer)})")
        check_layers(hdr.tensors, arch, n_layer, str(path))
        check_vocab(md, arch, len(md["tokenizer.ggml.tokens"]), str(path))  # array lengths, special token ids
        return
    from ggq.runtime.loader import open_gguf
    from ggq.runtime.model import plan_model

    plan_model(open_gguf(path), check_types=False)


def _read_rows(fin, offset: int, row_bytes: int, i: int, j: int) -> np.ndarray:
    """Rows ``i:j`` of a tensor at ``offset``, read from the file (uint8 ``(j - i, row_bytes)``)."""
    buf = np.empty((j - i, row_bytes), dtype=np.uint8)
    fin.seek(offset + i * row_bytes)
    if fin.readinto(memoryview(buf).cast("B")) != buf.nbytes:
        raise GGQError(f"{fin.name}: truncated tensor data")
    return buf


def _tensor_parts(fin, offset: int, ne: tuple[int, ...], cur: T, new: T, weights, what: str):
    """One tensor's data converted from ``cur`` to ``new``, as uint8 arrays to write in order.

    Reads and converts slabs of at most :data:`SLAB_BYTES` (float32) rows, one matrix (expert)
    at a time, so memory stays near one slab whatever the tensor size. GGQError naming ``what``
    for non-finite values (:func:`ggq.convert.validate.check_finite`)."""
    n0 = ne[0]
    src_rb = quants.row_bytes(cur, n0)
    n_rows = int(np.prod(ne[1:], dtype=np.int64)) if len(ne) > 1 else 1
    if cur == new:
        step = max(1, SLAB_BYTES // max(src_rb, 1))
        for i in range(0, n_rows, step):
            yield _read_rows(fin, offset, src_rb, i, min(i + step, n_rows))
        return
    rows_per_mat = ne[1] if len(ne) > 1 else 1
    n_mat = n_rows // rows_per_mat
    if weights is not None:
        weights = np.ascontiguousarray(weights, dtype=np.float32).reshape(-1)
        if weights.size != n0 * (ne[2] if len(ne) > 2 else 1):
            weights = None  # token_embd with a mismatched entry: ignored, as llama-quantize does
    step = max(1, SLAB_BYTES // (4 * n0))
    for m in range(n_mat):
        w = None
        if weights is not None:
            w = weights[(m % (weights.size // n0)) * n0:][:n0]
        for i in range(m * rows_per_mat, (m + 1) * rows_per_mat, step):
            j = min(i + step, (m + 1) * rows_per_mat)
            x = _to_f32(_read_rows(fin, offset, src_rb, i, j), cur, n0)
            check_finite(x, new, what)
            q = quants.quantize(x, new, imatrix=w)
            yield np.ascontiguousarray(q).view(np.uint8)


def _to_f32(block_rows: np.ndarray, cur: T, n0: int) -> np.ndarray:
    if cur == T.F32:
        return np.ascontiguousarray(block_rows).view(np.float32).reshape(-1, n0)
    if cur == T.F16:
        return np.ascontiguousarray(block_rows).view(np.float16).reshape(-1, n0).astype(np.float32)
    return quants.dequantize(np.ascontiguousarray(block_rows), cur).reshape(-1, n0)
