"""``ggq serve``: the OpenAI-compatible server, checked with the real ``openai`` client (and httpx
for raw requests) against a server started here on 127.0.0.1 over SmolLM2-135M-Instruct (Q4_1,
written by llama.cpp). References: ``ggq generate --chat`` in a separate process, ggq's own
Tokenizer and Hugging Face's ``tokenizers`` on the checkpoint's tokenizer.json."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

KEY = "sk-ggq-test"
N_CTX = 512
SYSTEM = "You are a helpful assistant. Reply in one short English sentence."
QUESTION = "What is the capital of France?"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

@contextlib.contextmanager
def running_server(app):
    """Run ``app`` under uvicorn on a free loopback port in a thread until the block ends; yields
    ``(url, openai client)`` once ``/health`` answers 200 (the forward pass has compiled)."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900  # a cold Numba cache compiles for a while on a busy machine
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the server did not get ready"
        time.sleep(0.5)
    try:
        yield url, openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=300)
    finally:
        server.should_exit = True
        thread.join(30)



@pytest.fixture(scope="module")
def srv(smollm2_gguf):
    from ggq.runtime.chat import ChatTemplate, Warmup, load
    from ggq.serve.app import create_app
    from ggq.serve.engine import Engine

    model, tok = load(str(smollm2_gguf), N_CTX, None, "f16")
    template = ChatTemplate.for_model(model.metadata, tok, model.family.chat_template, model.path.name)
    warmup = Warmup(model)
    engine = Engine(model, tok, 1, ready=warmup.wait)
    model_id = "smol"
    app = create_app(engine, tok, template, model_id, names={model.path.name}, api_key=KEY)
    with running_server(app) as (url, client):
        yield SimpleNamespace(url=url, client=client, model_id=model_id, engine=engine, tok=tok, template=template,
                              path=smollm2_gguf)
    engine.stop()
    warmup.finish()


def _post(srv, path, body, key=KEY, raw=False):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    kw = {"content": body} if raw else {"json": body}
    return httpx.post(srv.url + path, headers=headers, timeout=300, **kw)


def _chat(srv, stream=False, **kw):
    kw.setdefault("messages", [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}])
    return srv.client.chat.completions.create(model=srv.model_id, stream=stream, **kw)


def _stream_chat(srv, **kw):
    """(pieces, finish_reason, usage) of a streamed chat completion."""
    pieces, finish, usage = [], None, None
    for ch in _chat(srv, stream=True, stream_options={"include_usage": True}, **kw):
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            if c.delta.content:
                pieces.append(c.delta.content)
            if c.finish_reason:
                finish = c.finish_reason
    return pieces, finish, usage


def _prompt_ids(srv, messages):
    from ggq.runtime.chat import tokenize_rendered

    return tokenize_rendered(srv.tok, srv.template.render(messages))


# ---------------------------------------------------------------------------- stop strings (no model)

@pytest.mark.parametrize("pieces,stops,released,found", [
    (["Hel", "lo W", "orld"], ["o W"], "Hell", True),         # spans two pieces
    (["a", "b", "c", "d"], ["bcd"], "a", True),                # spans three
    (["ab", "c", "x"], ["abd"], "abcx", False),                # a false start is released
    (["xy", "z"], ["never", "yz"], "x", True),                 # the first stop string found wins
    (["héllo", " wörld"], [], "héllo wörld", False),
])
def test_stop_matcher(pieces, stops, released, found):
    from ggq.serve.engine import _StopMatcher

    m, out, hit = _StopMatcher(stops), [], False
    for p in pieces:
        text, hit = m.push(p)
        out.append(text)
        if hit:
            break
    if not hit:
        out.append(m.flush())
    assert "".join(out) == released and hit == found


# ---------------------------------------------------------------------------- generation

def test_models_and_health(srv):
    models = srv.client.models.list()
    assert [m.id for m in models.data] == [srv.model_id]
    assert srv.client.models.retrieve(srv.model_id).id == srv.model_id
    r = httpx.get(srv.url + "/health")  # no key needed
    assert r.status_code == 200 and r.json() == {"status": "ok", "slots_idle": 1, "slots_processing": 0}


def test_chat_non_streaming_text_and_usage(srv):
    r = _chat(srv, temperature=0, max_tokens=24)
    c = r.choices[0]
    assert c.message.role == "assistant" and "Paris" in c.message.content
    assert c.finish_reason in ("stop", "length")
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    assert r.usage.prompt_tokens == len(_prompt_ids(srv, msgs))
    assert 0 < r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model == srv.model_id and r.object == "chat.completion"


def test_completion_non_streaming(srv):
    r = srv.client.completions.create(model=srv.model_id, prompt="The capital of France is", max_tokens=4,
                                      temperature=0)
    assert r.choices[0].text.startswith(" Paris"), r.choices[0].text
    assert r.usage.prompt_tokens == len(srv.tok.encode("The capital of France is", True, True))
    assert r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("sampling", [dict(temperature=0),
                                      dict(temperature=0.8, seed=1234, extra_body={"cache_prompt": False})],
                         ids=["greedy", "seeded"])
def test_streaming_equals_non_streaming(srv, sampling):
    full = _chat(srv, max_tokens=32, **sampling)
    pieces, finish, usage = _stream_chat(srv, max_tokens=32, **sampling)
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert (usage.prompt_tokens, usage.completion_tokens) == (full.usage.prompt_tokens, full.usage.completion_tokens)
    assert len(pieces) > 1  # streamed as it was produced, not in one piece


def test_streaming_completion_equals_non_streaming(srv):
    kw = dict(model=srv.model_id, prompt="Once upon a time", max_tokens=20, temperature=0)
    full = srv.client.completions.create(**kw)
    text = "".join(ch.choices[0].text for ch in srv.client.completions.create(stream=True, **kw) if ch.choices)
    assert text == full.choices[0].text and full.usage.completion_tokens == 20


def test_seed_reproduces_and_llama_cpp_fields_apply(srv):
    # cache_prompt false: each prompt evaluated whole (one evaluated partly from the cache has other
    # last digits in its logits, which sampling at a high temperature can tell apart)
    a, b, c = (_chat(srv, temperature=1.5, seed=s, max_tokens=24, extra_body={"cache_prompt": False})
               for s in (7, 7, 8))
    assert a.choices[0].message.content == b.choices[0].message.content != c.choices[0].message.content
    greedy = _chat(srv, temperature=0, max_tokens=24)
    top1 = _chat(srv, temperature=1.0, seed=9, max_tokens=24, extra_body={"top_k": 1})
    assert top1.choices[0].message.content == greedy.choices[0].message.content


def test_stop_strings_across_token_boundaries(srv):
    """A stop string made of the end of one streamed token and the start of the next: the text
    ends right before it, with finish_reason "stop", streamed or not."""
    msgs = [{"role": "user", "content": "Write a short story about a cat."}]
    pieces, _, _ = _stream_chat(srv, messages=msgs, temperature=0, max_tokens=40)
    text = "".join(pieces)
    i = next(i for i in range(3, len(pieces) - 1) if len(pieces[i].strip()) >= 2 and len(pieces[i + 1]) >= 2)
    stop = pieces[i][-2:] + pieces[i + 1][:2]
    expect = text[:text.find(stop)]
    r = _chat(srv, messages=msgs, temperature=0, max_tokens=40, stop=["never appears", stop])
    assert r.choices[0].message.content == expect and r.choices[0].finish_reason == "stop"
    assert stop not in r.choices[0].message.content
    spieces, finish, _ = _stream_chat(srv, messages=msgs, temperature=0, max_tokens=40, stop=stop)
    assert "".join(spieces) == expect and finish == "stop"
    c = srv.client.completions.create(model=srv.model_id, prompt="The capital of France is", max_tokens=8,
                                      temperature=0, stop=" Pa")
    assert c.choices[0].text == "" and c.choices[0].finish_reason == "stop"


def test_max_tokens_gives_length(srv):
    msgs = [{"role": "user", "content": "Write a long story about a dragon."}]
    r = _chat(srv, messages=msgs, temperature=0, max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    r = _chat(srv, messages=msgs, temperature=0, max_completion_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_prefix_reuse(srv):
    """The second turn evaluates only what follows the first turn's prompt; cache_prompt false
    evaluates the whole prompt."""
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Name a color."}]
    a = _chat(srv, messages=msgs, temperature=0, max_tokens=8)
    msgs2 = msgs + [{"role": "assistant", "content": a.choices[0].message.content},
                    {"role": "user", "content": "Another one?"}]
    b = _chat(srv, messages=msgs2, temperature=0, max_tokens=8)
    cached = b.usage.prompt_tokens_details.cached_tokens
    assert cached >= a.usage.prompt_tokens - 1 and cached < b.usage.prompt_tokens
    c = _chat(srv, messages=msgs2, temperature=0, max_tokens=8, extra_body={"cache_prompt": False})
    assert c.usage.prompt_tokens_details.cached_tokens == 0
    assert c.choices[0].message.content == b.choices[0].message.content


def test_same_text_as_ggq_generate_chat(srv, tmp_path):
    """Independent path: ``ggq generate --chat`` (ChatSession) in another process, same file and context."""
    env = dict(os.environ, GGQ_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "ggq.cli", "generate", str(srv.path), "--chat", "--temp", "0", "-n", "24",
           "-c", str(N_CTX), "--system", SYSTEM, "-p", QUESTION]
    ref = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert ref.returncode == 0, ref.stderr
    r = _chat(srv, temperature=0, max_tokens=24)
    assert r.choices[0].message.content == ref.stdout[:-1]  # generate ends with a newline


def test_stream_disconnect_cancels_generation(srv):
    body = {"model": srv.model_id, "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", srv.url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=300) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["object"] == "text_completion"
    slot = srv.engine.slots[0]
    deadline = time.monotonic() + 60
    while slot.busy and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not slot.busy and slot.res.finish_reason == "cancelled" and slot.res.n_gen < 400
    r = srv.client.completions.create(model=srv.model_id, prompt="Hello", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens == 2


# ---------------------------------------------------------------------------- tokenize / detokenize

TEXTS = ["Hello world", "  leading spaces and\ttabs\nnewlines", "héllo wörld, naïve café 你好 🙂 😀!",
         "<|im_start|>user\nhi<|im_end|>", "1234567 + 89 = ?"]


def test_tokenize_round_trip_matches_ggq_tokenizer(srv):
    for text in TEXTS:
        ids = _post(srv, "/tokenize", {"content": text}).json()["tokens"]
        assert ids == srv.tok.encode(text, add_special=False, parse_special=True)
        assert _post(srv, "/detokenize", {"tokens": ids}).json() == {"content": text}
    r = _post(srv, "/tokenize", {"content": "héllo", "with_pieces": True}).json()["tokens"]
    assert "".join(p["piece"] for p in r) == "héllo" and all(isinstance(p["id"], int) for p in r)


def test_tokenize_matches_hf_tokenizers(srv, smollm2_hf):
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer.from_file(str(smollm2_hf / "tokenizer.json"))
    for text in TEXTS:
        ids = _post(srv, "/tokenize", {"content": text}).json()["tokens"]
        assert ids == hf.encode(text, add_special_tokens=False).ids
        assert _post(srv, "/detokenize", {"tokens": ids}).json()["content"] == hf.decode(ids, skip_special_tokens=False)


# ---------------------------------------------------------------------------- errors

def test_api_key(srv):
    bad = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    for key in (None, "wrong"):
        r = _post(srv, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert _post(srv, "/tokenize", {"content": "x"}, key=None).status_code == 401


LONG = "word " * (N_CTX + 10)
BAD = [
    ("/v1/chat/completions", b'{"messages": [', 400, None),
    ("/v1/chat/completions", b"", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}], "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": -3}, 400,
     "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 2}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": 3}, 400, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
     400, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "yaml"}}, 400, "response_format.type"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_schema"}}, 400, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "florp"}}}}, 400, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}}, 400,
     "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}}, 400,
     "response_format.json_schema.schema"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, 400,
     "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function",
                                                                           "function": {"name": "g"}}}, 400,
     "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "florp"}}}], "tool_choice": "required"},
     400, "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"abc": 1}}, 400,
     "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": 101}}, 400,
     "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"999999": 1}}, 400,
     "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, 400,
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                              "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/completions", {"prompt": "hi", "logprobs": -1}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": LONG}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "echo": True}, 400, "echo"),
    ("/v1/embeddings", {"input": ""}, 400, "input"),
    ("/v1/embeddings", {"input": []}, 400, "input"),
    ("/v1/embeddings", {"input": [[]]}, 400, "input"),
    ("/v1/embeddings", {"input": [5, 10**9]}, 400, "input"),
    ("/v1/embeddings", {"input": LONG}, 400, "input"),
    ("/v1/embeddings", {"input": "hi", "dimensions": 7}, 400, "dimensions"),
    ("/v1/embeddings", {"input": "hi", "encoding_format": "int8"}, 400, "encoding_format"),
    ("/v1/embeddings", {"input": 5}, 400, "input"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/tokenize", {"content": 5}, 400, "content"),
    ("/v1/nothing", {}, 404, None),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_openai_errors(srv, path, body, status, param):
    r = _post(srv, path, body, raw=isinstance(body, bytes))
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


def test_bad_requests_through_the_client_and_server_survives(srv):
    with pytest.raises(openai.BadRequestError):
        _chat(srv, max_tokens=0)
    with pytest.raises(openai.NotFoundError):
        srv.client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert _chat(srv, temperature=0, max_tokens=2).usage.completion_tokens == 2


def test_cli_refuses_bad_options(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for args, msg in ((["--parallel", "0"], "--parallel 0"), (["--port", "70000"], "--port 70000"),
                      (["--queue-size", "-1"], "--queue-size -1")):
        r = subprocess.run([sys.executable, "-m", "ggq.cli", "serve", str(tmp_path / "x.gguf"), *args],
                           capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 1 and msg in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "ggq.cli", "serve", str(tmp_path / "missing.gguf")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("ggq: error:") and "Traceback" not in r.stderr, r.stderr


# ---------------------------------------------------------------------------- constrained output (llguidance)

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "city": {"type": "string", "enum": ["Paris", "London", "Rome"]},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3}},
          "required": ["name", "age", "city", "tags"], "additionalProperties": False}
PERSON_MSGS = [{"role": "user", "content": "Invent a person who lives in Paris. Answer in JSON."}]


def _text(srv, stream, **kw):
    """(text, finish_reason) of a chat completion, streamed or not."""
    if stream:
        pieces, finish, _ = _stream_chat(srv, **kw)
        return "".join(pieces), finish
    r = _chat(srv, **kw)
    return r.choices[0].message.content, r.choices[0].finish_reason


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=3)], ids=["greedy", "seeded"])
def test_json_schema_output_validates(srv, stream, sampling):
    jsonschema = pytest.importorskip("jsonschema")
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    text, finish = _text(srv, stream, messages=PERSON_MSGS, response_format=rf, max_tokens=200, **sampling)
    assert finish == "stop", text
    jsonschema.validate(json.loads(text), PERSON)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_json_object_output_parses(srv, stream):
    msgs = [{"role": "user", "content": "Give the capital of France as a JSON object."}]
    text, finish = _text(srv, stream, messages=msgs, response_format={"type": "json_object"}, max_tokens=200,
                         temperature=0)
    assert finish == "stop", text
    assert isinstance(json.loads(text), dict)


def test_unconstrained_reply_does_not_validate(srv):
    """The reference: without response_format the same request does not give a valid person (SmolLM2
    answers with JSON lacking most fields), so the grammar did the work."""
    jsonschema = pytest.importorskip("jsonschema")
    text, _ = _text(srv, False, messages=PERSON_MSGS, max_tokens=60, temperature=0)
    try:
        obj = json.loads(text)
    except ValueError:
        return
    assert not jsonschema.Draft202012Validator(PERSON).is_valid(obj), text


def test_llguidance_vocabulary_matches_the_tokenizer(srv):
    """The byte strings handed to llguidance decode like ggq's tokenizer, special tokens marked."""
    from ggq.serve.constrain import Grammars, token_bytes

    tb = token_bytes(srv.tok)
    ids = srv.tok.encode("héllo wörld {\"a\": [1, 2]} 你好", add_special=False)
    assert b"".join(tb[i] for i in ids).decode() == "héllo wörld {\"a\": [1, 2]} 你好"
    assert tb[srv.tok.token_to_id["<|im_end|>"]] == b"\xff<|im_end|>"
    lt = Grammars(srv.tok).lltok
    assert lt.vocab_size == srv.tok.n_vocab and set(lt.eos_tokens) == srv.tok.eog_ids
    assert lt.tokenize_str("Hello world") == srv.tok.encode("Hello world", add_special=False)


# ---------------------------------------------------------------------------- tools

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 30},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Get the local time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 30}},
                   "required": ["zone"], "additionalProperties": False}}}
WEATHER_MSGS = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"],
                         ids=["named", "required"])
def test_tool_choice_gives_a_parsed_tool_call(srv, choice):
    jsonschema = pytest.importorskip("jsonschema")
    r = _chat(srv, messages=WEATHER_MSGS, tools=[TIME, WEATHER], tool_choice=choice, temperature=0, max_tokens=120)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.tool_calls, c.message
    call = c.message.tool_calls[0]
    fn = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"]
    if isinstance(choice, dict):
        assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), fn["parameters"])
    assert call.type == "function" and call.id

    # the result goes back as a tool message; the template renders the history, the model answers
    history = WEATHER_MSGS + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                             "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
    r2 = _chat(srv, messages=history, tools=[TIME, WEATHER], temperature=0, max_tokens=24)
    assert r2.choices[0].message.content or r2.choices[0].message.tool_calls


def test_tool_call_streamed(srv):
    chunks = list(_chat(srv, stream=True, messages=WEATHER_MSGS, tools=[WEATHER], temperature=0, max_tokens=120,
                        tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    calls = [tc for ch in chunks for c in ch.choices for tc in (c.delta.tool_calls or [])]
    finish = [c.finish_reason for ch in chunks for c in ch.choices if c.finish_reason]
    assert finish == ["tool_calls"] and len(calls) == 1 and calls[0].function.name == "get_weather"
    assert set(json.loads(calls[0].function.arguments)) == {"city", "unit"}


def test_tools_reach_the_prompt(srv):
    """SmolLM2's template does not render tools: they go into a system message (hermes syntax)."""
    from ggq.serve import tools as tc

    fmt = tc.detect(srv.template.source)
    assert (fmt.name, fmt.native) == ("hermes", False)
    msgs, tools_arg = tc.prepare([{"role": "system", "content": SYSTEM}] + WEATHER_MSGS, [WEATHER], fmt)
    text = srv.template.render(msgs, tools=tools_arg)
    assert SYSTEM in text and "<tools>" in text and '"name": "get_weather"' in text and "<tool_call>" in text


@pytest.mark.parametrize("fmt,text,content,calls", [
    ("hermes", 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>', "Sure.", [("f", {"x": 1})]),
    ("hermes", '<tool_call>{"name": "f", "arguments": {}}</tool_call><tool_call>{"name": "g", "arguments": '
               '{"y": "z"}}</tool_call>', None, [("f", {}), ("g", {"y": "z"})]),
    ("hermes", "no call here", "no call here", []),
    ("hermes", "<tool_call>{broken</tool_call>", "<tool_call>{broken</tool_call>", []),
    ("llama3", '<|python_tag|>{"name": "f", "parameters": {"x": [1, 2]}}', None, [("f", {"x": [1, 2]})]),
    ("llama3", '{"name": "f", "parameters": {}}', None, [("f", {})]),
    ("llama3", "The answer is 4.", "The answer is 4.", []),
    ("mistral", '[TOOL_CALLS][{"name": "f", "arguments": {"a": "b"}}, {"name": "g", "arguments": {}}]', None,
     [("f", {"a": "b"}), ("g", {})]),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"a": 1}', None, [("f", {"a": 1})]),
])
def test_tool_call_syntaxes_parse(fmt, text, content, calls):
    from ggq.serve import tools as tc

    got_content, got = tc.parse(text, tc.ToolFormat(fmt, True))
    assert got_content == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == calls
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in got)


def test_native_tool_template_gets_tools_and_history():
    """A template that renders tools (a ChatML one in Qwen 2.5's manner) gets OpenAI's tools list,
    assistant tool_calls with arguments as objects, and tool messages."""
    from ggq.runtime.chat import ChatTemplate
    from ggq.serve import tools as tc

    src = ("{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>\n{% endif %}"
           "{% for m in messages %}<{{ m.role }}>{{ m.content or '' }}"
           "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} {{ c.function.arguments | tojson }}"
           "</tool_call>{% endfor %}</{{ m.role }}>\n{% endfor %}")
    fmt = tc.detect(src)
    assert (fmt.name, fmt.native) == ("hermes", True)
    msgs = WEATHER_MSGS + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "1", "content": "sunny"}]
    m, tools_arg = tc.prepare(msgs, [WEATHER], fmt)
    text = ChatTemplate(src).render(m, tools=tools_arg)
    assert "<tools>get_weather;</tools>" in text
    assert '<tool_call>get_weather {"city": "Paris"}</tool_call>' in text and "<tool>sunny</tool>" in text


# ---------------------------------------------------------------------------- logprobs, logit_bias

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def ref_model(srv):
    """A second Model over the same file (f16 cache, as the server's), run from the test thread
    while the server is idle."""
    from ggq.runtime.model import Model

    return Model.load(str(srv.path), N_CTX, None, "f16")


@pytest.fixture(scope="module")
def ref_logits(srv, ref_model):
    """numpy log-softmax of ``Model.eval`` on PROMPT."""
    import numpy as np

    ids = srv.tok.encode(PROMPT, True, True)
    ref_model.reset()
    x = ref_model.eval(ids).astype(np.float64)
    ref_model.reset()
    return ids, x - (x.max() + np.log(np.exp(x - x.max()).sum()))


def test_completion_logprobs_equal_numpy_log_softmax(srv, ref_logits):
    import numpy as np

    ids, lp = ref_logits
    r = srv.client.completions.create(model=srv.model_id, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=5,
                                      extra_body={"cache_prompt": False})
    got = r.choices[0].logprobs
    assert len(got.tokens) == 3 and "".join(got.tokens) == r.choices[0].text
    best = int(np.argmax(lp))
    assert got.tokens[0] == srv.tok.decode([best]) and got.token_logprobs[0] == pytest.approx(lp[best], abs=1e-4)
    top = sorted(range(len(lp)), key=lambda i: -lp[i])[:5]
    assert list(got.top_logprobs[0].values()) == pytest.approx([lp[i] for i in top], abs=1e-4)
    assert list(got.top_logprobs[0]) == [srv.tok.decode([i]) for i in top]
    assert got.text_offset[:2] == [0, len(got.tokens[0])]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_chat_logprobs(srv, stream):
    kw = dict(temperature=0, max_tokens=12, logprobs=True, top_logprobs=3)
    if stream:
        content, text = [], []
        for ch in _chat(srv, stream=True, **kw):
            for c in ch.choices:
                text.append(c.delta.content or "")
                content.extend(c.logprobs.content if c.logprobs and c.logprobs.content else [])
        text = "".join(text)
    else:
        r = _chat(srv, **kw)
        content, text = r.choices[0].logprobs.content, r.choices[0].message.content
        assert len(content) == r.usage.completion_tokens
    assert 0 < len(content) <= 12 and "".join(t.token for t in content) == text
    for t in content:  # greedy: each token is the most likely one
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob) and t.logprob <= 0
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token


def test_logit_bias_bans_the_greedy_token(srv, ref_logits):
    import numpy as np

    _, lp = ref_logits
    best = int(np.argmax(lp))
    kw = dict(model=srv.model_id, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0)
    plain = srv.client.completions.create(**kw)
    banned = srv.client.completions.create(logit_bias={str(best): -100}, **kw)
    assert plain.choices[0].logprobs.tokens[0] == srv.tok.decode([best])
    second = int(np.argsort(-lp)[1])
    assert banned.choices[0].logprobs.tokens[0] == srv.tok.decode([second])
    assert banned.choices[0].text != plain.choices[0].text
    # logprobs are the model's, before the bias (as llama.cpp's server reports them)
    assert banned.choices[0].logprobs.token_logprobs[0] == pytest.approx(lp[second], abs=1e-4)
    forced = srv.client.completions.create(logit_bias={"2717": 100}, **kw)
    assert forced.choices[0].logprobs.tokens[0] == srv.tok.decode([2717])


# ---------------------------------------------------------------------------- embeddings

EMB_TEXTS = ["The cat sat on the mat.", "Paris is the capital of France.", "The cat sat on the mat."]


def test_embeddings_shape_norm_and_determinism(srv):
    import numpy as np

    r = srv.client.embeddings.create(model=srv.model_id, input=EMB_TEXTS)  # the client asks for base64
    e = np.array([d.embedding for d in r.data], dtype=np.float32)
    assert e.shape == (3, srv.engine.model.n_embd) and [d.index for d in r.data] == [0, 1, 2]
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(e[0], e[2]) and not np.allclose(e[0], e[1])
    assert r.usage.prompt_tokens == sum(len(srv.tok.encode(t, True, True)) for t in EMB_TEXTS)
    floats = _post(srv, "/v1/embeddings", {"input": EMB_TEXTS[1], "encoding_format": "float"}).json()
    assert np.allclose(floats["data"][0]["embedding"], e[1], atol=1e-6)
    ids = srv.tok.encode(EMB_TEXTS[1], True, True)
    by_ids = srv.client.embeddings.create(model=srv.model_id, input=[ids])
    assert np.allclose(by_ids.data[0].embedding, e[1], atol=1e-6)
    # generation still works after an embedding and reuses its cached prefix correctly
    assert _chat(srv, temperature=0, max_tokens=2).usage.completion_tokens == 2


def test_embeddings_against_numpy_reference(srv, ref_model):
    """The pooled vector is numpy's mean + L2 norm of ``Model.embed``'s hidden states, and those
    hidden states times the file's output matrix (SmolLM2 ties it to token_embd, dequantized by
    gguf-py) give ``Model.eval``'s logits, up to the kernels' int8 activation rounding."""
    import numpy as np
    from gguf import GGUFReader
    from gguf.quants import dequantize

    ids = srv.tok.encode(EMB_TEXTS[1], True, True)
    ref_model.reset()
    h = ref_model.embed(ids)
    ref_model.reset()
    logits = ref_model.eval(ids, all_logits=True)
    ref_model.reset()
    v = h.astype(np.float64).mean(axis=0)
    v /= np.linalg.norm(v)
    got = srv.client.embeddings.create(model=srv.model_id, input=EMB_TEXTS[1]).data[0].embedding
    assert np.allclose(got, v, atol=1e-5)
    t = next(t for t in GGUFReader(srv.path).tensors if t.name == "token_embd.weight")
    w = dequantize(t.data, t.tensor_type).reshape(-1, h.shape[1])
    ref = h @ w.T
    assert np.corrcoef(ref.ravel(), logits.ravel())[0, 1] > 0.999
    assert np.abs(ref - logits).max() < 0.03 * np.abs(logits).max()
    assert (ref.argmax(axis=1) == logits.argmax(axis=1)).all()


# ---------------------------------------------------------------------------- /metrics

def _scrape(srv) -> dict:
    """{(sample name, frozenset(labels)): value} from /metrics, parsed by prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    r = httpx.get(srv.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def test_metrics(srv):
    ok = ("ggq_requests_total", frozenset({"endpoint": "/v1/completions", "status": "200"}.items()))
    bad = ("ggq_requests_total", frozenset({"endpoint": "/v1/completions", "status": "400"}.items()))
    m0 = _scrape(srv)
    r = srv.client.completions.create(model=srv.model_id, prompt="Once upon a time", max_tokens=5, temperature=0,
                                      extra_body={"cache_prompt": False})
    assert _post(srv, "/v1/completions", {"prompt": ""}).status_code == 400
    deadline = time.monotonic() + 5  # the middleware counts a response after sending it
    while True:
        m1 = _scrape(srv)
        if m1.get(ok, 0) - m0.get(ok, 0) >= 1 and m1.get(bad, 0) - m0.get(bad, 0) >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)

    def d(name):
        key = (name, frozenset())
        return m1[key] - m0.get(key, 0)

    assert m1[ok] - m0.get(ok, 0) == 1 and m1[bad] - m0.get(bad, 0) == 1
    assert d("ggq_generated_tokens_total") == r.usage.completion_tokens == 5
    assert d("ggq_prompt_tokens_total") == r.usage.prompt_tokens
    assert d("ggq_prompt_seconds_total") > 0 and d("ggq_generation_seconds_total") > 0
    g = {k[0]: v for k, v in m1.items() if not k[1]}
    assert g["ggq_generated_tokens_per_second"] > 0 and g["ggq_prompt_tokens_per_second"] > 0
    assert (g["ggq_queue_depth"], g["ggq_slots_busy"], g["ggq_slots_total"]) == (0, 0, 1)
    assert httpx.get(srv.url + "/metrics", timeout=60).status_code == 401  # behind the API key, as the API


# ---------------------------------------------------------------------------- the chat page (headless Chromium)

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def page(srv):
    """The chat page at / in headless Chromium (Debian's package) driven by Playwright."""
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        pg = browser.new_page()
        pg.goto(srv.url + "/")
        pg.fill("#apikey", KEY)
        pg.dispatch_event("#apikey", "change")
        yield pg
        browser.close()


def _assistant(page, i):
    return page.locator(".msg.assistant").nth(i)


def test_chat_page_streams_a_reply(srv, page):
    assert httpx.get(srv.url + "/").status_code == 200  # the page needs no key; the API does
    page.click("#reset")
    page.fill("#system", SYSTEM)
    page.fill("#temperature", "0")
    page.fill("#input", QUESTION)
    page.click("#send")
    out = _assistant(page, 0)
    seen = set()  # the text as it grew: streamed, not delivered in one piece
    deadline = time.monotonic() + 300
    while out.get_attribute("data-finish") is None:
        seen.add(out.text_content())
        assert time.monotonic() < deadline
        time.sleep(0.02)
    text = out.text_content()
    ref = _chat(srv, temperature=0).choices[0].message.content  # the same conversation through the API
    assert text == ref and "Paris" in text
    assert out.get_attribute("data-finish") in ("stop", "length")
    assert len({s for s in seen if s and s != text}) >= 1
    assert page.locator(".msg.user").first.text_content() == QUESTION
    assert page.is_disabled("#stop") and page.is_enabled("#send")


def test_chat_page_stop_button(srv, page):
    page.click("#reset")
    page.fill("#temperature", "0")
    page.fill("#input", "Write a very long story about a dragon who learns to cook.")
    page.click("#send")
    out = _assistant(page, 0)
    page.wait_for_function("document.querySelector('.msg.assistant').textContent.length > 10", timeout=300_000)
    page.click("#stop")
    page.wait_for_function("document.querySelector('.msg.assistant').dataset.finish === 'stopped'", timeout=60_000)
    slot = srv.engine.slots[0]
    deadline = time.monotonic() + 60
    while slot.busy and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not slot.busy and slot.res.finish_reason == "cancelled"
    assert page.is_enabled("#send") and out.text_content()


@pytest.mark.parametrize("fmt,pieces,streamed,calls", [
    ("hermes", ["Let me ", "check. <tool", "_call>\n{\"name\": \"f\", ", "\"arguments\": {}}\n</tool_call>"],
     "Let me check. ", ["f"]),
    ("hermes", ["a <", "b> <tool", "x"], "a <b> <toolx", []),             # a false start of the marker is text
    ("llama3", ["  ", "{\"name\": \"f\", \"parameters\": ", "{\"x\": 1}}"], "", ["f"]),
    ("llama3", ["The answer", " is 4."], "The answer is 4.", []),
    ("llama3", ["{not json"], "", []),                                    # held, then sent as content at the end
    ("mistral", ["Sure", "[TOOL_", "CALLS][{\"name\": \"g\", \"arguments\": {}}]"], "Sure", ["g"]),
])
def test_call_stream_holds_only_calls(fmt, pieces, streamed, calls):
    from ggq.serve import tools as tc

    cs = tc.CallStream(tc.ToolFormat(fmt, True))
    sent = "".join(cs.push(p) for p in pieces)
    content, got = cs.finish()
    assert sent == streamed and [c["function"]["name"] for c in got] == calls
    if not calls:  # nothing lost: what was held comes back as content
        assert sent + (content or "") == "".join(pieces)


def test_tools_auto_streamed_equals_whole(srv):
    """tool_choice auto: the model is free; streamed and whole replies agree (text or calls)."""
    kw = dict(messages=WEATHER_MSGS, tools=[WEATHER], temperature=0, max_tokens=80)
    whole = _chat(srv, **kw).choices[0]
    chunks = list(_chat(srv, stream=True, **kw))
    text = "".join(c.delta.content or "" for ch in chunks for c in ch.choices)
    calls = [tc for ch in chunks for c in ch.choices for tc in (c.delta.tool_calls or [])]
    assert text == (whole.message.content or "")
    assert [(c.function.name, c.function.arguments) for c in calls] == \
        [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
