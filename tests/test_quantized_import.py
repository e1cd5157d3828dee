"""GPTQ / AWQ / compressed-tensors import: unpacking, lossless block mapping, conversion, errors.

Synthetic checkpoints are packed by ``tests/quant_packers.py`` (written from the published
formats, independently of ggq's unpackers); the reference weights are ``s * (q - z)`` computed
from the codes before packing. GGUF blocks are decoded with ``gguf.quants.dequantize``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quant_packers as qp  # noqa: E402

from ggq.convert.checkpoint import open_checkpoint  # noqa: E402
from ggq.convert.quantized import prepare, unpack_bits  # noqa: E402
from ggq.convert.quantized.awq import unpack_gemm  # noqa: E402
from ggq.errors import GGQError  # noqa: E402


# ------------------------------------------------------------------------ unpacking

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_gptq_bitstream(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=(96, 7))
    packed = qp.pack_gptq_rows(codes, bits)
    assert packed.shape == (96 * bits // 32, 7)
    assert np.array_equal(unpack_bits(packed, bits, 96, axis=0), codes)
    cols = rng.integers(0, 1 << bits, size=(5, 64))
    assert np.array_equal(unpack_bits(qp.pack_gptq_cols(cols, bits), bits, 64, axis=1), cols)


def test_unpack_awq_gemm_interleave():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 16, size=(6, 32))
    packed = qp.pack_awq_gemm(codes)
    assert np.array_equal(unpack_gemm(packed, 32), codes)
    # the interleave is real: a sequential unpack gives a different order
    assert not np.array_equal(unpack_bits(packed, 4, 32, axis=1), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_unpack_sequential_padded(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 1 << bits, size=(3, 50))  # 50 is not a multiple of 32 / bits
    assert np.array_equal(unpack_bits(qp.pack_seq(codes, bits), bits, 50, axis=1), codes)


# ------------------------------------------------------------------------ prepare + native mapping

#: (method, kwargs, default type, types that must be exact, types that must be refused)
CASES = {
    "gptq4-sym": ("gptq", dict(bits=4, group_size=64, sym=True), "Q4_0", ["Q4_0", "Q4_1", "Q5_0", "Q8_0"], ["Q4_K"]),
    "gptq4-asym-v1": ("gptq", dict(bits=4, group_size=32, sym=False), "Q4_1", ["Q5_0", "Q8_0"], ["Q4_0"]),
    "gptq4-sym-v2-rowwise": ("gptq", dict(bits=4, group_size=-1, sym=True, fmt="gptq_v2"), "Q4_0", ["Q4_0"], []),
    "gptq3-sym": ("gptq", dict(bits=3, group_size=64, sym=True), "Q4_0", ["Q4_0", "Q8_0"], []),
    "gptq2-asym-v2": ("gptq", dict(bits=2, group_size=32, sym=False, fmt="gptq_v2"), "Q4_0", ["Q4_0", "Q8_0"], []),
    "gptq8-sym": ("gptq", dict(bits=8, group_size=128, sym=True), "Q8_0", ["Q8_0"], ["Q4_0", "Q5_0", "Q4_1"]),
    "gptq4-act-order": ("gptq", dict(bits=4, group_size=32, sym=True, act_order=True), None, [],
                        ["Q4_0", "Q8_0", "Q4_1"]),
    "awq-gemm": ("awq", dict(bits=4, group_size=64, sym=False), "Q4_1", ["Q5_0", "Q8_0"], ["Q4_0"]),
    "awq-gemv": ("awq", dict(bits=4, group_size=32, sym=False, fmt="gemv"), "Q4_1", ["Q5_0"], []),
    "ct4-sym": ("compressed-tensors", dict(bits=4, group_size=32, sym=True), "Q4_0", ["Q4_0", "Q8_0"], []),
    "ct4-asym": ("compressed-tensors", dict(bits=4, group_size=64, sym=False), "Q4_1", ["Q5_0"], ["Q4_0"]),
    "ct4-asym-int8zp": ("compressed-tensors", dict(bits=4, group_size=128, sym=False, packed_zp=False), "Q4_1",
                        ["Q5_0"], []),
    "ct8-channel": ("compressed-tensors", dict(bits=8, group_size=-1, sym=True), "Q8_0", ["Q8_0"], ["Q4_0"]),
}


def _build(tmp_path, stories_dir, name):
    method, kw, *_ = CASES[name]
    if method == "compressed-tensors":
        pytest.importorskip("torch")  # bf16 scales are written with torch
    d = tmp_path / name
    layers = qp.make_checkpoint(d, stories_dir, method, **kw)
    return d, layers


@pytest.mark.parametrize("name", list(CASES))
def test_prepare_maps_codes(tmp_path, stories_dir, name):
    method, kw, default, exact, refused = CASES[name]
    d, layers = _build(tmp_path, stories_dir, name)
    ck = open_checkpoint(d)
    info = prepare(ck)
    assert info is not None and info.method == method and info.bits == kw["bits"]
    assert info.n_tensors == len(layers)
    if default is not None:
        assert info.default_type == default, info.reason
    assert not [k for k in ck.tensors if k.endswith((".qweight", ".qzeros", ".scales", ".g_idx", "_packed",
                                                      "_scale", "_zero_point", "_shape"))]
    for hf_name, L in list(layers.items())[:7]:
        src = ck.tensors[hf_name]
        ref = L.dequantize()
        assert src.shape == ref.shape
        w = src.load()
        assert w.dtype == np.float32 and np.array_equal(w, ref), hf_name
        for t in exact:
            raw = src.native(t)
            assert raw is not None, (hf_name, t, info.stats.get("not_native"))
            assert raw.dtype == np.uint8 and raw.shape[0] == ref.shape[0]
            assert np.array_equal(gguf_dequantize(raw, T[t]), ref), (hf_name, t)
            assert info.lost(t) is None or t in ("Q4_1", "Q5_1")
        for t in refused:
            assert src.native(t) is None, (hf_name, t)
    for t in refused:
        assert info.lost(t), t
    if kw.get("act_order"):
        assert "act-order" in info.lost("Q4_0")


@pytest.mark.parametrize("name", ["gptq4-asym-v1", "awq-gemm", "ct4-asym"])
def test_q4_1_m_rounding_reported(tmp_path, stories_dir, name):
    """4-bit asymmetric -> Q4_1 keeps codes and d = s; only m = -s*z is rounded to fp16."""
    d, layers = _build(tmp_path, stories_dir, name)
    ck = open_checkpoint(d)
    info = prepare(ck)
    assert "m = -s*z" in info.lost("Q4_1")
    hf_name, L = next(iter(layers.items()))
    raw = ck.tensors[hf_name].native("Q4_1")
    assert raw is not None
    got = gguf_dequantize(raw, T.Q4_1)
    ref = L.dequantize()
    m = (L.s * L.z)[:, L.g]  # |m| of each weight's block
    err = np.abs(got - ref)
    assert (err <= m * 2.0 ** -11 + 1e-7).all()
    steps = err / L.s[:, L.g]
    assert 0 < info.m_error <= 2.0 ** (4 + 1 - 11) and steps.max() <= info.m_error + 1e-6


def test_scales_not_exact_in_fp16_fall_back():
    from ggq.convert.quantized import QuantizedWeight

    rng = np.random.default_rng(3)
    q = rng.integers(0, 16, size=(4, 64)).astype(np.uint8)
    s = np.full((4, 2), 0.1, np.float32)  # 0.1 in float32 is not an fp16 value
    qw = QuantizedWeight(q, s, np.full((4, 2), 8, np.int16), np.arange(64) // 32)
    data, why = qw.to_blocks("Q4_0")
    assert data is None and "fp16" in why
    qw.scales = s.astype(np.float16).astype(np.float32)
    data, _ = qw.to_blocks("Q4_0")
    assert np.array_equal(gguf_dequantize(data, T.Q4_0), qw.dequantize())


# ------------------------------------------------------------------------ bad input

def _gptq_dir(tmp_path, stories_dir, **kw):
    d = tmp_path / "bad"
    qp.make_checkpoint(d, stories_dir, "gptq", bits=4, group_size=64, sym=True)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"].update(kw)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("change,message", [
    (dict(bits=8), "does not hold 8-bit codes"),
    (dict(bits=5), "5 bits is not supported"),
    (dict(quant_method="hqq"), "'hqq' is not supported"),
    (dict(group_size=32), "groups"),
    (dict(checkpoint_format="marlin"), "'marlin' is not supported"),
    (dict(quant_method="awq", bits=4), "do not match AWQ GEMM"),
])
def test_bad_config_errors(tmp_path, stories_dir, change, message):
    d = _gptq_dir(tmp_path, stories_dir, **change)
    with pytest.raises(GGQError, match=message) as e:
        prepare(open_checkpoint(d))
    assert "\n" not in str(e.value) and str(d) in str(e.value)


def test_missing_companion_tensor(tmp_path, stories_dir):
    from safetensors.numpy import load_file, save_file

    d = _gptq_dir(tmp_path, stories_dir)
    t = load_file(str(d / "model.safetensors"))
    del t["model.layers.1.mlp.up_proj.qzeros"]
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(GGQError, match="up_proj.qweight has no .*qzeros"):
        prepare(open_checkpoint(d))


def test_quant_config_without_packed_tensors(tmp_path, stories_dir):
    d = tmp_path / "float"
    d.mkdir()
    for f in ("config.json", "model.safetensors"):
        (d / f).write_bytes((stories_dir / f).read_bytes())
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GGQError, match="no tensor of the checkpoint is packed"):
        prepare(open_checkpoint(d))
    assert prepare(open_checkpoint(stories_dir)) is None  # a float checkpoint


def test_awq_other_widths_and_ct_formats(tmp_path, stories_dir):
    d = _gptq_dir(tmp_path, stories_dir, quant_method="awq", bits=3)
    with pytest.raises(GGQError, match="AWQ with 3 bits"):
        prepare(open_checkpoint(d))
    d = _gptq_dir(tmp_path / "ct", stories_dir, quant_method="compressed-tensors", format="float-quantized",
                  config_groups={"g": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float"}}})
    with pytest.raises(GGQError, match="no tensor of the checkpoint is packed that way"):  # read by fp8.py
        prepare(open_checkpoint(d))


# ------------------------------------------------------------------------ end to end (ggq convert)

GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def _llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Q/K row order of llama.cpp's converter (LlamaModel.permute in convert_hf_to_gguf.py)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _reference_gguf_weights(layers: dict) -> dict[str, np.ndarray]:
    """{GGUF name: reference float32 weights in GGUF row order}."""
    cfg = qp.CONFIG
    out = {}
    for hf_name, L in layers.items():
        i = int(hf_name.split(".")[2])
        lin = hf_name.split(".", 3)[3].rsplit(".", 1)[0]
        w = L.dequantize()
        if lin == "self_attn.q_proj":
            w = _llama_permute(w, cfg["num_attention_heads"])
        elif lin == "self_attn.k_proj":
            w = _llama_permute(w, cfg["num_key_value_heads"])
        out[f"blk.{i}.{GGUF_NAMES[lin]}.weight"] = w
    return out


def _gguf_weights(path: Path) -> tuple[dict[str, tuple[T, np.ndarray]], int]:
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    ftype = int(r.fields["general.file_type"].parts[-1][0])
    return {t.name: (T(t.tensor_type), gguf_dequantize(np.asarray(t.data), t.tensor_type)) for t in r.tensors}, ftype


def _convert(src: Path, out: Path, qtype=None) -> Path:
    convert = pytest.importorskip("ggq.convert.pipeline").convert
    return convert(str(src), str(out), qtype=qtype, force=True, progress=False)


@pytest.mark.parametrize("name,qtype,gtype", [
    ("gptq4-sym", None, "Q4_0"),
    ("gptq8-sym", None, "Q8_0"),
    ("ct4-sym", None, "Q4_0"),
    ("awq-gemm", "Q5_0", "Q5_0"),
])
def test_convert_lossless(tmp_path, stories_dir, name, qtype, gtype, capfd):
    d, layers = _build(tmp_path, stories_dir, name)
    path = _convert(d, tmp_path / f"{name}.gguf", qtype)
    got, ftype = _gguf_weights(path)
    assert ftype == {"Q4_0": 2, "Q8_0": 7, "Q5_0": 8}[gtype]
    for gname, ref in _reference_gguf_weights(layers).items():
        t, w = got[gname]
        assert t == T[gtype], gname
        assert np.array_equal(w, ref), gname
    assert "warning" not in capfd.readouterr().err


def test_convert_awq_q4_1(tmp_path, stories_dir, capfd):
    d, layers = _build(tmp_path, stories_dir, "awq-gemm")
    path = _convert(d, tmp_path / "awq.gguf")
    got, ftype = _gguf_weights(path)
    assert ftype == 3  # MOSTLY_Q4_1
    assert "m = -s*z" in capfd.readouterr().err
    for gname, ref in _reference_gguf_weights(layers).items():
        t, w = got[gname]
        assert t == T.Q4_1
        np.testing.assert_allclose(w, ref, rtol=0, atol=np.abs(ref).max() * 2.0 ** -10)


def test_convert_act_order_requantizes(tmp_path, stories_dir, capfd):
    d, layers = _build(tmp_path, stories_dir, "gptq4-act-order")
    path = _convert(d, tmp_path / "act.gguf", "Q8_0")
    err = capfd.readouterr().err
    assert "act-order" in err and "quantized again" in err
    got, _ = _gguf_weights(path)
    for gname, ref in _reference_gguf_weights(layers).items():
        t, w = got[gname]
        assert t == T.Q8_0
        # Q8_0 rounding: half a step of max|block| / 127, plus the fp16 rounding of d (127 * 2^-11 steps)
        blocks = np.abs(ref).reshape(ref.shape[0], -1, 32).max(axis=-1, keepdims=True)
        step = np.repeat(blocks / 127, 32, axis=-1).reshape(ref.shape)
        assert (np.abs(w - ref) <= step * (0.5 + 127 * 2.0 ** -11) + 1e-7).all(), gname


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gptq4-sym", "awq-gemm"])
def test_llama_cpp_generates(tmp_path, stories_dir, name):
    llama_cpp = pytest.importorskip("llama_cpp")
    d, _ = _build(tmp_path, stories_dir, name)
    path = _convert(d, tmp_path / f"{name}.gguf")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, verbose=False, seed=1)
    toks = llm.tokenize(b"Once upon a time", add_bos=True)
    out = []
    for tok in llm.generate(toks, temp=0.0):
        out.append(tok)
        if len(out) == 4:
            break
    assert len(out) == 4 and all(0 <= t < qp.CONFIG["vocab_size"] for t in out)


# ------------------------------------------------------------------------ real checkpoints (optional)

@pytest.mark.slow
@pytest.mark.parametrize("kind,gtype", [("gptq", "Q4_0"), ("awq", "Q4_1")])
def test_real_smollm2_checkpoint(kind, gtype, cache_dir, tmp_path):
    """SmolLM2 quantized by gptqmodel (tools/make_gptq_awq.py); skipped when not made on this machine.

    The unpacked codes, zeros and scales must reproduce gptqmodel's own CPU dequantization (which
    rounds the scale and the product to bf16: relative difference at most 2^-7 per weight, i.e.
    at most 1/16 of a step for |q - z| <= 8, while a wrong code or zero point is off by a whole
    step), and the GGUF must decode to our dequantized weights (bit for
    bit for Q4_0; within the fp16 rounding of m for Q4_1)."""
    d = cache_dir / f"smollm2-{kind}"
    if not (d / "config.json").exists():
        pytest.skip(f"{d} not made (tools/make_gptq_awq.py)")
    ck = open_checkpoint(d)
    info = prepare(ck)
    assert info.method == kind and info.default_type == gtype
    ref_file = d.with_name(d.name + ".reference.safetensors")
    if ref_file.exists():
        from safetensors.numpy import load_file

        ref = load_file(str(ref_file))
        names = [k for k in ref if k.endswith(".weight")]
        assert len(names) == info.n_tensors
        for k in names:
            w = ck.tensors[k].load()
            assert (np.abs(w - ref[k]) <= np.abs(w) * 2.0 ** -7).all(), k

    path = _convert(d, tmp_path / f"{kind}.gguf")
    got, _ = _gguf_weights(path)
    cfg = ck.config
    ck2 = open_checkpoint(d)
    prepare(ck2)
    for i in (0, cfg["num_hidden_layers"] - 1):
        for lin, short in GGUF_NAMES.items():
            w = ck2.tensors[f"model.layers.{i}.{lin}.weight"].load()
            if lin == "self_attn.q_proj":
                w = _llama_permute(w, cfg["num_attention_heads"])
            elif lin == "self_attn.k_proj":
                w = _llama_permute(w, cfg["num_key_value_heads"])
            t, g = got[f"blk.{i}.{short}.weight"]
            assert t == T[gtype]
            if gtype == "Q4_0":
                assert np.array_equal(g, w)
            else:
                assert np.abs(g - w).max() <= np.abs(w).max() * 2.0 ** -10

    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, n_threads=2, verbose=False, seed=1)
    text = llm("The capital of France is", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    assert text.strip()
