"""A structure-aware fuzzer for ggq's inputs: GGUF files, safetensors checkpoints, config.json and
tokenizer files, run through ``ggq info``, ``generate``, ``quantize``, ``convert`` and ``perplexity``;
and (``--targets quantized,convert-lora,lora``) quantized checkpoints, PEFT adapters and LoRA GGUF files.

    python tools/fuzz_inputs.py --cases 2000 --seed 1 --targets info,generate,quantize,convert,perplexity \\
        --jobs 2 --out .cache/fuzz/run1
    python tools/fuzz_inputs.py --out .cache/fuzz/run1 --replay 000123      # run one kept case again
    python tools/fuzz_inputs.py --out .cache/fuzz/run1 --summary            # the tables of a (running) log
    python tools/fuzz_inputs.py --cases 1000 --seed 2 --targets generate,perplexity --boundscheck \
        --out .cache/fuzz/bc                                                # kernels with every index checked

How it works
------------
*Seeds* are small valid inputs made here (``.cache/fuzz/seeds``, built once, deterministic): the
stories260K checkpoint of ``../shared/data`` as a Hugging Face folder and converted by ggq to F32,
Q8_0 and Q4_K_M GGUF files; a tiny random Llama with a ``tokenizer.json`` (F16 safetensors); and a
tiny random Qwen2 GGUF with a byte-level BPE vocabulary and a ChatML template.

*Import seeds* (targets ``quantized``, ``convert-lora``, ``lora``; built on first use by the tests'
fixture builders, i.e. by the real libraries: transformers + bitsandbytes, transformers' FP8 op,
compressed-tensors, peft): bitsandbytes NF4 (± double quant), FP4 and LLM.int8 checkpoints; FP8
``quant_method: fp8`` with 128x128 float32 and UE8M0 block scales and e5m2 with per-row scales;
compressed-tensors FP8 (channel, block) and W8A8 int8 (channel, group) checkpoints, all of the
tests' random Llama (hidden 256); its float32 base as a folder and as F32 / Q8_0 GGUF files; two
PEFT adapters (rank 8 on every projection; rsLoRA with an alpha_pattern) and the first as LoRA
GGUF files (f32, q8_0) written by ``ggq convert-lora``.

*Import mutators*: ``quantized`` cases change the tensors that carry the quantization (a scale,
code book, quant state or zero point removed; dtypes changed with or without data to match;
shapes changed with data to match; NaN/inf/zero/negative scales, fp8 NaN/inf codes; the 4-bit
quant state's JSON given wrong types/values, broken, not an object, not UTF-8, huge; LLM.int8's
``weight_format``; two quantization tensors swapped), or ``quantization_config`` (another or no
``quant_method``, each method's keys and the compressed-tensors weight scheme set to wrong types
or edge values), or apply the generic safetensors/config damage (truncation, header lengths...),
then run ``convert`` (default or another ``--type``, sometimes ``--import-report``).
``convert-lora`` cases change ``adapter_config.json`` (rank, alpha, type, targets, patterns and the
options ggq refuses, wrong types, deleted, not an object, broken bytes) or
``adapter_model.safetensors`` (a lora_A/B without its pair, rank or width changed with data to
match, A and B swapped, modules past the last layer or unknown, embedding/lm_head/bias/DoRA
tensors added, NaN/inf, dtypes, 1-D/3-D tensors, generic damage) or the folder (no config, no
weights, a damaged ``adapter_model.bin`` or a valid ``torch.save`` of no named tensors), then run
``convert-lora`` (any ``--outtype``) or ``convert BASE --lora DIR[:SCALE]``. ``lora`` cases change
a LoRA GGUF (pair shapes with data to match, a half removed, names the model lacks or may not
adapt, ``general.type``/``adapter.type``/``adapter.lora.alpha``/architecture/aLoRA keys, tensor
types, data, offsets, counts) and a hostile ``:SCALE`` (nan, inf, 1e309, 1e38, empty, text), then
run ``generate BASE.gguf --lora FILE[:SCALE]`` (F32 or Q8_0 base, any ``--lora-type``) or
``convert BASE --lora FILE``. A success is judged by :func:`check_gguf` on the output and, for an
adapter written or accepted, by :func:`check_lora` (gguf-py: pairs, ranks, shapes against the base
GGUF, finite alpha, values and scale). Measured: four campaigns (seeds 14-17, 3900 cases, 0.2-0.7 s a
case with ``--jobs 1``) found 10 bugs (an 11th sat next to one of them), all fixed with regression
tests; a fifth (seed 18, 600 cases) on the fixed code was clean. The table and the list are in
``specs/imports.md``.

*Mutators* parse a seed into its structure (GGUF: header counts, key/values, tensor infos, tensor
data; safetensors: header JSON and data; JSON files as objects), change one to three things
(hyperparameters, value types, array lengths, special token ids, tensor shapes/types/offsets,
duplicate or missing tensors, data offsets, nesting depth, chat templates, huge lengths, ...),
write the result, and may then patch raw bytes (length fields, truncation, bit flips). Case ``i``
of a campaign depends only on ``(--seed, i)``: a run is deterministic and any case can be rebuilt.

*Isolation*: by default a fork server. The parent imports ggq once (running no Numba code; the
compile cache is warmed first by a throwaway child) and forks one child per case; the child puts
itself in its own process group, sets ``RLIMIT_AS`` (``--mem-gib``) and ``RLIMIT_CPU``, arms
``faulthandler`` (a stack on a crash, and a dumped stack then exit shortly before the time limit),
redirects stdout/stderr to files and calls ``ggq.cli.main``. The parent kills a case's process group
at its wall-clock limit. ``--spawn`` runs ``python -m ggq`` in a fresh subprocess per case instead.

*Outcomes* per case: ``ok``, ``clean_error`` (non-zero exit, one short printable stderr line
without a traceback or an exception repr), ``traceback`` (also a top-level handler's "internal
error" report, exit status 70), ``crash`` (killed by a signal), ``hang``,
``memory`` (MemoryError, the address-space limit, or an "out of memory" message: an absurd size
attempted instead of refused), ``partial_output`` (a failure that left a
file in the output or input folder or in TMPDIR), ``invalid_accepted`` (success on an input, or
writing an output, that fails the independent checks of :func:`check_gguf`: gguf-py's
``GGUFReader`` plus structure and hyperparameter consistency, and ``ggq info`` on the output) and
``multi_line_error`` (ggq's own ``ggq: warning:``/``ggq: note:`` lines before the error do not
count; Python warnings do). Each case goes to ``cases.jsonl``; the inputs of every non-clean case are
kept in ``findings/<case>/`` with ``case.json`` for ``--replay``. At the end a table of counts
per target and outcome and the distinct failure sites (a traceback's innermost ggq frame, or the
signal) are printed and written to ``summary.json``.
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import hashlib
import io
import json
import math
import os
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GGQ_SHARED", REPO.parent / "shared")) / "data"
STORIES = SHARED / "stories260K"
DEFAULT_OUT = REPO / ".cache" / "fuzz"
TARGETS = ("info", "generate", "quantize", "convert", "perplexity", "quantized", "convert-lora", "lora")
#: targets whose seeds are made by torch, bitsandbytes, compressed-tensors and peft (built on first use)
IMPORT_TARGETS = ("quantized", "convert-lora", "lora")
#: what a campaign runs without --targets (the import targets need torch, bitsandbytes, peft, ...)
DEFAULT_TARGETS = tuple(t for t in TARGETS if t not in IMPORT_TARGETS)
OUTCOMES = ("ok", "clean_error", "traceback", "crash", "hang", "memory", "partial_output", "invalid_accepted",
            "multi_line_error")
CLEAN = ("ok", "clean_error")
#: wall-clock limit per target (s); generate/perplexity may compile a kernel for a type not warmed
TIMEOUTS = {"info": 30, "generate": 150, "quantize": 90, "convert": 90, "perplexity": 150, "check": 60,
            "quantized": 120, "convert-lora": 120, "lora": 150}
PROMPT = "Once upon a time"
#: the text ``perplexity`` scores (written here; ~120 tokens with stories260K's vocabulary)
PPL_TEXT = ("Once upon a time, there was a little girl named Lily. She liked to play in the park with her "
            "dog. One day, the sun was hot and the sky was blue. Lily saw a big red ball under a tree. She "
            "ran to get it, but the ball rolled away. The dog barked and ran after it. They laughed and "
            "played all day. At night, Lily was tired and happy. She went to bed and dreamed of the park.\n")

# ===================================================================================== GGUF structure

GT_U8, GT_I8, GT_U16, GT_I16, GT_U32, GT_I32, GT_F32, GT_BOOL, GT_STR, GT_ARR, GT_U64, GT_I64, GT_F64 = range(13)
_SCALAR_FMT = {GT_U8: "B", GT_I8: "b", GT_U16: "H", GT_I16: "h", GT_U32: "I", GT_I32: "i", GT_F32: "f",
               GT_BOOL: "B", GT_U64: "Q", GT_I64: "q", GT_F64: "d"}
_INT_TYPES = (GT_U8, GT_I8, GT_U16, GT_I16, GT_U32, GT_I32, GT_U64, GT_I64)
#: ggml type id -> (block size, bytes per block), for the types gguf-py knows
GGML_SIZES = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 36),
              10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
              16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110),
              22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
              29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17)}


class ParseError(Exception):
    """A GGUF file :func:`parse_gguf` cannot read (the message says where)."""


@dataclass
class KV:
    """One metadata entry: ``value`` is a Python scalar, ``bytes`` for strings, or for arrays
    ``(subtype, [items])`` (items as for scalars; nested arrays as ``(subtype, items)``)."""

    key: bytes
    vtype: int
    value: object


@dataclass
class TensorInfo:
    """One tensor-info record; ``blob`` is its data when the file was parsed (None if unknown)."""

    name: bytes
    ne: list
    ttype: int
    offset: int
    blob: bytes | None = None


@dataclass
class GGUFDoc:
    """A GGUF file as a structure that :func:`write_gguf` turns back into bytes.

    ``data`` is the tensor-data section as it stands; :meth:`relayout` rebuilds it (and the
    offsets) from the tensors' blobs. ``n_tensors``/``n_kv`` override the header counts when set.
    """

    version: int = 3
    kvs: list = field(default_factory=list)
    tensors: list = field(default_factory=list)
    align: int = 32
    data: bytes = b""
    n_tensors: int | None = None
    n_kv: int | None = None
    magic: bytes = b"GGUF"

    def get(self, key: str, default=None):
        """The value of the first entry named ``key``, else ``default``."""
        for kv in self.kvs:
            if kv.key == key.encode():
                return kv.value
        return default

    def set(self, key: str, vtype: int, value) -> None:
        """Replace (or append) the entry ``key``."""
        k = key.encode()
        for kv in self.kvs:
            if kv.key == k:
                kv.vtype, kv.value = vtype, value
                return
        self.kvs.append(KV(k, vtype, value))

    @property
    def arch(self) -> str:
        a = self.get("general.architecture", b"llama")
        return a.decode("utf-8", "replace") if isinstance(a, bytes) else "llama"

    def relayout(self, align: int | None = None) -> None:
        """Place every tensor blob one after another at ``align`` (default: ``self.align``)."""
        align = align or self.align
        out = bytearray()
        for t in self.tensors:
            if t.blob is None:
                continue
            pad = -len(out) % align
            out += b"\0" * pad
            t.offset = len(out)
            out += t.blob
        self.data = bytes(out)
        self.align = align


def tensor_nbytes(ne, ttype) -> int | None:
    """Bytes of a tensor of shape ``ne`` (ggml order) and ggml type id ``ttype``, None if unknown."""
    if ttype not in GGML_SIZES or not ne:
        return None
    bs, ts = GGML_SIZES[ttype]
    n = 1
    for x in ne:
        n *= x
    if ne[0] % bs:
        return None
    return n // bs * ts


class _Reader:
    def __init__(self, buf: bytes):
        self.b, self.p = buf, 0

    def take(self, k: int) -> bytes:
        if k < 0 or self.p + k > len(self.b):
            raise ParseError(f"truncated at byte {self.p} (wanted {k} bytes)")
        s = self.b[self.p:self.p + k]
        self.p += k
        return s

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self) -> bytes:
        return self.take(self.unpack("Q"))

    def value(self, vtype: int, depth: int = 0):
        if vtype == GT_STR:
            return self.string()
        if vtype == GT_ARR:
            sub, n = self.unpack("I"), self.unpack("Q")
            if depth > 8:
                raise ParseError("arrays nested too deeply")
            if n > len(self.b) - self.p:  # every item takes at least one byte
                raise ParseError(f"array of {n} items at byte {self.p} exceeds the file")
            if sub in _SCALAR_FMT:
                size = struct.calcsize(_SCALAR_FMT[sub])
                raw = self.take(size * n)
                items = list(struct.unpack(f"<{n}{_SCALAR_FMT[sub]}", raw))
                return sub, ([bool(x) for x in items] if sub == GT_BOOL else items)
            if sub in (GT_STR, GT_ARR):
                return sub, [self.value(sub, depth + 1) for _ in range(n)]
            raise ParseError(f"unknown array type {sub}")
        if vtype in _SCALAR_FMT:
            v = self.unpack(_SCALAR_FMT[vtype])
            return bool(v) if vtype == GT_BOOL else v
        raise ParseError(f"unknown value type {vtype}")


def parse_gguf(buf: bytes) -> GGUFDoc:
    """Parse a GGUF file (v2/v3) without trusting any count or length: every one is checked
    against the bytes left before anything is allocated. ParseError on any malformation."""
    r = _Reader(buf)
    if r.take(4) != b"GGUF":
        raise ParseError("bad magic")
    version = r.unpack("I")
    if version not in (2, 3):
        raise ParseError(f"version {version}")
    n_t, n_kv = r.unpack("Q"), r.unpack("Q")
    if n_t > len(buf) or n_kv > len(buf):
        raise ParseError(f"counts {n_t}/{n_kv} exceed the file")
    doc = GGUFDoc(version=version)
    for _ in range(n_kv):
        key = r.string()
        vt = r.unpack("I")
        doc.kvs.append(KV(key, vt, r.value(vt)))
    for _ in range(n_t):
        name = r.string()
        nd = r.unpack("I")
        if nd > 4:
            raise ParseError(f"tensor {name[:40]!r} has {nd} dimensions")
        ne = [r.unpack("Q") for _ in range(nd)]
        doc.tensors.append(TensorInfo(name, ne, r.unpack("I"), r.unpack("Q")))
    align = 32
    for kv in doc.kvs:
        if kv.key == b"general.alignment":
            align = kv.value if kv.vtype == GT_U32 else -1
    if not (isinstance(align, int) and align > 0 and align & (align - 1) == 0):
        raise ParseError(f"general.alignment {align!r}")
    start = -(-r.p // align) * align
    doc.align, doc.data = align, buf[start:]
    for t in doc.tensors:
        nb = tensor_nbytes(t.ne, t.ttype)
        if nb is not None and t.offset + nb <= len(doc.data):
            t.blob = doc.data[t.offset:t.offset + nb]
    return doc


def _pack_scalar(vtype: int, v) -> bytes:
    f = _SCALAR_FMT[vtype]
    if f in "fd":
        try:
            return struct.pack("<" + f, float(v))
        except (OverflowError, TypeError, ValueError):
            return struct.pack("<" + f, math.inf)
    bits = struct.calcsize(f) * 8
    iv = int(v) if not isinstance(v, (bytes, tuple)) else 0
    return struct.pack("<" + f.upper(), iv & ((1 << bits) - 1))  # two's complement for signed types


def _pack_value(vtype: int, v, fields: list, pos: int, label: str) -> bytes:
    if vtype == GT_STR:
        s = v if isinstance(v, bytes) else str(v).encode()
        fields.append((f"{label}.len", pos, 8))
        return struct.pack("<Q", len(s)) + s
    if vtype == GT_ARR:
        sub, items = v
        fields.append((f"{label}.subtype", pos, 4))
        fields.append((f"{label}.count", pos + 4, 8))
        out = bytearray(struct.pack("<IQ", sub & 0xFFFFFFFF, len(items)))
        if sub in _SCALAR_FMT:
            for x in items:
                out += _pack_scalar(sub, x)
        elif sub in (GT_STR, GT_ARR):
            for i, x in enumerate(items):
                out += _pack_value(sub, x, fields if i < 4 else [], pos + len(out), f"{label}[{i}]")
        return bytes(out)
    if vtype in _SCALAR_FMT:
        return _pack_scalar(vtype, v)
    return b""  # an unknown type id: no payload


def write_gguf(doc: GGUFDoc) -> tuple[bytes, list]:
    """Serialize ``doc``; returns (bytes, fields) with fields a list of ``(label, position, width)``
    of every count, length, type and offset written (for raw patches)."""
    fields: list = []
    out = bytearray(doc.magic)
    fields.append(("version", len(out), 4))
    out += struct.pack("<I", doc.version & 0xFFFFFFFF)
    fields.append(("n_tensors", len(out), 8))
    out += struct.pack("<Q", (len(doc.tensors) if doc.n_tensors is None else doc.n_tensors) & (2**64 - 1))
    fields.append(("n_kv", len(out), 8))
    out += struct.pack("<Q", (len(doc.kvs) if doc.n_kv is None else doc.n_kv) & (2**64 - 1))
    for kv in doc.kvs:
        lab = kv.key[:60].decode("utf-8", "replace")
        fields.append((f"key {lab}.len", len(out), 8))
        out += struct.pack("<Q", len(kv.key)) + kv.key
        fields.append((f"kv {lab}.type", len(out), 4))
        out += struct.pack("<I", kv.vtype & 0xFFFFFFFF)
        out += _pack_value(kv.vtype, kv.value, fields, len(out), f"kv {lab}")
    for t in doc.tensors:
        lab = t.name[:60].decode("utf-8", "replace")
        fields.append((f"tensor {lab}.name_len", len(out), 8))
        out += struct.pack("<Q", len(t.name)) + t.name
        fields.append((f"tensor {lab}.n_dims", len(out), 4))
        out += struct.pack("<I", len(t.ne))
        for i, x in enumerate(t.ne):
            fields.append((f"tensor {lab}.ne[{i}]", len(out), 8))
            out += struct.pack("<Q", x & (2**64 - 1))
        fields.append((f"tensor {lab}.type", len(out), 4))
        out += struct.pack("<I", t.ttype & 0xFFFFFFFF)
        fields.append((f"tensor {lab}.offset", len(out), 8))
        out += struct.pack("<Q", t.offset & (2**64 - 1))
    align = doc.align if doc.align > 0 and doc.align & (doc.align - 1) == 0 and doc.align <= 1 << 16 else 32
    out += b"\0" * (-len(out) % align)
    fields.append(("data", len(out), 0))
    out += doc.data
    return bytes(out), fields

# ===================================================================================== value pools

INT_EDGES = [0, 1, 2, 3, -1, -2, 7, 31, 48, 63, 64, 65, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
             2**62, 2**63 - 1, 2**64 - 1, 10**9, 10**6]
FLOAT_EDGES = [0.0, -0.0, 1.0, -1.0, math.nan, math.inf, -math.inf, 1e308, -1e308, 1e-308, 1e38, 3.5e38, 1e-45,
               0.5, 1e-30, 1e30]
BAD_STRINGS = [b"", b"\xff\xfe\xfd", b"\x00\x01\x02", b"\x1b[31mred\x1b[0m\n\r", "é🦙".encode(), b"A" * 5000,
               b"\n" * 40, b"{{", b"%s%n%x", b"../../etc/passwd"]
BAD_TEMPLATES = [
    "{{ messages[0]['content'] ",  # syntax error
    "{% for m in messages %}{{ m.nope.deeper }}{% endfor %}",
    "{{ raise_exception('template refuses') }}",
    "{% for i in range(999999999) %}x{% endfor %}",
    "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "{{ 'x' * 1000000000 }}",
    "{{ messages | tojson }}{{ 1 / 0 }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "",
    "{% set x = namespace(a=1) %}{{ x.a.b.c() }}",
    "{% for m in messages %}{{ m['role'] + 1 }}{% endfor %}",
    "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}>{% endif %}",
]
HPARAM_SUFFIXES = ("block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
                   "attention.head_count_kv", "attention.key_length", "attention.value_length",
                   "attention.layer_norm_rms_epsilon", "rope.dimension_count", "rope.freq_base", "rope.scaling.type",
                   "rope.scaling.factor", "rope.scaling.original_context_length", "vocab_size",
                   "attention.sliding_window", "final_logit_softcapping", "attn_logit_softcapping")
SPECIAL_KEYS = ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.seperator_token_id", "tokenizer.ggml.eot_token_id",
                "tokenizer.ggml.eom_token_id")
TOKEN_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
ARCHES = [b"llama", b"qwen2", b"qwen3", b"gemma", b"gemma2", b"gemma3", b"phi3", b"mistral", b"gpt2", b"llamb", b"",
          b"\xffllama"]


def _rand_value(rng: random.Random, vtype: int):
    """An edge-case value of GGUF type ``vtype``."""
    if vtype in (GT_F32, GT_F64):
        return rng.choice(FLOAT_EDGES) if rng.random() < 0.8 else rng.uniform(-1e6, 1e6)
    if vtype == GT_BOOL:
        return rng.choice([True, False, 2, 255])
    if vtype == GT_STR:
        return rng.choice(BAD_STRINGS + [t.encode() for t in BAD_TEMPLATES[:3]])
    if vtype == GT_ARR:
        sub = rng.choice([GT_U32, GT_I32, GT_F32, GT_STR, GT_U8, GT_ARR])
        n = rng.choice([0, 1, 3, 100])
        if sub == GT_ARR:
            return sub, [(GT_U8, [1, 2]) for _ in range(n)]
        return sub, [_rand_value(rng, sub) for _ in range(n)]
    return rng.choice(INT_EDGES) if rng.random() < 0.85 else rng.randrange(-1000, 100000)


def _convert_value(rng: random.Random, v, new_type: int):
    """``v`` carried over to ``new_type`` where it makes sense (else an edge-case value)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and new_type in _SCALAR_FMT:
        return float(v) if new_type in (GT_F32, GT_F64) else (int(v) if math.isfinite(v) else 0)
    if new_type == GT_STR:
        return str(v).encode()[:200] if not isinstance(v, bytes) else v
    if new_type == GT_ARR and not isinstance(v, tuple):
        return (GT_U32, [v] if isinstance(v, int) else [1])
    return _rand_value(rng, new_type)

# ===================================================================================== GGUF mutators


def _kv_index(doc: GGUFDoc, pred) -> list:
    return [i for i, kv in enumerate(doc.kvs) if pred(kv.key.decode("utf-8", "replace"))]


def _pick_kv(rng, doc, pred=lambda k: True):
    idx = _kv_index(doc, pred)
    return doc.kvs[rng.choice(idx)] if idx else None


def _klabel(kv) -> str:
    return kv.key[:50].decode("utf-8", "replace")


def m_hparam(rng, doc: GGUFDoc) -> str:
    """A hyperparameter (``<arch>.*``, ``general.alignment``) set to an edge value of its type,
    or off by a little from its own value."""
    kv = _pick_kv(rng, doc, lambda k: k.endswith(HPARAM_SUFFIXES) or k == "general.alignment")
    if kv is None:
        return "no hyperparameter"
    old = kv.value
    if isinstance(old, (int, float)) and not isinstance(old, bool) and rng.random() < 0.4:
        kv.value = rng.choice([old + 1, old - 1, old * 2, old // 2 if isinstance(old, int) else old / 2, -old,
                               old * 1000])
    else:
        kv.value = _rand_value(rng, kv.vtype)
    return f"{_klabel(kv)}: {old!r} -> {_short(kv.value)}"


def m_kv_value(rng, doc) -> str:
    """Any key's value set to an edge value of its type."""
    kv = _pick_kv(rng, doc, lambda k: not k.startswith(TOKEN_ARRAYS))
    if kv is None:
        return "no key"
    kv.value = _rand_value(rng, kv.vtype) if kv.vtype != GT_ARR else _rand_value(rng, GT_ARR)
    return f"{_klabel(kv)} = {_short(kv.value)}"


def m_kv_type(rng, doc) -> str:
    """A key's value type changed (u32 -> f32, string, array, bool, u64, ...), value carried over."""
    kv = _pick_kv(rng, doc, lambda k: k.endswith(HPARAM_SUFFIXES + ("alignment", "architecture", "_token_id",
                                                                    "add_bos_token", "model", "pre",
                                                                    "chat_template")))
    if kv is None:
        kv = rng.choice(doc.kvs)
    old = kv.vtype
    kv.vtype = rng.choice([t for t in (GT_U8, GT_I8, GT_U16, GT_I32, GT_U32, GT_F32, GT_BOOL, GT_STR, GT_ARR, GT_U64,
                                       GT_I64, GT_F64, 13, 255) if t != old])
    kv.value = _convert_value(rng, kv.value, kv.vtype)
    return f"{_klabel(kv)}: type {old} -> {kv.vtype}"


def m_kv_delete(rng, doc) -> str:
    """A key removed (a required hyperparameter, the architecture, a tokenizer array)."""
    idx = _kv_index(doc, lambda k: True)
    i = rng.choice(idx)
    kv = doc.kvs.pop(i)
    return f"delete {_klabel(kv)}"


def m_kv_duplicate(rng, doc) -> str:
    """A key written twice, the second time with another value."""
    kv = rng.choice(doc.kvs)
    dup = copy.deepcopy(kv)
    if dup.vtype != GT_ARR:
        dup.value = _rand_value(rng, dup.vtype)
    doc.kvs.insert(rng.randrange(len(doc.kvs) + 1), dup)
    return f"duplicate key {_klabel(kv)}"


def m_kv_add(rng, doc) -> str:
    """A known key the file lacks added with an edge value and a random type."""
    arch = doc.arch
    key = rng.choice([f"{arch}.{s}" for s in HPARAM_SUFFIXES] + list(SPECIAL_KEYS) +
                     ["general.alignment", "tokenizer.chat_template", "tokenizer.ggml.add_bos_token",
                      "tokenizer.ggml.add_eos_token", "tokenizer.ggml.pre", "general.file_type",
                      f"{arch}.rope.scaling.attn_factor", f"{arch}.rope.scaling.yarn_log_multiplier",
                      "tokenizer.ggml.add_space_prefix"])
    vt = rng.choice([GT_U32, GT_F32, GT_STR, GT_BOOL, GT_I32, GT_U64, GT_ARR])
    doc.set(key, vt, _rand_value(rng, vt))
    return f"add {key} (type {vt}) = {_short(doc.get(key))}"


def _token_array(rng, doc):
    """A random tokenizer array entry of ``doc`` (None if it has none)."""
    kv = _pick_kv(rng, doc, lambda k: k.startswith(TOKEN_ARRAYS))
    return kv if kv is not None and kv.vtype == GT_ARR else None


def m_array_len(rng, doc) -> str:
    """A tokenizer array shortened, emptied or lengthened (no longer the vocabulary's size)."""
    kv = _token_array(rng, doc)
    if kv is None:
        return "no tokenizer array"
    sub, items = kv.value
    n = len(items)
    new = rng.choice([0, 1, n - 1, n // 2, n + 1, n + 7, 2 * n])
    items = items[:new] if new <= n else items + [items[i % max(n, 1)] for i in range(new - n)] if n else []
    kv.value = (sub, items)
    return f"{_klabel(kv)}: length {n} -> {len(items)}"


def m_array_type(rng, doc) -> str:
    """A tokenizer array's element type changed (scores as strings, tokens as i32, token_type as f32)."""
    kv = _token_array(rng, doc)
    if kv is None:
        return "no tokenizer array"
    sub, items = kv.value
    new = rng.choice([t for t in (GT_STR, GT_I32, GT_F32, GT_U8, GT_BOOL, GT_U64, GT_F64, GT_ARR, 14) if t != sub])
    conv = []
    for x in items:
        if new == GT_STR:
            conv.append(str(x).encode() if not isinstance(x, bytes) else x)
        elif new in _SCALAR_FMT:
            conv.append(len(x) if isinstance(x, bytes) else x if new != GT_BOOL else bool(x))
        elif new == GT_ARR:
            conv.append((GT_U8, [1]))
    if new == 14:
        conv = []
    kv.value = (new, conv)
    return f"{_klabel(kv)}: element type {sub} -> {new}"


def m_array_elems(rng, doc) -> str:
    """Some elements of a tokenizer array set to edge values (empty/non-UTF-8/huge tokens, NaN
    scores, token types 0/7/255, malformed merges)."""
    kv = _pick_kv(rng, doc, lambda k: k.startswith(TOKEN_ARRAYS))
    if kv is None or kv.vtype != GT_ARR or not kv.value[1]:
        return "no tokenizer array"
    sub, items = kv.value
    items = list(items)
    k = rng.choice([1, 3, 20])
    for _ in range(k):
        i = rng.randrange(len(items))
        if sub == GT_STR:
            items[i] = rng.choice(BAD_STRINGS + [b"<0xZZ>", b"<0x100>", b"a b c", b" ", b"<s>", items[0]])
        elif sub in _SCALAR_FMT:
            items[i] = _rand_value(rng, sub)
    kv.value = (sub, items)
    return f"{_klabel(kv)}: {k} elements changed"


def m_special_id(rng, doc) -> str:
    """A special token id (bos/eos/unk/pad/...) out of range, negative or of another type."""
    key = rng.choice(SPECIAL_KEYS[:4] + SPECIAL_KEYS)
    n = len((doc.get("tokenizer.ggml.tokens") or (0, []))[1])
    v = rng.choice([n, n + 1, -1, 2**31 - 1, 2**32 - 1, 2**63, 0, n - 1, 10**9])
    vt = rng.choice([GT_U32, GT_U32, GT_I32, GT_U64, GT_I64, GT_F32, GT_STR])
    doc.set(key, vt, _convert_value(rng, v, vt) if vt != GT_STR else str(v).encode())
    return f"{key} = {v} (type {vt})"


def m_chat_template(rng, doc) -> str:
    """tokenizer.chat_template replaced by a broken, hostile or huge template."""
    t = rng.choice(BAD_TEMPLATES)
    doc.set("tokenizer.chat_template", GT_STR, t.encode())
    return f"chat_template = {t[:40]!r}"


def m_arch(rng, doc) -> str:
    """general.architecture changed (another family, unknown, empty, non-UTF-8); keys may or may
    not be renamed to the new prefix."""
    old = doc.arch
    new = rng.choice(ARCHES)
    doc.set("general.architecture", GT_STR, new)
    renamed = rng.random() < 0.5
    if renamed:
        for kv in doc.kvs:
            if kv.key.startswith(old.encode() + b"."):
                kv.key = new + kv.key[len(old):]
    return f"architecture {old} -> {new!r}{' (keys renamed)' if renamed else ''}"


def m_alignment(rng, doc) -> str:
    """general.alignment set: only the key (data left where it was), or the file laid out anew."""
    v = rng.choice([0, 1, 3, 8, 16, 31, 48, 64, 256, 4096, 2**31, 2**32 - 1, 2**16])
    vt = rng.choice([GT_U32, GT_U32, GT_U32, GT_U64, GT_I32, GT_STR, GT_F32])
    doc.set("general.alignment", vt, str(v).encode() if vt == GT_STR else v)
    how = "key only"
    if vt == GT_U32 and v and v & (v - 1) == 0 and v <= 4096 and rng.random() < 0.6:
        doc.relayout(v)
        how = "relaid out"
    return f"general.alignment = {v} (type {vt}, {how})"


def _tensor(rng, doc, pred=lambda n: True):
    ts = [t for t in doc.tensors if pred(t.name.decode("utf-8", "replace"))]
    return rng.choice(ts) if ts else None


def m_tensor_ne(rng, doc) -> str:
    """A tensor's shape changed (0, 1, doubled, swapped, 2^62, ...); with ``consistent`` its data
    is regenerated to match and the file laid out anew (shape contradicts the hyperparameters only)."""
    t = _tensor(rng, doc)
    old = list(t.ne)
    i = rng.randrange(len(t.ne)) if t.ne else 0
    consistent = rng.random() < 0.4
    if consistent:
        choices = [[x * 2 if j == i else x for j, x in enumerate(t.ne)], list(reversed(t.ne)),
                   [x + (GGML_SIZES.get(t.ttype, (1, 1))[0] if j == 0 else 1) if j == i else x for j, x in enumerate(t.ne)],
                   t.ne[:1], t.ne + [1], [x // 2 if j == i and x > 1 else x for j, x in enumerate(t.ne)]]
        t.ne = rng.choice(choices)
        nb = tensor_nbytes(t.ne, t.ttype)
        if nb is not None and nb < 64 * 2**20:
            t.blob = bytes(rng.getrandbits(8) for _ in range(min(nb, 4096))) * (nb // 4096 + 1)
            t.blob = t.blob[:nb] if t.ttype not in (0, 1, 30) else _float_blob(rng, t.ttype, nb)
            doc.relayout()
        return f"tensor {t.name.decode(errors='replace')} ne {old} -> {t.ne} (data matched)"
    if t.ne:
        t.ne[i] = rng.choice([0, 1, 2**62, 2**63, 2**64 - 1, 2**31, 2**32 + t.ne[i], t.ne[i] + 1, t.ne[i] - 1,
                              t.ne[i] * 2, 10**12])
    return f"tensor {t.name.decode(errors='replace')} ne {old} -> {t.ne}"


def _float_blob(rng, ttype, nbytes) -> bytes:
    import numpy as np

    r = np.random.RandomState(rng.getrandbits(31))
    n = nbytes // {0: 4, 1: 2, 30: 2}[ttype]
    x = (r.standard_normal(n) * 0.1).astype(np.float32)
    if ttype == 0:
        return x.tobytes()
    if ttype == 1:
        return x.astype(np.float16).tobytes()
    return (x.view(np.uint32) >> 16).astype(np.uint16).tobytes()


def m_tensor_ndims(rng, doc) -> str:
    """A tensor's dimension count changed: shape entries dropped or added (0, 5 dims)."""
    t = _tensor(rng, doc)
    old = list(t.ne)
    t.ne = rng.choice([[], old + [1], old + [1, 1, 1, 1], old[:1], old + [2], [1] + old])
    return f"tensor {t.name.decode(errors='replace')} dims {old} -> {t.ne}"


def m_tensor_type(rng, doc) -> str:
    """A tensor's ggml type changed: unknown/removed ids, or a known type with data to match."""
    t = _tensor(rng, doc)
    old = t.ttype
    t.ttype = rng.choice([0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 15, 16, 20, 23, 24, 26, 28, 30, 39, 4, 5, 31, 250,
                          2**32 - 1])
    matched = ""
    if rng.random() < 0.5:
        nb = tensor_nbytes(t.ne, t.ttype)
        if nb is not None and nb < 64 * 2**20:
            t.blob = _float_blob(rng, t.ttype, nb) if t.ttype in (0, 1, 30) else rng.randbytes(nb)
            doc.relayout()
            matched = " (data matched)"
    return f"tensor {t.name.decode(errors='replace')} type {old} -> {t.ttype}{matched}"


def m_tensor_offset(rng, doc) -> str:
    """A tensor's data offset moved: by one byte, onto another tensor, past the end, huge."""
    t = _tensor(rng, doc)
    old = t.offset
    other = rng.choice(doc.tensors)
    t.offset = rng.choice([old + 1, old - 1, old + doc.align, old - doc.align, 0, other.offset, len(doc.data),
                           len(doc.data) - doc.align, 2**62, 2**64 - doc.align, 2**63, old + 2**32])
    return f"tensor {t.name.decode(errors='replace')} offset {old} -> {t.offset}"


def m_tensor_dup(rng, doc) -> str:
    """A tensor-info record duplicated (same name), or a second name pointing at the same data."""
    t = _tensor(rng, doc)
    d = copy.copy(t)
    d.ne = list(t.ne)
    if rng.random() < 0.5:
        d.name = t.name + b".copy"
        what = "aliased (same data, new name)"
    else:
        what = "duplicated"
    doc.tensors.insert(rng.randrange(len(doc.tensors) + 1), d)
    return f"tensor {t.name.decode(errors='replace')} {what}"


def m_tensor_delete(rng, doc) -> str:
    """A tensor removed (its data left in place, or the file laid out anew)."""
    t = _tensor(rng, doc)
    doc.tensors.remove(t)
    if rng.random() < 0.5:
        doc.relayout()
    return f"delete tensor {t.name.decode(errors='replace')}"


def m_tensor_rename(rng, doc) -> str:
    """A tensor renamed: to a layer past block_count, to garbage bytes, empty, very long."""
    t = _tensor(rng, doc)
    old = t.name
    n = doc.get(f"{doc.arch}.block_count", 1)
    n = n if isinstance(n, int) else 1
    t.name = rng.choice([f"blk.{n}.attn_q.weight".encode(), f"blk.{n + 5}.ffn_up.weight".encode(), b"",
                         b"\xff\xfe" + old, old + b"\x00", b"x" * 70000, old.replace(b"weight", b"bias"),
                         b"blk.-1.attn_norm.weight", b"blk.99999999999999999999.attn_norm.weight"])
    return f"tensor {old.decode(errors='replace')} renamed to {_short(t.name)}"


def m_layers(rng, doc) -> str:
    """block_count disagrees with the blk.N groups: the last layer's tensors removed, or a layer
    copied to a new index, or block_count itself changed."""
    arch = doc.arch
    n = doc.get(f"{arch}.block_count")
    if not isinstance(n, int) or n < 1:
        return "no block_count"
    how = rng.choice(["drop", "add", "count"])
    if how == "drop":
        doc.tensors = [t for t in doc.tensors if not t.name.startswith(f"blk.{n - 1}.".encode())]
        doc.relayout()
    elif how == "add":
        src = rng.randrange(n)
        for t in [t for t in doc.tensors if t.name.startswith(f"blk.{src}.".encode())]:
            c = copy.copy(t)
            c.name = t.name.replace(f"blk.{src}.".encode(), f"blk.{n}.".encode(), 1)
            c.ne = list(t.ne)
            doc.tensors.append(c)
        doc.relayout()
    else:
        doc.set(f"{arch}.block_count", GT_U32, rng.choice([n - 1, n + 1, 0, 2**31 - 1, 2**32 - 1, 1000]))
    return f"layers: {how} (block_count {n} -> {doc.get(f'{arch}.block_count')})"


def m_tensor_data(rng, doc) -> str:
    """A tensor's data filled with NaN/Inf/huge values (float types) or random bytes (quantized,
    including their float16 scales)."""
    import numpy as np

    t = _tensor(rng, doc, lambda n: True)
    if t is None or t.blob is None:
        return "no tensor data"
    b = bytearray(t.blob)
    if t.ttype == 0:
        a = np.frombuffer(bytes(b), np.float32).copy()
        v = rng.choice([np.nan, np.inf, -np.inf, 3e38, 1e-45, 0.0])
        if rng.random() < 0.5:
            a[:] = v
        else:
            a[rng.randrange(len(a))] = v
        b = bytearray(a.tobytes())
        what = f"set to {v}"
    else:
        k = rng.choice([1, 16, len(b)])
        for _ in range(min(k, 4096)):
            b[rng.randrange(len(b))] = rng.choice([0xFF, 0x7C, 0x7E, 0x00, rng.getrandbits(8)])
        what = f"{k} random bytes"
    t.blob = bytes(b)
    doc.relayout()
    return f"tensor {t.name.decode(errors='replace')} data {what}"


def m_counts(rng, doc) -> str:
    """The header's tensor or key count off by one or huge, or another version."""
    what = rng.choice(["n_tensors", "n_kv", "version"])
    if what == "version":
        doc.version = rng.choice([0, 1, 2, 4, 2**32 - 1, 0x03000000])
        return f"version {doc.version}"
    base = len(doc.tensors) if what == "n_tensors" else len(doc.kvs)
    v = rng.choice([base + 1, base - 1, 0, 2**62, 2**64 - 1, base * 1000])
    setattr(doc, what, v)
    return f"{what} {base} -> {v}"


GGUF_MUTATORS = [(m_hparam, 14), (m_kv_value, 4), (m_kv_type, 6), (m_kv_delete, 5), (m_kv_duplicate, 3), (m_kv_add, 4),
                 (m_array_len, 6), (m_array_type, 4), (m_array_elems, 4), (m_special_id, 5), (m_chat_template, 3),
                 (m_arch, 3), (m_alignment, 4), (m_tensor_ne, 6), (m_tensor_ndims, 2), (m_tensor_type, 5),
                 (m_tensor_offset, 4), (m_tensor_dup, 3), (m_tensor_delete, 3), (m_tensor_rename, 2), (m_layers, 5),
                 (m_tensor_data, 5), (m_counts, 3)]


def raw_mutation(rng, data: bytes, fields: list) -> tuple[bytes, str]:
    """Byte-level damage after serializing: a length/count field set huge, truncation, bit flips
    in the header, garbage appended."""
    how = rng.choice(["field", "field", "truncate", "flip", "append"])
    b = bytearray(data)
    hdr_end = next((p for lab, p, w in fields if lab == "data"), len(b))
    if how == "field":
        lab, pos, w = rng.choice([f for f in fields if f[2]])
        old = int.from_bytes(b[pos:pos + w], "little")
        v = rng.choice([2**62, 2**64 - 1, 2**63, 2**32 - 1, 2**31, old + 1, old - 1, 0, old * 2, old + 2**32])
        b[pos:pos + w] = (v & (2**(8 * w) - 1)).to_bytes(w, "little")
        return bytes(b), f"raw {lab} {old} -> {v & (2**(8 * w) - 1)}"
    if how == "truncate":
        n = rng.choice([rng.randrange(len(b)), rng.randrange(max(1, hdr_end)), hdr_end, len(b) - 1, 24, 4])
        return bytes(b[:n]), f"truncated to {n} of {len(b)} bytes"
    if how == "flip":
        k = rng.choice([1, 2, 8])
        for _ in range(k):
            p = rng.randrange(min(hdr_end, len(b)))
            b[p] ^= 1 << rng.randrange(8)
        return bytes(b), f"{k} bit flips in the header"
    extra = rng.choice([b"\0" * 7, b"GGUF" * 100, bytes(range(256))])
    return bytes(b) + extra, f"{len(extra)} bytes appended"


def _short(v, n: int = 60) -> str:
    s = repr(v)
    return s if len(s) <= n else s[:n] + "..."

# ===================================================================================== safetensors / JSON


def parse_safetensors(buf: bytes) -> tuple[dict, bytes]:
    """(header dict, data bytes) of a safetensors file we made (trusted)."""
    (n,) = struct.unpack_from("<Q", buf)
    return json.loads(buf[8:8 + n]), buf[8 + n:]


def write_safetensors(header, data: bytes, raw_header: bytes | None = None) -> bytes:
    """A safetensors file from a header (any JSON value) or raw header bytes, and data."""
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def st_relayout(header: dict, data: bytes, blobs: dict) -> bytes:
    """Rewrite offsets for ``blobs`` (name -> bytes) in header order; returns the new data."""
    out = bytearray()
    for k, v in header.items():
        if k == "__metadata__" or k not in blobs:
            continue
        v["data_offsets"] = [len(out), len(out) + len(blobs[k])]
        out += blobs[k]
    return bytes(out)


def mutate_safetensors(rng, buf: bytes) -> tuple[bytes, str]:
    """One structure-aware change of a safetensors file (header JSON, length field, data)."""
    header, data = parse_safetensors(buf)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    e = header[name]
    how = rng.choice(["dtype", "shape", "shape_consistent", "offsets", "offsets", "delete", "add", "rename", "nested",
                      "metadata", "not_object", "hlen", "truncate", "nan", "dupkey", "bad_json"])
    desc = how
    raw_header = None
    if how == "dtype":
        e["dtype"] = rng.choice(["F16", "BF16", "F64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "", "f32", 5, None,
                                 ["F32"]])
        desc = f"{name} dtype -> {e['dtype']!r}"
    elif how == "shape":
        s = list(e["shape"])
        e["shape"] = rng.choice([[], [0] + s[1:], [-1] + s[1:], [10**12] + s[1:], s[::-1], s + [1], [s[0] * 2] + s[1:],
                                 [2**63] + s[1:], ["64"] + s[1:], [1.5] + s[1:], [[1]], None, "x"])
        desc = f"{name} shape {s} -> {e['shape']!r}"
    elif how == "shape_consistent":
        import numpy as np

        s = list(e["shape"])
        new = rng.choice([s[::-1], [s[0] * 2] + s[1:], [max(1, s[0] // 2)] + s[1:], s + [1], [int(np.prod(s))]])
        isz = {"F32": 4, "F16": 2, "BF16": 2}.get(e["dtype"], 4)
        blobs = {k: data[v["data_offsets"][0]:v["data_offsets"][1]] for k, v in header.items() if k != "__metadata__"}
        n = int(np.prod(new)) * isz
        blobs[name] = (blobs[name] * (n // max(1, len(blobs[name])) + 1))[:n]
        e["shape"] = new
        data = st_relayout(header, data, blobs)
        desc = f"{name} shape {s} -> {new} (data matched)"
    elif how == "offsets":
        a, b = e["data_offsets"]
        other = header[rng.choice(names)]["data_offsets"]
        e["data_offsets"] = rng.choice([[a + 1, b + 1], [other[0], other[0] + b - a], [b, a], [-4, b - a - 4],
                                        [len(data), len(data) + b - a], [a, b + 4], [2**64 - 8, 2**64 - 8 + b - a],
                                        [a], [a, b, b], [float(a), float(b)], [str(a), str(b)], None])
        desc = f"{name} data_offsets [{a}, {b}] -> {e['data_offsets']!r}"
    elif how == "delete":
        del header[name]
        desc = f"delete {name}"
    elif how == "add":
        n_layers = 1 + max([int(m.group(1)) for m in (re.match(r"model\.layers\.(\d+)\.", k) for k in names) if m] or [0])
        new = rng.choice([f"model.layers.{n_layers}.self_attn.q_proj.weight", "model.unknown.weight", "lm_head.weight",
                          name + "_extra", "model.layers.0.self_attn.q_proj.bias"])
        header[new] = dict(e)
        desc = f"add {new} (copy of {name}'s entry)"
    elif how == "rename":
        new = rng.choice([name.replace("weight", "bias"), name.upper(), "", name + "\x00", "\udcff" + name, name * 40])
        header = {new if k == name else k: v for k, v in header.items()}
        desc = f"rename {name} -> {_short(new)}"
    elif how == "nested":
        depth = rng.choice([100, 5000, 100000])
        raw = "[" * depth + "]" * depth
        where = rng.choice(["metadata", "entry", "shape"])
        body = json.dumps(header)
        if where == "metadata":
            raw_header = ('{"__metadata__": {"x": ' + raw + "}, " + body[1:]).encode()
        elif where == "entry":
            raw_header = ('{"deep": ' + raw + ", " + body[1:]).encode()
        else:
            raw_header = body.replace('"shape": [', '"shape": [' + raw + ", ", 1).encode()
        desc = f"nesting depth {depth} in {where}"
    elif how == "metadata":
        header["__metadata__"] = rng.choice([[1, 2], "x", 5, None, {"format": 5}, {"format": "tf"},
                                             {"a": {"b": "c"}}, {"x" * 100: "y" * 10000}])
        desc = f"__metadata__ = {_short(header['__metadata__'])}"
    elif how == "not_object":
        raw_header = rng.choice([b"[]", b'"x"', b"1", b"null", b"{}"])
        desc = f"header {raw_header!r}"
    elif how == "bad_json":
        body = json.dumps(header).encode()
        raw_header = rng.choice([body[:len(body) // 2], b"\xff\xfe" + body, body.replace(b'"', b"'", 2),
                                 body.replace(b"{", b"{\x00", 1), b"\xef\xbb\xbf" + body, body + b"xx"])
        desc = "header JSON broken"
    elif how == "dupkey":
        body = json.dumps(header)
        entry = json.dumps({name: e})[1:-1]
        bad = dict(e, data_offsets=[0, e["data_offsets"][1] - e["data_offsets"][0]])
        raw_header = ("{" + entry + ", " + json.dumps({name: bad})[1:-1] + ", " + body[1:]).encode()
        desc = f"{name} listed twice"
    elif how == "nan":
        import numpy as np

        if e["dtype"] in ("F32", "F16"):
            dt = np.float32 if e["dtype"] == "F32" else np.float16
            a, b = e["data_offsets"]
            arr = np.frombuffer(data[a:b], dt).copy()
            arr[rng.randrange(len(arr)) if rng.random() < 0.5 else slice(None)] = rng.choice([np.nan, np.inf, 6e4])
            data = data[:a] + arr.tobytes() + data[b:]
        desc = f"{name} data NaN/Inf"
    out = write_safetensors(header, data, raw_header)
    if how == "hlen":
        (n,) = struct.unpack_from("<Q", out)
        v = rng.choice([n + 1, n - 1, 0, 2**64 - 1, len(out) - 8, len(out), 2**31, n + 8])
        out = struct.pack("<Q", v) + out[8:]
        desc = f"header length {n} -> {v}"
    elif how == "truncate":
        k = rng.choice([4, 8, 20, len(out) // 2, len(out) - 1])
        out = out[:k]
        desc = f"truncated to {k} bytes"
    return out, desc


CONFIG_VALUES = [0, -1, 1, 2, 3, 10**9, 10**18, 2**63, 2**64, 1e308, -1e308, math.nan, math.inf, -math.inf, 0.5, 1e-30,
                 "64", None, [], {}, True, False, "x" * 2000, [64, 64]]
CONFIG_KEYS = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "head_dim", "tie_word_embeddings",
               "bos_token_id", "eos_token_id", "torch_dtype", "rope_scaling", "architectures", "model_type",
               "hidden_act", "attention_bias", "sliding_window", "quantization_config", "pad_token_id",
               "text_config", "rope_parameters", "partial_rotary_factor"]


def mutate_config(rng, cfg: dict) -> tuple[object, str]:
    """One change of a config.json object: a wrong type/edge value, a missing key, a value that
    contradicts the checkpoint's tensors, another architecture, weird rope_scaling."""
    cfg = copy.deepcopy(cfg)
    how = rng.choice(["value", "value", "value", "plausible", "delete", "arch", "rope_scaling", "not_object"])
    key = rng.choice(CONFIG_KEYS)
    if how == "value":
        cfg[key] = rng.choice(CONFIG_VALUES)
        return cfg, f"config {key} = {_short(cfg[key])}"
    if how == "plausible":
        key = rng.choice([k for k in CONFIG_KEYS[:10] if isinstance(cfg.get(k), int)] or ["hidden_size"])
        old = cfg.get(key, 64)
        cfg[key] = rng.choice([old * 2, old + 1, max(1, old // 2), old - 1, old * 1000])
        return cfg, f"config {key} {old} -> {cfg[key]}"
    if how == "delete":
        key = rng.choice(list(cfg))
        del cfg[key]
        return cfg, f"config delete {key}"
    if how == "arch":
        cfg["architectures"] = rng.choice([["Qwen2ForCausalLM"], ["Gemma3ForCausalLM"], ["Phi3ForCausalLM"],
                                           ["Qwen3ForCausalLM"], ["MistralForCausalLM"], ["Gemma2ForCausalLM"],
                                           ["GPT2LMHeadModel"], ["NopeForCausalLM"], [], "LlamaForCausalLM", [None],
                                           ["LlamaForCausalLM", "Qwen2ForCausalLM"]])
        if rng.random() < 0.5:
            cfg["model_type"] = rng.choice(["qwen2", "gemma3_text", "phi3", "qwen3", "nope", 5])
        return cfg, f"config architectures = {cfg['architectures']!r}, model_type = {cfg.get('model_type')!r}"
    if how == "rope_scaling":
        cfg["rope_scaling"] = rng.choice([
            {"type": "linear", "factor": rng.choice([0, -1, math.nan, 1e308, "2"])},
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": rng.choice([0, -1, None, 10**12])},
            {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0,
             "original_max_position_embeddings": 64},
            {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [math.nan]},
            {"rope_type": "nope"}, [], "linear"])
        return cfg, f"config rope_scaling = {_short(cfg['rope_scaling'])}"
    return rng.choice([[cfg], "config", 5, None]), "config.json not an object"


def mutate_json_obj(rng, obj, path: str) -> tuple[object, str]:
    """A generic JSON mutation: some nested value replaced by an edge value, a key deleted, a list
    shortened; used for tokenizer.json and tokenizer_config.json."""
    obj = copy.deepcopy(obj)
    # collect container paths
    slots = []

    def walk(o, p, depth):
        if depth > 6:
            return
        if isinstance(o, dict):
            for k, v in list(o.items())[:200]:
                slots.append((o, k, p + f".{k}"))
                walk(v, p + f".{k}", depth + 1)
        elif isinstance(o, list):
            for i in sorted(set([0, 1, len(o) // 2, len(o) - 1])):
                if 0 <= i < len(o):
                    slots.append((o, i, p + f"[{i}]"))
                    walk(o[i], p + f"[{i}]", depth + 1)

    walk(obj, path, 0)
    if not slots:
        return obj, "nothing to mutate"
    cont, k, p = rng.choice(slots)
    how = rng.choice(["value", "value", "delete", "shorten"])
    if how == "delete" and isinstance(cont, dict):
        del cont[k]
        return obj, f"{p} deleted"
    if how == "shorten" and isinstance(cont[k], (list, dict)) and cont[k]:
        if isinstance(cont[k], list):
            cont[k] = cont[k][:len(cont[k]) // 2]
        else:
            cont[k] = dict(list(cont[k].items())[:len(cont[k]) // 2])
        return obj, f"{p} halved"
    cont[k] = rng.choice(CONFIG_VALUES + [-5, 99999, "<s>", "\udcff", {"content": 5}, [1, "a"], {"id": -1}])
    return obj, f"{p} = {_short(cont[k])}"


def mutate_tokenizer_config(rng, tc: dict) -> tuple[object, str]:
    """tokenizer_config.json: wrong special token types, bad chat templates, odd added tokens."""
    tc = copy.deepcopy(tc)
    how = rng.choice(["template", "template", "special", "added", "generic", "flags"])
    if how == "template":
        t = rng.choice(BAD_TEMPLATES + [5, None, [], [{"name": "default"}], [{"name": 5, "template": "{{x}}"}],
                                        [{"name": "default", "template": BAD_TEMPLATES[0]}]])
        tc["chat_template"] = t
        return tc, f"chat_template = {_short(t, 40)}"
    if how == "special":
        k = rng.choice(["bos_token", "eos_token", "unk_token", "pad_token"])
        tc[k] = rng.choice([5, None, [], {"content": None}, {"content": "<nope>", "special": True}, "", "x" * 3000,
                            {"content": 5}, "<s><s>", "\x00"])
        return tc, f"{k} = {_short(tc[k])}"
    if how == "added":
        tc["added_tokens_decoder"] = rng.choice([
            {"-1": {"content": "<x>", "special": True}}, {"99999": {"content": "<x>", "special": True}},
            {"abc": {"content": "<x>"}}, {"5": "<x>"}, {"5": {"content": None}}, [], "x",
            {"1": {"content": "<s>", "special": True}, "2": {"content": "<s>", "special": True}},
            {str(2**64): {"content": "<big>", "special": True}}])
        return tc, f"added_tokens_decoder = {_short(tc['added_tokens_decoder'])}"
    if how == "flags":
        k = rng.choice(["add_bos_token", "add_eos_token", "legacy", "model_max_length", "clean_up_tokenization_spaces",
                        "tokenizer_class"])
        tc[k] = rng.choice(["yes", 5, None, [], -1, 1e308, "NopeTokenizer"])
        return tc, f"{k} = {tc[k]!r}"
    return mutate_json_obj(rng, tc, "tokenizer_config")


def mutate_bytes(rng, b: bytes, what: str) -> tuple[bytes, str]:
    """Truncation, bit flips or emptying of an opaque file (tokenizer.model, JSON text)."""
    how = rng.choice(["truncate", "flip", "empty"])
    if how == "truncate" or not b:
        k = rng.randrange(max(1, len(b)))
        return b[:k], f"{what} truncated to {k} bytes"
    if how == "flip":
        bb = bytearray(b)
        k = rng.choice([1, 4, 32])
        for _ in range(k):
            bb[rng.randrange(len(bb))] ^= 1 << rng.randrange(8)
        return bytes(bb), f"{what}: {k} bit flips"
    return b"", f"{what} emptied"

# ===================================================================================== quantized checkpoints, LoRA

#: bytes per element of the safetensors dtypes
ST_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
            "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "U16": 2, "U32": 4}
#: tensors that carry a quantization (scales, code books, quant states, zero points, fp8/int8 codes)
_QUANT_RE = re.compile(r"absmax|quant_map|quant_state|\.SCB$|weight_format|_scale(_inv)?$|zero_point|input_scale|"
                       r"weight_packed|weight_shape")
#: hostile bytes per fp8/int dtype: NaN and infinity patterns, extremes
_BAD_BYTES = {"F8_E4M3": [0x7F, 0xFF, 0x7E], "F8_E5M2": [0x7C, 0xFC, 0x7E, 0x7B], "F8_E8M0": [0xFF, 0x00, 0xFE],
              "I8": [0x80, 0x7F], "U8": [0xFF, 0x00, 0x10]}


def _st_split(buf: bytes) -> tuple[dict, dict]:
    """(header, {name: bytes}) of a safetensors file we made."""
    header, data = parse_safetensors(buf)
    return header, {k: data[v["data_offsets"][0]:v["data_offsets"][1]] for k, v in header.items() if k != "__metadata__"}


def _st_join(header: dict, blobs: dict) -> bytes:
    return write_safetensors(header, st_relayout(header, b"", blobs))


def _numel(shape) -> int:
    n = 1
    for x in shape:
        n *= x
    return n


def _resized(blob: bytes, n: int) -> bytes:
    return (blob * (n // max(1, len(blob)) + 1))[:n] if blob else b"\0" * n


def _bad_values(rng, dtype: str, blob: bytes) -> tuple[bytes, str]:
    """``blob`` (of ``dtype``) with one or all values set to NaN, an infinity, zero, a negative or huge
    value (float dtypes), or the fp8/int8 NaN/inf/extreme byte patterns."""
    import numpy as np

    every = rng.random() < 0.4
    if dtype in ("F32", "F16", "BF16"):
        a = np.frombuffer(blob, np.float32 if dtype == "F32" else np.uint16).copy()
        if not len(a):
            return blob, "empty"
        v = rng.choice([math.nan, math.inf, -math.inf, 0.0, -1.0, 1e30, 1e-40, 65504.0 * 4])
        if dtype == "F32":
            a[slice(None) if every else rng.randrange(len(a))] = v
        else:
            f = np.float32(v)
            bits = (np.array([f]).view(np.uint32) >> 16).astype(np.uint16)[0] if dtype == "BF16" else \
                np.array([f], np.float32).astype(np.float16).view(np.uint16)[0]
            a[slice(None) if every else rng.randrange(len(a))] = bits
        return a.tobytes(), f"{'all' if every else 'one'} = {v}"
    b = bytearray(blob)
    if not b:
        return blob, "empty"
    pat = _BAD_BYTES.get(dtype, [0xFF, 0x00])
    for i in (range(len(b)) if every else [rng.randrange(len(b)) for _ in range(rng.choice([1, 5]))]):
        b[i] = rng.choice(pat)
    return bytes(b), f"{'all' if every else 'some'} bytes in {[hex(p) for p in pat]}"


QUANT_STATE_VALUES = {
    "quant_type": ["nf4", "fp4", "int8", "", 5, None],
    "blocksize": [0, -1, 7, 63, 16, 2**40, "64", 64.0, None, True, 8192],
    "dtype": ["float64", "int8", "torch.float16", "", 5, None, "bfloat16"],
    "shape": [[0, 256], [-1, 256], [256], [2**31, 2**31], ["256", 256], None, [256, 256, 1], [1, 1], [512, 256],
              [256, 128], 5],
    "nested_blocksize": [0, -1, 100, 2**40, "256", None],
    "nested_dtype": ["float64", "", None],
    "nested_offset": [math.nan, math.inf, "0.1", None, 1e308, []],
}


def mutate_quant_state(rng, raw: bytes) -> tuple[bytes, str]:
    """A bitsandbytes 4-bit quant state (UTF-8 JSON in a uint8 tensor) changed: a key set to a wrong
    type or value, deleted, the JSON broken, not an object, not UTF-8, huge."""
    try:
        qs = json.loads(raw)
    except ValueError:
        qs = {}
    how = rng.choice(["key", "key", "key", "key", "delete", "not_object", "bad_json", "bad_utf8", "huge"])
    if how == "key" and isinstance(qs, dict):
        k = rng.choice(list(QUANT_STATE_VALUES))
        qs[k] = rng.choice(QUANT_STATE_VALUES[k])
        return json.dumps(qs).encode(), f"quant_state {k} = {_short(qs[k])}"
    if how == "delete" and isinstance(qs, dict) and qs:
        k = rng.choice(list(qs))
        del qs[k]
        return json.dumps(qs).encode(), f"quant_state delete {k}"
    if how == "not_object":
        v = rng.choice([[qs], "x", 5, None])
        return json.dumps(v).encode(), f"quant_state = {_short(v)}"
    if how == "bad_json":
        return raw[:len(raw) // 2], "quant_state JSON cut in half"
    if how == "bad_utf8":
        return b"\xff\xfe" + raw, "quant_state not UTF-8"
    return json.dumps(dict(qs if isinstance(qs, dict) else {}, pad="x" * 100000)).encode(), "quant_state 100 kB"


def mutate_quant_safetensors(rng, buf: bytes) -> tuple[bytes, str]:
    """One change of a quantized checkpoint's tensors aimed at its quantization: a scale, code book,
    quant state or zero point removed; a dtype changed (data matched or not); a shape changed with
    data to match; NaN/inf/zero/negative scales, fp8 NaN/inf codes; the quant state's JSON broken;
    LLM.int8's weight_format changed; two quantization tensors swapped."""
    header, blobs = _st_split(buf)
    names = [k for k in header if k != "__metadata__"]
    quant = [k for k in names if _QUANT_RE.search(k) or header[k]["dtype"] in ("F8_E4M3", "F8_E5M2", "I8", "U8")]
    name = rng.choice(quant or names)
    e = header[name]
    states = [k for k in names if "quant_state" in k]
    how = rng.choice(["delete", "delete", "dtype", "dtype_matched", "shape_matched", "shape_matched", "values",
                      "values", "values", "quant_state", "quant_state", "weight_format", "zero", "swap"])
    if how == "quant_state" and states:
        name = rng.choice(states)
        raw, desc = mutate_quant_state(rng, blobs[name])
        blobs[name] = raw
        header[name]["shape"] = [len(raw)]
        return _st_join(header, blobs), f"{name}: {desc}"
    if how == "weight_format":
        wf = [k for k in names if k.endswith("weight_format")]
        if wf:
            name = rng.choice(wf)
            v = rng.choice([1, 2, 255])
            blobs[name] = bytes([v]) * len(blobs[name])
            return _st_join(header, blobs), f"{name} = {v}"
    if how == "delete":
        del header[name]
        blobs.pop(name)
        return _st_join(header, blobs), f"delete {name}"
    if how in ("dtype", "dtype_matched"):
        old = e["dtype"]
        e["dtype"] = rng.choice([d for d in ("F32", "F16", "BF16", "I8", "U8", "I32", "F8_E4M3", "F8_E5M2", "F8_E8M0",
                                             "I64", "BOOL", "F64") if d != old])
        if how == "dtype_matched":
            blobs[name] = _resized(blobs[name], _numel(e["shape"]) * ST_SIZES[e["dtype"]])
        return _st_join(header, blobs), f"{name} dtype {old} -> {e['dtype']}{' (data matched)' if how == 'dtype_matched' else ''}"
    if how == "shape_matched":
        s = list(e["shape"])
        opts = [s[::-1], s + [1], [_numel(s)], [1] * max(1, len(s)), []]
        if s:
            opts += [[s[0] + 1] + s[1:], [max(1, s[0] // 2)] + s[1:], [s[0] * 2] + s[1:]]
        if len(s) > 1:
            opts += [s[:-1] + [s[-1] + 1], s[:-1] + [max(1, s[-1] // 2)]]
        new = rng.choice(opts)
        e["shape"] = new
        blobs[name] = _resized(blobs[name], _numel(new) * ST_SIZES.get(e["dtype"], 1))
        return _st_join(header, blobs), f"{name} shape {s} -> {new} (data matched)"
    if how == "zero":
        s = list(e["shape"]) or [1]
        s[rng.randrange(len(s))] = 0
        e["shape"] = s
        blobs[name] = b""
        return _st_join(header, blobs), f"{name} shape -> {s} (empty)"
    if how == "swap" and len(quant) > 1:
        other = rng.choice([k for k in quant if k != name])
        header[name], header[other] = header[other], header[name]
        blobs[name], blobs[other] = blobs[other], blobs[name]
        return _st_join(header, blobs), f"{name} and {other} swapped"
    blobs[name], desc = _bad_values(rng, e["dtype"], blobs[name])
    return _st_join(header, blobs), f"{name} ({e['dtype']}) values: {desc}"


QC_KEYS = {
    "bitsandbytes": ["load_in_4bit", "load_in_8bit", "_load_in_4bit", "_load_in_8bit", "bnb_4bit_quant_type",
                     "bnb_4bit_quant_storage", "bnb_4bit_use_double_quant", "bnb_4bit_compute_dtype",
                     "llm_int8_skip_modules", "llm_int8_threshold"],
    "fp8": ["fmt", "weight_block_size", "activation_scheme", "scale_fmt", "modules_to_not_convert"],
    "compressed-tensors": ["format", "config_groups", "ignore", "quantization_status", "kv_cache_scheme"],
}
QC_GROUP_KEYS = ["num_bits", "type", "strategy", "group_size", "block_structure", "symmetric", "dynamic", "actorder"]
QC_VALUES = [None, 0, -1, 1, 4, 7, 8, 16, 128, "8", "128", 2**40, 1.5, math.nan, True, False, [], {}, [128], [0, 128],
             [128, 128, 1], [-128, 128], ["a", "b"], [128.0, 128.0], [2**40, 1], "bogus", "e5m2", "e4m3", "E4M3", "nf4",
             "fp4", "int", "float", "channel", "group", "block", "tensor", "token", "float-quantized", "int-quantized",
             "pack-quantized", "naive-quantized", "uint8", "float16", "ue8m0"]


def mutate_qconfig(rng, cfg: dict) -> tuple[object, str]:
    """One change of config.json's ``quantization_config``: another or no quant_method, a key of its
    method set to a wrong type or edge value, deleted, the compressed-tensors weights scheme
    changed (bits, type, strategy, group size, block structure), or not an object."""
    cfg = copy.deepcopy(cfg)
    qc = cfg.get("quantization_config")
    how = rng.choice(["method", "key", "key", "key", "key", "delete", "group", "group", "group", "not_object"])
    if how == "not_object" or not isinstance(qc, dict):
        cfg["quantization_config"] = rng.choice([None, [], "fp8", 5, {}, {"quant_method": None}])
        return cfg, f"quantization_config = {_short(cfg['quantization_config'])}"
    method = qc.get("quant_method")
    if how == "method":
        qc["quant_method"] = rng.choice(["bitsandbytes", "fp8", "compressed-tensors", "gptq", "awq", "FP8", "", None,
                                         5, "hqq"])
        return cfg, f"quant_method {method!r} -> {qc['quant_method']!r}"
    if how == "delete" and qc:
        k = rng.choice(list(qc))
        del qc[k]
        return cfg, f"quantization_config delete {k}"
    groups = qc.get("config_groups")
    if how == "group" and isinstance(groups, dict) and groups:
        g = groups[rng.choice(list(groups))]
        part = rng.choice(["weights", "weights", "weights", "input_activations"])
        if isinstance(g, dict) and isinstance(g.get(part), dict) and rng.random() < 0.9:
            k = rng.choice(QC_GROUP_KEYS)
            g[part][k] = rng.choice(QC_VALUES)
            return cfg, f"config_groups {part}.{k} = {_short(g[part][k])}"
        if isinstance(g, dict):
            g[part] = rng.choice([None, 5, "x", {}])
            return cfg, f"config_groups {part} = {_short(g[part])}"
    keys = QC_KEYS.get(method, []) + rng.sample(sum(QC_KEYS.values(), []), 2)
    k = rng.choice(keys)
    qc[k] = rng.choice(QC_VALUES)
    return cfg, f"quantization_config {k} = {_short(qc[k])}"


ADAPTER_CONFIG_VALUES = {
    "r": [0, -1, 2**31, "8", 8.5, None, math.nan, 4, 16, True],
    "lora_alpha": [0, math.nan, math.inf, -1, "16", None, 1e308, [], 32],
    "peft_type": ["PREFIX_TUNING", "lora", None, 5, "ADALORA", "LOHA", ""],
    "target_modules": [["q_proj"], "all-linear", [], None, ["nope"], 5, "q_proj|v_proj", ["embed_tokens"], ["lm_head"]],
    "use_rslora": [True, "yes", None, 1],
    "rank_pattern": [{"q_proj": 0}, {"x": "a"}, [1], {"model.layers.0.self_attn.q_proj": 2**40},
                     {"model.layers.0.self_attn.q_proj": -4}, {"q_proj": math.nan}, "q_proj"],
    "alpha_pattern": [{"q_proj": math.nan}, {"x": "a"}, [1], {"model.layers.1.self_attn.o_proj": math.inf},
                      {"q_proj": None}, {"q_proj": -1e308}],
    "fan_in_fan_out": [True, "true"],
    "bias": ["all", "lora_only", None, 5],
    "use_dora": [True, 1],
    "modules_to_save": [["lm_head"], ["embed_tokens"], "lm_head", [5]],
    "layers_to_transform": [[0], [99], 0, "0"],
    "layers_pattern": ["layers", 5],
    "base_model_name_or_path": ["/nonexistent/model", None, 5, "", "../../etc", "x" * 500],
    "task_type": [None, "SEQ_CLS", 5],
    "layer_replication": [[[0, 1]], "x"],
    "target_parameters": [["mlp.experts.gate_up_proj"], []],
    "trainable_token_indices": [[1, 2], {"embed_tokens": [1]}],
    "alora_invocation_tokens": [[1, 2, 3]],
    "use_qalora": [True],
}


def mutate_adapter_config(rng, cfg) -> tuple[object, str]:
    """One change of a PEFT ``adapter_config.json``: a key (rank, alpha, type, targets, patterns, the
    options ggq refuses) set to a wrong type or edge value, deleted, or the file not an object."""
    cfg = copy.deepcopy(cfg)
    how = rng.choice(["key", "key", "key", "key", "delete", "not_object"])
    if how == "not_object" or not isinstance(cfg, dict):
        return rng.choice([[cfg], "adapter", 5, None]), "adapter_config.json not an object"
    if how == "delete":
        k = rng.choice(["r", "lora_alpha", "peft_type", "target_modules", "base_model_name_or_path"])
        cfg.pop(k, None)
        return cfg, f"adapter_config delete {k}"
    k = rng.choice(list(ADAPTER_CONFIG_VALUES))
    cfg[k] = rng.choice(ADAPTER_CONFIG_VALUES[k])
    return cfg, f"adapter_config {k} = {_short(cfg[k])}"


def mutate_adapter_tensors(rng, buf: bytes) -> tuple[bytes, str]:
    """One change of ``adapter_model.safetensors`` aimed at LoRA pairs: a lora_B (or lora_A) removed,
    a pair's rank or width changed (data matched), A and B swapped, a module past the model's layers
    or unknown, embedding/lm_head/bias adapters added, NaN/inf values, another dtype, a 3-D tensor."""
    header, blobs = _st_split(buf)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    e = header[name]
    s = list(e["shape"])
    isz = ST_SIZES.get(e["dtype"], 4)
    how = rng.choice(["unpair", "rank", "width", "swap", "rename", "rename", "add", "add", "values", "values",
                      "dtype", "ndim"])
    if how == "unpair":
        del header[name]
        blobs.pop(name)
        return _st_join(header, blobs), f"delete {name} (its pair stays)"
    if how in ("rank", "width") and len(s) == 2:
        i = (0 if "lora_A" in name else 1) if how == "rank" else (1 if "lora_A" in name else 0)
        new = list(s)
        new[i] = rng.choice([s[i] + 1, max(1, s[i] // 2), s[i] * 2, 1, 0])
        e["shape"] = new
        blobs[name] = _resized(blobs[name], _numel(new) * isz)
        return _st_join(header, blobs), f"{name} shape {s} -> {new} ({how}; data matched)"
    if how == "swap" and "lora_A" in name:
        other = name.replace("lora_A", "lora_B")
        if other in header:
            header[name], header[other] = header[other], header[name]
            blobs[name], blobs[other] = blobs[other], blobs[name]
            return _st_join(header, blobs), f"{name} and its lora_B swapped"
    if how == "rename":
        new = rng.choice([name.replace("layers.0.", "layers.9.").replace("layers.1.", "layers.99."),
                          name.replace("q_proj", "nope_proj"), name.replace("lora_A", "lora_C"),
                          name.replace("base_model.model.", ""), name.replace(".weight", ""),
                          name.replace("lora_A.weight", "lora_A.default.weight"), name + ".extra"])
        header = {new if k == name else k: v for k, v in header.items()}
        blobs[new] = blobs.pop(name)
        return _st_join(header, blobs), f"rename {name} -> {new}"
    if how == "add":
        r = s[0] if "lora_A" in name else s[-1]
        new, shape = rng.choice([
            ("base_model.model.model.embed_tokens.lora_embedding_A", [r, 512]),
            ("base_model.model.lm_head.lora_A.weight", [r, 256]),
            ("base_model.model.lm_head.lora_B.weight", [512, r]),
            (name.replace("lora_A.weight", "lora_B.bias").replace("lora_B.weight", "lora_B.bias"), [s[0]]),
            ("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", [256]),
            ("base_model.model.model.norm.lora_A.weight", [r, 256]),
            ("base_model.model.model.layers.0.mlp.gate_proj.base_layer.weight", [512, 256])])
        header[new] = {"dtype": e["dtype"], "shape": shape, "data_offsets": [0, 0]}
        blobs[new] = _resized(blobs[name], _numel(shape) * isz)
        return _st_join(header, blobs), f"add {new} {shape}"
    if how == "dtype":
        old = e["dtype"]
        e["dtype"] = rng.choice(["F16", "BF16", "F64", "I8", "U8", "I32", "F8_E4M3", "BOOL"])
        if rng.random() < 0.6:
            blobs[name] = _resized(blobs[name], _numel(s) * ST_SIZES[e["dtype"]])
        return _st_join(header, blobs), f"{name} dtype {old} -> {e['dtype']}"
    if how == "ndim":
        e["shape"] = rng.choice([[1] + s, s[:1], [], s + [1]])
        blobs[name] = _resized(blobs[name], _numel(e["shape"]) * isz)
        return _st_join(header, blobs), f"{name} shape {s} -> {e['shape']} (data matched)"
    blobs[name], desc = _bad_values(rng, e["dtype"], blobs[name])
    return _st_join(header, blobs), f"{name} values: {desc}"


def _lora_tensor(rng, doc, suffix=None):
    ts = [t for t in doc.tensors if t.name.endswith((b".lora_a", b".lora_b") if suffix is None else (suffix,))]
    return rng.choice(ts) if ts else None


def m_lora_shape(rng, doc) -> str:
    """A lora_a/lora_b shape changed with data to match: ranks of a pair differ, the input or output
    width no longer the base matrix's, a vector, three dimensions."""
    t = _lora_tensor(rng, doc)
    if t is None or len(t.ne) != 2:
        return "no lora tensor"
    old = list(t.ne)
    bs = GGML_SIZES.get(t.ttype, (1, 1))[0]
    t.ne = rng.choice([[old[0], old[1] + 1], [old[0], max(1, old[1] // 2)], [old[0] + bs, old[1]], old[::-1],
                       [old[0] * 2, old[1]], old[:1], old + [2], [old[0], old[1] * 2]])
    nb = tensor_nbytes(t.ne, t.ttype)
    if nb is not None:
        t.blob = _float_blob(rng, t.ttype, nb) if t.ttype in (0, 1, 30) else rng.randbytes(nb)
    doc.relayout()
    return f"tensor {t.name.decode(errors='replace')} ne {old} -> {t.ne} (data matched)"


def m_lora_unpair(rng, doc) -> str:
    """One half of a lora_a/lora_b pair removed (or duplicated under the other suffix)."""
    t = _lora_tensor(rng, doc)
    if t is None:
        return "no lora tensor"
    if rng.random() < 0.7:
        doc.tensors.remove(t)
        doc.relayout()
        return f"delete {t.name.decode(errors='replace')}"
    other = t.name[:-1] + (b"b" if t.name.endswith(b"a") else b"a")
    for o in doc.tensors:
        if o.name == other:
            o.name = t.name
    return f"{other.decode(errors='replace')} renamed to {t.name.decode(errors='replace')}"


def m_lora_name(rng, doc) -> str:
    """A lora tensor renamed: for a matrix the model lacks or may not adapt (a layer past the last,
    token_embd, output, a norm), without or with another suffix."""
    t = _lora_tensor(rng, doc)
    if t is None:
        return "no lora tensor"
    old = t.name
    base, suf = old.rsplit(b".", 1)
    t.name = rng.choice([b"blk.9." + base.split(b".", 2)[-1] + b"." + suf, b"token_embd.weight." + suf,
                         b"output.weight." + suf, b"blk.0.attn_norm.weight." + suf, base, base + b".lora_c",
                         b"output_norm.weight." + suf, base + b"." + suf + b".lora_a", b"." + suf])
    return f"tensor {old.decode(errors='replace')} renamed to {t.name.decode(errors='replace')}"


def m_lora_kv(rng, doc) -> str:
    """An adapter key changed: general.type, adapter.type, adapter.lora.alpha (NaN, inf, negative,
    a string), the architecture, aLoRA invocation tokens added."""
    how = rng.choice(["type", "adapter_type", "alpha", "alpha", "arch", "alora"])
    if how == "type":
        doc.set("general.type", GT_STR, rng.choice([b"model", b"", b"adapterx", b"\xff"]))
    elif how == "adapter_type":
        doc.set("adapter.type", rng.choice([GT_STR, GT_STR, GT_U32]),
                rng.choice([b"control_vector", b"LORA", b"", b"alora"]) if rng.random() < 0.8 else 1)
    elif how == "alpha":
        vt = rng.choice([GT_F32, GT_F32, GT_F64, GT_U32, GT_STR, GT_ARR])
        doc.set("adapter.lora.alpha", vt, _rand_value(rng, vt))
    elif how == "arch":
        doc.set("general.architecture", GT_STR, rng.choice([b"qwen2", b"gemma3", b"", b"nope"]))
    else:
        doc.set("adapter.alora.invocation_tokens", GT_ARR, (GT_U32, rng.choice([[1, 2, 3], [], [2**31]])))
    return f"{how}: {_short(doc.get({'type': 'general.type', 'adapter_type': 'adapter.type', 'alpha': 'adapter.lora.alpha', 'arch': 'general.architecture', 'alora': 'adapter.alora.invocation_tokens'}[how]))}"


LORA_MUTATORS = [(m_lora_shape, 8), (m_lora_unpair, 5), (m_lora_name, 5), (m_lora_kv, 6), (m_tensor_type, 4),
                 (m_tensor_data, 4), (m_tensor_ne, 2), (m_tensor_offset, 2), (m_tensor_dup, 2), (m_kv_delete, 2),
                 (m_kv_type, 2), (m_counts, 1), (m_alignment, 1)]
#: the SCALE of ``--lora FILE:SCALE``, hostile
LORA_SCALES = ["", ":1", ":0.5", ":-1", ":0", ":nan", ":inf", ":-inf", ":1e309", ":abc", ":1:2", ":", ":1e38"]


def mutate_lora_gguf(rng, buf: bytes) -> tuple[bytes, list]:
    """1-2 LoRA-aware GGUF mutations (and, sometimes, one raw byte-level one)."""
    return mutate_gguf_doc(rng, parse_gguf(buf), LORA_MUTATORS, [1, 1, 2], 0.15)

# ===================================================================================== seeds


def _bytes_to_unicode() -> dict:
    from gguf.vocab import bytes_to_unicode  # GPT-2's byte -> printable-unicode map

    return bytes_to_unicode()


def byte_bpe(n_merges: int = 40) -> tuple[list, list]:
    """A byte-level BPE (GPT-2 byte alphabet) trained here on :data:`PPL_TEXT`: (tokens, merges)."""
    b2u = _bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    words = [[b2u[c] for c in (" " + w).encode()] for w in PPL_TEXT.split()]
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for w in words:
            for a, b in zip(w, w[1:]):
                pairs[(a, b)] += 1
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        new_words = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and w[i] == a and w[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            new_words.append(out)
        words = new_words
    return tokens, merges


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _run_ggq(args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "ggq", *args], cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"ggq {' '.join(args)} failed: {r.stderr[-2000:]}")


def build_seeds(seed_dir: Path, targets=None) -> dict:
    """Make the seed inputs (idempotent; kept in ``seed_dir``): returns name -> path. With an import
    target among ``targets``, also :func:`build_import_seeds`."""
    import numpy as np

    seed_dir.mkdir(parents=True, exist_ok=True)
    seeds = {}
    # HF: stories260K as shipped
    hf1 = seed_dir / "hf-stories"
    if not hf1.exists():
        tmp = seed_dir / "hf-stories.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for f in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"):
            shutil.copyfile(STORIES / f, tmp / f)
        tmp.rename(hf1)
    seeds["hf-stories"] = hf1
    # GGUF: stories260K converted by ggq
    for t in ("F32", "Q8_0"):
        p = seed_dir / f"stories-{t}.gguf"
        if not p.exists():
            _run_ggq(["convert", str(hf1), "--type", t, "-o", str(p.with_suffix(".part.gguf"))])
            p.with_suffix(".part.gguf").rename(p)
        seeds[f"stories-{t}"] = p
    p = seed_dir / "stories-Q4_K_M.gguf"
    if not p.exists():
        _run_ggq(["quantize", str(seed_dir / "stories-F32.gguf"), str(p.with_suffix(".part.gguf")), "Q4_K_M", "-q"])
        p.with_suffix(".part.gguf").rename(p)
    seeds["stories-Q4_K_M"] = p
    # HF: tiny random llama (F16) with stories260K's vocabulary as tokenizer.json
    hf2 = seed_dir / "hf-tiny-llama-json"
    if not hf2.exists():
        from safetensors.numpy import save_file
        from transformers import LlamaTokenizerFast

        tmp = seed_dir / "hf-tiny-llama-json.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        tok = LlamaTokenizerFast.from_pretrained(str(hf1), legacy=True, from_slow=True)
        tok.chat_template = "{% for m in messages %}{{ bos_token + m['role'] + ': ' + m['content'] }}{% endfor %}"
        tok.save_pretrained(str(tmp))
        for f in ("tokenizer.model", "special_tokens_map.json"):
            (tmp / f).unlink(missing_ok=True)
        cfg = json.loads((hf1 / "config.json").read_text())
        cfg.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, tie_word_embeddings=False, torch_dtype="float16", max_position_embeddings=128)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        r = np.random.RandomState(12)
        H, F, V, L, kvd = 32, 64, 512, 2, 16
        w = {"model.embed_tokens.weight": (V, H), "lm_head.weight": (V, H), "model.norm.weight": (H,)}
        for i in range(L):
            pre = f"model.layers.{i}."
            w.update({pre + "input_layernorm.weight": (H,), pre + "post_attention_layernorm.weight": (H,),
                      pre + "self_attn.q_proj.weight": (H, H), pre + "self_attn.k_proj.weight": (kvd, H),
                      pre + "self_attn.v_proj.weight": (kvd, H), pre + "self_attn.o_proj.weight": (H, H),
                      pre + "mlp.gate_proj.weight": (F, H), pre + "mlp.up_proj.weight": (F, H),
                      pre + "mlp.down_proj.weight": (H, F)})
        arrays = {k: ((1 + 0.1 * r.standard_normal(s)) if len(s) == 1 else r.standard_normal(s) / s[-1] ** 0.5)
                  .astype(np.float16) for k, s in w.items()}
        save_file(arrays, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tmp.rename(hf2)
    seeds["hf-tiny-llama-json"] = hf2
    # GGUF: tiny random qwen2 with a byte-level BPE vocabulary and ChatML
    p = seed_dir / "tiny-qwen2-bpe.gguf"
    if not p.exists():
        import gguf

        tokens, merges = byte_bpe()
        tokens += ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        V, H, F, L, nh, nkv = len(tokens), 32, 64, 2, 4, 2
        hd = H // nh
        part = p.with_suffix(".part.gguf")
        w = gguf.GGUFWriter(str(part), "qwen2")
        w.add_block_count(L)
        w.add_context_length(128)
        w.add_embedding_length(H)
        w.add_feed_forward_length(F)
        w.add_head_count(nh)
        w.add_head_count_kv(nkv)
        w.add_rope_freq_base(10000.0)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_file_type(0)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("qwen2")
        w.add_token_list(tokens)
        w.add_token_types([1] * (V - 3) + [3, 3, 3])
        w.add_token_merges(merges)
        w.add_bos_token_id(V - 3)
        w.add_eos_token_id(V - 1)
        w.add_add_bos_token(False)
        w.add_chat_template(CHATML)
        r = np.random.RandomState(7)

        def mat(rows, cols):
            return (r.standard_normal((rows, cols)) / cols ** 0.5).astype(np.float32)

        w.add_tensor("token_embd.weight", mat(V, H))
        w.add_tensor("output_norm.weight", np.ones(H, np.float32))
        w.add_tensor("output.weight", mat(V, H))
        for i in range(L):
            b = f"blk.{i}."
            w.add_tensor(b + "attn_norm.weight", np.ones(H, np.float32))
            w.add_tensor(b + "attn_q.weight", mat(nh * hd, H))
            w.add_tensor(b + "attn_q.bias", (0.1 * r.standard_normal(nh * hd)).astype(np.float32))
            w.add_tensor(b + "attn_k.weight", mat(nkv * hd, H))
            w.add_tensor(b + "attn_k.bias", (0.1 * r.standard_normal(nkv * hd)).astype(np.float32))
            w.add_tensor(b + "attn_v.weight", mat(nkv * hd, H))
            w.add_tensor(b + "attn_v.bias", (0.1 * r.standard_normal(nkv * hd)).astype(np.float32))
            w.add_tensor(b + "attn_output.weight", mat(H, nh * hd))
            w.add_tensor(b + "ffn_norm.weight", np.ones(H, np.float32))
            w.add_tensor(b + "ffn_gate.weight", mat(F, H))
            w.add_tensor(b + "ffn_up.weight", mat(F, H))
            w.add_tensor(b + "ffn_down.weight", mat(H, F))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        part.rename(p)
    seeds["tiny-qwen2-bpe"] = p
    if any(t in IMPORT_TARGETS for t in (targets or ())):
        seeds.update(build_import_seeds(seed_dir))
    return seeds


#: quantized checkpoints (seed name -> (fixture module, kind)), made by the real libraries through the
#: tests' fixture builders (tests/bnb_checkpoints.py, tests/fp8_checkpoints.py)
QUANT_SEEDS = {"q-nf4": ("bnb", "nf4"), "q-nf4-dq": ("bnb", "nf4-dq"), "q-fp4": ("bnb", "fp4"), "q-int8": ("bnb", "int8"),
               "q-fp8-block": ("fp8", "fp8-block"), "q-fp8-ue8m0": ("fp8", "fp8-ue8m0"),
               "q-fp8-e5m2-channel": ("fp8", "fp8-e5m2-channel"), "q-ct-fp8-channel": ("fp8", "ct-fp8-channel"),
               "q-ct-fp8-block": ("fp8", "ct-fp8-block"), "q-w8a8-channel": ("fp8", "ct-w8a8-channel"),
               "q-w8a8-group": ("fp8", "ct-w8a8-group")}


def build_import_seeds(seed_dir: Path) -> dict:
    """Seeds of the import targets (idempotent): the quantized checkpoints of :data:`QUANT_SEEDS`, the
    tests' float32 LoRA base (an HF folder and its F32 / Q8_0 GGUF files), two PEFT adapters (rank 8 on
    every projection; rsLoRA with an alpha_pattern) and the first as llama.cpp LoRA GGUF files (f32,
    q8_0) written by ``ggq convert-lora``. Made by the tests' fixture builders (transformers +
    bitsandbytes, transformers' FP8 op, compressed-tensors, peft) into ``seed_dir/fixtures``."""
    sys.path.insert(0, str(REPO / "tests"))
    import bnb_checkpoints
    import fp8_checkpoints
    import lora_checkpoints

    fix = seed_dir / "fixtures"
    fix.mkdir(parents=True, exist_ok=True)
    mods = {"bnb": bnb_checkpoints, "fp8": fp8_checkpoints}
    seeds = {}
    for name, (mod, kind) in QUANT_SEEDS.items():
        d = seed_dir / name
        if not d.exists():
            src = mods[mod].build(fix, STORIES, kind)
            shutil.copytree(src, seed_dir / f"{name}.tmp", dirs_exist_ok=True)
            (seed_dir / f"{name}.tmp").rename(d)
        seeds[name] = d
    seeds["lora-base"] = lora_checkpoints.base(fix, STORIES)
    for a in ("main", "rslora"):
        seeds[f"peft-{a}"] = lora_checkpoints.adapter(fix, STORIES, a)
    for t in ("F32", "Q8_0"):
        p = seed_dir / f"lora-base-{t}.gguf"
        if not p.exists():
            _run_ggq(["convert", str(seeds["lora-base"]), "--type", t, "-o", str(p.with_suffix(".part.gguf"))])
            p.with_suffix(".part.gguf").rename(p)
        seeds[f"lora-base-{t}"] = p
    for t in ("f32", "q8_0"):
        p = seed_dir / f"lora-main-{t}.gguf"
        if not p.exists():
            _run_ggq(["convert-lora", str(seeds["peft-main"]), "--base", str(seeds["lora-base"]), "--outtype", t,
                      "-o", str(p.with_suffix(".part.gguf"))])
            p.with_suffix(".part.gguf").rename(p)
        seeds[f"lora-main-{t}"] = p
    return seeds


GGUF_SEEDS = ("stories-F32", "stories-Q8_0", "stories-Q4_K_M", "tiny-qwen2-bpe")
HF_SEEDS = ("hf-stories", "hf-tiny-llama-json")

# ===================================================================================== cases


@dataclass
class Case:
    """One fuzz case: ``args`` are ggq's command line with paths relative to the case folder."""

    id: str
    target: str
    seed: str
    mutations: list
    args: list
    inputs: list = field(default_factory=list)  # files/folders under in/ that the command reads
    output: str | None = None  # the GGUF the command writes (quantize/convert), relative
    env: dict = field(default_factory=dict)
    model_output: bool = True  # the output is a model (False: a LoRA adapter GGUF)
    lora_base: str | None = None  # the adapter (output, else input) is checked against this base GGUF
    lora_scale: str = ""  # the ":SCALE" given with it


def _case_rng(campaign_seed: int, i: int) -> random.Random:
    h = hashlib.sha256(f"{campaign_seed}:{i}".encode()).digest()
    return random.Random(int.from_bytes(h[:8], "little"))


def mutate_gguf_bytes(rng, buf: bytes) -> tuple[bytes, list]:
    """1-3 structure-aware GGUF mutations, then (sometimes) one raw byte-level one."""
    return mutate_gguf_doc(rng, parse_gguf(buf), GGUF_MUTATORS, [1, 1, 1, 2, 2, 3], 0.2)


def mutate_gguf_doc(rng, doc, mutators, counts, p_raw):
    """Apply ``rng.choice(counts)`` mutators drawn from ``mutators`` ((function, weight) pairs) to
    the parsed GGUF ``doc``, write it, then with probability ``p_raw`` one raw byte-level mutation.
    Returns (bytes, descriptions)."""
    descs = []
    muts, weights = zip(*mutators)
    for _ in range(rng.choice(counts)):
        m = rng.choices(muts, weights)[0]
        try:
            descs.append(f"{m.__name__[2:]}: {m(rng, doc)}")
        except Exception as e:  # noqa: BLE001 - a mutator found nothing to do
            descs.append(f"{m.__name__[2:]}: skipped ({type(e).__name__})")
    data, fields = write_gguf(doc)
    if rng.random() < p_raw:
        data, d = raw_mutation(rng, data, fields)
        descs.append(d)
    return data, descs


def make_case(campaign_seed: int, i: int, targets: list, seeds: dict, case_dir: Path) -> Case:
    """Build case ``i`` of the campaign into ``case_dir`` (in/, out/, tmp/): deterministic in
    (campaign_seed, i)."""
    rng = _case_rng(campaign_seed, i)
    target = targets[i % len(targets)]
    cid = f"{i:06d}"
    for d in ("in", "out", "tmp"):
        (case_dir / d).mkdir(parents=True, exist_ok=True)
    inp = case_dir / "in"
    if target in IMPORT_TARGETS:
        return make_import_case(rng, cid, target, seeds, inp)
    if target == "convert" and rng.random() < 0.85:
        seed = rng.choice(HF_SEEDS)
        src = seeds[seed]
        dst = inp / "model"
        shutil.copytree(src, dst, copy_function=shutil.copyfile)
        descs = []
        for _ in range(rng.choice([1, 1, 2])):
            what = rng.choices(["safetensors", "config", "tokenizer_config", "tokenizer", "raw"], [5, 5, 3, 2, 1])[0]
            try:
                if what == "safetensors":
                    p = dst / "model.safetensors"
                    b, d = mutate_safetensors(rng, p.read_bytes())
                    p.write_bytes(b)
                elif what == "config":
                    p = dst / "config.json"
                    c, d = mutate_config(rng, json.loads(p.read_text()))
                    p.write_text(json.dumps(c))
                elif what == "tokenizer_config":
                    p = dst / "tokenizer_config.json"
                    c, d = mutate_tokenizer_config(rng, json.loads(p.read_text()))
                    p.write_text(json.dumps(c))
                elif what == "tokenizer":
                    p = dst / ("tokenizer.json" if (dst / "tokenizer.json").exists() else "tokenizer.model")
                    if p.suffix == ".json" and rng.random() < 0.7:
                        c, d = mutate_json_obj(rng, json.loads(p.read_text()), "tokenizer")
                        p.write_text(json.dumps(c))
                    elif rng.random() < 0.15:
                        p.unlink()
                        d = f"{p.name} removed"
                    else:
                        b, d = mutate_bytes(rng, p.read_bytes(), p.name)
                        p.write_bytes(b)
                else:
                    p = dst / rng.choice(["config.json", "tokenizer_config.json"])
                    b, d = mutate_bytes(rng, p.read_bytes(), p.name)
                    p.write_bytes(b)
            except Exception as e:  # noqa: BLE001 - an earlier mutation broke the file for this one
                d = f"{what}: skipped ({type(e).__name__})"
            descs.append(d)
        qtype = rng.choice([None, "F32", "F16", "Q8_0", "Q4_0", "Q4_K_M", "Q6_K", "BF16"])
        args = ["convert", "in/model", "-o", "out/model.gguf"] + (["--type", qtype] if qtype else [])
        return Case(cid, target, seed, descs, args, ["in/model"], "out/model.gguf")
    seed = rng.choice(GGUF_SEEDS)
    data, descs = mutate_gguf_bytes(rng, seeds[seed].read_bytes())
    (inp / "model.gguf").write_bytes(data)
    src = "in/model.gguf"
    quantized = "Q" in seed
    if target == "info":
        args = ["info", src] + (["--all-metadata"] if rng.random() < 0.2 else [])
        return Case(cid, target, seed, descs, args, [src])
    if target == "generate":
        args = ["generate", src, "-p", PROMPT, "-n", "4", "-t", "1", "--temp", "0", "--seed", "1", "-c", "64"]
        if rng.random() < 0.25:
            args.append("--chat")
        return Case(cid, target, seed, descs, args, [src])
    if target == "perplexity":
        (inp / "text.txt").write_text(PPL_TEXT * 2)
        return Case(cid, target, seed, descs, ["perplexity", src, "-f", "in/text.txt", "-c", "16", "--chunks", "1",
                                               "-t", "1", "-q"], [src, "in/text.txt"])
    qtype = rng.choice(["Q8_0", "Q4_0", "F16", "Q4_K_M", "Q6_K", "Q5_1", "Q3_K_S", "BF16"])
    if target == "quantize":
        args = ["quantize", src, "out/q.gguf", qtype, "-q"] + (["--allow-requantize"] if quantized and rng.random() < 0.8 else [])
        if rng.random() < 0.1:
            args.append("--pure")
        return Case(cid, target, seed, descs, args, [src], "out/q.gguf")
    # convert with a GGUF source
    args = ["convert", src, "-o", "out/model.gguf", "--type", qtype] + (["--allow-requantize"] if quantized else [])
    return Case(cid, target, seed, descs, args, [src], "out/model.gguf")

def _mutate_file(rng, p: Path, fn, what: str, raw: bool = False) -> str:
    """Apply ``fn`` (a JSON-object mutator for ``.json`` files, else or with ``raw`` a bytes mutator)
    to the file ``p``; returns the description."""
    if p.suffix == ".json" and not raw:
        try:
            obj = json.loads(p.read_text())
        except ValueError:
            obj = {}
        obj, d = fn(rng, obj)
        p.write_text(json.dumps(obj))
        return d
    b, d = fn(rng, p.read_bytes())
    p.write_bytes(b)
    return d


def make_import_case(rng, cid: str, target: str, seeds: dict, inp: Path) -> Case:
    """A case of the import targets. ``quantized``: ``ggq convert`` of a bitsandbytes / FP8 /
    compressed-tensors W8A8 checkpoint with its quantization tensors, quant states or
    quantization_config mutated (or generic safetensors/config damage); ``convert-lora``:
    ``ggq convert-lora`` (or ``convert BASE --lora``) of a mutated PEFT folder; ``lora``: ``ggq
    generate BASE.gguf --lora FILE[:SCALE]`` (or ``convert BASE --lora FILE``) with a mutated LoRA GGUF."""
    descs = []
    if target == "quantized":
        seed = rng.choice(list(QUANT_SEEDS))
        dst = inp / "model"
        shutil.copytree(seeds[seed], dst, copy_function=shutil.copyfile)
        st = dst / "model.safetensors"
        for _ in range(rng.choice([1, 1, 2])):
            what = rng.choices(["quant", "qconfig", "safetensors", "config", "raw"], [8, 5, 2, 1, 1])[0]
            try:
                if what == "quant":
                    d = _mutate_file(rng, st, mutate_quant_safetensors, what)
                elif what == "qconfig":
                    d = _mutate_file(rng, dst / "config.json", mutate_qconfig, what)
                elif what == "safetensors":
                    d = _mutate_file(rng, st, mutate_safetensors, what)
                elif what == "config":
                    d = _mutate_file(rng, dst / "config.json", mutate_config, what)
                else:
                    d = _mutate_file(rng, dst / "config.json", lambda r, b: mutate_bytes(r, b, "config.json"), what, True)
            except Exception as e:  # noqa: BLE001 - an earlier mutation broke the file for this one
                d = f"{what}: skipped ({type(e).__name__})"
            descs.append(d)
        qtype = rng.choice([None, None, None, "F32", "F16", "Q8_0", "Q4_K_M", "BF16", "Q4_0"])
        args = ["convert", "in/model", "-o", "out/model.gguf"] + (["--type", qtype] if qtype else [])
        if rng.random() < 0.3:
            args += ["--import-report", "out/report.tsv"]
        return Case(cid, target, seed, descs, args, ["in/model"], "out/model.gguf")
    if target == "convert-lora":
        seed = rng.choice(["peft-main", "peft-main", "peft-rslora"])
        dst = inp / "adapter"
        shutil.copytree(seeds[seed], dst, copy_function=shutil.copyfile)
        for _ in range(rng.choice([1, 1, 2])):
            what = rng.choices(["tensors", "config", "safetensors", "raw", "files"], [6, 5, 2, 1, 1])[0]
            try:
                if what == "tensors":
                    d = _mutate_file(rng, dst / "adapter_model.safetensors", mutate_adapter_tensors, what)
                elif what == "config":
                    d = _mutate_file(rng, dst / "adapter_config.json", mutate_adapter_config, what)
                elif what == "safetensors":
                    d = _mutate_file(rng, dst / "adapter_model.safetensors", mutate_safetensors, what)
                elif what == "raw":
                    d = _mutate_file(rng, dst / "adapter_config.json",
                                     lambda r, b: mutate_bytes(r, b, "adapter_config.json"), what, True)
                else:
                    how = rng.choice(["no_config", "no_weights", "bin_garbage", "bin_and_st"])
                    if how == "no_config":
                        (dst / "adapter_config.json").unlink()
                    elif how == "no_weights":
                        (dst / "adapter_model.safetensors").unlink()
                    elif how == "bin_garbage":
                        (dst / "adapter_model.safetensors").unlink()
                        if rng.random() < 0.4:  # a valid torch.save of something other than named tensors
                            import torch

                            buf = io.BytesIO()
                            torch.save(rng.choice([[torch.zeros(2)], {"a": 1}, {1: torch.zeros(2)}, torch.zeros(3)]), buf)
                            (dst / "adapter_model.bin").write_bytes(buf.getvalue())
                            descs.append("adapter_model.bin: torch.save of no named tensors")
                            continue
                        (dst / "adapter_model.bin").write_bytes(rng.choice([b"", b"PK\x03\x04" + rng.randbytes(200),
                                                                            b"\x80\x02}q\x00.", rng.randbytes(64)]))
                    else:
                        (dst / "adapter_model.bin").write_bytes(rng.randbytes(64))
                    d = f"adapter folder: {how}"
            except Exception as e:  # noqa: BLE001
                d = f"{what}: skipped ({type(e).__name__})"
            descs.append(d)
        base = str(seeds["lora-base"])
        if rng.random() < 0.7:
            outtype = rng.choice(["f16", "f32", "bf16", "q8_0"])
            args = ["convert-lora", "in/adapter", "--base", base, "-o", "out/lora.gguf", "--outtype", outtype]
            return Case(cid, target, seed, descs, args, ["in/adapter"], "out/lora.gguf", model_output=False,
                        lora_base=str(seeds["lora-base-F32"]))
        scale = rng.choice(LORA_SCALES)
        args = ["convert", base, "--lora", "in/adapter" + scale, "-o", "out/model.gguf",
                "--type", rng.choice(["F32", "Q8_0", "F16"])]
        return Case(cid, target, seed, descs, args, ["in/adapter"], "out/model.gguf")
    # lora: a hostile LoRA GGUF applied at load
    seed = rng.choice(["lora-main-f32", "lora-main-f32", "lora-main-q8_0"])
    data, descs = mutate_lora_gguf(rng, seeds[seed].read_bytes())
    (inp / "lora.gguf").write_bytes(data)
    scale = rng.choice(LORA_SCALES)
    if scale not in ("", ":1", ":0.5"):
        descs.append(f"scale {scale!r}")
    if rng.random() < 0.2:
        args = ["convert", str(seeds["lora-base"]), "--lora", "in/lora.gguf" + scale, "-o", "out/model.gguf",
                "--type", "F32"]
        return Case(cid, target, seed, descs, args, ["in/lora.gguf"], "out/model.gguf",
                    lora_base=str(seeds["lora-base-F32"]), lora_scale=scale)
    base = seeds[rng.choice(["lora-base-F32", "lora-base-Q8_0"])]
    args = ["generate", str(base), "--lora", "in/lora.gguf" + scale, "-p", PROMPT, "-n", "2", "-t", "1", "--temp",
            "0", "--seed", "1", "-c", "32"]
    if rng.random() < 0.3:
        args += ["--lora-type", rng.choice(["f32", "f16", "q8_0"])]
    return Case(cid, target, seed, descs, args, ["in/lora.gguf"], lora_base=str(base), lora_scale=scale)

# ===================================================================================== checking outputs


def check_gguf(path: Path, model: bool = True) -> list:
    """Problems of the GGUF file at ``path`` (empty list: valid), judged independently of ggq.

    Structure: gguf-py's GGUFReader reads it; our strict parser too (version 2/3, no duplicate key
    or tensor, general.alignment a UINT32 power of two, known ggml types, 1-4 positive dimensions,
    row length a multiple of the block size, every tensor aligned, inside the file, not
    overlapping another). With ``model``: hyperparameters consistent with the tensors for the
    llama-like families (block_count = the blk.N groups, head counts > 0 and dividing, rope
    dimension even and <= head size, embedding/feed-forward lengths and vocabulary size equal to
    the tensor shapes, tokenizer arrays of the vocabulary's length, special token ids in range,
    finite positive rope base and norm epsilon).
    """
    problems = []
    try:
        import gguf

        gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - any failure of the reference reader
        problems.append(f"GGUFReader: {type(e).__name__}: {str(e)[:100]}")
    buf = Path(path).read_bytes()
    try:
        doc = parse_gguf(buf)
    except ParseError as e:
        return problems + [f"parse: {e}"]
    keys = [kv.key for kv in doc.kvs]
    if len(set(keys)) != len(keys):
        problems.append("duplicate key")
    names = [t.name for t in doc.tensors]
    if len(set(names)) != len(names):
        problems.append("duplicate tensor name")
    start = len(buf) - len(doc.data)
    spans = []
    for t in doc.tensors:
        n = t.name[:40]
        if t.ttype not in GGML_SIZES:
            problems.append(f"{n}: unknown type {t.ttype}")
            continue
        if not 1 <= len(t.ne) <= 4 or any(x <= 0 for x in t.ne):
            problems.append(f"{n}: shape {t.ne}")
            continue
        nb = tensor_nbytes(t.ne, t.ttype)
        if nb is None:
            problems.append(f"{n}: row length {t.ne[0]} not a multiple of the block size")
            continue
        if t.offset % doc.align:
            problems.append(f"{n}: offset {t.offset} not aligned to {doc.align}")
        if start + t.offset + nb > len(buf):
            problems.append(f"{n}: data outside the file")
        spans.append((t.offset, t.offset + nb, n))
    spans.sort()
    for a, b in zip(spans, spans[1:]):
        if b[0] < a[1]:
            problems.append(f"tensors {a[2]} and {b[2]} overlap")
    if model and not problems:
        problems += _model_problems(doc)
    return problems


def check_lora(path: Path, base: Path, scale: str = "") -> list:
    """Problems of the LoRA adapter GGUF at ``path`` for the model GGUF ``base`` (empty: valid),
    judged with gguf-py (llama.cpp's ``llama_adapter_lora_init`` rules): ``general.type`` adapter,
    ``adapter.type`` lora, the base's architecture, a finite ``adapter.lora.alpha``; every tensor
    ``NAME.lora_a`` with ``ne [n_in, r]`` and ``NAME.lora_b`` with ``ne [r, n_out]`` in pairs, one rank,
    ``NAME`` a matrix of the base with ``ne [n_in, n_out]`` other than token_embd; finite values (F32,
    F16, BF16, Q8_0 decoded by gguf-py); and a finite ``:SCALE`` (``scale``, as on the command line)."""
    import gguf
    import numpy as np

    def field(r, key):
        f = r.fields.get(key)
        if f is None:
            return None
        v = f.contents()
        return v

    p = []
    lr, br = gguf.GGUFReader(path), gguf.GGUFReader(base)
    if field(lr, "general.type") != "adapter":
        p.append(f"general.type {field(lr, 'general.type')!r}")
    if field(lr, "adapter.type") != "lora":
        p.append(f"adapter.type {field(lr, 'adapter.type')!r}")
    if field(lr, "general.architecture") != field(br, "general.architecture"):
        p.append(f"architecture {field(lr, 'general.architecture')!r}")
    alpha = field(lr, "adapter.lora.alpha")
    if alpha is not None and (not isinstance(alpha, (int, float)) or not math.isfinite(alpha)):
        p.append(f"adapter.lora.alpha {alpha!r}")
    if "adapter.alora.invocation_tokens" in lr.fields:
        p.append("aLoRA invocation tokens")
    if scale:
        try:
            ok = math.isfinite(float(scale.rsplit(":", 1)[1]))
        except ValueError:
            ok = True  # not a number: part of the path, scale 1
        if not ok:
            p.append(f"scale {scale!r}")
    base_ne = {t.name: [int(x) for x in t.shape] for t in br.tensors}
    ts = {t.name: t for t in lr.tensors}
    ranks = set()
    for name, t in ts.items():
        ne = [int(x) for x in t.shape]
        if not name.endswith((".lora_a", ".lora_b")):
            p.append(f"{name}: not a lora_a/lora_b tensor")
            continue
        stem, half = name[:-7], name[-1]
        other = ts.get(f"{stem}.lora_{'b' if half == 'a' else 'a'}")
        bne = base_ne.get(stem)
        if other is None or bne is None or len(bne) != 2 or stem == "token_embd.weight" or len(ne) != 2:
            p.append(f"{name}: unpaired, not a matrix of the base, or not 2-D")
            continue
        if half == "a":
            if ne[0] != bne[0]:
                p.append(f"{name}: ne {ne}, base {stem} ne {bne}")
            ranks.add(ne[1])
        else:
            if ne[1] != bne[1]:
                p.append(f"{name}: ne {ne}, base {stem} ne {bne}")
            ranks.add(ne[0])
        try:
            v = gguf.quants.dequantize(t.data, t.tensor_type)
            if not np.isfinite(v).all():
                p.append(f"{name}: non-finite values")
        except (NotImplementedError, ValueError) as e:
            p.append(f"{name}: type {t.tensor_type!r} ({type(e).__name__})")
    if len(ranks) > 1:
        p.append(f"ranks {sorted(ranks)}")
    return p[:10]


def _model_problems(doc: GGUFDoc) -> list:
    p = []
    arch_v = doc.get("general.architecture")
    if not isinstance(arch_v, bytes):
        return ["general.architecture missing or not a string"]
    arch = arch_v.decode("utf-8", "replace")
    T = {t.name.decode("utf-8", "replace"): t.ne for t in doc.tensors}

    def num(key, default=None, n_layer=None):
        # llama.cpp's get_key: a number of a numeric type; get_key_or_arr (head counts, feed-forward
        # length): also an array of n_layer integers (ggq runs only equal entries)
        for kv in doc.kvs:
            if kv.key == f"{arch}.{key}".encode():
                if kv.vtype == GT_ARR and n_layer is not None:
                    sub, items = kv.value
                    ok = sub in _INT_TYPES and len(items) == n_layer and len(set(items)) == 1
                    return items[0] if ok else "bad array"
                return kv.value if kv.vtype in _SCALAR_FMT and kv.vtype != GT_BOOL else "bad type"
        return default

    n_layer = num("block_count")
    if not isinstance(n_layer, int) or n_layer <= 0:
        return [f"block_count {n_layer!r}"]
    groups = {int(m.group(1)) for m in (re.match(r"blk\.(\d+)\.", n) for n in T) if m}
    if len(groups) != n_layer or (groups and max(groups) != n_layer - 1):
        p.append(f"block_count {n_layer} but blk groups {sorted(groups)[:5]}..{len(groups)}")
    n_embd = num("embedding_length")
    n_head, n_ff = num("attention.head_count", n_layer=n_layer), num("feed_forward_length", n_layer=n_layer)
    n_kv = num("attention.head_count_kv", n_head, n_layer=n_layer)
    for k, v in (("embedding_length", n_embd), ("attention.head_count", n_head), ("attention.head_count_kv", n_kv),
                 ("feed_forward_length", n_ff), ("context_length", num("context_length"))):
        if not isinstance(v, int) or v <= 0:
            p.append(f"{k} {v!r}")
    if p:
        return p
    for k in ("embedding_length", "context_length", "attention.key_length", "attention.value_length",
              "rope.dimension_count"):
        v = num(k)
        if v is not None and type(v) is not int:  # llama.cpp: an integer key of a float type is refused
            p.append(f"{k} {v!r} is not an integer")
    if n_head % n_kv:
        p.append(f"head_count {n_head} not a multiple of head_count_kv {n_kv}")
    hd_k = num("attention.key_length", n_embd // n_head)
    hd_v = num("attention.value_length", n_embd // n_head)
    if not isinstance(hd_k, int) or hd_k <= 0 or not isinstance(hd_v, int) or hd_v <= 0:
        return p + [f"head sizes {hd_k!r}/{hd_v!r}"]
    if num("attention.key_length") is None and n_embd % n_head:
        p.append(f"embedding_length {n_embd} not a multiple of head_count {n_head}")
    rd = num("rope.dimension_count", hd_k)
    if not isinstance(rd, int) or rd <= 0 or rd % 2 or rd > hd_k:
        p.append(f"rope.dimension_count {rd!r} (head size {hd_k})")
    for k in ("rope.freq_base", "attention.layer_norm_rms_epsilon", "rope.scaling.factor"):
        v = num(k)
        # rope.scaling.factor 0 means none (llama.cpp), a zero epsilon is accepted by llama.cpp
        if v is not None and (not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or
                              (v == 0 and k == "rope.freq_base")):
            p.append(f"{k} {v!r}")
    toks = doc.get("tokenizer.ggml.tokens")
    n_vocab = len(toks[1]) if isinstance(toks, tuple) else None
    if n_vocab is None:
        p.append("no tokenizer.ggml.tokens array")
    else:
        for k in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            a = doc.get(k)
            if a is not None and (not isinstance(a, tuple) or len(a[1]) != n_vocab):
                p.append(f"{k} length differs from the vocabulary's {n_vocab}")
        for k in SPECIAL_KEYS:
            v = doc.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n_vocab):
                p.append(f"{k} {v!r} outside the vocabulary of {n_vocab}")
    want = {"token_embd.weight": [n_embd, n_vocab], "output.weight": [n_embd, n_vocab], "output_norm.weight": [n_embd]}
    for i in range(n_layer if n_layer < 10000 else 0):
        b = f"blk.{i}."
        want.update({b + "attn_norm.weight": [n_embd], b + "attn_q.weight": [n_embd, n_head * hd_k],
                     b + "attn_k.weight": [n_embd, n_kv * hd_k], b + "attn_v.weight": [n_embd, n_kv * hd_v],
                     b + "attn_output.weight": [n_head * hd_v, n_embd], b + "ffn_norm.weight": [n_embd],
                     b + "ffn_gate.weight": [n_embd, n_ff], b + "ffn_down.weight": [n_ff, n_embd]})
        if arch != "phi3":
            want[b + "ffn_up.weight"] = [n_embd, n_ff]
    for n, shape in want.items():
        if n in T and None not in shape and list(T[n]) != shape:
            p.append(f"{n} shape {T[n]}, hyperparameters say {shape}")
    if "token_embd.weight" not in T:
        p.append("no token_embd.weight")
    return p


# ===================================================================================== running a case

_TRACE_RE = re.compile(r'File "([^"]+)", line (\d+)')
_EXC_RE = re.compile(r"\b([A-Z]\w*(?:Error|Exception|Warning|Exit|Interrupt))\b(?::|\()")
_PROGRESS_RE = re.compile(r"\d+%\||it/s\]|s/it\]|\|\s*\d+/\d+ \[")
#: status lines, not errors: progress bars, the runtime's compile status (shown when loading
#: the compiled kernels takes over a second, e.g. on a loaded machine), and ggq's own warnings and
#: notes (a conversion warns about its type before a tensor read later turns out bad)
_STATUS_RE = re.compile(_PROGRESS_RE.pattern + r"|^ggq: (compiling the runtime for |compiled in |finishing the one-time compile)"
                        r"|^ggq: (warning|note): ")
_MEM_RE = re.compile(r"MemoryError|Unable to allocate|Cannot allocate memory|std::bad_alloc|out of memory|"
                     r"ArrayMemoryError|mmap length is greater", re.I)


def _child_limits(mem_bytes: int, cpu_s: int) -> None:
    os.setpgid(0, 0)
    if mem_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (mem_bytes, mem_bytes))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 5))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _fork_run(argv: list, cwd: Path, stdout: Path, stderr: Path, timeout: float, mem_bytes: int,
              env: dict) -> tuple[int | None, int | None, bool, float, int]:
    """Fork a child that runs ``ggq.cli.main(argv)`` in ``cwd``; returns (exit code, signal,
    timed out, seconds, max RSS KiB)."""
    t0 = time.time()
    pid = os.fork()
    if pid == 0:  # child
        try:
            _child_limits(mem_bytes, int(timeout) + 5)
            os.chdir(cwd)
            os.environ.update(env)
            fo = os.open(stdout, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            fe = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            fi = os.open(os.devnull, os.O_RDONLY)
            os.dup2(fi, 0)
            os.dup2(fo, 1)
            os.dup2(fe, 2)
            sys.stdin = open(0, closefd=False)
            sys.stdout = io.TextIOWrapper(open(1, "wb", closefd=False), write_through=True)
            sys.stderr = io.TextIOWrapper(open(2, "wb", closefd=False), write_through=True)
            err = open(2, "w", closefd=False)
            faulthandler.enable(file=err, all_threads=True)
            faulthandler.dump_traceback_later(max(1.0, timeout - 3), exit=True, file=err)
            import ggq.cli

            ggq.cli.main(argv, prog_name="ggq", standalone_mode=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if e.code is not None and not isinstance(e.code, int):
                print(e.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - the child reports and dies
            import traceback

            traceback.print_exc()
            code = 1
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    return _wait(pid, t0, timeout)


def _wait(pid: int, t0: float, timeout: float) -> tuple:
    """Wait for ``pid`` (a process-group leader); kill its group at ``timeout``."""
    timed_out = False
    while True:
        wpid, status, ru = os.wait4(pid, os.WNOHANG)
        if wpid:
            break
        if time.time() - t0 > timeout and not timed_out:
            timed_out = True
            for target in (pid,):
                try:
                    os.killpg(target, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        time.sleep(0.01)
    try:
        os.killpg(pid, signal.SIGKILL)  # leftovers of the group
    except (ProcessLookupError, PermissionError):
        pass
    dt = time.time() - t0
    if os.WIFSIGNALED(status):
        return None, os.WTERMSIG(status), timed_out, dt, ru.ru_maxrss
    return os.WEXITSTATUS(status), None, timed_out, dt, ru.ru_maxrss


def _spawn_run(argv, cwd, stdout, stderr, timeout, mem_bytes, env) -> tuple:
    """Run ``python -m ggq argv`` in a fresh subprocess with the same limits."""
    t0 = time.time()
    with open(stdout, "wb") as fo, open(stderr, "wb") as fe:
        p = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "ggq", *argv], cwd=cwd,
                             env=dict(os.environ, **env), stdin=subprocess.DEVNULL, stdout=fo, stderr=fe,
                             preexec_fn=lambda: _child_limits(mem_bytes, int(timeout) + 5))
        return _wait(p.pid, t0, timeout)


def _fork_check(path: Path, model: bool, mem_bytes: int, lora_base: Path | None = None, scale: str = "") -> list:
    """:func:`check_gguf` in a forked child with limits (the file may be hostile); with ``lora_base``
    the file is a LoRA adapter for that base GGUF, checked by :func:`check_lora` too."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            _child_limits(mem_bytes, TIMEOUTS["check"])
            res = check_gguf(path, model)
            if lora_base is not None and not res:
                res = check_lora(path, lora_base, scale)
        except BaseException as e:  # noqa: BLE001
            res = [f"checker failed: {type(e).__name__}: {str(e)[:80]}"]
        os.write(w, json.dumps(res).encode()[:60000])
        os._exit(0)
    os.close(w)
    chunks = []
    t0 = time.time()
    os.set_blocking(r, False)
    while True:
        try:
            c = os.read(r, 65536)
            if not c:
                break
            chunks.append(c)
        except BlockingIOError:
            if time.time() - t0 > TIMEOUTS["check"]:
                break
            time.sleep(0.01)
    os.close(r)
    _wait(pid, t0, 1)
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        return ["checker gave no answer (killed)"]


def _listing(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def classify(code, sig, timed_out, stderr: str) -> tuple[str, str]:
    """Outcome of one run from its exit and stderr, and its failure site (for dedupe)."""
    frames = _TRACE_RE.findall(stderr)
    site = ""
    if frames:
        ggq_frames = [f for f in frames if "/ggq/" in f[0]] or frames
        f, line = ggq_frames[-1] if "Traceback" in stderr else ggq_frames[0]
        site = f"{_rel(f)}:{line}"
    excs = _EXC_RE.findall(stderr)
    if timed_out or "Timeout (" in stderr:
        return "hang", f"hang {site}"
    if sig is not None:
        if _MEM_RE.search(stderr):
            return "memory", f"memory signal {signal.Signals(sig).name} {site}"
        return "crash", f"{signal.Signals(sig).name} {site} {_last_line(stderr)[:60]}"
    if code == 0:
        return "ok", ""
    last = _last_line(stderr)
    if _MEM_RE.search(stderr) and ("Traceback" in stderr or "ggq: error" not in stderr or _MEM_RE.search(last)):
        return "memory", f"memory {site or _mask(last)[:70]}"
    if code == 70 or "ggq: internal error" in stderr:  # the top-level handler's report of a bug
        m = re.search(r"internal error: (\w+)", stderr)
        return "traceback", f"internal error {m.group(1) if m else '?'}: {_mask(last)[:80]}"
    if "Traceback" in stderr or "Fatal Python error" in stderr:
        m = re.match(r"([A-Za-z_][\w.]*)(?::|$)", last)
        return "traceback", f"{m.group(1) if m else excs[-1] if excs else '?'} {site}"
    lines = [ln for ln in re.split(r"[\r\n]+", stderr) if ln.strip() and not _STATUS_RE.search(ln)]
    if len(lines) > 1:
        return "multi_line_error", f"multi-line: {_mask(lines[-1])[:70]}"
    msg = lines[0] if lines else ""
    if not msg:
        return "multi_line_error", "no message"
    bad = [why for why, cond in (("exception repr", bool(_EXC_RE.search(msg))), ("long", len(msg) > 300),
                                 ("unprintable", not msg.isprintable())) if cond]
    if bad:
        return "multi_line_error", f"{'/'.join(bad)} message: {_mask(msg)[:70]}"
    return "clean_error", ""


def _mask(s: str) -> str:
    """A message with paths, numbers and quoted values masked, to group similar messages."""
    s = re.sub(r"/\S+/(fuzz|cases|in|out)/\S*", "<path>", s)
    s = re.sub(r"'[^']*'|\"[^\"]*\"", "<q>", s)
    return re.sub(r"\d+", "N", s)


def _rel(f: str) -> str:
    i = f.rfind("/ggq/")
    if i >= 0:
        return f[i + 1:]
    i = f.rfind("site-packages/")
    return f[i + 14:] if i >= 0 else Path(f).name


def _last_line(s: str) -> str:
    lines = [ln for ln in s.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def run_case(case: Case, case_dir: Path, opts) -> dict:
    """Run one case in ``case_dir`` and return its log record (outcome, site, stderr head, ...)."""
    runner = _spawn_run if opts.spawn else _fork_run
    env = {"TMPDIR": str(case_dir / "tmp"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(case_dir / "tmp" / "hf"), "TQDM_DISABLE": "0", **case.env}
    mem = int(opts.mem_gib * 2**30)
    before = {d: _listing(case_dir / d) for d in ("in", "out", "tmp")}
    code, sig, to, dt, rss = runner(case.args, case_dir, case_dir / "stdout.txt", case_dir / "stderr.txt",
                                    TIMEOUTS[case.target], mem, env)
    stderr = (case_dir / "stderr.txt").read_text(errors="replace")
    outcome, site = classify(code, sig, to, stderr)
    extra = {}
    if outcome != "ok":
        new = {d: sorted(_listing(case_dir / d) - before[d]) for d in before}
        new["tmp"] = [f for f in new["tmp"] if not f.startswith("hf")]
        left = [f"{d}/{f}" for d in new for f in new[d]]
        if left:
            extra["left_files"] = left[:10]
            if outcome == "clean_error":
                outcome, site = "partial_output", f"partial_output {case.target} {_mask(_last_line(stderr))[:60]}"
    else:
        problems = []
        if case.output:
            out = case_dir / case.output
            if not out.exists():
                problems = ["success without the output file"]
            else:
                problems = _fork_check(out, case.model_output, mem,
                                       Path(case.lora_base) if case.lora_base and not case.model_output else None)
                if not problems:
                    c2, s2, t2, _, _ = runner(["info", case.output], case_dir, case_dir / "info_out.txt",
                                              case_dir / "info_err.txt", TIMEOUTS["info"], mem, env)
                    if c2 != 0:
                        problems = [f"ggq info on the output failed: "
                                    f"{_last_line((case_dir / 'info_err.txt').read_text(errors='replace'))[:100]}"]
        if case.target == "lora" and not problems:  # the adapter it accepted (applied, or merged by convert)
            problems = _fork_check(case_dir / case.inputs[0], False, mem, Path(case.lora_base), case.lora_scale)
        elif case.target == "lora":
            pass
        elif case.target in ("info", "generate", "perplexity"):
            problems = _fork_check(case_dir / case.inputs[0], case.target != "info", mem)
        if problems:
            outcome = "invalid_accepted"
            site = f"invalid_accepted {case.target}: {_mask(problems[0])[:70]}"
            extra["problems"] = problems[:5]
    rec = {"case": case.id, "seed": case.seed, "target": case.target, "mutations": case.mutations,
           "args": case.args, "outcome": outcome, "site": site, "exit": code,
           "signal": signal.Signals(sig).name if sig else None, "seconds": round(dt, 2), "max_rss_mib": rss // 1024,
           "stderr_head": stderr[:600],
           "stderr_tail": stderr[-600:] if len(stderr) > 600 else "", **extra}
    return rec

# ===================================================================================== campaign


def _prepare(opts) -> dict:
    """Seeds, and the parent's imports (ggq and the modules its commands load; no Numba code runs)."""
    seeds = build_seeds(Path(opts.seeds), opts.targets.split(","))
    if not opts.spawn:
        import ggq.cli  # noqa: F401
        import ggq.convert.pipeline  # noqa: F401
        import ggq.convert.requantize  # noqa: F401
        import ggq.format.info  # noqa: F401
        import ggq.perplexity  # noqa: F401
        import ggq.runtime.chat  # noqa: F401
        import ggq.runtime.model  # noqa: F401
        from transformers import AutoConfig

        for s in HF_SEEDS:  # imports the config classes once, here (pure Python, no threads)
            AutoConfig.from_pretrained(seeds[s])
        vm = next((ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("VmSize")), "?")
        if opts.verbose:
            print(f"fork server ready: parent VmSize {vm} kB", file=sys.stderr)
    return seeds


def warm_up(seeds: dict, opts, work: Path) -> None:
    """Compile (or load) Numba's cache in throwaway children before the campaign: one generate and
    one perplexity per GGUF seed, one quantize per common type (when a GGUF/HF target runs); with the
    import targets, one conversion per quantized seed and the LoRA base files run with an adapter
    under every ``--lora-type``."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "text.txt").write_text(PPL_TEXT * 2)
    jobs = []
    gguf_targets = any(t not in IMPORT_TARGETS for t in opts.targets.split(","))
    for s in GGUF_SEEDS if gguf_targets else ():
        jobs.append(["generate", str(seeds[s]), "-p", PROMPT, "-n", "2", "-t", "1", "-c", "64"])
        jobs.append(["generate", str(seeds[s]), "-p", PROMPT, "-n", "2", "-t", "1", "-c", "64", "--chat"])
        jobs.append(["perplexity", str(seeds[s]), "-f", "text.txt", "-c", "16", "--chunks", "1", "-t", "1", "-q"])
    for t in ("Q8_0", "Q4_0", "F16", "Q4_K_M", "Q6_K", "Q5_1", "Q3_K_S", "BF16") if gguf_targets else ():
        jobs.append(["quantize", str(seeds["stories-F32"]), f"warm-{t}.gguf", t, "-q", "--force"])
    if "lora-base" in seeds:  # the import targets: one conversion per quantized seed, adapters applied
        for s in QUANT_SEEDS:
            jobs.append(["convert", str(seeds[s]), "-o", f"warm-{s}.gguf", "--force"])
        for b in ("lora-base-F32", "lora-base-Q8_0"):
            for lt in ("same", "f32", "f16", "q8_0"):
                jobs.append(["generate", str(seeds[b]), "--lora", str(seeds["lora-main-f32"]), "-p", PROMPT, "-n", "2",
                             "-t", "1", "-c", "32", "--lora-type", lt])
    for k, argv in enumerate(jobs):
        t0 = time.time()
        code, sig, to, dt, _ = _fork_run(argv, work, work / "o.txt", work / "e.txt", 600, 0, {"HF_HUB_OFFLINE": "1"})
        if code != 0:
            print(f"warm-up: ggq {' '.join(argv[:1])} on {Path(argv[1]).name} exit {code} signal {sig}: "
                  f"{_last_line((work / 'e.txt').read_text(errors='replace'))[:200]}", file=sys.stderr)
        elif opts.verbose:
            print(f"warm-up {k + 1}/{len(jobs)}: {' '.join(argv[:2])} {time.time() - t0:.1f}s", file=sys.stderr)


def _check_no_threads_started() -> None:
    try:
        from numba.np.ufunc import parallel

        if getattr(parallel, "_is_initialized", False):
            print("warning: Numba's thread pool started in the parent; forked children may hang", file=sys.stderr)
    except ImportError:
        pass


def campaign(opts) -> int:
    """Run ``opts.cases`` cases (``opts.jobs`` at a time); log, keep findings, print the summary."""
    out = Path(opts.out)
    cases_root = out / "cases"
    findings = out / "findings"
    for d in (cases_root, findings):
        d.mkdir(parents=True, exist_ok=True)
    seeds = _prepare(opts)
    targets = opts.targets.split(",")
    for t in targets:
        if t not in TARGETS:
            raise SystemExit(f"unknown target {t!r} (choose from {', '.join(TARGETS)})")
    if not opts.no_warm_up:
        warm_up(seeds, opts, out / "warm-up")
    _check_no_threads_started()
    log = open(out / "cases.jsonl", "a" if opts.resume else "w")
    done = set()
    if opts.resume:
        for ln in open(out / "cases.jsonl"):
            try:
                done.add(json.loads(ln)["case"])
            except (ValueError, KeyError):
                pass
    running: dict = {}  # pid -> (case, case_dir, result path, start)
    t_start = time.time()
    i = opts.start
    end = opts.start + opts.cases
    n_done = 0
    case_limit = max(TIMEOUTS.values()) * 2 + 120
    while i < end or running:
        while i < end and len(running) < opts.jobs:
            cid = f"{i:06d}"
            if cid in done:
                i += 1
                continue
            cdir = cases_root / cid
            shutil.rmtree(cdir, ignore_errors=True)
            case = make_case(opts.seed, i, targets, seeds, cdir)
            res = cdir / "result.json"
            pid = os.fork()
            if pid == 0:  # case supervisor: runs the command (and checks) in grandchildren
                try:
                    os.setpgid(0, 0)
                    rec = run_case(case, cdir, opts)
                    res.write_text(json.dumps(rec))
                finally:
                    os._exit(0)
            running[pid] = (case, cdir, res, time.time())
            i += 1
        wpid, status = os.waitpid(-1, os.WNOHANG)
        if not wpid:
            for pid, (case, cdir, res, t0) in list(running.items()):
                if time.time() - t0 > case_limit:
                    try:
                        os.killpg(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            time.sleep(0.01)
            continue
        if wpid not in running:
            continue
        case, cdir, res, t0 = running.pop(wpid)
        try:
            rec = json.loads(res.read_text())
        except (OSError, ValueError):
            rec = {"case": case.id, "seed": case.seed, "target": case.target, "mutations": case.mutations,
                   "args": case.args, "outcome": "hang", "site": "supervisor killed", "seconds": time.time() - t0}
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if rec["outcome"] not in CLEAN:
            keep = findings / case.id
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(cdir / "in", keep / "in")
            (keep / "case.json").write_text(json.dumps({**rec, "env": case.env, "output": case.output,
                                                         "model_output": case.model_output,
                                                         "lora_base": case.lora_base, "lora_scale": case.lora_scale,
                                                         "inputs": case.inputs}, indent=1))
        shutil.rmtree(cdir, ignore_errors=True)
        n_done += 1
        if opts.verbose or n_done % 100 == 0:
            el = time.time() - t_start
            print(f"[{n_done}/{opts.cases}] {el:.0f}s ({el / n_done:.2f}s/case) {case.id} {case.target} "
                  f"{rec['outcome']} {rec.get('site', '')[:80]}", file=sys.stderr, flush=True)
    log.close()
    elapsed = time.time() - t_start
    recs = [json.loads(ln) for ln in open(out / "cases.jsonl")]
    text, summary = summarize(recs, targets)
    summary["seconds"] = round(elapsed, 1)
    summary["cases_run_now"] = n_done
    summary["ggq"] = str(Path(sys.modules["ggq"].__file__).parent) if "ggq" in sys.modules else None
    summary["campaign"] = {"seed": opts.seed, "start": opts.start, "cases": opts.cases, "targets": targets,
                           "jobs": opts.jobs, "spawn": opts.spawn, "mem_gib": opts.mem_gib}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(text)
    print(f"{n_done} cases in {elapsed:.0f} s ({elapsed / max(n_done, 1):.2f} s/case, {opts.jobs} jobs); "
          f"log {out / 'cases.jsonl'}, findings {findings}")
    return sum(v for k, v in summary["outcomes"].items() if k not in CLEAN)


def summarize(recs: list, targets: list) -> tuple[str, dict]:
    """The counts table (target x outcome) and the distinct failure sites, as text and as a dict."""
    table = defaultdict(Counter)
    for r in recs:
        table[r["target"]][r["outcome"]] += 1
    cols = [o for o in OUTCOMES if any(table[t][o] for t in table)] or ["ok"]
    w = max(len(c) for c in cols) + 1
    lines = ["target      " + "".join(c.rjust(w) for c in cols) + "total".rjust(8)]
    for t in [t for t in TARGETS if t in table]:
        lines.append(f"{t:<12}" + "".join(str(table[t][c]).rjust(w) for c in cols) + str(sum(table[t].values())).rjust(8))
    tot = Counter()
    for t in table:
        tot.update(table[t])
    lines.append(f"{'all':<12}" + "".join(str(tot[c]).rjust(w) for c in cols) + str(sum(tot.values())).rjust(8))
    sites = defaultdict(list)
    for r in recs:
        if r["outcome"] not in CLEAN:
            sites[(r["outcome"], _site_key(r))].append(r)
    ranked = sorted(sites.items(), key=lambda kv: -len(kv[1]))
    lines.append("")
    lines.append(f"{len(ranked)} distinct failure sites (count, outcome, site, example case, targets):")
    site_list = []
    for (outc, site), rs in ranked:
        ex = rs[0]
        tg = ",".join(sorted({r["target"] for r in rs}))
        first = _first_error_line(ex.get("stderr_tail") or ex.get("stderr_head", ""))
        lines.append(f"{len(rs):5d}  {outc:<16} {site[:90]}  e.g. {ex['case']} [{tg}] {'; '.join(ex['mutations'])[:90]}"
                     + (f"\n       -> {first[:150]}" if first else ""))
        site_list.append({"outcome": outc, "site": site, "count": len(rs), "example": ex["case"], "targets": tg,
                          "mutations": ex["mutations"], "message": first})
    return "\n".join(lines), {"table": {t: dict(table[t]) for t in table}, "outcomes": dict(tot), "sites": site_list}


def _site_key(rec: dict) -> str:
    """A record's failure site for grouping: lists and quoted values collapsed; a traceback's
    exception type taken from its last line."""
    site = rec.get("site", "")
    if rec["outcome"] == "traceback" and site.startswith("? "):
        last = _last_line(rec.get("stderr_tail") or rec.get("stderr_head", ""))
        m = re.match(r"([A-Za-z_][\w.]*)(?::|$)", last)
        site = (m.group(1) if m else "?") + site[1:]
    if rec["outcome"] == "crash":  # signal and innermost ggq frame
        site = " ".join(site.split()[:2])
    site = re.sub(r"\[[^\]]*\](\.\.N)?", "[..]", site)
    return re.sub(r"b<q>", "<q>", site)


def _first_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not _STATUS_RE.search(ln)]
    for ln in reversed(lines):
        if (_EXC_RE.search(ln) or ln.startswith(("ggq:", "Fatal", "free(", "Timeout"))) and "File \"" not in ln:
            return ln.strip()
    return lines[-1].strip() if lines else ""


def replay(opts) -> int:
    """Run a kept case (``findings/<case>``) again and print its outcome and output."""
    out = Path(opts.out)
    keep = out / "findings" / opts.replay
    meta = json.loads((keep / "case.json").read_text())
    work = out / "replay" / opts.replay
    shutil.rmtree(work, ignore_errors=True)
    for d in ("out", "tmp"):
        (work / d).mkdir(parents=True)
    shutil.copytree(keep / "in", work / "in")
    case = Case(meta["case"], meta["target"], meta["seed"], meta["mutations"], meta["args"], meta.get("inputs", []),
                meta.get("output"), meta.get("env", {}), meta.get("model_output", True), meta.get("lora_base"),
                meta.get("lora_scale", ""))
    if not opts.spawn:
        _prepare(opts)
    rec = run_case(case, work, opts)
    print(f"case {case.id}: ggq {' '.join(case.args)}  (cwd {work})")
    print(f"mutations: {'; '.join(case.mutations)}")
    print(f"outcome: {rec['outcome']} ({rec.get('site', '')}), exit {rec['exit']}, signal {rec['signal']}, "
          f"{rec['seconds']} s; logged outcome: {meta['outcome']}")
    if rec.get("problems"):
        print("problems:", *rec["problems"], sep="\n  ")
    print("--- stderr ---")
    print((work / "stderr.txt").read_text(errors="replace")[-4000:])
    return 0 if rec["outcome"] in CLEAN else 1


def main(argv=None) -> int:
    """Command line: a campaign (default) or ``--replay CASE``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no Rust thread pool before a fork
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0, help="campaign seed: case i depends only on (seed, i)")
    ap.add_argument("--start", type=int, default=0, help="first case index (to split a campaign)")
    ap.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                    help=f"comma-separated, from {', '.join(TARGETS)} (default: {', '.join(DEFAULT_TARGETS)})")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", default=str(DEFAULT_OUT / "run"))
    ap.add_argument("--seeds", default=str(DEFAULT_OUT / "seeds"), help="folder of the seed inputs (built once)")
    ap.add_argument("--mem-gib", type=float, default=4.0, help="RLIMIT_AS per case (GiB)")
    ap.add_argument("--spawn", action="store_true", help="a fresh `python -m ggq` per case instead of forking")
    ap.add_argument("--no-warm-up", action="store_true")
    ap.add_argument("--resume", action="store_true", help="skip cases already in cases.jsonl")
    ap.add_argument("--replay", metavar="CASE", help="run findings/CASE again")
    ap.add_argument("--summary", action="store_true", help="print the table and sites of --out's log (no run)")
    ap.add_argument("--boundscheck", action="store_true",
                    help="compile ggq's kernels with NUMBA_BOUNDSCHECK=1 (every array index checked: an out-of-bounds "
                         "access is an IndexError, i.e. a traceback outcome), with their own cache under --out")
    ap.add_argument("-v", "--verbose", action="store_true")
    opts = ap.parse_args(argv)
    opts.out, opts.seeds = str(Path(opts.out).resolve()), str(Path(opts.seeds).resolve())
    if opts.boundscheck:  # before anything imports Numba (it reads its configuration once)
        os.environ["NUMBA_BOUNDSCHECK"] = "1"
        os.environ["NUMBA_CACHE_DIR"] = str(Path(opts.out) / "numba-boundscheck")
    if opts.replay:
        return replay(opts)
    if opts.summary:
        recs = [json.loads(ln) for ln in open(Path(opts.out) / "cases.jsonl")]
        print(summarize(recs, list(TARGETS))[0])
        return 0
    return 1 if campaign(opts) else 0


if __name__ == "__main__":
    sys.exit(main())
