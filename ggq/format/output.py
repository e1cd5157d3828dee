"""Atomic output files: write to a temporary file beside the target, rename into place at the end.

A failed, interrupted or refused write never leaves a half-written file at the output path.
"""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ggq.errors import GGQError


def check_output(path: Path, force: bool) -> None:
    """GGQError if ``path`` exists and ``force`` is false, is a folder, or its folder does not
    exist or cannot be written (checked before any work, so a long conversion does not fail at
    its end)."""
    path = Path(path)
    if path.is_dir():
        raise GGQError(f"{path}: output is a folder")
    if path.exists() and not force:
        raise GGQError(f"{path}: output exists (use --force to overwrite)")
    parent = path.parent
    if not parent.is_dir():
        raise GGQError(f"{path}: output folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise GGQError(f"{path}: output folder {parent} is not writable")


def _why(e: OSError) -> str:
    """A short reason for a failed write: 'disk full', 'read-only file system', ..."""
    if e.errno == errno.ENOSPC:
        return "disk full (no space left on device)"
    if e.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if e.errno == errno.EROFS:
        return "read-only file system"
    if e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return e.strerror or str(e)


@contextmanager
def atomic_output(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on normal exit rename it to ``path``.

    On any exception (including KeyboardInterrupt) the temporary file is removed and ``path`` is
    left as it was. OSErrors (disk full, permission) become GGQError naming ``path``.
    """
    path = Path(path)
    check_output(path, force)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        _unlink(tmp)
        other = getattr(e, "filename", None)
        if other is not None and Path(other) != tmp and Path(other) != path:  # reading an input failed
            raise GGQError(f"{other}: cannot read ({_why(e)}); nothing was written to {path}") from None
        raise GGQError(f"{path}: write failed: {_why(e)}; nothing was written") from None
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass
