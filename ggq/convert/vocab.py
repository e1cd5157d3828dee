"""Write a Hugging Face checkpoint's tokenizer into GGUF metadata (the ``tokenizer.*`` keys).

The output is meant to be key-for-key and value-for-value what llama.cpp's ``convert_hf_to_gguf.py``
(llama-cpp-python 0.3.36) writes for the same folder, so that llama.cpp tokenizes a ggq file
exactly as it tokenizes its own. The algorithms follow, in our own code:

* which tokenizer path a model takes (llama.cpp's ``set_vocab`` of each model class) is its family's
  ``write_vocab`` (:mod:`ggq.models`), composed of the functions below;
* ``TextModel._set_vocab_sentencepiece`` (``tokenizer.model`` -> ``llama`` model);
* ``gguf.LlamaHfVocab`` via ``_set_vocab_llama_hf`` (a Llama SentencePiece vocabulary stored as a
  byte-fallback BPE ``tokenizer.json`` -> ``llama`` model);
* ``TextModel.get_vocab_base`` / ``get_vocab_base_pre`` / ``_set_vocab_gpt2`` (``tokenizer.json``
  BPE -> ``gpt2`` model, with ``tokenizer.ggml.pre`` identified from a hash, see
  :mod:`ggq.convert.pre_tokenizers`);
* ``gguf.SpecialVocab`` as vendored with that llama.cpp (special token ids, add_bos/add_eos/add_sep,
  merges, chat template, normalizer flags). We do not call the ``gguf`` package's ``SpecialVocab``:
  the released gguf 0.19 differs from the vendored one (it does not default add_bos/add_eos to false
  for a ByteLevel post-processor, gives tokenizer_config.json precedence over the post-processor and
  writes no normalizer flags), so its output would not match llama.cpp's.

Unknown BPE pre-tokenizer: llama.cpp's converter refuses the checkpoint (NotImplementedError). ggq
refuses it too, with a one-line :class:`~ggq.errors.GGQError` that names the file and the hash,
because writing a guessed name would make llama.cpp tokenize silently differently from the model's
own tokenizer. A user who knows which llama.cpp pre-tokenizer fits can set the environment variable
``GGQ_TOKENIZER_PRE`` (e.g. ``GGQ_TOKENIZER_PRE=llama-bpe``); it is then written as given (with a
warning) for any BPE checkpoint whose hash is unknown.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import functools
import re
from typing import Any

import gguf

from ggq.convert.pre_tokenizers import CHECK_TEXT, check_hash, pre_tokenizer_name
from ggq.errors import GGQError, one_line

log = logging.getLogger(__name__)

TT = gguf.TokenType
K = gguf.Keys.Tokenizer

#: Special token kinds read from tokenizer_config.json / config.json, in llama.cpp's order.
_SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")

#: Added-token texts llama.cpp treats as control tokens even when not flagged special.
_LOOKS_SPECIAL = ("<pad>", "<mask>", "<2mass>", "[@BOS@]")

_SPM_SPACE = "\u2581"  # SentencePiece's visible space, "▁"


def write_vocab(writer: gguf.GGUFWriter, model_dir: pathlib.Path, config: dict, arch: str) -> None:
    """Add every ``tokenizer.*`` key llama.cpp's converter writes for the checkpoint in ``model_dir``.

    ``writer``: the GGUFWriter of the output file (keys are added, nothing is written to disk).
    ``config``: the parsed ``config.json`` (``vocab_size`` sets the token count and padding).
    ``arch``: a GGUF architecture (``"llama"``) or a Hugging Face one (``"LlamaForCausalLM"``); its
    family (:mod:`ggq.models`) chooses the tokenizer export as llama.cpp's ``set_vocab`` does, from
    the building blocks of this module: :func:`write_sentencepiece` (``tokenizer.model``),
    :func:`write_llama_hf` (a byte-fallback BPE ``tokenizer.json`` holding a SentencePiece
    vocabulary), :func:`write_gpt2` (``tokenizer.json`` or ``vocab.json`` + ``merges.txt`` BPE).

    Raises :class:`GGQError` (one line, naming the file) for an architecture without a family, when
    no tokenizer is found, a tokenizer file cannot be read or parsed, a BPE pre-tokenizer is not
    known to llama.cpp (see the module docstring for the ``GGQ_TOKENIZER_PRE`` override), a token
    id lies outside ``vocab_size``, or the checkpoint only has a Mistral ``tekken.json``.
    """
    from ggq import models

    fam = models.find(hf_arch=arch) or models.find(gguf_arch=arch)
    if fam is None:
        raise GGQError(f"{model_dir}: no tokenizer export for architecture {arch!r} "
                       f"(supported: {', '.join(models.gguf_architectures())})")
    fam.write_vocab(writer, pathlib.Path(model_dir), config)


def tokenizer_files(model_dir: pathlib.Path) -> tuple[bool, bool, bool]:
    """Which tokenizer files ``model_dir`` has: (``tokenizer.model``, ``tokenizer.json``,
    ``vocab.json``); GGQError when it has none of them."""
    has_spm = (model_dir / "tokenizer.model").is_file()
    has_json = (model_dir / "tokenizer.json").is_file()
    has_slow_bpe = (model_dir / "vocab.json").is_file()
    if not (has_spm or has_json or has_slow_bpe):
        if (model_dir / "tekken.json").is_file():
            raise GGQError(f"{model_dir}: only a Mistral tekken.json tokenizer found; "
                           "ggq needs tokenizer.model or tokenizer.json")
        raise GGQError(f"{model_dir}: no tokenizer (tokenizer.model or tokenizer.json) found")
    return has_spm, has_json, has_slow_bpe


# ----------------------------------------------------------------------------- SentencePiece


def write_sentencepiece(writer: gguf.GGUFWriter, model_dir: pathlib.Path, config: dict,
                        added_special_only: bool = False, added_from_tokenizer_json: bool = False) -> None:
    """``tokenizer.model`` -> ``llama`` model (same result as llama.cpp's ``_set_vocab_sentencepiece``).

    Tokens are ``vocab_size`` (config) long: ids past the SentencePiece model are ``[PAD<id>]``
    with score -10000 and type UNUSED; SentencePiece ids at or past ``vocab_size`` are dropped.
    ``added_tokens.json`` entries become USER_DEFINED (score -1000); ``added_tokens_decoder`` of
    tokenizer_config.json entries become CONTROL (special, or looking special) or USER_DEFINED
    with "▁" replaced by " " (score -1000). SentencePiece USER_DEFINED pieces stay NORMAL, as in
    llama.cpp.

    The variant some llama.cpp model classes write with their own loop (Phi-3's): with
    ``added_special_only`` an added token is CONTROL only when flagged special and its text is kept
    as it is; with ``added_from_tokenizer_json`` tokenizer.json's ``added_tokens`` are applied the
    same way after tokenizer_config.json's. (Ids outside the vocabulary are skipped with a warning
    in both, where llama.cpp's loop would fail.)
    """
    tokens, scores, types = sentencepiece_vocab(model_dir, config, added_special_only, added_from_tokenizer_json)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    SpecialVocab(model_dir, config, n_vocab=len(tokens)).add_to(writer)


def sentencepiece_vocab(model_dir: pathlib.Path, config: dict, added_special_only: bool = False,
                        added_from_tokenizer_json: bool = False) -> tuple[list[bytes], list[float], list[int]]:
    """Tokens, scores and token types of ``tokenizer.model`` padded to the config's vocab size (see
    :func:`write_sentencepiece`)."""
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise GGQError(f"{model_dir / 'tokenizer.model'}: the sentencepiece package is needed to read it") from e
    path = model_dir / "tokenizer.model"
    sp = SentencePieceProcessor()
    try:
        sp.LoadFromFile(str(path))
    except (OSError, RuntimeError) as e:
        raise GGQError(f"{path}: not a valid SentencePiece model ({_first_line(e)})") from None
    n_sp = sp.vocab_size()
    vocab_size = config.get("vocab_size_per_layer_input") or config.get("vocab_size") or n_sp
    vocab_size = int(vocab_size)

    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(TT.UNUSED)] * vocab_size
    if n_sp > vocab_size:
        log.warning("%s: ignoring SentencePiece ids from %d (config vocab_size is %d)", path, vocab_size, vocab_size)
    for i in range(min(n_sp, vocab_size)):
        if sp.IsUnknown(i):
            t = TT.UNKNOWN
        elif sp.IsControl(i):
            t = TT.CONTROL
        elif sp.IsUnused(i):
            t = TT.UNUSED
        elif sp.IsByte(i):
            t = TT.BYTE
        else:
            t = TT.NORMAL
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = int(t)

    added_path = model_dir / "added_tokens.json"
    added = read_json(added_path, missing_ok=True)
    if added:
        for text, tid in added.items():
            if not _id_in_range(added_path, tid, vocab_size):
                continue
            tokens[tid] = text.encode("utf-8")
            scores[tid] = -1000.0
            types[tid] = int(TT.USER_DEFINED)

    tc_path = model_dir / "tokenizer_config.json"
    tok_config = read_json(tc_path, missing_ok=True) or {}
    try:
        added = [(tc_path, int(key), data) for key, data in (tok_config.get("added_tokens_decoder") or {}).items()]
        if added_from_tokenizer_json:
            tj_path = model_dir / "tokenizer.json"
            tj = read_json(tj_path, missing_ok=True) or {}
            added += [(tj_path, int(data["id"]), data) for data in (tj.get("added_tokens") or [])]
        for path, _, data in added:
            if not isinstance(data, dict) or not isinstance(data.get("content"), str):
                raise TypeError
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError):
        raise GGQError(f"{model_dir}: malformed added tokens (tokenizer_config.json's added_tokens_decoder "
                       "or tokenizer.json's added_tokens)") from None
    for path, tid, data in added:
        if not _id_in_range(path, tid, vocab_size):
            continue
        text: str = data["content"]
        if types[tid] != TT.UNUSED and tokens[tid] != text.encode("utf-8"):
            log.warning("%s: replacing token %d: %r -> %r", path, tid, tokens[tid].decode("utf-8", "replace"), text)
        if data.get("special") or (not added_special_only and _looks_special(text)):
            types[tid] = int(TT.CONTROL)
        else:
            if not added_special_only:
                text = text.replace(_SPM_SPACE, " ")
            types[tid] = int(TT.USER_DEFINED)
        scores[tid] = -1000.0
        tokens[tid] = text.encode("utf-8")
    return tokens, scores, types


# ----------------------------------------------------------------------------- Llama vocab as tokenizer.json


def is_llama_hf_json(model_dir: pathlib.Path) -> bool:
    """True if tokenizer.json holds a Llama SentencePiece vocab in HF form (gguf.LlamaHfVocab's test).

    That is a BPE model with ``byte_fallback`` and a ``Sequence`` decoder; a Llama-3 style BPE
    (``ignore_merges`` and no byte fallback) is not.
    """
    tj = read_json(model_dir / "tokenizer.json")
    model = tj.get("model") or {}
    if model.get("type") == "BPE" and model.get("ignore_merges", False) and not model.get("byte_fallback", True):
        return False
    return (model.get("type") == "BPE" and bool(model.get("byte_fallback", False))
            and (tj.get("decoder") or {}).get("type") == "Sequence")


def _tokenizer_errors(fn):
    """Errors that transformers' tokenizer raises on malformed tokenizer files while a vocab writer
    reads it (e.g. infinite recursion for an empty ``unk_token``) become a one-line GGQError naming
    the checkpoint folder (the writer's second argument)."""
    @functools.wraps(fn)
    def wrapped(writer, model_dir, *args, **kwargs):
        try:
            return fn(writer, model_dir, *args, **kwargs)
        except (RecursionError, AttributeError, KeyError, IndexError, TypeError, ValueError) as e:
            raise GGQError(f"{model_dir}: transformers cannot read this tokenizer ({_first_line(e)})") from None
    return wrapped


@_tokenizer_errors
def write_llama_hf(writer: gguf.GGUFWriter, model_dir: pathlib.Path) -> None:
    """Byte-fallback BPE ``tokenizer.json`` -> ``llama`` model (as ``_set_vocab_llama_hf``).

    Base tokens (ids below the tokenizer's base ``vocab_size``) are BYTE for ``<0xXX>``, CONTROL
    for the tokenizer's special ids, NORMAL otherwise; added tokens past the base vocabulary follow,
    in id order, as CONTROL (special) or USER_DEFINED. Every score is -1000. No padding to the
    config's ``vocab_size``.
    """
    tok = _auto_tokenizer(model_dir)
    vocab = tok.get_vocab()
    n_base = int(tok.vocab_size)
    added = sorted(((t, i) for t, i in tok.get_added_vocab().items() if i >= n_base), key=lambda x: x[1])
    special_ids = set(tok.all_special_ids)
    specials = {t: vocab[t] for t in tok.all_special_tokens}
    reverse = {i: t for t, i in vocab.items()}
    byte_re = re.compile(r"<0x[0-9A-Fa-f]{2}>")

    tokens: list[bytes] = []
    types: list[int] = []
    for i in range(n_base):
        if i not in reverse:
            raise GGQError(f"{model_dir / 'tokenizer.json'}: token id {i} missing from the vocabulary")
        text = reverse[i]
        tokens.append(text.encode("utf-8"))
        if byte_re.fullmatch(text):
            types.append(int(TT.BYTE))
        else:
            types.append(int(TT.CONTROL if i in special_ids else TT.NORMAL))
    for text, _ in added:
        tokens.append(text.encode("utf-8"))
        if text in specials:
            types.append(int(TT.CONTROL if specials[text] in special_ids else TT.NORMAL))
        else:
            types.append(int(TT.USER_DEFINED))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores([-1000.0] * len(tokens))
    writer.add_token_types(types)
    SpecialVocab(model_dir, None, n_vocab=len(tokens)).add_to(writer)


# ----------------------------------------------------------------------------- GPT-2 style BPE


@_tokenizer_errors
def write_gpt2(writer: gguf.GGUFWriter, model_dir: pathlib.Path, config: dict) -> None:
    """``tokenizer.json`` BPE -> ``gpt2`` model (as llama.cpp's ``_set_vocab_gpt2``/``get_vocab_base``).

    Tokens are ``config["vocab_size"]`` long (default: the tokenizer's), holes filled with
    ``[PAD<id>]`` of type UNUSED. Added tokens are CONTROL if special or looking special, else
    USER_DEFINED (with "▁" written as " "); an added token that the tokenizer does not normalize is
    first passed through encode/decode, as llama.cpp does. Merges come from tokenizer.json (or
    merges.txt); ``tokenizer.ggml.pre`` from the check-text hash.
    """
    tok = _auto_tokenizer(model_dir)
    vocab: dict[str, int] = tok.get_vocab()
    vocab_size = int(config.get("vocab_size", len(vocab)))
    if vocab and max(vocab.values()) >= vocab_size:
        raise GGQError(f"{model_dir / 'tokenizer.json'}: token id {max(vocab.values())} is not below "
                       f"config.json vocab_size {vocab_size}")
    pre = _pre_tokenizer(model_dir, tok)
    reverse = {i: t for t, i in vocab.items()}
    added_vocab = tok.get_added_vocab()
    added_decoder = tok.added_tokens_decoder

    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        text = reverse.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(TT.UNUSED))
            continue
        if text in added_vocab:
            # llama.cpp expects CONTROL and USER_DEFINED tokens pre-normalized
            if not added_decoder[i].normalized:
                text = tok.decode(tok.encode(text, add_special_tokens=False))
            if added_decoder[i].special or _looks_special(text):
                types.append(int(TT.CONTROL))
            else:
                text = text.replace(_SPM_SPACE, " ")
                types.append(int(TT.USER_DEFINED))
        else:
            types.append(int(TT.NORMAL))
        tokens.append(text)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    SpecialVocab(model_dir, config, load_merges=True).add_to(writer)


def _pre_tokenizer(model_dir: pathlib.Path, tok: Any) -> str:
    """``tokenizer.ggml.pre`` for a BPE tokenizer: the name of its check-text hash (see module doc)."""
    ids = tok.encode(CHECK_TEXT)
    name = pre_tokenizer_name(ids)
    if name is not None:
        return name
    digest = check_hash(ids)
    forced = os.environ.get("GGQ_TOKENIZER_PRE")
    if forced:
        log.warning("%s: BPE pre-tokenizer not recognized (hash %s); using %r from GGQ_TOKENIZER_PRE",
                    model_dir, digest, forced)
        return forced
    raise GGQError(f"{model_dir / 'tokenizer.json'}: BPE pre-tokenizer not known to llama.cpp (check hash "
                   f"{digest}); set GGQ_TOKENIZER_PRE=<name> to choose one")


# ----------------------------------------------------------------------------- special vocabulary


class SpecialVocab:
    """Special token ids, add_* flags, merges, chat template and normalizer flags of a checkpoint.

    Reads tokenizer.json, tokenizer_config.json, chat_template.jinja / chat_template.json,
    additional_chat_templates/*.jinja, merges.txt and config.json the way the ``SpecialVocab`` of
    llama.cpp's vendored gguf-py does, including its reading of the tokenizer.json post-processor
    (ByteLevel, RobertaProcessing, TemplateProcessing) to decide add_bos/add_eos/add_sep and, where
    the template's last token differs from eos, to move the old eos to eot (or eom).
    """

    def __init__(self, model_dir: pathlib.Path, config: dict | None, *, load_merges: bool = False,
                 special_types: tuple[str, ...] = _SPECIAL_TYPES, n_vocab: int | None = None):
        self.dir = model_dir
        self.n_vocab = n_vocab
        self.load_merges = load_merges
        self.types = tuple(special_types)
        self.ids: dict[str, int] = {}
        self.add: dict[str, bool] = {}
        self.merges: list[str] = []
        self.chat_template: str | list[dict[str, str]] | None = None
        self.lowercase: bool | None = None
        self.strip_accents: bool | None = None
        self._load_tokenizer_files()
        if config is None:
            config = read_json(model_dir / "config.json", missing_ok=True) or {}
        self._load_config(config)
        if load_merges and not self.merges:
            self._load_merges_txt()

    # -- writing

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        """Add the collected keys to ``writer`` in llama.cpp's order."""
        if self.merges:
            writer.add_token_merges(self.merges)
        elif self.load_merges:
            log.warning("%s: no BPE merges found; the output may not tokenize", self.dir)
        for typ, tid in self.ids.items():
            if typ in _ID_KEYS:
                writer.add_uint32(_ID_KEYS[typ], tid)
            else:
                log.debug("%s: no GGUF key for the %s token (id %d); skipped, as llama.cpp does", self.dir, typ, tid)
        for typ, value in self.add.items():
            if typ in _ADD_KEYS:
                writer.add_bool(_ADD_KEYS[typ], value)
        if self.chat_template is not None:
            writer.add_chat_template(self.chat_template)
        if self.lowercase is not None:
            writer.add_bool("tokenizer.ggml.normalizer.lowercase", self.lowercase)
        if self.strip_accents is not None:
            writer.add_bool("tokenizer.ggml.normalizer.strip_accents", self.strip_accents)

    # -- reading

    def set_special(self, typ: str, tid: Any) -> None:
        """Record ``tid`` for ``typ`` unless one is already set; ignores non-ints and ids >= n_vocab."""
        if not isinstance(tid, int):
            return
        if tid < 0:
            raise GGQError(f"{self.dir}: invalid {typ} token id {tid}")
        if self.n_vocab is not None and tid >= self.n_vocab:
            log.warning("%s: %s token id %d is not below the vocabulary size %d; skipped",
                        self.dir, typ, tid, self.n_vocab)
            return
        self.ids.setdefault(typ, tid)

    def _load_tokenizer_files(self) -> None:
        tj = read_json(self.dir / "tokenizer.json", missing_ok=True)
        added_tokens: list[dict] = []
        if tj is not None:
            if self.load_merges:
                self.merges = _merges_from_json(self.dir / "tokenizer.json", (tj.get("model") or {}).get("merges"))
            if normalizer := tj.get("normalizer"):
                self._read_normalizer(normalizer)
            added_tokens = tj.get("added_tokens") or []
        tc = read_json(self.dir / "tokenizer_config.json", missing_ok=True)
        if tj and (post := tj.get("post_processor")):
            tc = self._read_post_processor(post, tc)
        if not tc:
            return
        self.chat_template = self._chat_template(tc)
        for typ in self.types:
            flag = tc.get(f"add_{typ}_token")
            if isinstance(flag, bool):
                if typ not in self.add:
                    self.add[typ] = flag
                elif self.add[typ] != flag:
                    log.warning("%s: tokenizer_config add_%s_token=%s differs from the post-processor's %s; "
                                "using the latter", self.dir, typ, flag, self.add[typ])
            entry = tc.get(f"{typ}_token")
            if isinstance(entry, dict):
                entry = entry.get("content")
            if not isinstance(entry, str):
                continue
            tid = next((a.get("id") for a in added_tokens if a.get("content") == entry), None)
            self.set_special(typ, tid)

    def _read_normalizer(self, norm: dict) -> None:
        kind = norm.get("type")
        if kind == "Lowercase":
            self.lowercase = True
        elif kind == "StripAccents":
            self.strip_accents = True
        elif kind == "BertNormalizer":
            if "lowercase" in norm:
                self.lowercase = norm["lowercase"]
            if "strip_accents" in norm:
                self.strip_accents = norm["strip_accents"]
        elif kind == "Sequence":
            for sub in norm.get("normalizers", []):
                self._read_normalizer(sub)

    def _read_post_processor(self, post: dict, tc: dict | None) -> dict | None:
        """Derive add_* flags (and implied special tokens) from a tokenizer.json post-processor.

        Returns the tokenizer config, updated with the special tokens the post-processor implies
        (as llama.cpp's SpecialVocab does to its copy). Simple templates only, like llama.cpp.
        """
        cfg = tc or {}
        bos, cls, eos, sep = (cfg.get(k) for k in ("bos_token", "cls_token", "eos_token", "sep_token"))
        if not bos and cls and tc:
            tc["bos_token"] = bos = cls
        if not eos and sep and tc:
            tc["eos_token"] = eos = sep
        for proc in post.get("processors", [post]):
            kind = proc.get("type")
            if kind == "ByteLevel":
                self.add.setdefault("bos", False)
                self.add.setdefault("eos", False)
            elif kind == "RobertaProcessing":
                self.add.update(bos=True, eos=True, sep=True)
                if not cls and tc:
                    tc["cls_token"] = cls = proc.get("cls", [bos])[0]
                if not sep and tc:
                    tc["sep_token"] = sep = proc.get("sep", [eos])[0]
            elif kind == "TemplateProcessing":
                single = proc.get("single", [])
                pair = proc.get("pair", [])
                first = last = None
                if len(single) > 1:
                    first = _special_id(single[0])
                    if first:
                        if not tc:
                            bos = first
                        elif first not in (bos, cls):
                            if not bos:
                                tc["bos_token"] = bos = first
                            if not cls:
                                tc["cls_token"] = cls = first
                        self.add["bos"] = first in (bos, cls)
                    last = _special_id(single[-1])
                    if last:
                        if not tc:
                            eos = last
                        elif last != eos:
                            # the template ends with another token than eos: keep the old eos as eot/eom
                            if "eot" not in self.types:
                                self.types += ("eot",)
                                tc["eot_token"] = eos
                            elif "eom" not in self.types:
                                self.types += ("eom",)
                                tc["eom_token"] = eos
                            tc["eos_token"] = eos = last
                        self.add["eos"] = last == eos
                if pair:
                    start = 1 if first and _special_id(pair[0]) == first else 0
                    stop = -1 if last and _special_id(pair[-1]) == last else None
                    pair = pair[start:stop]
                    if pair:
                        a = (pair[0].get("Sequence") or {}).get("id")
                        b = (pair[-1].get("Sequence") or {}).get("id")
                        middle = pair[1:-1]
                        if a == "A" and b == "B" and middle:
                            add_sep = False
                            tok = _special_id(middle[0])
                            if tok and tok in (sep, eos) and not last:
                                add_sep = True
                            if len(middle) == 2:
                                tok = _special_id(middle[1])
                                if tok and tok in (sep, eos):
                                    add_sep = True
                            self.add["sep"] = add_sep
                            if add_sep and not sep and tc:
                                tc["sep_token"] = eos
        return tc

    def _chat_template(self, tc: dict) -> str | list[dict[str, str]] | None:
        alt: str | list[dict[str, str]] | None = None
        jinja = self.dir / "chat_template.jinja"
        if jinja.is_file():
            alt = _read_text(jinja)
            extra = sorted((self.dir / "additional_chat_templates").glob("*.jinja"))
            if extra:
                alt = [{"name": "default", "template": alt}]
                alt += [{"name": p.stem, "template": _read_text(p)} for p in extra]
        elif (self.dir / "chat_template.json").is_file():
            alt = (read_json(self.dir / "chat_template.json") or {}).get("chat_template")
        template = tc.get("chat_template", alt)
        if template is None or isinstance(template, str):
            return template
        if isinstance(template, list) and all(
                isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                for t in template):
            return template
        log.warning("%s: chat_template is neither a string nor a list of named templates; ignored", self.dir / "tokenizer_config.json")
        return None

    def _load_config(self, config: dict) -> None:
        for typ in self.types:
            tid = config.get(f"{typ}_token_id")
            if tid is None and isinstance(config.get("text_config"), dict):
                tid = config["text_config"].get(f"{typ}_token_id")
            self.set_special(typ, tid)

    def _load_merges_txt(self) -> None:
        path = self.dir / "merges.txt"
        if not path.is_file():
            return
        merges = []
        for n, line in enumerate(_read_text(path).splitlines()):
            line = line.strip()
            if not line or (n == 0 and line.startswith("#")):
                continue
            parts = line.split(None, 3)
            if len(parts) != 2:
                log.warning("%s: line %d malformed; ignored", path, n + 1)
                continue
            merges.append(f"{parts[0]} {parts[1]}")
        self.merges = merges


#: GGUF keys of the special token ids llama.cpp's writer has a method for; others (cls, CodeLlama's
#: prefix/suffix/middle) are skipped by llama.cpp's converter, and by us.
_ID_KEYS = {"bos": K.BOS_ID, "eos": K.EOS_ID, "unk": K.UNK_ID, "sep": K.SEP_ID, "pad": K.PAD_ID,
            "mask": K.MASK_ID, "eot": K.EOT_ID, "eom": K.EOM_ID}
#: GGUF keys of the add_<kind>_token flags llama.cpp writes (others are skipped likewise).
_ADD_KEYS = {"bos": K.ADD_BOS, "eos": K.ADD_EOS, "sep": K.ADD_SEP}


def _special_id(item: dict) -> Any:
    return (item.get("SpecialToken") or {}).get("id")


def _merges_from_json(path: pathlib.Path, merges: Any) -> list[str]:
    """tokenizer.json merges as llama.cpp stores them: ``"left right"``, a space inside a part as U+0120."""
    if not isinstance(merges, list) or not merges:
        return []
    if isinstance(merges[0], str):
        return list(merges)
    if isinstance(merges[0], list) and len(merges[0]) == 2 and isinstance(merges[0][0], str):
        return [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in merges]
    raise GGQError(f"{path}: unknown format of model.merges")


# ----------------------------------------------------------------------------- helpers


def _looks_special(text: str) -> bool:
    """llama.cpp's ``does_token_look_special``: added tokens it makes CONTROL even if not flagged special."""
    return (text in _LOOKS_SPECIAL
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _id_in_range(path: pathlib.Path, tid: int, vocab_size: int) -> bool:
    if tid >= vocab_size:
        log.warning("%s: ignoring token id %d, not below vocab_size %d", path, tid, vocab_size)
        return False
    return True


def _auto_tokenizer(model_dir: pathlib.Path) -> Any:
    """The checkpoint's own tokenizer through transformers' AutoTokenizer (local files only)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise GGQError(f"{model_dir}: the transformers package is needed to read tokenizer.json") from e
    from ggq.convert.checkpoint import quiet_transformers

    try:
        with quiet_transformers():  # its warnings about the config are not the user's concern here
            return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # transformers raises many kinds (OSError, ValueError, Exception from tokenizers)
        raise GGQError(f"{model_dir}: cannot load the tokenizer with transformers ({_first_line(e)})") from None


def read_json(path: pathlib.Path, missing_ok: bool = False) -> Any:
    if missing_ok and not path.is_file():
        return None
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise GGQError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    except RecursionError:
        raise GGQError(f"{path}: invalid JSON (nested too deeply)") from None


def _read_text(path: pathlib.Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GGQError(f"{path}: cannot read ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    """The first line of an exception's message, cut to 200 characters (its class name if empty)."""
    text = str(e).strip().splitlines()
    return one_line(text[0], 200) if text else type(e).__name__
