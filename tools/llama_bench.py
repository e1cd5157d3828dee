"""llama.cpp's own ``llama-bench`` (C++, no Python in its loop): built once, run on GGUF files.

:func:`build` downloads the llama-cpp-python 0.3.36 source package with pip (PyPI only), extracts
its vendored llama.cpp and builds the ``llama-bench``, ``llama-completion`` (the one-shot
command line, for the time to first token) and ``llama-server`` (its HTTP server, for
``tools/bench_serve.py``; built without the web UI, whose assets would be downloaded) targets with
cmake into ``.cache/llama-bench/<flavour>`` (``native``: ``-DGGML_NATIVE=ON``; ``avx2``:
``-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF``, for the AVX2-only comparison). About 10
minutes on 2 cores the first time; later calls return the cached binaries and build only the
targets still missing (a build directory from before ``llama-server`` gets just that one).
:func:`run` runs ``llama-bench`` on one file and returns prompt and decode tokens/s.

    python tools/llama_bench.py [native|avx2]        # builds if needed, prints the binaries' directory

Nothing from llama.cpp is committed to this repository.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "llama-bench"
SDIST = "llama-cpp-python==0.3.36"
FLAVOURS = {
    "native": ["-DGGML_NATIVE=ON"],
    "avx2": ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
             "-DGGML_AVX512=OFF"],
}


def _source(cache: Path) -> Path:
    found = list(cache.glob("llama_cpp_python-*/vendor/llama.cpp/CMakeLists.txt"))
    if found:
        return found[0].parent
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", tmp,
                        SDIST], check=True)
        with tarfile.open(next(Path(tmp).glob("*.tar.gz"))) as tf:
            tf.extractall(cache, filter="data")
    return next(cache.glob("llama_cpp_python-*/vendor/llama.cpp/CMakeLists.txt")).parent


TARGETS = ("llama-bench", "llama-completion", "llama-server")


def _run(cmd: list[str]) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")


def build(flavour: str = "native", cache: Path = CACHE, targets: tuple[str, ...] = TARGETS) -> Path:
    """Path of the ``llama-bench`` binary of ``flavour``; the ``targets`` missing from its
    directory (by default all of :data:`TARGETS`) are built first."""
    src = _source(Path(cache))
    out = src / f"build-{flavour}"
    missing = [t for t in targets if not (out / "bin" / t).exists()]
    if missing:
        _run(["cmake", "-B", str(out), "-S", str(src), "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF",
              "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
              "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", *FLAVOURS[flavour]])
        _run(["cmake", "--build", str(out), "--target", *missing, "-j2"])
    return out / "bin" / "llama-bench"


def server(flavour: str = "native", cache: Path = CACHE) -> Path:
    """Path of the ``llama-server`` binary of ``flavour`` (built on first use)."""
    return build(flavour, cache, targets=("llama-server",)).parent / "llama-server"


def run(binary: Path, path: Path, n_prompt: int, n_gen: int, threads: int, reps: int = 3,
        kv_type: str = "f16", depth: int = 0) -> dict:
    """llama-bench on ``path``: ``{"pp": tokens/s, "tg": tokens/s}`` (its mean over ``reps``), both
    measured after ``depth`` tokens already in the context (``-d``)."""
    cmd = [str(binary), "-m", str(path), "-p", str(n_prompt), "-n", str(n_gen), "-t", str(threads), "-r", str(reps),
           "-ctk", kv_type, "-ctv", kv_type, "-d", str(depth), "-o", "json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    res = {}
    for row in json.loads(out):
        res["pp" if row["n_gen"] == 0 else "tg"] = float(row["avg_ts"])
    return res


def cpu_flags() -> str:
    """The SIMD flags of this CPU (from /proc/cpuinfo), for the tables' headers."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                keep = ("avx", "fma", "f16c", "sse4", "amx", "vnni", "bf16")
                return " ".join(sorted({f for f in line.split(":", 1)[1].split() if f.startswith(keep)}))
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "native").parent)
