"""Chat templates, token generation, the interactive chat loop (``ggq run``) and ``ggq generate``.

Templates: the GGUF's ``tokenizer.chat_template`` is rendered with jinja2 in an
``ImmutableSandboxedEnvironment`` set up as transformers' ``apply_chat_template`` does
(trim_blocks, lstrip_blocks, loopcontrols, ``raise_exception``, ``strftime_now``, a ``tojson``
filter). A file without a template gets its family's chat format (Gemma's turns, Phi-3's, Qwen 3's
ChatML; :attr:`ggq.models.base.Family.chat_template`), else a plain ``role: content`` layout. A
template that refuses a system message (Gemma 2's) gets it prepended to the first user message, as
Gemma 3's own template does.

Thinking models (Qwen 3): ``enable_thinking`` goes to the template (``--no-think`` makes it false);
the reply's ``<think>...</think>`` block is shown dimmed on a terminal (or hidden with
``--hide-think``) and never kept in the conversation history.

Multi-turn chats reuse the KV cache: every turn renders the whole conversation, tokenizes it, keeps
the longest prefix that is already in the cache (``Model.truncate``) and evaluates only the rest.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable

from ggq.errors import GGQError, one_line
from ggq.runtime.sampler import Sampler, SamplerParams
from ggq.runtime.tokenizer import StreamDecoder, Tokenizer

#: used when a file has no tokenizer.chat_template
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


#: longest string or list a chat template may build with ``*`` (characters or items)
_MAX_REPEAT = 1 << 20


def _compile(template: str):
    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover
        raise GGQError(f"jinja2 is needed for chat templates: {e}") from e
    import json

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class _Sandbox(ImmutableSandboxedEnvironment):
        """Jinja's sandbox (as transformers renders chat templates), plus size limits on ``*`` and
        ``**``: a hostile template's ``'x' * 10**9`` or ``9 ** 10**8`` is a template error, not
        gigabytes allocated (intercepted operators are also never folded at compile time)."""

        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _MAX_REPEAT:
                        raise jinja2.exceptions.SecurityError(f"a repetition of more than {_MAX_REPEAT} items")
            elif operator == "**" and isinstance(right, (int, float)) and abs(right) > 64 and \
                    isinstance(left, (int, float)) and abs(left) > 1:
                raise jinja2.exceptions.SecurityError("a power with an exponent above 64")
            return super().call_binop(context, operator, left, right)

    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise GGQError(f"chat template: syntax error: {one_line(str(e), 200)}") from None
    except Exception as e:  # e.g. RecursionError on a deeply nested template from a hostile file
        raise GGQError(f"chat template: cannot compile ({type(e).__name__})") from None


class ChatTemplate:
    """A compiled chat template. ``render(messages, add_generation_prompt=True) -> str``.

    ``messages``: list of ``{"role": "system"|"user"|"assistant", "content": str}``.
    Raises :class:`GGQError` when the template raises (e.g. roles out of order).
    """

    def __init__(self, template: str | None, bos_token: str = "", eos_token: str = "", source: str = "file",
                 where: str = "", **options):
        self.source = template or PLAIN_TEMPLATE
        #: the file the template comes from, for messages ("" if none)
        self.where = where
        self.is_plain = not template
        #: where the template comes from: "file", "family" (the family's default) or "plain"
        self.origin = source if template else "plain"
        self.bos_token, self.eos_token = bos_token, eos_token
        #: extra template variables, e.g. ``enable_thinking=False``
        self.options = options
        try:
            self._tpl = _compile(self.source)
        except GGQError as e:
            raise GGQError(f"{self.where}: {e}" if self.where else str(e)) from None

    @classmethod
    def for_model(cls, metadata: dict, tok: Tokenizer, family_template: str | None = None, where: str = "",
                  **options) -> "ChatTemplate":
        """The template of a GGUF file (``tokenizer.chat_template``), else ``family_template`` (the
        family's chat format), else the plain fallback. ``where``: the file's name, for messages;
        ``options``: extra template variables."""
        tpl = metadata.get("tokenizer.chat_template")
        bos = tok.tokens[tok.bos_id] if tok.bos_id is not None else ""
        eos = tok.tokens[tok.eos_id] if tok.eos_id is not None else ""
        if isinstance(tpl, str) and tpl.strip():
            return cls(tpl, bos, eos, "file", where, **options)
        return cls(family_template, bos, eos, "family", where, **options)

    def _render(self, messages, add_generation_prompt, tools=None):
        return self._tpl.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                bos_token=self.bos_token, eos_token=self.eos_token, tools=tools,
                                documents=None, custom_tools=None, tools_in_user_message=False, **self.options)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None) -> str:
        """The prompt text of ``messages``; ``tools``: OpenAI tool objects for templates that render
        them (``tools=`` in the template, as transformers passes them)."""
        import jinja2

        prefix = f"{self.where}: chat template" if self.where else "chat template"
        err = None
        for msgs in (messages, _system_into_user(messages)):  # then without a system role (Gemma 2's raises on one)
            if msgs is None:
                break
            try:
                return self._render(msgs, add_generation_prompt, tools)
            except jinja2.exceptions.TemplateError as e:
                err = err or f"{prefix}: {one_line(str(e), 200)}"
            except Exception as e:  # the template comes from the file: any failure in it is the file's
                err = err or f"{prefix}: cannot render ({one_line(str(e), 200) or type(e).__name__})"
                break
        raise GGQError(err)


def _system_into_user(messages: list[dict]) -> list[dict] | None:
    """``messages`` with a leading system message prepended to the first user message (None if
    there is no such pair)."""
    if len(messages) < 2 or messages[0].get("role") != "system" or messages[1].get("role") != "user":
        return None
    first = {"role": "user", "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}
    return [first] + messages[2:]


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def strip_thinking(text: str) -> str:
    """``text`` without its ``<think>...</think>`` blocks and the newlines after them (an unclosed
    block runs to the end)."""
    out, rest = [], text
    while (i := rest.find(THINK_OPEN)) >= 0:
        out.append(rest[:i])
        j = rest.find(THINK_CLOSE, i)
        rest = "" if j < 0 else rest[j + len(THINK_CLOSE):].lstrip("\n")
    out.append(rest)
    return "".join(out)


def opens_thinking(prompt: str) -> bool:
    """Whether a rendered prompt ends inside a ``<think>`` block (templates that start the reply's
    thinking themselves), so that the reply begins with thinking text."""
    return prompt.rfind(THINK_OPEN) > prompt.rfind(THINK_CLOSE)


class ThinkingFilter:
    """Splits streamed reply text into thinking (inside ``<think>...</think>``) and answer text, tags
    split across pieces included: ``feed(piece)`` and ``flush()`` return ``[(is_thinking, text)]``."""

    def __init__(self, thinking: bool = False):
        self.thinking = thinking
        self._held = ""

    def feed(self, piece: str) -> list[tuple[bool, str]]:
        out: list[tuple[bool, str]] = []
        s = self._held + piece
        self._held = ""
        while s:
            tag = THINK_CLOSE if self.thinking else THINK_OPEN
            i = s.find(tag)
            if i >= 0:
                if i:
                    out.append((self.thinking, s[:i]))
                self.thinking = not self.thinking
                s = s[i + len(tag):]
                continue
            keep = next((k for k in range(min(len(tag) - 1, len(s)), 0, -1) if tag.startswith(s[-k:])), 0)
            if len(s) > keep:
                out.append((self.thinking, s[:len(s) - keep]))
            self._held = s[len(s) - keep:]
            break
        return out

    def flush(self) -> list[tuple[bool, str]]:
        held, self._held = self._held, ""
        return [(self.thinking, held)] if held else []


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _SigintFlag:
    """While active, Ctrl-C sets ``self.hit`` instead of raising (so a reply can stop cleanly)."""

    def __init__(self):
        self.hit = False
        self._old = None

    def __enter__(self):
        self.hit = False
        try:
            self._old = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def _handler(self, signum, frame):
        self.hit = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


class Warmup:
    """Compiles the model's forward pass in a background thread (:meth:`Model.warmup`), so that a
    chat prompt appears at once on a fresh install while Numba compiles (tens of seconds the first
    time, a fraction of a second from its cache afterwards). :meth:`wait` blocks until it is done,
    with a one-line status (what is compiling, seconds so far) on ``err`` when that takes long."""

    def __init__(self, model, err=None):
        self.model = model
        self.err = err if err is not None else sys.stderr
        self.t0 = time.monotonic()
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.finished = threading.Event()
        threading.Thread(target=self._run, name="ggq-warmup", daemon=True).start()

    def _run(self):
        try:  # on a first run: ready once the model can run, the forward still compiling
            self.model.warmup(repackers=False, wait=False)
        except BaseException as e:  # re-raised by wait() in the caller's thread
            self.error = e
        finally:
            self.done.set()
        try:  # then, off the first reply's path, the repackers for the next load
            self.model.compile_repackers()
        except Exception:  # an optimisation only: the next load falls back to numpy
            pass
        try:
            if self.error is None:
                self.model.finish_compile()  # first run: the compiled forward, once the helper has it
        except Exception:  # the Python-level forward keeps working
            pass
        finally:
            self.finished.set()

    def finish(self) -> None:
        """Before the process exits: wait for the background compile of the forward pass and the
        repackers (first run only; they make the next start and the next load of a large file
        several times faster)."""
        if not self.finished.wait(0.2):
            self.err.write("ggq: finishing the one-time compile of the forward pass and weight repackers...\n")
            self.err.flush()
            self.finished.wait()

    def status(self) -> str:
        types = ", ".join(self.model.compiled_types)
        return f"compiling the runtime for {types} (first run only; cached afterwards): {time.monotonic() - self.t0:.0f} s"

    def wait(self, announce_after: float = 0.5) -> None:
        """Block until the warm-up is done; after ``announce_after`` s show the status, updated in
        place on a terminal. Raises what the warm-up raised."""
        if not self.done.wait(announce_after):
            tty = getattr(self.err, "isatty", lambda: False)()
            if not tty:
                self.err.write(f"ggq: {self.status()}\n")
                self.err.flush()
            while not self.done.wait(1.0 if tty else None):
                self.err.write(f"\rggq: {self.status()}")
                self.err.flush()
            if tty:
                self.err.write("\r\033[K")
            else:
                self.err.write(f"ggq: compiled in {time.monotonic() - self.t0:.0f} s\n")
            self.err.flush()
        if self.error is not None:
            raise self.error


@dataclass
class GenStats:
    n_prompt: int = 0          # tokens evaluated for the prompt (after cache reuse)
    n_cached: int = 0          # prompt tokens reused from the KV cache
    n_gen: int = 0             # tokens generated
    t_prompt: float = 0.0      # seconds
    t_gen: float = 0.0         # seconds
    stop: str = ""             # "eog", "length", "ctx", "interrupt"
    text: str = ""

    def summary(self) -> str:
        pp = self.n_prompt / self.t_prompt if self.t_prompt > 0 else 0.0
        tg = (self.n_gen - 1) / self.t_gen if self.t_gen > 0 and self.n_gen > 1 else 0.0
        return (f"prompt: {self.n_prompt} tokens ({self.n_cached} cached), {pp:.1f} tok/s | "
                f"generated: {self.n_gen} tokens, {tg:.1f} tok/s | stop: {self.stop}")


@dataclass
class Generator:
    """Drives a model: keeps the token list that is in its KV cache and generates from prompts.

    ``model``: a ``ggq.runtime.model.Model`` (``eval``, ``truncate``, ``reset``, ``n_ctx``).
    """

    model: object
    tok: Tokenizer
    params: SamplerParams = field(default_factory=SamplerParams)
    cached: list[int] = field(default_factory=list)

    def __post_init__(self):
        self.sampler = Sampler(self.params)

    def reset(self) -> None:
        self.model.reset()
        self.cached = []
        self.sampler.reset()

    def generate(self, prompt: list[int], n_predict: int = -1,
                 on_text: Callable[[str], None] | None = None, stop_flag: _SigintFlag | None = None) -> GenStats:
        """Evaluate ``prompt`` (reusing the cached prefix) and sample until EOG, ``n_predict`` tokens
        (``< 0``: no limit) or a full context. ``on_text`` receives text as it completes (UTF-8 safe).
        """
        st = GenStats()
        n_ctx = int(self.model.n_ctx)
        if len(prompt) >= n_ctx:
            raise GGQError(f"prompt is {len(prompt)} tokens, the context holds {n_ctx} (use --ctx-size)")
        keep = common_prefix(self.cached, prompt)
        if keep == len(prompt):  # need logits for the last prompt token: evaluate it again
            keep -= 1
        keep = max(0, min(keep, int(self.model.n_past)))
        self.model.truncate(keep)
        self.cached = list(prompt[:keep])
        st.n_cached = keep
        t0 = time.perf_counter()
        logits = self.model.eval(prompt[keep:])
        self.cached = list(prompt)
        st.n_prompt = len(prompt) - keep
        st.t_prompt = time.perf_counter() - t0
        self.sampler.reset()
        n_last = self.params.repeat_last_n  # -1: the whole context, as in llama.cpp
        self.sampler.accept_many(prompt if n_last < 0 else prompt[len(prompt) - n_last:] if n_last > 0 else [])
        dec = StreamDecoder(self.tok)
        out: list[str] = []
        t1 = time.perf_counter()
        st.stop = "length"
        while n_predict < 0 or st.n_gen < n_predict:
            if stop_flag is not None and stop_flag.hit:
                st.stop = "interrupt"
                break
            tid = self.sampler.sample(logits)
            if self.tok.is_eog(tid):
                st.stop = "eog"
                break
            self.sampler.accept(tid)
            st.n_gen += 1
            piece = dec.push(tid)
            if piece:
                out.append(piece)
                if on_text:
                    on_text(piece)
            if len(self.cached) + 1 >= n_ctx:
                st.stop = "ctx"
                break
            if n_predict >= 0 and st.n_gen >= n_predict:
                break
            if stop_flag is not None and stop_flag.hit:
                st.stop = "interrupt"
                break
            logits = self.model.eval([tid])
            self.cached.append(tid)
        rest = dec.flush()
        if rest:
            out.append(rest)
            if on_text:
                on_text(rest)
        st.t_gen = time.perf_counter() - t1
        st.text = "".join(out)
        return st


DIM, RESET = "\x1b[2m", "\x1b[0m"


def tokenize_rendered(tok: Tokenizer, text: str) -> list[int]:
    """Token ids of a rendered chat template: special tokens parsed, BOS added once (the template
    may write it itself)."""
    ids = tok.encode(text, add_special=False, parse_special=True)
    if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id):
        ids.insert(0, tok.bos_id)
    return ids


class ChatSession:
    """A conversation over one model: ``turn(user_text) -> GenStats`` streams the reply to ``out``.

    ``think``: how a reply's ``<think>...</think>`` block is printed: ``"dim"`` (faint, for a
    terminal), ``"show"`` (as generated) or ``"hide"``. The history keeps replies without it."""

    def __init__(self, model, tok: Tokenizer, template: ChatTemplate, params: SamplerParams | None = None,
                 system: str | None = None, n_predict: int = -1, out=None, think: str = "show"):
        self.gen = Generator(model, tok, params or SamplerParams())
        self.tok, self.template = tok, template
        self.system, self.n_predict = system, n_predict
        self.out = out if out is not None else sys.stdout
        if think not in ("dim", "show", "hide"):
            raise GGQError(f"unknown thinking display {think!r} (dim, show, hide)")
        self.think = think
        self._opens_thinking = False
        self.messages: list[dict] = []
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (keeps the system prompt) and clear the KV cache."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.gen.reset()

    def tokens_for(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Rendered and tokenized conversation (special tokens parsed, BOS added once)."""
        text = self.template.render(messages, add_generation_prompt)
        self._opens_thinking = opens_thinking(text)
        return tokenize_rendered(self.tok, text)

    def _fit(self, msgs: list[dict]) -> list[int]:
        """Tokens of ``msgs``; drops the oldest turns (not the system prompt) until they fit."""
        n_ctx = int(self.gen.model.n_ctx)
        budget = n_ctx - max(16, min(256, n_ctx // 4))
        ids = self.tokens_for(msgs)
        while len(ids) > budget:
            first = 1 if msgs and msgs[0]["role"] == "system" else 0
            if len(msgs) - first <= 1:
                break
            del msgs[first:first + 2 if len(msgs) - first > 2 else first + 1]
            ids = self.tokens_for(msgs)
        return ids

    def _writer(self):
        """(emit(piece), finish()) printing a reply's pieces with the thinking block as ``think`` says."""
        if self.think == "show":
            def emit(piece: str) -> None:
                self.out.write(piece)
                self.out.flush()
            return emit, lambda: None
        filt = ThinkingFilter(self._opens_thinking)
        dimmed = [False]

        def write(parts, end: bool = False) -> None:
            for thinking, text in parts:
                if thinking and self.think == "hide":
                    continue
                if thinking != dimmed[0]:  # entering or leaving the thinking block
                    self.out.write(DIM if thinking else RESET)
                    dimmed[0] = thinking
                self.out.write(text)
            if end and dimmed[0]:
                self.out.write(RESET)
            self.out.flush()

        return (lambda piece: write(filt.feed(piece))), (lambda: write(filt.flush(), end=True))

    def turn(self, user_text: str, stop_flag: _SigintFlag | None = None) -> GenStats:
        msgs = self.messages + [{"role": "user", "content": user_text}]
        ids = self._fit(msgs)
        emit, finish = self._writer()
        st = self.gen.generate(ids, self.n_predict, on_text=emit, stop_flag=stop_flag)
        finish()
        # the thinking is not part of the conversation (Qwen 3's own template drops it too)
        text = THINK_OPEN + st.text if self._opens_thinking else st.text
        msgs.append({"role": "assistant", "content": strip_thinking(text)})
        self.messages = msgs
        return st


HELP = "/reset clears the conversation, /exit (or Ctrl-D) quits, Ctrl-C stops a reply"


def chat_loop(session: ChatSession, name: str = "", verbose: bool = False, inp=None,
              warmup: Warmup | None = None) -> None:
    """Interactive loop on stdin/stdout: read a line, stream the reply; ``/reset``, ``/exit``.
    With ``warmup``, the first reply waits for the background compile (with a status line)."""
    out = session.out
    interactive = sys.stdin.isatty() if inp is None else False
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    err = sys.stderr
    if name:
        err.write(f"ggq: chatting with {name}. {HELP}\n")
        err.flush()
    prompt_str = "> " if interactive else ""
    ctrl_c = 0
    while True:
        try:
            if inp is None:
                line = input(prompt_str)
            else:
                line = inp.readline()
                if not line:
                    raise EOFError
                line = line.rstrip("\n")
            ctrl_c = 0
        except EOFError:
            if interactive:
                out.write("\n")
            break
        except KeyboardInterrupt:
            if ctrl_c:
                out.write("\n")
                break
            ctrl_c = 1
            out.write("\n(Ctrl-C again, /exit or Ctrl-D to quit)\n")
            out.flush()
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "/bye"):
            break
        if text == "/reset":
            session.reset()
            err.write("(conversation cleared)\n")
            err.flush()
            continue
        if text in ("/help", "/?"):
            err.write(HELP + "\n")
            err.flush()
            continue
        if warmup is not None:
            try:
                warmup.wait()
            except KeyboardInterrupt:  # Ctrl-C while compiling drops this question, not the session
                err.write("\n")
                out.write("[stopped]\n")
                out.flush()
                continue
        try:
            with _SigintFlag() as flag:
                st = session.turn(text, stop_flag=flag)
        except GGQError as e:  # e.g. a message longer than the context: say so, keep the session
            err.write(f"ggq: error: {e}\n")
            err.flush()
            continue
        if st.stop == "interrupt":
            out.write(" [stopped]")
        out.write("\n")
        out.flush()
        if verbose:
            err.write(st.summary() + "\n")
            err.flush()


# ---------------------------------------------------------------------- entry points for the CLI

def load(model_path: str, n_ctx: int | None, n_threads: int | None, kv_type: str = "f16", loras=None,
         lora_type: str = "same", n_seq: int = 1):
    """Load a model (KV cache elements ``kv_type``, ``f16`` or ``f32``; ``n_seq`` sequences; LoRA
    adapters ``loras``, ``(file, scale)`` pairs merged at load as ``lora_type`` says) and its
    tokenizer: ``(model, tokenizer)``. Raises GGQError on a bad file."""
    from ggq.runtime.model import Model

    model = Model.load(model_path, n_ctx=n_ctx, n_threads=n_threads, kv_type=kv_type, loras=loras,
                       lora_type=lora_type, n_seq=n_seq)
    tok = Tokenizer.from_metadata(model.metadata, source=str(model_path))
    return model, tok


def _chat_setup(model, tok, params, system, n_predict, no_think: bool, hide_think: bool, out=None) -> ChatSession:
    """The ChatSession of ``ggq run`` / ``ggq generate --chat``: the file's template (else its
    family's), ``enable_thinking`` false with ``no_think``, the thinking block hidden with
    ``hide_think``, else dimmed on a terminal."""
    options = {"enable_thinking": False} if no_think else {}
    template = ChatTemplate.for_model(model.metadata, tok, model.family.chat_template, model.path.name, **options)
    out = out if out is not None else sys.stdout
    think = "hide" if hide_think else "dim" if out.isatty() else "show"
    return ChatSession(model, tok, template, params, system=system, n_predict=n_predict, out=out, think=think)


def run_chat(model_path: str, params: SamplerParams, system: str | None = None, n_predict: int = -1,
             n_ctx: int | None = None, n_threads: int | None = None, verbose: bool = False,
             kv_type: str = "f16", no_think: bool = False, hide_think: bool = False, loras=None,
             lora_type: str = "same") -> None:
    """``ggq run``: interactive chat with the model at ``model_path`` (LoRA adapters ``loras``)."""
    from pathlib import Path

    model, tok = load(model_path, n_ctx, n_threads, kv_type, loras, lora_type)
    session = _chat_setup(model, tok, params, system, n_predict, no_think, hide_think)
    if session.template.origin == "plain":
        sys.stderr.write("ggq: this file has no chat template; using a plain 'User:/Assistant:' layout\n")
    elif session.template.origin == "family":
        sys.stderr.write(f"ggq: this file has no chat template; using {model.family.name}'s chat format\n")
    name = model.metadata.get("general.name") or Path(model_path).name
    warmup = Warmup(model)  # compiles while the user types the first question
    chat_loop(session, name=str(name), verbose=verbose, warmup=warmup)
    warmup.finish()


def run_generate(model_path: str, prompt: str, params: SamplerParams, n_predict: int = -1, chat: bool = False,
                 system: str | None = None, n_ctx: int | None = None, n_threads: int | None = None,
                 verbose: bool = False, kv_type: str = "f16", no_think: bool = False,
                 hide_think: bool = False, loras=None, lora_type: str = "same") -> None:
    """``ggq generate``: print the continuation of ``prompt`` (or the chat reply with ``chat``) to stdout
    (LoRA adapters ``loras``)."""
    model, tok = load(model_path, n_ctx, n_threads, kv_type, loras, lora_type)
    out = sys.stdout
    warmup = Warmup(model)
    warmup.wait(announce_after=1.0)  # a status line while Numba compiles (first run)
    with _SigintFlag() as flag:
        if chat:
            st = _chat_setup(model, tok, params, system, n_predict, no_think, hide_think, out).turn(prompt, flag)
        else:
            ids = tok.encode(prompt, add_special=True, parse_special=True)
            if not ids:
                raise GGQError("empty prompt")

            def emit(s: str) -> None:
                out.write(s)
                out.flush()

            st = Generator(model, tok, params).generate(ids, n_predict, on_text=emit, stop_flag=flag)
    out.write("\n")
    out.flush()
    if verbose:
        sys.stderr.write(st.summary() + "\n")
    warmup.finish()
