"""Serving benchmark (issue 13): concurrent streaming clients against ``ggq serve`` (and optionally
llama-cpp-python's ``python -m llama_cpp.server``) on one GGUF file.

For each number of clients (default 1, 4, 16) every client sends ``--rounds`` streaming
``/v1/completions`` requests one after the other (its own prompt, temperature 0, end-of-generation
tokens banned through ``logit_bias`` so that each request generates exactly ``--tokens`` tokens),
all clients at once. Reported per server and number of clients:

* aggregate decode tokens/s: all completion tokens / wall time of the phase (prompts included);
* per-request decode tokens/s: (tokens - 1) / (last token - first token), median;
* time to first token (request sent -> first text chunk; queueing included) p50 / p95;
* the ratio of the aggregate to the same server's single-client aggregate.

The servers are started here as subprocesses on 127.0.0.1 with ``--threads`` threads; ggq with
``--parallel`` = the largest number of clients (unless given) and ``--ctx-size`` per slot.
llama-cpp-python's server decodes one request at a time. Usage::

    python tools/bench_serve.py model.gguf --clients 1,4,16 --threads 2 [--llama-cpp]

Shared machines: run nothing else meanwhile; compare ratios from one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]

PROMPTS = ["Once upon a time, in a small village by the river,", "The history of the printing press begins",
           "Here is a recipe for a simple tomato soup:", "The three laws of motion state that",
           "In the year 2100, cities will", "A short guide to growing tomatoes on a balcony:",
           "The old lighthouse keeper looked at the sea and", "Dear diary, today I learned that"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _eog_ids(path: str) -> list[int]:
    """End-of-generation token ids of the file (ggq's tokenizer), to ban through logit_bias."""
    sys.path.insert(0, str(REPO))
    from ggq.runtime.loader import open_gguf
    from ggq.runtime.tokenizer import Tokenizer

    return sorted(Tokenizer.from_metadata(open_gguf(path).metadata, source=path).eog_ids)


def _start(cmd: list[str], url: str, env: dict, timeout: float = 900) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[:4]} exited: {proc.stderr.read()[-2000:]}")
        try:  # ggq: /health (503 while compiling); llama_cpp.server has no /health: /v1/models
            h = httpx.get(url + "/health", timeout=5).status_code
            if h == 200 or (h == 404 and httpx.get(url + "/v1/models", timeout=5).status_code == 200):
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"{cmd[:4]} did not get ready in {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _one(url: str, model: str, prompt: str, n: int, bias: dict) -> dict:
    """One streamed completion: times of sending, first text, end; completion tokens."""
    body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
            "logit_bias": bias, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first = None
    chunks = 0
    usage = None
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if obj.get("usage"):
                usage = obj["usage"]
            for c in obj.get("choices") or []:
                if c.get("text"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter()
    t1 = time.perf_counter()
    n_gen = usage["completion_tokens"] if usage else chunks
    return {"t0": t0, "first": first if first is not None else t1, "end": t1, "n": n_gen}


def run_phase(url: str, model: str, clients: int, rounds: int, n: int, bias: dict) -> dict:
    """``clients`` threads, each ``rounds`` requests in turn; the figures of the phase."""
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(i: int) -> None:
        barrier.wait()
        for k in range(rounds):
            try:
                r = _one(url, model, PROMPTS[(i + k) % len(PROMPTS)] + f" ({i}.{k})", n, bias)
            except Exception as e:  # counted, reported
                with lock:
                    errors.append(str(e))
                continue
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = sorted(r["first"] - r["t0"] for r in results)
    per = [(r["n"] - 1) / (r["end"] - r["first"]) for r in results if r["n"] > 1 and r["end"] > r["first"]]
    q = statistics.quantiles(ttft, n=20) if len(ttft) >= 2 else ttft * 19
    return {"clients": clients, "requests": len(results), "errors": len(errors), "wall_s": wall,
            "tokens": sum(r["n"] for r in results), "aggregate_tps": sum(r["n"] for r in results) / wall,
            "per_request_tps": statistics.median(per) if per else float("nan"),
            "ttft_p50": statistics.median(ttft) if ttft else float("nan"),
            "ttft_p95": q[18] if ttft else float("nan"), "first_error": errors[0] if errors else None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="GGUF file")
    ap.add_argument("--clients", default="1,4,16", help="numbers of concurrent clients (comma-separated)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="completion tokens per request")
    ap.add_argument("--rounds", type=int, default=2, help="requests per client")
    ap.add_argument("--parallel", type=int, default=None, help="ggq serve --parallel (default: most clients)")
    ap.add_argument("--ctx-size", type=int, default=512, help="context per slot")
    ap.add_argument("--llama-cpp", action="store_true", help="also llama-cpp-python's server on the same file")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)
    clients = [int(c) for c in a.clients.split(",")]
    bias = {str(i): -100 for i in _eog_ids(a.model)}
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    servers = [("ggq", lambda port: [sys.executable, "-m", "ggq.cli", "serve", a.model, "--port", str(port),
                                     "--threads", str(a.threads), "--parallel", str(a.parallel or max(clients)),
                                     "--ctx-size", str(a.ctx_size), "--queue-size", "256"])]
    if a.llama_cpp:
        servers.append(("llama-cpp-python", lambda port: [
            sys.executable, "-m", "llama_cpp.server", "--model", a.model, "--port", str(port), "--host", "127.0.0.1",
            "--n_threads", str(a.threads), "--n_ctx", str(a.ctx_size), "--verbose", "False"]))
    out = []
    for name, cmd in servers:
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        try:
            proc = _start(cmd(port), url, env)
        except RuntimeError as e:
            print(f"{name}: not started ({e})", file=sys.stderr)
            continue
        try:
            model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
            _one(url, model, "Warm-up.", 4, bias)
            base = None
            for c in clients:
                r = run_phase(url, model, c, a.rounds, a.tokens, bias)
                r["server"] = name
                base = r["aggregate_tps"] if base is None and c == clients[0] else base
                r["vs_first"] = r["aggregate_tps"] / base if base else float("nan")
                out.append(r)
                print(f"{name:17s} clients {c:3d}: aggregate {r['aggregate_tps']:7.1f} tok/s "
                      f"({r['vs_first']:.2f}x {clients[0]} client{'s' if clients[0] > 1 else ''}), per request "
                      f"{r['per_request_tps']:6.1f} tok/s, TTFT p50 {r['ttft_p50']:.3f} s p95 {r['ttft_p95']:.3f} s, "
                      f"{r['requests']} requests, {r['errors']} errors", flush=True)
        finally:
            _stop(proc)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))
    return 0 if out and not any(r["errors"] for r in out) else 1


if __name__ == "__main__":
    sys.exit(main())
