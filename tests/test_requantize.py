"""Requantization (``ggq quantize IN OUT TYPE``) against llama.cpp's llama_model_quantize.

* every mix of the synthetic Llama (rows multiples of 256) loads and generates in llama.cpp;
* for the same F16 input, ggq's file has llama.cpp's tensor types, order, metadata and size, and
  per-tensor error no worse than llama.cpp's (ratio <= 1.001);
* errors (quantized input without --allow-requantize, existing output, bad type/pattern) are
  one-line GGQErrors, and the CLI prints them without a traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType, GGUFReader, dequantize

from ggq.cli import main
from ggq.convert.mixes import MixOverrides
from ggq.convert.requantize import requantize
from ggq.errors import GGQError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_mixes import _ref, llamacpp_mix, read_table, smollm2_f16, synth_f16, synth_hf  # noqa: E402,F401

T = GGMLQuantizationType
K_MIXES = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("requant")


def _generate(path: Path, n: int = 8) -> list[int]:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=2, verbose=False, seed=1)
    toks = llm.tokenize(b"Once upon a time")
    out = []
    for t in llm.generate(toks, temp=0.0):
        out.append(t)
        if len(out) >= n:
            break
    assert len(out) == n and all(0 <= t < llm.n_vocab() for t in out)
    return out


def _tensor_errors(path: Path, f16: Path) -> dict[str, float]:
    ref = {t.name: dequantize(t.data, t.tensor_type).astype(np.float64) for t in GGUFReader(f16).tensors}
    out = {}
    for t in GGUFReader(path).tensors:
        if t.tensor_type in (T.F32, T.F16):
            continue
        x = dequantize(t.data, t.tensor_type).astype(np.float64)
        out[t.name] = float(np.sqrt(np.mean((x - ref[t.name]) ** 2)))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mix", K_MIXES + ["Q8_0", "Q4_0"])
def test_requantize_synthetic_matches_llamacpp_and_generates(synth_f16, out_dir, mix):
    out = requantize(synth_f16, out_dir / f"synth-{mix}.gguf", mix, progress=False)
    ref = llamacpp_mix(synth_f16, mix)
    kv, tensors = read_table(out)
    rkv, rtensors = read_table(ref)
    assert [(n, ne, t) for n, ne, t in tensors] == rtensors
    assert {k: v for k, v in kv.items() if v is not None} == {k: v for k, v in rkv.items() if v is not None}
    assert out.stat().st_size == ref.stat().st_size
    ours, theirs = _tensor_errors(out, synth_f16), _tensor_errors(ref, synth_f16)
    worse = {n: ours[n] / theirs[n] for n in ours if theirs[n] > 0 and ours[n] > theirs[n] * 1.001}
    assert not worse, f"{mix}: tensors with RMSE above llama.cpp's: {worse}"
    _generate(out)


@pytest.mark.slow
def test_requantize_smollm2_q4_k_m(smollm2_f16, out_dir):
    """Real weights, many 32-block fallbacks (rows of 576): same types and size as llama.cpp."""
    out = requantize(smollm2_f16, out_dir / "smollm2-Q4_K_M.gguf", "Q4_K", progress=False)
    ref = llamacpp_mix(smollm2_f16, "Q4_K_M")
    assert read_table(out)[1] == read_table(ref)[1]
    assert out.stat().st_size == ref.stat().st_size


@pytest.mark.slow
def test_overrides_and_requantize_from_quantized(synth_f16, out_dir):
    ov = MixOverrides.parse(output_tensor_type="q8_0", token_embedding_type="q4_0", tensor_types=["ATTN_V=q8_0"])
    out = requantize(synth_f16, out_dir / "ov.gguf", "Q4_K_M", overrides=ov, progress=False)
    types = {n: t for n, _, t in read_table(out)[1]}
    assert types["output.weight"] == T.Q8_0 and types["token_embd.weight"] == T.Q4_0
    assert types["blk.3.attn_v.weight"] == T.Q8_0
    # a quantized input needs allow_requantize
    with pytest.raises(GGQError, match="allow-requantize"):
        requantize(out, out_dir / "re.gguf", "Q6_K", progress=False)
    assert not (out_dir / "re.gguf").exists()
    re = requantize(out, out_dir / "re.gguf", "Q6_K", allow_requantize=True, progress=False)
    assert {n: t for n, _, t in read_table(re)[1]}["blk.0.ffn_up.weight"] == T.Q6_K
    _generate(re, 4)


def test_errors(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(GGQError, match="not a GGUF"):
        requantize(bad, tmp_path / "o.gguf", "Q4_K_M", progress=False)
    with pytest.raises(GGQError, match="no such file"):
        requantize(tmp_path / "missing.gguf", tmp_path / "o.gguf", "Q4_K_M", progress=False)
    with pytest.raises(GGQError, match="valid types"):
        requantize(bad, tmp_path / "o.gguf", "Q4_K_X", progress=False)
    from ggq.convert.imatrix import save_imatrix

    im = save_imatrix(tmp_path / "im.gguf", {"blk.0.attn_q.weight": np.ones((1, 32), np.float32)},
                      {"blk.0.attn_q.weight": [1]}, datasets=["x"], chunk_count=1, chunk_size=1)
    with pytest.raises(GGQError, match="not a model file.*imatrix"):
        requantize(im, tmp_path / "o.gguf", "Q4_K_M", progress=False)
    (tmp_path / "exists.gguf").write_bytes(b"")
    with pytest.raises(GGQError, match="exists"):
        requantize(bad, tmp_path / "exists.gguf", "Q4_K_M", progress=False)


def test_cli_errors(tmp_path):
    r = CliRunner()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF\x03\x00")
    res = r.invoke(main, ["quantize", str(bad), str(tmp_path / "o.gguf"), "Q4_K_Z"])
    assert res.exit_code == 1 and "ggq: error: unknown file type 'Q4_K_Z'" in res.output
    assert "Traceback" not in res.output
    res = r.invoke(main, ["quantize", str(bad), str(tmp_path / "o.gguf"), "Q4_K", "--tensor-type", "attn_v"])
    assert res.exit_code == 1 and "PATTERN=TYPE" in res.output
    res = r.invoke(main, ["quantize", str(bad), str(tmp_path / "o.gguf"), "Q4_K", "--output-tensor-type", "q7"])
    assert res.exit_code == 1 and "unknown tensor type 'q7'" in res.output
    res = r.invoke(main, ["quantize", str(bad), str(tmp_path / "o.gguf"), "Q4_K"])
    assert res.exit_code == 1 and "malformed GGUF" in res.output and str(bad) in res.output
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.slow
def test_cli_quantize(synth_f16, tmp_path):
    out = tmp_path / "cli.gguf"
    res = CliRunner().invoke(main, ["quantize", str(synth_f16), str(out), "q5_k_s", "-q"])
    assert res.exit_code == 0, res.output
    assert read_table(out)[0]["general.file_type"] == 16
    res = CliRunner().invoke(main, ["quantize", str(synth_f16), str(out), "q5_k_s", "-q"])
    assert res.exit_code == 1 and "exists" in res.output


def _llamacpp_quantize(inp: Path, out: Path, mix: str, imatrix: dict | None = None,
                       tensor_types: list[tuple[str, int]] = (), output_tensor_type: int | None = None,
                       token_embedding_type: int | None = None) -> Path:
    """llama_model_quantize with an imatrix and overrides, built with llama-cpp-python's ctypes structs."""
    import ctypes

    llama_cpp = pytest.importorskip("llama_cpp")
    ref = _ref()
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = 2
    params.ftype = ref.FTYPES[mix]
    if output_tensor_type is not None:
        params.output_tensor_type = output_tensor_type
    if token_embedding_type is not None:
        params.token_embedding_type = token_embedding_type
    keep = []
    if imatrix:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (k, v) in enumerate(imatrix.items()):
            v = np.ascontiguousarray(v, dtype=np.float32)
            keep.append(v)
            arr[i].name = k.encode()
            arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = v.size
        arr[len(imatrix)].name = None
        params.imatrix = arr
        keep.append(arr)
    if tensor_types:
        tts = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (p, t) in enumerate(tensor_types):
            tts[i].pattern = p.encode()
            tts[i].type = int(t)
        tts[len(tensor_types)].pattern = None
        params.tt_overrides = tts
        keep.append(tts)
    rc = llama_cpp.llama_model_quantize(str(inp).encode(), str(out).encode(), ctypes.byref(params))
    assert rc == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mix", ["Q4_K_M", "Q3_K_S", "Q4_0"])
def test_imatrix_and_overrides_match_llamacpp(synth_f16, out_dir, mix):
    """Same imatrix and --tensor-type/--output-tensor-type overrides: llama.cpp's types, and its
    blocks bit for bit on most tensors (error never worse)."""
    _ref()
    rng = np.random.default_rng(1)
    _, f16_tensors = read_table(synth_f16)
    imat = {n: rng.gamma(1.0, 1.0, ne[0]).astype(np.float32) for n, ne, _ in f16_tensors
            if n.startswith("blk.") and len(ne) == 2}
    tts = [("ffn_up", T.Q5_K), (r"blk\.[01]\.attn_q", T.Q8_0)]
    ref = _llamacpp_quantize(synth_f16, out_dir / f"lc-im-{mix}.gguf", mix, imatrix=imat, tensor_types=tts,
                             output_tensor_type=int(T.Q5_K))
    ov = MixOverrides(output_tensor_type=T.Q5_K, tensor_types=tts)
    out = requantize(synth_f16, out_dir / f"ggq-im-{mix}.gguf", mix, imatrix=imat, overrides=ov, progress=False)
    assert read_table(out)[1] == read_table(ref)[1]
    a, b = GGUFReader(out), GGUFReader(ref)
    f16 = {t.name: dequantize(t.data, t.tensor_type).astype(np.float64) for t in GGUFReader(synth_f16).tensors}
    same = 0
    for ta, tb in zip(a.tensors, b.tensors):
        same += np.array_equal(np.asarray(ta.data), np.asarray(tb.data))
        if ta.tensor_type in (T.F32, T.F16) or ta.name not in imat:
            continue
        w = imat[ta.name]
        ea = np.sum(w * (dequantize(ta.data, ta.tensor_type) - f16[ta.name]) ** 2)
        eb = np.sum(w * (dequantize(tb.data, tb.tensor_type) - f16[ta.name]) ** 2)
        assert ea <= eb * 1.001, f"{mix} {ta.name}: weighted error {ea:.4g} vs llama.cpp {eb:.4g}"
    assert same >= 0.9 * len(a.tensors)
    types = {n: t for n, _, t in read_table(out)[1]}
    assert types["blk.0.attn_q.weight"] == T.Q8_0 and types["blk.5.ffn_up.weight"] == T.Q5_K
    assert types["output.weight"] == T.Q5_K
