"""The GGUF-metadata tokenizer against llama.cpp.

Reference 1: llama.cpp's own tokenizer test vectors (``ggml-vocab-*.gguf.inp/.out``), read the way
tests/test-tokenizer-0.cpp reads them and tokenized as it does (add_special=false,
parse_special=false). Reference 2 (slow): llama.cpp itself through llama-cpp-python on a vocab-only
load, for special-token parsing, BOS/EOS, token pieces and end-of-generation ids.
"""

from __future__ import annotations

import ctypes

import pytest

from conftest import VOCABS
from ggq.runtime.tokenizer import StreamDecoder, Tokenizer, read_metadata

NAMES = ["gpt-2", "llama-bpe", "llama-spm", "phi-3", "qwen2"]
SEP = "\n__ggml_vocab_test__\n"


def _vocab(name: str):
    path = VOCABS / f"ggml-vocab-{name}.gguf"
    if not path.exists():
        pytest.skip(f"{path} not found")
    return path


def _cases(path):
    raw = open(f"{path}.inp", encoding="utf-8", newline="").read()
    inp, pos = [], 0
    while pos < len(raw):  # same splitting as read_tests() in test-tokenizer-0.cpp
        j = raw.find(SEP, pos)
        if j < 0:
            inp.append(raw[pos:])
            break
        inp.append(raw[pos:j])
        pos = j + len(SEP)
    out = [[int(x) for x in line.split()] for line in open(f"{path}.out", encoding="utf-8").read().splitlines()]
    assert len(inp) == len(out)
    return list(zip(inp, out))


_TOKS: dict = {}


def _tok(name):
    if name not in _TOKS:
        _TOKS[name] = Tokenizer.from_gguf(_vocab(name))
    return _TOKS[name]


@pytest.mark.parametrize("name", NAMES)
def test_llamacpp_vectors(name):
    tok = _tok(name)
    cases = _cases(_vocab(name))
    bad = [(s, got, exp) for s, exp in cases if (got := tok.encode(s, add_special=False, parse_special=False)) != exp]
    assert not bad, f"{name}: {len(bad)}/{len(cases)} differ, first: {bad[0]!r}"


@pytest.mark.parametrize("name", NAMES)
def test_vectors_roundtrip(name):
    """Decoding llama.cpp's ids gives back the input (SPM: the added prefix space removed)."""
    tok = _tok(name)
    for s, exp in _cases(_vocab(name)):
        if tok.kind == "llama" and s.startswith(" "):
            continue  # llama.cpp's detokenize also drops one leading space there
        assert tok.decode(exp) == s


def test_stream_decoder_utf8_split():
    tok = _tok("llama-spm")
    text = "🦙 ünï"
    ids = tok.encode(text, add_special=False)
    assert any(tok.token_type[i] == 6 for i in ids), "expect byte-fallback tokens for the emoji"
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "\ufffd" not in "".join(pieces)
    assert "".join(pieces) == " " + text
    assert all("\ufffd" not in p for p in pieces)


def test_bad_metadata(tmp_path):
    from ggq.errors import GGQError

    with pytest.raises(GGQError):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(GGQError):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "nope", "tokenizer.ggml.tokens": ["a"]})
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGML" + b"\0" * 40)
    with pytest.raises(GGQError):
        read_metadata(bad)
    bad.write_bytes(b"GGUF\x03\0\0\0" + b"\0" * 8 + b"\x05" + b"\0" * 7 + b"\x40")
    with pytest.raises(GGQError):
        read_metadata(bad)


# ------------------------------------------------------------------ against llama.cpp itself

TEXTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "Hello <s> world</s>  <|endoftext|>x",
    "  leading spaces\n\n\ttabs 12345 ünïcödé 你好 🦙",
    "<|user|>\nhi<|end|>\n<|assistant|>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "",
    " ",
]


def _llama(path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp, llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


def _all_paths():
    return [pytest.param(n, id=n) for n in NAMES] + [pytest.param("smollm2", id="smollm2")]


@pytest.mark.slow
@pytest.mark.parametrize("name", _all_paths())
def test_against_llamacpp(name, request):
    path = request.getfixturevalue("smollm2_gguf") if name == "smollm2" else _vocab(name)
    llama_cpp, llm = _llama(path)
    tok = Tokenizer.from_gguf(path)
    for s in TEXTS:
        for add in (False, True):
            for special in (False, True):
                exp = llm.tokenize(s.encode(), add_bos=add, special=special)
                assert tok.encode(s, add, special) == exp, (s, add, special)
    vocab = llm._model.vocab
    assert tok.bos_id == llm.token_bos() and tok.eos_id == llm.token_eos()
    buf = (ctypes.c_char * 512)()
    for i in range(tok.n_vocab):
        assert tok.is_eog(i) == bool(llama_cpp.llama_vocab_is_eog(vocab, i)), i
        for special in (False, True):
            n = llama_cpp.llama_token_to_piece(vocab, i, buf, 512, 0, special)
            assert tok.token_to_piece(i, special) == bytes(buf[:n]), (i, special)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_wikitext_against_llamacpp(name):
    """20 kB of real text (wikitext-2 test) tokenizes exactly as llama.cpp does."""
    from conftest import WIKITEXT

    if not WIKITEXT.exists():
        pytest.skip(f"{WIKITEXT} not found")
    path = _vocab(name)
    _, llm = _llama(path)
    text = WIKITEXT.read_text(encoding="utf-8")[:20000]
    assert _tok(name).encode(text, add_special=True) == llm.tokenize(text.encode(), add_bos=True, special=False)
