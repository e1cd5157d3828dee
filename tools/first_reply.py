"""A fresh install's first reply (issue 11): ``ggq run FILE`` with an empty Numba cache, the
question sent the moment the process starts (no typing time), timed to the reply's first byte.

    python tools/first_reply.py FILE.gguf [--runs 2] [--threads 2] [--question "..."] [--warm]

Each run gets a new empty ``NUMBA_CACHE_DIR`` (``--warm``: one shared cache, filled by an
untimed first run, so the figure is the warm start). Reported per run: seconds from process start
to the first byte of the reply on stdout, to the end of the reply (``-n 16`` tokens, greedy), and
to process exit (which waits for the one-time compile of the whole forward and the repackers),
plus the CPU seconds of the process and of its helper (``ggq.runtime.firstrun``). Prints the CPU's
SIMD flags: compile times differ between machines, compare runs from one invocation.
"""

from __future__ import annotations

import argparse
import os
import resource
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "f16c", "fma")


def cpu_flags() -> str:
    try:
        have = set(Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split())
    except (OSError, IndexError):
        return "unknown"
    return " ".join(f for f in FLAGS if f in have)


def one_run(path: str, cache: str, threads: int, question: str) -> dict:
    """Run ``ggq run`` once with ``cache`` as Numba's cache; times in seconds from the start."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "ggq.cli", "run", path, "--temp", "0", "-n", "16", "-t", str(threads)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=REPO)  # python -m puts the working folder first on sys.path
    proc.stdin.write((question + "\n/exit\n").encode())
    proc.stdin.close()
    first = None
    out = b""
    while True:
        r, _, _ = select.select([proc.stdout], [], [], 1.0)
        if r:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            if first is None and chunk.strip():
                first = time.perf_counter() - t0
            out += chunk
        elif proc.poll() is not None:
            break
    t_out = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    proc.wait()
    t_exit = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise RuntimeError(f"ggq run failed (exit {proc.returncode}): {err[-500:]}")
    return dict(first_s=first, reply_s=t_out, exit_s=t_exit, cpu_s=(after.ru_utime + after.ru_stime)
                - (before.ru_utime + before.ru_stime), reply=out.decode(errors="replace").strip()[:60],
                status=[l for l in err.splitlines() if "compil" in l])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--question", default="What is the capital of France?")
    ap.add_argument("--warm", action="store_true", help="time warm starts (a shared, filled cache)")
    a = ap.parse_args()
    print(f"CPU flags: {cpu_flags()}; {a.threads} threads; {'warm' if a.warm else 'empty'} Numba cache")
    print("| run | first reply byte s | reply done s | exit s | CPU s (process + helper) | status |")
    print("|---|---:|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory(prefix="ggq-first-reply-") as tmp:
        if a.warm:
            one_run(a.file, str(Path(tmp) / "shared"), a.threads, a.question)
        for i in range(a.runs):
            cache = str(Path(tmp) / ("shared" if a.warm else f"run{i}"))
            r = one_run(a.file, cache, a.threads, a.question)
            print(f"| {i + 1} | {r['first_s']:.1f} | {r['reply_s']:.1f} | {r['exit_s']:.1f} | {r['cpu_s']:.1f} | "
                  f"{'; '.join(r['status'])[:120]} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
