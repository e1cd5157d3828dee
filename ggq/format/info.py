"""``ggq info``: a GGUF file's metadata, tensor table, bits per weight and size."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

from ggq.errors import GGQError


def open_gguf(path: str | Path) -> gguf.GGUFReader:
    """Open ``path`` with gguf's reader; GGQError (naming the file) if it is missing or malformed."""
    p = Path(path)
    if not p.is_file():
        raise GGQError(f"{p}: no such file")
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise GGQError(f"{p}: cannot read ({e.strerror})") from None
    if magic != b"GGUF":
        raise GGQError(f"{p}: not a GGUF file (magic {magic!r})")
    try:
        return gguf.GGUFReader(p)
    except Exception as e:  # the reader raises ValueError/IndexError/... on truncation and bad values
        raise GGQError(f"{p}: malformed GGUF file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def field_value(field: gguf.ReaderField):
    """A metadata field as a Python value (str, int, float, bool, or list of them)."""
    return field.contents()


def _short(v, full: bool) -> str:
    if isinstance(v, list):
        if not full and len(v) > 8:
            head = ", ".join(repr(x) for x in v[:4])
            return f"[{head}, ...] ({len(v)} items)"
        return repr(v)
    if isinstance(v, str) and not full and len(v) > 120:
        return repr(v[:100]) + f"... ({len(v)} chars)"
    return repr(v)


def format_info(path: str | Path, full_arrays: bool = False) -> str:
    """The text ``ggq info`` prints: metadata, a tensor table (name, type, ne shape, bytes), the
    number of weights, bits per weight over all tensors, and the file size."""
    r = open_gguf(path)
    lines = [f"file: {path}", f"size: {os.path.getsize(path):,} bytes ({os.path.getsize(path) / 2**20:.2f} MiB)", "", "metadata:"]
    for name, field in r.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            v = field_value(field)
        except Exception:
            v = "<unreadable>"
        if name == "general.file_type" and isinstance(v, int):
            try:
                v = f"{v} ({gguf.LlamaFileType(v).name})"
            except ValueError:
                pass
        lines.append(f"  {name} = {_short(v, full_arrays)}")
    lines += ["", f"tensors: {len(r.tensors)}", f"  {'name':<32} {'type':<6} {'ne':<22} {'bytes':>12}"]
    n_el = 0
    n_bytes = 0
    by_type: dict[str, int] = {}
    for t in r.tensors:
        ne = [int(x) for x in t.shape]
        n = int(np.prod(ne, dtype=np.int64))
        n_el += n
        n_bytes += int(t.n_bytes)
        by_type[t.tensor_type.name] = by_type.get(t.tensor_type.name, 0) + 1
        lines.append(f"  {t.name:<32} {t.tensor_type.name:<6} {str(ne):<22} {int(t.n_bytes):>12,}")
    bpw = 8.0 * n_bytes / n_el if n_el else 0.0
    lines += ["", f"weights: {n_el:,}", f"tensor data: {n_bytes:,} bytes", f"bits per weight: {bpw:.2f}",
              "types: " + ", ".join(f"{k}={v}" for k, v in sorted(by_type.items()))]
    return "\n".join(lines)
