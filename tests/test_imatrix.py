"""Importance matrices: llama.cpp's file formats, collection, and their effect on quantization.

* GGUF imatrix files round-trip, are parsed by ggml's own ``gguf_init_from_file`` (ctypes), and
  load into llama-quantize's weights (sums / counts, 1.0 for empty matrices); hand-written legacy
  ``.dat`` files load as values / ncall;
* collection on real SmolLM2: the entry for ``blk.0.attn_q`` equals the squared RMS-normed
  embeddings computed independently with numpy from the checkpoint's weights;
* quantizing real SmolLM2 weights with the imatrix lowers the imatrix-weighted error, for ggq's
  kernels and llama.cpp's alike;
* ``ggq quantize --imatrix`` writes llama-quantize's ``quantize.imatrix.*`` keys and the file
  generates in llama.cpp.
"""

from __future__ import annotations

import ctypes
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ggq.cli import main
from ggq.convert.imatrix import collect_imatrix, load_imatrix, read_imatrix_info, save_imatrix
from ggq.errors import GGQError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_mixes import _ref, read_table, synth_f16, synth_hf  # noqa: E402,F401

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def calib_text(cache_dir) -> Path:
    """The first ~40 kB of wikitext-2 test (a few thousand tokens)."""
    import os

    src = Path(os.environ.get("GGQ_SHARED", REPO.parent / "shared")) / "data" / "wikitext-2-raw" / "wiki.test.raw"
    if not src.exists():
        pytest.skip(f"{src} not found")
    out = cache_dir / "mixes" / "calib.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        out.write_text(src.read_text(encoding="utf-8")[:40000], encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def smollm2_imatrix(cache_dir, smollm2_hf, calib_text) -> Path:
    out = cache_dir / "mixes" / "smollm2-imatrix-c128x4.gguf"
    if not out.exists():
        collect_imatrix(smollm2_hf, calib_text, out, ctx=128, chunks=4, progress=False)
    return out


def test_roundtrip_and_weights(tmp_path):
    rng = np.random.default_rng(0)
    s2 = rng.random((1, 64), dtype=np.float32) * 10
    s3 = rng.random((3, 32), dtype=np.float32)
    p = save_imatrix(tmp_path / "im.gguf", {"blk.0.attn_q.weight": s2, "blk.0.ffn_down_exps.weight": s3},
                     {"blk.0.attn_q.weight": [5], "blk.0.ffn_down_exps.weight": [4, 0, 2]},
                     datasets=["calib.txt"], chunk_count=3, chunk_size=512)
    w = load_imatrix(p)
    np.testing.assert_allclose(w["blk.0.attn_q.weight"], s2[0] / 5, rtol=1e-6)
    np.testing.assert_allclose(w["blk.0.ffn_down_exps.weight"],
                               np.concatenate([s3[0] / 4, np.ones(32), s3[2] / 2]), rtol=1e-6)
    info = read_imatrix_info(p)
    assert info["datasets"] == ["calib.txt"] and info["chunk_count"] == 3 and info["chunk_size"] == 512
    with pytest.raises(GGQError, match="exists"):
        save_imatrix(p, {}, {})


def test_ggml_parses_our_file(tmp_path):
    ref = _ref()
    lib = ref.ggml_lib()

    class Params(ctypes.Structure):
        _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]

    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, Params]
    lib.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
    lib.gguf_get_n_tensors.restype = ctypes.c_int64
    lib.gguf_find_key.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.gguf_find_key.restype = ctypes.c_int64
    lib.gguf_get_val_u32.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_val_u32.restype = ctypes.c_uint32
    lib.gguf_get_tensor_name.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.gguf_get_tensor_name.restype = ctypes.c_char_p
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    p = save_imatrix(tmp_path / "im.gguf", {"blk.1.ffn_up.weight": np.ones((1, 32), np.float32)},
                     {"blk.1.ffn_up.weight": [7]}, datasets=["x"], chunk_count=1, chunk_size=7)
    g = lib.gguf_init_from_file(str(p).encode(), Params(True, None))
    assert g
    try:
        assert lib.gguf_get_n_tensors(g) == 2
        assert lib.gguf_get_tensor_name(g, 0) == b"blk.1.ffn_up.weight.in_sum2"
        assert lib.gguf_get_val_u32(g, lib.gguf_find_key(g, b"imatrix.chunk_size")) == 7
    finally:
        lib.gguf_free(g)


def test_legacy_dat(tmp_path):
    vals = np.arange(1, 9, dtype=np.float32)
    name = b"blk.0.ffn_down.weight"
    buf = struct.pack("<i", 2)
    buf += struct.pack("<i", len(name)) + name + struct.pack("<ii", 4, 8) + vals.tobytes()
    buf += struct.pack("<i", 6) + b"output" + struct.pack("<ii", 0, 8) + vals.tobytes()
    buf += struct.pack("<i", 10) + struct.pack("<i", 5) + b"wiki!"
    p = tmp_path / "im.dat"
    p.write_bytes(buf)
    w = load_imatrix(p)
    np.testing.assert_allclose(w["blk.0.ffn_down.weight"], vals / 4)
    np.testing.assert_allclose(w["output"], vals)  # ncall 0: values as stored
    assert read_imatrix_info(p) == {"datasets": ["wiki!"], "chunk_count": 10, "chunk_size": 0, "legacy": True}
    p.write_bytes(buf[:30])
    with pytest.raises(GGQError, match="truncated"):
        load_imatrix(p)


@pytest.mark.slow
def test_collect_matches_numpy(smollm2_hf, smollm2_imatrix, calib_text):
    """blk.0.attn_q's input is RMSNorm(embedding) * attn_norm: recompute its column sums in numpy."""
    pytest.importorskip("torch")
    import json

    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    im = load_imatrix(smollm2_imatrix)
    assert len(im) == 30 * 7  # q, k, v, output, gate, up, down in every layer
    assert all(n.startswith("blk.") for n in im)
    tok = AutoTokenizer.from_pretrained(str(smollm2_hf))
    ids = tok(calib_text.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"][:4 * 128]
    sd = load_file(str(smollm2_hf / "model.safetensors"))
    eps = json.loads((smollm2_hf / "config.json").read_text())["rms_norm_eps"]
    x = sd["model.embed_tokens.weight"][ids].astype(np.float64)
    x = x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + eps) * sd["model.layers.0.input_layernorm.weight"]
    want = np.mean(x * x, axis=0)
    np.testing.assert_allclose(im["blk.0.attn_q.weight"], want, rtol=2e-4)
    np.testing.assert_array_equal(im["blk.0.attn_q.weight"], im["blk.0.attn_k.weight"])


@pytest.mark.slow
def test_imatrix_lowers_weighted_error(smollm2_hf, smollm2_imatrix):
    """Quantizing real weights with the imatrix lowers sum_j w_j (x_j - q_j)^2 (w = the imatrix)."""
    from safetensors.numpy import load_file

    import ggq.quants as quants
    from gguf import GGMLQuantizationType as T

    ref = _ref()
    im = load_imatrix(smollm2_imatrix)
    sd = load_file(str(smollm2_hf / "model.safetensors"))
    cases = [("model.layers.3.mlp.down_proj.weight", "blk.3.ffn_down.weight", T.Q4_K),
             ("model.layers.3.mlp.down_proj.weight", "blk.3.ffn_down.weight", T.Q3_K),
             ("model.layers.10.mlp.down_proj.weight", "blk.10.ffn_down.weight", T.Q2_K),
             ("model.layers.20.mlp.down_proj.weight", "blk.20.ffn_down.weight", T.Q6_K),
             ("model.layers.5.self_attn.o_proj.weight", "blk.5.attn_output.weight", T.Q4_0),
             ("model.layers.5.mlp.gate_proj.weight", "blk.5.ffn_gate.weight", T.Q5_0)]
    for hf, gg, qt in cases:
        x = np.ascontiguousarray(sd[hf], dtype=np.float32)
        w = im[gg]

        def werr(q):
            d = quants.dequantize(q, qt) - x
            return float(np.sum(w * d.astype(np.float64) ** 2))

        plain, weighted = werr(quants.quantize(x, qt)), werr(quants.quantize(x, qt, imatrix=w))
        assert weighted < plain, f"{gg} {qt.name}: weighted error {weighted:.4g} >= {plain:.4g} without imatrix"
        # llama.cpp gains about as much from the same imatrix
        lc = werr(ref.ggml_quantize(x, int(qt), imatrix=w))
        assert weighted <= lc * 1.001, f"{gg} {qt.name}: ggq {weighted:.4g} vs llama.cpp {lc:.4g}"


@pytest.mark.slow
def test_collect_and_quantize_synthetic(synth_hf, synth_f16, calib_text, tmp_path):
    im = collect_imatrix(synth_hf, calib_text, tmp_path / "im.gguf", ctx=64, chunks=2, progress=False)
    w = load_imatrix(im)
    assert len(w) == 8 * 7 and w["blk.0.ffn_down.weight"].shape == (512,)
    out = tmp_path / "q.gguf"
    res = CliRunner().invoke(main, ["quantize", "--imatrix", str(im), str(synth_f16), str(out), "Q4_K_S", "-q"])
    assert res.exit_code == 0, res.output
    kv = read_table(out)[0]
    assert kv["quantize.imatrix.entries_count"] == 56 and kv["quantize.imatrix.chunks_count"] == 2
    assert kv["quantize.imatrix.file"] == str(im)
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=64, n_threads=2, verbose=False)
    assert len(llm.tokenize(b"Hello")) > 0 and len(list(zip(range(4), llm.generate(llm.tokenize(b"Hi"))))) == 4


def test_cli_errors(tmp_path):
    res = CliRunner().invoke(main, ["imatrix", str(tmp_path), "--text", str(tmp_path / "none.txt"), "-o",
                                    str(tmp_path / "o.gguf")])
    assert res.exit_code == 1 and "no such calibration text file" in res.output
    bad = tmp_path / "im.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00")
    with pytest.raises(GGQError, match="malformed"):
        load_imatrix(bad)
    with pytest.raises(GGQError, match="no such imatrix"):
        load_imatrix(tmp_path / "nothing.gguf")
