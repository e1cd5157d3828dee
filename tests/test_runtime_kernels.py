"""Runtime kernels (ggq.runtime.kernels) against gguf.quants.dequantize + a float64 matmul.

Weights are random but valid ggml blocks (random bytes with sane fp16 scale fields), so every
code of every type is exercised; 102 rows (not a multiple of the 64-row interleave, nor of the
float kernels' 16-row chunks and 4 x 4 tiles) x 512 columns, up to 40 tokens (more than the
integer kernels' 32-token tiles).
Tolerances: the integer kernels quantize the activations to 8 bits (one fp16 scale per 32 values,
like llama.cpp's Q8_1), so against the exact float64 product the max error is <= 3e-2 of the
largest output; against the same product with the activations rounded the documented way
(numpy, here) it is <= 2e-3 (float32 accumulation and the fp16-rounded block sums). Float types:
<= 1e-5 of the exact one.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from ggq.runtime.kernels import WeightArena

# byte ranges of the fp16 scale fields in each block (ggml-common.h)
F16_FIELDS = {
    T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0], T.IQ4_NL: [0],
    T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208],
}
QUANT_TYPES = list(F16_FIELDS)
N_ROWS, N_COLS, N_TOK = 102, 512, 40


def random_blocks(qtype, n_rows, n_cols, rs):
    bs, ts = GGML_QUANT_SIZES[qtype]
    nb = n_rows * n_cols // bs
    raw = rs.randint(0, 256, size=(nb, ts)).astype(np.uint8)
    for off in F16_FIELDS.get(qtype, ()):  # float types: any bit patterns
        raw[:, off:off + 2] = rs.uniform(0.002, 0.02, nb).astype(np.float16).view(np.uint8).reshape(nb, 2)
    return raw.reshape(n_rows, n_cols // bs * ts)


def q8_roundtrip(x):
    """Activations as the kernels see them: per 32 values q = rint(x * 127 / amax), d = fp16(amax / 127)."""
    xb = x.reshape(x.shape[0], -1, 32).astype(np.float32)
    amax = np.abs(xb).max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        q = np.rint(xb * np.where(amax > 0, np.float32(127) / amax, 0))
    d = (amax / np.float32(127)).astype(np.float16).astype(np.float64)
    return (q * d).reshape(x.shape)


@pytest.fixture(scope="module")
def data():
    rs = np.random.RandomState(1)
    x = rs.randn(N_TOK, N_COLS).astype(np.float32)
    w = rs.randn(N_ROWS, N_COLS).astype(np.float32)
    mats = []
    for qt in QUANT_TYPES:
        mats.append((qt, random_blocks(qt, N_ROWS, N_COLS, rs)))
    mats.append((T.F32, w.view(np.uint8)))
    mats.append((T.F16, w.astype(np.float16).view(np.uint8)))
    mats.append((T.BF16, (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)))
    arena = WeightArena([(qt, N_ROWS, N_COLS) for qt, _ in mats])
    for i, (_, raw) in enumerate(mats):
        arena.fill(i, raw)
    return x, mats, arena


def _ref_weights(qt, raw):
    if qt == T.F32:
        return raw.view(np.float32).astype(np.float64)
    if qt == T.F16:
        return raw.view(np.float16).astype(np.float64)
    return dequantize(raw, qt).astype(np.float64).reshape(N_ROWS, N_COLS)


@pytest.mark.parametrize("idx", range(len(QUANT_TYPES) + 3))
def test_matmul_matches_dequantize_reference(data, idx):
    """Decode and prompt batches (one integer kernel per family, 32-token tiles) against float64."""
    x, mats, arena = data
    qt, raw = mats[idx]
    w = _ref_weights(qt, raw)
    exact = x.astype(np.float64) @ w.T
    scale = np.abs(exact).max()
    rounded = q8_roundtrip(x) @ w.T
    for t in (1, 3, 4, 9, 32, N_TOK):
        got = arena.matmul(idx, x[:t])
        assert got.shape == (t, N_ROWS)
        if qt in (T.F32, T.F16, T.BF16):
            assert np.abs(got - exact[:t]).max() <= 1e-5 * scale, (qt.name, t)
        else:
            assert np.abs(got - exact[:t]).max() <= 3e-2 * scale, (qt.name, t)
            assert np.abs(got - rounded[:t]).max() <= 2e-3 * scale, (qt.name, t)


@pytest.mark.parametrize("idx", range(len(QUANT_TYPES) + 3))
def test_get_row_is_exact(data, idx):
    x, mats, arena = data
    qt, raw = mats[idx]
    w = _ref_weights(qt, raw)
    for r in (0, 63, 64, N_ROWS - 1):
        np.testing.assert_array_equal(arena.row(idx, r), w[r].astype(np.float32))


@pytest.mark.parametrize("hardware", [True, False])
def test_f16_to_f32_is_exact_for_every_bit_pattern(monkeypatch, hardware):
    """The F16 kernels' conversion, both the hardware instruction and the bit-manipulation
    fallback, equals numpy's float16 -> float32 on all 65536 patterns (NaNs stay NaN, same sign)."""
    from numba import njit

    from ggq.runtime.kernels import floats

    if hardware and not floats.HARDWARE_F16:
        pytest.skip("this CPU has no half -> float instruction")
    monkeypatch.setattr(floats, "HARDWARE_F16", hardware)

    @njit  # compiled here, so the intrinsic reads the patched flag
    def convert(a, out):
        for i in range(a.shape[0]):
            out[i] = floats.f16_to_f32(a[i])

    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    ref = bits.view(np.float16).astype(np.float32)
    got = np.empty(65536, np.float32)
    convert(bits, got)
    nan = np.isnan(ref)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(ref))
    np.testing.assert_array_equal(got[~nan].view(np.uint32), ref[~nan].view(np.uint32))


@pytest.mark.parametrize("hardware", [True, False])
def test_f32_to_f16_rounds_like_numpy(hardware):
    """The fp16 KV cache's rounding, both the instruction and the software fallback, equals
    numpy's float32 -> float16 (nearest even, overflow to inf, subnormals) on random bit
    patterns and around every rounding boundary; NaN stays NaN."""
    from numba import njit

    from ggq.runtime.kernels import floats

    if hardware and not floats.HARDWARE_F16:
        pytest.skip("this CPU has no float -> half instruction")
    fn = floats._f32_to_f16_hw if hardware else floats._f32_to_f16_sw

    @njit
    def convert(x, out):
        for i in range(x.shape[0]):
            out[i] = fn(x[i])

    rs = np.random.RandomState(0)
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32).view(np.uint32)
    bits = np.concatenate([rs.randint(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32), halves,
                           halves + 0xFFF, halves + 0x1000, halves + 0x1001,  # just below / at / above a tie
                           np.arange(0x477FE000, 0x47800100, dtype=np.uint32)])  # the overflow boundary
    x = np.concatenate([bits, bits | 0x80000000]).view(np.float32)
    with np.errstate(all="ignore"):
        ref = x.astype(np.float16).view(np.uint16)
    got = np.empty(x.shape[0], np.uint16)
    convert(x, got)
    nan = np.isnan(x)
    np.testing.assert_array_equal(got[~nan], ref[~nan])
    assert np.all((got[nan] & 0x7C00) == 0x7C00) and np.all(got[nan] & 0x3FF)


def test_expf_within_5_ulp_and_edges():
    """The vectorizable exp (softmax, SiLU) against numpy's correctly rounded float32 exp."""
    from numba import njit

    from ggq.runtime.kernels.mathf import expf

    @njit
    def apply(x, out):
        for i in range(x.shape[0]):
            out[i] = expf(x[i])

    x = np.concatenate([np.linspace(-87.3, 88.3, 2_000_001, dtype=np.float32),
                        np.random.RandomState(0).randn(100_000).astype(np.float32) * 10])
    got = np.empty_like(x)
    apply(x, got)
    ref = np.exp(x.astype(np.float64)).astype(np.float32)
    ulp = np.abs(got.view(np.int32).astype(np.int64) - ref.view(np.int32).astype(np.int64))
    assert ulp.max() <= 5 and ulp.mean() < 1.5
    edge = np.array([0.0, -0.0, -100.0, 100.0, -np.inf, np.inf, np.nan], np.float32)
    out = np.empty_like(edge)
    apply(edge, out)
    np.testing.assert_array_equal(out[:6], [1, 1, 0, np.inf, 0, np.inf])
    assert np.isnan(out[6])


def test_unused_arenas_are_none_and_their_kernels_not_needed(data):
    """A file's arena tuple has None for the arenas its types do not use (so Numba compiles only
    the kernels of its types); products and rows still match the reference."""
    x, mats, _ = data
    pick = [m for m in mats if m[0] in (T.Q4_K, T.Q6_K)]
    arena = WeightArena([(qt, N_ROWS, N_COLS) for qt, _ in pick])
    for i, (_, raw) in enumerate(pick):
        arena.fill(i, raw)
    _, u8, i8, f32, u16, h16 = arena.args
    assert u8 is not None and u16 is not None and i8 is None and f32 is None and h16 is None
    for i, (qt, raw) in enumerate(pick):
        w = _ref_weights(qt, raw)
        exact = x[:2].astype(np.float64) @ w.T
        assert np.abs(arena.matmul(i, x[:2]) - exact).max() <= 3e-2 * np.abs(exact).max()
        np.testing.assert_array_equal(arena.row(i, 5), w[5].astype(np.float32))


@pytest.mark.parametrize("qt", QUANT_TYPES + [T.F32, T.F16, T.BF16])
def test_compiled_repack_equals_numpy_repack(qt):
    """The compiled load-time repacker writes the same planes, byte for byte, as the numpy
    reference path (both checked against gguf.quants by the tests above)."""
    rs = np.random.RandomState(3)
    n_rows = 130  # a partial last group
    raw = random_blocks(qt, n_rows, N_COLS, rs)
    arenas = []
    for compiled in (True, False):
        a = WeightArena([(qt, n_rows, N_COLS)])
        a.compiled_pack = compiled
        a.fill(0, raw, chunk=64)
        arenas.append(a)
    for k in arenas[0].arenas:  # bit patterns (random float bytes include NaNs)
        np.testing.assert_array_equal(arenas[0].arenas[k].view(np.uint8), arenas[1].arenas[k].view(np.uint8),
                                      err_msg=k)


def test_activation_codes_match_llama_cpp_formula():
    """quantize_act's codes, scales and block sums equal ggml's quantize_row_q8_1 (AVX path) written
    in numpy: d = fp16(amax / 127), q = rint(x * (127 / amax)) ties to even, sums d * sum(q) per 16
    and fp16(amax / 127 * sum(q)) per 32; ties, zero blocks and tiny blocks included."""
    from ggq.runtime.kernels import act_buffers, quantize_act, quantize_act_par

    rs = np.random.RandomState(7)
    x = (rs.randn(37, 256) * rs.uniform(0, 8, (37, 8)).repeat(32, 1)).astype(np.float32)
    x[1, :32] = 0.0                                     # amax 0: all codes 0
    x[2, :32] = np.float32(1e-30) * rs.randn(32).astype(np.float32)   # subnormal fp16 scale
    x[3, :32] = np.arange(-16, 16, dtype=np.float32) * np.float32(127 / 15.5)  # exact .5 ties
    xb = x.reshape(37, -1, 32)
    amax = np.abs(xb).max(-1)
    with np.errstate(divide="ignore"):
        iv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(xb * iv[..., None]).astype(np.int8)
    d = (amax / np.float32(127)).astype(np.float32)
    d16 = d.astype(np.float16).astype(np.float32)
    s = q.astype(np.int64).reshape(37, -1, 2, 16).sum(-1)
    for fn in (quantize_act, quantize_act_par):
        xq, xd, xs16, xs32 = act_buffers(*x.shape)
        fn(x, xq, xd, xs16, xs32)
        assert np.array_equal(xq.reshape(q.shape), q)
        assert np.array_equal(xd, d16)
        assert np.array_equal(xs16.reshape(s.shape), d16[..., None] * s.astype(np.float32))
        assert np.array_equal(xs32, (d * s.sum(-1).astype(np.float32)).astype(np.float16).astype(np.float32))


@pytest.mark.parametrize("hd,window,kv,pos0", [(64, 0, "f16", 0), (64, 0, "f32", 37), (64, 24, "f16", 70),
                                               (40, 0, "f32", 5), (40, 24, "f16", 70), (256, 0, "f32", 3)])
def test_prompt_attention_matches_numpy(hd, window, kv, pos0):
    """ops.attention on a prompt batch (the 4 x 16 register tiles for head dims that are a multiple
    of 16, the float32 fallback otherwise; chunks of 64 tokens paired per item; a sliding window;
    a batch after cached positions) against softmax(q K^T * scale) V in float64 over the same
    keys, with the cache's fp16 rounding applied to K and V on the numpy side too."""
    from ggq.runtime import ops

    rs = np.random.RandomState(hd + window + pos0)
    n_head, n_kv, T, n_ctx = 6, 2, 150, 256
    q = rs.randn(pos0 + T, n_head * hd).astype(np.float32)
    k = rs.randn(pos0 + T, n_kv * hd).astype(np.float32)
    v = rs.randn(pos0 + T, n_kv * hd).astype(np.float32)
    dt = ops.KV_TYPES[kv]
    kc = np.zeros((1, 1, n_kv, n_ctx // ops.KT, hd, ops.KT), dt)  # one sequence, one layer
    vc = np.zeros((1, 1, n_kv, n_ctx, hd), dt)
    ip = np.zeros(ops.N_I, np.int64)
    ip[ops.I_HEAD], ip[ops.I_KV], ip[ops.I_HD], ip[ops.I_SWA_WINDOW] = n_head, n_kv, hd, window
    fp = np.zeros(ops.N_F)
    fp[ops.F_ATTN_SCALE] = 1 / np.sqrt(hd)
    if pos0:  # earlier positions, stored by a first batch
        ops.attention(0, q[:pos0], k[:pos0], v[:pos0], kc, vc, np.arange(pos0), np.zeros(pos0, np.int64), ip, fp,
                      window > 0, np.zeros((pos0, n_head * hd), np.float32))
    out = np.zeros((T, n_head * hd), np.float32)
    ops.attention(0, q[pos0:], k[pos0:], v[pos0:], kc, vc, np.arange(pos0, pos0 + T), np.zeros(T, np.int64), ip, fp,
                  window > 0, out)
    kk = (k.astype(np.float16) if kv == "f16" else k).astype(np.float64)
    vv = (v.astype(np.float16) if kv == "f16" else v).astype(np.float64)
    ref = np.zeros((T, n_head * hd))
    for t in range(T):
        p = pos0 + t
        lo = max(0, p - window + 1) if window else 0
        for h in range(n_head):
            g = h // (n_head // n_kv)
            s = kk[lo:p + 1, g * hd:(g + 1) * hd] @ q[p, h * hd:(h + 1) * hd].astype(np.float64) / np.sqrt(hd)
            e = np.exp(s - s.max())
            ref[t, h * hd:(h + 1) * hd] = (e / e.sum()) @ vv[lo:p + 1, g * hd:(g + 1) * hd]
    assert np.abs(out - ref).max() < 2e-5 * max(1.0, np.abs(ref).max())
