"""``ggq serve`` with continuous batching (issue 13, item 4): several slots decoded together in one
forward pass per step, checked with the real ``openai`` client (and httpx for raw streams) against
a server with 4 slots started here on 127.0.0.1 over SmolLM2-135M-Instruct (Q4_1, written by
llama.cpp).

The reference for a batched reply is the same request served alone (sequentially) by the same
server: with temperature 0 and ``cache_prompt`` false, a request's prompt is evaluated in the same
chunks and each decode step's logits are, row by row, those of a single-sequence step (bit for bit
with the integer kernels: ``tests/test_runtime_model.py::test_decode_batch_equals_eval_per_sequence``),
so the replies must be identical, not just similar."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from types import SimpleNamespace

import pytest

from test_serve import KEY, running_server

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

N_CTX = 512
N_SLOTS = 4
MAX_QUEUE = 2


@pytest.fixture(scope="module")
def bsrv(smollm2_gguf):
    from ggq.runtime.chat import ChatTemplate, Warmup, load
    from ggq.serve.app import create_app
    from ggq.serve.engine import Engine

    model, tok = load(str(smollm2_gguf), N_CTX, None, "f16", n_seq=N_SLOTS)
    template = ChatTemplate.for_model(model.metadata, tok, model.family.chat_template, model.path.name)
    warmup = Warmup(model)
    engine = Engine(model, tok, N_SLOTS, ready=warmup.wait, max_queue=MAX_QUEUE)
    app = create_app(engine, tok, template, "smol", names={model.path.name}, api_key=KEY)
    with running_server(app) as (url, client):
        yield SimpleNamespace(url=url, client=client, engine=engine, tok=tok, model=model)
    engine.stop()
    warmup.finish()


def _wait(cond, timeout=120.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _idle(bsrv):
    _wait(lambda: bsrv.engine.busy() == 0 and bsrv.engine.queued() == 0, what="an idle engine")


#: four different requests (chat and completions, different prompt lengths)
REQUESTS = [
    ("chat", "What is the capital of France?"),
    ("chat", "Write a haiku about the sea."),
    ("text", "Once upon a time, in a small village by the river,"),
    ("chat", "List three colors and explain why you like each of them in a few words."),
]


def _ask(bsrv, kind, text, max_tokens=32, **kw):
    """(text, finish_reason, completion tokens) of one request at temperature 0, prompt evaluated
    whole (cache_prompt false)."""
    extra = {"cache_prompt": False}
    if kind == "chat":
        r = bsrv.client.chat.completions.create(model="smol", messages=[{"role": "user", "content": text}],
                                                temperature=0, max_tokens=max_tokens, extra_body=extra, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens
    r = bsrv.client.completions.create(model="smol", prompt=text, temperature=0, max_tokens=max_tokens,
                                       extra_body=extra, **kw)
    return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens


def _stream_ask(bsrv, kind, text, max_tokens=32):
    """The same as :func:`_ask`, streamed: (joined text, finish_reason, completion tokens)."""
    extra = {"cache_prompt": False}
    opts = {"include_usage": True}
    if kind == "chat":
        it = bsrv.client.chat.completions.create(model="smol", messages=[{"role": "user", "content": text}],
                                                 temperature=0, max_tokens=max_tokens, extra_body=extra,
                                                 stream=True, stream_options=opts)
    else:
        it = bsrv.client.completions.create(model="smol", prompt=text, temperature=0, max_tokens=max_tokens,
                                            extra_body=extra, stream=True, stream_options=opts)
    parts, finish, n = [], None, None
    for ch in it:
        if ch.usage is not None:
            n = ch.usage.completion_tokens
        for c in ch.choices:
            piece = c.delta.content if kind == "chat" else c.text
            parts.append(piece or "")
            finish = c.finish_reason or finish
    return "".join(parts), finish, n


def test_four_concurrent_requests_equal_each_alone(bsrv):
    _idle(bsrv)
    alone = [_ask(bsrv, k, t) for k, t in REQUESTS]
    assert all(n > 0 for _, _, n in alone)
    e = bsrv.engine
    b0, t0 = e.n_batches, e.n_batched_tokens
    barrier = threading.Barrier(len(REQUESTS))

    def run(i):
        barrier.wait()
        k, t = REQUESTS[i]
        return _stream_ask(bsrv, k, t) if i % 2 else _ask(bsrv, k, t)  # streamed and not, together

    with concurrent.futures.ThreadPoolExecutor(len(REQUESTS)) as ex:
        together = list(ex.map(run, range(len(REQUESTS))))
    assert together == alone
    # the decode steps really were shared: more tokens than forward calls
    assert e.n_batched_tokens - t0 > e.n_batches - b0 > 0


def _open_stream(bsrv, text, max_tokens=2000):
    """A streaming chat request that keeps its slot busy (end-of-generation tokens banned; it ends
    at the full context), opened and left unread: (context manager, its line iterator). Keep the
    iterator: a line iterator dropped half-read closes the connection (httpcore), which cancels
    the request."""
    bias = {str(i): -100 for i in bsrv.tok.eog_ids}
    body = {"model": "smol", "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "logit_bias": bias}
    cm = httpx.stream("POST", bsrv.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=300)
    r = cm.__enter__()
    assert r.status_code == 200
    return cm, r.iter_lines()


def test_request_joins_while_others_generate(bsrv):
    """Two long streams are generating; a third request joins, finishes while they still run, and
    gets exactly its reply alone."""
    _idle(bsrv)
    k, t = REQUESTS[0]
    alone = _ask(bsrv, k, t)
    streams = [_open_stream(bsrv, q) for q in ("Tell me a long story about a fox.", "Describe the ocean at length.")]
    try:
        for _, lines in streams:  # both are generating: some text arrived
            next(line for line in lines if '"content": "' in line and '"role"' not in line)
        assert bsrv.engine.busy() == 2
        assert _ask(bsrv, k, t) == alone
        assert bsrv.engine.busy() == 2  # the long ones are still running
    finally:
        for cm, _ in streams:
            cm.__exit__(None, None, None)
    _idle(bsrv)


def test_long_prompt_read_in_chunks_while_others_decode(bsrv):
    """A prompt of ~300 tokens (three 128-token chunks, read one chunk per step between the decode
    steps of two running streams) gives the same reply as alone, and the streams keep decoding
    meanwhile."""
    _idle(bsrv)
    text = " ".join(f"Item {i}: a red apple, a green pear." for i in range(30)) + " Which fruits were listed?"
    assert len(bsrv.tok.encode(text, True, True)) > 2 * 128 + 10
    alone = _ask(bsrv, "text", text, max_tokens=16)
    streams = [_open_stream(bsrv, q) for q in ("Tell me a long story about a fox.", "Describe the ocean at length.")]
    try:
        for _, lines in streams:
            next(line for line in lines if '"content": "' in line and '"role"' not in line)
        n0 = [s.res.n_gen for s in bsrv.engine.slots if s.busy]
        assert _ask(bsrv, "text", text, max_tokens=16) == alone
        n1 = [s.res.n_gen for s in bsrv.engine.slots if s.busy]
        assert len(n0) == len(n1) == 2 and all(b > a for a, b in zip(n0, n1))
    finally:
        for cm, _ in streams:
            cm.__exit__(None, None, None)
    _idle(bsrv)


def test_cancel_frees_the_slot_and_metrics(bsrv):
    _idle(bsrv)
    cm, _ = _open_stream(bsrv, "Write a very long poem.")
    slot = None
    try:
        _wait(lambda: bsrv.engine.busy() == 1, what="a busy slot")
        slot = next(s for s in bsrv.engine.slots if s.busy)
        g = _gauges(bsrv)
        assert (g["ggq_slots_busy"], g["ggq_slots_total"], g["ggq_queue_depth"]) == (1, N_SLOTS, 0)
    finally:
        cm.__exit__(None, None, None)
    _wait(lambda: not slot.busy, 60, "the slot to be freed")
    assert slot.res.finish_reason == "cancelled" and slot.res.n_gen < 2000
    g = _gauges(bsrv)
    assert (g["ggq_slots_busy"], g["ggq_slots_total"]) == (0, N_SLOTS)
    assert _ask(bsrv, "text", "Hello", max_tokens=2)[2] == 2


def _gauges(bsrv) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(bsrv.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    return {s.name: s.value for fam in text_string_to_metric_families(r.text) for s in fam.samples if not s.labels}


def test_queue_full_gives_503_with_retry_after(bsrv):
    """4 slots busy, 2 requests waiting (the queue size): the next request gets 503 with
    Retry-After, through the openai client too; once the slots free up the waiting ones run and
    requests are accepted again."""
    _idle(bsrv)
    busy = [_open_stream(bsrv, f"Tell me a long story number {i}.") for i in range(N_SLOTS)]
    waiting = []
    try:
        _wait(lambda: bsrv.engine.busy() == N_SLOTS, what="all slots busy")
        waiting = [_open_stream(bsrv, f"Waiting request {i}.", max_tokens=3) for i in range(MAX_QUEUE)]
        _wait(lambda: bsrv.engine.queued() == MAX_QUEUE, what="the queue to fill")
        g = _gauges(bsrv)
        assert (g["ggq_slots_busy"], g["ggq_queue_depth"]) == (N_SLOTS, MAX_QUEUE)
        health = httpx.get(bsrv.url + "/health").json()
        assert (health["slots_idle"], health["slots_processing"]) == (0, N_SLOTS)
        r = httpx.post(bsrv.url + "/v1/completions", json={"model": "smol", "prompt": "Hi", "max_tokens": 2},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "server_busy"
        with pytest.raises(openai.APIStatusError) as ei:
            _ask(bsrv, "chat", "Hi", max_tokens=2)
        assert ei.value.status_code == 503 and ei.value.response.headers["retry-after"]
    finally:
        for cm, _ in busy:  # free the slots: the waiting requests run (3 tokens each) and end
            cm.__exit__(None, None, None)
    try:
        for _, lines in waiting:
            text = "".join(lines)
            assert '"finish_reason": "length"' in text and text.endswith("data: [DONE]")
    finally:
        for cm, _ in waiting:
            cm.__exit__(None, None, None)
    _idle(bsrv)
    assert _ask(bsrv, "text", "Hello", max_tokens=2)[2] == 2


def test_parallel_slots_have_their_own_kv_regions(bsrv):
    """--parallel 4: the model holds 4 KV cache regions of N_CTX positions (4 times one), one per
    slot; /health is ready and /metrics counts 4 slots."""
    m = bsrv.model
    one = 2 * m.n_layer * m.n_kv * N_CTX * m.head_dim * 2  # K and V, fp16, one sequence
    assert m.n_seq == N_SLOTS and m.kv_cache_bytes == N_SLOTS * one
    assert [s.model.index for s in bsrv.engine.slots] == list(range(N_SLOTS))
    assert httpx.get(bsrv.url + "/health").json() == {"status": "ok", "slots_idle": N_SLOTS, "slots_processing": 0}
    assert _gauges(bsrv)["ggq_slots_total"] == N_SLOTS


def test_prefix_reuse_picks_the_slot_holding_the_prefix(bsrv):
    """A follow-up turn goes to the slot whose cache holds the conversation so far, even after other
    requests used other slots."""
    _idle(bsrv)
    msgs = [{"role": "user", "content": "Name a fruit."}]
    a = bsrv.client.chat.completions.create(model="smol", messages=msgs, temperature=0, max_tokens=8)
    for k, t in REQUESTS[1:3]:  # other requests in between (free slots are picked by prefix first)
        _ask(bsrv, k, t, max_tokens=4)
    msgs2 = msgs + [{"role": "assistant", "content": a.choices[0].message.content},
                    {"role": "user", "content": "Another one?"}]
    b = bsrv.client.chat.completions.create(model="smol", messages=msgs2, temperature=0, max_tokens=8)
    assert b.usage.prompt_tokens_details.cached_tokens >= a.usage.prompt_tokens - 1
