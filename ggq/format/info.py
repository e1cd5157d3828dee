"""``ggq info``: a GGUF file's metadata, tensor table, bits per weight and size."""

from __future__ import annotations

from pathlib import Path

import gguf

from ggq.errors import escape, show
from ggq.format.gguf_reader import read_gguf


def _short(v, full: bool) -> str:
    """A metadata value as ``ggq info`` prints it: its ``repr`` with control characters escaped;
    unless ``full``, arrays longer than 8 items show their first 4 and strings are cut to 120
    printed characters."""
    if full:
        return escape(repr(v))
    if isinstance(v, list):
        if len(v) > 8:
            head = ", ".join(show(x, 60) for x in v[:4])
            return f"[{head}, ...] ({len(v)} items)"
        return "[" + ", ".join(show(x, 60) for x in v) + "]"
    if isinstance(v, str):
        text = show(v, 120)
        return text + (f" ({len(v)} chars)" if text.endswith("'...") else "")
    return show(v)


def format_info(path: str | Path, full_arrays: bool = False) -> str:
    """The text ``ggq info`` prints: metadata, a tensor table (name, type, ne shape, bytes), the
    number of weights, bits per weight over all tensors, and the file size. The header is read
    and validated by :func:`ggq.format.gguf_reader.read_gguf` (GGQError for a malformed file);
    names and strings from the file are printed escaped (no terminal control bytes)."""
    h = read_gguf(path)
    size = h.size
    lines = [f"file: {path}", f"size: {size:,} bytes ({size / 2**20:.2f} MiB)", "", "metadata:"]
    for name, v in h.metadata.items():
        if name == "general.file_type" and isinstance(v, int) and not isinstance(v, bool):
            try:
                v = f"{v} ({gguf.LlamaFileType(v).name})"
            except ValueError:
                pass
        lines.append(f"  {escape(name, 200)} = {_short(v, full_arrays)}")
    lines += ["", f"tensors: {len(h.tensors)}", f"  {'name':<32} {'type':<6} {'ne':<22} {'bytes':>12}"]
    n_el = 0
    n_bytes = 0
    by_type: dict[str, int] = {}
    for t in h.tensors.values():
        n = 1
        for x in t.ne:
            n *= x
        n_el += n
        n_bytes += t.nbytes
        by_type[t.qtype.name] = by_type.get(t.qtype.name, 0) + 1
        lines.append(f"  {escape(t.name):<32} {t.qtype.name:<6} {str(list(t.ne)):<22} {t.nbytes:>12,}")
    bpw = 8.0 * n_bytes / n_el if n_el else 0.0
    lines += ["", f"weights: {n_el:,}", f"tensor data: {n_bytes:,} bytes", f"bits per weight: {bpw:.2f}",
              "types: " + ", ".join(f"{k}={v}" for k, v in sorted(by_type.items()))]
    return "\n".join(lines)
