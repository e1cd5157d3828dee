"""Constrained decoding (``ggq/serve/constrain.py``) on llama.cpp's vocabularies, without a model.

Random logits stand in for a model: at each step the grammar's mask is applied and the best
surviving token is taken, so the grammar alone decides what is well formed. The tokens are then
decoded by ggq's own Tokenizer (strict UTF-8) and checked by an independent validator
(``jsonschema``) or parser (``json``, ``ggq.serve.tools.parse``). A wrong byte mapping for the
vocabulary handed to llguidance (SentencePiece ``▁``, ``<0xNN>`` byte tokens, GPT-2 byte-level BPE,
special tokens) would give text that does not decode or does not validate.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import VOCABS

llguidance = pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

NAMES = ["llama-spm", "phi-3", "gpt-2", "llama-bpe", "qwen2"]

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 16},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "ok": {"type": "boolean"},
                         "kind": {"enum": ["cat", "dog", "ünïcödé ✓"]},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
                         "pos": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9,
                                                                        "maximum": 9}},
                                 "required": ["x"], "additionalProperties": False}},
          "required": ["name", "age", "ok", "kind", "tags", "pos"], "additionalProperties": False}


def _tok(name: str, md_edit=None):
    from ggq.runtime.tokenizer import Tokenizer, read_metadata

    path = VOCABS / f"ggml-vocab-{name}.gguf"
    if not path.exists():
        pytest.skip(f"{path} not found")
    md = dict(read_metadata(path))
    if md_edit:
        md_edit(md)
    return Tokenizer.from_metadata(md, path.name)


def _generate(con, tok, seed: int, limit: int = 600) -> list[int]:
    """Token ids drawn as the argmax of random logits under the constraint, until end of generation."""
    rng = np.random.default_rng(seed)
    ids: list[int] = []
    for _ in range(limit):
        x = (rng.standard_normal(tok.n_vocab) * 4).astype(np.float32)
        con.apply(x)
        t = int(np.argmax(x))
        con.accept(t)
        if tok.is_eog(t):
            assert con.done
            return ids
        ids.append(t)
    raise AssertionError(f"no end of generation after {limit} tokens: {tok.decode(ids)!r}")


@pytest.mark.parametrize("name", NAMES)
def test_json_schema_under_random_logits_validates(name):
    from ggq.serve.constrain import Grammars

    tok = _tok(name)
    g = Grammars(tok)
    grammar = g.from_json_schema(SCHEMA)
    for seed in range(3):
        ids = _generate(g.constraint(grammar), tok, seed)
        text = tok.decode_bytes(ids).decode("utf-8")  # strict: the bytes llguidance matched are the text's
        jsonschema.validate(json.loads(text), SCHEMA)


@pytest.mark.parametrize("name", ["llama-spm", "gpt-2"])
def test_vocabulary_bytes(name):
    """Token byte strings: SentencePiece ``▁`` is a space and ``<0xNN>`` the byte NN; GPT-2's
    byte-level symbols map back to bytes; control tokens are marked with 0xFF."""
    from ggq.serve.constrain import token_bytes

    tok = _tok(name)
    tb = token_bytes(tok)
    if name == "llama-spm":
        assert tb[tok.token_to_id["<0x41>"]] == b"A" and tb[tok.token_to_id["<0x0A>"]] == b"\n"
        # grammar text is tokenized without the space prefix: "{" is "{", not "▁{"
        assert [tb[i] for i in tok.encode("{", add_special=False, space_prefix=False)] == [b"{"]
        assert [tb[i] for i in tok.encode("{", add_special=False)] == [b" {"]
        assert tb[tok.token_to_id["▁the"]] == b" the"
        assert tb[tok.bos_id] == b"\xff<s>"
    else:
        assert tb[tok.token_to_id["Ġthe"]] == b" the" and tb[tok.token_to_id["Ċ"]] == b"\n"
        assert tb[tok.eos_id] == b"\xff<|endoftext|>"
    text = "Hello wörld, ✓ 你好!"
    ids = tok.encode(text, add_special=False)
    assert b"".join(tb[i] for i in ids).decode().strip() == text


def test_bad_schemas_are_refused():
    from ggq.errors import GGQError
    from ggq.serve.constrain import Grammars

    g = Grammars(_tok("gpt-2"))
    for schema in ({"type": "florp"}, {"$ref": "#/definitions/nowhere"}, {"type": "string", "pattern": "(("}):
        with pytest.raises(GGQError, match="grammar engine refused"):
            g.constraint(g.from_json_schema(schema))
    with pytest.raises(GGQError):
        g.from_json_schema([1, 2])


def _with_tool_tokens(md):
    """Add ``<tool_call>`` / ``</tool_call>`` as user-defined tokens, as Qwen 2.5's vocabulary has
    them, and ``[TOOL_CALLS]`` as a control token, as Mistral's."""
    from ggq.runtime.tokenizer import TT_CONTROL, TT_USER_DEFINED

    added = (("<tool_call>", TT_USER_DEFINED), ("</tool_call>", TT_USER_DEFINED), ("[TOOL_CALLS]", TT_CONTROL))
    md["tokenizer.ggml.tokens"] = list(md["tokenizer.ggml.tokens"]) + [t for t, _ in added]
    md["tokenizer.ggml.token_type"] = list(md["tokenizer.ggml.token_type"]) + [tt for _, tt in added]
    if "tokenizer.ggml.scores" in md:
        md["tokenizer.ggml.scores"] = list(md["tokenizer.ggml.scores"]) + [0.0] * len(added)


PARAMS = {"type": "object", "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 12},
                                           "unit": {"enum": ["c", "f"]}},
          "required": ["city", "unit"], "additionalProperties": False}
FUNCS = [{"name": "get_weather", "parameters": PARAMS},
         {"name": "get_time", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}]


@pytest.mark.parametrize("fmt", ["hermes", "llama3", "mistral"])
@pytest.mark.parametrize("name", ["gpt-2", "llama-spm"])
def test_forced_tool_call_grammar_parses(fmt, name):
    """A forced call in each syntax, markers as special tokens where the vocabulary has them: the
    decoded reply (control tokens rendered, as the server decodes with tools) parses into one call
    whose arguments validate."""
    from ggq.serve import tools as tc
    from ggq.serve.constrain import Grammars

    tok = _tok(name, _with_tool_tokens)
    g = Grammars(tok)
    f = tc.ToolFormat(fmt, True)
    lark = tc.grammar_lark(f, FUNCS[:1], g.special_token)
    if fmt == "hermes":
        assert "<[" in lark  # the markers are the special tokens, not their spelling
    for seed in range(2):
        ids = _generate(g.constraint(g.from_lark(lark)), tok, seed)
        if fmt != "llama3":
            assert ids[0] == tok.token_to_id[{"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]"}[fmt]]
        text = tok.decode_bytes(ids, special=f.special_text).decode("utf-8")
        content, calls = tc.parse(text, f)
        assert content is None and len(calls) == 1 and calls[0]["function"]["name"] == "get_weather", text
        jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), PARAMS)
    # "required" over two functions: either one, valid
    ids = _generate(g.constraint(g.from_lark(tc.grammar_lark(f, FUNCS, g.special_token))), tok, 7)
    _, calls = tc.parse(tok.decode_bytes(ids, special=f.special_text).decode("utf-8"), f)
    assert len(calls) == 1 and calls[0]["function"]["name"] in ("get_weather", "get_time")
