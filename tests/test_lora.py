"""LoRA / QLoRA adapters: ``ggq convert-lora``, ``ggq convert --lora`` and the runtime's ``--lora``.

References are independent of ggq: PEFT (the adapters are real PEFT adapters, tests/lora_checkpoints.py;
its logits with the adapter active and after ``merge_and_unload``), llama.cpp's
``convert_lora_to_gguf.py`` from the llama-cpp-python 0.3.36 source package (its file, byte for
byte) and llama.cpp itself through llama-cpp-python (``Llama(base, lora_path=adapter)``).
Errors are RMS of the logits difference over the 16 prompt positions, relative to the spread
(standard deviation) of PEFT's logits; ``-s`` prints them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import lora_checkpoints as lc  # noqa: E402
from import_helpers import TOKENS, _gguf_name, _gguf_order  # noqa: E402

from ggq.cli import main  # noqa: E402
from ggq.convert.lora import convert_lora  # noqa: E402
from ggq.convert.pipeline import convert  # noqa: E402

pytest.importorskip("torch")
pytest.importorskip("peft")

KEYS = ("general.architecture", "general.type", "adapter.type", "adapter.lora.alpha", "general.quantization_version")


@pytest.fixture(scope="module")
def peft_dirs(cache_dir, stories_dir):
    d = {"base": lc.base(cache_dir, stories_dir)}
    d.update({k: lc.adapter(cache_dir, stories_dir, k) for k in lc.ADAPTERS})
    return d


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("lora")


@pytest.fixture(scope="module")
def bases(peft_dirs, work):
    """ggq's GGUFs of the base model (F32, F16, Q8_0)."""
    return {t: convert(peft_dirs["base"], work / f"base-{t}.gguf", qtype=t, force=True, progress=False)
            for t in ("F32", "F16", "Q8_0")}


@pytest.fixture(scope="module")
def adapters(peft_dirs, work):
    """ggq's adapter GGUFs: {(adapter, outtype): path}."""
    out = {}
    for name in lc.ADAPTERS:
        for t in ("f32", "f16"):
            out[name, t] = convert_lora(peft_dirs[name], peft_dirs["base"], work / f"{name}-{t}.gguf", t, force=True)
    return out


def _rms(a, b) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - b) ** 2)))


def _kv(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


def _llama_cpp_logits(base: Path, lora: Path | None = None, scale: float = 1.0) -> np.ndarray:
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(base), lora_path=None if lora is None else str(lora), lora_scale=scale, n_ctx=64,
                          n_batch=64, n_threads=1, n_threads_batch=1, logits_all=True, verbose=False,
                          type_k=0, type_v=0)
    llm.eval(TOKENS)
    out = np.array(llm.scores[:len(TOKENS)], np.float64)
    llm.close()
    return out


def _ggq_logits(base: Path, loras=(), lora_type="same") -> np.ndarray:
    from ggq.runtime.model import Model

    m = Model.load(base, n_ctx=64, n_threads=1, loras=list(loras), lora_type=lora_type)
    return m.eval(TOKENS, all_logits=True).astype(np.float64)


# ------------------------------------------------------------------------ (a) the file format

@pytest.mark.slow
@pytest.mark.parametrize("outtype", ["f32", "f16", "bf16", "q8_0"])
def test_convert_lora_equals_llama_cpp_script(peft_dirs, work, cache_dir, outtype):
    """Same tensors (names, types, shapes, bytes) and key metadata as convert_lora_to_gguf.py."""
    ref = pytest.importorskip("llamacpp_ref")
    ours = convert_lora(peft_dirs["main"], peft_dirs["base"], work / f"ours-{outtype}.gguf", outtype, force=True)
    theirs = ref.convert_lora(peft_dirs["main"], peft_dirs["base"], work / f"theirs-{outtype}.gguf", outtype, cache_dir)
    _assert_same_adapter(ours, theirs)
    assert _kv(ours)["adapter.lora.alpha"] == 16
    o = {t.name for t in gguf.GGUFReader(ours).tensors}
    assert len(o) == 2 * 7 * 2 and "blk.0.attn_q.weight.lora_a" in o and "blk.1.ffn_down.weight.lora_b" in o


def _assert_same_adapter(ours: Path, theirs: Path) -> None:
    kv_o, kv_t = _kv(ours), _kv(theirs)
    for k in KEYS:
        assert k in kv_t and k in kv_o, k
        if isinstance(kv_t[k], float):
            assert kv_o[k] == pytest.approx(kv_t[k]), k
        else:
            assert kv_o[k] == kv_t[k], k
    assert kv_o["general.type"] == "adapter" and kv_o["adapter.type"] == "lora"
    o = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    t_ = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    assert set(o) == set(t_)
    for name, x in t_.items():
        y = o[name]
        assert (y.tensor_type, list(y.shape)) == (x.tensor_type, list(x.shape)), name
        assert y.data.tobytes() == x.data.tobytes(), name


def test_convert_lora_layout(peft_dirs, adapters):
    """lora_a is PEFT's A; lora_b is PEFT's B with Q/K rows in llama.cpp's order (independent of the script)."""
    from safetensors.numpy import load_file

    peft = load_file(str(peft_dirs["main"] / "adapter_model.safetensors"))
    got = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(adapters["main", "f32"]).tensors}
    for k, v in peft.items():
        hf = k.replace("base_model.model.", "").replace(".lora_A.weight", ".weight").replace(".lora_B.weight", ".weight")
        name = _gguf_name(hf)
        if ".lora_A." in k:
            assert np.array_equal(got[name + ".lora_a"], v), k
        else:
            assert np.array_equal(got[name + ".lora_b"], _gguf_order(hf, v)), k


# ------------------------------------------------------------------------ (b) llama.cpp applies it

@pytest.mark.slow
def test_llama_cpp_applies_our_adapter(peft_dirs, bases, adapters, work, cache_dir):
    """llama.cpp with ggq's adapter gives PEFT's logits, as closely as with the script's adapter."""
    ref = pytest.importorskip("llamacpp_ref")
    peft = lc.peft_logits(peft_dirs["base"], [peft_dirs["main"]], TOKENS)
    spread = float(peft.std())
    plain = _llama_cpp_logits(bases["F32"])
    assert _rms(plain, peft) > 0.05 * spread  # the adapter changes the logits
    for t in ("f32", "f16"):
        theirs = work / f"theirs-{t}.gguf"
        if not theirs.exists():
            ref.convert_lora(peft_dirs["main"], peft_dirs["base"], theirs, t, cache_dir)
        e_ours = _rms(_llama_cpp_logits(bases["F32"], adapters["main", t]), peft)
        e_theirs = _rms(_llama_cpp_logits(bases["F32"], theirs), peft)
        print(f"llama.cpp F32 base + {t} adapter vs PEFT: ours {e_ours / spread:.2e}, script {e_theirs / spread:.2e} "
              f"(relative RMS; no adapter {_rms(plain, peft) / spread:.3f})")
        assert e_ours <= 1.01 * e_theirs + 1e-6 * spread
        assert e_ours < (1e-4 if t == "f32" else 2e-3) * spread
    # rsLoRA + alpha_pattern: folded into lora_b, so llama.cpp gives PEFT's model
    peft_rs = lc.peft_logits(peft_dirs["base"], [peft_dirs["rslora"]], TOKENS)
    e = _rms(_llama_cpp_logits(bases["F32"], adapters["rslora", "f32"]), peft_rs)
    assert e < 1e-4 * float(peft_rs.std()), e


# ------------------------------------------------------------------------ (c) ggq's runtime

@pytest.mark.slow
@pytest.mark.parametrize("base_type", ["F32", "F16", "Q8_0"])
def test_runtime_lora_matches_peft(peft_dirs, bases, adapters, base_type):
    """ggq run --lora: the merged-at-load model against PEFT, next to llama.cpp on the same files.

    F32: both within float32 rounding. F16: the merged weights are rounded to F16 once more
    (llama.cpp keeps the F16 base and adds the adapter in float32): within 1.5x llama.cpp's error.
    Q8_0: the merged weights are requantized to Q8_0: stated tolerance 2x llama.cpp's error (measured
    1.25x: 0.040 against 0.032 of the logits' spread); with --lora-type f32 within 1.25x (measured
    0.027, below llama.cpp's: those matrices then take float activations)."""
    peft = lc.peft_logits(peft_dirs["base"], [peft_dirs["main"]], TOKENS)
    spread = float(peft.std())
    lora = [(str(adapters["main", "f32"]), 1.0)]
    g = _ggq_logits(bases[base_type], lora)
    lcpp = _llama_cpp_logits(bases[base_type], adapters["main", "f32"])
    e_g, e_lc = _rms(g, peft) / spread, _rms(lcpp, peft) / spread
    line = f"{base_type} base + adapter vs PEFT: ggq {e_g:.2e}, llama.cpp {e_lc:.2e}"
    if base_type == "F32":
        assert e_g < 1e-4 and e_lc < 1e-4, line
    elif base_type == "F16":
        assert e_g <= 1.5 * e_lc + 1e-4, line
    else:
        e_f = _rms(_ggq_logits(bases[base_type], lora, "f32"), peft) / spread
        line += f", ggq --lora-type f32 {e_f:.2e}"
        assert e_g <= 2.0 * e_lc + 1e-4, line
        assert e_f <= 1.25 * e_lc + 1e-4, line
    print(line)


@pytest.mark.slow
def test_runtime_several_adapters_and_scales(peft_dirs, bases, adapters, tmp_path):
    """Two adapters at once, the second at scale 0.5, plus the rsLoRA one: PEFT with all three active
    (scale 0.5 as lora_alpha halved, which is what PEFT's scaling means)."""
    half = lc.scaled_copy(peft_dirs["second"], tmp_path / "second-half", 0.5)
    peft = lc.peft_logits(peft_dirs["base"], [peft_dirs["main"], half, peft_dirs["rslora"]], TOKENS)
    g = _ggq_logits(bases["F32"], [(str(adapters["main", "f32"]), 1.0), (str(adapters["second", "f32"]), 0.5),
                                   (str(adapters["rslora", "f32"]), 1.0)])
    e = _rms(g, peft) / float(peft.std())
    print(f"three adapters (one at scale 0.5) on the F32 base vs PEFT: ggq {e:.2e}")
    assert e < 1e-4


def test_cli_generate_with_lora(bases, adapters):
    """`ggq generate --lora FILE:SCALE` runs (greedy) and differs from the base model's output."""
    args = ["generate", str(bases["F32"]), "-p", "Once upon a time", "-n", "8", "--temp", "0", "-t", "1"]
    r0 = CliRunner().invoke(main, args)
    r1 = CliRunner().invoke(main, args + ["--lora", f"{adapters['main', 'f16']}:2"])
    assert r0.exit_code == 0 and r1.exit_code == 0, (r0.output, r1.output)
    assert r0.output != r1.output


@pytest.mark.slow
def test_smollm2_adapter(smollm2_hf, cache_dir, tmp_path):
    """A real model: an adapter over SmolLM2-135M-Instruct (hidden 576, 9 heads / 3 KV heads). The
    file equals the script's (f16); on the F16 base ggq's runtime and llama.cpp agree with PEFT alike."""
    ref = pytest.importorskip("llamacpp_ref")
    ad = lc.smollm2_adapter(cache_dir, smollm2_hf)
    ours = convert_lora(ad, smollm2_hf, tmp_path / "ours.gguf", "f16")
    _assert_same_adapter(ours, ref.convert_lora(ad, smollm2_hf, tmp_path / "theirs.gguf", "f16", cache_dir))
    base = convert(smollm2_hf, tmp_path / "base-F16.gguf", qtype="F16", progress=False)
    peft = lc.peft_logits(smollm2_hf, [ad], TOKENS)
    spread = float(peft.std())
    e_plain = _rms(_llama_cpp_logits(base), peft) / spread
    e_lc = _rms(_llama_cpp_logits(base, ours), peft) / spread
    e_g = _rms(_ggq_logits(base, [(str(ours), 1.0)]), peft) / spread
    print(f"SmolLM2-135M F16 base + f16 adapter vs PEFT: ggq {e_g:.2e}, llama.cpp {e_lc:.2e} (no adapter {e_plain:.3f})")
    assert e_plain > 0.05 and e_lc < 0.01 and e_g <= 1.5 * e_lc + 1e-4


# ------------------------------------------------------------------------ (d) convert --lora

@pytest.mark.slow
def test_convert_merge_matches_peft_merged(peft_dirs, work, tmp_path):
    """`ggq convert BASE --lora A --lora B:0.5 --type F32`: the weights are PEFT's merge_and_unload
    (Q/K rows in GGUF order) and the logits PEFT's, in ggq's runtime and in llama.cpp."""
    half = lc.scaled_copy(peft_dirs["second"], tmp_path / "second-half", 0.5)
    out = convert(peft_dirs["base"], tmp_path / "merged.gguf", qtype="F32", force=True, progress=False,
                  loras=[str(peft_dirs["main"]), f"{peft_dirs['second']}:0.5"])
    from safetensors.numpy import load_file

    orig = load_file(str(peft_dirs["base"] / "model.safetensors"))
    main_w = lc.peft_merged_weights(peft_dirs["base"], peft_dirs["main"])
    half_w = lc.peft_merged_weights(peft_dirs["base"], half)
    got = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(out).tensors}
    for k, w in main_w.items():
        expect = orig[k] + (w - orig[k]) + (half_w[k] - orig[k])  # both deltas (zero where an adapter has no layer)
        assert np.allclose(got[_gguf_name(k)], _gguf_order(k, expect), rtol=0, atol=2e-6), k
    peft = lc.peft_logits(peft_dirs["base"], [peft_dirs["main"], half], TOKENS, merged=True)
    spread = float(peft.std())
    e_g = _rms(_ggq_logits(out), peft) / spread
    e_lc = _rms(_llama_cpp_logits(out), peft) / spread
    print(f"convert --lora (two adapters) F32 vs PEFT merged: ggq runtime {e_g:.2e}, llama.cpp {e_lc:.2e}")
    assert e_g < 1e-4 and e_lc < 1e-4


def test_convert_merge_from_gguf_adapter(peft_dirs, adapters, tmp_path):
    """`convert --lora` takes a GGUF adapter too: the same file as from the PEFT folder (F32 adapter)."""
    a = convert(peft_dirs["base"], tmp_path / "a.gguf", qtype="F16", progress=False, loras=[f"{peft_dirs['main']}:0.7"])
    b = convert(peft_dirs["base"], tmp_path / "b.gguf", qtype="F16", progress=False,
                loras=[f"{adapters['main', 'f32']}:0.7"])
    ta = {t.name: t.data.tobytes() for t in gguf.GGUFReader(a).tensors}
    tb = {t.name: t.data.tobytes() for t in gguf.GGUFReader(b).tensors}
    assert ta == tb
    plain = convert(peft_dirs["base"], tmp_path / "p.gguf", qtype="F16", progress=False)
    tp = {t.name: t.data.tobytes() for t in gguf.GGUFReader(plain).tensors}
    assert tp["blk.0.attn_q.weight"] != ta["blk.0.attn_q.weight"] and tp["output_norm.weight"] == ta["output_norm.weight"]


# ------------------------------------------------------------------------ (e) QLoRA

@pytest.mark.slow
def test_qlora_over_bitsandbytes_nf4(cache_dir, stories_dir, tmp_path):
    """An adapter trained over a 4-bit NF4 base: convert-lora against the bnb checkpoint, applied by
    llama.cpp and ggq to the exact (F32) dequantized base, and merged by `convert --lora`, all
    against PEFT on a float32 model holding bitsandbytes' own dequantization."""
    pytest.importorskip("bitsandbytes")
    import bnb_checkpoints as bc

    nf4, adapter = lc.qlora(cache_dir, stories_dir)
    deq = bc.bnb_dequantize(nf4)
    peft = lc.peft_logits(nf4, [adapter], TOKENS, weights=deq)
    spread = float(peft.std())
    a = convert_lora(adapter, nf4, tmp_path / "qlora.gguf", "f32")
    assert _kv(a)["adapter.type"] == "lora"
    base = convert(nf4, tmp_path / "nf4-F32.gguf", qtype="F32", progress=False)
    e_lc = _rms(_llama_cpp_logits(base, a), peft) / spread
    e_g = _rms(_ggq_logits(base, [(str(a), 1.0)]), peft) / spread
    merged = convert(nf4, tmp_path / "nf4-merged.gguf", qtype="F32", progress=False, loras=[str(adapter)])
    e_m = _rms(_ggq_logits(merged), peft) / spread
    print(f"QLoRA over NF4 vs PEFT on the dequantized base: llama.cpp + adapter {e_lc:.2e}, ggq --lora {e_g:.2e}, "
          f"convert --lora {e_m:.2e}")
    assert max(e_lc, e_g, e_m) < 1e-4
    # the default type (Q4_K_M): merging before quantization against llama.cpp / ggq applying the
    # adapter to the default GGUF of the bitsandbytes base
    merged_d = convert(nf4, tmp_path / "nf4-merged-default.gguf", progress=False, loras=[str(adapter)])
    base_d = convert(nf4, tmp_path / "nf4-default.gguf", progress=False)
    e_md = _rms(_ggq_logits(merged_d), peft) / spread
    e_lcd = _rms(_llama_cpp_logits(base_d, a), peft) / spread
    e_gd = _rms(_ggq_logits(base_d, [(str(a), 1.0)]), peft) / spread
    e_mlc = _rms(_llama_cpp_logits(merged_d), peft) / spread
    e_g8 = _rms(_ggq_logits(base_d, [(str(a), 1.0)], "q8_0"), peft) / spread
    print(f"QLoRA, default Q4_K_M: convert --lora in ggq {e_md:.3f} / in llama.cpp {e_mlc:.3f}; Q4_K_M base + "
          f"adapter: llama.cpp {e_lcd:.3f}, ggq --lora {e_gd:.3f}, ggq --lora-type q8_0 {e_g8:.3f}")
    assert e_md <= 1.5 * e_lcd and e_gd <= 1.5 * e_lcd and e_g8 <= 1.1 * e_lcd


# ------------------------------------------------------------------------ (f) hostile adapters

def _clean_error(r, *needles):
    assert r.exit_code == 1, (r.exit_code, r.output, r.exception)
    text = r.output.strip().splitlines()[-1] if r.output.strip() else ""
    assert text.startswith("ggq: error: ") and r.output.count("ggq: error") == 1, r.output
    assert "Traceback" not in r.output
    for n in needles:
        assert n in text, (n, text)


def _rewrite(src: Path, dst: Path, kv=None, tensors=None) -> Path:
    """A copy of adapter GGUF ``src`` with metadata ``kv`` changed ({key: value or None to drop})
    and tensors changed by ``tensors(dict name -> float32 array) -> dict``."""
    r = gguf.GGUFReader(src)
    md = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    md.update(kv or {})
    ts = {t.name: np.asarray(t.data, np.float32).copy() for t in r.tensors}
    if tensors is not None:
        ts = tensors(ts)
    w = gguf.GGUFWriter(str(dst), str(md.pop("general.architecture")))
    for k, v in md.items():
        if v is None:
            continue
        if isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
    for n, a in ts.items():
        w.add_tensor(n, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


Q = "blk.0.attn_q.weight"


@pytest.mark.parametrize("kv,tensors,needles", [
    ({"general.architecture": "qwen2"}, None, ["adapter for architecture 'qwen2'"]),
    ({"general.type": "model"}, None, ["not an adapter file"]),
    ({"adapter.type": "control_vector"}, None, ["only 'lora' adapters"]),
    ({"adapter.lora.alpha": float("nan")}, None, ["adapter.lora.alpha", "not a finite number"]),
    ({"adapter.lora.alpha": "16"}, None, ["adapter.lora.alpha", "not a finite number"]),
    (None, lambda t: {k: v for k, v in t.items() if k != Q + ".lora_b"}, ["has no blk.0.attn_q.weight.lora_b"]),
    (None, lambda t: {**t, Q + ".lora_b": t[Q + ".lora_b"][:, :4].copy()}, ["rank"]),
    (None, lambda t: {**t, Q + ".lora_a": t[Q + ".lora_a"][:, :128].copy()}, ["lora_b @ lora_a has ne [128, 256]"]),
    (None, lambda t: {**{k.replace("blk.0.", "blk.7."): v for k, v in t.items()}}, ["blk.7.", "is not in"]),
    (None, lambda t: {**t, "blk.0.attn_norm.weight": np.ones(256, np.float32)}, ["not a .lora_a or .lora_b"]),
    (None, lambda t: {**t, Q + ".lora_b": np.full_like(t[Q + ".lora_b"], np.inf)}, ["non-finite"]),
    (None, lambda t: {**t, "token_embd.weight.lora_a": np.zeros((8, 512), np.float32),
                      "token_embd.weight.lora_b": np.zeros((256, 8), np.float32)}, ["token embedding"]),
])
def test_hostile_adapter_gguf(bases, adapters, tmp_path, kv, tensors, needles):
    bad = _rewrite(adapters["main", "f32"], tmp_path / "bad.gguf", kv, tensors)
    r = CliRunner().invoke(main, ["generate", str(bases["F32"]), "-p", "x", "-n", "1", "--lora", str(bad)])
    _clean_error(r, "bad.gguf", *needles)


def test_adapter_for_another_base(stories_dir, peft_dirs, adapters, tmp_path):
    """The adapter of a hidden-256 model on stories260K (hidden 64): a shape error, one line."""
    base = convert(stories_dir, tmp_path / "stories.gguf", qtype="F32", progress=False)
    r = CliRunner().invoke(main, ["generate", str(base), "-p", "x", "-n", "1", "--lora", str(adapters["main", "f32"])])
    _clean_error(r, "lora_b @ lora_a has ne")
    r = CliRunner().invoke(main, ["convert-lora", str(peft_dirs["main"]), "--base", str(stories_dir),
                                  "-o", str(tmp_path / "x.gguf")])
    _clean_error(r, "but the base weight")
    assert not (tmp_path / "x.gguf").exists()


def test_serve_lora_error(bases, tmp_path):
    """`ggq serve --lora` loads the adapter before listening: a bad one is a one-line error."""
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF")
    r = CliRunner().invoke(main, ["serve", str(bases["F32"]), "--port", "0", "--lora", str(bad)])
    _clean_error(r, "bad.gguf")


def test_bad_lora_options(bases, adapters, tmp_path):
    r = CliRunner().invoke(main, ["generate", str(bases["F32"]), "-p", "x", "--lora", f"{adapters['main', 'f32']}:nan"])
    _clean_error(r, "finite")
    r = CliRunner().invoke(main, ["generate", str(bases["F32"]), "-p", "x", "--lora", str(tmp_path / "none.gguf")])
    _clean_error(r, "none.gguf")


def _copy_adapter(src: Path, dst: Path, cfg=None, edit=None) -> Path:
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    if cfg:
        c = json.loads((dst / "adapter_config.json").read_text())
        c.update(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(c))
    if edit:
        t = load_file(str(dst / "adapter_model.safetensors"))
        edit(t)
        save_file(t, str(dst / "adapter_model.safetensors"))
    return dst


QA = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.mark.parametrize("cfg,edit,needles", [
    ({"lora_alpha": float("nan")}, None, ["lora_alpha", "not a finite number"]),
    ({"peft_type": "IA3"}, None, ["peft_type 'IA3' is not LORA"]),
    ({"use_dora": True}, None, ["DoRA"]),
    ({"modules_to_save": ["lm_head"]}, None, ["modules_to_save"]),
    (None, lambda t: t.pop(QA), ["has lora_B but no lora_A"]),
    (None, lambda t: t.__setitem__(QA, t[QA][:, :100].copy()), ["is [256, 100] but the base weight"]),
    (None, lambda t: t.__setitem__(QA, t[QA][:4].copy()), ["rank"]),
    (None, lambda t: t.__setitem__(QA.replace("lora_A", "lora_embedding_A"), t[QA]), ["embedding adapters"]),
    (None, lambda t: t.__setitem__(QA, np.full_like(t[QA], np.nan)), ["non-finite"]),
    (None, lambda t: t.__setitem__("base_model.model.lm_head.weight", np.zeros((512, 256), np.float32)),
     ["fully trained module"]),
])
def test_hostile_peft_adapter(peft_dirs, tmp_path, cfg, edit, needles):
    bad = _copy_adapter(peft_dirs["main"], tmp_path / "bad", cfg, edit)
    out = tmp_path / "out"
    out.mkdir()
    r = CliRunner().invoke(main, ["convert-lora", str(bad), "--base", str(peft_dirs["base"]), "-o", str(out / "a.gguf")])
    _clean_error(r, *needles)
    r = CliRunner().invoke(main, ["convert", str(peft_dirs["base"]), "--lora", str(bad), "-o", str(out / "m.gguf")])
    _clean_error(r, *needles)
    assert not list(out.iterdir())


# ------------------------------------------------------------------------ (g) found by tools/fuzz_inputs.py

def test_convert_merge_rslora_matches_peft_merged(peft_dirs, tmp_path):
    """`convert BASE --lora RSLORA_DIR`: rsLoRA's and alpha_pattern's scaling (folded into the pair's
    factor) applied once, as PEFT's merge_and_unload does (it was applied twice: 0.85 off)."""
    out = convert(peft_dirs["base"], tmp_path / "m.gguf", qtype="F32", force=True, progress=False,
                  loras=[str(peft_dirs["rslora"])])
    ref = lc.peft_merged_weights(peft_dirs["base"], peft_dirs["rslora"])
    got = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(out).tensors}
    for k, w in ref.items():
        assert np.allclose(got[_gguf_name(k)], _gguf_order(k, np.asarray(w)), rtol=0, atol=2e-6), k


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_adapter_overflow_names_the_adapter(peft_dirs, bases, adapters, tmp_path):
    """A scale or alpha whose change overflows float32: one line naming the adapter (it blamed the
    base's tensor, or the model's NaN at run time, after numpy's overflow warning)."""
    out = tmp_path / "out"
    out.mkdir()
    r = CliRunner().invoke(main, ["convert", str(peft_dirs["base"]), "--lora", f"{peft_dirs['main']}:3e38",
                                  "-o", str(out / "m.gguf")])  # 3e38 * alpha / r = 6e38 > float32's 3.4e38
    _clean_error(r, str(peft_dirs["main"]), "overflows float32")
    assert not list(out.iterdir())
    r = CliRunner().invoke(main, ["generate", str(bases["Q8_0"]), "-p", "x", "-n", "1", "--lora",
                                  f"{adapters['main', 'f32']}:3e38"])
    _clean_error(r, "main-f32.gguf", "overflows float32")


@pytest.mark.parametrize("payload,needles", [
    (b"PK\x03\x04" + bytes(200), ["adapter_model.bin", "cannot read the pytorch checkpoint", "not a zip archive"]),
    (b"\x80\x02}q\x00.", ["adapter_model.bin", "cannot read the pytorch checkpoint"]),
    ("list", ["adapter_model.bin", "not a dict of named tensors"]),
])
def test_bad_adapter_bin(peft_dirs, tmp_path, payload, needles):
    """A damaged adapter_model.bin (torch's error text, with its exception name, was passed on), or
    a valid torch.save of something other than named tensors (a traceback)."""
    import shutil

    import torch

    bad = tmp_path / "bad"
    shutil.copytree(peft_dirs["main"], bad)
    (bad / "adapter_model.safetensors").unlink()
    if payload == "list":
        torch.save([torch.zeros(2)], bad / "adapter_model.bin")
    else:
        (bad / "adapter_model.bin").write_bytes(payload)
    r = CliRunner().invoke(main, ["convert-lora", str(bad), "--base", str(peft_dirs["base"]),
                                  "-o", str(tmp_path / "a.gguf")])
    _clean_error(r, *needles)
    assert "Error" not in r.output and not (tmp_path / "a.gguf").exists()


@pytest.mark.parametrize("outtype,value", [("f16", 1e30), ("q8_0", 1e30), ("bf16", 3.4e38)])
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_convert_lora_value_beyond_outtype(peft_dirs, tmp_path, outtype, value):
    """A finite float32 adapter value that the output type cannot hold (found by the fuzzer: f16 wrote
    infinity into the file): one line naming the adapter and tensor, no file."""
    bad = _copy_adapter(peft_dirs["main"], tmp_path / "bad", None, lambda t: t[QA].__setitem__((0, 0), value))
    r = CliRunner().invoke(main, ["convert-lora", str(bad), "--base", str(peft_dirs["base"]), "--outtype", outtype,
                                  "-o", str(tmp_path / "a.gguf")])
    _clean_error(r, "bad", "blk.0.attn_q.weight.lora_a", "range", "--outtype f32")
    assert not (tmp_path / "a.gguf").exists()
    ok = CliRunner().invoke(main, ["convert-lora", str(bad), "--base", str(peft_dirs["base"]), "--outtype", "f32",
                                   "-o", str(tmp_path / "f32.gguf")])
    assert ok.exit_code == 0, ok.output


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("pattern,edit,needles", [
    ({"q_proj": -1e308}, None, ["cannot express PEFT's scaling"]),
    ({"q_proj": 1e30}, lambda t: t[QA.replace("lora_A", "lora_B")].__setitem__((0, 0), 1e30),
     ["blk.0.attn_q.weight.lora_b times PEFT's scaling factor", "overflows float32"]),
])
def test_alpha_pattern_overflow(peft_dirs, tmp_path, pattern, edit, needles):
    """An alpha_pattern whose scaling (folded into lora_b) leaves float32 (found by the fuzzer: infinity
    written into an f32 adapter after numpy's overflow warning): one line, no file; `convert --lora` too."""
    bad = _copy_adapter(peft_dirs["main"], tmp_path / "bad", {"alpha_pattern": pattern}, edit)
    out = tmp_path / "out"
    out.mkdir()
    r = CliRunner().invoke(main, ["convert-lora", str(bad), "--base", str(peft_dirs["base"]), "--outtype", "f32",
                                  "-o", str(out / "a.gguf")])
    _clean_error(r, "bad", *needles)
    r = CliRunner().invoke(main, ["convert", str(peft_dirs["base"]), "--lora", str(bad), "-o", str(out / "m.gguf")])
    _clean_error(r, "bad")
    assert not list(out.iterdir())


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_merged_beyond_lora_type(bases, adapters, tmp_path):
    """A valid but huge adapter merged into an F16 (`--lora-type f16`) tensor (found by the fuzzer:
    numpy's overflow warning, then the model's NaN blamed on the base file): one line naming the
    adapter and the way out; the f32 merge loads."""
    from ggq.runtime.model import Model

    big = _rewrite(adapters["main", "f32"], tmp_path / "big.gguf",
                   tensors=lambda t: {k: v * np.float32(1e8) if k.endswith("lora_b") else v for k, v in t.items()})
    r = CliRunner().invoke(main, ["generate", str(bases["Q8_0"]), "-p", "x", "-n", "1", "--lora", str(big),
                                  "--lora-type", "f16"])
    _clean_error(r, "big.gguf", "beyond F16's range", "--lora-type f32")
    Model.load(bases["Q8_0"], n_ctx=16, n_threads=1, loras=[(str(big), 1.0)], lora_type="f32")
