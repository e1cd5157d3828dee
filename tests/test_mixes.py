"""Quantization mixes: the type ggq plans for every tensor equals the type llama.cpp writes.

Reference: llama.cpp's own F16 conversion (``convert_hf_to_gguf.py``) of a checkpoint, quantized
with ``llama_model_quantize`` (llama-quantize's library call) to each mix; we read the resulting
tensor types with ``gguf.GGUFReader`` and compare with :func:`ggq.convert.mixes.plan_types` on the
F16 file's tensor list. Two checkpoints: real SmolLM2-135M (row lengths 576: many fallbacks, GQA 3)
and a synthetic Llama whose hidden/FFN sizes are multiples of 256 (GQA 4, untied output).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType

from ggq.convert.mixes import (FILE_TYPES, MixOverrides, fallback_type, hparams_from_gguf, parse_file_type,
                               plan_types, plan_types_from)
from ggq.errors import GGQError

REPO = Path(__file__).resolve().parents[1]
T = GGMLQuantizationType
MIXES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
         "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]


def _ref():
    pytest.importorskip("llama_cpp")
    sys.path.insert(0, str(REPO / "tools"))
    import llamacpp_ref

    return llamacpp_ref


def read_table(path: Path) -> tuple[dict, list[tuple[str, tuple[int, ...], GGMLQuantizationType]]]:
    """A GGUF header through ggq's reader (gguf.GGUFReader takes seconds on a 49k-token
    vocabulary; tests/test_hostile_files.py checks the reader against it): scalar/string metadata
    (arrays as None) and ``(name, ne, type)`` of every tensor, in file order."""
    from ggq.format.gguf_reader import read_gguf

    h = read_gguf(path)
    kv = {k: None if isinstance(v, list) else v for k, v in h.metadata.items()}
    return kv, [(t.name, t.ne, T(t.qtype)) for t in h.tensors.values()]


def table_hparams(kv: dict) -> tuple[str, dict]:
    arch = kv["general.architecture"]
    return arch, {"n_layer": kv[f"{arch}.block_count"], "n_head": kv[f"{arch}.attention.head_count"],
                  "n_head_kv": kv.get(f"{arch}.attention.head_count_kv"),
                  "n_expert": kv.get(f"{arch}.expert_count", 0)}


def build_synth_llama(out: Path, tokenizer_src: Path) -> Path:
    """A tiny random Llama checkpoint with hidden 256, FFN 512, 8 layers, 8 heads / 2 KV heads,
    untied output, and stories260K's 512-token SentencePiece tokenizer (idempotent)."""
    if (out / "config.json").exists():
        return out
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=512,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    for f in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(tokenizer_src / f, tmp / f)
    tmp.rename(out)
    return out


@pytest.fixture(scope="session")
def synth_hf(cache_dir, stories_dir) -> Path:
    return build_synth_llama(cache_dir / "mixes" / "synth-llama-hf", stories_dir)


@pytest.fixture(scope="session")
def synth_f16(cache_dir, synth_hf) -> Path:
    """llama.cpp's F16 conversion of the synthetic Llama."""
    out = cache_dir / "mixes" / "synth-llama-f16.gguf"
    if not out.exists():
        _ref().convert_hf(synth_hf, out.with_suffix(".part"), "f16")
        out.with_suffix(".part").rename(out)
    return out


@pytest.fixture(scope="session")
def smollm2_f16(cache_dir, smollm2_hf) -> Path:
    """llama.cpp's F16 conversion of SmolLM2-135M."""
    out = cache_dir / "mixes" / "smollm2-f16.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        _ref().convert_hf(smollm2_hf, out.with_suffix(".part"), "f16")
        out.with_suffix(".part").rename(out)
    return out


def llamacpp_mix(f16: Path, mix: str) -> Path:
    """``f16`` quantized by llama.cpp to ``mix`` (cached next to it)."""
    out = f16.with_name(f"{f16.stem}-{mix}.gguf")
    if not out.exists():
        part = out.with_suffix(".part")
        _ref().quantize_file(f16, part, mix)
        part.rename(out)
    return out


def _check_mix(f16: Path, mix: str):
    kv, f16_tensors = read_table(f16)
    arch, hp = table_hparams(kv)
    tensors = [(n, ne) for n, ne, _ in f16_tensors]
    qkv, q_tensors = read_table(llamacpp_mix(f16, mix))
    want = {n: t for n, _, t in q_tensors}
    got = plan_types(tensors, parse_file_type(mix), arch, hp, source_float_type=T.F16)
    diff = {n: (want[n].name, got[n].name) for n in want if want[n] != got[n]}
    assert not diff, f"{mix}: (llama.cpp, ggq) differ: {diff}"
    assert list(got) == list(want)  # same tensor order as llama-quantize writes
    assert qkv["general.file_type"] == int(parse_file_type(mix))
    return want


@pytest.mark.slow
@pytest.mark.parametrize("mix", MIXES)
def test_mix_types_smollm2(smollm2_f16, mix):
    _check_mix(smollm2_f16, mix)


@pytest.mark.slow
@pytest.mark.parametrize("mix", MIXES)
def test_mix_types_synthetic(synth_f16, mix):
    types = _check_mix(synth_f16, mix)
    if mix.startswith(("Q2", "Q3", "Q4_K", "Q5_K", "Q6")):
        # rows are multiples of 256 here: no 32-block fallbacks at all
        assert not ({T.Q4_0, T.Q5_0, T.Q5_1, T.Q8_0} & set(types.values()))


@pytest.mark.slow
def test_float_types_match_convert_hf(synth_hf, cache_dir):
    """F32/BF16 plans equal convert_hf_to_gguf.py's own output types."""
    ref = _ref()
    for outtype, ft in (("f32", LlamaFileType.ALL_F32), ("bf16", LlamaFileType.MOSTLY_BF16)):
        out = cache_dir / "mixes" / f"synth-llama-{outtype}.gguf"
        if not out.exists():
            ref.convert_hf(synth_hf, out.with_suffix(".part"), outtype)
            out.with_suffix(".part").rename(out)
        kv, tensors = read_table(out)
        arch, hp = table_hparams(kv)
        got = plan_types([(n, ne) for n, ne, _ in tensors], ft, arch, hp)
        assert got == {n: t for n, _, t in tensors}
        r = GGUFReader(out)  # gguf-py's reader: the reference for the metadata
        md = {k: f.contents() for k, f in r.fields.items()}
        assert hparams_from_gguf(md)[1]["n_layer"] == hp["n_layer"]


# ------------------------------------------------------------------ rules without llama.cpp

def _llama_tensors(n_layer, n_embd, n_ff, n_kv, vocab, tied=True):
    ts = [("token_embd.weight", (n_embd, vocab)), ("output_norm.weight", (n_embd,))]
    if not tied:
        ts.append(("output.weight", (n_embd, vocab)))
    for i in range(n_layer):
        p = f"blk.{i}."
        ts += [(p + "attn_norm.weight", (n_embd,)), (p + "attn_q.weight", (n_embd, n_embd)),
               (p + "attn_k.weight", (n_embd, n_kv)), (p + "attn_v.weight", (n_embd, n_kv)),
               (p + "attn_output.weight", (n_embd, n_embd)), (p + "ffn_norm.weight", (n_embd,)),
               (p + "ffn_gate.weight", (n_embd, n_ff)), (p + "ffn_up.weight", (n_embd, n_ff)),
               (p + "ffn_down.weight", (n_ff, n_embd))]
    return ts


def test_parse_file_type():
    assert parse_file_type("q4_k") == LlamaFileType.MOSTLY_Q4_K_M
    assert parse_file_type("Q5_K") == LlamaFileType.MOSTLY_Q5_K_M
    assert parse_file_type("Q3_K") == LlamaFileType.MOSTLY_Q3_K_M
    assert parse_file_type("bf16") == LlamaFileType.MOSTLY_BF16
    assert set(MIXES) <= set(FILE_TYPES)
    with pytest.raises(GGQError, match="Q4_K_M"):
        parse_file_type("Q4_K_X")


def test_fallbacks():
    assert fallback_type(T.Q4_K, 576) == T.Q5_0
    assert fallback_type(T.Q6_K, 576) == T.Q8_0
    assert fallback_type(T.Q2_K, 576) == T.Q4_0
    assert fallback_type(T.Q5_K, 576) == T.Q5_1
    assert fallback_type(T.Q4_K, 100) == T.F16
    assert fallback_type(T.Q4_0, 100) == T.F16
    assert fallback_type(T.Q4_K, 512) == T.Q4_K


def test_overrides():
    ts = _llama_tensors(4, 256, 512, 64, 512, tied=True)
    ov = MixOverrides.parse(output_tensor_type="q8_0", token_embedding_type="q4_k",
                            tensor_types=["attn_v=Q8_0", r"blk\.0\.ffn_down=f16"])
    got = plan_types(ts, LlamaFileType.MOSTLY_Q4_K_M, "llama", {"n_layer": 4, "n_head": 4, "n_head_kv": 1}, ov)
    assert got["token_embd.weight"] == T.Q4_K
    assert all(got[f"blk.{i}.attn_v.weight"] == T.Q8_0 for i in range(4))
    assert got["blk.0.ffn_down.weight"] == T.F16
    assert got["blk.1.ffn_down.weight"] == T.Q4_K  # use_more_bits(1, 4) is false
    assert got["output_norm.weight"] == T.F32
    # tied token_embd follows --output-tensor-type through the mix rules
    ov = MixOverrides.parse(output_tensor_type="q8_0")
    got = plan_types(ts, LlamaFileType.MOSTLY_Q4_K_M, "llama", {"n_layer": 4, "n_head": 4, "n_head_kv": 1}, ov)
    assert got["token_embd.weight"] == T.Q8_0
    for bad in ("attn_v", "attn_v=", "=q8_0", "attn_v=q9_9", "(=q8_0"):
        with pytest.raises(GGQError):
            MixOverrides.parse(tensor_types=[bad])


def test_moe_and_70b_rules():
    # an 8-expert model: attn_v and attn_k in Q8_0, attn_output Q5_K for Q4_K_M
    ts = [("token_embd.weight", (256, 512)), ("output.weight", (256, 512))]
    for i in range(2):
        ts += [(f"blk.{i}.attn_v.weight", (256, 64)), (f"blk.{i}.attn_k.weight", (256, 64)),
               (f"blk.{i}.attn_output.weight", (256, 256)), (f"blk.{i}.ffn_gate_inp.weight", (256, 8)),
               (f"blk.{i}.ffn_down_exps.weight", (512, 256, 8))]
    src = [(n, s, T.F16 if len(s) > 1 and "gate_inp" not in n else T.F32) for n, s in ts]
    got = plan_types_from(src, LlamaFileType.MOSTLY_Q4_K_M, "llama", {"n_layer": 2, "n_head": 4, "n_head_kv": 4,
                                                                      "n_expert": 8})
    assert got["blk.0.attn_v.weight"] == T.Q8_0 and got["blk.1.attn_k.weight"] == T.Q8_0
    assert got["blk.0.attn_output.weight"] == T.Q5_K
    assert got["blk.0.ffn_gate_inp.weight"] == T.F32
    assert got["blk.1.ffn_down_exps.weight"] == T.Q6_K  # layer from the name: use_more_bits(1, 2)
    # a 70B llama (80 layers, GQA): Q4_K attn_v becomes Q5_K
    ts = _llama_tensors(80, 256, 512, 32, 512)
    got = plan_types(ts, LlamaFileType.MOSTLY_Q4_K_S, "llama", {"n_layer": 80, "n_head": 8, "n_head_kv": 1})
    assert got["blk.40.attn_v.weight"] == T.Q5_K
