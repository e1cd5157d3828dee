"""K-quant kernels (Q2_K..Q6_K, Q8_K) against independent references.

* dequantize: bit-exact against ``gguf.quants.dequantize`` (Q8_K: against ggml's C
  ``dequantize_row_q8_K``), on random block bytes and on our own quantized output;
* quantize: against llama.cpp's C quantizer (``ggml_quantize_chunk`` through llama-cpp-python;
  Q8_K: ``quantize_row_q8_K_ref``) on random data, edge cases and real SmolLM2 tensors, with and
  without an imatrix. We report the fraction of bit-identical super-blocks and assert it stays
  above ``IDENTICAL_FLOOR`` (measured: 1.0 on every tensor here; a llama.cpp build with FMA
  contraction may legitimately change a few roundings), and assert the (importance-)weighted
  RMSE ratio ours/llama.cpp <= 1.001 per tensor.
"""

from __future__ import annotations

import ctypes
import importlib
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

import ggq.quants

REPO = Path(__file__).resolve().parents[1]
KTYPES = ["Q4_K", "Q6_K", "Q5_K", "Q3_K", "Q2_K"]
IDENTICAL_FLOOR = 0.95
RMSE_RATIO_MAX = 1.001


def _mod(name):
    return importlib.import_module(f"ggq.quants.{name.lower()}")


def _llamacpp():
    pytest.importorskip("llama_cpp")
    sys.path.insert(0, str(REPO / "tools"))
    import llamacpp_ref

    return llamacpp_ref


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def _edge_rows(n: int = 1024) -> np.ndarray:
    rng = np.random.default_rng(7)
    base = rng.standard_normal(n).astype(np.float32)
    rows = [np.zeros(n), np.full(n, 0.37), np.full(n, -2.5),              # zero, constant
            base * 1e30, base * 7e4, base * 1e-6, base * 1e-30, base * 1e-40,  # huge, tiny, subnormal
            np.abs(base), -np.abs(base), np.round(base * 3) / 3]
    r = base * 0.01
    r[::97] = 50.0  # outliers
    rows.append(r)
    r = np.zeros(n)
    r[5], r[300] = 1.0, -3.0  # sparse
    rows.append(r)
    r = base.copy()
    r[:256], r[256:512] = 0.0, 1.0  # mixed super-blocks
    rows.append(r)
    for pos, v in ((3, np.inf), (100, -np.inf), (7, np.nan)):  # non-finite weights
        r = base * 0.02
        r[pos] = v
        rows.append(r)
    rows.append(np.full(n, 3.4e38))  # near float32 max
    return np.array(rows, dtype=np.float32)


def _compare(qtype: str, x: np.ndarray, imatrix, ref_bytes: np.ndarray):
    """(identical-block fraction, weighted RMSE ratio ours/ref, our bytes).

    The RMSE is taken over the rows whose weights and llama.cpp dequantization are finite
    (scales of |x| > ~4e6 overflow float16 in both implementations); the other rows must be
    byte-identical.
    """
    mod = _mod(qtype)
    ours = mod.quantize_rows(x, imatrix)
    assert ours.shape == ref_bytes.shape and ours.dtype == np.uint8
    ts = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][1]
    same = float((ours.reshape(-1, ts) == ref_bytes.reshape(-1, ts)).all(axis=1).mean())
    w = np.ones(x.shape[1], np.float64) if imatrix is None else imatrix.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        y_ours = mod.dequantize_rows(ours).astype(np.float64)
        y_ref = mod.dequantize_rows(ref_bytes).astype(np.float64)
        finite = np.isfinite(y_ref).all(axis=1) & np.isfinite(x).all(axis=1)
        assert np.array_equal(ours[~finite], ref_bytes[~finite])
        e_ours = np.sqrt((w * (y_ours[finite] - x[finite]) ** 2).sum())
        e_ref = np.sqrt((w * (y_ref[finite] - x[finite]) ** 2).sum())
    ratio = 1.0 if e_ours == e_ref else e_ours / e_ref
    return same, ratio, ours


# ---------------------------------------------------------------------------------- dequantize

@pytest.mark.parametrize("qtype", KTYPES)
def test_dequantize_random_bytes_matches_gguf(qtype):
    import gguf.quants

    ts = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][1]
    q = np.random.default_rng(1).integers(0, 256, (24, 4 * ts), dtype=np.uint8)
    ours = _mod(qtype).dequantize_rows(q)
    with np.errstate(over="ignore", invalid="ignore"):
        ref = gguf.quants.dequantize(q, GGMLQuantizationType[qtype])
    assert _bits_equal(ours, ref)  # NaN/inf from random float16 scales included


@pytest.mark.parametrize("qtype", KTYPES)
def test_registry_roundtrip_matches_gguf(qtype):
    import gguf.quants

    t = GGMLQuantizationType[qtype]
    x = (np.random.default_rng(2).standard_normal((3, 5, 512)) * 0.05).astype(np.float32)
    q = ggq.quants.quantize(x, t)
    assert q.shape == (3, 5, ggq.quants.row_bytes(t, 512))
    y = ggq.quants.dequantize(q, t)
    assert _bits_equal(y, gguf.quants.dequantize(q, t))
    # the quantization error is of the expected order for the bit width
    rel = np.sqrt(((y - x) ** 2).mean() / (x ** 2).mean())
    assert rel < {"Q2_K": 0.45, "Q3_K": 0.25, "Q4_K": 0.12, "Q5_K": 0.06, "Q6_K": 0.03}[qtype]


@pytest.mark.parametrize("qtype", KTYPES + ["Q8_K"])
def test_bad_shapes_raise(qtype):
    mod = _mod(qtype)
    with pytest.raises(ValueError, match="multiple of"):
        mod.quantize_rows(np.zeros((2, 300), np.float32))
    if qtype != "Q8_K":
        with pytest.raises(ValueError, match="imatrix"):
            mod.quantize_rows(np.zeros((2, 256), np.float32), np.ones(512, np.float32))
    with pytest.raises(ValueError, match="blocks"):
        mod.dequantize_rows(np.zeros((2, 7), np.uint8))


# ---------------------------------------------------------------------------------- quantize

@pytest.mark.slow
@pytest.mark.parametrize("use_imatrix", [False, True], ids=["ref", "imatrix"])
@pytest.mark.parametrize("qtype", KTYPES)
def test_quantize_random_and_edge_cases_match_llamacpp(qtype, use_imatrix):
    ref = _llamacpp()
    rng = np.random.default_rng(3)
    x = np.concatenate([(rng.standard_normal((40, 1024)) * 0.02).astype(np.float32), _edge_rows()])
    imatrix = (rng.lognormal(0, 1.5, 1024) ** 2).astype(np.float32) if use_imatrix else None
    with np.errstate(over="ignore", invalid="ignore"):
        r = ref.ggml_quantize(x, GGMLQuantizationType[qtype], imatrix)
    same, ratio, ours = _compare(qtype, x, imatrix, r)
    print(f"{qtype} {'imatrix' if use_imatrix else 'ref'} random+edge: identical blocks {same:.4f}, RMSE ratio {ratio:.6f}")
    assert same >= IDENTICAL_FLOOR
    assert ratio <= RMSE_RATIO_MAX
    # zero and constant rows (edge rows 0..2) have no rounding subtleties: exactly llama.cpp's
    assert np.array_equal(ours[40:43], r[40:43])
    assert not np.any(_mod(qtype).dequantize_rows(ours[40:41]))


def _real_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    st = load_file(str(model_dir / "model.safetensors"))
    out = {}
    for i in (0, 29):  # ffn_down: rows of 1536 = 6 super-blocks, llama.cpp's own row split
        out[f"blk.{i}.ffn_down"] = st[f"model.layers.{i}.mlp.down_proj.weight"]
    # 576-wide tensors, regrouped into rows of 9 super-blocks (same weights, same 256-blocks as the
    # flattened tensor) to exercise other weight statistics
    out["blk.3.attn_q"] = st["model.layers.3.self_attn.q_proj.weight"].reshape(-1, 2304)
    out["blk.7.attn_v"] = st["model.layers.7.self_attn.v_proj.weight"].reshape(-1, 2304)
    out["token_embd[:4096]"] = st["model.embed_tokens.weight"][:4096].reshape(-1, 2304)
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


@pytest.mark.slow
@pytest.mark.parametrize("qtype", KTYPES)
def test_quantize_real_tensors_match_llamacpp(qtype, smollm2_hf, record_property):
    ref = _llamacpp()
    rng = np.random.default_rng(4)
    report = {}
    for name, x in _real_tensors(smollm2_hf).items():
        # synthetic per-column importances, heavy-tailed like real mean squared activations
        imatrix = (rng.lognormal(0, 1.5, x.shape[1]) ** 2).astype(np.float32)
        for im in (None, imatrix):
            same, ratio, _ = _compare(qtype, x, im, ref.ggml_quantize(x, GGMLQuantizationType[qtype], im))
            key = f"{name}{'+imatrix' if im is not None else ''}"
            report[key] = (same, ratio)
            print(f"{qtype} {key}: identical blocks {same:.4f}, RMSE ratio {ratio:.6f}")
            assert ratio <= RMSE_RATIO_MAX, key
            assert same >= IDENTICAL_FLOOR, key
    record_property("kquant_report", report)


# ---------------------------------------------------------------------------------- Q8_K

def _q8k_c(lib):
    q = lib.quantize_row_q8_K_ref
    q.restype, q.argtypes = None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    d = lib.dequantize_row_q8_K
    d.restype, d.argtypes = None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return q, d


@pytest.mark.slow
def test_q8_k_matches_ggml_c():
    ref = _llamacpp()
    cq, cd = _q8k_c(ref.ggml_lib())
    from ggq.quants import q8_k

    rng = np.random.default_rng(5)
    x = np.concatenate([(rng.standard_normal((16, 1024)) * 0.3).astype(np.float32), _edge_rows()])
    r = np.zeros((x.shape[0], 4 * q8_k.TYPE_SIZE), np.uint8)  # zeroed: ggml leaves bsums of zero blocks unwritten
    cq(x.ctypes.data, r.ctypes.data, x.size)
    ours = q8_k.quantize_rows(x)
    same = (ours.reshape(-1, q8_k.TYPE_SIZE) == r.reshape(-1, q8_k.TYPE_SIZE)).all(axis=1).mean()
    print(f"Q8_K identical blocks {same:.4f}")
    assert same >= IDENTICAL_FLOOR
    # dequantize: bit-exact on ggml's bytes and on random bytes
    for q in (r, rng.integers(0, 256, (8, 4 * q8_k.TYPE_SIZE), dtype=np.uint8)):
        y = np.zeros((q.shape[0], 1024), np.float32)
        cd(q.ctypes.data, y.ctypes.data, y.size)
        assert _bits_equal(q8_k.dequantize_rows(q), y)
