"""ggq's runtime against llama.cpp on the same GGUF files, in one run.

    python tools/bench_runtime.py FILE.gguf [FILE2.gguf ...] [-p 128] [-n 128] [-t 2] [-r 3] [--cold]
                                  [--cache-type f16|f32] [--llama-bench native|avx2|PATH] [--isa avx2]

With ``--llama-bench`` the llama.cpp side is its own ``llama-bench`` binary (C++, no Python in
its loop; built once by ``tools/llama_bench.py``): each repetition runs ``llama-bench -r 1`` and
ggq's prompt and decode measurement in turn, and the table gives the medians and ratios, with the
CPU's SIMD flags. Without it, llama.cpp runs through llama-cpp-python, whose Python ``eval`` loop
adds per-token work (~25 % of a decode step on small models):

For each file: prompt (pp, one batch of p random tokens) and decode (tg, n single-token evals)
tokens/s of ggq and llama.cpp with the same thread count and KV cache type (f16, llama.cpp's
default, unless ``--cache-type f32``), runs interleaved (ggq, llama.cpp,
ggq, ...) because the machine is shared and noisy; medians and the ratio ggq / llama.cpp.
In separate subprocesses (so the two libraries' memory does not mix): ggq's peak RSS against the
file size + KV cache, the time to first token with a warm Numba cache (process start, imports,
load, a 16-token prompt), and with ``--cold`` the same with an empty Numba cache (compile time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from ggq.runtime.model import Model
t_imp = time.perf_counter() - t0
m = Model.load(sys.argv[1], n_ctx=int(sys.argv[2]), n_threads=int(sys.argv[3]), kv_type=sys.argv[6])
t_load = time.perf_counter() - t0
m.eval(list(range(1, 17)))
t_first = time.perf_counter() - t0
m.reset()
m.eval(list(range(1, int(sys.argv[4]) + 1)))
for t in range(int(sys.argv[5])):
    m.eval([5 + t % 100])
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork+exec, i.e. it would report the parent's
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
try:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
except OSError:
    pass
print(json.dumps(dict(import_s=t_imp, load_s=t_load, ttft_s=t_first, file_mb=m.file_size / 2**20,
                      kv_mb=m.kv_cache_bytes / 2**20, arena_mb=m.arena.nbytes / 2**20,
                      peak_rss_mb=peak)))
"""


def child_stats(path, n_ctx, threads, n_prompt, n_gen, cache_dir=None, kv_type="f16") -> dict:
    env = dict(os.environ)
    if cache_dir:
        env["NUMBA_CACHE_DIR"] = str(cache_dir)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(n_ctx), str(threads), str(n_prompt), str(n_gen),
                          kv_type],
                         capture_output=True, text=True, env=env, check=True)
    d = json.loads(out.stdout.strip().splitlines()[-1])
    d["wall_s"] = time.perf_counter() - t0
    return d


_TTFT_CHILD = r"""
import os, sys
from ggq.runtime.model import Model
m = Model.load(sys.argv[1], n_ctx=64, n_threads=int(sys.argv[2]), kv_type=sys.argv[3])
m.eval(list(range(1, 17)))
sys.stdout.flush()
os._exit(0)
"""

_WARM_CHILD = r"""
import sys
from ggq.runtime.model import Model
Model.load(sys.argv[1], n_ctx=64, n_threads=1).compile_repackers()
"""

#: about 16 tokens for llama.cpp's side of the time-to-first-token measurement
_TTFT_PROMPT = "The quick brown fox jumps over the lazy dog while the sun sets slowly behind"


def _wall_and_rss(cmd, env=None) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one child process run to completion. The RSS comes from
    GNU time (``/usr/bin/time -f %M``): a forked child's own ``ru_maxrss`` starts at its parent's,
    this benchmark's (NaN without GNU time)."""
    gnu_time = Path("/usr/bin/time")
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as f:
        full = [str(gnu_time), "-f", "%M", "-o", f.name, *cmd] if gnu_time.exists() else list(cmd)
        t0 = time.perf_counter()
        r = subprocess.run(full, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        dt = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"{cmd[0]} failed (exit {r.returncode})")
        try:
            rss = int(f.read().split()[-1]) / 1024
        except (ValueError, IndexError):
            rss = float("nan")
    return dt, rss


def ttft(path: Path, threads: int, kv_type: str, completion: Path | None, reps: int = 3) -> dict:
    """Time to first token, process start to the first token's logits (a 16-token prompt, 64-token
    context), warm file cache and warm Numba cache, best of ``reps``: ggq (interpreter, imports,
    load, prompt) and, with ``completion`` (llama.cpp's llama-completion), llama.cpp generating one
    token (load, prompt, one sample, exit). Also each one's peak RSS."""
    out = {}
    # a warm compile cache includes the load-time repackers (built in the background by ``ggq run``
    # and ``ggq generate`` after a first load; without them the loader repacks with numpy)
    subprocess.run([sys.executable, "-c", _WARM_CHILD, str(path)], check=True, capture_output=True)
    runs = [("g", [sys.executable, "-c", _TTFT_CHILD, str(path), str(threads), kv_type])]
    if completion is not None:
        runs.append(("l", [str(completion), "-m", str(path), "-p", _TTFT_PROMPT, "-n", "1", "-t", str(threads),
                           "-c", "64", "-ctk", kv_type, "-ctv", kv_type, "--temp", "0", "-no-cnv"]))
    for key, cmd in runs:
        best = min(_wall_and_rss(cmd) for _ in range(reps))
        out[key + "_ttft"], out[key + "_rss"] = best
    return out


def bench_file(path: Path, n_prompt: int, n_gen: int, threads: int, reps: int, kv_type: str = "f16") -> dict:
    import llama_cpp

    from ggq.runtime.model import Model

    n_ctx = max(n_prompt, n_gen + 1) + 8
    m = Model.load(path, n_ctx=n_ctx, n_threads=threads, kv_type=kv_type)
    ggml_type = {"f32": 0, "f16": 1}[kv_type]
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, n_batch=max(n_prompt, 8),
                          verbose=False, type_k=ggml_type, type_v=ggml_type)
    rs = np.random.RandomState(0)
    prompt = [int(t) for t in rs.randint(0, m.n_vocab, n_prompt)]
    gen = [int(t) for t in rs.randint(0, m.n_vocab, n_gen + 1)]

    def g_pp():
        m.reset()
        t = time.perf_counter()
        m.eval(prompt)
        return time.perf_counter() - t

    def l_pp():
        llm.reset()
        t = time.perf_counter()
        llm.eval(prompt)
        return time.perf_counter() - t

    def g_tg():
        m.reset()
        m.eval(gen[:1])
        t = time.perf_counter()
        for tok in gen[1:]:
            m.eval([tok])
        return time.perf_counter() - t

    def l_tg():
        llm.reset()
        llm.eval(gen[:1])
        t = time.perf_counter()
        for tok in gen[1:]:
            llm.eval([tok])
        return time.perf_counter() - t

    res = {k: [] for k in ("g_pp", "l_pp", "g_tg", "l_tg")}
    g_pp(), l_pp(), g_tg(), l_tg()  # warm-up
    for _ in range(reps):
        for k, f in (("g_pp", g_pp), ("l_pp", l_pp), ("g_tg", g_tg), ("l_tg", l_tg)):
            res[k].append(f())
    med = {k: statistics.median(v) for k, v in res.items()}
    llm.close()
    return dict(
        g_pp=n_prompt / med["g_pp"], l_pp=n_prompt / med["l_pp"], g_tg=n_gen / med["g_tg"], l_tg=n_gen / med["l_tg"],
        types=sorted({t.qtype.name for t in m._gf.tensors.values()}),
    )


def bench_file_llama_bench(path: Path, binary: Path, n_prompt: int, n_gen: int, threads: int, reps: int,
                           kv_type: str = "f16", depth: int = 0) -> dict:
    """ggq (in this process) and ``llama-bench`` (a subprocess, one repetition per call) in turn;
    both engines' prompt and decode measured after ``depth`` tokens of context."""
    from llama_bench import run as llama_bench_run

    from ggq.runtime.model import Model

    m = Model.load(path, n_ctx=depth + max(n_prompt, n_gen + 1) + 8, n_threads=threads, kv_type=kv_type)
    rs = np.random.RandomState(0)
    prompt = [int(t) for t in rs.randint(0, m.n_vocab, n_prompt)]
    gen = [int(t) for t in rs.randint(0, m.n_vocab, n_gen)]
    context = [int(t) for t in rs.randint(0, m.n_vocab, depth)]
    m.eval(prompt)  # warm-up (loads the compiled code)
    res = {k: [] for k in ("g_pp", "l_pp", "g_tg", "l_tg")}
    for _ in range(reps):
        m.reset()
        if depth:
            m.eval(context)
        t = time.perf_counter()
        m.eval(prompt)
        res["g_pp"].append(n_prompt / (time.perf_counter() - t))
        m.truncate(depth)
        t = time.perf_counter()
        for tok in gen:
            m.eval([tok])
        res["g_tg"].append(n_gen / (time.perf_counter() - t))
        lb = llama_bench_run(binary, path, n_prompt, n_gen, threads, 1, kv_type, depth)
        res["l_pp"].append(lb["pp"])
        res["l_tg"].append(lb["tg"])
    out = {k: statistics.median(v) for k, v in res.items()}
    out["types"] = sorted({t.qtype.name for t in m._gf.tensors.values()})
    return out


def avx2_only_features() -> str:
    """The host's LLVM feature string with every AVX-512, VNNI, AVX10 and AMX feature disabled."""
    from llvmlite import binding

    feats = binding.get_host_cpu_features()
    for k in list(feats):
        if k.startswith(("avx512", "avx10", "amx")) or "vnni" in k:
            feats[k] = False
    return feats.flatten()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("-p", type=int, default=128)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-t", type=int, default=2)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--cold", action="store_true", help="also measure start-up with an empty Numba cache")
    ap.add_argument("--cache-type", choices=["f16", "f32"], default="f16", help="KV cache type of both engines")
    ap.add_argument("--llama-bench", default=None,
                    help="compare with llama-bench: 'native' or 'avx2' (built by tools/llama_bench.py) or a binary's path")
    ap.add_argument("-d", "--depth", type=int, default=0,
                    help="tokens already in the context when pp and tg are measured (llama-bench -d; "
                         "needs --llama-bench)")
    ap.add_argument("--isa", choices=["host", "avx2"], default="host",
                    help="avx2: Numba compiles ggq for an AVX2-only CPU (haswell, every AVX-512 and VNNI feature "
                         "off; NUMBA_CPU_NAME alone keeps the host's features), and llama-bench defaults to its "
                         "AVX2-only build")
    a = ap.parse_args(argv)
    if a.isa == "avx2" and os.environ.get("GGQ_BENCH_ISA") != "avx2":
        env = dict(os.environ, GGQ_BENCH_ISA="avx2", NUMBA_CPU_NAME="haswell", NUMBA_CPU_FEATURES=avx2_only_features())
        args = list(argv if argv is not None else sys.argv[1:])
        if a.llama_bench is None:
            args += ["--llama-bench", "avx2"]
        sys.exit(subprocess.run([sys.executable, __file__, *args], env=env).returncode)
    sys.path.insert(0, str(REPO / "tools"))
    binary = None
    if a.llama_bench:
        from llama_bench import build

        binary = build(a.llama_bench) if a.llama_bench in ("native", "avx2") else Path(a.llama_bench)
    rows = []
    for f in a.files:
        if binary is not None:
            r = bench_file_llama_bench(f, binary, a.p, a.n, a.t, a.r, a.cache_type, a.depth)
        else:
            r = bench_file(f, a.p, a.n, a.t, a.r, a.cache_type)
        s = child_stats(f, a.depth + a.p + a.n + 8, a.t, a.p, a.n, kv_type=a.cache_type)
        comp = binary.parent / "llama-completion" if binary is not None else None
        s.update(ttft(f, a.t, a.cache_type, comp if comp is not None and comp.exists() else None))
        if a.cold:
            with tempfile.TemporaryDirectory() as tmp:
                c = child_stats(f, 64, a.t, 1, 1, cache_dir=tmp, kv_type=a.cache_type)
            r["cold_s"] = c["ttft_s"]
        rows.append((f, r, s))
        print(f"{f.name}: done", file=sys.stderr)
    from llama_bench import cpu_flags

    from ggq.runtime.kernels.simd import ISA

    against = f"llama-bench ({a.llama_bench})" if binary is not None else "llama-cpp-python"
    depth = f" @ depth {a.depth}" if a.depth else ""
    print(f"threads {a.t}, pp{a.p}, tg{a.n}{depth}, KV cache {a.cache_type}, median of {a.r} interleaved runs, llama.cpp = "
          f"{against}; ggq kernels: {ISA} (NUMBA_CPU_NAME={os.environ.get('NUMBA_CPU_NAME', 'host')}); "
          f"CPU flags: {cpu_flags()}")
    print("| file | types | pp ggq | pp llama.cpp | pp ratio | tg ggq | tg llama.cpp | tg ratio | peak RSS MiB ggq "
          "(file + KV) | TTFT s ggq / llama.cpp (RSS MiB) | cold s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for f, r, s in rows:
        cold = f"{r['cold_s']:.1f}" if "cold_s" in r else "-"
        lt = f" / {s['l_ttft']:.2f}" if "l_ttft" in s else ""
        lr = f" ({s['g_rss']:.0f} / {s['l_rss']:.0f})" if "l_rss" in s else f" ({s['g_rss']:.0f})"
        print(f"| {f.name} | {','.join(r['types'])} | {r['g_pp']:.1f} | {r['l_pp']:.1f} | {r['g_pp'] / r['l_pp']:.2f} | "
              f"{r['g_tg']:.1f} | {r['l_tg']:.1f} | {r['g_tg'] / r['l_tg']:.2f} | {s['peak_rss_mb']:.0f} "
              f"({s['file_mb']:.0f} + {s['kv_mb']:.0f}) | {s['g_ttft']:.2f}{lt}{lr} | {cold} |")


if __name__ == "__main__":
    main()
