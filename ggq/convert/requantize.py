"""Requantize a GGUF file to another mix: ``ggq quantize IN.gguf OUT.gguf Q4_K_M`` (llama-quantize).

What llama-quantize (``llama_model_quantize_impl`` in llama.cpp's ``src/llama-quant.cpp``) does,
re-implemented on ggq's kernels:

* every metadata key is copied byte for byte (split keys dropped), then
  ``general.quantization_version`` (2) and ``general.file_type`` are set, plus the
  ``quantize.imatrix.*`` keys when an importance matrix is used;
* tensors are written in llama.cpp's loader order (non-layer tensors, then by layer number, then
  by name) with the types of :func:`ggq.convert.mixes.plan_types_from`;
* a tensor whose type does not change is copied; the others are dequantized (F16/BF16/quantized
  -> float32) and quantized slab by slab (at most ~64 MiB of float32 rows at a time), so peak memory
  stays near one slab plus the mapped input;
* the output goes to a temporary file renamed into place at the end.
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import gguf
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, LlamaFileType

from ggq import quants
from ggq.convert import mixes
from ggq.errors import GGQError
from ggq.format.output import atomic_output, check_output

T = GGMLQuantizationType
FLOATS = (T.F32, T.F16, T.BF16)
SLAB_BYTES = 64 << 20  # float32 bytes per slab of rows
_DROP_KEYS = {"split.no", "split.count", "split.tensors.count",
              "general.quantization_version", "general.file_type"}


def _pack_str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _kv_u32(key: str, v: int) -> bytes:
    return _pack_str(key) + struct.pack("<II", GGUFValueType.UINT32, int(v))


def _kv_str(key: str, v: str) -> bytes:
    return _pack_str(key) + struct.pack("<I", GGUFValueType.STRING) + _pack_str(v)


_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


class _Header:
    """A GGUF file's header parsed without loading any tensor data.

    ``kv``: ``[(key, value, raw bytes of the whole key/value record)]`` -- strings and scalars as
    Python values, numeric arrays of up to 4096 items as lists, other arrays None;
    ``tensors``: ``[(name, ne, type, absolute data offset)]``. (gguf.GGUFReader builds a numpy view
    per vocabulary string, which takes seconds on a 49k-token vocabulary; this does not.)
    """

    def __init__(self, path: Path):
        import mmap

        self.path = path
        try:
            with open(path, "rb") as f:
                self.size = os.fstat(f.fileno()).st_size
                magic = f.read(4)
                if magic != b"GGUF":
                    raise GGQError(f"{path}: not a GGUF file (magic {magic!r})")
                if self.size < 24:
                    raise GGQError(f"{path}: malformed GGUF header (only {self.size} bytes)")
                buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise GGQError(f"{path}: cannot read ({e.strerror or e})") from None
        try:
            self._parse(buf)
        except (struct.error, UnicodeDecodeError, KeyError, ValueError, IndexError) as e:
            raise GGQError(f"{path}: malformed GGUF header ({type(e).__name__}: {e})") from None
        finally:
            buf.close()

    def _parse(self, buf) -> None:
        if buf[:4] != b"GGUF":
            raise GGQError(f"{self.path}: not a GGUF file (magic {bytes(buf[:4])!r})")
        version, n_t, n_kv = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise GGQError(f"{self.path}: unsupported GGUF version {version}")
        pos = 24

        def string(pos):
            (n,) = struct.unpack_from("<Q", buf, pos)
            if pos + 8 + n > len(buf):
                raise ValueError("string past the end of the file")
            return bytes(buf[pos + 8:pos + 8 + n]).decode(), pos + 8 + n

        def value(vt, pos):
            if vt == 8:
                return string(pos)
            if vt == 9:
                at, n = struct.unpack_from("<IQ", buf, pos)
                pos += 12
                if at == 8:
                    for _ in range(n):
                        (ln,) = struct.unpack_from("<Q", buf, pos)
                        pos += 8 + ln
                    return None, pos
                fmt = "<" + _SCALAR[at]
                size = struct.calcsize(fmt)
                v = list(struct.unpack_from(f"<{n}{_SCALAR[at]}", buf, pos)) if n <= 4096 else None
                return v, pos + n * size
            fmt = "<" + _SCALAR[vt]
            return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)

        self.kv = []
        for _ in range(n_kv):
            start = pos
            key, pos = string(pos)
            (vt,) = struct.unpack_from("<I", buf, pos)
            v, pos = value(vt, pos + 4)
            self.kv.append((key, v, bytes(buf[start:pos])))
        kvd = {k: v for k, v, _ in self.kv}
        align = int(kvd.get("general.alignment") or gguf.GGUF_DEFAULT_ALIGNMENT)
        infos = []
        for _ in range(n_t):
            name, pos = string(pos)
            (nd,) = struct.unpack_from("<I", buf, pos)
            ne = struct.unpack_from(f"<{nd}Q", buf, pos + 4)
            typ, off = struct.unpack_from("<IQ", buf, pos + 4 + 8 * nd)
            pos += 16 + 8 * nd
            infos.append((name, tuple(int(x) for x in ne), GGMLQuantizationType(typ), off))
        data_start = -(-pos // align) * align
        self.alignment = align
        self.values = kvd
        self.tensors = []
        for name, ne, typ, off in infos:
            n_rows = int(np.prod(ne[1:], dtype=np.int64)) if len(ne) > 1 else 1
            nbytes = n_rows * quants.row_bytes(typ, ne[0]) if typ in GGML_QUANT_SIZES else 0
            if data_start + off + nbytes > self.size:
                raise GGQError(f"{self.path}: tensor {name} extends past the end of the file (truncated?)")
            self.tensors.append((name, ne, typ, data_start + off))


def _imatrix_arg(imatrix) -> tuple[dict | None, list[bytes]]:
    """(per-tensor weights, extra metadata) for an imatrix given as a path or a dict."""
    if imatrix is None:
        return None, []
    if isinstance(imatrix, dict):
        return imatrix, [_kv_u32("quantize.imatrix.entries_count", len(imatrix))]
    from ggq.convert.imatrix import load_imatrix, read_imatrix_info

    data = load_imatrix(imatrix)
    info = read_imatrix_info(imatrix)
    kv = [_kv_str("quantize.imatrix.file", str(imatrix)[:127])]
    if info.get("datasets"):
        kv.append(_kv_str("quantize.imatrix.dataset", str(info["datasets"][0])[:127]))
    kv.append(_kv_u32("quantize.imatrix.entries_count", len(data)))
    if info.get("chunk_count", 0) > 0:
        kv.append(_kv_u32("quantize.imatrix.chunks_count", info["chunk_count"]))
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
    hdr = _Header(src_gguf)
    if int(hdr.values.get("split.count") or 1) > 1:
        raise GGQError(f"{src_gguf}: split GGUF files are not supported; merge them first (llama-gguf-split --merge)")
    if not hdr.values.get("general.architecture"):
        kind = hdr.values.get("general.type")
        raise GGQError(f"{src_gguf}: not a model file (no general.architecture"
                       + (f"; general.type is {kind!r})" if kind else ")"))
    arch, hparams = mixes.hparams_from_gguf(hdr.values)
    imat, imat_kv = _imatrix_arg(imatrix)

    src = {name: (off, ne, ty) for name, ne, ty, off in hdr.tensors}
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
            raise GGQError(f"{src_gguf}: tensor {name} is already quantized ({cur.name}); requantizing loses "
                           f"quality, pass --allow-requantize to do it anyway")
        for ty in (cur, new):
            if not quants.supported(ty):
                raise GGQError(f"{src_gguf}: tensor {name}: ggq cannot convert {ty.name}")
        if ne[0] % quants.block_size(new):
            raise GGQError(f"{src_gguf}: tensor {name}: row length {ne[0]} is not a multiple of the "
                           f"{new.name} block size {quants.block_size(new)}")
        if imat is not None and name in imat:
            n_mat = ne[2] if len(ne) > 2 else 1
            size = int(np.asarray(imat[name]).size)
            if size != ne[0] * n_mat and name not in ("token_embd.weight", "per_layer_token_embd.weight"):
                raise GGQError(f"imatrix entry for {name} has {size} values, the tensor needs {ne[0] * n_mat}")

    align = hdr.alignment
    kv = [raw for k, _, raw in hdr.kv if k not in _DROP_KEYS]
    kv.append(_kv_u32("general.quantization_version", gguf.GGML_QUANT_VERSION))
    kv.append(_kv_u32("general.file_type", int(ft)))
    kv += imat_kv

    infos, sizes, offset = [], [], 0
    for name, new in plan.items():
        _, ne, _ = src[name]
        n_rows = int(np.prod(ne[1:], dtype=np.int64))
        nbytes = n_rows * quants.row_bytes(new, ne[0])
        infos.append(_pack_str(name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, int(new), offset))
        sizes.append(nbytes)
        offset += -(-nbytes // align) * align

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, unit_divisor=1024, desc=out.name,
                   file=sys.stderr, dynamic_ncols=True, leave=False)
    try:
        with atomic_output(out, force) as tmp, open(tmp, "wb") as f, open(src_gguf, "rb") as fin:
            f.write(struct.pack("<IIQQ", gguf.GGUF_MAGIC, gguf.GGUF_VERSION, len(plan), len(kv)))
            for b in kv:
                f.write(b)
            for b in infos:
                f.write(b)
            _pad(f, align)
            for (name, new), nbytes in zip(plan.items(), sizes):
                off, ne, cur = src[name]
                if bar is not None:
                    bar.set_postfix_str(f"{name} {cur.name}->{new.name}", refresh=False)
                w = imat.get(name) if imat is not None and new not in FLOATS else None
                written = _write_tensor(f, fin, off, ne, cur, new, w)
                if written != nbytes:
                    raise GGQError(f"internal error: {name} encoded to {written} bytes, planned {nbytes}")
                _pad(f, align)
                if bar is not None:
                    bar.update(nbytes)
    finally:
        if bar is not None:
            bar.close()
    return out


def _pad(f, align: int) -> None:
    n = -f.tell() % align
    if n:
        f.write(b"\0" * n)


def _read_rows(fin, offset: int, row_bytes: int, i: int, j: int) -> np.ndarray:
    """Rows ``i:j`` of a tensor at ``offset``, read from the file (uint8 ``(j - i, row_bytes)``)."""
    buf = np.empty((j - i, row_bytes), dtype=np.uint8)
    fin.seek(offset + i * row_bytes)
    if fin.readinto(memoryview(buf).cast("B")) != buf.nbytes:
        raise GGQError(f"{fin.name}: truncated tensor data")
    return buf


def _write_tensor(f, fin, offset: int, ne: tuple[int, ...], cur: T, new: T, weights) -> int:
    """Write one tensor's data converted from ``cur`` to ``new``; returns the bytes written.

    Reads and converts slabs of at most :data:`SLAB_BYTES` (float32) rows, one matrix (expert)
    at a time, so memory stays near one slab whatever the tensor size."""
    n0 = ne[0]
    src_rb = quants.row_bytes(cur, n0)
    n_rows = int(np.prod(ne[1:], dtype=np.int64)) if len(ne) > 1 else 1
    if cur == new:
        step = max(1, SLAB_BYTES // max(src_rb, 1))
        for i in range(0, n_rows, step):
            _read_rows(fin, offset, src_rb, i, min(i + step, n_rows)).tofile(f)
        return n_rows * src_rb
    rows_per_mat = ne[1] if len(ne) > 1 else 1
    n_mat = n_rows // rows_per_mat
    if weights is not None:
        weights = np.ascontiguousarray(weights, dtype=np.float32).reshape(-1)
        if weights.size != n0 * (ne[2] if len(ne) > 2 else 1):
            weights = None  # token_embd with a mismatched entry: ignored, as llama-quantize does
    step = max(1, SLAB_BYTES // (4 * n0))
    written = 0
    for m in range(n_mat):
        w = None
        if weights is not None:
            w = weights[(m % (weights.size // n0)) * n0:][:n0]
        for i in range(m * rows_per_mat, (m + 1) * rows_per_mat, step):
            j = min(i + step, (m + 1) * rows_per_mat)
            x = _to_f32(_read_rows(fin, offset, src_rb, i, j), cur, n0)
            q = quants.quantize(x, new, imatrix=w)
            q = np.ascontiguousarray(q).view(np.uint8)
            q.tofile(f)
            written += q.nbytes
    return written


def _to_f32(block_rows: np.ndarray, cur: T, n0: int) -> np.ndarray:
    if cur == T.F32:
        return np.ascontiguousarray(block_rows).view(np.float32).reshape(-1, n0)
    if cur == T.F16:
        return np.ascontiguousarray(block_rows).view(np.float16).reshape(-1, n0).astype(np.float32)
    return quants.dequantize(np.ascontiguousarray(block_rows), cur).reshape(-1, n0)
