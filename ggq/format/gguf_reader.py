"""The GGUF header reader: the only code in ggq that parses a GGUF file's header.

:func:`read_gguf` parses the header (GGUF v2/v3, little-endian) of a file -- metadata keys and
values, and the tensor table -- without touching tensor data, and validates every field before it
allocates or reads anything that field sizes. It is used by the runtime loader, the tokenizer,
``ggq quantize``, ``ggq info``, the imatrix reader and the tests.

Checks, with the rule's source (llama.cpp's ``gguf_init_from_file_impl`` and ``gguf_reader`` in
``ggml/src/gguf.cpp``, unless noted):

* magic ``GGUF``; version 2 or 3 (1 is no longer supported, larger ones unknown; a version whose
  low 16 bits are zero is a big-endian file);
* the tensor and key counts fit in the bytes left (each key/value record takes at least 14 bytes,
  each tensor record at least 33): a count of 2**62 is an error at once, not a loop;
* every string length and array length against the bytes left before reading it; strings are
  valid UTF-8 (ggq's rule: keys, names and values are text);
* keys are non-empty and not repeated; value types are known ids (0..12), array elements are not
  arrays;
* ``general.alignment``, when present, is a UINT32 power of two (non-zero);
* tensor names are non-empty, shorter than 64 bytes (``GGML_MAX_NAME``) and not repeated;
  1 to 4 dimensions (``GGML_MAX_DIMS``; ggq wants at least one), each at least 1, the element
  count below 2**63; the type a ggml type with a block size (``gguf.constants.GGML_QUANT_SIZES``),
  the row length a multiple of the block size;
* tensor data offsets are multiples of the alignment, each tensor lies inside the file, and the
  offsets follow the table order with each tensor padded to the alignment, exactly as
  ``gguf_init_from_file_impl`` requires (so no two tensors overlap and none is listed twice).

Every failure is a one-line :class:`~ggq.errors.GGQError` naming the file; values from the file are
shown escaped and cut (:func:`ggq.errors.show`). Speed: a 49k-token vocabulary parses in well under
0.1 s (one pass over a memoryview; gguf-py's ``GGUFReader`` builds a numpy view per string).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ggq.errors import GGQError, show

VT = GGUFValueType
#: GGML_MAX_DIMS
MAX_DIMS = 4
#: GGML_MAX_NAME: a tensor name has fewer bytes than this
MAX_NAME = 64
#: GGUF_DEFAULT_ALIGNMENT
DEFAULT_ALIGNMENT = 32
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, one key byte, value type, one value byte
_MIN_TENSOR_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, one name byte, n_dims, ne[0], type, offset
#: scalar value type -> numpy dtype of its little-endian bytes
_NP = {VT.UINT8: "<u1", VT.INT8: "<i1", VT.UINT16: "<u2", VT.INT16: "<i2", VT.UINT32: "<u4", VT.INT32: "<i4",
       VT.FLOAT32: "<f4", VT.BOOL: "<u1", VT.UINT64: "<u8", VT.INT64: "<i8", VT.FLOAT64: "<f8"}
_FMT = {VT.UINT8: "<B", VT.INT8: "<b", VT.UINT16: "<H", VT.INT16: "<h", VT.UINT32: "<I", VT.INT32: "<i",
        VT.FLOAT32: "<f", VT.BOOL: "<B", VT.UINT64: "<Q", VT.INT64: "<q", VT.FLOAT64: "<d"}
_SIZE = {t: struct.calcsize(f) for t, f in _FMT.items()}
_VTYPES = {int(t): t for t in VT}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class _Bad(Exception):
    """A malformed header: the message (without the file name)."""


@dataclass(frozen=True)
class TensorEntry:
    """One row of the tensor table: ``ne`` in ggml order (``ne[0]`` = row length), ``offset`` the
    absolute byte offset of its data in the file, ``nbytes`` its data size."""

    name: str
    qtype: GGMLQuantizationType
    ne: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def n_rows(self) -> int:
        """Rows of ``ne[0]`` elements (the product of ``ne[1:]``)."""
        n = 1
        for x in self.ne[1:]:
            n *= x
        return n

    @property
    def n_cols(self) -> int:
        return int(self.ne[0])

    @property
    def row_bytes(self) -> int:
        bs, ts = GGML_QUANT_SIZES[self.qtype]
        return self.ne[0] // bs * ts


@dataclass
class GGUFHeader:
    """A validated GGUF header.

    ``metadata``: key -> Python value (int, float, bool, str, or a list of them), in file order;
    ``types``: key -> (value type, element type or None); ``tensors``: name -> :class:`TensorEntry`
    in table order; ``alignment``; ``data_offset``: where the data section starts; ``size``: the
    file size in bytes."""

    path: Path
    version: int
    size: int
    alignment: int
    data_offset: int
    metadata: dict = field(default_factory=dict)
    types: dict = field(default_factory=dict)
    tensors: dict = field(default_factory=dict)


class _Parser:
    def __init__(self, buf, n: int):
        self.buf = buf
        self.n = n
        self.pos = 0

    def left(self) -> int:
        return self.n - self.pos

    def take(self, k: int, what: str) -> int:
        p = self.pos
        if k > self.n - p:
            raise _Bad(f"truncated: {what} needs {k} bytes at offset {p}, the file has {self.n - p} left")
        self.pos = p + k
        return p

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.buf, self.take(8, what))[0]

    def string(self, what: str) -> str:
        k = self.u64(what)
        if k > self.n - self.pos:
            raise _Bad(f"{what} has length {k}, more than the {self.n - self.pos} bytes left in the file (truncated?)")
        p = self.pos
        self.pos = p + k
        try:
            return str(self.buf[p:p + k], "utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"{what} is not valid UTF-8: {show(bytes(self.buf[p:p + min(k, 80)]))}") from None

    def vtype(self, what: str) -> VT:
        t = self.u32(what)
        vt = _VTYPES.get(t)
        if vt is None:
            raise _Bad(f"{what} has unknown value type {t}")
        return vt

    def value(self, vt: VT, key: str):
        if vt == VT.STRING:
            return self.string(f"value of {show(key)}"), None
        if vt == VT.ARRAY:
            sub = self.vtype(f"element type of {show(key)}")
            count = self.u64(f"length of {show(key)}")
            if sub == VT.ARRAY:
                raise _Bad(f"key {show(key)} is an array of arrays (not allowed in GGUF)")
            if sub == VT.STRING:
                if count > (self.n - self.pos) // 8:
                    raise _Bad(f"key {show(key)}: array of {count} strings does not fit in the "
                               f"{self.n - self.pos} bytes left in the file (truncated?)")
                return self.strings(count, key), sub
            size = _SIZE[sub]
            if count > (self.n - self.pos) // size:
                raise _Bad(f"key {show(key)}: array of {count} {sub.name} values does not fit in the "
                           f"{self.n - self.pos} bytes left in the file (truncated?)")
            p = self.take(count * size, f"value of {show(key)}")
            arr = np.frombuffer(self.buf, _NP[sub], count, p)
            return ([bool(v) for v in arr.tolist()] if sub == VT.BOOL else arr.tolist()), sub
        v = struct.unpack_from(_FMT[vt], self.buf, self.take(_SIZE[vt], f"value of {show(key)}"))[0]
        return (v != 0 if vt == VT.BOOL else v), None

    def strings(self, count: int, key: str) -> list[str]:
        buf, n, pos = self.buf, self.n, self.pos
        unpack = _U64.unpack_from
        out = [""] * count
        try:
            for i in range(count):
                if pos + 8 > n:
                    raise _Bad(f"truncated: string {i} of {show(key)} at offset {pos}")
                k = unpack(buf, pos)[0]
                pos += 8
                if k > n - pos:
                    raise _Bad(f"string {i} of {show(key)} has length {k}, more than the {n - pos} bytes left in the file (truncated?)")
                out[i] = str(buf[pos:pos + k], "utf-8")
                pos += k
        except UnicodeDecodeError:
            raise _Bad(f"string {i} of {show(key)} is not valid UTF-8: {show(bytes(buf[pos:pos + min(k, 80)]))}") from None
        self.pos = pos
        return out


def _parse(buf, size: int) -> GGUFHeader:
    p = _Parser(buf, size)
    magic = bytes(buf[:4])
    if magic != b"GGUF":
        raise GGQError(f"not a GGUF file (magic {show(magic)}, expected 'GGUF')")
    p.pos = 4
    version = p.u32("version")
    if version & 0xFFFF == 0 and version:
        raise _Bad(f"GGUF version {version:#x}: a big-endian file (ggq reads little-endian GGUF)")
    if version not in (2, 3):
        raise GGQError(f"unsupported GGUF version {version} (ggq reads versions 2 and 3)")
    n_tensors = p.u64("tensor count")
    n_kv = p.u64("key count")
    if n_kv > p.left() // _MIN_KV_BYTES:
        raise _Bad(f"truncated or corrupt: {n_kv} metadata keys cannot fit in a file of {size} bytes")
    if n_tensors > p.left() // _MIN_TENSOR_BYTES:
        raise _Bad(f"truncated or corrupt: {n_tensors} tensors cannot fit in a file of {size} bytes")
    md: dict = {}
    types: dict = {}
    for i in range(n_kv):
        key = p.string(f"key {i}")
        if not key:
            raise _Bad(f"key {i} is empty")
        if key in md:
            raise _Bad(f"duplicate key {show(key)}")
        vt = p.vtype(f"key {show(key)}")
        md[key], sub = p.value(vt, key)
        types[key] = (vt, sub)
    align = DEFAULT_ALIGNMENT
    if "general.alignment" in md:
        a = md["general.alignment"]
        if types["general.alignment"][0] != VT.UINT32:
            raise _Bad(f"general.alignment must be a UINT32, not {types['general.alignment'][0].name}")
        if a == 0 or a & (a - 1):
            raise _Bad(f"general.alignment {a} is not a power of two")
        align = a

    raw = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = p.string(f"name of tensor {i}")
        if not name:
            raise _Bad(f"tensor {i} has an empty name")
        if len(name.encode()) >= MAX_NAME:
            raise _Bad(f"tensor name {show(name)} is {len(name.encode())} bytes long (the limit is {MAX_NAME - 1})")
        if name in seen:
            raise _Bad(f"duplicate tensor {show(name)}")
        seen.add(name)
        n_dims = p.u32(f"dimension count of {show(name)}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise _Bad(f"tensor {show(name)} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        ne = tuple(p.u64(f"shape of {show(name)}") for _ in range(n_dims))
        if min(ne) < 1:
            raise _Bad(f"tensor {show(name)} has a zero dimension in shape {list(ne)}")
        n_el = 1
        for x in ne:
            n_el *= x
        if n_el >= 1 << 63:
            raise _Bad(f"tensor {show(name)} shape {list(ne)} has too many elements")
        t = p.u32(f"type of {show(name)}")
        try:
            qtype = GGMLQuantizationType(t)
        except ValueError:
            raise _Bad(f"tensor {show(name)} has unknown type {t}") from None
        if qtype not in GGML_QUANT_SIZES:
            raise _Bad(f"tensor {show(name)} has type {qtype.name}, which has no block size")
        bs, ts = GGML_QUANT_SIZES[qtype]
        if ne[0] % bs:
            raise _Bad(f"tensor {show(name)} row length {ne[0]} is not a multiple of the {qtype.name} block size {bs}")
        off = p.u64(f"data offset of {show(name)}")
        raw.append((name, qtype, ne, off, n_el // bs * ts))

    data_offset = -(-p.pos // align) * align
    tensors: dict = {}
    expect = 0
    for name, qtype, ne, off, nbytes in raw:
        if off % align:
            raise _Bad(f"tensor {show(name)} data offset {off} is not aligned to {align}")
        if data_offset + off + nbytes > size:
            raise _Bad(f"tensor {show(name)} data [{data_offset + off}, {data_offset + off + nbytes}) lies outside "
                       f"the file ({size} bytes; truncated or bad offset?)")
        if off != expect:
            how = "overlaps the tensor before it" if off < expect else "leaves a gap after the tensor before it"
            raise _Bad(f"tensor {show(name)} data offset {off} {how} (expected {expect}: tensors follow the table "
                       f"order, each padded to {align} bytes)")
        expect = off + -(-nbytes // align) * align
        tensors[name] = TensorEntry(name, qtype, ne, data_offset + off, nbytes)
    return GGUFHeader(Path(), version, size, align, data_offset, md, types, tensors)


def parse_gguf(buf, size: int, where) -> GGUFHeader:
    """Validate and parse the GGUF header in ``buf`` (a bytes-like object of ``size`` bytes, e.g.
    a memoryview of a memory map). ``where`` names the file in errors. Raises GGQError."""
    if size < 4 or bytes(buf[:4]) != b"GGUF":
        magic = bytes(buf[:4])
        raise GGQError(f"{where}: not a GGUF file (magic {show(magic)}, expected 'GGUF')")
    if size < 24:
        raise GGQError(f"{where}: malformed GGUF file: truncated header (only {size} bytes)")
    try:
        h = _parse(buf, size)
    except _Bad as e:
        raise GGQError(f"{where}: malformed GGUF file: {e}") from None
    except GGQError as e:
        raise GGQError(f"{where}: {e}") from None
    h.path = Path(str(where))
    return h


def read_gguf(path, buf=None) -> GGUFHeader:
    """Open the GGUF file at ``path`` and return its validated header (see the module docstring
    for the checks). ``buf``: an already made memory map of the file (bytes-like) to parse
    instead of mapping it again.

    Raises GGQError naming ``path`` for a missing file, a folder, an unreadable file, a file that
    is not GGUF, an unsupported version, or any malformed header field."""
    path = Path(path)
    if not path.exists():
        raise GGQError(f"{path}: no such file")
    if path.is_dir():
        raise GGQError(f"{path}: is a folder, not a GGUF file")
    if buf is not None:
        return parse_gguf(buf, len(buf), path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                return parse_gguf(f.read(size), size, path)
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise GGQError(f"{path}: cannot read ({e.strerror or e})") from None
    mv = memoryview(mm)
    try:
        return parse_gguf(mv, size, path)
    finally:
        mv.release()
        try:
            mm.close()
        except BufferError:  # a numpy view made while parsing is still alive; the map closes with it
            pass


__all__ = ["GGUFHeader", "TensorEntry", "read_gguf", "parse_gguf", "MAX_DIMS", "MAX_NAME", "DEFAULT_ALIGNMENT"]
