"""Atomic output files: write to a temporary file beside the target, rename into place at the end.

A failed, interrupted or refused write never leaves a half-written file at the output path.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ggq.errors import GGQError


def check_output(path: Path, force: bool) -> None:
    """GGQError if ``path`` exists and ``force`` is false, or its folder does not exist."""
    if path.exists() and not force:
        raise GGQError(f"{path}: output exists (use --force to overwrite)")
    if path.is_dir():
        raise GGQError(f"{path}: output is a folder")
    if not path.parent.is_dir():
        raise GGQError(f"{path}: output folder {path.parent} does not exist")


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
        raise GGQError(f"{path}: write failed ({e.strerror or e})") from None
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(p: Path) -> None:
    try:
        p.unlink()
    except FileNotFoundError:
        pass
