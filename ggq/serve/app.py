"""The OpenAI-compatible HTTP API of ``ggq serve`` (FastAPI), its request models (pydantic) and
:func:`serve`, which loads a model and runs the app under uvicorn.

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (both also as server-sent events
with ``"stream": true``), ``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health``, and
llama.cpp server's ``POST /tokenize`` and ``POST /detokenize``.

Every error is OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``: 400 for a
bad request (malformed JSON, wrong types, values out of range, a prompt longer than the context,
options not supported yet), 401 for a wrong or missing API key, 404 for an unknown model or path,
500 if generation itself fails. Request bodies are parsed with pydantic in strict mode (no
``"5"`` for 5); unknown fields are ignored, as llama.cpp's server does.
"""

from __future__ import annotations

import json
import logging
import secrets
import sys
import time
import uuid
from typing import Literal, Union

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ggq.errors import GGQError, one_line
from ggq.runtime.chat import ChatTemplate, tokenize_rendered
from ggq.runtime.sampler import SamplerParams
from ggq.runtime.tokenizer import Tokenizer
from ggq.serve.engine import Engine, GenRequest, GenResult

log = logging.getLogger("ggq.serve")


# ---------------------------------------------------------------------------- errors

class APIError(Exception):
    """An error answered as OpenAI's JSON error object with HTTP ``status``."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


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
    logit_bias: dict[str, float] | None = None
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
        if self.logit_bias:
            raise APIError("logit_bias is not supported yet", param="logit_bias", code="unsupported_value")


class ContentPart(_Strict):
    type: str
    text: str | None = None


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None  # accepted, unused


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict] | None = None
    tool_choice: Union[str, dict, None] = None
    response_format: dict | None = None
    parallel_tool_calls: bool | None = None  # accepted, unused (no tools yet)

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs:
            raise APIError("logprobs are not supported yet", param="logprobs", code="unsupported_value")
        if self.tools:
            raise APIError("tools are not supported yet", param="tools", code="unsupported_value")
        if self.tool_choice not in (None, "none", "auto"):
            raise APIError("tool_choice: no tools are supported yet", param="tool_choice", code="unsupported_value")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise APIError("response_format: only {\"type\": \"text\"} is supported yet", param="response_format",
                           code="unsupported_value")
        if not self.messages:
            raise APIError("messages: at least one message is needed", param="messages", code="invalid_value")

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
            out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        return out


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``. ``prompt``: text, one text in a list, or token ids."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise APIError("echo is not supported yet", param="echo", code="unsupported_value")
        if self.suffix:
            raise APIError("suffix is not supported yet", param="suffix", code="unsupported_value")
        if self.best_of not in (None, 1):
            raise APIError("best_of: only 1 is supported", param="best_of", code="unsupported_value")
        if self.logprobs is not None:
            raise APIError("logprobs are not supported yet", param="logprobs", code="unsupported_value")

    def limit(self) -> int | None:
        return self.max_tokens


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

class _LogAndAuth:
    """ASGI middleware: the API key check (``Authorization: Bearer KEY``; ``/health`` is open) and
    one log line per request: method, path, status, prompt+completion tokens, seconds."""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

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
            if self.api_key is not None and scope["path"] != "/health" and not self._authorized(scope):
                err = APIError("invalid or missing API key (Authorization: Bearer KEY)", status=401,
                               code="invalid_api_key", type="authentication_error")
                await err.response()(scope, receive, send_status)
            else:
                await self.app(scope, receive, send_status)
        finally:
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


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(res: GenResult) -> dict:
    return {"prompt_tokens": res.n_prompt, "completion_tokens": res.n_gen,
            "total_tokens": res.n_prompt + res.n_gen,
            "prompt_tokens_details": {"cached_tokens": res.n_cached}}


def create_app(engine: Engine, tok: Tokenizer, template: ChatTemplate, model_id: str,
               names: set[str] | None = None, api_key: str | None = None, created: int | None = None) -> FastAPI:
    """The ASGI app over ``engine``. ``model_id``: the id ``/v1/models`` lists; ``names``: other model
    names requests may use (the file name, its stem); ``api_key``: required as a bearer token on
    every endpoint but ``/health`` when set."""
    app = FastAPI(title="ggq serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_LogAndAuth, api_key=api_key)
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

    def check_length(n: int, param: str) -> None:
        if n >= engine.n_ctx:
            raise APIError(f"the prompt is {n} tokens, the context holds {engine.n_ctx} (ggq serve --ctx-size)",
                           param=param, code="context_length_exceeded")

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "ggq",
                "meta": {"n_ctx": engine.n_ctx, "n_vocab": tok.n_vocab}}

    @app.get("/health")
    async def health():
        """200 when the model is ready, 503 while it loads or compiles (llama.cpp's shape)."""
        if engine.is_ready.is_set():
            return {"status": "ok"}
        return JSONResponse({"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}},
                            status_code=503)

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

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await _parse(request, ChatCompletionRequest)
        check_model(req.model)
        req.check_supported()
        messages = req.message_dicts()

        def prompt_tokens() -> list[int]:
            return tokenize_rendered(tok, template.render(messages, add_generation_prompt=True))

        try:
            ids = await run_in_threadpool(prompt_tokens)
        except GGQError as e:  # the template refused the conversation (e.g. roles out of order)
            raise APIError(str(e), param="messages", code="invalid_value") from None
        return await _complete(request, req, ids, chat=True)

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

    async def _complete(request: Request, req, ids: list[int], chat: bool):
        check_length(len(ids), "messages" if chat else "prompt")
        gen = GenRequest(ids, req.sampler_params(), req.limit(), req.stop_list(), req.cache_prompt)
        handle = engine.submit(gen)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        now = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        state = request.scope.setdefault("state", {})

        if not req.stream:
            parts: list[str] = []
            try:
                async for kind, value in handle:
                    if kind == "text":
                        parts.append(value)
                    elif kind == "error":
                        raise APIError(str(value), status=500, type="server_error")
            finally:
                if handle.result is None:
                    handle.cancel()
            res = handle.result
            state["tokens"] = (res.n_prompt, res.n_gen)
            text = "".join(parts)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                       "finish_reason": res.finish_reason} if chat else
                      {"index": 0, "text": text, "logprobs": None, "finish_reason": res.finish_reason})
            return {"id": rid, "object": obj, "created": now, "model": model_id, "choices": [choice],
                    "usage": _usage(res), "system_fingerprint": "ggq"}

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: dict | str, finish: str | None) -> str:
            choice = ({"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish} if chat else
                      {"index": 0, "text": delta, "logprobs": None, "finish_reason": finish})
            c = {"id": rid, "object": obj, "created": now, "model": model_id, "choices": [choice],
                 "system_fingerprint": "ggq"}
            if include_usage:
                c["usage"] = None
            return _sse(c)

        async def events():
            try:
                if chat:
                    yield chunk({"role": "assistant", "content": ""}, None)
                async for kind, value in handle:
                    if kind == "text":
                        yield chunk({"content": value} if chat else value, None)
                    elif kind == "error":
                        yield _sse(APIError(str(value), status=500, type="server_error").body())
                        return
                    else:
                        state["tokens"] = (value.n_prompt, value.n_gen)
                        yield chunk({} if chat else "", value.finish_reason)
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

def serve(model_path: str, host: str = "127.0.0.1", port: int = 8080, n_slots: int = 1, n_ctx: int | None = None,
          n_threads: int | None = None, api_key: str | None = None, alias: str | None = None,
          kv_type: str = "f16", loras=None, lora_type: str = "same") -> None:
    """``ggq serve``: load the GGUF at ``model_path`` and answer the OpenAI API on ``host:port``
    until Ctrl-C (LoRA adapters ``loras``, ``(file, scale)``, merged at load). Raises GGQError on a bad
    file or options."""
    import uvicorn

    from ggq.runtime.chat import Warmup, load

    if not 0 <= port < 65536:
        raise GGQError(f"--port {port}: must be between 0 and 65535")
    if n_slots != 1:
        raise GGQError(f"--parallel {n_slots}: only 1 slot for now (continuous batching is a later slice)")
    if api_key is not None and not api_key.strip():
        raise GGQError("--api-key must not be empty")
    _setup_logging()
    model, tok = load(model_path, n_ctx, n_threads, kv_type, loras, lora_type)
    template = ChatTemplate.for_model(model.metadata, tok, model.family.chat_template, model.path.name)
    warmup = Warmup(model)
    engine = Engine(model, tok, n_slots, ready=warmup.wait)
    model_id = alias or model.path.name
    app = create_app(engine, tok, template, model_id, names={model.path.name, model.path.stem}, api_key=api_key,
                     created=int(model.path.stat().st_mtime))
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning("listening on %s without --api-key: anyone who can reach this port can use the model", host)
    log.info("serving %s as %r on http://%s:%d (context %d tokens, %d slot)", model.path.name, model_id,
             host, port, engine.n_ctx, n_slots)
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
