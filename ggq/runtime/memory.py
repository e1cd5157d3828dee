"""Giving back resident pages the runtime no longer needs.

The GGUF file's pages, once a tensor is repacked into the weight arena, and the header's once it
is parsed (:func:`release_range`, called by the loader as each chunk of rows is done and at the
end of the load); a safetensors file's pages once the converter has written a tensor. ``madvise(MADV_DONTNEED)`` on a read-only file mapping only unmaps the pages
from this process: they stay in the page cache, and reading them again gives the file's bytes.
"""

from __future__ import annotations

import mmap


def release_range(mm, offset: int, nbytes: int) -> None:
    """Drop the pages of [offset, offset+nbytes) of the ``mmap.mmap`` ``mm`` (a read-only file
    mapping) from this process's resident set; partial pages at the ends are kept. Best effort:
    nothing happens where ``madvise`` is not available."""
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    start = (offset + page - 1) // page * page
    end = (offset + nbytes) // page * page
    if end > start:
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):
            pass
