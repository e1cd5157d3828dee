"""Tokenizer metadata (ggq.convert.vocab) against llama.cpp's own converter and the HF tokenizers.

Reference output comes from llama.cpp's ``convert_hf_to_gguf.py --vocab-only`` (the same
``set_vocab`` code a full conversion runs, without writing weights) on the same folder; every
``tokenizer.*`` key, its value type, its value and the key order must match. Tokenization checks
load a ggq-written vocab-only GGUF in llama.cpp (llama-cpp-python) and compare with transformers,
or with llama.cpp's own tokenizer test vectors in ``../shared/data/llama-vocab``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

from ggq.convert.pre_tokenizers import CHECK_TEXT, PRE_TOKENIZERS, check_hash
from ggq.convert.vocab import write_vocab
from ggq.errors import GGQError

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

VOCABS = REPO.parent / "shared" / "data" / "llama-vocab"
if "GGQ_SHARED" in os.environ:
    VOCABS = Path(os.environ["GGQ_SHARED"]) / "data" / "llama-vocab"


# ----------------------------------------------------------------------------- helpers


def write_ours(model_dir: Path, out: Path, arch: str | None = None) -> Path:
    """A GGUF with general.architecture and ggq's tokenizer keys only."""
    config = json.loads((model_dir / "config.json").read_text())
    if arch is None:
        arch = {"Qwen2ForCausalLM": "qwen2"}.get(config["architectures"][0], "llama")
    w = gguf.GGUFWriter(str(out), arch)
    write_vocab(w, model_dir, config, arch)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return out


def write_llamacpp(model_dir: Path, out: Path) -> Path:
    """llama.cpp's convert_hf_to_gguf.py --vocab-only on ``model_dir`` (its own gguf-py on the path)."""
    pytest.importorskip("torch")  # the converter imports it
    from llamacpp_ref import llama_cpp_source

    src = llama_cpp_source()
    env = dict(os.environ, PYTHONPATH=f"{src / 'gguf-py'}{os.pathsep}{src}", NO_LOCAL_GGUF="")
    r = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(out),
                        "--vocab-only"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def tokenizer_fields(path: Path) -> dict:
    """``tokenizer.*`` key -> (value types, value), in file order."""
    r = gguf.GGUFReader(str(path))
    return {k: (tuple(int(t) for t in f.types), f.contents())
            for k, f in r.fields.items() if k.startswith("tokenizer.")}


def assert_same_tokenizer(ours: Path, ref: Path) -> None:
    a, b = tokenizer_fields(ours), tokenizer_fields(ref)
    assert list(a) == list(b), "tokenizer keys (or their order) differ"
    for key in b:
        assert a[key][0] == b[key][0], f"{key}: value type {a[key][0]} != llama.cpp's {b[key][0]}"
        if a[key][1] != b[key][1]:
            va, vb = a[key][1], b[key][1]
            if isinstance(vb, list) and len(va) == len(vb):
                i = next(i for i in range(len(vb)) if va[i] != vb[i])
                pytest.fail(f"{key}[{i}]: {va[i]!r} != llama.cpp's {vb[i]!r}")
            pytest.fail(f"{key}: {str(va)[:200]!r} != llama.cpp's {str(vb)[:200]!r}")


def copy_files(src: Path, dst: Path, names: list[str]) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        if (src / n).exists():
            shutil.copy(src / n, dst / n)
    return dst


def edit_json(path: Path, fn) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    fn(data)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def load_vocab_only(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(path), vocab_only=True, verbose=False)


# ----------------------------------------------------------------------------- pre-tokenizer table


def test_pre_tokenizer_table_is_well_formed():
    assert len(PRE_TOKENIZERS) >= 90
    for digest, (name, ref) in PRE_TOKENIZERS.items():
        assert len(digest) == 64 and int(digest, 16) >= 0
        assert name and "/" in ref
    names = {n for n, _ in PRE_TOKENIZERS.values()}
    for common in ("llama-bpe", "smollm", "qwen2", "gpt-2", "deepseek-llm", "deepseek-coder", "falcon", "starcoder",
                   "refact", "command-r", "olmo", "dbrx", "jina-v2-en", "tekken", "gpt-4o", "qwen35"):
        assert common in names
    assert check_hash([1, 2, 3]) == __import__("hashlib").sha256(b"[1, 2, 3]").hexdigest()
    assert "\u200d" in CHECK_TEXT and "3333333" in CHECK_TEXT


# ----------------------------------------------------------------------------- errors (fast)


def test_missing_tokenizer_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 10}))
    w = gguf.GGUFWriter(None, "llama")
    with pytest.raises(GGQError) as e:
        write_vocab(w, tmp_path, {"vocab_size": 10}, "llama")
    msg = str(e.value)
    assert str(tmp_path) in msg and "no tokenizer" in msg and "\n" not in msg


def test_tekken_only_error(tmp_path):
    (tmp_path / "tekken.json").write_text("{}")
    with pytest.raises(GGQError, match="tekken.json"):
        write_vocab(gguf.GGUFWriter(None, "llama"), tmp_path, {}, "llama")


def test_corrupt_tokenizer_files(tmp_path, stories_dir):
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(GGQError, match="tokenizer.model"):
        write_vocab(gguf.GGUFWriter(None, "llama"), tmp_path, {"vocab_size": 512}, "llama")
    d = copy_files(stories_dir, tmp_path / "badjson", ["tokenizer.model"])
    (d / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(GGQError, match="tokenizer_config.json: invalid JSON"):
        write_vocab(gguf.GGUFWriter(None, "llama"), d, {"vocab_size": 512}, "llama")


# ----------------------------------------------------------------------------- SentencePiece


@pytest.mark.slow
def test_stories_matches_llamacpp(stories_dir, tmp_path):
    assert_same_tokenizer(write_ours(stories_dir, tmp_path / "ours.gguf"),
                          write_llamacpp(stories_dir, tmp_path / "ref.gguf"))


def _spm_added_tokens(d: Path) -> None:
    # vocab_size 32016: padding past the SentencePiece model and llama.cpp's CodeLlama fill-in-the-middle
    # ids; added_tokens.json, added_tokens_decoder (special, user-defined, looking special, out of range),
    # add_prefix_space and an inline chat template
    edit_json(d / "config.json", lambda c: c.update(vocab_size=32016))
    (d / "added_tokens.json").write_text(json.dumps({"<extra_1>": 512, "<extra_2>": 513, "<far>": 40000}))

    def tc(c):
        c["add_prefix_space"] = False
        c["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        c["added_tokens_decoder"] = {
            "1": {"content": "<s>", "special": True},
            "513": {"content": "<|user|>", "special": False},
            "514": {"content": "\u2581sp\u2581ace", "special": False},
            "515": {"content": "<unused0>", "special": False},
            "32010": {"content": "<EOT>", "special": True},
            "40001": {"content": "<too_far>", "special": True},
        }
        c["pad_token"] = "<unk>"
    edit_json(d / "tokenizer_config.json", tc)


@pytest.mark.slow
def test_spm_added_tokens_match_llamacpp(stories_dir, tmp_path):
    d = copy_files(stories_dir, tmp_path / "ckpt", ["config.json", "tokenizer.model", "tokenizer_config.json"])
    _spm_added_tokens(d)
    assert_same_tokenizer(write_ours(d, tmp_path / "ours.gguf"), write_llamacpp(d, tmp_path / "ref.gguf"))


# ----------------------------------------------------------------------------- BPE


@pytest.mark.slow
def test_smollm2_matches_llamacpp(smollm2_hf, tmp_path):
    ours = write_ours(smollm2_hf, tmp_path / "ours.gguf")
    assert tokenizer_fields(ours)["tokenizer.ggml.pre"][1] == "smollm"
    assert_same_tokenizer(ours, write_llamacpp(smollm2_hf, tmp_path / "ref.gguf"))


BPE_FILES = ["config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"]
IM_START = {"id": "<|im_start|>", "ids": [1], "tokens": ["<|im_start|>"]}
ENDOFTEXT = {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}


def _seq(x):
    return {"Sequence": {"id": x, "type_id": 0}}


def _tok(x):
    return {"SpecialToken": {"id": x, "type_id": 0}}


def _bpe_template_bos(d: Path) -> None:
    # ByteLevel + TemplateProcessing that prepends a bos: add_bos from the post-processor, add_eos from config
    edit_json(d / "config.json", lambda c: c.update(vocab_size=49160, bos_token_id=1))
    edit_json(d / "tokenizer.json", lambda t: t.update(post_processor={"type": "Sequence", "processors": [
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True},
        {"type": "TemplateProcessing", "single": [_tok("<|im_start|>"), _seq("A")],
         "pair": [_tok("<|im_start|>"), _seq("A"), _tok("<|im_start|>"), _seq("B")],
         "special_tokens": {"<|im_start|>": IM_START}}]}))
    edit_json(d / "tokenizer_config.json", lambda c: c.update(add_eos_token=True, add_bos_token=False))


def _bpe_template_eot(d: Path) -> None:
    # template ends with <|endoftext|> while eos is <|im_end|>: eos moves to eot; separator logic
    edit_json(d / "config.json", lambda c: c.update(vocab_size=49160))
    edit_json(d / "tokenizer.json", lambda t: t.update(post_processor={
        "type": "TemplateProcessing", "single": [_seq("A"), _tok("<|endoftext|>")],
        "pair": [_seq("A"), _tok("<|endoftext|>"), _seq("B"), _tok("<|endoftext|>")],
        "special_tokens": {"<|endoftext|>": ENDOFTEXT}}))


def _bpe_roberta_lowercase(d: Path) -> None:
    # RobertaProcessing, normalizers, chat_template.json instead of .jinja, string merges
    edit_json(d / "config.json", lambda c: c.update(vocab_size=49160))
    (d / "chat_template.jinja").unlink()
    (d / "chat_template.json").write_text(json.dumps({"chat_template": "{{ messages[0]['content'] }}"}))

    def tj(t):
        t["post_processor"] = {"type": "RobertaProcessing", "sep": ["<|im_end|>", 2], "cls": ["<|im_start|>", 1],
                               "trim_offsets": True, "add_prefix_space": False}
        t["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Lowercase"}, {"type": "StripAccents"}]}
        t["model"]["merges"] = [" ".join(p) for p in t["model"]["merges"]]
    edit_json(d / "tokenizer.json", tj)


def _bpe_added_tokens(d: Path) -> None:
    # qwen2 arch (no vocab_size rule) with config vocab_size past the tokenizer ([PAD] tokens); added
    # tokens past the model vocabulary: user-defined (normalized or not), looking special; extra templates.
    # (model_type stays "llama": with "qwen2" transformers swaps in its Qwen2Tokenizer pre-tokenizer)
    edit_json(d / "config.json", lambda c: c.update(architectures=["Qwen2ForCausalLM"], vocab_size=49160))
    extra = [("\u2581custom\u2581tok", False, False), ("<pad>", False, False), ("<|tool|>", False, False),
             ("hello world", True, False), ("<sep>", False, True)]

    def tj(t):
        for i, (content, normalized, special) in enumerate(extra):
            t["added_tokens"].append({"id": 49152 + i, "content": content, "single_word": False, "lstrip": False,
                                      "rstrip": False, "normalized": normalized, "special": special})
    edit_json(d / "tokenizer.json", tj)
    edit_json(d / "tokenizer_config.json", lambda c: c.update(sep_token="<sep>", mask_token="<pad>"))
    (d / "additional_chat_templates").mkdir()
    (d / "additional_chat_templates" / "tool_use.jinja").write_text("{{ tools }}")


@pytest.mark.slow
def test_bpe_added_tokens_match_llamacpp(smollm2_hf, tmp_path):
    d = copy_files(smollm2_hf, tmp_path / "ckpt", BPE_FILES)
    _bpe_added_tokens(d)
    assert_same_tokenizer(write_ours(d, tmp_path / "ours.gguf"), write_llamacpp(d, tmp_path / "ref.gguf"))


_SPECIAL_VOCAB_REF = """
import sys, gguf
w = gguf.GGUFWriter(sys.argv[2], "llama")
gguf.SpecialVocab(sys.argv[1], load_merges=True).add_to_gguf(w, quiet=True)
w.write_header_to_file(); w.write_kv_data_to_file(); w.close()
"""


@pytest.mark.slow
@pytest.mark.parametrize("variant", [_bpe_template_bos, _bpe_template_eot, _bpe_roberta_lowercase],
                         ids=lambda f: f.__name__[1:])
def test_special_vocab_matches_llamacpp(smollm2_hf, tmp_path, variant):
    """Post-processor, normalizer and chat-template handling against the SpecialVocab of llama.cpp's gguf-py.

    These variants change what the tokenizer makes of the pre-tokenizer check text, so llama.cpp's
    whole converter would refuse them (unknown hash); the special vocabulary is compared on its own.
    """
    from llamacpp_ref import llama_cpp_source

    from ggq.convert.vocab import SpecialVocab

    d = copy_files(smollm2_hf, tmp_path / "ckpt", BPE_FILES)
    variant(d)
    src = llama_cpp_source()
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"), NO_LOCAL_GGUF="")
    r = subprocess.run([sys.executable, "-c", _SPECIAL_VOCAB_REF, str(d), str(tmp_path / "ref.gguf")], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    w = gguf.GGUFWriter(str(tmp_path / "ours.gguf"), "llama")
    SpecialVocab(d, None, load_merges=True).add_to(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    assert_same_tokenizer(tmp_path / "ours.gguf", tmp_path / "ref.gguf")


@pytest.mark.slow
def test_unknown_pre_tokenizer(smollm2_hf, tmp_path, monkeypatch):
    d = copy_files(smollm2_hf, tmp_path / "ckpt", BPE_FILES)
    edit_json(d / "tokenizer.json", lambda t: t.update(pre_tokenizer={"type": "Whitespace"}))
    config = json.loads((d / "config.json").read_text())
    monkeypatch.delenv("GGQ_TOKENIZER_PRE", raising=False)
    with pytest.raises(GGQError, match="pre-tokenizer not known") as e:
        write_vocab(gguf.GGUFWriter(None, "llama"), d, config, "llama")
    assert "tokenizer.json" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv("GGQ_TOKENIZER_PRE", "llama-bpe")
    w = gguf.GGUFWriter(None, "llama")
    write_vocab(w, d, config, "llama")
    assert w.kv_data[0]["tokenizer.ggml.pre"].value == "llama-bpe"


# ----------------------------------------------------------------------------- tokenization through llama.cpp


TEXTS = [
    "Once upon a time, there was a little girl named Lily.",
    "Hello world!\n\nTabs\tand  double  spaces, émojis 🦙 and 3333 33.3",
    "I've been 'told he's there, 'RE you sure? нещо на Български 我想在apple工作",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.mark.slow
@pytest.mark.parametrize("which", ["stories", "smollm2"])
def test_tokenizes_like_checkpoint(which, request, tmp_path):
    """llama.cpp on a ggq-written vocab tokenizes like the checkpoint's own HF tokenizer.

    Strings start without a space: there llama.cpp's SentencePiece path and transformers' legacy
    Llama tokenizer are known to differ, whoever wrote the GGUF.
    """
    transformers = pytest.importorskip("transformers")
    d = request.getfixturevalue("stories_dir" if which == "stories" else "smollm2_hf")
    llm = load_vocab_only(write_ours(d, tmp_path / "v.gguf"))
    hf = transformers.AutoTokenizer.from_pretrained(str(d))
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == hf.encode(text), text
        plain = hf(text, add_special_tokens=True, split_special_tokens=True)["input_ids"]
        assert llm.tokenize(text.encode(), add_bos=True, special=False) == plain, text


@pytest.fixture(scope="session")
def hf_from_vocab_gguf(tmp_path_factory):
    """Build a Hugging Face tokenizer folder from one of llama.cpp's vocab-only GGUFs (transformers' reader)."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf-vocab")

    def build(name: str, hf_arch: str) -> Path:
        src = VOCABS / f"ggml-vocab-{name}.gguf"
        if not src.exists():
            pytest.skip(f"{src} not found")
        out = root / name
        if not out.exists():
            tok = transformers.AutoTokenizer.from_pretrained(str(VOCABS), gguf_file=src.name)
            tok.save_pretrained(str(out))
            n = len(gguf.GGUFReader(str(src)).fields["tokenizer.ggml.tokens"].data)
            (out / "config.json").write_text(json.dumps({
                "architectures": [hf_arch], "model_type": "llama", "vocab_size": n, "hidden_size": 64,
                "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
                "max_position_embeddings": 512, "rms_norm_eps": 1e-5}))
        return out
    return build


@pytest.mark.slow
@pytest.mark.parametrize("name,hf_arch,pre", [("gpt-2", "LlamaForCausalLM", "gpt-2")])
def test_llama_vocab_vectors(hf_from_vocab_gguf, tmp_path, name, hf_arch, pre):
    """Identify the pre-tokenizer from a rebuilt HF tokenizer, then pass llama.cpp's own test vectors."""
    d = hf_from_vocab_gguf(name, hf_arch)
    out = write_ours(d, tmp_path / "v.gguf")
    assert tokenizer_fields(out)["tokenizer.ggml.pre"][1] == pre
    texts = (VOCABS / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    expected = (VOCABS / f"ggml-vocab-{name}.gguf.out").read_text().split("\n")
    llm = load_vocab_only(out)
    for text, ids in zip(texts, expected):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == [int(x) for x in ids.split()], repr(text)


@pytest.mark.slow
def test_hf_llama_tokenizer_json_matches_llamacpp(hf_from_vocab_gguf, tmp_path):
    """A Llama SentencePiece vocab stored only as a byte-fallback BPE tokenizer.json (llama.cpp's LlamaHfVocab)."""
    d = hf_from_vocab_gguf("llama-spm", "LlamaForCausalLM")
    assert not (d / "tokenizer.model").exists()
    ours = write_ours(d, tmp_path / "ours.gguf")
    assert tokenizer_fields(ours)["tokenizer.ggml.model"][1] == "llama"
    assert_same_tokenizer(ours, write_llamacpp(d, tmp_path / "ref.gguf"))
