"""Tokenizer built from a GGUF file's own ``tokenizer.*`` metadata, tokenizing exactly as llama.cpp.

Two vocabulary kinds are supported, named by ``tokenizer.ggml.model``:

``gpt2`` (byte-level BPE)
    The BPE merge loop runs in Hugging Face ``tokenizers`` (a ``models.BPE`` built from
    ``tokenizer.ggml.tokens``/``merges``), after a pre-tokenizer made of the regexes llama.cpp's
    ``llm_tokenizer_bpe`` (src/llama-vocab.cpp) lists for the ``tokenizer.ggml.pre`` name, applied one
    after the other (each splits the pieces of the one before), then GPT-2's byte-to-unicode map.
    ``ignore_merges`` (a whole pre-token found in the vocabulary is taken as is) is set for the pre
    names where llama.cpp sets it (llama3 family, tekken, ...).
``llama`` (SentencePiece BPE)
    llama.cpp's ``llm_tokenizer_spm_session``: spaces become U+2581, the text is cut into UTF-8
    characters, adjacent symbols whose concatenation is a token are merged best score first (ties:
    leftmost), and a symbol that is no token falls back to its ``<0xXX>`` byte tokens. A space is
    prefixed to every text fragment that starts the text or follows a special token when
    ``tokenizer.ggml.add_space_prefix`` (default true) says so. This loop is our own (pure Python).

Around both, the llama.cpp layer is our own code, following ``llama_vocab::impl::tokenize``: special
tokens (types CONTROL, USER_DEFINED, UNKNOWN) are cut out of the text longest first
(``tokenizer_st_partition``); with ``parse_special=False`` CONTROL and UNKNOWN tokens are left as
plain text but USER_DEFINED ones are still matched. BOS/EOS are added per
``tokenizer.ggml.add_bos_token``/``add_eos_token`` (or the pre-tokenizer's default, e.g. llama3
adds BOS). End-of-generation ids follow llama.cpp's list (EOS, EOT, and tokens such as
``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ``<|endoftext|>``).
"""

from __future__ import annotations

import heapq
from functools import lru_cache

from ggq.errors import GGQError, show

# llama.cpp token types (tokenizer.ggml.token_type)
TT_NORMAL, TT_UNKNOWN, TT_CONTROL, TT_USER_DEFINED, TT_UNUSED, TT_BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
           r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
           r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
           r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
          r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
          r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?"
          r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEFAULT = [r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"]
_STARCODER = [r"\p{N}", _GPT2]
_PORO = [r" ?[^(\s|.,!?…。，、।۔،)]+"]

#: tokenizer.ggml.pre -> (regexes applied in turn, ignore_merges, add_bos default)
#: as llm_tokenizer_bpe and llama_vocab::impl::load in llama.cpp's src/llama-vocab.cpp define them.
PRE_TOKENIZERS: dict[str, tuple[list[str], bool, bool]] = {
    "default": (_DEFAULT, False, False),
    **{n: ([_LLAMA3], True, True) for n in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1",
                                            "pixtral", "midm-2.0", "lfm2", "jina-v5-nano")},
    **{n: ([_LLAMA3], False, False) for n in ("dbrx", "smaug-bpe")},
    **{n: ([_LLAMA3], False, False) for n in ("chatglm-bpe",)},
    **{n: ([_LLAMA3], True, False) for n in ("glm4", "glm5")},
    "deepseek-coder": ([r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿]+", r"\p{N}"], False, False),
    "falcon": ([r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"[0-9][0-9][0-9]"], False, False),
    **{n: (_STARCODER, False, False) for n in ("starcoder", "refact", "command-r", "smollm", "codeshell",
                                              "exaone", "minerva-7b")},
    **{n: ([_GPT2], False, False) for n in ("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es",
                                            "jina-v2-de", "a.x-4.0", "mellum", "modern-bert", "mpt", "olmo",
                                            "jais", "trillion", "granite-docling", "exaone4", "jina-v1-en",
                                            "jina-v2-code", "roberta-bpe")},
    **{n: ([_QWEN2], False, False) for n in ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez",
                                             "stablelm2", "hunyuan")},
    "qwen35": ([_QWEN35], False, False),
    **{n: (_PORO, False, False) for n in ("poro-chat", "bloom", "gpt3-finnish")},
    "viking": (_PORO + [r"\p{N}"], False, False),
    "tekken": ([_TEKKEN], True, True),
    **{n: ([_GPT4O], False, False) for n in ("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2")},
}

#: token texts llama.cpp treats as end of generation (llama_vocab::impl::load, special_eog_ids)
_EOG_TEXTS = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "</s>", "[e~[",
}
#: FIM pad/repo/file-separator tokens, found by text when their key is absent; they end generation
_FIM_EOG_TEXTS = {
    "fim_pad_token_id": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep_token_id": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep_token_id": ("<|file_sep|>",),
}
#: token texts llama.cpp picks as EOT when tokenizer.ggml.eot_token_id is absent (first found)
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
              "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>")


_C_SPACE = " \t\n\v\f\r"  # C isspace()


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-unicode -> byte map (the inverse of gguf-py's bytes_to_unicode)."""
    from gguf.vocab import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def check_vocab_array(md: dict, key: str, kind, n: int | None, source: str) -> None:
    """GGQError unless ``md[key]`` (when present) is a list of ``kind`` values (bools are not
    numbers here) with ``n`` entries (None: any number)."""
    v = md.get(key)
    if v is None:
        return
    if not isinstance(v, list) or any(isinstance(x, bool) or not isinstance(x, kind) for x in v):
        what = {str: "strings", int: "integers"}.get(kind, "numbers")
        raise GGQError(f"{source}: {key} is not an array of {what}")
    if n is not None and len(v) != n:
        raise GGQError(f"{source}: {key} has {len(v)} entries for {n} tokens")


class Tokenizer:
    """Text <-> token ids for one GGUF vocabulary, with llama.cpp's semantics.

    Build with :meth:`from_metadata` (a dict of GGUF keys, e.g. ``Model.metadata``) or
    :meth:`from_gguf` (a path). Raises :class:`GGQError` for a vocabulary kind or pre-tokenizer it
    does not know.
    """

    def __init__(self, md: dict, source: str = "GGUF metadata"):
        self.source = source
        model = md.get("tokenizer.ggml.model")
        tokens = md.get("tokenizer.ggml.tokens")
        if model is None or tokens is None:
            raise GGQError(f"{source}: no tokenizer metadata (tokenizer.ggml.model / tokens missing)")
        check_vocab_array(md, "tokenizer.ggml.tokens", str, None, source)
        if not isinstance(model, str):
            raise GGQError(f"{source}: tokenizer.ggml.model is not a string")
        self.kind = model
        self.tokens: list[str] = list(tokens)
        n = len(self.tokens)
        if n == 0:
            raise GGQError(f"{source}: tokenizer.ggml.tokens is empty")
        check_vocab_array(md, "tokenizer.ggml.token_type", int, n, source)
        check_vocab_array(md, "tokenizer.ggml.scores", (int, float), n, source)
        check_vocab_array(md, "tokenizer.ggml.merges", str, None, source)
        types = md.get("tokenizer.ggml.token_type")
        self.token_type: list[int] = list(types) if types is not None else [TT_NORMAL] * n
        self.token_to_id: dict[str, int] = {}
        for i, t in enumerate(self.tokens):
            self.token_to_id.setdefault(t, i)
        self.pre = str(md.get("tokenizer.ggml.pre") or "default")

        add_bos_default = False
        if self.kind == "llama":
            self.scores = list(md.get("tokenizer.ggml.scores") or [0.0] * n)
            bos, eos, unk = 1, 2, 0
            add_bos_default = True
            self.add_space_prefix = True
            self._byte_tokens = [self.token_to_id.get(f"<0x{b:02X}>") for b in range(256)]
        elif self.kind == "gpt2":
            bos, eos, unk = 11, 11, None
            self.add_space_prefix = False
            if self.pre not in PRE_TOKENIZERS:
                raise GGQError(f"{source}: unsupported pre-tokenizer tokenizer.ggml.pre = {show(self.pre)}")
            regexes, ignore_merges, add_bos_default = PRE_TOKENIZERS[self.pre]
            merges = md.get("tokenizer.ggml.merges")
            if merges is None:
                raise GGQError(f"{source}: BPE vocabulary without tokenizer.ggml.merges")
            try:
                self._hf = _build_bpe(self.tokens, merges, regexes, ignore_merges)
            except GGQError as e:
                raise GGQError(f"{source}: {e}") from None
            self._bdec = _byte_decoder()
        else:
            raise GGQError(f"{source}: unsupported tokenizer model tokenizer.ggml.model = {show(self.kind)}")

        def _id(key, default):
            v = md.get(f"tokenizer.ggml.{key}")
            if v is None:
                return default if default is not None and 0 <= default < n else None
            if isinstance(v, bool) or not isinstance(v, int):
                raise GGQError(f"{source}: tokenizer.ggml.{key} is not an integer")
            return v if 0 <= v < n else (default if default is not None and 0 <= default < n else None)

        self.bos_id = _id("bos_token_id", bos)
        self.eos_id = _id("eos_token_id", eos)
        self.unk_id = _id("unknown_token_id", unk)
        self.eot_id = _id("eot_token_id", None)
        eom_id = _id("eom_token_id", None)
        if self.eot_id is None:
            for t in _EOT_TEXTS:
                if t in self.token_to_id:
                    self.eot_id = self.token_to_id[t]
                    break
        self.add_bos = bool(md.get("tokenizer.ggml.add_bos_token", add_bos_default))
        self.add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
        if "tokenizer.ggml.add_space_prefix" in md:
            self.add_space_prefix = bool(md["tokenizer.ggml.add_space_prefix"])
        if self.add_bos and self.bos_id is None:
            self.add_bos = False

        # end of generation, as llama.cpp's special_eog_ids; those found by text become control tokens
        self.eog_ids: set[int] = set()
        for key, texts in _FIM_EOG_TEXTS.items():
            v = _id(key, None)
            if v is None:  # llama.cpp finds these by text when the key is absent
                v = next((self.token_to_id[t] for t in texts if t in self.token_to_id), None)
            if v is not None:
                self.eog_ids.add(v)
                self.token_type[v] = TT_CONTROL
        for t in _EOG_TEXTS:
            v = self.token_to_id.get(t)
            if v is not None:
                self.eog_ids.add(v)
                self.token_type[v] = TT_CONTROL
        for v in (self.eos_id, self.eot_id, eom_id):
            if v is not None:
                self.eog_ids.add(v)
        s_id = self.token_to_id.get("</s>")
        if s_id in self.eog_ids and any(t in self.token_to_id for t in ("<|tool_response>", "<|plamo:eos|>")):
            self.eog_ids.discard(s_id)  # llama.cpp: '</s>' is a normal token there
            self.token_type[s_id] = TT_NORMAL

        # special tokens, longest text first (llama.cpp's cache_special_tokens)
        special = [i for i, t in enumerate(self.token_type) if t in (TT_CONTROL, TT_USER_DEFINED, TT_UNKNOWN)]
        special.sort(key=lambda i: -len(self.tokens[i].encode("utf-8")))
        self._special_all = special
        self._special_user = [i for i in special if self.token_type[i] == TT_USER_DEFINED]
        # per-token strip attributes llama.cpp sets by model name (llama_vocab::impl::load)
        self._lstrip: set[int] = set()
        self._rstrip: set[int] = set()
        name = str(md.get("general.name") or "").lower()
        if any(k in self.pre for k in ("jina-v2-de", "jina-v2-es", "jina-v2-code")) or \
                any(k in str(md.get("general.architecture") or "") for k in ("nomic-bert-moe", "jina-bert-v3")):
            if "<mask>" in self.token_to_id:
                self._lstrip.add(self.token_to_id["<mask>"])
        elif "phi-3" in name or "phi3" in name:
            self._rstrip.update(special)
            if "</s>" in self.token_to_id:
                self._rstrip.add(self.token_to_id["</s>"])
            for t in ("<unk>", "<s>", "<|endoftext|>"):
                self._rstrip.discard(self.token_to_id.get(t))
        elif "modern-bert" in name and "[MASK]" in self.token_to_id:
            self._lstrip.add(self.token_to_id["[MASK]"])
        self._pieces: list[bytes | None] = [None] * n

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_metadata(cls, md: dict, source: str = "GGUF metadata") -> "Tokenizer":
        """Build from a dict of GGUF keys -> python values (``tokenizer.ggml.*`` keys are read)."""
        return cls(md, source)

    @classmethod
    def from_gguf(cls, path) -> "Tokenizer":
        """Build from a GGUF file's metadata (reads only the key/value section)."""
        return cls(read_metadata(path), str(path))

    # ------------------------------------------------------------------ properties

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    def is_eog(self, token_id: int) -> bool:
        """True if ``token_id`` ends generation (EOS, EOT, ``<|im_end|>``, ... as llama.cpp's is_eog)."""
        return token_id in self.eog_ids

    def is_control(self, token_id: int) -> bool:
        return self.token_type[token_id] == TT_CONTROL

    # ------------------------------------------------------------------ encode

    def _partition(self, text: str, parse_special: bool) -> list:
        """Cut special tokens out of ``text``: a list of str (raw text) and int (token id) fragments."""
        frags: list = [text] if text else []
        specials = self._special_all if parse_special else self._special_user
        for sid in specials:
            stext = self.tokens[sid]
            if not stext:
                continue
            lstrip, rstrip = sid in self._lstrip, sid in self._rstrip
            out: list = []
            for f in frags:
                if not isinstance(f, str) or stext not in f:
                    out.append(f)
                    continue
                pos = 0
                while True:
                    j = f.find(stext, pos)
                    if j < 0:
                        if pos < len(f):
                            out.append(f[pos:])
                        break
                    left = f[pos:j]
                    if lstrip:
                        left = left.rstrip(_C_SPACE)
                    if left:
                        out.append(left)
                    out.append(sid)
                    pos = j + len(stext)
                    if rstrip:
                        while pos < len(f) and f[pos] in _C_SPACE:
                            pos += 1
            frags = out
        return frags

    def encode(self, text: str, add_special: bool = True, parse_special: bool = False,
               space_prefix: bool = True) -> list[int]:
        """Token ids of ``text`` (llama.cpp's ``llama_tokenize``).

        ``add_special``: add BOS (and EOS) as the vocabulary asks. ``parse_special``: turn the text of
        control tokens (``<|im_start|>``) into those tokens; otherwise it is tokenized as plain text.
        ``space_prefix=False``: never add SentencePiece's space prefix (``add_space_prefix``), for
        text that continues other text, whose bytes must stay exactly ``text``'s.
        """
        out: list[int] = []
        if add_special and self.add_bos:
            out.append(self.bos_id)
        frags = self._partition(text, parse_special)
        if self.kind == "llama":
            prev_special = True
            for f in frags:
                if isinstance(f, int):
                    out.append(f)
                    prev_special = True
                    continue
                if self.add_space_prefix and prev_special and space_prefix:
                    f = " " + f
                self._spm(f.replace(" ", "\u2581"), out)
                prev_special = False
        else:
            for f in frags:
                if isinstance(f, int):
                    out.append(f)
                else:
                    out.extend(self._hf.encode(f, add_special_tokens=False).ids)
        if add_special and self.add_eos and self.eos_id is not None:
            out.append(self.eos_id)
        return out

    def _spm(self, text: str, out: list[int]) -> None:
        """llama.cpp's llm_tokenizer_spm_session::tokenize on already-escaped text."""
        if not text:
            return
        sym = list(text)  # one symbol per code point
        prev = list(range(-1, len(sym) - 1))
        nxt = list(range(1, len(sym) + 1))
        nxt[-1] = -1
        vocab, scores = self.token_to_id, self.scores
        heap: list = []

        def add(left: int, right: int) -> None:
            if left < 0 or right < 0:
                return
            s = sym[left] + sym[right]
            tid = vocab.get(s)
            if tid is not None:
                heapq.heappush(heap, (-scores[tid], left, right, s))

        for i in range(1, len(sym)):
            add(i - 1, i)
        while heap:
            _, left, right, s = heapq.heappop(heap)
            if not sym[left] or not sym[right] or sym[left] + sym[right] != s:
                continue
            sym[left] = s
            sym[right] = ""
            nxt[left] = nxt[right]
            if nxt[right] >= 0:
                prev[nxt[right]] = left
            add(prev[left], left)
            add(left, nxt[left])
        i = 0
        while i != -1:
            s = sym[i]
            tid = vocab.get(s)
            if tid is not None:
                out.append(tid)
            else:
                for b in s.encode("utf-8"):
                    bt = self._byte_tokens[b]
                    if bt is None:
                        if self.unk_id is not None:
                            out.append(self.unk_id)
                    else:
                        out.append(bt)
            i = nxt[i]

    # ------------------------------------------------------------------ decode

    def token_to_piece(self, token_id: int, special: bool = False) -> bytes:
        """The bytes one token stands for (llama.cpp's ``llama_token_to_piece``).

        Control/unknown tokens give ``b""`` unless ``special``. Bytes of one UTF-8 character may be
        split over tokens: join pieces as bytes and decode incrementally (see :class:`StreamDecoder`).
        """
        tt = self.token_type[token_id]
        if tt in (TT_CONTROL, TT_UNKNOWN):
            return self.tokens[token_id].encode("utf-8") if special else b""
        p = self._pieces[token_id]
        if p is None:
            text = self.tokens[token_id]
            if tt == TT_USER_DEFINED:
                p = text.encode("utf-8")
            elif tt == TT_BYTE and self.kind == "llama":
                try:
                    p = bytes([int(text[3:5], 16)])
                except ValueError:  # a BYTE token that is not <0xXX>: its text
                    p = text.encode("utf-8")
            elif self.kind == "llama":
                p = text.replace("\u2581", " ").encode("utf-8")
            else:
                bd = self._bdec
                try:
                    p = bytes(bd[c] for c in text)
                except KeyError:
                    p = text.encode("utf-8")
            self._pieces[token_id] = p
        return p

    def decode_bytes(self, ids, special: bool = False) -> bytes:
        """Concatenated pieces; for SentencePiece the leading space of the first piece is dropped
        when a space prefix is added on encode (llama.cpp's ``llama_detokenize``)."""
        parts = []
        strip = self.kind == "llama" and self.add_space_prefix
        for t in ids:
            p = self.token_to_piece(int(t), special)
            if strip and p.startswith(b" "):
                p = p[1:]
            strip = False
            parts.append(p)
        return b"".join(parts)

    def decode(self, ids, special: bool = False) -> str:
        """Text of ``ids`` (invalid UTF-8 replaced by U+FFFD)."""
        return self.decode_bytes(ids, special).decode("utf-8", errors="replace")


class StreamDecoder:
    """Turns a stream of token ids into text, holding back bytes of an unfinished UTF-8 character.

    ``push(id) -> str`` returns the newly complete text (possibly ""); ``flush()`` returns what is left.
    ``special``: control tokens give their text (as ``token_to_piece(special=True)``), else nothing.
    """

    def __init__(self, tok: Tokenizer, special: bool = False):
        import codecs

        self.tok = tok
        self.special = special
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._dec.decode(self.tok.token_to_piece(token_id, self.special))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


def _build_bpe(tokens, merges, regexes, ignore_merges):
    """A ``tokenizers.Tokenizer`` doing llama.cpp's BPE on one raw-text fragment (no specials)."""
    try:
        from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    except ImportError as e:  # pragma: no cover
        raise GGQError(f"the 'tokenizers' package is needed for BPE vocabularies: {e}") from e
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    pairs = []
    for m in merges:
        j = m.find(" ", 1)
        if j > 0:
            pairs.append((m[:j], m[j + 1:]))
    try:  # tokenizers raises its own exception type for merges of unknown tokens
        bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges, fuse_unk=False)
    except Exception as e:
        raise GGQError(f"tokenizer.ggml.merges cannot build a BPE vocabulary ({show(str(e))})") from None
    tk = HFTokenizer(bpe)
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    return tk


# ---------------------------------------------------------------------- metadata of a GGUF file


def read_metadata(path) -> dict:
    """Key/value metadata of a GGUF file as Python values (strings, numbers, lists), read and
    validated by ggq's GGUF reader (:func:`ggq.format.gguf_reader.read_gguf`); tensor data are
    not read. Raises :class:`GGQError` naming the file for a missing or malformed file."""
    from ggq.format.gguf_reader import read_gguf

    return read_gguf(path).metadata
