"""`ggq convert` on real checkpoints, checked against llama.cpp and transformers."""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "tools"))

from ggq.convert.pipeline import convert  # noqa: E402

BASIC = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


@pytest.fixture(scope="module")
def stories_files(stories_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("stories")
    return {t: convert(stories_dir, out / f"stories-{t}.gguf", qtype=t, progress=False) for t in BASIC}


def _kv(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def test_metadata_and_tensors_match_llama_cpp_converter(stories_dir, stories_files, cache_dir):
    """Our F32/F16/Q8_0 files hold the same hyperparameters and byte-identical tensors as
    llama.cpp's convert_hf_to_gguf.py output for the same checkpoint."""
    llamacpp_ref = pytest.importorskip("llamacpp_ref")
    pytest.importorskip("torch")
    for t in ["F32", "F16", "Q8_0"]:
        ref = cache_dir / f"stories-llamacpp-{t}.gguf"
        if not ref.exists():
            llamacpp_ref.convert_hf(stories_dir, ref, t.lower())
        ours_kv, ref_kv = _kv(stories_files[t]), _kv(ref)
        for k, v in ref_kv.items():
            if k.startswith("general.") and k not in ("general.architecture", "general.file_type", "general.quantization_version"):
                continue
            assert k in ours_kv, f"{t}: missing {k}"
            if isinstance(v, float):
                assert ours_kv[k] == pytest.approx(v, rel=1e-6), k
            else:
                assert ours_kv[k] == v, k
        ours = {x.name: x for x in gguf.GGUFReader(stories_files[t]).tensors}
        theirs = {x.name: x for x in gguf.GGUFReader(ref).tensors}
        assert set(ours) == set(theirs)
        for name, x in theirs.items():
            y = ours[name]
            assert y.tensor_type == x.tensor_type, (t, name)
            assert list(y.shape) == list(x.shape), (t, name)
            assert bytes(y.data.tobytes()) == bytes(x.data.tobytes()), (t, name)


@pytest.mark.slow
@pytest.mark.parametrize("t", BASIC)
def test_stories_loads_and_generates_in_llama_cpp(stories_files, t):
    llamacpp_ref = pytest.importorskip("llamacpp_ref")
    pytest.importorskip("llama_cpp")
    llm = llamacpp_ref.load_llama(stories_files[t], n_ctx=128)
    toks = llm.tokenize(b"Once upon a time", add_bos=True)
    out = llamacpp_ref.greedy(llm, toks, 8)
    assert len(out) == 8 and all(0 <= x < 512 for x in out)


@pytest.mark.slow
@pytest.mark.parametrize("t", ["F32", "F16", "Q8_0"])
def test_stories_greedy_equals_transformers(stories_dir, stories_files, t):
    llamacpp_ref = pytest.importorskip("llamacpp_ref")
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(stories_dir)
    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    ids = tok("Once upon a time", return_tensors="pt").input_ids
    with torch.no_grad():
        hf = model.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
    llm = llamacpp_ref.load_llama(stories_files[t], n_ctx=128)
    toks = llm.tokenize(b"Once upon a time", add_bos=True)
    assert toks == ids[0].tolist()
    assert llamacpp_ref.greedy(llm, toks, 24) == hf


@pytest.fixture(scope="module")
def smollm2_q8(smollm2_hf, tmp_path_factory):
    return convert(smollm2_hf, tmp_path_factory.mktemp("smol") / "smollm2-Q8_0.gguf", qtype="Q8_0", progress=False)


PROMPTS = ["The capital of France is", "def fibonacci(n):", "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
           "Once upon a time, there was a"]


@pytest.mark.slow
def test_smollm2_q8_logits_match_transformers(smollm2_hf, smollm2_q8, cache_dir):
    """llama.cpp on our Q8_0 file against transformers.

    Two references: transformers on the original float32 checkpoint, and transformers reading our
    Q8_0 file itself through its own GGUF loader (an independent reader of our bytes: this isolates
    conversion from the Q8_0 rounding). Measured here: >= 0.9991 against the latter; against the
    float32 model llama.cpp's own converter output gives the same 0.9988..0.9994 as ours (its CPU
    kernels also round activations to Q8_0), and our tensors are byte-identical to it.
    """
    llamacpp_ref = pytest.importorskip("llamacpp_ref")
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    model = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32)
    from_gguf = AutoModelForCausalLM.from_pretrained(smollm2_q8.parent, gguf_file=smollm2_q8.name, dtype=torch.float32)
    llm = llamacpp_ref.load_llama(smollm2_q8, n_ctx=256)
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        with torch.no_grad():
            hf = model(torch.tensor([ids])).logits[0, -1].numpy()
            hf_q = from_gguf(torch.tensor([ids])).logits[0, -1].numpy()
        ours = llamacpp_ref.next_logits(llm, ids)
        assert np.corrcoef(hf_q, ours)[0, 1] >= 0.999, prompt
        assert np.corrcoef(hf, ours)[0, 1] >= 0.998, prompt
        assert int(np.argmax(hf)) == int(np.argmax(ours)), prompt

    ref = cache_dir / "smollm2-llamacpp-Q8_0.gguf"
    if not ref.exists():
        llamacpp_ref.convert_hf(smollm2_hf, ref, "q8_0")
    theirs = {x.name: x for x in gguf.GGUFReader(ref).tensors}
    for x in gguf.GGUFReader(smollm2_q8).tensors:
        assert x.tensor_type == theirs[x.name].tensor_type, x.name
        assert bytes(x.data.tobytes()) == bytes(theirs[x.name].data.tobytes()), x.name


@pytest.mark.slow
def test_smollm2_tokenizer_metadata_tokenizes_like_checkpoint(smollm2_hf, smollm2_q8):
    llamacpp_ref = pytest.importorskip("llamacpp_ref")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    llm = llamacpp_ref.load_llama(smollm2_q8, vocab_only=True)
    texts = ["Hello world", "  leading spaces and\ttabs\nnewlines", "naïve café 東京 🙂", "x = 3.14159 * r**2",
             "<|im_start|>user\nHi<|im_end|>"]
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text, add_special_tokens=False).input_ids, text


def test_info_reads_llama_cpp_file(smollm2_gguf):
    from ggq.format.info import format_info

    text = format_info(smollm2_gguf)
    assert "general.architecture = 'llama'" in text
    assert "blk.0.attn_q.weight" in text and "Q4_1" in text
    assert "bits per weight:" in text
