"""Constrained decoding for ``ggq serve`` with llguidance (the grammar engine llama.cpp uses).

:class:`Grammars` turns a GGUF vocabulary (:class:`ggq.runtime.tokenizer.Tokenizer`) into an
``llguidance.LLTokenizer`` once (about 0.2 s for 49k tokens), compiles JSON schemas and Lark
grammars into llguidance grammars, and checks them against that vocabulary. :class:`Constraint`
is one request's matcher: before each draw the engine asks it for the set of allowed tokens and
masks the other logits to ``-inf``; after the draw it feeds the token back. When the grammar is
complete the only allowed tokens are the end-of-generation ones, so the reply ends there.

The vocabulary is handed to llguidance as one byte string per token, as llguidance's own
llama.cpp bridge builds it: the bytes :meth:`Tokenizer.token_to_piece` gives (SentencePiece ``▁``
as a space, ``<0xNN>`` as that byte, GPT-2 byte-level BPE mapped back to bytes), and for control
tokens (and user-defined tokens written like ``<...>``) their text after a ``0xFF`` byte, which
marks a special token that grammars name as ``<name>`` or ``<[id]>``. Tokenizing text (llguidance
needs it to match grammar literals canonically) is ggq's own ``Tokenizer.encode`` without
SentencePiece's space prefix (the text continues the reply: its tokens must spell exactly it).

JSON output is compact (llguidance's ``whitespace_flexible`` off: no whitespace between tokens,
``,`` and ``:`` separators) unless the schema's ``x-guidance`` says otherwise: a small model left
free to emit whitespace can fill its whole budget with it.
"""

from __future__ import annotations

import json
import threading

import numpy as np

from ggq.errors import GGQError, one_line
from ggq.runtime.tokenizer import TT_CONTROL, TT_UNKNOWN, TT_USER_DEFINED, Tokenizer

#: JSON compile options for response_format schemas (a schema's "x-guidance" overrides them)
JSON_DEFAULTS = {"whitespace_flexible": False}


def _llguidance():
    try:
        import llguidance
        import llguidance.numpy  # noqa: F401
    except ImportError as e:  # pragma: no cover
        raise GGQError(f"constrained output needs the 'llguidance' package ({e})") from None
    return llguidance


def token_bytes(tok: Tokenizer) -> list[bytes]:
    """One byte string per token id for ``llguidance.LLTokenizer``: the token's bytes, or
    ``b"\\xff" + text`` for a special token (control, unknown, or user-defined ``<...>``)."""
    out = []
    for i, text in enumerate(tok.tokens):
        tt = tok.token_type[i]
        if tt in (TT_CONTROL, TT_UNKNOWN) or (tt == TT_USER_DEFINED and text.startswith("<") and text.endswith(">")):
            out.append(b"\xff" + text.encode("utf-8"))
        else:
            out.append(tok.token_to_piece(i))
    return out


class _Wrapped:
    """The tokenizer object ``llguidance.TokenizerWrapper`` expects."""

    def __init__(self, tok: Tokenizer):
        self._tok = tok
        self.tokens = token_bytes(tok)
        self.eos_token_id = tok.eos_id if tok.eos_id is not None else min(tok.eog_ids, default=0)
        self.bos_token_id = tok.bos_id
        self.special_token_ids = [i for i, b in enumerate(self.tokens) if b.startswith(b"\xff")]

    def __call__(self, text) -> list[int]:
        """Token ids of a piece of grammar text, spelling exactly its bytes: no SentencePiece space
        prefix (with one, ``{`` would come back as ``▁{``, i.e. `` {``)."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tok.encode(text, add_special=False, parse_special=False, space_prefix=False)


class Grammars:
    """Grammar compilation and checking for one vocabulary. Thread-safe; the llguidance tokenizer
    is built on first use."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self._lltok = None
        self._lock = threading.Lock()

    @property
    def lltok(self):
        """The ``llguidance.LLTokenizer`` of this vocabulary (end-of-generation tokens as EOS)."""
        with self._lock:
            if self._lltok is None:
                llg = _llguidance()
                eos = sorted(self.tok.eog_ids) or [self.tok.eos_id or 0]
                self._lltok = llg.LLTokenizer(llg.TokenizerWrapper(_Wrapped(self.tok)), n_vocab=self.tok.n_vocab,
                                              eos_token=eos)
            return self._lltok

    def special_token(self, text: str) -> str | None:
        """The Lark name ``<[id]>`` of the special token whose text is ``text``, else None."""
        i = self.tok.token_to_id.get(text)
        if i is None:
            return None
        tt = self.tok.token_type[i]
        if tt in (TT_CONTROL, TT_UNKNOWN) or (tt == TT_USER_DEFINED and text.startswith("<") and text.endswith(">")):
            return f"<[{i}]>"
        return None

    @staticmethod
    def from_json_schema(schema) -> str:
        """The llguidance grammar of a JSON schema (a dict; compact JSON by default). GGQError if it
        is not a JSON object."""
        llg = _llguidance()
        if not isinstance(schema, dict):
            raise GGQError("the schema must be a JSON object")
        try:
            return llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_DEFAULTS)
        except (ValueError, TypeError) as e:
            raise GGQError(f"invalid JSON schema: {one_line(str(e), 300)}") from None

    @staticmethod
    def from_lark(lark: str) -> str:
        """The llguidance grammar of a Lark grammar (llguidance's dialect: ``%json {...}``,
        special tokens as ``<[id]>``)."""
        return _llguidance().LLMatcher.grammar_from_lark(lark)

    def check(self, grammar: str) -> None:
        """GGQError with llguidance's message if ``grammar`` does not compile for this vocabulary."""
        llg = _llguidance()
        is_error, msgs = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.lltok)
        if is_error:
            raise GGQError(f"the grammar engine refused it: {one_line(msgs[0] if msgs else 'invalid grammar', 400)}")

    def constraint(self, grammar: str) -> "Constraint":
        """A fresh :class:`Constraint` for one request. GGQError with llguidance's message if the
        grammar does not compile (the matcher reports it instead of raising)."""
        llg = _llguidance()
        m = llg.LLMatcher(self.lltok, grammar, log_level=0)
        if m.is_error():
            raise GGQError(f"the grammar engine refused it: {one_line(m.get_error(), 400)}")
        return Constraint(m, self.tok.n_vocab)


class Constraint:
    """One request's llguidance matcher over ``n_vocab`` tokens.

    :meth:`allowed` -> bool ``(n_vocab,)`` mask of the tokens the grammar accepts next (only
    end-of-generation tokens once it is complete); :meth:`apply` masks a logits vector;
    :meth:`accept` advances by the drawn token. GGQError if the matcher fails (a token outside the
    mask, or llguidance's own limits)."""

    def __init__(self, matcher, n_vocab: int):
        self.matcher = matcher
        self.n_vocab = n_vocab
        self._bits = _llguidance().numpy.allocate_token_bitmask(1, n_vocab)

    def allowed(self) -> np.ndarray:
        """bool (n_vocab,): True where a token may come next."""
        llg = _llguidance()
        llg.numpy.fill_next_token_bitmask(self.matcher, self._bits)
        if self.matcher.is_error():
            raise GGQError(f"constrained decoding failed: {one_line(self.matcher.get_error(), 300)}")
        return np.unpackbits(self._bits[0].view(np.uint8), bitorder="little")[:self.n_vocab].astype(bool)

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """``logits`` (float32 (n_vocab,), modified in place and returned) with every token the
        grammar refuses at ``-inf``. GGQError if it refuses every token."""
        ok = self.allowed()
        if not ok.any():
            raise GGQError("constrained decoding failed: the grammar allows no token here")
        logits[~ok] = -np.inf
        return logits

    def accept(self, token: int) -> None:
        """Advance the grammar by ``token``."""
        if not self.matcher.consume_token(int(token)):
            raise GGQError(f"constrained decoding failed: {one_line(self.matcher.get_error(), 300)}")

    @property
    def done(self) -> bool:
        """The grammar is complete: only end of generation may follow."""
        return self.matcher.is_stopped()
