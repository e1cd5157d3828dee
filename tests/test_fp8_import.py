"""FP8 import: real checkpoints made by transformers (``quant_method: fp8``) and compressed-tensors
(``float-quantized``) on the CPU (tests/fp8_checkpoints.py).

References are independent of ggq: torch's float8 dtypes for the byte tables, transformers'
``_dequantize_fp8_weight`` and compressed-tensors' ``dequantize`` for the weights, ggq's Q8_0
quantizer on those weights for the dequantize-then-quantize baseline, transformers and llama.cpp
for the logits.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parent))
pytest.importorskip("torch")
pytest.importorskip("compressed_tensors")

import bnb_checkpoints as bc  # noqa: E402
import fp8_checkpoints as fc  # noqa: E402
from import_helpers import TOKENS, _gguf_name, _gguf_order, _gguf_tensors  # noqa: E402

from ggq import quants  # noqa: E402
from ggq.convert.checkpoint import open_checkpoint  # noqa: E402
from ggq.convert.quantized import prepare  # noqa: E402
from ggq.convert.quantized.fp8 import E4M3, E5M2, e8m0_values, fp8_to_q8_0  # noqa: E402
from ggq.errors import GGQError  # noqa: E402

KINDS = fc.KINDS
#: every FP8 checkpoint: e4m3fn (transformers, compressed-tensors) and e5m2 (``fmt: e5m2``)
ALL_KINDS = fc.KINDS + fc.E5M2_KINDS


@pytest.fixture(scope="session")
def fp8_dirs(cache_dir, stories_dir):
    return {k: fc.build(cache_dir, stories_dir, k) for k in ALL_KINDS}


def test_byte_tables_match_torch():
    import torch

    b = torch.arange(256, dtype=torch.uint8)
    for table, dt in ((E4M3, torch.float8_e4m3fn), (E5M2, torch.float8_e5m2)):
        ref = b.view(dt).float().numpy()
        assert np.array_equal(np.isnan(table), np.isnan(ref))
        ok = ~np.isnan(ref)
        assert np.array_equal(table[ok], ref[ok]) and np.array_equal(np.signbit(table[ok]), np.signbit(ref[ok]))
    if hasattr(torch, "float8_e8m0fnu"):
        ref = b.view(torch.float8_e8m0fnu).float().numpy()
        got = e8m0_values(np.arange(256, dtype=np.uint8))
        assert np.array_equal(np.isnan(got), np.isnan(ref)) and np.array_equal(got[:255], ref[:255])


def _safetensors_dtypes(d: Path) -> set:
    import struct

    with open(d / "model.safetensors", "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


@pytest.mark.parametrize("kind", fc.E5M2_KINDS)
def test_e5m2_checkpoints_are_e5m2(fp8_dirs, kind):
    """The e5m2 fixtures hold float8_e5m2 weights (safetensors ``F8_E5M2``), no e4m3fn, and say so."""
    d = fp8_dirs[kind]
    dts = _safetensors_dtypes(d)
    assert "F8_E5M2" in dts and "F8_E4M3" not in dts, dts
    assert json.loads((d / "config.json").read_text())["quantization_config"]["fmt"] == "e5m2"


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_loader_is_library_dequantization(fp8_dirs, kind):
    d = fp8_dirs[kind]
    ref = fc.reference_dequantize(d)
    ck = open_checkpoint(d)
    info = prepare(ck)
    assert info.n_tensors == len(ref) == 14 and info.default_type == "Q8_0"
    assert info.fmt == ("fp8" if kind.startswith("fp8") else "float-quantized")
    assert info.stats["activations"]  # reported, ignored
    assert not [k for k in ck.tensors if "scale" in k]
    for name, w in ref.items():
        got = ck.tensors[name].load()
        assert got.dtype == np.float32 and np.array_equal(got, w), name


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_q8_0_never_worse_than_baseline(fp8_dirs, kind):
    d = fp8_dirs[kind]
    ck = open_checkpoint(d)
    prepare(ck)
    mine = base = 0.0
    for name, w in fc.reference_dequantize(d).items():
        got = quants.dequantize(ck.tensors[name].native("Q8_0"), T.Q8_0).astype(np.float64)
        b = quants.dequantize(quants.quantize(w, T.Q8_0), T.Q8_0).astype(np.float64)
        e_mine = ((got - w) ** 2).reshape(w.shape[0], -1, 32).sum(-1)
        e_base = ((b - w) ** 2).reshape(w.shape[0], -1, 32).sum(-1)
        assert (e_mine <= e_base).all(), name
        mine += e_mine.sum()
        base += e_base.sum()
    assert mine < 0.7 * base, (mine, base)  # measured: about 0.45x the squared error


def test_fp8_blocks_within_4_binades_are_exact():
    """Values within 4 binades of the block's largest, a power-of-two scale: Q8_0 holds them exactly."""
    rng = np.random.default_rng(1)
    b = rng.integers(0, 256, size=(8, 64)).astype(np.uint8)
    v = E4M3[b]
    v = np.where(np.isnan(v), 0, v)
    m = np.abs(v).reshape(8, 2, 32).max(-1, keepdims=True)
    v = np.where(np.abs(v).reshape(8, 2, 32) >= m / 8, v.reshape(8, 2, 32), 0).reshape(8, 64).astype(np.float32)
    s = np.full_like(v, 2.0 ** -9)
    w = v * s
    data, st = fp8_to_q8_0(v, s, w)
    assert st["exact"] == 1.0
    assert np.array_equal(quants.dequantize(data, T.Q8_0), w)


def test_e5m2_blocks_within_5_binades_are_exact():
    """e5m2 has 2 mantissa bits, so the aligned step keeps values within 5 binades of the block's
    largest (codes up to 112); torch's float8_e5m2 is the reference for the values."""
    import torch

    rng = np.random.default_rng(2)
    b = rng.integers(0, 256, size=(8, 64)).astype(np.uint8)
    v = torch.from_numpy(b).view(torch.float8_e5m2).float().numpy()
    v = np.where(np.isfinite(v), v, 0).reshape(8, 2, 32)
    m = np.abs(v).max(-1, keepdims=True)
    v = np.where(np.abs(v) >= m / 16, v, 0).reshape(8, 64).astype(np.float32)
    s = np.full_like(v, 2.0 ** -14)
    w = v * s
    data, st = fp8_to_q8_0(v, s, w)
    assert st["exact"] == 1.0
    assert np.array_equal(quants.dequantize(data, T.Q8_0), w)


# ------------------------------------------------------------------------ conversion

def _convert(d: Path, out: Path, qtype=None, report=None) -> Path:
    from ggq.convert.pipeline import convert

    return convert(str(d), str(out), qtype=qtype, force=True, progress=False, import_report=report)


@pytest.mark.parametrize("kind", ["fp8-block", "ct-fp8-channel", "fp8-e5m2-block", "fp8-e5m2-channel"])
@pytest.mark.parametrize("qtype", [None, "F32", "BF16", "Q6_K"])
def test_convert(fp8_dirs, kind, qtype, tmp_path, capfd):
    d = fp8_dirs[kind]
    path = _convert(d, tmp_path / "out.gguf", qtype, report=tmp_path / "r.tsv")
    err = capfd.readouterr().err
    assert "import: 14 tensors" in err
    if qtype is None:  # e5m2's 2 mantissa bits: one binade more is kept exactly than with e4m3's 3
        assert ("within 5 binades" if "e5m2" in kind else "within 4 binades") in err
    rows = [r.split("\t") for r in (tmp_path / "r.tsv").read_text().splitlines()[1:]]
    assert len(rows) == 14
    got = _gguf_tensors(path)
    for k, w in fc.reference_dequantize(d).items():
        t, data = got[_gguf_name(k)]
        w = _gguf_order(k, w)
        if qtype is None:
            assert t == T.Q8_0
        elif qtype == "F32":
            assert t == T.F32 and np.array_equal(data, w)
        elif qtype == "BF16":
            assert t == T.BF16 and np.array_equal(data.view(np.uint8), quants.quantize(w, T.BF16).view(np.uint8))
        else:
            assert np.array_equal(data, quants.quantize(w, t)), k
    for r in rows:
        assert float(r[3]) <= float(r[6]), r  # rms <= baseline rms


@pytest.mark.slow
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_logits_llama_cpp_and_transformers(fp8_dirs, kind, tmp_path):
    """F32 GGUF == a float32 Llama holding the library's dequantized weights; the default Q8_0 GGUF
    agrees with transformers (which loads FP8 on a CPU by dequantizing to bf16) about as closely in
    llama.cpp as in ggq's runtime, and is closer to the exact logits than dequantize-then-quantize
    is... or as close, within noise. e5m2 too: transformers loads a ``fmt: e5m2`` checkpoint's
    float8_e5m2 weights and block/tensor scales (asserted: its logits are those of the dequantized
    weights up to its bf16 arithmetic); it does not read AutoFP8's per-row ``weight_scale`` (it drops
    the scales), so the per-row e5m2 checkpoint is compared with the exact float32 model only."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from ggq.runtime.model import Model

    d = fp8_dirs[kind]
    exact = bc.exact_logits(d, TOKENS, fc.reference_dequantize(d))
    spread = float(exact.std())

    def run(path):
        llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, n_batch=64, logits_all=True, verbose=False,
                              type_k=0, type_v=0)
        llm.eval(TOKENS)
        lc = np.array(llm.scores[:len(TOKENS)], np.float64)
        return lc, Model.load(path, n_ctx=64, n_threads=2).eval(TOKENS, all_logits=True).astype(np.float64)

    def rms(a, b):
        return float(np.sqrt(np.mean((a - b) ** 2)))

    lc, g = run(_convert(d, tmp_path / "f32.gguf", "F32"))
    assert rms(lc, exact) < 1e-4 * spread and rms(g, exact) < 1e-4 * spread
    lc, g = run(_convert(d, tmp_path / "q8.gguf"))
    assert rms(lc, exact) < 0.05 * spread
    if kind in ("fp8-ue8m0", "fp8-e5m2-channel"):
        return  # transformers 5.24 cannot read its own UE8M0 scales from safetensors (unknown dtype F8_E8M0)
    hf = bc.hf_logits(d, TOKENS)
    if kind in fc.E5M2_KINDS:
        assert rms(hf, exact) < 0.02 * spread  # transformers read the e5m2 checkpoint as ggq did (measured 0.006)
    e_lc, e_g = rms(lc, hf), rms(g, hf)
    assert e_lc <= 1.25 * e_g + 0.01 * spread and e_g <= 1.25 * e_lc + 0.01 * spread, (e_lc, e_g)


# ------------------------------------------------------------------------ hostile files

def _edit(d: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    t = load_file(str(d / "model.safetensors"))
    fn(t)
    save_file({k: v.contiguous() for k, v in t.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})


Q = "model.layers.0.self_attn.q_proj"


def _nan_weight(t):
    import torch

    w = t[Q + ".weight"].view(torch.uint8).clone()
    w[0, 0] = 0x7F  # e4m3fn NaN
    t[Q + ".weight"] = w.view(torch.float8_e4m3fn)


@pytest.mark.parametrize("kind,edit,config,message", [
    ("fp8-block", lambda t: t.__setitem__(Q + ".weight_scale_inv", t[Q + ".weight_scale_inv"][:1].clone()), None,
     "weight_scale_inv' is F32 \\[1, 2\\], scales of 128x128 blocks need"),
    ("fp8-block", lambda t: t.pop(Q + ".weight_scale_inv"), None, "has no 'model.layers.0.self_attn.q_proj.weight_scale_inv'"),
    ("fp8-block", None, dict(fmt="e3m4"), "fp8 fmt 'e3m4' is not supported"),
    ("fp8-block", None, dict(weight_block_size=[128]), "weight block size \\[128\\] is not two positive integers"),
    ("fp8-block", _nan_weight, None, "NaN or infinite fp8 values"),
    ("fp8-e5m2-block", lambda t: t.__setitem__(Q + ".weight", t[Q + ".weight"][:, :0].clone()), None,
     "is F8_E5M2 \\[256, 0\\], an fp8 layer needs a matrix"),
    ("fp8-e5m2-channel", lambda t: t.__setitem__(Q + ".weight_scale", t[Q + ".weight_scale"] * float("inf")), None,
     "non-finite scales"),
    ("fp8-block", None, dict(quant_method="gptq", bits=4), "no tensor of the checkpoint is packed"),
    ("ct-fp8-channel", lambda t: t.__setitem__(Q + ".weight_scale", t[Q + ".weight_scale"][:3].clone()), None,
     "weight_scale' is BF16 \\[3, 1\\], channel-strategy scales need"),
    ("ct-fp8-channel", lambda t: t.__setitem__(Q + ".weight_scale", t[Q + ".weight_scale"] * float("inf")), None,
     "non-finite scales"),
])
def test_hostile_checkpoints(fp8_dirs, tmp_path, kind, edit, config, message):
    d = tmp_path / "bad"
    shutil.copytree(fp8_dirs[kind], d)
    if edit is not None:
        _edit(d, edit)
    if config is not None:
        c = json.loads((d / "config.json").read_text())
        c["quantization_config"].update(config)
        (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(GGQError, match=message) as e:
        if config and config.get("quant_method") == "gptq":
            prepare(open_checkpoint(d))
        else:
            _convert(d, tmp_path / "bad.gguf")
    assert "\n" not in str(e.value) and str(d) in str(e.value)


def test_fp8_tensor_without_config(fp8_dirs, tmp_path):
    d = tmp_path / "noconfig"
    shutil.copytree(fp8_dirs["fp8-block"], d)
    c = json.loads((d / "config.json").read_text())
    del c["quantization_config"]
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(GGQError, match="is F8_E4M3, but config.json has no fp8 quantization_config"):
        _convert(d, tmp_path / "x.gguf")


@pytest.mark.parametrize("per_row", [False, True])
def test_autofp8_weight_scale_names(fp8_dirs, tmp_path, per_row):
    """AutoFP8 / older vLLM FP8 checkpoints: the multiplying scale is ``P.weight_scale`` (one value,
    or one per row) with a static ``P.input_scale``: the transformers-made per-tensor checkpoint with
    its tensors renamed so (a per-row copy repeats the tensor's scale on every row)."""
    import torch

    src = fp8_dirs["fp8-tensor"]
    d = tmp_path / "autofp8"
    shutil.copytree(src, d)

    def rename(t):
        for k in [k for k in t if k.endswith(".weight_scale_inv")]:
            s = t.pop(k)
            w = t[k[: -len("_scale_inv")]]
            t[k[: -len("_inv")]] = s.reshape(1, 1).expand(w.shape[0], 1).clone() if per_row else s.reshape(())
            t[k[: -len("weight_scale_inv")] + "input_scale"] = torch.tensor(0.5)

    _edit(d, rename)
    c = json.loads((d / "config.json").read_text())
    c["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "static"}
    (d / "config.json").write_text(json.dumps(c))
    ck = open_checkpoint(d)
    info = prepare(ck)
    assert info.n_tensors == 14 and info.stats["activations"] == "activation_scheme static"
    assert not [k for k in ck.tensors if "scale" in k]
    for name, w in fc.reference_dequantize(src).items():
        assert np.array_equal(ck.tensors[name].load(), w), name


@pytest.mark.parametrize("key,value,message", [
    ("block_structure", float("nan"), "weight block size nan is not two positive integers"),
    ("block_structure", None, "weight block size \\[\\] is not two positive integers"),
    ("block_structure", {"a": 1}, "is not two positive integers"),
    ("block_structure", [128, "128"], "is not two positive integers"),
    ("group_size", [64], "group strategy without a positive integer group_size"),
])
def test_hostile_ct_weight_scheme(fp8_dirs, tmp_path, key, value, message):
    """compressed-tensors weight schemes with a block structure or group size of the wrong type (found by
    tools/fuzz_inputs.py: ``block_structure: NaN`` was a TypeError, reported as an internal error)."""
    d = tmp_path / "bad"
    shutil.copytree(fp8_dirs["ct-fp8-block"], d)
    c = json.loads((d / "config.json").read_text())
    for g in c["quantization_config"]["config_groups"].values():
        g["weights"][key] = value
        if key == "group_size":
            g["weights"]["strategy"] = "group"
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(GGQError, match=message) as e:
        _convert(d, tmp_path / "bad.gguf")
    assert "\n" not in str(e.value) and str(d) in str(e.value)
