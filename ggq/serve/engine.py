"""The generation engine behind ``ggq serve``: a queue of requests, slots, one worker thread.

One :class:`Engine` owns the model. Requests (:class:`GenRequest`: prompt tokens, sampler
settings, token limit, stop strings) are put on a bounded queue (:class:`QueueFull` beyond it); a
single worker thread runs them on ``n_slots`` :class:`Slot` s, each a sequence of the model (its own
KV cache region, ``Model.load(..., n_seq=n_slots)``). The Numba forward pass therefore never runs
from two threads at once, and the asyncio event loop of the HTTP server never waits on it.

Continuous batching: each step of the worker loop (1) admits waiting requests into free slots,
each into the free slot whose cached tokens share the longest prefix with its prompt (the prefix is
kept, ``truncate``; only the rest is evaluated), (2) evaluates one chunk of at most
``prompt_chunk`` prompt tokens of the earliest admitted slot still reading its prompt (a long
prompt does not stall the decoding slots for long), (3) samples the next token of every generating
slot with its own sampler, grammar mask, logit_bias and stop strings, and evaluates all these
tokens in ONE forward call (``Model.decode_batch``: every matrix product runs once over the weights
for all slots). Finished and cancelled requests leave between steps; new ones join between steps.

A slot's sampling masks the logits with the request's grammar
(:class:`ggq.serve.constrain.Constraint`, llguidance) and adds its ``logit_bias`` before sampling,
and records log-probabilities when asked. :class:`EmbedRequest` jobs (``/v1/embeddings``) run on
the same worker through ``Model.embed`` on a free slot, between steps.

Events go back to the caller through :class:`RequestHandle`, an async iterator fed from the worker
thread with ``loop.call_soon_threadsafe``: ``("text", str)`` pieces as they are produced (whole
UTF-8 characters, stop strings held back until they can be ruled out), ``("logprobs", [TokenLogprob])``
before the text of those tokens when the request asks for them, and one final
``("done", GenResult)`` or ``("error", GGQError)``. :meth:`RequestHandle.cancel` (a streaming client
went away) stops generation at the next token.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from ggq.errors import GGQError
from ggq.runtime.chat import common_prefix
from ggq.runtime.sampler import Sampler, SamplerParams
from ggq.runtime.tokenizer import StreamDecoder, Tokenizer

log = logging.getLogger("ggq.serve")


@dataclass
class GenRequest:
    """One generation job: ``prompt`` token ids, ``params`` for the sampler, at most ``max_tokens``
    new tokens (``None``: until end of generation or a full context) and ``stop`` strings (the text
    ends before the first one found; it is not returned)."""

    prompt: list[int]
    params: SamplerParams = field(default_factory=SamplerParams)
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    #: reuse the KV cache's common prefix (llama.cpp's ``cache_prompt``); False evaluates the whole
    #: prompt, so that a seed reproduces a reply bit for bit whatever the cache held before
    cache_prompt: bool = True
    #: a grammar the reply must follow (:class:`ggq.serve.constrain.Constraint`), or None
    constraint: object = None
    #: token id -> value added to its logit before sampling (``-inf``: banned), OpenAI's logit_bias
    logit_bias: dict[int, float] = field(default_factory=dict)
    #: None: no log-probabilities; k >= 0: each generated token's, and the k most likely ones
    #: (log-softmax of the model's logits before bias, grammar and penalties, as llama.cpp's server)
    n_logprobs: int | None = None
    #: render control tokens as text (tool-call markers such as ``[TOOL_CALLS]``)
    special_text: bool = False


@dataclass
class EmbedRequest:
    """Embeddings of ``inputs`` (token id lists): each is evaluated from position 0 and its final
    hidden states (output norm applied) are mean-pooled over its tokens and L2-normalized."""

    inputs: list[list[int]]


def pool(hidden: np.ndarray) -> np.ndarray:
    """float32 (n_embd,): the mean over the rows of ``hidden`` (float32 (T, n_embd)), L2-normalized
    (a zero vector stays zero)."""
    v = hidden.astype(np.float64).mean(axis=0)
    norm = np.linalg.norm(v)
    return (v / norm if norm > 0 else v).astype(np.float32)


@dataclass
class GenResult:
    """What a finished request produced: the text (without a stop string), the finish reason
    (``"stop"``: end of generation or a stop string, ``"length"``: ``max_tokens`` or a full
    context, ``"cancelled"``), token counts and timings."""

    text: str = ""
    finish_reason: str = "length"
    n_prompt: int = 0          # prompt tokens
    n_cached: int = 0          # prompt tokens reused from the KV cache
    n_gen: int = 0             # generated tokens (a stop string's tokens included)
    t_prompt: float = 0.0
    t_gen: float = 0.0


@dataclass
class TokenLogprob:
    """One generated token's log-probability and the ``top`` most likely ``(id, logprob)`` at its
    position, best first."""

    id: int
    logprob: float
    top: list[tuple[int, float]]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 (n,) log-softmax of float32 logits (n,)."""
    x = np.asarray(logits, dtype=np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


def token_logprob(logits: np.ndarray, tid: int, k: int) -> TokenLogprob:
    """:class:`TokenLogprob` of token ``tid`` under ``logits`` (float32 (n_vocab,)), with the ``k``
    most likely tokens."""
    lp = log_softmax(logits)
    top: list[tuple[int, float]] = []
    if k > 0:
        k = min(k, lp.shape[0])
        ids = np.argpartition(-lp, k - 1)[:k]
        ids = ids[np.argsort(-lp[ids], kind="stable")]
        top = [(int(i), float(lp[i])) for i in ids]
    return TokenLogprob(int(tid), float(lp[tid]), top)


@dataclass
class EngineStats:
    """Totals since the server started, for ``/metrics`` (written by the worker thread only)."""

    requests: int = 0                 # generation requests finished (any finish reason)
    prompt_tokens: int = 0            # their prompt tokens (cached ones included)
    prompt_tokens_cached: int = 0     # of which reused from the KV cache
    generated_tokens: int = 0
    prompt_seconds: float = 0.0       # evaluating prompts
    generation_seconds: float = 0.0   # sampling and evaluating generated tokens
    embedding_inputs: int = 0
    embedding_tokens: int = 0


class RequestHandle:
    """The caller's side of a queued request: ``async for kind, value in handle`` yields the
    engine's events; :meth:`cancel` asks the engine to stop it."""

    def __init__(self, req: GenRequest, loop: asyncio.AbstractEventLoop):
        self.req = req
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()
        self.result: GenResult | None = None
        self._ended = False

    def cancel(self) -> None:
        """Stop generating for this request (at the next token; a queued request never starts)."""
        self.cancelled.set()

    def _emit(self, kind: str, value) -> None:
        """Called from the worker thread."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed (server shutting down)
            self.cancelled.set()

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.result is not None or self._ended:
            raise StopAsyncIteration
        kind, value = await self._events.get()
        if kind == "done":
            self.result = value
        elif kind == "error":
            self._ended = True
        return kind, value


class _StopMatcher:
    """Holds back text that could be the start of a stop string; finds the first stop string even
    when it spans several tokens."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0  # characters of self.text already released

    def push(self, piece: str) -> tuple[str, bool]:
        """Add ``piece``; return ``(text to release, stop string found)``."""
        self.text += piece
        if not self.stops:
            out, self.sent = self.text[self.sent:], len(self.text)
            return out, False
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            out = self.text[self.sent:end]
            self.text, self.sent = self.text[:end], end
            return out, True
        tail = self.text[self.sent:]
        hold = 0
        for s in self.stops:  # longest suffix of the unreleased text that begins a stop string
            for k in range(min(len(s) - 1, len(tail)), hold, -1):
                if s.startswith(tail[len(tail) - k:]):
                    hold = k
                    break
        end = len(self.text) - hold
        out, self.sent = self.text[self.sent:end], end
        return out, False

    def flush(self) -> str:
        """Release what is held back (generation ended without completing a stop string)."""
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


class QueueFull(GGQError):
    """:meth:`Engine.submit` when ``max_queue`` requests already wait for a slot (HTTP 503)."""


class Slot:
    """One sequence of the model (``model.seq(index)``, its own KV cache region): the tokens in its
    KV cache (``cached``), the request it serves, its sampler and decoder state.

    :meth:`begin` takes a request (keeps the cached prefix, leaves the rest of the prompt in
    ``todo``), :meth:`prefill` evaluates the next chunk of it, :meth:`sample` draws the next token
    (or finishes the request), :meth:`accept` records that token with the logits of its
    evaluation (done for all generating slots at once by the engine); :meth:`step` is sample +
    evaluate for this slot alone."""

    def __init__(self, slot_id: int, model, tok: Tokenizer, stats: EngineStats | None = None):
        self.id, self.tok = slot_id, tok
        self.model = model.seq(slot_id) if hasattr(model, "seq") else model  # its sequence's view
        self.cached: list[int] = []
        self.handle: RequestHandle | None = None
        self.todo: list[int] = []   # prompt tokens not evaluated yet
        self.logits = None
        self.order = 0              # admission order (the earliest prefills first)
        self.stats = stats if stats is not None else EngineStats()

    @property
    def busy(self) -> bool:
        return self.handle is not None

    @property
    def generating(self) -> bool:
        """Busy with the whole prompt evaluated: the next :meth:`sample` can run."""
        return self.handle is not None and not self.todo

    def start(self, handle: RequestHandle) -> None:
        """:meth:`begin` and all of the prompt at once."""
        self.begin(handle)
        while self.todo:
            self.prefill(len(self.todo))

    def begin(self, handle: RequestHandle) -> None:
        """Take ``handle``'s request: keep the shared prefix of the KV cache; the rest of the prompt
        is left in ``todo`` for :meth:`prefill`. Raises GGQError (the slot is then free again)."""
        req = handle.req
        prompt = req.prompt
        n_ctx = int(self.model.n_ctx)
        if not prompt:
            raise GGQError("empty prompt")
        if len(prompt) >= n_ctx:
            raise GGQError(f"the prompt is {len(prompt)} tokens, the context holds {n_ctx}")
        self.handle = handle
        self.res = GenResult(n_prompt=len(prompt))
        keep = common_prefix(self.cached, prompt) if req.cache_prompt else 0
        if keep == len(prompt):  # the last prompt token's logits are needed: evaluate it again
            keep -= 1
        keep = max(0, min(keep, int(self.model.n_past)))
        self.model.truncate(keep)
        self.cached = list(prompt[:keep])
        self.res.n_cached = keep
        self.todo = list(prompt[keep:])
        p = req.params
        self.sampler = Sampler(p)
        n_last = p.repeat_last_n  # -1: the whole context, as in llama.cpp
        self.sampler.accept_many(prompt if n_last < 0 else prompt[len(prompt) - n_last:] if n_last > 0 else [])
        self.decoder = StreamDecoder(self.tok, special=req.special_text)
        self.matcher = _StopMatcher(req.stop)
        self.pending_lp: list[TokenLogprob] = []

    def prefill(self, n: int) -> None:
        """Evaluate the next ``n`` (at most) prompt tokens; after the last, ``logits`` are the
        prompt's and the generation clock starts. GGQError: the slot's cache is cleared (the
        caller ends the request)."""
        chunk, rest = self.todo[:n], self.todo[n:]
        t0 = time.perf_counter()
        try:
            self.logits = self.model.eval(chunk)
        except BaseException:
            self.clear()
            raise
        self.res.t_prompt += time.perf_counter() - t0
        self.cached += chunk
        self.todo = rest
        if not rest:
            self.t_gen0 = time.perf_counter()

    def clear(self) -> None:
        """Forget the KV cache's contents (after an error)."""
        self.model.reset()
        self.cached, self.todo = [], []

    def sample(self) -> int | None:
        """Sample the next token and emit its text; return the token to evaluate next, or None when
        the request is finished (then :meth:`finish` has been called).

        The sampler sees the model's logits plus ``logit_bias``, with the tokens the request's
        grammar refuses at ``-inf``; the drawn token advances the grammar. Log-probabilities are
        taken from the model's logits as they are (before bias, mask and penalties). GGQError if
        no token is allowed or the grammar engine fails."""
        h, res = self.handle, self.res
        if h.cancelled.is_set():
            return self.finish("cancelled")
        req = h.req
        x = self.logits
        if req.logit_bias or req.constraint is not None:
            x = np.array(x, dtype=np.float32, copy=True)
            if req.logit_bias:
                ids = np.fromiter(req.logit_bias.keys(), dtype=np.int64, count=len(req.logit_bias))
                x[ids] += np.fromiter(req.logit_bias.values(), dtype=np.float32, count=len(req.logit_bias))
            if req.constraint is not None:
                req.constraint.apply(x)
            if not np.isfinite(x).any():
                raise GGQError("no token can come next: logit_bias bans every token the grammar allows")
        tid = self.sampler.sample(x)
        if req.constraint is not None:
            req.constraint.accept(tid)
        if self.tok.is_eog(tid):
            return self.finish("stop", self.decoder.flush())
        if req.n_logprobs is not None:
            self.pending_lp.append(token_logprob(self.logits, tid, req.n_logprobs))
        self.sampler.accept(tid)
        res.n_gen += 1
        out, hit = self.matcher.push(self.decoder.push(tid))
        if out:
            self._emit_logprobs()
            h._emit("text", out)
        if hit:
            return self.finish("stop")
        limit = h.req.max_tokens
        if (limit is not None and res.n_gen >= limit) or len(self.cached) + 1 >= int(self.model.n_ctx):
            return self.finish("length", self.decoder.flush())
        if h.cancelled.is_set():
            return self.finish("cancelled")
        return tid

    def accept(self, tid: int, logits: np.ndarray) -> None:
        """``tid`` (from :meth:`sample`) was evaluated in this slot's sequence with ``logits``."""
        self.cached.append(tid)
        self.logits = logits

    def step(self) -> bool:
        """:meth:`sample`, then evaluate the token on this slot alone. False when the request is finished."""
        tid = self.sample()
        if tid is None:
            return False
        try:
            logits = self.model.eval([tid])
        except BaseException:
            self.clear()
            raise
        self.accept(tid, logits)
        return True

    def _emit_logprobs(self) -> None:
        if self.pending_lp:
            self.handle._emit("logprobs", self.pending_lp)
            self.pending_lp = []

    def fail(self, err: GGQError) -> None:
        """End the request with ``err`` (an ``("error", err)`` event); the slot is free again."""
        h = self.handle
        self.handle, self.todo = None, []
        if h is not None:
            h._emit("error", err)

    def finish(self, reason: str, rest: str = "") -> None:
        """End the request with ``reason``; ``rest``: text still held by the decoder. Returns None
        (what :meth:`sample` returns for a finished request)."""
        h, res = self.handle, self.res
        if rest and reason != "cancelled":
            out, hit = self.matcher.push(rest)
            if out:
                self._emit_logprobs()
                h._emit("text", out)
            if hit:
                reason = "stop"
        if reason != "cancelled":  # generation ended: text held back for a stop string is text
            out = self.matcher.flush()
            self._emit_logprobs()
            if out:
                h._emit("text", out)
        res.text = self.matcher.text[:self.matcher.sent]
        res.finish_reason = reason
        res.t_gen = time.perf_counter() - self.t_gen0 if not self.todo else 0.0
        st = self.stats
        st.requests += 1
        st.prompt_tokens += res.n_prompt
        st.prompt_tokens_cached += res.n_cached
        st.generated_tokens += res.n_gen
        st.prompt_seconds += res.t_prompt
        st.generation_seconds += res.t_gen
        self.handle, self.todo = None, []
        h._emit("done", res)
        return None


class Engine:
    """Serves generation requests on ``model`` with ``n_slots`` slots (sequences of the model, which
    must have been loaded with ``n_seq >= n_slots``) from one worker thread, batching the decoding
    slots into one forward call per step (module docstring).

    ``ready``: a callable returning when the model is compiled (e.g. :meth:`Warmup.wait`), run by the
    worker before the first request. ``max_queue``: requests that may wait for a slot
    (:meth:`submit` raises :class:`QueueFull` beyond). ``prompt_chunk``: prompt tokens evaluated
    per step while other slots decode. GGQError for n_slots < 1 or more slots than sequences.
    """

    def __init__(self, model, tok: Tokenizer, n_slots: int = 1, ready=None, max_queue: int = 64,
                 prompt_chunk: int = 128):
        n_seq = int(getattr(model, "n_seq", 1))
        if not 1 <= n_slots <= n_seq:
            raise GGQError(f"{n_slots} slots need a model loaded with at least as many sequences (it has {n_seq})")
        if max_queue < 0 or prompt_chunk < 1:
            raise GGQError(f"invalid queue size {max_queue} or prompt chunk {prompt_chunk}")
        self.model, self.tok = model, tok
        self.stats = EngineStats()
        self.slots = [Slot(i, model, tok, self.stats) for i in range(n_slots)]
        self.max_queue, self.prompt_chunk = max_queue, prompt_chunk
        self._waiting: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._admitted = 0
        self._ready = ready
        self.is_ready = threading.Event()
        self.n_processed = 0
        self.n_batches = 0          # batched decode steps (forward calls)
        self.n_batched_tokens = 0   # tokens they decoded
        self._thread = threading.Thread(target=self._run, name="ggq-engine", daemon=True)
        self._thread.start()

    @property
    def n_ctx(self) -> int:
        return int(self.model.n_ctx)

    def submit(self, req: GenRequest | EmbedRequest, loop: asyncio.AbstractEventLoop | None = None) -> RequestHandle:
        """Queue ``req``; iterate the returned handle (in ``loop``, default: the running one) for
        its events. :class:`QueueFull` when ``max_queue`` requests already wait for a slot."""
        handle = RequestHandle(req, loop or asyncio.get_running_loop())
        with self._cv:
            waiting = sum(not h.cancelled.is_set() for h in self._waiting)
            if waiting >= self.max_queue and not self._has_free_slot():
                raise QueueFull(f"all {len(self.slots)} slots are busy and {waiting} requests are waiting")
            self._waiting.append(handle)
            self._cv.notify()
        return handle

    def _has_free_slot(self) -> bool:
        free = sum(not s.busy for s in self.slots)
        return free > len(self._waiting)

    def queued(self) -> int:
        """Requests waiting for a slot."""
        return len(self._waiting)

    def busy(self) -> int:
        """Slots running a request."""
        return sum(s.busy for s in self.slots)

    def stop(self) -> None:
        """Let the worker thread end (after the current step; requests still running get no more events)."""
        with self._cv:
            self._stopping = True
            self._cv.notify()

    def _pick_slot(self, req: GenRequest) -> Slot:
        """The free slot whose cache shares the longest prefix with the prompt (any slot when the
        request does not reuse its cache, ``cache_prompt`` false); among equals the least recently
        used, so that a conversation's cache survives other requests sharing only, say, the
        template's system prompt."""
        free = [s for s in self.slots if not s.busy]
        return max(free, key=lambda s: (common_prefix(s.cached, req.prompt) if req.cache_prompt else 0, -s.order))

    def _run(self) -> None:
        if self._ready is not None:
            try:
                self._ready()
            except BaseException as e:  # the model cannot run: answer every request with the error
                log.error("model warm-up failed: %s", e)
                self._fail_all(GGQError(f"the model failed to compile: {e}"))
                return
        self.is_ready.set()
        while True:
            with self._cv:
                while not self._stopping and not self._waiting and not any(s.busy for s in self.slots):
                    self._cv.wait()
                if self._stopping:
                    return
            self._admit()
            self._prefill_step()
            self._decode_step()

    def _admit(self) -> None:
        """Move waiting requests into free slots (cancelled ones are dropped; embeddings run now)."""
        while True:
            with self._cv:
                if not self._waiting or all(s.busy for s in self.slots):
                    return
                handle = self._waiting.popleft()
            if handle.cancelled.is_set():
                continue
            if isinstance(handle.req, EmbedRequest):
                self._embed(handle)
                continue
            slot = self._pick_slot(handle.req)
            try:
                slot.begin(handle)
            except GGQError as e:
                slot.handle, slot.todo = None, []
                handle._emit("error", e)
                self.n_processed += 1
                continue
            self._admitted += 1
            slot.order = self._admitted

    def _prefill_step(self) -> None:
        """Prompt chunks of the slots still reading their prompt, earliest admitted first, up to
        ``prompt_chunk`` tokens in all (at least one chunk): a slot's next chunk is always its next
        ``prompt_chunk`` tokens (or the rest), whatever the other slots do, so a request's logits
        (and its greedy reply) are the same alone or among others; several short prompts are read
        in one step."""
        budget = self.prompt_chunk
        for slot in sorted((s for s in self.slots if s.busy and s.todo), key=lambda s: s.order):
            n = min(len(slot.todo), self.prompt_chunk)
            if n > budget and budget < self.prompt_chunk:
                break
            budget -= n
            if slot.handle.cancelled.is_set():
                slot.finish("cancelled")
                self.n_processed += 1
                continue
            try:
                slot.prefill(self.prompt_chunk)
            except GGQError as e:
                slot.fail(e)
                self.n_processed += 1
            except Exception as e:  # a bug: report it to this request, keep serving
                log.exception("prompt evaluation failed")
                slot.fail(GGQError(f"internal error: {type(e).__name__}: {e}"))
                self.n_processed += 1
            if budget <= 0:
                break

    def _decode_step(self) -> None:
        """Sample every generating slot's next token, then evaluate them all in one forward call."""
        batch: list[tuple[Slot, int]] = []
        for slot in self.slots:
            if not slot.generating:
                continue
            try:
                tid = slot.sample()
            except GGQError as e:
                slot.fail(e)
                tid = None
            except Exception as e:
                log.exception("sampling failed")
                slot.fail(GGQError(f"internal error: {type(e).__name__}: {e}"))
                tid = None
            if tid is None:
                self.n_processed += 1
            else:
                batch.append((slot, tid))
        if not batch:
            return
        try:
            if len(batch) == 1:
                slot, tid = batch[0]
                rows = [slot.model.eval([tid])]
            else:
                lg = self.model.decode_batch([t for _, t in batch], [s.id for s, _ in batch])
                rows = list(lg)
        except Exception as e:
            if not isinstance(e, GGQError):
                log.exception("batched decoding failed")
                e = GGQError(f"internal error: {type(e).__name__}: {e}")
            for slot, _ in batch:
                slot.clear()
                slot.fail(e)
                self.n_processed += 1
            return
        self.n_batches += 1
        self.n_batched_tokens += len(batch)
        for (slot, tid), row in zip(batch, rows):
            slot.accept(tid, row)

    def _embed(self, handle: RequestHandle) -> None:
        """Run an :class:`EmbedRequest` on a free slot, whole, between steps (its cache is reset;
        afterwards it holds the last input, which a later prompt sharing a prefix with it reuses)."""
        slot = min((s for s in self.slots if not s.busy), key=lambda s: len(s.cached))
        slot.handle = handle
        vectors = []
        try:
            for ids in handle.req.inputs:
                if handle.cancelled.is_set():
                    return
                slot.clear()
                vectors.append(pool(slot.model.embed(ids)))
                slot.cached = list(ids)
                self.stats.embedding_inputs += 1
                self.stats.embedding_tokens += len(ids)
        except GGQError as e:
            slot.clear()
            handle._emit("error", e)
            return
        except Exception as e:
            log.exception("embedding failed")
            slot.clear()
            handle._emit("error", GGQError(f"internal error: {type(e).__name__}: {e}"))
            return
        finally:
            slot.handle = None
            self.n_processed += 1
        handle._emit("done", vectors)

    def _fail_all(self, err: GGQError) -> None:
        while True:
            with self._cv:
                while not self._stopping and not self._waiting:
                    self._cv.wait()
                if self._stopping:
                    return
                handle = self._waiting.popleft()
            handle._emit("error", err)
