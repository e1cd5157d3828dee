"""Quantize throughput of ggq's Numba kernels vs gguf.quants (numpy) vs llama.cpp's C kernel.

Usage: ``python tools/bench_quants_basic.py [--n 4096] [--types Q8_0,Q4_0] [--repeat 3]``

Prints MB/s of float32 input and ratios to llama.cpp (``ggml_quantize_chunk`` through ctypes,
single-threaded reference path) measured in the same run; ggq uses all Numba threads. Also
checks that the three outputs are byte-identical.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType
from gguf import quants as gq

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ggq.quants as Q  # noqa: E402
from llamacpp_ref import ggml_quantize  # noqa: E402


def best_of(fn, repeat):
    best = float("inf")
    out = None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--types", default="Q8_0,Q4_0")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import numba

    x = np.random.default_rng(0).standard_normal((args.n, args.n)).astype(np.float32)
    mb = x.nbytes / 1e6
    print(f"{args.n}x{args.n} float32 ({mb:.0f} MB), numba threads: {numba.get_num_threads()}")
    for name in args.types.split(","):
        t = GGMLQuantizationType[name]
        Q.quantize(x[:64], t)  # compile / load cache
        tc, c = best_of(lambda: ggml_quantize(x, int(t)), args.repeat)
        to, o = best_of(lambda: Q.quantize(x, t), args.repeat)
        tg, g = best_of(lambda: gq.quantize(x, t), 1)
        same = np.array_equal(o, c) and np.array_equal(o, g)
        print(f"{name}: llama.cpp C {mb / tc:8.0f} MB/s | ggq {mb / to:8.0f} MB/s ({tc / to:.2f}x C) | "
              f"gguf.quants {mb / tg:6.0f} MB/s ({tc / tg:.3f}x C) | identical bytes: {same}")


if __name__ == "__main__":
    main()
