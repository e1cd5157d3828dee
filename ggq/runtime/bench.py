"""Prompt and decode speed of a GGUF model, measured like llama-bench (``-p 128 -n 128``).

Prompt: ``n_prompt`` random token ids in one batch on an empty cache (pp tokens/s). Decode:
``n_gen`` single-token evals after a one-token start (tg tokens/s). Each test runs ``repetitions``
times after one warm-up; the median is reported. Also reports load time, the number of Python ->
compiled calls per decoded token (1: the family's ``forward`` runs all layers), and the
process peak RSS.
"""

from __future__ import annotations

import resource
import statistics
import time

import numpy as np


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB: VmHWM from /proc/self/status (Linux keeps
    ru_maxrss across fork+exec, so a child would report its parent's peak), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_model(model, n_prompt: int = 128, n_gen: int = 128, repetitions: int = 3, seed: int = 0) -> dict:
    """Measure ``model`` (a loaded :class:`ggq.runtime.model.Model`); returns a dict with
    ``pp_tps``, ``tg_tps`` (tokens/s, median), ``pp_s``/``tg_s`` lists, ``calls_per_token``."""
    rs = np.random.RandomState(seed)
    vocab = model.n_vocab
    need = max(n_prompt, n_gen + 1)
    if need > model.n_ctx:
        raise ValueError(f"n_ctx {model.n_ctx} is smaller than the benchmark needs ({need})")
    prompt = rs.randint(0, vocab, n_prompt)
    gen = rs.randint(0, vocab, n_gen + 1)
    pp, tg = [], []
    # count compiled calls per decoded token by wrapping the compiled forward
    calls = [0]
    orig = model._forward_fn

    def counting(*a):
        calls[0] += 1
        return orig(*a)

    for rep in range(repetitions + 1):
        if n_prompt:
            model.reset()
            t0 = time.perf_counter()
            model.eval(prompt)
            dt = time.perf_counter() - t0
            if rep:
                pp.append(dt)
        if n_gen:
            model.reset()
            model.eval(gen[:1])
            model._forward_fn = counting
            calls[0] = 0
            try:
                t0 = time.perf_counter()
                for t in gen[1:]:
                    model.eval([int(t)])
                dt = time.perf_counter() - t0
            finally:
                model._forward_fn = orig
            if rep:
                tg.append(dt)
    model.reset()
    return {
        "pp_tps": n_prompt / statistics.median(pp) if pp else float("nan"),
        "tg_tps": n_gen / statistics.median(tg) if tg else float("nan"),
        "pp_s": pp, "tg_s": tg,
        "calls_per_token": calls[0] / max(n_gen, 1),
    }


def run_bench(path, n_prompt: int = 128, n_gen: int = 128, n_threads: int | None = None, repetitions: int = 3,
              kv_type: str = "f16") -> str:
    """Load ``path`` (KV cache ``kv_type``) and return a llama-bench-like table (``ggq bench``)."""
    from ggq.runtime.model import Model

    t0 = time.perf_counter()
    m = Model.load(path, n_ctx=max(n_prompt, n_gen + 1, 16), n_threads=n_threads, kv_type=kv_type)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    m.eval([1])  # first call: compiles or loads the Numba cache
    first_s = time.perf_counter() - t0
    m.reset()
    r = bench_model(m, n_prompt, n_gen, repetitions)
    size_mb = m.file_size / 2**20
    lines = [
        f"model: {m.path.name} ({m.arch}, {size_mb:.1f} MiB, {m.n_layer} layers, repacked {m.arena.nbytes / 2**20:.1f} MiB)",
        f"threads: {m.n_threads}   KV cache: {m.kv_type}   load: {load_s:.2f} s   first eval (JIT cache load/compile): {first_s:.2f} s",
        "| test   |        t/s |",
        "| ------ | ---------: |",
    ]
    if n_prompt:
        lines.append(f"| pp{n_prompt:<4} | {r['pp_tps']:10.2f} |")
    if n_gen:
        lines.append(f"| tg{n_gen:<4} | {r['tg_tps']:10.2f} |")
    lines.append(f"compiled calls per decoded token: {r['calls_per_token']:.0f}   peak RSS: {peak_rss_mb():.0f} MiB")
    return "\n".join(lines)
