"""Memory-mapped, validated GGUF files for the runtime.

:func:`open_gguf` opens a GGUF file with ``gguf.GGUFReader`` (which maps the file with
``np.memmap``: tensor data are views into the mapping, nothing is copied or read until touched),
converts every failure into a one-line :class:`ggq.errors.GGQError`, and checks what the reader
does not: tensor offsets inside the file and aligned, data regions not overlapping, shapes and
byte sizes consistent with the ggml type, and the model metadata the forward pass needs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType

from ggq.errors import GGQError

#: architectures the forward pass implements (general.architecture)
SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")


def _field_value(field):
    """Python value of a GGUFReader field: str, int, float, bool or a list of those."""
    types = field.types
    if not types:
        return None
    if types[0] == GGUFValueType.ARRAY:
        sub = types[1] if len(types) > 1 else None
        if sub == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        if sub == GGUFValueType.ARRAY:
            return [None for _ in field.data]
        return [v.item() for i in field.data for v in field.parts[i]]
    if types[0] == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    v = field.parts[field.data[0]][0].item()
    if types[0] == GGUFValueType.BOOL:
        return bool(v)
    return v


@dataclass
class TensorInfo:
    """One tensor of the file: ``ne`` in ggml order (ne[0] = row length), raw data view."""

    name: str
    qtype: GGMLQuantizationType
    ne: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int
    raw: np.ndarray = field(repr=False)  # uint8 (n_rows, row_bytes) view of the memmap

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.ne[1:], dtype=np.int64)) if len(self.ne) > 1 else 1

    @property
    def n_cols(self) -> int:
        return int(self.ne[0])


@dataclass
class GGUFFile:
    """A validated GGUF file: ``metadata`` (key -> python value), ``tensors`` (name -> TensorInfo)."""

    path: Path
    reader: GGUFReader
    metadata: dict
    tensors: dict[str, TensorInfo]
    size: int

    @property
    def arch(self) -> str:
        return self.metadata["general.architecture"]


def open_gguf(path, check_arch: bool = True) -> GGUFFile:
    """Open and validate the GGUF file at ``path`` without reading tensor data.

    Raises GGQError (naming the file) for: a missing or unreadable file, wrong magic or version,
    a header the reader cannot parse (truncated file), an unknown ggml type, a tensor whose data
    lies outside the file, is misaligned or overlaps another, a row length that is not a multiple
    of the type's block size, and (``check_arch``) an architecture not in SUPPORTED_ARCHS.
    """
    path = Path(path)
    name = path.name
    if not path.exists():
        raise GGQError(f"{path}: no such file")
    if path.is_dir():
        raise GGQError(f"{path}: is a directory, not a GGUF file")
    size = os.path.getsize(path)
    if size < 24:
        raise GGQError(f"{name}: not a GGUF file (only {size} bytes)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGQError(f"{name}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        reader = GGUFReader(path, "r")
    except ValueError as e:
        msg = str(e)
        if "is not a valid GGMLQuantizationType" in msg:
            raise GGQError(f"{name}: unknown tensor type ({msg})") from None
        raise GGQError(f"{name}: malformed or truncated GGUF header ({msg})") from None
    except (IndexError, KeyError, OverflowError, TypeError, UnicodeDecodeError, MemoryError) as e:
        raise GGQError(f"{name}: malformed or truncated GGUF header ({type(e).__name__}: {e})") from None

    try:
        metadata = {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    except Exception as e:  # noqa: BLE001 - any decoding failure is a malformed file
        raise GGQError(f"{name}: malformed metadata ({type(e).__name__}: {e})") from None

    tensors: dict[str, TensorInfo] = {}
    spans = []
    align = int(getattr(reader, "alignment", 32))
    for t in reader.tensors:
        try:
            qtype = GGMLQuantizationType(int(t.tensor_type))
        except ValueError:
            raise GGQError(f"{name}: tensor {t.name} has unknown type {int(t.tensor_type)}") from None
        ne = tuple(int(x) for x in t.shape)
        if any(x <= 0 for x in ne):
            raise GGQError(f"{name}: tensor {t.name} has invalid shape {list(ne)}")
        bs, ts = GGML_QUANT_SIZES[qtype]
        if ne[0] % bs:
            raise GGQError(f"{name}: tensor {t.name} row length {ne[0]} is not a multiple of the {qtype.name} block size {bs}")
        n_rows = int(np.prod(ne[1:], dtype=np.int64)) if len(ne) > 1 else 1
        row_bytes = ne[0] // bs * ts
        nbytes = n_rows * row_bytes
        off = int(t.data_offset)
        if off % align:
            raise GGQError(f"{name}: tensor {t.name} data offset {off} is not aligned to {align}")
        if off < reader.data_offset or off + nbytes > size:
            raise GGQError(f"{name}: tensor {t.name} data [{off}, {off + nbytes}) lies outside the file "
                           f"(data section starts at {reader.data_offset}, file has {size} bytes; truncated?)")
        if t.name in tensors:
            raise GGQError(f"{name}: duplicate tensor name {t.name}")
        spans.append((off, off + nbytes, t.name))
        raw = reader.data[off:off + nbytes]
        tensors[t.name] = TensorInfo(t.name, qtype, ne, off, nbytes, raw.reshape(n_rows, row_bytes))
    spans.sort()
    for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise GGQError(f"{name}: tensors {an} and {bn} overlap in the file")

    if "general.architecture" not in metadata or not isinstance(metadata["general.architecture"], str):
        raise GGQError(f"{name}: missing general.architecture")
    arch = metadata["general.architecture"]
    if check_arch and arch not in SUPPORTED_ARCHS:
        raise GGQError(f"{name}: architecture {arch!r} is not supported (ggq runs {', '.join(SUPPORTED_ARCHS)})")
    return GGUFFile(path, reader, metadata, tensors, size)
