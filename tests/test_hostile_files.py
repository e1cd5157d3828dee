"""Hostile input files (issue 12): every class of bad input the fuzz run found is a one-line error
naming the file, with a non-zero exit, no traceback and no output left behind -- and valid files
still read, quantize and run as before.

Every bad file is made here: a tiny, valid Llama GGUF written with gguf-py's GGUFWriter (a
SentencePiece-style vocabulary of 320 tokens, 2 layers of width 32, random F32 weights) with one
thing changed -- a metadata value, or bytes of its header patched -- or a copy of the stories260K
checkpoint with its config.json or safetensors header changed. The reference for valid files is
gguf-py's own GGUFReader (tensor table, metadata), not ggq's output.
"""

from __future__ import annotations

import errno
import json
import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFValueType as VT

from ggq.cli import main
from ggq.errors import GGQError

ARCH = "llama"
N_EMBD, N_HEAD, N_KV, N_FF, N_LAYER = 32, 4, 2, 64, 2
HD = N_EMBD // N_HEAD


def _vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces = [c for c in "abcdefghijklmnopqrstuvwxyz"] + ["\u2581" + c for c in "abcdefghijklmnopqrstuvwxyz"]
    pieces += ["\u2581the", "\u2581a", "\u2581on", "\u2581in", "\u2581to", "\u2581up", "\u2581it", "\u2581is", "\u2581"]
    tokens += pieces
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    return tokens, scores, types


TOKENS, SCORES, TTYPES = _vocab()
N_VOCAB = len(TOKENS)


def tiny_kv() -> dict:
    """key -> (value, value type, element type) of the tiny Llama, in file order."""
    a = ARCH
    return {
        "general.architecture": (a, VT.STRING, None),
        "general.name": ("tiny", VT.STRING, None),
        f"{a}.block_count": (N_LAYER, VT.UINT32, None),
        f"{a}.context_length": (128, VT.UINT32, None),
        f"{a}.embedding_length": (N_EMBD, VT.UINT32, None),
        f"{a}.feed_forward_length": (N_FF, VT.UINT32, None),
        f"{a}.attention.head_count": (N_HEAD, VT.UINT32, None),
        f"{a}.attention.head_count_kv": (N_KV, VT.UINT32, None),
        f"{a}.rope.freq_base": (10000.0, VT.FLOAT32, None),
        f"{a}.rope.dimension_count": (HD, VT.UINT32, None),
        f"{a}.attention.layer_norm_rms_epsilon": (1e-5, VT.FLOAT32, None),
        "tokenizer.ggml.model": ("llama", VT.STRING, None),
        "tokenizer.ggml.tokens": (TOKENS, VT.ARRAY, VT.STRING),
        "tokenizer.ggml.scores": (SCORES, VT.ARRAY, VT.FLOAT32),
        "tokenizer.ggml.token_type": (TTYPES, VT.ARRAY, VT.INT32),
        "tokenizer.ggml.bos_token_id": (1, VT.UINT32, None),
        "tokenizer.ggml.eos_token_id": (2, VT.UINT32, None),
        "tokenizer.ggml.unknown_token_id": (0, VT.UINT32, None),
    }


def tiny_tensors(scale: float = 0.3, seed: int = 0) -> dict:
    """name -> float32 array (numpy order: (rows, row length)) of the tiny Llama."""
    rng = np.random.default_rng(seed)

    def m(rows, cols):
        return (rng.standard_normal((rows, cols)) * scale).astype(np.float32)

    t = {"token_embd.weight": m(N_VOCAB, N_EMBD), "output_norm.weight": np.ones(N_EMBD, np.float32)}
    for i in range(N_LAYER):
        t.update({f"blk.{i}.attn_norm.weight": np.ones(N_EMBD, np.float32),
                  f"blk.{i}.attn_q.weight": m(N_HEAD * HD, N_EMBD), f"blk.{i}.attn_k.weight": m(N_KV * HD, N_EMBD),
                  f"blk.{i}.attn_v.weight": m(N_KV * HD, N_EMBD), f"blk.{i}.attn_output.weight": m(N_EMBD, N_HEAD * HD),
                  f"blk.{i}.ffn_norm.weight": np.ones(N_EMBD, np.float32), f"blk.{i}.ffn_gate.weight": m(N_FF, N_EMBD),
                  f"blk.{i}.ffn_up.weight": m(N_FF, N_EMBD), f"blk.{i}.ffn_down.weight": m(N_EMBD, N_FF)})
    t["output.weight"] = m(N_VOCAB, N_EMBD)
    return t


def write_gguf(path: Path, kv: dict | None = None, tensors: dict | None = None, **changes) -> Path:
    """The tiny Llama with ``changes`` (key -> (value, type, element type), or None to drop the
    key) written with gguf-py's GGUFWriter."""
    kv = dict(tiny_kv() if kv is None else kv)
    for k, v in changes.items():
        k = k.replace("__", ".")
        if v is None:
            kv.pop(k, None)
        else:
            kv[k] = v
    tensors = tiny_tensors() if tensors is None else tensors
    w = gguf.GGUFWriter(str(path), "")
    for k, (v, vt, sub) in kv.items():
        w.add_key_value(k, v, vt, sub_type=sub)
    for n, a in tensors.items():
        w.add_tensor(n, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(r, *needles, out_dir: Path | None = None, limit: int = 600):
    """Exit status 1, the last output line ``ggq: error: ...`` (one printable line, no
    traceback), containing ``needles``; nothing but the inputs left in ``out_dir``."""
    assert r.exit_code == 1, (r.exit_code, r.output, r.exception)
    assert isinstance(r.exception, SystemExit), r.exception
    text = r.output.split("\r")[-1].strip().splitlines()[-1]
    assert text.startswith("ggq: error: "), r.output
    assert "Traceback" not in r.output and "internal error" not in r.output, r.output
    assert text.isprintable() and len(text) < limit, text
    for n in needles:
        assert n in text, (n, text)
    if out_dir is not None:
        left = [p.name for p in out_dir.iterdir() if p.name.endswith((".tmp", ".part")) or p.name == "out.gguf"]
        assert not left, left


def _info_and_quantize_refuse(path: Path, out_dir: Path, *needles):
    """``ggq info`` and ``ggq quantize`` both refuse ``path`` with the same kind of message."""
    assert_one_line_error(run("info", path), path.name, *needles)
    assert_one_line_error(run("quantize", "-q", path, out_dir / "out.gguf", "Q8_0"), path.name, *needles, out_dir=out_dir)


def _key_value_pos(data: bytes, key: str) -> int:
    """Offset of the value type field after ``key`` in the header."""
    k = key.encode()
    return data.index(struct.pack("<Q", len(k)) + k) + 8 + len(k)


def _tensor_info_pos(data: bytes, name: str) -> int:
    """Offset of n_dims after tensor ``name`` in the tensor table."""
    b = name.encode()
    i = data.index(struct.pack("<Q", len(b)) + b + struct.pack("<I", 2))
    return i + 8 + len(b)


# ---------------------------------------------------------------- valid files still work


def test_reader_agrees_with_gguf_py(tiny, smollm2_gguf):
    """The reader's metadata and tensor table equal gguf-py's GGUFReader's (the reference), on the
    tiny file and on the llama.cpp-written SmolLM2 fixture."""
    from ggq.format.gguf_reader import read_gguf

    for path in (tiny, smollm2_gguf):
        h = read_gguf(path)
        ref = gguf.GGUFReader(path)
        keys = [k for k in ref.fields if not k.startswith("GGUF.")]
        assert list(h.metadata) == keys
        for k in keys:
            f = ref.fields[k]
            v = f.contents()
            assert h.metadata[k] == (v.tolist() if isinstance(v, np.ndarray) else v), k
            assert h.types[k][0] == f.types[0], k
        assert [t.name for t in ref.tensors] == list(h.tensors)
        for t in ref.tensors:
            e = h.tensors[t.name]
            assert (e.qtype, e.ne, e.offset, e.nbytes) == (t.tensor_type, tuple(int(x) for x in t.shape),
                                                          t.data_offset, t.n_bytes)


def test_valid_tiny_file_runs_and_quantizes(tiny, tmp_path):
    """The tiny file loads, generates, and quantizes to a file gguf-py reads with the same tensor
    names and shapes; its metadata are copied with their types."""
    r = run("generate", tiny, "-p", "the", "-n", "4", "--temp", "0", "-c", "32")
    assert r.exit_code == 0, r.output
    out = tmp_path / "q8.gguf"
    r = run("quantize", "-q", tiny, out, "Q8_0")
    assert r.exit_code == 0, r.output
    src, dst = gguf.GGUFReader(tiny), gguf.GGUFReader(out)
    assert sorted((t.name, tuple(t.shape)) for t in src.tensors) == sorted((t.name, tuple(t.shape)) for t in dst.tensors)
    for k, f in src.fields.items():
        if not k.startswith("GGUF."):
            assert dst.fields[k].types == f.types, k
    r = run("generate", out, "-p", "the", "-n", "4", "--temp", "0", "-c", "32")
    assert r.exit_code == 0, r.output


# ---------------------------------------------------------------- GGUF structure (the reader)


def test_huge_lengths_fail_at_once(tiny, tmp_path):
    """String and array lengths of 2**62 (and a key count of 2**62) are errors before anything
    is allocated or looped over (this hung or raised OverflowError/MemoryError)."""
    data = tiny.read_bytes()
    cases = {}
    p = _key_value_pos(data, "tokenizer.ggml.tokens")  # type(4) element type(4) count(8)
    cases["array.gguf"] = data[:p + 8] + struct.pack("<Q", 1 << 62) + data[p + 16:]
    p = _key_value_pos(data, "general.name")  # type(4) length(8)
    cases["string.gguf"] = data[:p + 4] + struct.pack("<Q", 1 << 62) + data[p + 12:]
    cases["keys.gguf"] = data[:16] + struct.pack("<Q", 1 << 62) + data[24:]
    cases["tensors.gguf"] = data[:8] + struct.pack("<Q", 1 << 62) + data[16:]
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        t0 = time.perf_counter()
        _info_and_quantize_refuse(path, tmp_path, "malformed GGUF")
        assert time.perf_counter() - t0 < 30  # generous: it is instant; this only catches a hang


def test_bad_value_types_and_duplicates(tiny, tmp_path):
    data = tiny.read_bytes()
    p = _key_value_pos(data, "general.name")
    bad_type = data[:p] + struct.pack("<I", 77) + data[p + 4:]
    (tmp_path / "vtype.gguf").write_bytes(bad_type)
    _info_and_quantize_refuse(tmp_path / "vtype.gguf", tmp_path, "unknown value type 77")
    dup = data.replace(b"llama.context_length", b"llama.rope.freq_base", 1)  # 20 bytes each: a repeated key
    (tmp_path / "dupkey.gguf").write_bytes(dup)
    _info_and_quantize_refuse(tmp_path / "dupkey.gguf", tmp_path, "duplicate key")
    dt = data.replace(b"blk.1.attn_q.weight", b"blk.0.attn_q.weight", 1)
    (tmp_path / "duptensor.gguf").write_bytes(dt)
    _info_and_quantize_refuse(tmp_path / "duptensor.gguf", tmp_path, "duplicate tensor")


def test_invalid_utf8_and_binary_names_are_escaped_and_cut(tiny, tmp_path):
    """A corrupt name prints as a short escaped value, never kilobytes of raw bytes."""
    data = tiny.read_bytes()
    name = b"blk.0.attn_q.weight"
    bad = data.replace(name, b"\xff\x00\x1b[2J" + name[6:], 1)
    (tmp_path / "utf8.gguf").write_bytes(bad)
    _info_and_quantize_refuse(tmp_path / "utf8.gguf", tmp_path, "not valid UTF-8", "\\xff")
    # a 5000-character control-character architecture name: the message stays short and printable
    path = write_gguf(tmp_path / "longname.gguf", general__architecture=("\x07\x1b" * 2500, VT.STRING, None))
    assert_one_line_error(run("generate", path, "-p", "x", "-n", "1"), "longname.gguf", "\\x07\\x1b", limit=400)
    r = run("info", path)
    assert r.exit_code == 0 and "\x1b" not in r.output and len(r.output.splitlines()[4]) < 200


def test_bad_alignment(tmp_path):
    """general.alignment of 0, 31, 48 (not a power of two), a signed -1, or 2**31 (which would
    pad gigabytes) is refused by info, quantize and the runtime."""
    for i, val in enumerate([(0, VT.UINT32, None), (31, VT.UINT32, None), (48, VT.UINT32, None),
                             (-1, VT.INT32, None), (1 << 31, VT.UINT32, None)]):
        path = write_gguf(tmp_path / f"align{i}.gguf", general__alignment=val)
        _info_and_quantize_refuse(path, tmp_path, "alignment" if i < 4 else "outside the file")
        assert_one_line_error(run("generate", path, "-p", "x", "-n", "1"), path.name)


def test_moved_overlapping_and_outside_tensors(tiny, tmp_path):
    """A tensor offset moved by one byte, onto the previous tensor, or past the end of the file;
    an unknown ggml type; a row length that does not divide into blocks; zero and 5 dimensions."""
    data = tiny.read_bytes()
    p = _tensor_info_pos(data, "blk.0.attn_k.weight")  # n_dims(4) ne(16) type(4) offset(8)
    (off,) = struct.unpack_from("<Q", data, p + 24)
    cases = {
        "moved.gguf": (struct.pack("<Q", off + 1), p + 24, "not aligned"),
        "overlap.gguf": (struct.pack("<Q", off - 32), p + 24, "overlaps"),
        "outside.gguf": (struct.pack("<Q", 1 << 40), p + 24, "outside the file"),
        "type.gguf": (struct.pack("<I", 250), p + 20, "unknown type 250"),
        "blocks.gguf": (struct.pack("<I", int(gguf.GGMLQuantizationType.Q4_K)), p + 20, "block size"),
        "zero.gguf": (struct.pack("<Q", 0), p + 4, "zero dimension"),
        "dims.gguf": (struct.pack("<I", 5), p, "dimensions"),
    }
    for fname, (patch, at, needle) in cases.items():
        path = tmp_path / fname
        path.write_bytes(data[:at] + patch + data[at + len(patch):])
        _info_and_quantize_refuse(path, tmp_path, needle)
    (tmp_path / "trunc.gguf").write_bytes(data[:-200])
    _info_and_quantize_refuse(tmp_path / "trunc.gguf", tmp_path, "outside the file")


# ---------------------------------------------------------------- model validation (before compiled code)


@pytest.mark.parametrize("key,value,needle", [
    ("llama.rope.dimension_count", (2 * HD, VT.UINT32, None), "rope.dimension_count"),
    ("llama.rope.dimension_count", (HD - 1, VT.UINT32, None), "rope.dimension_count"),
    ("llama.attention.head_count", (0, VT.UINT32, None), "head_count"),
    ("llama.attention.head_count_kv", (0, VT.UINT32, None), "head_count"),
    ("llama.attention.head_count_kv", (3, VT.UINT32, None), "multiple"),
    ("llama.block_count", (1, VT.UINT32, None), "block_count"),
    ("llama.block_count", (2**31 - 1, VT.UINT32, None), "block_count"),
    ("llama.embedding_length", (64, VT.UINT32, None), "token_embd"),
    ("llama.feed_forward_length", (96, VT.UINT32, None), "ffn_gate"),
    ("llama.rope.freq_base", (0.0, VT.FLOAT32, None), "rope.freq_base"),
    ("llama.rope.freq_base", (float("nan"), VT.FLOAT32, None), "rope.freq_base"),
    ("llama.rope.scaling.factor", (float("nan"), VT.FLOAT32, None), "rope.scaling.factor"),
    ("llama.attention.layer_norm_rms_epsilon", (0.0, VT.FLOAT32, None), "epsilon"),
    ("llama.context_length", (0, VT.UINT32, None), "context_length"),
    ("llama.context_length", ("long", VT.STRING, None), "context_length"),
    ("tokenizer.ggml.tokens", (TOKENS[:100], VT.ARRAY, VT.STRING), "tokenizer.ggml.tokens"),
    ("tokenizer.ggml.scores", ([str(s) for s in SCORES], VT.ARRAY, VT.STRING), "tokenizer.ggml.scores"),
    ("tokenizer.ggml.token_type", (TTYPES[:-1], VT.ARRAY, VT.INT32), "tokenizer.ggml.token_type"),
    ("tokenizer.ggml.bos_token_id", (N_VOCAB + 5, VT.UINT32, None), "bos_token_id"),
    ("tokenizer.ggml.eos_token_id", ("2", VT.STRING, None), "eos_token_id"),
    ("tokenizer.ggml.seperator_token_id", (N_VOCAB, VT.UINT32, None), "seperator_token_id"),
    ("tokenizer.ggml.padding_token_id", (1.0, VT.FLOAT32, None), "padding_token_id"),
    # llama.cpp's get_key: the value type must be numeric of the right kind, the key present
    ("llama.feed_forward_length", (float(N_FF), VT.FLOAT32, None), "feed_forward_length"),
    ("llama.attention.head_count_kv", (float(N_KV), VT.FLOAT64, None), "head_count_kv"),
    ("llama.rope.freq_base", (True, VT.BOOL, None), "rope.freq_base"),
    ("llama.embedding_length", ([N_EMBD], VT.ARRAY, VT.UINT32), "embedding_length"),
    ("llama.attention.head_count", ([N_HEAD] * (N_LAYER + 1), VT.ARRAY, VT.UINT32), "entries for 2 layers"),
    ("llama.attention.head_count", ([N_HEAD, 2 * N_HEAD], VT.ARRAY, VT.UINT32), "differs between layers"),
    ("llama.context_length", None, "context_length"),
])
def test_inconsistent_model_refused_before_running(tmp_path, key, value, needle):
    """Hyper-parameters out of range or contradicting the tensors, and vocabularies that do not
    match token_embd, are one-line errors from generate, perplexity and quantize -- before any
    compiled code runs (a rope.dimension_count above the head size used to make the rope kernel
    write out of bounds and abort in glibc)."""
    path = write_gguf(tmp_path / "bad.gguf", **{key.replace(".", "__"): value})
    out = tmp_path / "out"
    out.mkdir()
    assert_one_line_error(run("generate", path, "-p", "the", "-n", "2"), "bad.gguf", needle)
    assert_one_line_error(run("quantize", "-q", path, out / "out.gguf", "Q8_0"), "bad.gguf", needle, out_dir=out)
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat " * 50)
    assert_one_line_error(run("perplexity", path, "-f", text, "-c", "16", "-q"), "bad.gguf")


def test_missing_tensor_and_extra_layer(tmp_path):
    t = tiny_tensors()
    del t["blk.1.attn_output.weight"]
    path = write_gguf(tmp_path / "missing.gguf", tensors=t)
    assert_one_line_error(run("generate", path, "-p", "x", "-n", "1"), "missing.gguf", "blk.1.attn_output.weight")
    t = tiny_tensors()
    t["blk.2.attn_norm.weight"] = np.ones(N_EMBD, np.float32)
    path = write_gguf(tmp_path / "extra.gguf", tensors=t)  # block_count 2 but a third layer: not run silently
    assert_one_line_error(run("generate", path, "-p", "x", "-n", "1"), "extra.gguf", "block_count")


def test_per_layer_arrays_and_unused_tensors(tmp_path):
    """Per-layer head counts (llama.cpp's get_key_or_arr) of equal entries run like the scalar;
    a tensor the architecture does not read is refused, as llama.cpp's loader refuses it
    ("wrong number of tensors")."""
    path = write_gguf(tmp_path / "arr.gguf", llama__attention__head_count=([N_HEAD] * N_LAYER, VT.ARRAY, VT.UINT32),
                      llama__feed_forward_length=([N_FF] * N_LAYER, VT.ARRAY, VT.INT32))
    ref = run("generate", write_gguf(tmp_path / "ref.gguf"), "-p", "the", "-n", "4", "--temp", "0", "-c", "32")
    r = run("generate", path, "-p", "the", "-n", "4", "--temp", "0", "-c", "32")
    assert r.exit_code == 0 == ref.exit_code and r.output == ref.output, (r.output, ref.output)
    t = tiny_tensors()
    t["blk.0.attn_rot_embd.weight"] = np.ones(N_EMBD, np.float32)
    path = write_gguf(tmp_path / "unused.gguf", tensors=t)
    assert_one_line_error(run("generate", path, "-p", "x", "-n", "1"), "unused.gguf", "does not use",
                          "blk.0.attn_rot_embd.weight")
    out = tmp_path / "out"
    out.mkdir()
    assert_one_line_error(run("quantize", "-q", path, out / "out.gguf", "Q8_0"), "unused.gguf", out_dir=out)


def test_quantize_other_architectures_needs_layers_and_vocabulary(tmp_path):
    """An architecture ggq does not run (llama-quantize still quantizes it) must have an integer
    block_count matching its blk.N groups and a token list; otherwise the output would load nowhere."""
    kv = {k.replace("llama.", "gpt2."): v for k, v in tiny_kv().items()}
    kv["general.architecture"] = ("gpt2", VT.STRING, None)
    out = tmp_path / "out"
    out.mkdir()
    ok = write_gguf(tmp_path / "gpt2.gguf", kv=kv)
    r = run("quantize", "-q", ok, out / "ok.gguf", "Q8_0")
    assert r.exit_code == 0, r.output
    assert len(gguf.GGUFReader(out / "ok.gguf").tensors) == len(tiny_tensors())
    for name, change, needle in (("nobc.gguf", {"gpt2.block_count": None}, "block_count"),
                                 ("fbc.gguf", {"gpt2.block_count": (2.0, VT.FLOAT32, None)}, "block_count"),
                                 ("bc3.gguf", {"gpt2.block_count": (3, VT.UINT32, None)}, "block_count"),
                                 ("notok.gguf", {"tokenizer.ggml.tokens": None}, "tokenizer.ggml.tokens")):
        path = write_gguf(tmp_path / name, kv=kv, **{k.replace(".", "__"): v for k, v in change.items()})
        assert_one_line_error(run("quantize", "-q", path, out / "out.gguf", "Q8_0"), name, needle, out_dir=out)


def test_perplexity_overflowing_to_infinity(tmp_path):
    """A mean NLL above 709 (math.exp's limit): perplexity prints inf, as llama.cpp does, instead of
    an OverflowError (found by the bounds-checked fuzz campaign)."""
    t = tiny_tensors()
    t["output.weight"] *= 3000.0  # finite logits thousands apart
    path = write_gguf(tmp_path / "sharp.gguf", tensors=t)
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat " * 50)
    r = run("perplexity", path, "-f", text, "-c", "16", "--chunks", "2", "-q")
    assert r.exit_code == 0, r.output
    assert "inf" in r.output.lower(), r.output


def test_non_finite_logits_are_an_error(tmp_path):
    """Weights that overflow float32 in the attention scores: a one-line error, not a
    ZeroDivisionError from the softmax (llama.cpp would print garbage)."""
    t = tiny_tensors()
    for i in range(N_LAYER):
        t[f"blk.{i}.attn_q.weight"][:] = 1e30
        t[f"blk.{i}.attn_k.weight"][:] = 1e30
    path = write_gguf(tmp_path / "inf.gguf", tensors=t)
    assert_one_line_error(run("generate", path, "-p", "the cat", "-n", "2", "--temp", "0"), "inf.gguf", "non-finite",
                          "at layer 0")
    t = tiny_tensors()
    t["blk.1.ffn_down.weight"][:] = 1e38  # finite in float32, overflows in layer 1's FFN only
    path = write_gguf(tmp_path / "inf1.gguf", tensors=t)
    assert_one_line_error(run("generate", path, "-p", "the cat", "-n", "2", "--temp", "0"), "inf1.gguf", "non-finite",
                          "at layer 1")


# ---------------------------------------------------------------- converter (config.json against the checkpoint)


def _set_config(ckpt: Path, **kv):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(kv)
    (ckpt / "config.json").write_text(json.dumps(cfg))


def _st_header(ckpt: Path) -> tuple[dict, bytes]:
    raw = (ckpt / "model.safetensors").read_bytes()
    (n,) = struct.unpack_from("<Q", raw)
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _set_st_header(ckpt: Path, header: dict, data: bytes, raw_header: bytes | None = None):
    hb = raw_header if raw_header is not None else json.dumps(header).encode()
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", len(hb)) + hb + data)


@pytest.mark.parametrize("change,needle", [
    ({"num_hidden_layers": 10**9}, "num_hidden_layers"),
    ({"vocab_size": 10**9}, "vocab_size"),
    ({"hidden_size": 10**9}, "hidden_size"),
    ({"rope_theta": 1e308}, "rope_theta"),
    ({"max_position_embeddings": -1}, "max_position_embeddings"),
    ({"num_hidden_layers": 4}, ""),
    ({"vocab_size": 500}, "vocab_size"),
    ({"intermediate_size": 128}, "ffn"),
    ({"num_attention_heads": 0}, "attention heads"),
    ({"rope_scaling": {"type": "linear", "factor": float("nan")}}, "rope parameter factor"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": "x"}},
     "original_max_position_embeddings"),
    ({"num_attention_heads": "x" * 5000}, "invalid hyperparameter"),
])
def test_config_contradicting_checkpoint(ckpt, tmp_path, change, needle):
    """Absurd or contradicting config.json values: refused at once, nothing written."""
    _set_config(ckpt, **change)
    out = tmp_path / "o"
    out.mkdir()
    t0 = time.perf_counter()
    assert_one_line_error(run("convert", ckpt, "-o", out / "out.gguf"), needle, out_dir=out)
    assert time.perf_counter() - t0 < 120  # catches the old hangs only


def test_safetensors_contradicting_config(ckpt, tmp_path):
    """A missing o_proj, overlapping data offsets, a changed shape, a deeply nested header: one
    line each, nothing written."""
    out = tmp_path / "o"
    out.mkdir()
    header, data = _st_header(ckpt)
    name = "model.layers.1.self_attn.o_proj.weight"
    h = {k: v for k, v in header.items() if k != name}
    _set_st_header(ckpt, h, data)
    assert_one_line_error(run("convert", ckpt, "-o", out / "out.gguf"), "attn_output", out_dir=out)

    h = json.loads(json.dumps(header))
    a, b = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"
    h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + h[b]["data_offsets"][1] - h[b]["data_offsets"][0]]
    _set_st_header(ckpt, h, data)
    assert_one_line_error(run("convert", ckpt, "-o", out / "out.gguf"), "overlap", out_dir=out)

    h = json.loads(json.dumps(header))
    name = "model.layers.0.mlp.down_proj.weight"
    h[name]["shape"] = list(reversed(h[name]["shape"]))
    _set_st_header(ckpt, h, data)
    assert_one_line_error(run("convert", ckpt, "-o", out / "out.gguf"), "ffn_down", out_dir=out)

    nested = b'{"__metadata__": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    _set_st_header(ckpt, header, data, raw_header=nested)
    assert_one_line_error(run("convert", ckpt, "-o", out / "out.gguf"), "nested", out_dir=out)


def test_safetensors_header_scans_and_names(ckpt, tmp_path):
    """An unclosed string of escaped quotes in the header (once a quadratic regex scan that never
    ended on a large header) and a tensor name with a 5,000-digit layer number (int() refuses
    more than 4,300 digits): one line each, at once."""
    out = tmp_path / "o"
    out.mkdir()
    header, data = _st_header(ckpt)
    _set_st_header(ckpt, header, data, raw_header=b'{"' + b'\\"' * 2_000_000)
    t0 = time.perf_counter()
    assert_one_line_error(run("convert", ckpt, "-o", out / "out.gguf"), "model.safetensors", out_dir=out)
    assert time.perf_counter() - t0 < 60
    h = json.loads(json.dumps(header))
    name = "model.layers.1.self_attn.o_proj.weight"
    h[name.replace(".1.", "." + "7" * 5000 + ".")] = h.pop(name)
    _set_st_header(ckpt, h, data)
    assert_one_line_error(run("convert", ckpt, "-o", out / "out.gguf"), out_dir=out)


def test_non_finite_weights_are_not_quantized(ckpt, tiny, tmp_path):
    """NaN or infinite weights (and F16 overflow) are refused by quantize and convert instead of
    being written as blocks that load and compute garbage."""
    out = tmp_path / "o"
    out.mkdir()
    t = tiny_tensors()
    t["blk.1.ffn_up.weight"][3, 5] = np.nan
    path = write_gguf(tmp_path / "nan.gguf", tensors=t)
    for qt in ("Q4_K_M", "Q8_0", "F16"):
        assert_one_line_error(run("quantize", "-q", path, out / "out.gguf", qt), "nan.gguf", "blk.1.ffn_up.weight",
                              "non-finite", out_dir=out)
    t = tiny_tensors()
    t["blk.0.attn_v.weight"][0, 0] = 1e6
    path = write_gguf(tmp_path / "big.gguf", tensors=t)
    assert_one_line_error(run("quantize", "-q", path, out / "out.gguf", "F16"), "big.gguf", "float16", out_dir=out)
    assert run("quantize", "-q", path, out / "ok.gguf", "Q8_0").exit_code == 0
    from safetensors.numpy import load_file, save_file

    st = load_file(ckpt / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    st[name] = st[name].copy()
    st[name][0, 0] = np.inf
    save_file(st, ckpt / "model.safetensors")
    assert_one_line_error(run("convert", ckpt, "-o", out / "out.gguf", "--type", "Q8_0"), name, "non-finite",
                          out_dir=out)


@pytest.mark.parametrize("config", ["[]", '{"architectures": {"a": 1}, "num_hidden_layers": 2}',
                                    '{"architectures": ["LlamaForCausalLM"], "num_hidden_layers": "x"}',
                                    "[" * 100000 + "]" * 100000])
def test_imatrix_reads_config_like_convert(ckpt, tmp_path, config):
    """``ggq imatrix`` on a checkpoint folder with a malformed config.json: the converter's one-line
    errors (it used to parse the config itself: AttributeError, KeyError, RecursionError)."""
    pytest.importorskip("torch")
    (ckpt / "config.json").write_text(config)
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat " * 20)
    out = tmp_path / "o"
    out.mkdir()
    assert_one_line_error(run("imatrix", ckpt, "-f", text, "-o", out / "out.gguf", "-q"), out_dir=out)


def test_chat_template_failures_name_the_file():
    """A template that fails in its system-role fallback with a non-jinja error is still one
    GGQError naming the file."""
    from ggq.runtime.chat import ChatTemplate

    tpl = ChatTemplate("{% if messages[0].role == 'system' %}{{ raise_exception('no system') }}"
                       "{% else %}{{ 1 // 0 }}{% endif %}", where="m.gguf")
    with pytest.raises(GGQError, match=r"^m.gguf: chat template: no system"):
        tpl.render([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
    with pytest.raises(GGQError, match=r"^m.gguf: chat template"):
        ChatTemplate("{% if %}", where="m.gguf")
    for huge in ("{{ 'x' * 1000000000 }}", "{{ [1] * 10**9 }}", "{{ 9 ** 100000000 }}"):  # refused, not allocated
        with pytest.raises(GGQError, match=r"^m.gguf: chat template: a (repetition|power)"):
            ChatTemplate(huge, where="m.gguf").render([{"role": "user", "content": "u"}])
    assert ChatTemplate("{{ '-' * 3 }}{{ 2 ** 3 }}").render([]) == "---8"


def test_gemma_head_sizes_cannot_divide_by_zero(tmp_path):
    """Gemma 2's 27B attention-scale rule with embedding_length < head_count: one line, no
    ZeroDivisionError (found by review)."""
    kv = {k.replace("llama.", "gemma2."): v for k, v in tiny_kv().items()}
    kv.update({"general.architecture": ("gemma2", VT.STRING, None), "gemma2.block_count": (46, VT.UINT32, None),
               "gemma2.embedding_length": (1, VT.UINT32, None), "gemma2.attention.head_count": (2, VT.UINT32, None),
               "gemma2.attention.head_count_kv": (2, VT.UINT32, None),
               "gemma2.attention.key_length": (2, VT.UINT32, None),
               "gemma2.attention.value_length": (2, VT.UINT32, None),
               "gemma2.rope.dimension_count": (2, VT.UINT32, None)})
    path = write_gguf(tmp_path / "g.gguf", kv=kv)
    assert_one_line_error(run("generate", path, "-p", "x", "-n", "1"), "g.gguf")


# ---------------------------------------------------------------- outputs: failures leave nothing


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError(errno.ENOSPC, "No space left on device")])
def test_quantize_failure_leaves_nothing(tiny, tmp_path, monkeypatch, exc):
    from ggq.format.gguf_writer import GGUFWriter

    calls = {"n": 0}
    real = GGUFWriter.write_tensor_stream

    def flaky(self, parts, nbytes):
        calls["n"] += 1
        if calls["n"] == 3:
            raise exc
        return real(self, parts, nbytes)

    monkeypatch.setattr(GGUFWriter, "write_tensor_stream", flaky)
    out = tmp_path / "o"
    out.mkdir()
    r = run("quantize", "-q", tiny, out / "out.gguf", "Q8_0")
    if isinstance(exc, OSError):
        assert_one_line_error(r, "out.gguf", "disk full")
    else:
        assert r.exit_code == 130
    assert list(out.iterdir()) == []


def test_unwritable_output_folder(tiny, tmp_path, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    import ggq.format.output as output

    real = output.os.access
    # as for a non-root user on a read-only folder (root may write anywhere)
    monkeypatch.setattr(output.os, "access", lambda p, mode: False if Path(p) == out else real(p, mode))
    assert_one_line_error(run("quantize", "-q", tiny, out / "out.gguf", "Q8_0"), "not writable", out_dir=out)


def test_internal_errors_are_one_line(tiny, monkeypatch):
    """A bug (any unexpected exception) is one 'internal error' line, exit 70, no traceback."""
    import ggq.format.info as info

    monkeypatch.setattr(info, "read_gguf", lambda p: 1 / 0)
    r = run("info", tiny)
    assert r.exit_code == 70 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1].startswith("ggq: internal error: ZeroDivisionError")


def test_api_errors_name_the_file(tmp_path):
    from ggq.format.gguf_reader import read_gguf

    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 3) + b"abc" + struct.pack("<I", 9)
                  + struct.pack("<IQ", 9, 1))
    with pytest.raises(GGQError, match="x.gguf.*array of arrays"):
        read_gguf(p)


# ---------------------------------------------------------------- kernels under Numba's bounds checking


@pytest.mark.slow
def test_kernels_stay_in_bounds(tmp_path):
    """The compiled forward pass with NUMBA_BOUNDSCHECK=1 (every array index checked; a fresh
    Numba cache so nothing unchecked is reused) on files the reader and validator accept at the
    edges: full and minimal (2 dims) rotary width, a prompt batch and decoding across a K-cache
    tile boundary, F32 and Q8_0 matrices. An out-of-bounds index would be an IndexError (an
    internal error, exit 70) instead of silent memory corruption."""
    import os
    import subprocess
    import sys

    files = [write_gguf(tmp_path / "full.gguf"),
             write_gguf(tmp_path / "rot2.gguf", llama__rope__dimension_count=(2, VT.UINT32, None))]
    q8 = tmp_path / "q8.gguf"
    assert run("quantize", "-q", files[0], q8, "Q8_0").exit_code == 0
    files.append(q8)
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(tmp_path / "numba"),
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    prompt = "the cat sat on the mat and it is up to a cat in the sun " * 2
    for f in files:
        p = subprocess.run([sys.executable, "-m", "ggq", "generate", str(f), "-p", prompt, "-n", "60", "--temp", "0",
                            "-c", "128"], env=env, capture_output=True, text=True)
        assert p.returncode == 0, (f.name, p.stderr[-2000:])
        assert "Traceback" not in p.stderr
