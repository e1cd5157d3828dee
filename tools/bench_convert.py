"""Benchmark: `ggq convert` of SmolLM2-135M-Instruct to Q8_0 and Q4_0 beside llama.cpp's pipeline.

llama.cpp's pipeline for the same outputs: Q8_0 straight from its ``convert_hf_to_gguf.py
--outtype q8_0``; Q4_0 from ``convert_hf_to_gguf.py --outtype f16`` then ``llama_model_quantize``
(llama-quantize's library call). Each step runs as its own process; we report wall time, peak RSS
(``ru_maxrss`` of the process, via wait4) and the ratios ggq / llama.cpp, all in one run.

    python tools/bench_convert.py [--threads 2] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import llamacpp_ref  # noqa: E402
from smollm2_checkpoint import build_checkpoint, fetch_gguf  # noqa: E402


def run(cmd: list[str], env: dict | None = None) -> tuple[float, float]:
    """Run ``cmd``; return (wall seconds, peak RSS in MiB). Raises on a non-zero exit."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _pid, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{err[-2000:]}")
    return dt, ru.ru_maxrss / 1024.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=llamacpp_ref.DEFAULT_CACHE)
    args = ap.parse_args()

    ck = build_checkpoint(args.cache / "smollm2-hf", fetch_gguf(args.cache / "smollm2-gguf"))
    src = llamacpp_ref.llama_cpp_source(args.cache)
    env_ref = dict(os.environ, PYTHONPATH=f"{src / 'gguf-py'}{os.pathsep}{src}")
    env_ggq = dict(os.environ, NUMBA_NUM_THREADS=str(args.threads))
    py = sys.executable
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # warm the Numba cache and the page cache once so neither side pays a cold start
        run([py, "-m", "ggq.cli", "convert", str(ck), "--type", "Q4_0", "-o", str(tmp / "warm.gguf"), "--force"], env_ggq)
        for qt in ["Q8_0", "Q4_0"]:
            g_out = tmp / f"ggq-{qt}.gguf"
            g_t, g_rss = run([py, "-m", "ggq.cli", "convert", str(ck), "--type", qt, "-o", str(g_out), "--force"], env_ggq)
            if qt == "Q8_0":
                l_out = tmp / "ref-Q8_0.gguf"
                l_t, l_rss = run([py, str(src / "convert_hf_to_gguf.py"), str(ck), "--outfile", str(l_out), "--outtype", "q8_0"], env_ref)
            else:
                f16 = tmp / "ref-F16.gguf"
                t1, r1 = run([py, str(src / "convert_hf_to_gguf.py"), str(ck), "--outfile", str(f16), "--outtype", "f16"], env_ref)
                l_out = tmp / "ref-Q4_0.gguf"
                t2, r2 = run([py, "-c", f"import sys; sys.path.insert(0, {str(REPO / 'tools')!r}); import llamacpp_ref as r; "
                              f"r.quantize_file({str(f16)!r}, {str(l_out)!r}, 'Q4_0', nthread={args.threads})"])
                l_t, l_rss = t1 + t2, max(r1, r2)
            rows.append((qt, g_t, l_t, g_rss, l_rss, g_out.stat().st_size, l_out.stat().st_size))
    print(f"SmolLM2-135M-Instruct (float32 checkpoint, {sum(p.stat().st_size for p in ck.glob('*.safetensors')) / 2**20:.0f} MiB), "
          f"{args.threads} threads\n")
    print("| type | ggq s | llama.cpp s | time ratio | ggq peak RSS MiB | llama.cpp peak RSS MiB | RSS ratio | ggq size | llama.cpp size |")
    print("|---|---|---|---|---|---|---|---|---|")
    for qt, gt, lt, gr, lr, gs, ls in rows:
        print(f"| {qt} | {gt:.1f} | {lt:.1f} | {gt / lt:.2f} | {gr:.0f} | {lr:.0f} | {gr / lr:.2f} | {gs:,} | {ls:,} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
