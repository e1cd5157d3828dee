"""The compiled ops every family's forward pass is written with (:mod:`ggq.models`).

A family's ``forward`` is one ``@njit`` function that runs a whole batch through all layers as a
readable sequence of these ops (llama2.c's style: one step, one comment), so a decoded token costs
one Python -> compiled call whatever the family. The ops work on preallocated buffers
(:func:`scratch`), never allocate per layer, and keep the kernels' layout decisions
(:mod:`ggq.runtime.kernels`) out of the family code.

Shared data every forward receives (built by :class:`ggq.runtime.model.Model`):

* ``W``: the weight arenas ``(mats, u8, i8, f32, u16, h16)``, None where unused (:class:`~ggq.runtime.kernels.WeightArena`);
* ``vecs``: float32 norm weights and biases, one flat array addressed by offsets;
* ``lay``: int64 ``(n_layer, N_L)`` layer table: per layer the matrix index or vector offset of
  each weight in the ``L_*`` columns (-1: absent), a sliding-window flag and a rope kind;
* ``ip``: int64 hyper-parameters (``I_*``), ``fp``: float64 ones (``F_*``);
* ``inv_freq`` float64 ``(n_kinds, n_rot/2)`` and ``mscale`` float64 ``(n_kinds,)``: the rope
  kinds (:mod:`ggq.runtime.rope`; Gemma 3 has one for local and one for global layers);
* ``kc`` ``(n_seq, n_layer, n_kv, n_ctx / KT, hd, KT)`` (K in tiles of KT positions,
  [dim][position]) and ``vc`` ``(n_seq, n_layer, n_kv, n_ctx, hd)``: the KV cache of each of
  ``n_seq`` sequences, float32 or fp16 bits as uint16;
* ``pos``, ``seq``: int64 (T,): each token's position and sequence (a prompt batch: pos0, pos0 + 1,
  ... of one sequence; a batched decode step: one token of each of several sequences).
"""

from __future__ import annotations

import math
from collections import namedtuple

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from ggq.runtime.kernels import C_FAM, get_row, matmul, quantize_act, quantize_act_par
from ggq.runtime.kernels.floats import f16_to_f32, f32_to_f16
from ggq.runtime.kernels.mathf import expf
from ggq.runtime.kernels.simd import W, add_v, at, fma_s, fzero, load_kv, store_f
from ggq.runtime.kernels.repack import FAM_N4

# ---------------------------------------------------------------------------------------------------
# layer table columns (one row per layer; -1 = the layer has no such weight)
(L_ATTN_NORM, L_WQ, L_WK, L_WV, L_WO, L_FFN_NORM, L_GATE, L_UP, L_DOWN, L_BQ, L_BK, L_BV, L_Q_NORM, L_K_NORM,
 L_POST_ATTN_NORM, L_POST_FFN_NORM, L_SWA, L_ROPE) = range(18)
N_L = 18
# integer hyper-parameters
(I_EMBD, I_HEAD, I_KV, I_HD, I_ROT, I_NEOX, I_FF, I_VOCAB, I_LAYER, I_TOKEMB, I_OUTNORM, I_OUT,
 I_SWA_WINDOW) = range(13)
N_I = 13
# float hyper-parameters
F_EPS, F_ATTN_SCALE, F_ATTN_SOFTCAP, F_FINAL_SOFTCAP, F_EMBD_SCALE = range(5)
N_F = 5
# gated linear units of the FFN
SILU, GELU_TANH = 0, 1

#: KV cache element types: name -> numpy dtype of the cache arrays (F16 held as its bits)
KV_TYPES = {"f32": np.float32, "f16": np.uint16}


def kv_value(v):
    """float32 value of a KV cache element: itself (float32) or the fp16 bits it holds (uint16)."""
    raise NotImplementedError  # compiled code only (see the overload below)


@overload(kv_value, inline="always")
def _kv_value(v):
    if v == types.uint16:
        return lambda v: f16_to_f32(v)
    if isinstance(v, types.Float):
        return lambda v: v


def kv_from_f32(v, like):
    """``v`` (float32) as a KV cache element of the type of ``like`` (rounded to fp16 bits for uint16)."""
    raise NotImplementedError  # compiled code only


@overload(kv_from_f32, inline="always")
def _kv_from_f32(v, like):
    if like == types.uint16:
        return lambda v, like: f32_to_f16(v)
    if isinstance(like, types.Float):
        return lambda v, like: v


# ---------------------------------------------------------------------------------------------------
# buffers

Scratch = namedtuple("Scratch", "h q k v att o gate up qkv gu ae aa af")
Scratch.__doc__ = """Buffers of one forward call (float32, T rows): ``h`` normed input, ``q``/``k``/``v``,
``att`` attention output, ``o`` a block's output, ``gate``/``up`` FFN, ``qkv``/``gu`` fused
projections; ``ae``/``aa``/``af``: 8-bit activation buffers (:func:`act_bufs`) for inputs of
n_embd, n_head*hd and n_ff values. ``up`` lies in the first rows' worth of ``gu``'s memory: a
layer's FFN uses one or the other (:func:`ffn`)."""


@njit(cache=True)
def act_bufs(T, n):
    """(xq int8 (T, n), xd, xs16, xs32 float32): :func:`~ggq.runtime.kernels.quantize_act`'s outputs."""
    nb = max(n // 32, 1)
    return (np.empty((T, nb * 32), np.int8), np.empty((T, nb), np.float32),
            np.empty((T, 2 * nb), np.float32), np.empty((T, nb), np.float32))


@njit(cache=True)
def scratch(T, ip):
    """The :data:`Scratch` buffers for a batch of ``T`` tokens."""
    n_embd, n_ff = ip[I_EMBD], ip[I_FF]
    nq, nkv = ip[I_HEAD] * ip[I_HD], ip[I_KV] * ip[I_HD]
    f = np.float32
    gu = np.empty((T, 2 * n_ff), f)
    up = gu.reshape(-1)[:T * n_ff].reshape((T, n_ff))
    return Scratch(np.empty((T, n_embd), f), np.empty((T, nq), f), np.empty((T, nkv), f), np.empty((T, nkv), f),
                   np.empty((T, nq), f), np.empty((T, n_embd), f), np.empty((T, n_ff), f), up,
                   np.empty((T, nq + 2 * nkv), f), gu, act_bufs(T, n_embd), act_bufs(T, nq), act_bufs(T, n_ff))


@njit(cache=True)
def copy_cols(dst, src, c0):
    """dst[t, :] = src[t, c0:c0 + dst.shape[1]] (explicit loops: Numba's broadcasting assignment
    compiles its shape-mismatch error formatting, seconds of first-run compile)."""
    for t in range(dst.shape[0]):
        for k in range(dst.shape[1]):
            dst[t, k] = src[t, c0 + k]


@njit(cache=True)
def add_rows(x, y):
    """x[t, :] += y[t, :] for 2-D float32 arrays of one shape (the residual additions)."""
    for t in range(x.shape[0]):
        for k in range(x.shape[1]):
            x[t, k] += y[t, k]


@njit(cache=True)
def add_vec(x, b):
    """x[t, :] += b for every row ``t`` (biases)."""
    for t in range(x.shape[0]):
        for k in range(x.shape[1]):
            x[t, k] += b[k]


@njit(cache=True, inline="always")
def vec(vecs, off, n):
    """The ``n`` float32 values of the norm weight / bias stored at ``off`` in ``vecs``."""
    return vecs[off:off + n]


# ---------------------------------------------------------------------------------------------------
# matrix products


@njit(cache=True, inline="always")
def _reads_q8(mats, m):
    """Whether matrix ``m`` (-1: none) is an integer family, i.e. reads the 8-bit activations."""
    return m >= 0 and mats[m, C_FAM] >= FAM_N4


@njit(cache=True)
def quantize_for(W, x, A, m0, m1, m2):
    """Quantize ``x`` (T, n) to 8 bits into ``A`` once, if any of matrices m0, m1, m2 (-1: none)
    reads 8-bit activations (the integer families; float weights read ``x`` itself)."""
    mats = W[0]
    if (_reads_q8(mats, m0) or _reads_q8(mats, m1) or _reads_q8(mats, m2)) and x.shape[1] % 32 == 0:
        if x.shape[0] > 1:
            quantize_act_par(x, A[0], A[1], A[2], A[3])
        else:
            quantize_act(x, A[0], A[1], A[2], A[3])


@njit(cache=True, inline="always")
def mm(W, m, x, A, out):
    """out (T, n_rows) = x (T, n_cols) @ W[m].T, integer families reading ``A`` (from :func:`quantize_for`)."""
    matmul(m, W[0], W[1], W[2], W[3], W[4], W[5], x, A[0], A[1], A[2], A[3], out)


@njit(cache=True)
def linear(W, m, x, A, out):
    """out = x @ W[m].T, quantizing ``x`` into ``A`` first when ``m`` needs it."""
    quantize_for(W, x, A, m, np.int64(-1), np.int64(-1))  # np.int64, not literals: one quantize_for compiled
    mm(W, m, x, A, out)


@njit(cache=True)
def embed(W, ip, tokens, scale):
    """x (float32 (T, n_embd)): x[t] = row tokens[t] of token_embd times ``scale`` (1: none;
    Gemma: sqrt(n_embd))."""
    x = np.empty((tokens.shape[0], ip[I_EMBD]), np.float32)
    for t in range(tokens.shape[0]):
        get_row(ip[I_TOKEMB], W[0], W[1], W[2], W[3], W[4], W[5], tokens[t], x[t])
    if scale != 1.0:
        s = np.float32(scale)
        for t in range(tokens.shape[0]):
            for k in range(x.shape[1]):
                x[t, k] *= s
    return x


@njit(cache=True)
def attn_inputs(W, L, vecs, s, ip):
    """s.q, s.k, s.v from the normed input s.h: the Q/K/V projections (one fused Q|K|V matrix, as
    Phi-3 stores it or the loader stacks it, or three) plus their biases where the layer has them."""
    nq, nkv = ip[I_HEAD] * ip[I_HD], ip[I_KV] * ip[I_HD]
    quantize_for(W, s.h, s.ae, L[L_WQ], L[L_WK], L[L_WV])
    if L[L_WK] < 0:  # fused rows: one parallel region
        mm(W, L[L_WQ], s.h, s.ae, s.qkv)
        copy_cols(s.q, s.qkv, np.int64(0))  # np.int64, not a literal 0: one copy_cols compiled
        copy_cols(s.k, s.qkv, nq)
        copy_cols(s.v, s.qkv, nq + nkv)
    else:
        mm(W, L[L_WQ], s.h, s.ae, s.q)
        mm(W, L[L_WK], s.h, s.ae, s.k)
        mm(W, L[L_WV], s.h, s.ae, s.v)
    if L[L_BQ] >= 0:
        add_vec(s.q, vec(vecs, L[L_BQ], nq))
        add_vec(s.k, vec(vecs, L[L_BK], nkv))
        add_vec(s.v, vec(vecs, L[L_BV], nkv))


@njit(cache=True)
def ffn(W, L, s, act):
    """s.o = down(glu(gate(s.h), up(s.h))): SwiGLU (``act`` SILU) or GeGLU with the tanh GELU
    (GELU_TANH); gate and up from two matrices or one fused gate|up matrix (gate rows first,
    whose GLU is computed in place in s.gu's gate columns, then copied to s.gate, the down
    projection's input)."""
    n_ff = s.gate.shape[1]
    quantize_for(W, s.h, s.ae, L[L_GATE], L[L_UP], np.int64(-1))
    if L[L_UP] < 0:  # fused gate|up rows
        mm(W, L[L_GATE], s.h, s.ae, s.gu)
        glu_fused(s.gu, n_ff, act)
        copy_cols(s.gate, s.gu, np.int64(0))
    else:
        mm(W, L[L_GATE], s.h, s.ae, s.gate)
        mm(W, L[L_UP], s.h, s.ae, s.up)
        glu(s.gate, s.up, act)
    linear(W, L[L_DOWN], s.gate, s.af, s.o)


@njit(cache=True)
def output(W, ip, fp, vecs, x, all_logits, logits):
    """logits = output(norm(x)) for every row (``all_logits``) or the last; soft-capped as
    cap * tanh(logits / cap) when F_FINAL_SOFTCAP > 0 (Gemma 2). With ``ip[I_OUT] < 0`` (what
    ``Model.embed`` passes) ``logits`` is (rows, n_embd) and receives norm(x) itself, the final
    hidden states, without the output matrix."""
    n_embd = ip[I_EMBD]
    T = x.shape[0]
    w = vec(vecs, ip[I_OUTNORM], n_embd)
    if all_logits:
        hf = np.empty((T, n_embd), np.float32)
        rmsnorm(x, w, fp[F_EPS], hf)
    else:
        hf = np.empty((1, n_embd), np.float32)
        rmsnorm(x[T - 1:T], w, fp[F_EPS], hf)
    if ip[I_OUT] < 0:
        copy_cols(logits, hf, np.int64(0))  # not logits[:, :] = hf: its shape-check error path costs compile time
        return
    linear(W, ip[I_OUT], hf, act_bufs(hf.shape[0], n_embd), logits)
    cap = np.float32(fp[F_FINAL_SOFTCAP])
    if cap > 0:
        for t in range(logits.shape[0]):
            softcap(logits[t], cap)


# ---------------------------------------------------------------------------------------------------
# element-wise ops


@njit(cache=True, fastmath=True, error_model="numpy")  # NaN rows: NaN out, not ZeroDivisionError
def rmsnorm(x, w, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w  (ggml_rms_norm then mul; the sum in float64 as
    ggml's ggml_float)."""
    n = x.shape[1]
    for t in range(x.shape[0]):
        ss = 0.0
        for k in range(n):
            ss += np.float64(x[t, k]) * x[t, k]
        scale = np.float32(1.0 / math.sqrt(ss / n + eps))
        for k in range(n):
            out[t, k] = x[t, k] * scale * w[k]


@njit(cache=True, fastmath=True, error_model="numpy")  # NaN rows: NaN out, not ZeroDivisionError
def head_rmsnorm(v, n_heads, hd, w, eps):
    """RMSNorm of each head of ``v`` (T, n_heads*hd) in place with the per-head weight ``w`` (hd,):
    Qwen 3's and Gemma 3's attn_q_norm / attn_k_norm."""
    for t in range(v.shape[0]):
        for h in range(n_heads):
            o = h * hd
            ss = 0.0
            for k in range(hd):
                ss += np.float64(v[t, o + k]) * v[t, o + k]
            scale = np.float32(1.0 / math.sqrt(ss / hd + eps))
            for k in range(hd):
                v[t, o + k] = v[t, o + k] * scale * w[k]


@njit(cache=True, fastmath=True, inline="always")
def tanhf(x):
    """tanh of float32 ``x`` through :func:`expf` (vectorizable): 1 - 2 / (e^(2x) + 1)."""
    return np.float32(1.0) - np.float32(2.0) / (expf(np.float32(2.0) * x) + np.float32(1.0))


@njit(cache=True, fastmath=True)
def softcap(v, cap):
    """v <- cap * tanh(v / cap) in place (Gemma 2's logit soft-capping)."""
    inv = np.float32(1.0) / cap
    for i in range(v.shape[0]):
        v[i] = cap * tanhf(v[i] * inv)


@njit(cache=True, fastmath=True, inline="always")
def _glu_row(g, u, act):
    if act == SILU:
        for j in range(g.shape[0]):
            x = g[j]
            g[j] = x / (np.float32(1.0) + expf(-x)) * u[j]
    else:  # GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        c = np.float32(0.7978845608028654)
        for j in range(g.shape[0]):
            x = g[j]
            g[j] = np.float32(0.5) * x * (np.float32(1.0) + tanhf(c * (x + np.float32(0.044715) * x * x * x))) * u[j]


@njit(cache=True, parallel=True, fastmath=True)
def _glu_par(gate, up, act):
    for t in prange(gate.shape[0]):
        _glu_row(gate[t], up[t], act)


@njit(cache=True, fastmath=True)
def glu(gate, up, act):
    """gate <- act(gate) * up (ggml_swiglu / ggml_geglu), rows in parallel for prompt batches."""
    if gate.shape[0] > 1:
        _glu_par(gate, up, act)
    else:
        _glu_row(gate[0], up[0], act)


@njit(cache=True, parallel=True, fastmath=True)
def _glu_fused_par(gu, n_ff, act):
    for t in prange(gu.shape[0]):
        _glu_row(gu[t, :n_ff], gu[t, n_ff:], act)


@njit(cache=True, fastmath=True)
def glu_fused(gu, n_ff, act):
    """:func:`glu` of the rows of a fused gate|up output ``gu`` (T, 2 n_ff), in place in the
    gate columns: gu[t, :n_ff] <- act(gu[t, :n_ff]) * gu[t, n_ff:]."""
    if gu.shape[0] > 1:
        _glu_fused_par(gu, n_ff, act)
    else:
        _glu_row(gu[0, :n_ff], gu[0, n_ff:], act)


# ---------------------------------------------------------------------------------------------------
# rope


@njit(cache=True)
def rope_tables(T, n_rot, pos, inv_freq, mscale):
    """cos and sin (float32 (n_kinds, T, n_rot // 2) each) of the positions ``pos`` (int64 (T,):
    token t's position; a prompt batch has pos0, pos0 + 1, ...) for every rope kind and dim pair:
    pair ``i`` at position ``p`` turns by ``p * inv_freq[kind, i]``, both times ``mscale[kind]``
    (:mod:`.rope`). Computed once per forward call, shared by all layers."""
    half = n_rot // 2
    nk = inv_freq.shape[0]
    cos = np.empty((nk, T, half), np.float32)
    sin = np.empty((nk, T, half), np.float32)
    for r in range(nk):
        for t in range(T):
            for i in range(half):
                th = pos[t] * inv_freq[r, i]
                cos[r, t, i] = np.float32(math.cos(th) * mscale[r])
                sin[r, t, i] = np.float32(math.sin(th) * mscale[r])
    return cos, sin


@njit(cache=True)
def rope(v, n_heads, ip, cos, sin):
    """Rotate the first n_rot dims of each head of ``v`` (T, n_heads*hd) in place by the angles of
    :func:`rope_tables` (one kind): NORM rope turns adjacent pairs (2i, 2i+1), NEOX rope (I_NEOX)
    dims i and i + n_rot/2."""
    hd = ip[I_HD]
    half = ip[I_ROT] // 2
    neox = ip[I_NEOX]
    for t in range(v.shape[0]):
        for i in range(half):
            c = cos[t, i]
            s = sin[t, i]
            for h in range(n_heads):
                o = h * hd
                if neox:
                    a, b = o + i, o + i + half
                else:
                    a, b = o + 2 * i, o + 2 * i + 1
                x0 = v[t, a]
                x1 = v[t, b]
                v[t, a] = x0 * c - x1 * s
                v[t, b] = x0 * s + x1 * c


# ---------------------------------------------------------------------------------------------------
# attention


#: positions per tile of the K cache
KT = 64


@njit(cache=True, inline="always")
def _kv_store(cache, pos0, x):
    """V cache [kv head][position][dim]: cache[h, pos0 + t, d] = x[t, h * hd + d] (x float32 (T, n_kv * hd)),
    converted to the cache's element type."""
    n_kv, hd = cache.shape[0], cache.shape[2]
    for t in range(x.shape[0]):
        for h in range(n_kv):
            for d in range(hd):
                cache[h, pos0 + t, d] = kv_from_f32(x[t, h * hd + d], cache[0, 0, 0])


@njit(cache=True, inline="always")
def _kv_store_t(cache, pos0, x):
    """K cache in tiles of KT positions, [kv head][tile][dim][position in tile]: decode attention
    reads a tile as one contiguous run and takes the scores of its positions along the vector
    lanes (no horizontal sum per key)."""
    n_kv, hd = cache.shape[0], cache.shape[2]
    for t in range(x.shape[0]):
        p = pos0 + t
        for h in range(n_kv):
            for d in range(hd):
                cache[h, p // KT, d, p % KT] = kv_from_f32(x[t, h * hd + d], cache[0, 0, 0, 0])


@njit(cache=True, fastmath=True, inline="always")
def _exp_scores(s, scale, cap):
    """s <- exp(t - max t) in place for t = cap * tanh(scale * s / cap) (float32; without
    soft-capping, ``cap`` 0, t = scale * s); returns (max t, sum of the exps): an unnormalized
    softmax, which flash-decoding's partial results keep. ``s``: a view starting at its first
    element (loops from 0 vectorize)."""
    m = s.shape[0]
    mx = np.float32(-np.inf)
    if cap > 0:
        inv = np.float32(1.0) / cap
        for p in range(m):
            s[p] = cap * tanhf(s[p] * scale * inv)
            mx = max(mx, s[p])
    else:
        for p in range(m):
            s[p] *= scale
            mx = max(mx, s[p])
    tot = np.float32(0.0)
    for p in range(m):
        e = expf(s[p] - mx)
        s[p] = e
        tot += e
    return mx, tot


@njit(cache=True, fastmath=True, inline="always")
def _softmax(s, scale, cap):
    """s <- softmax(cap * tanh(scale * s / cap)) in place (:func:`_exp_scores`, normalized)."""
    _, tot = _exp_scores(s, scale, cap)
    inv = np.float32(1.0) / tot
    for p in range(s.shape[0]):
        s[p] *= inv


@njit(cache=True, inline="always")
def _first_key(pos, window):
    """The first key position query position ``pos`` sees: 0, or with a sliding window of
    ``window`` positions pos - window + 1 (llama.cpp's LLAMA_SWA_TYPE_STANDARD masks keys with
    pos - p >= window)."""
    return max(0, pos - window + 1) if window > 0 else 0


#: cached positions per decode attention work item (a KV head and a span of positions)
_DEC_SPAN = 512


@njit(cache=True, fastmath=True)
def _decode_item(it, nsp, q, kc, vc, lo, n, grp, hd, scale, cap, pm, pl, po):
    """Work item ``it`` = (KV head, span of positions) of one decoded token: the scores of the
    ``grp`` query heads sharing the KV head against the span's keys, a local softmax (max ``pm``,
    sum ``pl``) and the unnormalized output ``po`` (flash-decoding's partial results, merged by
    :func:`_attention_decode`). A K tile (``KT`` positions x hd, contiguous) gives 8 vectors of
    scores per query head (positions along the lanes: 8 independent FMA chains over the dims, no
    horizontal sums); V rows are accumulated with the dims along the lanes."""
    kvh = it // nsp
    pa = lo + (it % nsp) * _DEC_SPAN
    pb = min(n, pa + _DEC_SPAN)
    ln = pb - pa
    ntile = kc.shape[1]
    n_ctx = vc.shape[1]
    sc = np.empty((grp, ln), np.float32)
    st = np.empty(KT, np.float32)
    for tile in range(pa // KT, (pb - 1) // KT + 1):
        i0 = max(pa, tile * KT) - tile * KT
        i1 = min(pb, tile * KT + KT) - tile * KT
        o0 = tile * KT - pa
        kb = (kvh * ntile + tile) * hd * KT
        for g in range(grp):
            qr = q[0, (kvh * grp + g) * hd:(kvh * grp + g + 1) * hd]
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = fzero()
            for d in range(hd):
                qd = qr[d]
                o = kb + d * KT
                a0 = fma_s(a0, load_kv(kc, o), qd)
                a1 = fma_s(a1, load_kv(kc, o + 8), qd)
                a2 = fma_s(a2, load_kv(kc, o + 16), qd)
                a3 = fma_s(a3, load_kv(kc, o + 24), qd)
                a4 = fma_s(a4, load_kv(kc, o + 32), qd)
                a5 = fma_s(a5, load_kv(kc, o + 40), qd)
                a6 = fma_s(a6, load_kv(kc, o + 48), qd)
                a7 = fma_s(a7, load_kv(kc, o + 56), qd)
            store_f(st, 0, a0)
            store_f(st, 8, a1)
            store_f(st, 16, a2)
            store_f(st, 24, a3)
            store_f(st, 32, a4)
            store_f(st, 40, a5)
            store_f(st, 48, a6)
            store_f(st, 56, a7)
            for i in range(i0, i1):
                sc[g, o0 + i] = st[i]
    for g in range(grp):
        pm[it, g], pl[it, g] = _exp_scores(sc[g], scale, cap)
    for g in range(grp):
        og = po[it, g]
        sg = sc[g]
        if hd % W == 0:
            for dv in range(0, hd, W):
                c0 = fzero()
                c1 = fzero()
                vb = (kvh * n_ctx + pa) * hd + dv
                p = 0
                while p + 1 < ln:
                    c0 = fma_s(c0, load_kv(vc, vb + p * hd), sg[p])
                    c1 = fma_s(c1, load_kv(vc, vb + (p + 1) * hd), sg[p + 1])
                    p += 2
                if p < ln:
                    c0 = fma_s(c0, load_kv(vc, vb + p * hd), sg[p])
                store_f(og, dv, add_v(c0, c1))
        else:
            og[:] = 0.0
            for p in range(ln):
                w = sg[p]
                vr = vc[kvh, pa + p]
                for d in range(hd):
                    og[d] += w * kv_value(vr[d])


@njit(cache=True, parallel=True)
def _decode_items_par(nit, nsp, q, kc, vc, lo, n, grp, hd, scale, cap, pm, pl, po):
    for it in prange(nit):  # prange's index is unsigned: int64, so that one _decode_item is compiled
        _decode_item(np.int64(it), nsp, q, kc, vc, lo, n, grp, hd, scale, cap, pm, pl, po)


@njit(cache=True, fastmath=True, error_model="numpy")  # 1 / tot: NaN/inf scores give NaN, not ZeroDivisionError
def _attention_decode(q, kc, vc, pos0, n_head, n_kv, hd, scale, cap, window, out, par):
    """One decoded token (q (1, n_head*hd)) at position ``pos0``: work items of (KV head, span of
    ``_DEC_SPAN`` positions), in parallel (``par``, False inside another parallel loop) once the
    context pays for a parallel region, then each head's partial
    softmaxes merged (rescaled by exp(max_i - max)), as flash-decoding does. Each KV head's keys and
    values are read once for all the query heads of its group."""
    grp = n_head // n_kv
    n = pos0 + 1
    lo = _first_key(pos0, window)
    nsp = (n - lo + _DEC_SPAN - 1) // _DEC_SPAN
    nit = n_kv * nsp
    pm = np.empty((nit, grp), np.float32)
    pl = np.empty((nit, grp), np.float32)
    po = np.empty((nit, grp, hd), np.float32)
    if not par or n_head * (n - lo) * hd < 65536:
        for it in range(nit):
            _decode_item(it, nsp, q, kc, vc, lo, n, grp, hd, scale, cap, pm, pl, po)
    else:
        _decode_items_par(nit, nsp, q, kc, vc, lo, n, grp, hd, scale, cap, pm, pl, po)
    for h in range(n_head):
        kvh = h // grp
        g = h % grp
        mx = np.float32(-np.inf)
        for c in range(nsp):
            mx = max(mx, pm[kvh * nsp + c, g])
        tot = np.float32(0.0)
        o = out[0, h * hd:(h + 1) * hd]
        o[:] = 0.0
        for c in range(nsp):
            it = kvh * nsp + c
            f = expf(pm[it, g] - mx)
            tot += f * pl[it, g]
            for d in range(hd):
                o[d] += f * po[it, g, d]
        inv = np.float32(1.0) / tot
        for d in range(hd):
            o[d] *= inv


#: prompt tokens per attention work item (a head and a chunk of tokens)
_ATT_CHUNK = 64


@njit(cache=True, fastmath=True, error_model="numpy")  # _softmax's 1 / tot: as _attention_decode
def _batch_item(c, h, q, kc, vc, pos0, n_head, n_kv, hd, scale, cap, window, out):
    """Chunk ``c`` of prompt tokens, head ``h`` (:func:`_attention_batch`), read
    straight from the cache (fp16 converted in the load, :func:`~ggq.runtime.kernels.simd.load_kv`).

    S = Q K^T in register tiles of 4 tokens x 16 positions: K's tiles are [dim][position], so each
    dim adds one broadcast query value times 16 positions (8 FMAs per 2 loads, no horizontal sums);
    only the positions up to a tile's last token are computed. After the causal softmax,
    O = P V in tiles of 4 tokens x 16 dims (V rows are [position][dim]), over each tile's visible
    positions only; the last ``hd % 16`` dims (head dims that are not a multiple of 16) one at a
    time, summed in the same order."""
    T = q.shape[0]
    grp = n_head // n_kv
    kvh = h // grp
    t0 = c * _ATT_CHUNK
    tn = min(T, t0 + _ATT_CHUNK) - t0
    tn4 = (tn + 3) // 4 * 4
    p0 = _first_key(pos0 + t0, window)
    pa = p0 - p0 % 16  # first key computed (16-aligned: K tiles hold KT = 64 positions)
    pe = pos0 + t0 + tn  # the chunk sees keys < pe
    nk = (pe - pa + 15) // 16 * 16
    ntile = kc.shape[1]
    n_ctx = vc.shape[1]
    qt = np.zeros(hd * 4, np.float32)  # a 4-token tile's queries, [dim][token]
    s = np.zeros(tn4 * nk, np.float32)  # scores / probabilities, [token][position - pa]
    for tt in range(0, tn4, 4):
        for i in range(4):
            t = min(tt + i, tn - 1)  # padding tokens repeat the last (their rows are never read)
            for d in range(hd):
                qt[d * 4 + i] = q[t0 + t, h * hd + d]
        lim = min(pe, pos0 + t0 + tt + 4) - pa  # the tile's last token sees keys < pa + lim
        for pv in range(0, lim, 16):
            p = pa + pv
            kb = (kvh * ntile + p // KT) * hd * KT + p % KT
            a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = fzero()
            for d in range(hd):
                k0 = load_kv(kc, kb + d * KT)
                k1 = load_kv(kc, kb + d * KT + 8)
                q0, q1, q2, q3 = qt[d * 4], qt[d * 4 + 1], qt[d * 4 + 2], qt[d * 4 + 3]
                a0 = fma_s(a0, k0, q0)
                b0 = fma_s(b0, k1, q0)
                a1 = fma_s(a1, k0, q1)
                b1 = fma_s(b1, k1, q1)
                a2 = fma_s(a2, k0, q2)
                b2 = fma_s(b2, k1, q2)
                a3 = fma_s(a3, k0, q3)
                b3 = fma_s(b3, k1, q3)
            so = tt * nk + pv
            store_f(s, so, a0)
            store_f(s, so + 8, b0)
            store_f(s, so + nk, a1)
            store_f(s, so + nk + 8, b1)
            store_f(s, so + 2 * nk, a2)
            store_f(s, so + 2 * nk + 8, b2)
            store_f(s, so + 3 * nk, a3)
            store_f(s, so + 3 * nk + 8, b3)
    for t in range(tn4):
        row = s[t * nk:(t + 1) * nk]
        if t >= tn:
            row[:] = 0.0
            continue
        m = pos0 + t0 + t + 1 - pa
        lo = _first_key(pos0 + t0 + t, window) - pa
        _softmax(row[lo:m], scale, cap)
        row[:lo] = 0.0
        row[m:] = 0.0
    ld = out.shape[1]
    for tt in range(0, tn4, 4):
        plo = _first_key(pos0 + t0 + tt, window) - pa
        phi = min(pe, pos0 + t0 + tt + 4) - pa
        so = tt * nk
        for dv in range(0, hd - hd % 16, 16):
            a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = fzero()
            vb = (kvh * n_ctx + pa) * hd + dv
            for p in range(plo, phi):
                v0 = load_kv(vc, vb + p * hd)
                v1 = load_kv(vc, vb + p * hd + 8)
                w0, w1, w2, w3 = at(s, so + p), at(s, so + nk + p), at(s, so + 2 * nk + p), at(s, so + 3 * nk + p)
                a0 = fma_s(a0, v0, w0)
                b0 = fma_s(b0, v1, w0)
                a1 = fma_s(a1, v0, w1)
                b1 = fma_s(b1, v1, w1)
                a2 = fma_s(a2, v0, w2)
                b2 = fma_s(b2, v1, w2)
                a3 = fma_s(a3, v0, w3)
                b3 = fma_s(b3, v1, w3)
            oo = (t0 + tt) * ld + h * hd + dv
            store_f(out, oo, a0)
            store_f(out, oo + 8, b0)
            if tt + 1 < tn:
                store_f(out, oo + ld, a1)
                store_f(out, oo + ld + 8, b1)
            if tt + 2 < tn:
                store_f(out, oo + 2 * ld, a2)
                store_f(out, oo + 2 * ld + 8, b2)
            if tt + 3 < tn:
                store_f(out, oo + 3 * ld, a3)
                store_f(out, oo + 3 * ld + 8, b3)
        for d in range(hd - hd % 16, hd):
            for i in range(min(4, tn - tt)):
                acc = np.float32(0.0)
                for p in range(plo, phi):
                    acc += kv_value(vc[kvh, pa + p, d]) * s[so + i * nk + p]
                out[t0 + tt + i, h * hd + d] = acc


@njit(cache=True, parallel=True)
def _attention_batch(q, kc, vc, pos0, n_head, n_kv, hd, scale, cap, window, out):
    """Prompt batches: per head and chunk of ``_ATT_CHUNK`` tokens, S = Q K^T, a causal softmax,
    O = P V as float products in register tiles that skip the masked keys (about half the work of
    the full products), parallel over (chunk, head) items: :func:`_batch_item` reads the cache
    directly. Only the keys
    the chunk sees are read (with a sliding window, from the first token's first visible key)."""
    nch = (q.shape[0] + _ATT_CHUNK - 1) // _ATT_CHUNK
    # chunk c sees c + 1 chunks of keys: an item takes chunks j and nch - 1 - j of one head, so
    # that items are equal work and prange's equal contiguous shares balance the threads
    npair = (nch + 1) // 2
    for it in prange(npair * n_head):
        h = it % n_head
        j = it // n_head
        for k in range(2 if nch - 1 - j > j else 1):
            c = j if k == 0 else nch - 1 - j
            _batch_item(c, h, q, kc, vc, pos0, n_head, n_kv, hd, scale, cap, window, out)


@njit(cache=True)
def _one_run(pos, seq):
    """Whether the tokens are one run of consecutive positions of one sequence (a prompt batch or a
    single decoded token): seq[t] == seq[0] and pos[t] == pos[0] + t."""
    for t in range(pos.shape[0]):
        if seq[t] != seq[0] or pos[t] != pos[0] + t:
            return False
    return True


@njit(cache=True, parallel=True)
def _attention_tokens_par(q, kc, vc, l, pos, seq, n_head, n_kv, hd, scale, cap, window, out, par):
    for t in prange(q.shape[0]):
        s = seq[t]
        _attention_decode(q[t:t + 1], kc[s, l], vc[s, l], pos[t], n_head, n_kv, hd, scale, cap, window,
                          out[t:t + 1], par)


@njit(cache=True)
def _attention_tokens(q, kc, vc, l, pos, seq, n_head, n_kv, hd, scale, cap, window, out):
    """Tokens of several sequences (a batched decode step, :meth:`Model.decode_batch`): each token
    ``t`` attends to the cached positions <= pos[t] of its own sequence seq[t] (its K and V already
    stored) with the decode path (:func:`_attention_decode`), tokens in parallel once the total work
    pays for a parallel region."""
    work = 0
    for t in range(q.shape[0]):
        work += n_head * (pos[t] + 1) * hd
    if work < 65536 or q.shape[0] == 1:
        for t in range(q.shape[0]):
            s = seq[t]
            _attention_decode(q[t:t + 1], kc[s, l], vc[s, l], pos[t], n_head, n_kv, hd, scale, cap, window,
                              out[t:t + 1], q.shape[0] == 1)
    else:  # par is False here (q.shape[0] > 1): no parallel region inside the parallel loop
        _attention_tokens_par(q, kc, vc, l, pos, seq, n_head, n_kv, hd, scale, cap, window, out, q.shape[0] == 1)


@njit(cache=True, fastmath=True)
def attention(l, q, k, v, kc, vc, pos, seq, ip, fp, swa, out):
    """Causal grouped-query attention of layer ``l`` for tokens at positions ``pos`` of sequences
    ``seq`` (int64 (T,) each): store k, v (T, n_kv*hd) in the KV cache of each token's sequence at
    its position, then out (T, n_head*hd) = softmax(scale * q K^T) V over the cached positions up
    to each token's own, with attention soft-capping (F_ATTN_SOFTCAP > 0) and, when ``swa``, a
    sliding window of I_SWA_WINDOW positions.

    One run of consecutive positions of one sequence (:func:`_one_run`): prompt batches of >= 4
    tokens as causal float matrix products per (chunk of tokens, head); decoding one token at a
    time by (KV head, span of positions) items merged flash-decoding style, in parallel unless the
    work is too small to pay for a parallel region. Tokens of several sequences or positions
    (a batched decode step): each token by the decode path over its own sequence
    (:func:`_attention_tokens`). ``kc[s, l]``: [kv head][tile of KT positions][dim][position],
    ``vc[s, l]``: [kv head][position][dim]."""
    n_head, n_kv, hd = ip[I_HEAD], ip[I_KV], ip[I_HD]
    scale = np.float32(fp[F_ATTN_SCALE])
    cap = np.float32(fp[F_ATTN_SOFTCAP])
    window = ip[I_SWA_WINDOW] if swa else 0
    T = q.shape[0]
    if not _one_run(pos, seq):
        for t in range(T):
            _kv_store_t(kc[seq[t], l], pos[t], k[t:t + 1])
            _kv_store(vc[seq[t], l], pos[t], v[t:t + 1])
        _attention_tokens(q, kc, vc, l, pos, seq, n_head, n_kv, hd, scale, cap, window, out)
        return
    pos0 = pos[0]
    kcl = kc[seq[0], l]
    vcl = vc[seq[0], l]
    _kv_store_t(kcl, pos0, k)
    _kv_store(vcl, pos0, v)
    if T >= 4:
        _attention_batch(q, kcl, vcl, pos0, n_head, n_kv, hd, scale, cap, window, out)
    else:  # decoding (and batches of 2-3 tokens, one token at a time; their K, V are all stored)
        for t in range(T):
            _attention_decode(q[t:t + 1], kcl, vcl, pos0 + t, n_head, n_kv, hd, scale, cap, window, out[t:t + 1],
                              T < 4)  # True, as a run-time bool: all callers compile one _attention_decode
