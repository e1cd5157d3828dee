"""Serving benchmark (issue 13): concurrent streaming clients against ``ggq serve``, llama.cpp's own
``llama-server`` and llama-cpp-python's ``python -m llama_cpp.server`` on one GGUF file, in one
interleaved run; and a soak mode for ``ggq serve``.

**Table.** All servers are started at once on 127.0.0.1 with ``--threads`` threads (they idle
while another one is measured). Each round runs, for each number of clients (default 1, 4, 16) and
each server in turn (the order rotates from round to round), one phase: every client sends one
streaming ``/v1/completions`` request (its own prompt, temperature 0, end-of-generation tokens
banned through ``logit_bias``, and for llama-server also ``ignore_eos``, so that each request
generates exactly ``--tokens`` tokens; a request that does not is counted as an error), all
clients at once. Reported per server and number of clients, over the ``--rounds`` phases:

* aggregate decode tokens/s: all completion tokens / summed wall time of the phases (prompts included);
* per-request decode tokens/s: (tokens - 1) / (last token - first token), median;
* time to first token (request sent -> first text chunk; queueing included) p50 / p95;
* ratios: the aggregate to the same server's first (single-client) aggregate, and aggregate and
  TTFT p50 to llama-server's at the same number of clients (to ggq's when llama-server is absent).

ggq runs with ``--parallel`` = the largest number of clients (unless given) and ``--ctx-size`` per
slot; llama-server with ``-np`` the same and ``-c`` = slots x ``--ctx-size`` (its ``-c`` is the
total, divided among the slots; continuous batching is on by default); llama-cpp-python's server
decodes one request at a time (``--interrupt_requests False``: by default each new request ends
the running one after its current token, which earlier runs of this benchmark counted as
finished requests).

**Soak** (``--soak SECONDS``): only ggq serve; ``--soak-clients`` (16) clients send streaming
requests back to back (lengths varying between ``--tokens``/2 and 3/2 ``--tokens``, so slots join
and leave at different steps) until the time is up. Errors (HTTP status, transport errors, a
wrong number of tokens) are counted; the server's resident memory (``VmRSS`` of
``/proc/PID/status``) is sampled every ``--rss-every`` seconds and reported at the start (after
the warm-up request), after one minute (the KV cache's pages are touched as the slots first fill
it), in the middle and at the end. Usage::

    python tools/bench_serve.py model.gguf --clients 1,4,16 --threads 2 --llama-server --llama-cpp
    python tools/bench_serve.py model.gguf --threads 2 --soak 600

``--llama-server`` takes ``native`` (default) or ``avx2``, built by ``tools/llama_bench.py`` (about
10 minutes the first time), or a binary's path. ``--llama-cpp`` needs llama-cpp-python's
``[server]`` extra (sse-starlette, starlette-context, pydantic-settings). Shared machines: run nothing else meanwhile;
compare ratios from one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

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


@dataclass
class Server:
    """A server under test: its name, command line (given the port), fields added to every
    request body, and once started its process, URL, model id and log file."""

    name: str
    cmd: Callable[[int], list[str]]  # port -> command line
    extra: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    url: str = ""
    model: str = ""
    log: object = None

    def start(self, env: dict, timeout: float = 900) -> None:
        """Start it and wait until it answers (ggq: ``/health`` 200 once compiled; llama-server:
        ``/health`` 200 once loaded; llama_cpp.server has no ``/health``: ``/v1/models``).
        RuntimeError if it exits or is not ready within ``timeout`` seconds."""
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        # its log goes to a file: a pipe nobody reads fills up and blocks the server's logging
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(self.cmd(port), env=env, stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_tail()}")
            try:
                h = httpx.get(self.url + "/health", timeout=5).status_code
                if h == 200 or (h == 404 and httpx.get(self.url + "/v1/models", timeout=5).status_code == 200):
                    self.model = httpx.get(self.url + "/v1/models", timeout=30).json()["data"][0]["id"]
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} did not get ready in {timeout:.0f} s")

    def log_tail(self, n: int = 2000) -> str:
        """The end of the server's standard error."""
        self.log.seek(0)
        return self.log.read()[-n:]

    def rss_mb(self) -> float:
        """The server process's resident memory in MiB (``VmRSS``), NaN if unreadable."""
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    def stop(self) -> None:
        """Terminate the process (kill after 30 s)."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _one(client: httpx.Client, srv: Server, prompt: str, n: int, bias: dict) -> dict:
    """One streamed completion of ``n`` tokens: times of sending, first text, end; completion
    tokens (``usage`` if the server sends it, else the text chunks). RuntimeError for an HTTP
    error, an error event or another number of tokens."""
    body = {"model": srv.model, "prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True,
            "logit_bias": bias, "stream_options": {"include_usage": True}, **srv.extra}
    t0 = time.perf_counter()
    first = None
    chunks = 0
    usage = None
    with client.stream("POST", srv.url + "/v1/completions", json=body, timeout=600) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:300]!r}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                raise RuntimeError(f"error event: {str(obj['error'])[:300]}")
            if obj.get("usage"):
                usage = obj["usage"]
            for c in obj.get("choices") or []:
                if c.get("text"):
                    chunks += 1
                    if first is None:
                        first = time.perf_counter()
    t1 = time.perf_counter()
    n_gen = usage["completion_tokens"] if usage else chunks
    if n_gen != n:
        raise RuntimeError(f"{n_gen} tokens generated, {n} asked")
    return {"t0": t0, "first": first if first is not None else t1, "end": t1, "n": n_gen}


def run_phase(srv: Server, clients: int, n: int, bias: dict, tag: str = "") -> dict:
    """``clients`` threads send one request each at once: ``{"results", "errors", "wall"}``."""
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(i: int) -> None:
        with httpx.Client() as http:
            barrier.wait()
            try:
                r = _one(http, srv, PROMPTS[i % len(PROMPTS)] + f" ({tag}{i})", n, bias)
            except Exception as e:  # counted, reported
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                return
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"results": results, "errors": errors, "wall": time.perf_counter() - t0}


def summarize(name: str, clients: int, phases: list[dict]) -> dict:
    """The figures of ``phases`` (of one server and number of clients) taken together."""
    results = [r for p in phases for r in p["results"]]
    errors = [e for p in phases for e in p["errors"]]
    wall = sum(p["wall"] for p in phases)
    ttft = sorted(r["first"] - r["t0"] for r in results)
    per = [(r["n"] - 1) / (r["end"] - r["first"]) for r in results if r["n"] > 1 and r["end"] > r["first"]]
    q = statistics.quantiles(ttft, n=20, method="inclusive") if len(ttft) >= 2 else ttft * 19
    tokens = sum(r["n"] for r in results)
    return {"server": name, "clients": clients, "requests": len(results), "errors": len(errors), "wall_s": wall,
            "tokens": tokens, "aggregate_tps": tokens / wall if wall > 0 else float("nan"),
            "per_request_tps": statistics.median(per) if per else float("nan"),
            "ttft_p50": statistics.median(ttft) if ttft else float("nan"),
            "ttft_p95": q[18] if ttft else float("nan"), "first_error": errors[0] if errors else None}


def table(rows: list[dict], base: str) -> str:
    """A markdown table of ``rows`` (from :func:`summarize`) with ratios to the server ``base``
    at the same number of clients and to each server's first number of clients."""
    by = {(r["server"], r["clients"]): r for r in rows}
    first: dict[str, float] = {}
    out = ["| server | clients | aggregate tok/s | vs its first | per request tok/s | TTFT p50 / p95 s | "
           f"aggregate vs {base} | TTFT p50 vs {base} | errors |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = by.get((base, r["clients"]))
        f = first.setdefault(r["server"], r["aggregate_tps"])
        agg = f"{r['aggregate_tps'] / b['aggregate_tps']:.2f}" if b and b["aggregate_tps"] else "-"
        ttft = f"{r['ttft_p50'] / b['ttft_p50']:.2f}" if b and b["ttft_p50"] else "-"
        out.append(f"| {r['server']} | {r['clients']} | {r['aggregate_tps']:.1f} | {r['aggregate_tps'] / f:.2f} | "
                   f"{r['per_request_tps']:.1f} | {r['ttft_p50']:.3f} / {r['ttft_p95']:.3f} | {agg} | {ttft} | "
                   f"{r['errors']} |")
    return "\n".join(out)


def soak(srv: Server, seconds: float, clients: int, n: int, bias: dict, every: float) -> dict:
    """``clients`` clients send streaming requests back to back for ``seconds``; the server's RSS
    sampled every ``every`` seconds. Returns requests, tokens, errors, the RSS samples
    ``[(seconds since start, MiB)]`` and the RSS at the start, middle and end."""
    stop = threading.Event()
    lock = threading.Lock()
    counts = {"requests": 0, "tokens": 0, "errors": 0}
    errors: list[str] = []
    rss: list[tuple[float, float]] = []
    t_start = time.perf_counter()

    def client(i: int) -> None:
        k = 0
        with httpx.Client() as http:
            while not stop.is_set():
                want = n // 2 + (7 * i + 13 * k) % (n + 1)
                try:
                    r = _one(http, srv, PROMPTS[(i + k) % len(PROMPTS)] + f" ({i}.{k})", want, bias)
                except Exception as e:
                    with lock:
                        counts["errors"] += 1
                        if len(errors) < 20:
                            errors.append(f"{time.perf_counter() - t_start:.0f} s: {type(e).__name__}: {e}")
                    time.sleep(1)
                else:
                    with lock:
                        counts["requests"] += 1
                        counts["tokens"] += r["n"]
                k += 1

    def sampler() -> None:
        last_print = 0.0
        while True:
            t = time.perf_counter() - t_start
            rss.append((round(t, 1), srv.rss_mb()))
            if t - last_print >= 60 or not last_print:
                last_print = t or 1e-9
                with lock:
                    c = dict(counts)
                print(f"soak {t:5.0f} s: {c['requests']} requests, {c['tokens']} tokens, {c['errors']} errors, "
                      f"RSS {rss[-1][1]:.1f} MiB", flush=True)
            if stop.wait(every):
                return

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    mon = threading.Thread(target=sampler)
    mon.start()
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    mon.join()
    rss.append((round(time.perf_counter() - t_start, 1), srv.rss_mb()))
    wall = time.perf_counter() - t_start
    def at(t: float) -> float:
        return min(rss, key=lambda s: abs(s[0] - t))[1]

    return {"server": srv.name, "seconds": wall, "clients": clients, **counts, "tokens_per_s": counts["tokens"] / wall,
            "rss_start_mib": rss[0][1], "rss_1min_mib": at(60) if wall > 60 else float("nan"), "rss_middle_mib": at(wall / 2),
            "rss_end_mib": rss[-1][1],
            "rss_max_mib": max(s[1] for s in rss), "rss": rss, "first_errors": errors,
            "server_alive": srv.proc.poll() is None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="GGUF file")
    ap.add_argument("--clients", default="1,4,16", help="numbers of concurrent clients (comma-separated)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64, help="completion tokens per request")
    ap.add_argument("--rounds", type=int, default=2, help="phases per server and number of clients")
    ap.add_argument("--parallel", type=int, default=None, help="slots of ggq and llama-server (default: most clients)")
    ap.add_argument("--ctx-size", type=int, default=512, help="context per slot")
    ap.add_argument("--llama-server", nargs="?", const="native", default=None,
                    help="also llama.cpp's llama-server: native|avx2 (tools/llama_bench.py builds it) or a path")
    ap.add_argument("--llama-cpp", action="store_true", help="also llama-cpp-python's server on the same file")
    ap.add_argument("--soak", type=float, default=None, metavar="SECONDS", help="soak ggq serve instead of the table")
    ap.add_argument("--soak-clients", type=int, default=16)
    ap.add_argument("--rss-every", type=float, default=5.0, help="soak: seconds between RSS samples")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)
    clients = [int(c) for c in a.clients.split(",")]
    if a.soak is not None:
        clients = [a.soak_clients]
    slots = a.parallel or max(clients)
    bias = {str(i): -100 for i in _eog_ids(a.model)}
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    servers = [Server("ggq", lambda port: [
        sys.executable, "-m", "ggq.cli", "serve", a.model, "--port", str(port), "--threads", str(a.threads),
        "--parallel", str(slots), "--ctx-size", str(a.ctx_size), "--queue-size", "256"])]
    if a.soak is None and a.llama_server:
        if a.llama_server in ("native", "avx2"):
            sys.path.insert(0, str(REPO / "tools"))
            from llama_bench import server as build_server

            binary = build_server(a.llama_server)
        else:
            binary = Path(a.llama_server)
        servers.append(Server("llama-server", lambda port: [
            str(binary), "-m", a.model, "--host", "127.0.0.1", "--port", str(port), "-t", str(a.threads),
            "-np", str(slots), "-c", str(slots * a.ctx_size), "--no-warmup"], extra={"ignore_eos": True}))
    if a.soak is None and a.llama_cpp:
        servers.append(Server("llama-cpp-python", lambda port: [
            sys.executable, "-m", "llama_cpp.server", "--model", a.model, "--port", str(port), "--host", "127.0.0.1",
            "--n_threads", str(a.threads), "--n_ctx", str(a.ctx_size), "--verbose", "False",
            "--interrupt_requests", "False"]))  # by default a new request cuts the running one short
    running: list[Server] = []
    try:
        for s in servers:
            try:
                s.start(env)
                with httpx.Client() as http:
                    _one(http, s, "Warm-up.", 4, bias)
            except (RuntimeError, httpx.HTTPError) as e:
                print(f"{s.name}: not started ({e})", file=sys.stderr)
                s.stop()
                continue
            running.append(s)
        if not running or running[0].name != "ggq":
            return 1
        if a.soak is not None:
            res = soak(running[0], a.soak, a.soak_clients, a.tokens, bias, a.rss_every)
            print(f"soak: {res['seconds']:.0f} s, {res['clients']} clients, {res['requests']} requests, "
                  f"{res['tokens']} tokens ({res['tokens_per_s']:.1f} tok/s), {res['errors']} errors; RSS MiB "
                  f"start {res['rss_start_mib']:.1f}, after 1 min {res['rss_1min_mib']:.1f}, middle {res['rss_middle_mib']:.1f}, end {res['rss_end_mib']:.1f}, "
                  f"max {res['rss_max_mib']:.1f}; server {'alive' if res['server_alive'] else 'DEAD'}")
            for e in res["first_errors"]:
                print("  error:", e)
            if a.json:
                Path(a.json).write_text(json.dumps(res, indent=1))
            return 0 if res["errors"] == 0 and res["server_alive"] else 1
        phases: dict[tuple[str, int], list[dict]] = {}
        for rnd in range(a.rounds):
            for c in clients:
                order = running[rnd % len(running):] + running[:rnd % len(running)]
                for s in order:
                    p = run_phase(s, c, a.tokens, bias, tag=f"{rnd}.")
                    phases.setdefault((s.name, c), []).append(p)
                    print(f"round {rnd + 1} {s.name:16s} clients {c:3d}: "
                          f"{sum(r['n'] for r in p['results']) / p['wall']:7.1f} tok/s, {len(p['errors'])} errors",
                          file=sys.stderr, flush=True)
        rows = [summarize(s.name, c, phases[(s.name, c)]) for s in running for c in clients]
        base = "llama-server" if any(s.name == "llama-server" for s in running) else "ggq"
        print(table(rows, base))
        for r in rows:
            if r["first_error"]:
                print(f"{r['server']} {r['clients']} clients: {r['errors']} errors, first: {r['first_error']}")
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=1))
        return 0 if not any(r["errors"] for r in rows) else 1
    finally:
        for s in servers:
            s.stop()


if __name__ == "__main__":
    sys.exit(main())
