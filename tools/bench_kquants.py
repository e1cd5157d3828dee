"""Benchmark: K-quant quantization throughput, ggq's Numba kernels vs llama.cpp's C, one run.

Same real tensors for both: SmolLM2-135M-Instruct's ``ffn_down`` weights (rows of 1536, llama.cpp's
own row split) from the first ``--layers`` layers. llama.cpp side: ``ggml_quantize_chunk`` through
llama-cpp-python (single-threaded: it loops over rows on the calling thread; Q8_K, which
ggml_quantize_chunk does not handle, through ``quantize_row_q8_K_ref``). ggq side: ``quantize_rows``
with Numba on ``--threads`` threads and on 1 thread (the same-thread-count ratio). Every timing is
the minimum of ``--repeat`` interleaved runs; the machine may be shared, so the wall-clock columns
are noisy and the 1-thread ratio is also given in process CPU time.

    python tools/bench_kquants.py [--layers 8] [--repeat 3] [--threads 2] [--imatrix]

Prints a markdown table: Mweights/s per type and the ratios ggq / llama.cpp.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

import llamacpp_ref  # noqa: E402
from smollm2_checkpoint import build_checkpoint, fetch_gguf  # noqa: E402

TYPES = ["Q4_K", "Q6_K", "Q5_K", "Q3_K", "Q2_K", "Q8_K"]


def _c_quantizer(qtype: str):
    from gguf import GGMLQuantizationType

    if qtype != "Q8_K":
        t = GGMLQuantizationType[qtype]
        return lambda x, im: llamacpp_ref.ggml_quantize(x, t, im)
    lib = llamacpp_ref.ggml_lib()
    f = lib.quantize_row_q8_K_ref
    f.restype, f.argtypes = None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]

    def q8k(x, _im):
        out = np.zeros((x.shape[0], x.shape[1] // 256 * 292), np.uint8)
        f(x.ctypes.data, out.ctypes.data, x.size)
        return out

    return q8k


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--imatrix", action="store_true", help="also time the weighted (imatrix) paths")
    ap.add_argument("--types", default=",".join(TYPES))
    args = ap.parse_args()

    import numba
    from safetensors.numpy import load_file

    cache = Path(os.environ.get("GGQ_TEST_CACHE", REPO / ".cache" / "tests"))
    model = build_checkpoint(cache / "smollm2-hf", fetch_gguf(cache / "smollm2-gguf"))
    st = load_file(str(model / "model.safetensors"))
    x = np.ascontiguousarray(np.concatenate(
        [st[f"model.layers.{i}.mlp.down_proj.weight"] for i in range(args.layers)]), dtype=np.float32)
    rng = np.random.default_rng(0)
    imatrix = (rng.lognormal(0, 1.5, x.shape[1]) ** 2).astype(np.float32)
    mw = x.size / 1e6

    rows = []
    for qtype in args.types.split(","):
        paths = [None, imatrix] if (args.imatrix and qtype != "Q8_K") else [None]
        mod = importlib.import_module(f"ggq.quants.{qtype.lower()}")
        cq = _c_quantizer(qtype)
        for im in paths:
            mod.quantize_rows(x[:2], im)  # compile outside the timing
            cq(x[:2], im)
            t_c, t_n, t_1 = [], [], []
            for _ in range(args.repeat):  # interleaved so load changes hit all three alike
                t_c.append(_timed(lambda: cq(x, im)))
                numba.set_num_threads(args.threads)
                t_n.append(_timed(lambda: mod.quantize_rows(x, im)))
                numba.set_num_threads(1)
                t_1.append(_timed(lambda: mod.quantize_rows(x, im)))
            numba.set_num_threads(args.threads)
            c, n, one = (min(t[0] for t in ts) for ts in (t_c, t_n, t_1))
            c_cpu, one_cpu = (min(t[1] for t in ts) for ts in (t_c, t_1))
            rows.append((qtype + (" +imatrix" if im is not None else ""), mw / c, mw / n, mw / one, c / n, c / one,
                         c_cpu / one_cpu))

    print(f"\nK-quant quantization, {x.shape[0]} x {x.shape[1]} SmolLM2 ffn_down weights ({mw:.1f} M), "
          f"min of {args.repeat}; llama.cpp C on 1 thread, ggq Numba on {args.threads} and 1 threads; "
          f"{os.cpu_count()} CPUs visible\n")
    print(f"| type | llama.cpp 1T (Mw/s) | ggq {args.threads}T (Mw/s) | ggq 1T (Mw/s) | "
          f"ggq {args.threads}T / llama.cpp 1T | ggq 1T / llama.cpp 1T | same, CPU time |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, c, n, one, r, r1, rc in rows:
        print(f"| {name} | {c:.1f} | {n:.1f} | {one:.1f} | {r:.2f} | {r1:.2f} | {rc:.2f} |")
    print("\nRatios > 1: ggq faster. Wall-clock speeds; the last column compares process CPU time of the "
          "1-thread runs, which is robust to other load on the machine.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
