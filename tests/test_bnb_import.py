"""BitsAndBytes import: real checkpoints made by transformers + bitsandbytes (tests/bnb_checkpoints.py).

References are independent of ggq: bitsandbytes' own ``functional.dequantize_4bit`` /
``int8_vectorwise_dequant`` for the weights, ggq's quantizer on those weights for the
dequantize-then-quantize baseline, transformers (running the bitsandbytes checkpoint, and a plain
float32 Llama holding bitsandbytes' dequantized weights) and llama.cpp for the logits.
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
import bnb_checkpoints as bc  # noqa: E402
from import_helpers import TOKENS, _gguf_name, _gguf_order, _gguf_tensors  # noqa: E402

from ggq import quants  # noqa: E402
from ggq.convert.checkpoint import open_checkpoint  # noqa: E402
from ggq.convert.quantized import prepare  # noqa: E402
from ggq.errors import GGQError  # noqa: E402

pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

KINDS = list(bc.KINDS)
@pytest.fixture(scope="session")
def bnb_dirs(cache_dir, stories_dir):
    return {k: bc.build(cache_dir, stories_dir, k) for k in KINDS}


# ------------------------------------------------------------------------ decoding

@pytest.mark.parametrize("kind", KINDS)
def test_loader_is_bitsandbytes_dequantization(bnb_dirs, kind):
    """Every layer's float32 weights are bit for bit what bitsandbytes dequantizes to."""
    d = bnb_dirs[kind]
    ref = bc.bnb_dequantize(d)
    ck = open_checkpoint(d)
    info = prepare(ck)
    kw, dtype = bc.KINDS[kind]
    assert info.method == "bitsandbytes" and info.n_tensors == len(ref) == 14
    assert info.bits == (8 if kind == "int8" else 4)
    assert info.fmt == (kw.get("bnb_4bit_quant_type") or "int8")
    assert info.default_type == ("Q8_0" if kind == "int8" else "Q4_K_M")
    if kind != "int8":
        assert info.stats["dtype"] == dtype and info.stats["nested"] == kind.endswith("-dq")
        assert info.group_size == 64
    assert not [k for k in ck.tensors if "absmax" in k or "quant_" in k or k.endswith((".SCB", "weight_format"))]
    for name, w in ref.items():
        got = ck.tensors[name].load()
        assert got.dtype == np.float32 and got.shape == w.shape
        assert np.array_equal(got, w), name


def test_int8_q8_0_least_loss(bnb_dirs):
    """LLM.int8 -> Q8_0 keeps the codes: within fp16's rounding of SCB/127 (2^-11 relative) of the
    exact weights, and never worse than dequantize-then-quantize, block for block."""
    d = bnb_dirs["int8"]
    import torch
    from safetensors.torch import load_file

    raw = {k: v.numpy() for k, v in load_file(str(d / "model.safetensors")).items()
           if ".layers." in k and v.dtype != torch.bfloat16}
    ref = bc.bnb_dequantize(d)
    ck = open_checkpoint(d)
    info = prepare(ck)
    assert info.lost("Q8_0") and "fp16" in info.lost("Q8_0")
    total = {"mine": 0.0, "base": 0.0}
    for name, w in ref.items():
        data = ck.tensors[name].native("Q8_0")
        assert data is not None and data.shape == (w.shape[0], w.shape[1] // 32 * 34)
        got = quants.dequantize(data, T.Q8_0)
        base = quants.dequantize(quants.quantize(w, T.Q8_0), T.Q8_0)
        e_mine = ((got.astype(np.float64) - w) ** 2).reshape(w.shape[0], -1, 32).sum(-1)
        e_base = ((base.astype(np.float64) - w) ** 2).reshape(w.shape[0], -1, 32).sum(-1)
        assert (e_mine <= e_base).all(), name
        total["mine"] += e_mine.sum()
        total["base"] += e_base.sum()
        # against the exact s * q (s = SCB / 127, float64): fp16's relative rounding, 2^-11
        q = raw[name].astype(np.float64)
        exact = q * (raw[name[: -len("weight")] + "SCB"].astype(np.float64) / 127)[:, None]
        kept = info.stats["int8"][name]["baseline"] == 0
        if kept:
            assert (np.abs(got - exact) <= np.abs(exact) * 2.0 ** -11 + 1e-12).all(), name
    assert total["mine"] * 100 < total["base"], total  # in practice ~400x less squared error


def test_int8_block_scale_choice():
    """The block scale search: a multiple r of the codes whose fp16(s / r) * r is closer to s."""
    from ggq.convert.quantized.bnb import int8_to_q8_0

    rng = np.random.default_rng(0)
    scb = (rng.random(64) * 0.5 + 0.01).astype(np.float32)
    q = rng.integers(-20, 21, size=(64, 64)).astype(np.int8)  # max |q| 20: multiples up to 6 fit
    q[:, 0] = 20
    data, st = int8_to_q8_0(q, scb)
    got = quants.dequantize(data, T.Q8_0).astype(np.float64)
    s = scb.astype(np.float64) / 127
    exact = q * s[:, None]
    plain = q * np.float16(s).astype(np.float64)[:, None]  # r = 1: d = fp16(s)
    assert st["r>1"] > 0.25
    assert ((got - exact) ** 2).sum() < ((plain - exact) ** 2).sum() / 2
    err_row = np.abs(got - exact).max(axis=1) / np.maximum(np.abs(exact).max(axis=1), 1e-30)
    assert (err_row <= 2.0 ** -11).all()
    q[:, 0] = q[:, 32] = 127  # no room for a multiple in either block: c = q, d = fp16(s)
    data, st = int8_to_q8_0(q, scb)
    assert st["r>1"] == 0
    plain = q * np.float16(s).astype(np.float64)[:, None]
    assert np.array_equal(quants.dequantize(data, T.Q8_0), plain.astype(np.float32))


# ------------------------------------------------------------------------ conversion

def _convert(d: Path, out: Path, qtype=None, report=None) -> Path:
    from ggq.convert.pipeline import convert

    return convert(str(d), str(out), qtype=qtype, force=True, progress=False, import_report=report)


def _read_report(path: Path) -> dict:
    lines = path.read_text().splitlines()
    head = lines[0].split("\t")
    return {r.split("\t")[0]: dict(zip(head, r.split("\t"), strict=True)) for r in lines[1:]}


@pytest.mark.parametrize("kind", KINDS)
def test_convert_default_and_report(bnb_dirs, kind, tmp_path, capfd):
    d = bnb_dirs[kind]
    path = _convert(d, tmp_path / f"{kind}.gguf", report=tmp_path / "report.tsv")
    err = capfd.readouterr().err
    assert "bitsandbytes import: 14 tensors" in err
    rep = _read_report(tmp_path / "report.tsv")
    assert len(rep) == 14
    ref = {_gguf_name(k): _gguf_order(k, w) for k, w in bc.bnb_dequantize(d).items()}
    got = _gguf_tensors(path)
    for name, w in ref.items():
        t, data = got[name]
        r = rep[name]
        assert r["type"] == t.name
        g = quants.dequantize(data, t)
        rms = float(np.sqrt(np.mean((g.astype(np.float64) - w) ** 2)))
        assert np.isclose(float(r["rms"]), rms, rtol=1e-4), name
        if kind == "int8":
            assert t == T.Q8_0 and r["codes_kept"] == "1"
            assert float(r["rms"]) <= float(r["baseline_rms"]) / 5, name
        else:
            assert t in (T.Q4_K, T.Q6_K, T.Q5_0, T.Q8_0)
            assert r["codes_kept"] == "0" and r["rms"] == r["baseline_rms"]
            # requantized with ggq's own quantizer, bit for bit
            assert np.array_equal(data, quants.quantize(w, t)), name


@pytest.mark.parametrize("kind,qtype", [("nf4-dq", "F32"), ("fp4", "F16"), ("nf4", "Q8_0"), ("fp4-dq", "Q5_K_M"),
                                        ("int8", "Q4_0")])
def test_convert_type_honoured(bnb_dirs, kind, qtype, tmp_path):
    d = bnb_dirs[kind]
    path = _convert(d, tmp_path / "out.gguf", qtype)
    got = _gguf_tensors(path)
    for k, w in bc.bnb_dequantize(d).items():
        t, data = got[_gguf_name(k)]
        w = _gguf_order(k, w)
        if qtype == "F32":
            assert t == T.F32 and np.array_equal(data, w)
        elif qtype == "F16":
            assert t == T.F16 and np.array_equal(data, w.astype(np.float16))  # fp4 of an fp16 model: exact
            assert np.array_equal(data.astype(np.float32), w)
        else:
            if qtype in ("Q8_0", "Q4_0"):
                assert t == T[qtype]
            assert np.array_equal(data, quants.quantize(w, t)), k


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_logits_llama_cpp_and_transformers(bnb_dirs, kind, tmp_path):
    """ggq's GGUFs in llama.cpp against transformers running the bitsandbytes checkpoint.

    F32 (bitsandbytes' dequantization, lossless) must give the logits of a float32 transformers
    Llama holding those weights (within float32 rounding); transformers' own bitsandbytes CPU
    kernels differ from both by their bf16 / int8 arithmetic. The default type's GGUF must agree
    with transformers about as closely in llama.cpp as in ggq's runtime (the same file)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from ggq.runtime.model import Model

    d = bnb_dirs[kind]
    hf = bc.hf_logits(d, TOKENS)
    exact = bc.exact_logits(d, TOKENS)
    spread = float(exact.std())

    def run(path):
        llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, n_batch=64, logits_all=True, verbose=False,
                              type_k=0, type_v=0)
        llm.eval(TOKENS)
        lc = np.array(llm.scores[:len(TOKENS)], np.float64)
        ggq = Model.load(path, n_ctx=64, n_threads=2).eval(TOKENS, all_logits=True).astype(np.float64)
        return lc, ggq

    def rms(a, b):
        return float(np.sqrt(np.mean((a - b) ** 2)))

    lc, g = run(_convert(d, tmp_path / "f32.gguf", "F32"))
    assert rms(lc, exact) < 1e-4 * spread and rms(g, exact) < 1e-4 * spread
    assert rms(hf, exact) < 0.1 * spread  # bitsandbytes' kernels: bf16 products, int8 activations

    lc, g = run(_convert(d, tmp_path / "default.gguf"))
    e_lc, e_g = rms(lc, hf), rms(g, hf)
    assert e_lc <= 1.25 * e_g + 0.01 * spread and e_g <= 1.25 * e_lc + 0.01 * spread, (e_lc, e_g)
    if kind == "int8":  # the codes are kept: the GGUF is as close to transformers as the float weights
        assert e_lc < 1.5 * rms(run(_convert(d, tmp_path / "f32b.gguf", "F32"))[0], hf) + 0.01 * spread


# ------------------------------------------------------------------------ hostile files

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit(d: Path, fn) -> None:
    """Apply ``fn`` to the checkpoint's tensors as numpy arrays (bf16 ones left as torch tensors)."""
    import torch
    from safetensors.torch import load_file, save_file

    t = {k: v if v.dtype == torch.bfloat16 else v.numpy() for k, v in load_file(str(d / "model.safetensors")).items()}
    fn(t)
    t = {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v)) for k, v in t.items()}
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})


def _qs(t: dict, layer="model.layers.0.self_attn.q_proj.weight") -> str:
    return next(k for k in t if k.startswith(layer + ".quant_state."))


def _set_qs(**kw):
    def fn(t):
        k = _qs(t)
        qs = json.loads(bytes(t[k]).decode())
        qs.update(kw)
        t[k] = np.frombuffer(json.dumps(qs).encode(), np.uint8).copy()
    return fn


Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize("kind,edit,message", [
    ("nf4-dq", lambda t: t.__setitem__(_qs(t), np.frombuffer(b"{not json", np.uint8).copy()), "not JSON"),
    ("nf4-dq", lambda t: t.__setitem__(_qs(t), np.zeros(5000, np.uint8)), "at most 4096 bytes"),
    ("nf4-dq", _set_qs(blocksize=48), "blocksize 48 is not one of"),
    ("nf4-dq", _set_qs(blocksize="64"), "blocksize '64'"),
    ("nf4-dq", _set_qs(shape=[256, 300]), "needs 38400 uint8 bytes"),
    ("nf4-dq", _set_qs(shape=[256]), "is not \\[out_features, in_features\\]"),
    ("nf4-dq", _set_qs(dtype="int8"), "dtype 'int8' is not one of"),
    ("nf4-dq", _set_qs(quant_type="fp4"), "quant_type 'fp4'"),
    ("nf4-dq", _set_qs(nested_offset="x"), "nested_offset 'x' is not a finite number"),
    ("nf4-dq", _set_qs(nested_blocksize=3), "nested_blocksize 3"),
    ("nf4-dq", lambda t: t.pop(Q + ".nested_absmax"), "nested_absmax is missing"),
    ("nf4-dq", lambda t: t.__setitem__(Q + ".absmax", t[Q + ".absmax"][:-1].copy()), "absmax' is U8 \\[1023\\], double-quantized absmax codes need U8 \\[1024\\]"),
    ("nf4", lambda t: t.pop(Q + ".absmax"), "has no absmax"),
    ("nf4", lambda t: t.__setitem__(Q + ".absmax", t[Q + ".absmax"].astype(np.float16)), "absmax' is F16 \\[1024\\], .* need F32"),
    ("nf4", lambda t: t.__setitem__(Q + ".quant_map", t[Q + ".quant_map"][::-1].copy()), "not bitsandbytes' NF4 code book"),
    ("fp4", lambda t: t.__setitem__(Q, t[Q][:-1].copy()), "needs 32768 uint8 bytes"),
    ("fp4", lambda t: t.pop(Q), "has no packed weight"),
    ("int8", lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.SCB", np.ones(5, np.float32)), "SCB' is F32 \\[5\\], the row scales .* need F32/F16/BF16 \\[256\\]"),
    ("int8", lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.weight_format", np.array(1, np.uint8)),
     "is not 0"),
    ("int8", lambda t: t.__setitem__(Q, t[Q].astype(np.float32)), "needs an int8 matrix"),
])
def test_hostile_checkpoints(bnb_dirs, tmp_path, kind, edit, message):
    d = _copy(bnb_dirs[kind], tmp_path / "bad")
    _edit(d, edit)
    with pytest.raises(GGQError, match=message) as e:
        ck = open_checkpoint(d)
        prepare(ck)
        for s in ck.tensors.values():
            if s.dtype.startswith("BNB"):
                s.load()
    assert "\n" not in str(e.value) and str(d) in str(e.value)


def test_hostile_values_on_load(bnb_dirs, tmp_path):
    d = _copy(bnb_dirs["nf4"], tmp_path / "nan")
    _edit(d, lambda t: t[Q + ".absmax"].__setitem__(3, np.nan))
    ck = open_checkpoint(d)
    prepare(ck)
    with pytest.raises(GGQError, match="absmax' has non-finite values"):
        ck.tensors[Q].load()


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("kind,edit,message", [
    ("fp4", lambda t: t[Q + ".absmax"].__setitem__(3, 1e30), "scales of 'model.layers.0.self_attn.q_proj.weight' "
     "\\(absmax\\) put its weights beyond float16's range"),
    ("nf4-dq", _set_qs(nested_offset=3.4e38), "\\(absmax, nested_absmax, nested_offset\\) "
     "put its weights beyond bfloat16's range"),
    ("int8", lambda t: t["model.layers.0.self_attn.q_proj.SCB"].__setitem__(0, 3e38),
     "SCB' puts the weights of 'model.layers.0.self_attn.q_proj.weight' beyond float32's range"),
])
def test_finite_scales_beyond_range(bnb_dirs, tmp_path, kind, edit, message):
    """Finite scales whose products leave the model's float type (found by tools/fuzz_inputs.py: numpy's
    overflow warning, then an error about the weight's non-finite values): one line naming the scales."""
    d = _copy(bnb_dirs[kind], tmp_path / "big")
    _edit(d, edit)
    ck = open_checkpoint(d)
    prepare(ck)
    with pytest.raises(GGQError, match=message) as e:
        ck.tensors[Q].load()
    assert "\n" not in str(e.value) and str(d) in str(e.value)


@pytest.mark.parametrize("change,message", [
    (dict(load_in_4bit=False, _load_in_4bit=False), "exactly one of load_in_4bit and load_in_8bit"),
    (dict(bnb_4bit_quant_type="int4"), "bnb_4bit_quant_type 'int4' is not supported"),
    (dict(bnb_4bit_quant_storage="bfloat16"), "bnb_4bit_quant_storage 'bfloat16' is not supported"),
    (dict(bnb_4bit_quant_type="fp4"), "is not the fp4 that config.json announces"),
    (dict(load_in_4bit=False, _load_in_4bit=False, load_in_8bit=True), "is a 4-bit layer, config.json says load_in_8bit"),
])
def test_bad_config(bnb_dirs, tmp_path, change, message):
    d = _copy(bnb_dirs["nf4"], tmp_path / "cfg")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"].update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GGQError, match=message) as e:
        prepare(open_checkpoint(d))
    assert "\n" not in str(e.value) and "config.json" in str(e.value) or str(d) in str(e.value)



def test_import_report_needs_quantized_checkpoint(bnb_dirs, tmp_path):
    with pytest.raises(GGQError, match="--import-report needs a quantized checkpoint") as e:
        _convert(bnb_dirs["nf4"].parent / "base", tmp_path / "f.gguf", report=tmp_path / "r.tsv")
    assert "\n" not in str(e.value) and not (tmp_path / "f.gguf").exists()
