"""The OpenAI-compatible HTTP API of ``ggq serve`` (FastAPI), its request models (pydantic) and
:func:`serve`, which loads a model and runs the app under uvicorn.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both also as server-sent events
with ``"stream": true``; ``response_format`` and forced tool calls constrained by llguidance,
``tools``, ``logprobs``, ``logit_bias``), ``POST /v1/embeddings``, ``GET /v1/models``,
``GET /v1/models/{id}``, ``GET /health``, ``GET /metrics`` (Prometheus), llama.cpp server's
``POST /tokenize`` and ``POST /detokenize``, and a chat page at ``/``.

Every error is OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``: 400 for a
bad request (malformed JSON, wrong types, values out of range, a prompt longer than the context,
options not supported yet), 401 for a wrong or missing API key, 404 for an unknown model or path,
500 if generation itself fails. Request bodies are parsed with pydantic in strict mode (no
``"5"`` for 5); unknown fields are ignored, as llama.cpp's server does.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import sys
import threading
import time
import uuid
from typing import Literal, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ggq.errors import GGQError, one_line
from ggq.runtime.chat import ChatTemplate, tokenize_rendered
from ggq.runtime.sampler import SamplerParams
from ggq.runtime.tokenizer import Tokenizer
from ggq.serve import tools as toolcalls
from ggq.serve.constrain import Grammars
from ggq.serve.engine import EmbedRequest, Engine, GenRequest, GenResult, QueueFull, TokenLogprob

log = logging.getLogger("ggq.serve")


# ---------------------------------------------------------------------------- errors

class APIError(Exception):
    """An error answered as OpenAI's JSON error object with HTTP ``status``."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "tuple"}


def _validation_error(e: ValidationError) -> APIError:
    """The first problem pydantic found, as a 400 naming the field (``messages.0.content``)."""
    err = e.errors(include_url=False)[0]
    if err.get("type") == "json_invalid":
        detail = str(err.get("msg", "")).removeprefix("Invalid JSON: ")
        return APIError(f"the request body is not valid JSON: {detail}", code="invalid_json")
    loc = []
    for x in err.get("loc", ()):  # field names and list indices; stop at pydantic's union tags (``list[str]``)
        if isinstance(x, int) or (isinstance(x, str) and x.isidentifier() and x not in _TYPE_TAGS):
            loc.append(str(x))
        else:
            break
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid value")
    if err.get("type") == "model_type":
        msg = "the request body must be a JSON object"
    return APIError(f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


# ---------------------------------------------------------------------------- request models

class _Strict(BaseModel):
    """Strict types (``"5"`` is not a number), no NaN or infinity, unknown fields ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class SamplingFields(_Strict):
    """The sampling and output fields chat and text completions share (OpenAI's names, plus
    llama.cpp's ``top_k``, ``min_p``, ``repeat_penalty``, ``repeat_last_n``, ``cache_prompt``). Absent fields take
    llama.cpp's defaults (:class:`SamplerParams`)."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = None
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repeat_penalty: float | None = Field(None, gt=0)
    repeat_last_n: int | None = Field(None, ge=-1)
    n: int | None = Field(None, ge=1)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> -100..100
    cache_prompt: bool = True
    user: str | None = None  # accepted, unused

    def sampler_params(self) -> SamplerParams:
        """The request's :class:`SamplerParams` (llama.cpp's defaults for absent fields)."""
        p = SamplerParams()
        for ours, theirs in (("temp", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"), ("min_p", "min_p"),
                             ("presence_penalty", "presence_penalty"), ("frequency_penalty", "frequency_penalty"),
                             ("repeat_penalty", "repeat_penalty"), ("repeat_last_n", "repeat_last_n")):
            v = getattr(self, theirs)
            if v is not None:
                setattr(p, ours, v)
        p.seed = self.seed if self.seed is not None and self.seed >= 0 else None
        return p

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def check_supported(self) -> None:
        """400 for fields whose meaning this server cannot honour yet."""
        if self.n not in (None, 1):
            raise APIError("n: only one choice per request is supported", param="n", code="unsupported_value")

    def bias_map(self, n_vocab: int) -> dict[int, float]:
        """``logit_bias`` as token id -> value added to the logit; -100 bans the token (``-inf``),
        as OpenAI documents. 400 for a key that is not a token id or a value outside -100..100."""
        out: dict[int, float] = {}
        for k, v in (self.logit_bias or {}).items():
            if not (k.isascii() and k.isdigit() and int(k) < n_vocab):
                raise APIError(f"logit_bias: {one_line(k, 40)!r} is not a token id (0 .. {n_vocab - 1})",
                               param="logit_bias", code="invalid_value")
            if not -100 <= v <= 100:
                raise APIError(f"logit_bias: the value for {k} must be between -100 and 100", param="logit_bias",
                               code="invalid_value")
            out[int(k)] = float("-inf") if v <= -100 else float(v)
        return out


class ContentPart(_Strict):
    type: str
    text: str | None = None


class FunctionCall(_Strict):
    name: str
    arguments: str = "{}"


class ToolCall(_Strict):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None  # accepted; passed to the template for tool messages
    tool_calls: list[ToolCall] | None = None  # assistant messages
    tool_call_id: str | None = None  # tool messages


class JSONSchemaFormat(_Strict):
    name: str | None = None
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None  # accepted: the schema is always enforced


class ResponseFormat(_Strict):
    """OpenAI's ``response_format``: ``text``, ``json_object`` (any JSON object) or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None
    #: llama.cpp's shorthand: ``{"type": "json_object", "schema": {...}}``
    schema_: dict | None = Field(None, alias="schema")

    def target_schema(self) -> dict | None:
        """The JSON schema the reply must follow (None for ``text``)."""
        if self.type == "text":
            return None
        if self.type == "json_schema":
            if self.json_schema is None:
                raise APIError("response_format.json_schema: needed with type json_schema",
                               param="response_format", code="invalid_value")
            return self.json_schema.schema_ if self.json_schema.schema_ is not None else {}
        return self.schema_ if self.schema_ is not None else {"type": "object"}


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], dict, None] = None
    response_format: ResponseFormat | None = None
    parallel_tool_calls: bool | None = None  # accepted; a constrained call is always one call

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError("top_logprobs: needs logprobs: true", param="top_logprobs", code="invalid_value")
        if not self.messages:
            raise APIError("messages: at least one message is needed", param="messages", code="invalid_value")

    def n_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def forced_functions(self, functions: list[dict]) -> list[dict] | None:
        """The functions ``tool_choice`` forces one call to (``required``: any of them; a named
        function: that one), None if the model is free. 400 for a choice naming no tool."""
        choice = self.tool_choice
        if choice is None or choice in ("none", "auto"):
            return None
        if not functions:
            raise APIError("tool_choice: no tools given", param="tool_choice", code="invalid_value")
        if choice == "required":
            return functions
        fn = choice.get("function") if isinstance(choice, dict) else None
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise APIError('tool_choice: expected "none", "auto", "required" or '
                           '{"type": "function", "function": {"name": ...}}', param="tool_choice", code="invalid_value")
        match = [f for f in functions if f["name"] == name]
        if not match:
            raise APIError(f"tool_choice: no tool named {one_line(name, 80)!r}", param="tool_choice",
                           code="invalid_value")
        return match

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def message_dicts(self) -> list[dict]:
        """``[{"role", "content"}]`` for the chat template: text parts joined, ``developer`` as
        ``system``."""
        out = []
        for i, m in enumerate(self.messages):
            if isinstance(m.content, list):
                texts = []
                for j, part in enumerate(m.content):
                    if part.type != "text" or part.text is None:
                        raise APIError(f"messages.{i}.content.{j}: only text parts are supported",
                                       param=f"messages.{i}.content", code="unsupported_value")
                    texts.append(part.text)
                content = "".join(texts)
            else:
                content = m.content or ""
            d = {"role": "system" if m.role == "developer" else m.role, "content": content}
            if m.tool_calls:
                d["tool_calls"] = [{"id": c.id or f"call_{i}_{j}", "type": "function",
                                    "function": {"name": c.function.name, "arguments": c.function.arguments}}
                                   for j, c in enumerate(m.tool_calls)]
            if m.role == "tool":
                if m.tool_call_id is not None:
                    d["tool_call_id"] = m.tool_call_id
                if m.name is not None:
                    d["name"] = m.name
            out.append(d)
        return out


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``. ``prompt``: text, one text in a list, or token ids."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = Field(None, ge=0, le=20)

    def n_logprobs(self) -> int | None:
        return self.logprobs

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise APIError("echo is not supported yet", param="echo", code="unsupported_value")
        if self.suffix:
            raise APIError("suffix is not supported yet", param="suffix", code="unsupported_value")
        if self.best_of not in (None, 1):
            raise APIError("best_of: only 1 is supported", param="best_of", code="unsupported_value")

    def limit(self) -> int | None:
        return self.max_tokens


class EmbeddingRequest(_Strict):
    """``POST /v1/embeddings``: ``input`` as text, texts, token ids or lists of token ids."""

    input: Union[str, list[str], list[int], list[list[int]]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None  # accepted, unused


class TokenizeRequest(_Strict):
    """``POST /tokenize`` (llama.cpp server): ``content`` -> token ids."""

    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Strict):
    """``POST /detokenize`` (llama.cpp server): token ids -> ``content``."""

    tokens: list[int]


async def _parse(request: Request, cls):
    body = await request.body()
    try:
        return cls.model_validate_json(body)
    except ValidationError as e:
        raise _validation_error(e) from None


# ---------------------------------------------------------------------------- the app

#: paths served without the API key: the health check and the chat page (which asks for the key)
_OPEN = ("/health", "/")


class _LogAndAuth:
    """ASGI middleware: the API key check (``Authorization: Bearer KEY``; ``/health`` and the chat
    page ``/`` are open), one log line per request (method, path, status, prompt+completion tokens,
    seconds) and ``on_response(scope, status)`` after each response (the request counter)."""

    def __init__(self, app, api_key: str | None, on_response=None):
        self.app, self.api_key, self.on_response = app, api_key, on_response

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = [0]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.api_key is not None and scope["path"] not in _OPEN and not self._authorized(scope):
                err = APIError("invalid or missing API key (Authorization: Bearer KEY)", status=401,
                               code="invalid_api_key", type="authentication_error")
                await err.response()(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
            if self.on_response is not None:
                self.on_response(scope, status[0])
            tokens = scope.get("state", {}).get("tokens")
            tok = f" tokens={tokens[0]}+{tokens[1]}" if tokens else ""
            log.info("%s %s %s%s %.2f s", scope.get("method"), scope.get("path"), status[0] or "-", tok,
                     time.perf_counter() - t0)

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                v = value.decode("latin-1")
                return v.startswith("Bearer ") and secrets.compare_digest(v[7:].strip().encode(),
                                                                          self.api_key.encode())
        return False


#: endpoints counted by name in ggq_requests_total (others: "other", so that the label stays bounded)
_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics",
              "/tokenize", "/detokenize", "/")


def _metrics(engine: Engine):
    """``(registry, count_response)``: a prometheus_client registry of this app's metrics and the
    middleware's callback ``count_response(scope, status)``.

    Metrics (all ``ggq_``): ``requests_total{endpoint,status}`` (HTTP responses),
    ``prompt_tokens_total``, ``prompt_tokens_cached_total``, ``generated_tokens_total``,
    ``prompt_seconds_total``, ``generation_seconds_total`` (finished generations),
    ``prompt_tokens_per_second`` and ``generated_tokens_per_second`` (averages over them, as
    llama.cpp's ``prompt_tokens_seconds`` / ``predicted_tokens_seconds``),
    ``embedding_tokens_total``, ``queue_depth`` (requests waiting), ``slots_busy``,
    ``slots_total``."""
    from prometheus_client import CollectorRegistry, Counter
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    registry = CollectorRegistry(auto_describe=True)
    requests = Counter("ggq_requests", "HTTP responses by endpoint and status", ["endpoint", "status"],
                       registry=registry)

    class _Engine:
        def collect(self):
            st = engine.stats
            for name, doc, v in (
                    ("ggq_prompt_tokens", "prompt tokens of finished generations (cached ones included)",
                     st.prompt_tokens),
                    ("ggq_prompt_tokens_cached", "prompt tokens reused from the KV cache", st.prompt_tokens_cached),
                    ("ggq_generated_tokens", "generated tokens", st.generated_tokens),
                    ("ggq_prompt_seconds", "seconds spent evaluating prompts", st.prompt_seconds),
                    ("ggq_generation_seconds", "seconds spent generating", st.generation_seconds),
                    ("ggq_embedding_tokens", "tokens evaluated for embeddings", st.embedding_tokens)):
                yield CounterMetricFamily(name, doc, value=v)
            evaluated = st.prompt_tokens - st.prompt_tokens_cached
            for name, doc, v in (
                    ("ggq_prompt_tokens_per_second", "average prompt evaluation speed",
                     evaluated / st.prompt_seconds if st.prompt_seconds > 0 else 0.0),
                    ("ggq_generated_tokens_per_second", "average generation speed",
                     st.generated_tokens / st.generation_seconds if st.generation_seconds > 0 else 0.0),
                    ("ggq_queue_depth", "requests waiting for a slot", engine.queued()),
                    ("ggq_slots_busy", "slots running a request", engine.busy()),
                    ("ggq_slots_total", "slots (--parallel)", len(engine.slots))):
                yield GaugeMetricFamily(name, doc, value=v)

    registry.register(_Engine())

    def count_response(scope, status: int) -> None:
        path = scope.get("path", "")
        endpoint = path if path in _ENDPOINTS else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
        requests.labels(endpoint, str(status or 0)).inc()

    return registry, count_response


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(res: GenResult) -> dict:
    return {"prompt_tokens": res.n_prompt, "completion_tokens": res.n_gen,
            "total_tokens": res.n_prompt + res.n_gen,
            "prompt_tokens_details": {"cached_tokens": res.n_cached}}


def format_logprobs(lps: list[TokenLogprob], chat: bool, tok: Tokenizer) -> dict:
    """OpenAI's ``logprobs`` object for generated tokens: chat ``{"content": [{"token", "logprob",
    "bytes", "top_logprobs": [...]}]}``, completions ``{"tokens", "token_logprobs", "top_logprobs",
    "text_offset"}``."""
    def piece(i: int) -> tuple[str, list[int]]:
        b = tok.token_to_piece(i, special=True)
        return b.decode("utf-8", errors="replace"), list(b)

    if chat:
        content = []
        for lp in lps:
            text, b = piece(lp.id)
            tops = []
            for i, v in lp.top:
                t, tb = piece(i)
                tops.append({"token": t, "logprob": v, "bytes": tb})
            content.append({"token": text, "logprob": lp.logprob, "bytes": b, "top_logprobs": tops})
        return {"content": content}
    tokens, offsets, off = [], [], 0
    for lp in lps:
        text, _ = piece(lp.id)
        tokens.append(text)
        offsets.append(off)
        off += len(text)
    return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{piece(i)[0]: v for i, v in lp.top} for lp in lps], "text_offset": offsets}


def create_app(engine: Engine, tok: Tokenizer, template: ChatTemplate, model_id: str,
               names: set[str] | None = None, api_key: str | None = None, created: int | None = None,
               grammars: Grammars | None = None) -> FastAPI:
    """The ASGI app over ``engine``. ``model_id``: the id ``/v1/models`` lists; ``names``: other model
    names requests may use (the file name, its stem); ``api_key``: required as a bearer token on
    every endpoint but ``/health`` when set; ``grammars``: the llguidance vocabulary for
    constrained output (built from ``tok`` on first use when None)."""
    app = FastAPI(title="ggq serve", docs_url=None, redoc_url=None, openapi_url=None)
    grammars = grammars or Grammars(tok)
    registry, count_response = _metrics(engine)
    app.add_middleware(_LogAndAuth, api_key=api_key, on_response=count_response)
    accepted = {model_id} | set(names or ())
    created = int(created if created is not None else time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(str(exc.detail), status=exc.status_code, code=code).response()

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception):
        log.exception("internal error")
        return APIError(f"internal error: {type(exc).__name__}", status=500, type="server_error").response()

    def check_model(name: str | None) -> None:
        if name and name not in accepted:
            raise APIError(f"model {one_line(name, 100)!r} is not served here (this server serves {model_id!r})",
                           status=404, param="model", code="model_not_found")

    def submit(job):
        """``engine.submit(job)``; 503 with ``Retry-After`` when the queue is full (every slot busy
        and ``max_queue`` requests waiting)."""
        try:
            return engine.submit(job)
        except QueueFull as e:
            raise APIError(f"the server is busy: {e}; retry later", status=503, type="unavailable_error",
                           code="server_busy", headers={"Retry-After": "1"}) from None

    def check_length(n: int, param: str) -> None:
        if n >= engine.n_ctx:
            raise APIError(f"the prompt is {n} tokens, the context holds {engine.n_ctx} (ggq serve --ctx-size)",
                           param=param, code="context_length_exceeded")

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "ggq",
                "meta": {"n_ctx": engine.n_ctx, "n_vocab": tok.n_vocab}}

    @app.get("/health")
    async def health():
        """200 when the model is ready, with the idle and busy slots (llama.cpp's ``slots_idle``,
        ``slots_processing``); 503 while it loads or compiles (llama.cpp's shape)."""
        if engine.is_ready.is_set():
            busy = engine.busy()
            return {"status": "ok", "slots_idle": len(engine.slots) - busy, "slots_processing": busy}
        return JSONResponse({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}},
                            status_code=503)

    @app.get("/")
    async def chat_page():
        """The chat page: one static HTML file (ggq/serve/static/index.html) that streams replies from
        ``/v1/chat/completions``; it asks for the API key when the server has one."""
        from importlib.resources import files

        page = files("ggq.serve").joinpath("static/index.html").read_bytes()
        return Response(page, media_type="text/html; charset=utf-8")

    @app.get("/metrics")
    async def metrics():
        """Prometheus text exposition (see :func:`_metrics`)."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        check_model(name)
        return model_card()

    @app.post("/tokenize")
    async def tokenize(request: Request):
        req = await _parse(request, TokenizeRequest)
        ids = await run_in_threadpool(tok.encode, req.content, req.add_special, req.parse_special)
        if req.with_pieces:
            return {"tokens": [{"id": i, "piece": tok.token_to_piece(i, special=True).decode("utf-8", "replace")}
                               for i in ids]}
        return {"tokens": ids}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        req = await _parse(request, DetokenizeRequest)
        _check_ids(req.tokens, "tokens")
        return {"content": tok.decode(req.tokens, special=True)}

    def _check_ids(ids: list[int], param: str) -> None:
        bad = next((i for i in ids if not 0 <= i < tok.n_vocab), None)
        if bad is not None:
            raise APIError(f"{param}: token id {bad} is out of range (the vocabulary has {tok.n_vocab})",
                           param=param, code="invalid_value")

    tool_format = toolcalls.detect(template.source)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await _parse(request, ChatCompletionRequest)
        check_model(req.model)
        req.check_supported()
        messages = req.message_dicts()
        try:
            functions = toolcalls.check_tools(req.tools or [])
        except GGQError as e:
            raise APIError(str(e), param="tools", code="invalid_value") from None
        use_tools = bool(functions) and req.tool_choice != "none"
        forced = req.forced_functions(functions) if req.tool_choice != "none" else None
        schema = req.response_format.target_schema() if req.response_format is not None else None
        if forced is not None and schema is not None:
            raise APIError("response_format and a forced tool_choice cannot both constrain the reply",
                           param="response_format", code="invalid_value")
        messages, tools_arg = toolcalls.prepare(messages, req.tools if use_tools else None, tool_format)

        def prompt_tokens() -> list[int]:
            return tokenize_rendered(tok, template.render(messages, add_generation_prompt=True, tools=tools_arg))

        def constraint():
            if schema is not None:
                return grammars.constraint(grammars.from_json_schema(schema))
            if forced is not None:
                return grammars.constraint(grammars.from_lark(
                    toolcalls.grammar_lark(tool_format, forced, grammars.special_token)))
            return None

        try:
            ids = await run_in_threadpool(prompt_tokens)
        except GGQError as e:  # the template refused the conversation (e.g. roles out of order)
            raise APIError(str(e), param="messages", code="invalid_value") from None
        try:
            con = await run_in_threadpool(constraint)
        except GGQError as e:  # a schema (or tool parameters) the grammar engine refuses
            raise APIError(str(e), param="response_format" if schema is not None else "tools",
                           code="invalid_value") from None
        return await _complete(request, req, ids, chat=True, constraint=con,
                               tool_format=tool_format if use_tools else None, forced=forced is not None)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await _parse(request, CompletionRequest)
        check_model(req.model)
        req.check_supported()
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise APIError("prompt: only one prompt per request is supported", param="prompt",
                               code="unsupported_value")
            p = p[0]
        if isinstance(p, str):
            ids = await run_in_threadpool(tok.encode, p, True, True)
        else:
            _check_ids(p, "prompt")
            ids = list(p)
        if not ids:
            raise APIError("prompt: the prompt is empty", param="prompt", code="invalid_value")
        return await _complete(request, req, ids, chat=False)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        """Mean-pooled, L2-normalized final hidden states (output norm applied) of each input; BOS
        added to texts as for completions."""
        req = await _parse(request, EmbeddingRequest)
        check_model(req.model)
        n_embd = int(engine.model.n_embd)
        if req.dimensions is not None and req.dimensions != n_embd:
            raise APIError(f"dimensions: this model's embeddings have {n_embd} dimensions", param="dimensions",
                           code="unsupported_value")
        inp = req.input
        items = [inp] if isinstance(inp, str) or (inp and isinstance(inp[0], int)) else list(inp)
        if not items:
            raise APIError("input: at least one input is needed", param="input", code="invalid_value")
        if len(items) > 2048:
            raise APIError("input: at most 2048 inputs per request", param="input", code="invalid_value")
        inputs = []
        for i, item in enumerate(items):
            if isinstance(item, str):
                if not item:
                    raise APIError(f"input.{i}: empty text", param="input", code="invalid_value")
                ids = await run_in_threadpool(tok.encode, item, True, True)
            else:
                if not item:
                    raise APIError(f"input.{i}: no tokens", param="input", code="invalid_value")
                _check_ids(item, "input")
                ids = list(item)
            check_length(len(ids), "input")
            inputs.append(ids)
        handle = submit(EmbedRequest(inputs))
        try:
            async for kind, value in handle:
                if kind == "error":
                    raise APIError(str(value), status=500, type="server_error")
        finally:
            if handle.result is None:
                handle.cancel()
        n = sum(len(x) for x in inputs)
        request.scope.setdefault("state", {})["tokens"] = (n, 0)
        data = []
        for i, v in enumerate(handle.result):
            emb = base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64" else \
                v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": model_id, "usage": {"prompt_tokens": n, "total_tokens": n}}

    async def _complete(request: Request, req, ids: list[int], chat: bool, constraint=None, tool_format=None,
                        forced: bool = False):
        check_length(len(ids), "messages" if chat else "prompt")
        n_lp = req.n_logprobs()
        gen = GenRequest(ids, req.sampler_params(), req.limit(), req.stop_list(), req.cache_prompt,
                         constraint=constraint, logit_bias=req.bias_map(tok.n_vocab), n_logprobs=n_lp,
                         special_text=bool(tool_format and tool_format.special_text))
        handle = submit(gen)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        now = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        state = request.scope.setdefault("state", {})

        if not req.stream:
            parts: list[str] = []
            lps: list[TokenLogprob] = []
            try:
                async for kind, value in handle:
                    if kind == "text":
                        parts.append(value)
                    elif kind == "logprobs":
                        lps.extend(value)
                    elif kind == "error":
                        raise APIError(str(value), status=500, type="server_error")
            finally:
                if handle.result is None:
                    handle.cancel()
            res = handle.result
            state["tokens"] = (res.n_prompt, res.n_gen)
            text = "".join(parts)
            lp = format_logprobs(lps, chat, tok) if n_lp is not None else None
            if chat:
                message = {"role": "assistant", "content": text}
                finish = res.finish_reason
                if tool_format is not None:
                    content, calls = toolcalls.parse(text, tool_format)
                    if calls:
                        message = {"role": "assistant", "content": content, "tool_calls": calls}
                        finish = "tool_calls" if finish == "stop" else finish
                choice = {"index": 0, "message": message, "logprobs": lp, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text, "logprobs": lp, "finish_reason": res.finish_reason}
            return {"id": rid, "object": obj, "created": now, "model": model_id, "choices": [choice],
                    "usage": _usage(res), "system_fingerprint": "ggq"}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        obj = "chat.completion.chunk" if chat else "text_completion"

        pending: list[TokenLogprob] = []

        def chunk(delta: dict | str, finish: str | None) -> str:
            lp = None
            if n_lp is not None and pending:
                lp = format_logprobs(pending, chat, tok)
                pending.clear()
            choice = ({"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish} if chat else
                      {"index": 0, "text": delta, "logprobs": lp, "finish_reason": finish})
            c = {"id": rid, "object": obj, "created": now, "model": model_id, "choices": [choice],
                 "system_fingerprint": "ggq"}
            if include_usage:
                c["usage"] = None
            return _sse(c)

        async def events():
            calls_stream = toolcalls.CallStream(tool_format, forced) if tool_format is not None else None
            try:
                if chat:
                    yield chunk({"role": "assistant", "content": ""}, None)
                async for kind, value in handle:
                    if kind == "logprobs":
                        pending.extend(value)
                    elif kind == "text":
                        if calls_stream is not None:
                            value = calls_stream.push(value)
                        if value:
                            yield chunk({"content": value} if chat else value, None)
                    elif kind == "error":
                        yield _sse(APIError(str(value), status=500, type="server_error").body())
                        return
                    else:
                        state["tokens"] = (value.n_prompt, value.n_gen)
                        finish = value.finish_reason
                        if calls_stream is not None:
                            content, calls = calls_stream.finish()
                            delta: dict = {"content": content} if content else {}
                            if calls:
                                delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(calls)]
                                finish = "tool_calls" if finish == "stop" else finish
                            if delta:
                                yield chunk(delta, None)
                        yield chunk({} if chat else "", finish)
                        if include_usage:
                            yield _sse({"id": rid, "object": obj, "created": now, "model": model_id,
                                        "choices": [], "usage": _usage(value), "system_fingerprint": "ggq"})
                yield "data: [DONE]\n\n"
            finally:  # the client went away (or the server stops): stop generating for it
                if handle.result is None:
                    handle.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


# ---------------------------------------------------------------------------- ggq serve

def serve(model_path: str, host: str = "127.0.0.1", port: int = 8080, n_slots: int = 4, n_ctx: int | None = None,
          n_threads: int | None = None, api_key: str | None = None, alias: str | None = None,
          kv_type: str = "f16", max_queue: int = 64, loras=None, lora_type: str = "same") -> None:
    """``ggq serve``: load the GGUF at ``model_path`` with ``n_slots`` KV cache regions of ``n_ctx``
    tokens each (LoRA adapters ``loras``, ``(file, scale)``, merged at load) and answer the OpenAI
    API on ``host:port`` until Ctrl-C; at most ``max_queue`` requests wait for a slot (then 503).
    Raises GGQError on a bad file or options."""
    import uvicorn

    from ggq.runtime.chat import Warmup, load

    if not 0 <= port < 65536:
        raise GGQError(f"--port {port}: must be between 0 and 65535")
    if not 1 <= n_slots <= 256:
        raise GGQError(f"--parallel {n_slots}: must be between 1 and 256")
    if max_queue < 0:
        raise GGQError(f"--queue-size {max_queue}: must be >= 0")
    if api_key is not None and not api_key.strip():
        raise GGQError("--api-key must not be empty")
    _setup_logging()
    model, tok = load(model_path, n_ctx, n_threads, kv_type, loras, lora_type, n_seq=n_slots)
    template = ChatTemplate.for_model(model.metadata, tok, model.family.chat_template, model.path.name)
    warmup = Warmup(model)
    engine = Engine(model, tok, n_slots, ready=warmup.wait, max_queue=max_queue)
    model_id = alias or model.path.name
    grammars = Grammars(tok)
    # the llguidance vocabulary (~0.2 s per 50k tokens), off the first constrained request's path
    threading.Thread(target=lambda: grammars.lltok, name="ggq-grammars", daemon=True).start()
    app = create_app(engine, tok, template, model_id, names={model.path.name, model.path.stem}, api_key=api_key,
                     created=int(model.path.stat().st_mtime), grammars=grammars)
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning("listening on %s without --api-key: anyone who can reach this port can use the model", host)
    log.info("serving %s as %r on http://%s:%d (%d slot%s of %d tokens, KV cache %.0f MiB)", model.path.name,
             model_id, host, port, n_slots, "s" if n_slots > 1 else "", engine.n_ctx, model.kv_cache_bytes / 2**20)
    config = uvicorn.Config(app, host=host, port=port, access_log=False, log_level="warning", lifespan="off")
    uvicorn.Server(config).run()
    engine.stop()
    warmup.finish()


def _setup_logging() -> None:
    if not log.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("ggq serve: %(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False
