"""llm-compressor W8A8 (compressed-tensors ``int-quantized``) import: real checkpoints made by
compressed-tensors on the CPU (tests/fp8_checkpoints.py), channel and group scales.

The int8 codes and bf16 scales map onto Q8_0 blocks without loss; the reference is
compressed-tensors' own ``dequantize`` (scale in float32, i.e. the exact ``q * s``).
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
from ggq.errors import GGQError  # noqa: E402

KINDS = fc.INT8_KINDS


@pytest.fixture(scope="session")
def w8_dirs(cache_dir, stories_dir):
    return {k: fc.build(cache_dir, stories_dir, k) for k in KINDS}


def _convert(d: Path, out: Path, qtype=None, report=None) -> Path:
    from ggq.convert.pipeline import convert

    return convert(str(d), str(out), qtype=qtype, force=True, progress=False, import_report=report)


@pytest.mark.parametrize("kind", KINDS)
def test_codes_kept_in_q8_0(w8_dirs, kind, tmp_path, capfd):
    d = w8_dirs[kind]
    ref = fc.reference_dequantize(d)
    ck = open_checkpoint(d)
    info = prepare(ck)
    assert info.fmt == "int-quantized" and info.bits == 8 and info.default_type == "Q8_0"
    assert info.group_size == (64 if kind.endswith("group") else -1)
    assert info.lost("Q8_0") is None and info.stats["activations"] == "int 8-bit token dynamic"
    for name, w in ref.items():
        assert np.array_equal(ck.tensors[name].load(), w), name
    path = _convert(d, tmp_path / "out.gguf", report=tmp_path / "r.tsv")
    err = capfd.readouterr().err
    assert "14 kept their codes" in err and "activation quantization (int 8-bit token dynamic) is ignored" in err
    got = _gguf_tensors(path)
    for k, w in ref.items():
        t, data = got[_gguf_name(k)]
        assert t == T.Q8_0 and np.array_equal(quants.dequantize(data, t), _gguf_order(k, w)), k  # lossless
    rows = [r.split("\t") for r in (tmp_path / "r.tsv").read_text().splitlines()[1:]]
    assert len(rows) == 14 and all(float(r[3]) == 0 and float(r[6]) > 0 for r in rows)


@pytest.mark.slow
def test_logits(w8_dirs, tmp_path):
    """The Q8_0 GGUF (lossless) in llama.cpp and ggq's runtime against the exact float32 model and
    transformers (which decompresses the checkpoint to bf16 on a CPU)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from ggq.runtime.model import Model

    d = w8_dirs["ct-w8a8-group"]
    exact = bc.exact_logits(d, TOKENS, fc.reference_dequantize(d))
    hf = bc.hf_logits(d, TOKENS)
    path = _convert(d, tmp_path / "q8.gguf")
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, n_batch=64, logits_all=True, verbose=False,
                          type_k=0, type_v=0)
    llm.eval(TOKENS)
    lc = np.array(llm.scores[:len(TOKENS)], np.float64)
    g = Model.load(path, n_ctx=64, n_threads=2).eval(TOKENS, all_logits=True).astype(np.float64)

    def rms(a, b):
        return float(np.sqrt(np.mean((a - b) ** 2)))

    spread = float(exact.std())
    assert rms(lc, exact) < 0.03 * spread and rms(g, exact) < 0.03 * spread  # 8-bit activations only
    e_lc, e_g = rms(lc, hf), rms(g, hf)
    assert e_lc <= 1.25 * e_g + 0.01 * spread and e_g <= 1.25 * e_lc + 0.01 * spread, (e_lc, e_g)


def test_hostile(w8_dirs, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "bad"
    shutil.copytree(w8_dirs["ct-w8a8-channel"], d)
    t = load_file(str(d / "model.safetensors"))
    q = "model.layers.0.self_attn.q_proj"
    t[q + ".weight_scale"] = t[q + ".weight_scale"][:7].contiguous()
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(GGQError, match="weight_scale has shape \\[7, 1\\], expected \\[256, 1\\]") as e:
        prepare(open_checkpoint(d))
    assert str(d) in str(e.value)
    c = json.loads((d / "config.json").read_text())
    c["quantization_config"]["format"] = "marlin-24"
    for g in c["quantization_config"]["config_groups"].values():
        g["format"] = "marlin-24"
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(GGQError, match="format 'marlin-24' is not supported"):
        prepare(open_checkpoint(d))


@pytest.mark.parametrize("kind", KINDS)
def test_empty_weight(w8_dirs, tmp_path, kind):
    """An int8 weight with no columns (found by tools/fuzz_inputs.py: a ZeroDivisionError computing
    the group count, reported as an internal error): one line naming the file and tensor."""
    import torch
    from safetensors.torch import load_file, save_file

    d = tmp_path / "bad"
    shutil.copytree(w8_dirs[kind], d)
    t = load_file(str(d / "model.safetensors"))
    k = "model.layers.0.self_attn.k_proj.weight"
    t[k] = torch.zeros((128, 0), dtype=torch.int8)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(GGQError, match="k_proj.weight' has no weights|k_proj.weight has no weights") as e:
        _convert(d, tmp_path / "x.gguf")
    assert str(d) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("value,message", [(float("-inf"), "are not all finite"), (float("nan"), "are not all finite"),
                                           (3e38, "put its weights beyond float32's range")])
@pytest.mark.parametrize("qtype", [None, "Q4_0"])
def test_bad_scales(w8_dirs, tmp_path, value, message, qtype):
    """Non-finite or overflowing int8 scales (found by tools/fuzz_inputs.py: numpy's warning, then
    a message about the weight's non-finite values): one line naming the file and weight, no output."""
    import torch
    from safetensors.torch import load_file, save_file

    d = tmp_path / "bad"
    shutil.copytree(w8_dirs["ct-w8a8-channel"], d)
    t = load_file(str(d / "model.safetensors"))
    k = "model.layers.0.mlp.up_proj.weight_scale"
    t[k] = torch.full_like(t[k].float(), value)  # float32: 3e38 is not a bf16 overflow by itself
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(GGQError, match="the scales of 'model.layers.0.mlp.up_proj.weight' " + message) as e:
        _convert(d, tmp_path / "x.gguf", qtype)
    assert str(d) in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("change,message", [
    (dict(group_size=float("nan")), "without a positive integer group_size \\(group_size nan\\)"),
    (dict(group_size=[64]), "without a positive integer group_size"),
    (dict(group_size=1e400), "without a positive integer group_size"),
    (dict(group_size=64.5), "without a positive integer group_size"),
    (dict(num_bits=8.0), "with 8.0 bits is not supported"),
    (dict(num_bits=[8]), "with \\[8\\] bits is not supported"),
])
def test_hostile_weight_scheme(w8_dirs, tmp_path, change, message):
    """int-quantized schemes with values of the wrong JSON type (found by reading the code the fuzzer's
    fp8 finding pointed at: group_size NaN or a list raised ValueError/TypeError, an internal error,
    and 64.5 was taken as 64): one line naming config.json."""
    d = tmp_path / "bad"
    shutil.copytree(w8_dirs["ct-w8a8-group"], d)
    c = json.loads((d / "config.json").read_text())
    for g in c["quantization_config"]["config_groups"].values():
        g["weights"].update(change)
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(GGQError, match=message) as e:
        prepare(open_checkpoint(d))
    assert "\n" not in str(e.value) and "config.json" in str(e.value)
