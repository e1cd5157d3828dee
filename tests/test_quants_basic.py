"""F32/F16/BF16 and Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 kernels against gguf.quants (bytes and values)
and llama.cpp's C kernels (ggml_quantize_chunk, with and without an imatrix)."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as T
from gguf import quants as gq

import ggq.quants as Q

BLOCK_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0]
FLOAT_TYPES = [T.F32, T.F16, T.BF16]
ALL_TYPES = FLOAT_TYPES + BLOCK_TYPES


def _ref_quantize(x, qtype):
    with warnings.catch_warnings():  # gguf.quants warns on inf/nan casts; that is fine
        warnings.simplefilter("ignore", RuntimeWarning)
        return gq.quantize(x, qtype)


def _ref_dequantize(q, qtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return gq.dequantize(q, qtype)


def assert_matches_gguf(x: np.ndarray, qtype) -> None:
    """Our quantize bytes == gguf's, and our dequantize of them == gguf's (NaN == NaN)."""
    ref = _ref_quantize(x, qtype)
    ours = Q.quantize(x, qtype)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape, (qtype.name, ours.dtype, ours.shape, ref.shape)
    np.testing.assert_array_equal(np.ascontiguousarray(ours).view(np.uint8), np.ascontiguousarray(ref).view(np.uint8),
                                  err_msg=f"{qtype.name} quantize bytes")
    deq_ref = _ref_dequantize(ref, qtype)
    deq = Q.dequantize(ours, qtype)
    assert deq.dtype == np.float32 and deq.shape == deq_ref.shape
    np.testing.assert_array_equal(deq, deq_ref, err_msg=f"{qtype.name} dequantize")


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape", [(1, 32), (7, 64), (33, 96), (2, 3, 256), (256,)])
def test_random_matches_gguf(qtype, shape):
    rng = np.random.default_rng(sum(shape) + int(qtype))
    x = (rng.standard_normal(shape) * rng.choice([1e-3, 0.05, 1.0, 30.0])).astype(np.float32)
    assert_matches_gguf(x, qtype)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_other_input_dtypes(qtype):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 64))
    assert_matches_gguf(x, qtype)  # float64
    assert_matches_gguf(x.astype(np.float16), qtype)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_real_tensor_matches_gguf(qtype, stories_dir):
    from safetensors.numpy import load_file

    tensors = load_file(str(stories_dir / "model.safetensors"))
    # rows of 64 (hidden size), plus the 172-wide MLP rows trimmed to 160 (a multiple of 32)
    wide = [v for v in tensors.values() if v.ndim == 2 and v.shape[1] % 32 == 0]
    assert wide, "no tensor with rows of a multiple of 32"
    for w in wide[:3]:
        assert_matches_gguf(w.astype(np.float32), qtype)
    mlp = next(v for v in tensors.values() if v.ndim == 2 and v.shape[1] == 172)
    assert_matches_gguf(np.ascontiguousarray(mlp[:, :160]).astype(np.float32), qtype)


def _special_blocks() -> np.ndarray:
    """One 32-wide row per awkward case; every row is one block."""
    rng = np.random.default_rng(7)
    base = rng.standard_normal(32).astype(np.float32)
    rows = [
        np.zeros(32),                     # all zero
        np.full(32, 0.75),                # constant positive
        np.full(32, -3.0),                # constant negative
        np.full(32, 1e30),                # huge: scales overflow fp16 to inf
        base * 1e30,
        np.full(32, 6e4),                 # near fp16 max (65504)
        base * 6.5e4,
        base * 7e4,                       # beyond fp16 max
        base * 1e6,
        base * 1e-30,                     # tiny: scales underflow to fp16 zero/subnormal
        np.full(32, 1e-30),
        base * 1e-6,                      # fp16 subnormal scales
        base * 1e-40,                     # float32 subnormals: 1/d overflows to inf
        np.full(32, 1e-45),
        np.where(np.arange(32) == 5, 1.0, 0.0),     # single spike
        np.where(np.arange(32) % 2, 2.0, -2.0),     # ties in |max|
        np.arange(32) - 16.0,             # exact grid
        (np.arange(32) - 16.0) / 16 * 0.5 + 0.03125,  # halves after scaling
    ]
    return np.stack(rows).astype(np.float32)


def _nonfinite_blocks() -> np.ndarray:
    rng = np.random.default_rng(8)
    base = rng.standard_normal((8, 32)).astype(np.float32)
    base[0, 3] = np.nan
    base[1, 0] = np.nan                   # NaN first in the block
    base[2, 5] = np.inf
    base[3, 9] = -np.inf
    base[4, 2], base[4, 20] = np.inf, -np.inf
    base[5, :] = np.inf                   # (inf - inf) = NaN scale
    base[6, 4], base[6, 30] = np.nan, np.inf
    base[7, 11] = -np.nan
    return base


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_special_values_match_gguf(qtype):
    assert_matches_gguf(_special_blocks(), qtype)


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_inf_nan_match_gguf(qtype):
    x = _nonfinite_blocks()
    if qtype not in (T.Q4_1, T.Q5_1):
        assert_matches_gguf(x, qtype)
        return
    # Q4_1/Q5_1 take numpy's min/max, whose NaN result is sometimes numpy's canonical +NaN and
    # sometimes the input NaN (it depends on where the NaN sits, an artefact of its SIMD
    # reduction). We keep the input NaN, so for a negative NaN only the NaN-ness of d and m is
    # compared; every other byte must still match.
    assert_matches_gguf(x[:7], qtype)
    ours, ref = Q.quantize(x[7:], qtype), _ref_quantize(x[7:], qtype)
    np.testing.assert_array_equal(ours[:, 4:], ref[:, 4:])
    np.testing.assert_array_equal(ours[:, :4].view(np.float16), ref[:, :4].view(np.float16))  # NaN == NaN


def test_bf16_rounding_and_nan_quieting():
    bits = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x7F7FFFFF, 0x7F800001, 0xFF800001, 0x7FC00000,
                     0x00008000, 0x80018000, 0x7F800000], dtype=np.uint32)
    x = bits.view(np.float32).reshape(1, -1)
    assert_matches_gguf(x, T.BF16)
    got = Q.quantize(x, T.BF16).view(np.uint16).ravel()
    # hand-checked against ggml_compute_fp32_to_bf16: ties to even, overflow to inf, NaN quieted
    assert got.tolist() == [0x3F80, 0x3F82, 0x3F81, 0x7F80, 0x7FC0, 0xFFC0, 0x7FC0, 0x0000, 0x8002, 0x7F80]


def test_fp16_conversion_matches_numpy():
    """The Numba fp32 -> fp16 rounding used for block scales is numpy's, bit for bit."""
    import numba as nb

    from ggq.quants._common import fp32_bits_to_fp16_bits

    @nb.njit
    def conv(b, out):
        for i in range(b.shape[0]):
            out[i] = fp32_bits_to_fp16_bits(b[i])

    rng = np.random.default_rng(3)
    bits = np.concatenate([
        rng.integers(0, 2**32, 400_000, dtype=np.uint64).astype(np.uint32),
        np.arange(0x32F00000, 0x38900000, 97, dtype=np.uint32),    # fp16 subnormal range and its edges
        np.arange(0x477F0000, 0x47810000, 5, dtype=np.uint32),     # around fp16 max / overflow
        np.array([0x7F800000, 0x7F800001, 0x7FA00000, 0x7FC00001, 0x7FC02000], dtype=np.uint32),
    ])
    bits = np.concatenate([bits, bits | 0x80000000])
    out = np.empty(bits.size, np.uint16)
    conv(bits, out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ref = bits.view(np.float32).astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16], ids=lambda t: t.name)
def test_float_dequantize_accepts_bytes(qtype):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 10)).astype(np.float32)
    q = Q.quantize(x, qtype)
    raw = np.ascontiguousarray(q).view(np.uint8)
    np.testing.assert_array_equal(Q.dequantize(raw, qtype), _ref_dequantize(q, qtype))
    np.testing.assert_array_equal(Q.dequantize(q, qtype), _ref_dequantize(q, qtype))


def test_bad_shapes():
    from ggq.quants import q4_0

    with pytest.raises(ValueError):
        Q.quantize(np.zeros((2, 48), np.float32), T.Q4_0)
    with pytest.raises(ValueError):
        q4_0.quantize_rows(np.zeros((2, 48), np.float32))
    with pytest.raises(ValueError):
        q4_0.dequantize_rows(np.zeros((2, 17), np.uint8))
    with pytest.raises(ValueError):
        q4_0.quantize_rows(np.zeros((2, 64), np.float32), np.ones(32, np.float32))


# ----------------------------------------------------------------------------- llama.cpp's C kernels

def _ggml_quantize():
    pytest.importorskip("llama_cpp")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from llamacpp_ref import ggml_quantize

    return ggml_quantize


@pytest.mark.slow
@pytest.mark.parametrize("qtype", BLOCK_TYPES + [T.F16, T.BF16], ids=lambda t: t.name)
def test_matches_ggml_c(qtype):
    ggml_quantize = _ggml_quantize()
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((48, 512)) * rng.gamma(1.0, 1.0, size=(48, 1))).astype(np.float32)
    ref = ggml_quantize(x, int(qtype))
    np.testing.assert_array_equal(np.ascontiguousarray(Q.quantize(x, qtype)).view(np.uint8).reshape(ref.shape), ref)


@pytest.mark.slow
@pytest.mark.parametrize("qtype", BLOCK_TYPES, ids=lambda t: t.name)
def test_imatrix_matches_ggml_c(qtype):
    """With an imatrix, the weighted paths (quantize_row_q4_0_impl & co.) match the C bytes."""
    ggml_quantize = _ggml_quantize()
    rng = np.random.default_rng(12)
    x = (rng.standard_normal((48, 512)) * rng.gamma(1.0, 1.0, size=(48, 1))).astype(np.float32)
    x[3, 64:96] = 0.0  # an all-zero block
    x[4, 32:64] = np.abs(x[4, 32:64]) + 0.5  # all-positive block (min clamped to 0 in make_qkx3_quants)
    imatrix = (rng.random(512) * rng.choice([0.01, 1.0, 50.0], size=512)).astype(np.float32)
    ref = ggml_quantize(x, int(qtype), imatrix)
    np.testing.assert_array_equal(Q.quantize(x, qtype, imatrix), ref)
