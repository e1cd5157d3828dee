"""The runtime's forward pass against llama.cpp (llama-cpp-python) on the same GGUF files, and
the loader's errors on malformed files.

Files: stories260K converted by llama.cpp's converter (f32) and quantized by llama.cpp's quantizer
to several types (its 172-wide FFN forces fallbacks for ffn_down), the llama.cpp-written SmolLM2
Q4_1 fixture, and SmolLM2 Q8_0 / Q4_K_M quantized by llama.cpp from an f16 conversion of the HF
fixture. Criteria (issue 4): next-token logits correlate >= 0.999 with llama.cpp's, and the greedy
token is the same over 64 steps wherever llama.cpp's top-2 margin exceeds 0.1. For quantized
SmolLM2 files the per-token bar is replaced by a comparison with exact logits (see
:func:`compare_three_way`: llama.cpp's own rounding noise is above 0.001 there). llama.cpp runs
with an F32 KV cache (ggq's cache is float32).
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from ggq.errors import GGQError
from ggq.runtime.model import Model

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

# every type the runtime runs, as file types (the K-quants as llama.cpp's _M mixes)
ALL_FILE_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_M",
                  "Q5_K_M", "Q6_K"]
STORIES_TYPES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K"]
SMOL_QUANT_TYPES = [t for t in ALL_FILE_TYPES if t != "F16"]


def _llamacpp_converted(src: Path, cache_dir: Path, name: str, outtype: str) -> Path:
    """``src`` (HF folder) converted by llama.cpp's converter, cached as runtime/``name``."""
    pytest.importorskip("llama_cpp")
    from llamacpp_ref import convert_hf

    out = cache_dir / "runtime" / name
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_hf(src, out.with_suffix(".part"), outtype, cache=cache_dir)
        out.with_suffix(".part").rename(out)
    return out


def _llama(path: Path, kv_type: str = "f32"):
    """llama.cpp (llama-cpp-python) on ``path``: 256 context, 2 threads, every position's logits,
    a ``kv_type`` (f32 or f16) KV cache."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ggml_type = {"f32": 0, "f16": 1}[kv_type]
    return llama_cpp.Llama(str(path), n_ctx=256, n_threads=2, n_batch=256, logits_all=True, verbose=False,
                           type_k=ggml_type, type_v=ggml_type)


@pytest.fixture(scope="session")
def stories_f32(stories_dir, cache_dir):
    return _llamacpp_converted(stories_dir, cache_dir, "stories260K-F32.gguf", "f32")


def _quantized(src: Path, ftype: str, stem: str) -> Path:
    from llamacpp_ref import quantize_file

    out = src.parent / f"{stem}-{ftype}.gguf"
    if not out.exists():
        part = out.with_suffix(".part")
        quantize_file(src, part, ftype)
        part.rename(out)
    return out


@pytest.fixture(scope="session")
def smollm2_f16(smollm2_hf, cache_dir):
    return _llamacpp_converted(smollm2_hf, cache_dir, "smollm2-F16.gguf", "f16")


def compare_with_llama_cpp(path: Path, prompt: list[int], steps: int = 64, min_corr: float = 0.999,
                           mean_corr: float = 0.999, kv_type: str = "f32", max_mismatch: int = 0):
    """Prompt logits (every position) and ``steps`` greedy decode steps, ggq vs llama.cpp, both
    with a ``kv_type`` (f32 or f16) KV cache; at most ``max_mismatch`` greedy tokens differ where
    llama.cpp's top-2 margin exceeds 0.1."""
    llm = _llama(path, kv_type)
    model = Model.load(path, n_ctx=256, n_threads=2, kv_type=kv_type)
    llm.eval(prompt)
    ref = np.array(llm.scores[:len(prompt)], dtype=np.float64)
    got = model.eval(prompt, all_logits=True)
    assert got.shape == ref.shape
    corrs = [np.corrcoef(got[i], ref[i])[0, 1] for i in range(len(prompt))]
    checked = mismatched = 0
    r, g = ref[-1], got[-1]
    for step in range(steps):
        top2 = np.sort(r)[-2:]
        tok = int(np.argmax(r))
        if top2[1] - top2[0] > 0.1:
            checked += 1
            mismatched += int(np.argmax(g) != tok)
        llm.eval([tok])
        r = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        g = model.eval([tok])
        corrs.append(np.corrcoef(g, r)[0, 1])
    assert model.n_past == len(prompt) + steps
    assert mismatched <= max_mismatch, f"{path.name}: {mismatched} of {checked} confident greedy tokens differ"
    msg = f"{path.name}: logit correlation min {min(corrs):.5f} mean {np.mean(corrs):.5f}"
    assert min(corrs) >= min_corr and np.mean(corrs) >= mean_corr, msg
    return corrs


@pytest.mark.slow
@pytest.mark.parametrize("ftype", ["F32"] + STORIES_TYPES)
def test_stories260k_matches_llama_cpp(stories_f32, ftype):
    path = stories_f32 if ftype == "F32" else _quantized(stories_f32, ftype, "stories260K")
    prompt = [1] + list(np.random.RandomState(0).randint(3, 500, 20))
    # Quantized files: both engines round the activations to 8 bits, so their logits differ by up
    # to ~0.3 on this model (correlation > 0.9999); measured once, a step where llama.cpp's margin
    # was 0.118 and ggq's top two were 0.003 apart the other way. One such flip is noise.
    compare_with_llama_cpp(path, prompt, max_mismatch=0 if ftype in ("F32", "F16", "BF16") else 1)


@pytest.fixture(scope="session")
def smol_prompt(smollm2_gguf):
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(smollm2_gguf), vocab_only=True, verbose=False)
    return llm.tokenize(b"<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
                        add_bos=False, special=True)


def _corrs(xs, ys) -> np.ndarray:
    return np.array([np.corrcoef(x, y)[0, 1] for x, y in zip(xs, ys)])


def compare_three_way(path: Path, prompt: list[int], tmp_path: Path, steps: int = 64):
    """ggq and llama.cpp on a quantized file, both against llama.cpp on an F32 copy of the same
    weights (dequantized by llama.cpp's own quantizer) as the exact reference.

    Both engines round activations to 8 bits before their integer dot products, and on SmolLM2 a
    rounding difference in one layer flips roundings in the next, so after a few layers the two
    engines' rounding noises are independent: llama.cpp itself is only 0.992-0.998 (per-token
    minimum) from exact arithmetic on its own weights; each engine's logits carry a rounding
    noise of 0.11-0.17 (standard deviation, measured) with heavy tails: llama.cpp once chose a
    token by 0.105 that is 0.35 behind in exact arithmetic, and on Q3_K_M a rare event moved
    ggq's gap between two tokens by 1.2. A per-token bar of 0.999 between the two engines, or
    the same greedy token wherever one of them leads by 0.1, is therefore below their noise
    floor. What is asserted instead, over the prompt and ``steps`` greedy steps of llama.cpp:
    (1) ggq departs from the exact greedy token (where that leads by > 0.1) at most 3 times more
    often than llama.cpp does: such departures are rare events decided by the rounding noise
    (0-2 per 64 steps for either engine; a one-ulp change in ggq's softmax moved the Q3_K_M
    count from 1 to 2), so this only bounds gross failure, e.g. a wrong rope gives dozens;
    (2) ggq is at least as close to the exact logits as llama.cpp is (same or lower error: mean
    within 2e-4; the per-token minimum, an extreme value of the noise, within 1e-3); (3) ggq
    and llama.cpp have a mean correlation >= 0.998; (4) ggq on the F32 copy equals the exact
    reference (>= 0.9999)."""
    pytest.importorskip("llama_cpp")
    from llamacpp_ref import quantize_file

    f32 = quantize_file(path, tmp_path / f"{path.stem}-F32.gguf", "F32", allow_requantize=True)
    try:
        return _three_way(path, f32, prompt, steps)
    finally:
        f32.unlink()


def _three_way(path, f32, prompt, steps):
    llm = _llama(path)
    llm.eval(prompt)
    ref = [np.array(llm.scores[i], np.float64) for i in range(len(prompt))]
    toks = []
    for _ in range(steps):
        toks.append(int(np.argmax(ref[-1])))
        llm.eval([toks[-1]])
        ref.append(np.array(llm.scores[llm.n_tokens - 1], np.float64))
    del llm
    ref = ref[:-1]  # logits that chose toks (the prompt's, then one per step)

    def ggq(p):
        model = Model.load(p, n_ctx=256, n_threads=2)
        out = list(model.eval(prompt, all_logits=True)) + [model.eval([t]) for t in toks[:-1]]
        assert model.n_past == len(prompt) + steps - 1
        return out

    def llama_logits(p):
        llm = _llama(p)
        llm.eval(prompt + toks[:-1])
        return [np.array(llm.scores[i], np.float64) for i in range(len(prompt) + steps - 1)]

    got = ggq(path)
    exact = llama_logits(f32)
    got_f32 = ggq(f32)
    last = len(prompt) - 1

    def top(v):
        o = np.argsort(v)
        return int(o[-1]), float(v[o[-1]] - v[o[-2]])

    decided = llama_off = ggq_off = 0
    for i in range(steps):
        e, e_margin = top(exact[last + i])
        if e_margin > 0.1:  # the exact logits are decided: does each engine follow them?
            decided += 1
            llama_off += int(toks[i] != e)
            ggq_off += int(top(got[last + i])[0] != e)
    c_llama, c_ggq, c_both = _corrs(ref, exact), _corrs(got, exact), _corrs(got, ref)
    msg = (f"{path.name}: correlation with exact logits, min/mean: llama.cpp {c_llama.min():.5f}/"
           f"{c_llama.mean():.5f}, ggq {c_ggq.min():.5f}/{c_ggq.mean():.5f}; ggq vs llama.cpp "
           f"{c_both.min():.5f}/{c_both.mean():.5f}; greedy tokens off the exact one (of {decided} with "
           f"margin > 0.1): llama.cpp {llama_off}, ggq {ggq_off}")
    print(msg)
    assert ggq_off <= llama_off + 3, msg
    assert c_ggq.min() >= c_llama.min() - 1e-3 and c_ggq.mean() >= c_llama.mean() - 2e-4, msg
    assert c_both.mean() >= 0.998, msg
    assert _corrs(got_f32, exact).min() >= 0.9999, f"{path.name}: ggq on the F32 copy differs from llama.cpp"
    return c_llama, c_ggq, c_both


@pytest.mark.slow
def test_smollm2_q4_1_fixture_matches_llama_cpp(smollm2_gguf, smol_prompt, tmp_path):
    compare_three_way(smollm2_gguf, smol_prompt, tmp_path)


@pytest.mark.slow
def test_smollm2_f16_matches_llama_cpp(smollm2_f16, smol_prompt):
    compare_with_llama_cpp(smollm2_f16, smol_prompt, 64, 0.9999, 0.9999)


@pytest.mark.slow
@pytest.mark.parametrize("ftype", SMOL_QUANT_TYPES)
def test_smollm2_llama_cpp_quantized_matches(smollm2_f16, smol_prompt, ftype, tmp_path):
    compare_three_way(_quantized(smollm2_f16, ftype, "smollm2"), smol_prompt, tmp_path)


@pytest.fixture(scope="session")
def ggq_files(cache_dir):
    """ggq-written files, made once per session: ``get(kind, ftype, make)`` -> path."""
    made = {}

    def get(kind: str, ftype: str, make) -> Path:
        out = cache_dir / "runtime" / f"ggq-{kind}-{ftype}.gguf"
        if (kind, ftype) not in made:
            out.parent.mkdir(parents=True, exist_ok=True)
            if out.exists():
                out.unlink()  # always made by the code under test
            make(out)
            made[kind, ftype] = out
        return made[kind, ftype]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("ftype", ALL_FILE_TYPES)
def test_stories260k_ggq_written_matches_llama_cpp(stories_dir, ggq_files, ftype):
    """Files written by ``ggq convert`` run in ggq like llama.cpp runs them."""
    from ggq.convert.pipeline import convert

    path = ggq_files("stories260K", ftype, lambda out: convert(stories_dir, out, ftype, progress=False))
    prompt = [1] + list(np.random.RandomState(0).randint(3, 500, 20))
    # Quantized files: both engines round the activations to 8 bits, so their logits differ by up
    # to ~0.3 on this model (correlation > 0.9999); measured once, a step where llama.cpp's margin
    # was 0.118 and ggq's top two were 0.003 apart the other way. One such flip is noise.
    compare_with_llama_cpp(path, prompt, max_mismatch=0 if ftype in ("F32", "F16", "BF16") else 1)


@pytest.mark.slow
@pytest.mark.parametrize("ftype", ALL_FILE_TYPES)
def test_smollm2_ggq_written_matches_llama_cpp(smollm2_hf, ggq_files, smol_prompt, ftype, tmp_path):
    """SmolLM2 converted by ggq to F16, then requantized by ggq (``ggq quantize``) to every type."""
    from ggq.convert.pipeline import convert
    from ggq.convert.requantize import requantize

    f16 = ggq_files("smollm2", "F16", lambda out: convert(smollm2_hf, out, "F16", progress=False))
    if ftype == "F16":
        compare_with_llama_cpp(f16, smol_prompt, 64, 0.9999, 0.9999)
        return
    path = ggq_files("smollm2", ftype, lambda out: requantize(f16, out, ftype, progress=False))
    compare_three_way(path, smol_prompt, tmp_path)


@pytest.mark.slow
def test_f16_kv_cache_matches_llama_cpp(stories_f32, smollm2_f16, smol_prompt):
    """An fp16 KV cache (llama.cpp's default), against llama.cpp with its fp16 cache."""
    model = Model.load(stories_f32, n_ctx=64, kv_type="f16")
    assert model._kc.dtype == np.uint16 and model.kv_cache_bytes == Model.load(stories_f32, n_ctx=64).kv_cache_bytes // 2
    prompt = [1] + list(np.random.RandomState(0).randint(3, 500, 20))
    compare_with_llama_cpp(stories_f32, prompt, kv_type="f16")
    compare_with_llama_cpp(smollm2_f16, smol_prompt, 64, 0.9999, 0.9999, kv_type="f16")
    with pytest.raises(GGQError, match="unknown KV cache type"):
        Model.load(stories_f32, kv_type="q8_0")


@pytest.mark.slow
def test_kv_cache_reuse_equals_full_prompt(stories_f32):
    """eval in pieces (and after truncate) gives the logits of one full-prompt eval."""
    path = _quantized(stories_f32, "Q8_0", "stories260K")
    toks = [1, 45, 300, 12, 99, 7, 410, 256]
    m = Model.load(path, n_ctx=64)
    full = m.eval(toks, all_logits=True)
    m.reset()
    m.eval(toks[:3])
    part = m.eval(toks[3:], all_logits=True)
    np.testing.assert_allclose(part, full[3:], atol=1e-3)
    m.truncate(5)
    np.testing.assert_allclose(m.eval(toks[5:]), full[-1], atol=1e-3)
    assert m.n_past == len(toks)
    with pytest.raises(GGQError):
        m.eval([10] * 100)  # overflows n_ctx
    with pytest.raises(GGQError):
        m.eval([m.n_vocab])


@pytest.mark.slow
@pytest.mark.parametrize("which", ["smollm2-Q4_1", "stories-F32"])
def test_decode_batch_equals_eval_per_sequence(which, smollm2_gguf, stories_f32):
    """``Model.decode_batch``: one token for each of several sequences at different positions in one
    forward call gives, row by row, the logits of ``Model.eval`` of that token on that sequence
    alone (a separate single-sequence Model fed the same prompt), for two steps; a sequence left
    out of the batch is untouched. SmolLM2 Q4_1 (integer kernels, f16 cache): bit for bit, since
    each row's integer dot products, scales and attention do not depend on the other rows.
    stories260K F32 (float kernels, f32 cache): within 1e-5 of the largest logit, the float32
    rounding of the single-row kernel summing in another order than the batch kernel's tiles
    (measured: about 1e-7)."""
    path, kv = (smollm2_gguf, "f16") if which == "smollm2-Q4_1" else (stories_f32, "f32")
    n_ctx = 192
    m = Model.load(path, n_ctx=n_ctx, kv_type=kv, n_seq=5)
    one = Model.load(path, n_ctx=n_ctx, kv_type=kv)
    assert m.kv_cache_bytes == 5 * one.kv_cache_bytes and m.n_seq == 5
    rs = np.random.RandomState(3)
    # prompts ending inside a K tile, right at a tile edge (64), past two tiles, a single token
    prompts = [rs.randint(1, m.n_vocab, n).tolist() for n in (3, 64, 130, 1, 9)]
    for i, p in enumerate(prompts):
        m.eval(p, seq=i)
    steps = [rs.randint(1, m.n_vocab, 4).tolist() for _ in range(2)]
    seqs = [2, 0, 3, 1]  # not in order; sequence 4 sits out
    got = [m.decode_batch(steps[k], seqs) for k in range(2)]
    assert [m.past(i) for i in range(5)] == [len(p) + (2 if i < 4 else 0) for i, p in enumerate(prompts)]
    for j, s in enumerate(seqs):
        one.reset()
        one.eval(prompts[s])
        for k in range(2):
            ref = one.eval([steps[k][j]])
            if which == "smollm2-Q4_1":
                np.testing.assert_array_equal(got[k][j], ref)
            else:
                np.testing.assert_allclose(got[k][j], ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    one.reset()
    one.eval(prompts[4])
    np.testing.assert_array_equal(m.seq(4).eval([7]), one.eval([7]))  # sequence 4 sat out: as if alone
    with pytest.raises(GGQError, match="distinct"):
        m.decode_batch([1, 2], [0, 0])
    with pytest.raises(GGQError, match="distinct"):
        m.decode_batch([1], [5])
    with pytest.raises(GGQError, match="out of range"):
        m.decode_batch([m.n_vocab], [0])
    m.eval([5] * (n_ctx - m.past(2)), seq=2)  # sequence 2 full
    before = m.past(0)
    with pytest.raises(GGQError, match="context full"):
        m.decode_batch([1, 2], [0, 2])
    assert m.past(0) == before  # nothing appended


# ---------------------------------------------------------------- malformed files

def _tiny_gguf(path: Path, qtype_name: str = "F32") -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.ones((8, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tensor_info_pos(data: bytes, name: bytes) -> int:
    """Byte position just after the tensor name in the tensor-info table."""
    i = data.index(struct.pack("<Q", len(name)) + name)
    return i + 8 + len(name)


def test_malformed_files_give_clear_errors(tmp_path):
    good = _tiny_gguf(tmp_path / "good.gguf")
    data = good.read_bytes()
    from ggq.runtime.loader import open_gguf

    assert open_gguf(good).tensors["token_embd.weight"].ne == (32, 8)

    def err(content: bytes, fname: str) -> str:
        p = tmp_path / fname
        p.write_bytes(content)
        with pytest.raises(GGQError) as e:
            Model.load(p)
        msg = str(e.value)
        assert fname in msg and "\n" not in msg
        return msg

    assert "no such file" in str(pytest.raises(GGQError, Model.load, tmp_path / "missing.gguf").value)
    assert "magic" in err(b"GGML" + data[4:], "magic.gguf")
    assert "truncated" in err(data[:40], "header.gguf")
    assert "outside the file" in err(data[:-100], "data.gguf")
    pos = _tensor_info_pos(data, b"token_embd.weight")
    n_dims = struct.unpack_from("<I", data, pos)[0]
    tpos = pos + 4 + 8 * n_dims
    bad_type = data[:tpos] + struct.pack("<I", 250) + data[tpos + 4:]
    assert "unknown type" in err(bad_type, "type.gguf")
    bad_off = data[:tpos + 4] + struct.pack("<Q", 1 << 40) + data[tpos + 12:]
    assert "outside the file" in err(bad_off, "offset.gguf")
    mis = data[:tpos + 4] + struct.pack("<Q", 3) + data[tpos + 12:]
    assert "aligned" in err(mis, "align.gguf")
    # a valid file of an unsupported architecture
    arch = data.replace(b"llama", b"llamb", 1)
    assert "not supported" in err(arch, "arch.gguf")
    # a structurally valid llama file lacking the model's tensors
    assert "missing" in err(data, "incomplete.gguf")


# ---------------------------------------------------------------- qwen2 (NEOX rope, q/k/v biases)

def _write_qwen2_gguf(out: Path, vocab_src: Path):
    """A tiny random Qwen2 (transformers) written as an F32 GGUF with stories260K's vocabulary;
    returns (path, transformers model). Tensor names/metadata as llama.cpp's converter writes."""
    torch = pytest.importorskip("torch")
    import gguf
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from ggq.runtime.loader import open_gguf

    src = open_gguf(vocab_src)
    n_vocab = len(src.metadata["tokenizer.ggml.tokens"])
    cfg = Qwen2Config(vocab_size=n_vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0,
                      rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)
    w = gguf.GGUFWriter(str(out), "qwen2")
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(96)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    for k, v in src.metadata.items():
        if k.startswith("tokenizer.ggml.") and not isinstance(v, list):
            if isinstance(v, str):
                w.add_string(k, v)
            elif isinstance(v, bool):
                w.add_bool(k, v)
            elif isinstance(v, int):
                w.add_uint32(k, v)
    w.add_token_list(src.metadata["tokenizer.ggml.tokens"])
    w.add_token_scores(src.metadata["tokenizer.ggml.scores"])
    w.add_token_types(src.metadata["tokenizer.ggml.token_type"])
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    sub = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for n, p in hf.state_dict().items():
        if n in names:
            gname = names[n]
        else:
            _, _, i, rest = n.split(".", 3)
            mod, kind = rest.rsplit(".", 1)
            gname = f"blk.{i}.{sub[mod]}.{kind}"
        w.add_tensor(gname, p.detach().float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out, hf


@pytest.mark.slow
def test_qwen2_matches_transformers_and_llama_cpp(stories_f32, tmp_path):
    torch = pytest.importorskip("torch")
    path, hf = _write_qwen2_gguf(tmp_path / "qwen2-tiny-F32.gguf", stories_f32)
    toks = [1] + list(np.random.RandomState(3).randint(3, 500, 15))
    with torch.no_grad():
        ref = hf(torch.tensor([toks])).logits[0].double().numpy()
    got = Model.load(path).eval(toks, all_logits=True)
    assert Model.load(path).arch == "qwen2"
    for i in range(len(toks)):
        assert np.corrcoef(got[i], ref[i])[0, 1] > 0.99999
    np.testing.assert_allclose(got, ref, atol=2e-3 * np.abs(ref).max())
    compare_with_llama_cpp(path, toks, steps=16)


def _with_metadata(src: Path, out: Path, kv: dict) -> Path:
    """A copy of the GGUF ``src`` with the key/values ``kv`` (name -> (GGUFValueType, value))
    added or replaced (gguf-py's gguf_new_metadata)."""
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(src)
    arch = reader.get_field("general.architecture").contents()
    writer = gguf.GGUFWriter(str(out), arch)
    copy_with_new_metadata(reader, writer, {k: MetadataDetails(t, v) for k, (t, v) in kv.items()}, [])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("scaling", ["yarn", "linear", "yarn-qwen2"])
def test_rope_scaling_matches_llama_cpp(stories_f32, tmp_path, scaling):
    """YaRN (factor 4 over an original context of 64) and linear (factor 2) RoPE scaling, NORM
    (llama) and NEOX (qwen2) rope, over positions up to 140: logits as llama.cpp's."""
    import gguf

    V = gguf.GGUFValueType
    if scaling == "yarn-qwen2":
        pytest.importorskip("torch")
        src, _ = _write_qwen2_gguf(tmp_path / "qwen2.gguf", stories_f32)
    else:
        src = stories_f32
    arch = "qwen2" if scaling == "yarn-qwen2" else "llama"
    kv = {f"{arch}.rope.scaling.type": (V.STRING, scaling.split("-")[0]),
          f"{arch}.rope.scaling.factor": (V.FLOAT32, 4.0 if scaling.startswith("yarn") else 2.0)}
    if scaling.startswith("yarn"):
        kv[f"{arch}.rope.scaling.original_context_length"] = (V.UINT32, 64)
    path = _with_metadata(src, tmp_path / f"{scaling}.gguf", kv)
    model = Model.load(path)
    assert model._rope_mscale != 1.0 if scaling.startswith("yarn") else model._rope_mscale == 1.0
    prompt = [1] + list(np.random.RandomState(5).randint(3, 500, 124))
    compare_with_llama_cpp(path, prompt, steps=16)
    # F32 weights, so the logits must agree closely, not just correlate (the random qwen2's logits
    # correlate > 0.999 even with the scaling ignored; their values do not)
    llm = _llama(path)
    llm.eval(prompt)
    ref = np.array(llm.scores[:len(prompt)], np.float64)
    got = Model.load(path, n_ctx=256).eval(prompt, all_logits=True)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < 1e-4, f"{scaling}: max logit difference {err:.2e} of the largest"
