"""The forward pass: llama / mistral / qwen2 decoder-only transformers from a GGUF file.

``Model.load(path)`` memory-maps the file (:mod:`ggq.runtime.loader`), repacks the weights into
the kernel layouts (:mod:`ggq.runtime.kernels`, the file's pages are released as each tensor is
done) and allocates a KV cache. ``Model.eval(tokens)`` runs the tokens at positions ``n_past...``
through **one** compiled call (:func:`forward`) that loops over all layers: RMSNorm, Q/K/V
projections (+ biases for qwen2), RoPE (NORM = adjacent pairs for llama/mistral, whose Q/K rows
llama.cpp's converter permuted into that form; NEOX = halves for qwen2) with freq_base, linear
scaling, YaRN and llama3-style ``rope_freqs`` factors (:mod:`.rope`), grouped-query attention
over the float32 KV cache, SwiGLU FFN, final norm and the output projection (``token_embd`` when ``output.weight`` is
absent). Prompt batches go through the same call with T rows (matrix-matrix kernels); a single
token is the decode path. Same graph as llama.cpp's llm_build_llama / llm_build_qwen2.
"""

from __future__ import annotations

import math
import mmap
import time

import numba
import numpy as np
from gguf import GGMLQuantizationType as T
from numba import njit, prange, types
from numba.extending import overload

from ggq.errors import GGQError
from ggq.runtime.kernels import (C_FAM, SUPPORTED_TYPES, WeightArena, get_row, matmul, quantize_act,
                                 quantize_act_par)
from ggq.runtime.kernels.floats import f16_to_f32, f32_to_f16, rows_times_x
from ggq.runtime.kernels.mathf import expf
from ggq.runtime.kernels.repack import FAM_N32
from ggq.runtime.loader import open_gguf
from ggq.runtime.rope import SCALING_TYPES, rope_frequencies

# layer table columns
L_ATTN_NORM, L_WQ, L_WK, L_WV, L_WO, L_FFN_NORM, L_GATE, L_UP, L_DOWN, L_BQ, L_BK, L_BV = range(12)
# integer hyper-parameters
I_EMBD, I_HEAD, I_KV, I_HD, I_ROT, I_NEOX, I_FF, I_VOCAB, I_LAYER, I_TOKEMB, I_OUTNORM, I_OUT = range(12)


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


@njit(cache=True, inline="always")
def _kv_store(cache, pos0, x):
    """cache[pos0 + t] = x[t] (x float32 (T, n)), converted to the cache's element type."""
    for t in range(x.shape[0]):
        for j in range(x.shape[1]):
            cache[pos0 + t, j] = kv_from_f32(x[t, j], cache[0, 0])


@njit(cache=True, inline="always")
def _kv_store_t(cache, pos0, x):
    """cache[j, pos0 + t] = x[t, j]: the transposed K cache ([dim][position], so decode attention
    takes the scores of all positions along the vector lanes)."""
    for t in range(x.shape[0]):
        for j in range(x.shape[1]):
            cache[j, pos0 + t] = kv_from_f32(x[t, j], cache[0, 0])


@njit(cache=True, fastmath=True)
def _rmsnorm(x, w, eps, out):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w  (ggml_rms_norm then mul)."""
    n = x.shape[1]
    for t in range(x.shape[0]):
        ss = 0.0
        for k in range(n):
            ss += np.float64(x[t, k]) * x[t, k]
        scale = np.float32(1.0 / math.sqrt(ss / n + eps))
        for k in range(n):
            out[t, k] = x[t, k] * scale * w[k]


@njit(cache=True)
def _rope_table(T, n_rot, pos0, inv_freq, mscale):
    """cos and sin (float32 (T, n_rot // 2) each) of positions pos0.. for every dim pair: pair
    ``i`` at position ``p`` turns by ``p * inv_freq[i]``, both times ``mscale`` (:mod:`.rope`).
    Computed once per forward call, shared by all layers."""
    half = n_rot // 2
    cos = np.empty((T, half), np.float32)
    sin = np.empty((T, half), np.float32)
    for t in range(T):
        for i in range(half):
            th = (pos0 + t) * inv_freq[i]
            cos[t, i] = np.float32(math.cos(th) * mscale)
            sin[t, i] = np.float32(math.sin(th) * mscale)
    return cos, sin


@njit(cache=True)
def _rope(v, n_heads, hd, n_rot, neox, cos, sin):
    """Rotate the first ``n_rot`` dims of each head of ``v`` (T, n_heads*hd) in place by the
    angles of :func:`_rope_table` (NORM: adjacent pairs; NEOX: dims i and i + n_rot/2)."""
    half = n_rot // 2
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


@njit(cache=True, fastmath=True, inline="always")
def _softmax(s, m, scale):
    """s[:m] <- softmax(scale * s[:m]) in place (float32, max subtracted, vectorizable exp)."""
    mx = np.float32(-np.inf)
    for p in range(m):
        s[p] *= scale
        mx = max(mx, s[p])
    tot = np.float32(0.0)
    for p in range(m):
        e = expf(s[p] - mx)
        s[p] = e
        tot += e
    inv = np.float32(1.0) / tot
    for p in range(m):
        s[p] *= inv


@njit(cache=True, fastmath=True, inline="always")
def _attend(it, q, kc, vc, pos0, n_head, n_kv, hd, scale, out):
    """Causal attention of one (token, head) pair ``it`` = t * n_head + h (softmax in float32)."""
    grp = n_head // n_kv
    t = it // n_head
    h = it % n_head
    kvh = h // grp
    n = pos0 + t + 1
    sc = np.empty(n, np.float32)
    qh = q[t, h * hd:(h + 1) * hd]
    for p in range(n):
        sc[p] = 0.0
    for d in range(hd):  # keys along the vector lanes: the K cache is stored [dim][position]
        qd = qh[d]
        kd = kc[kvh * hd + d]
        for p in range(n):
            sc[p] += qd * kv_value(kd[p])
    _softmax(sc, n, scale)
    o = out[t, h * hd:(h + 1) * hd]
    o[:] = 0.0
    for p in range(n):
        w = sc[p]
        vp = vc[p, kvh * hd:(kvh + 1) * hd]
        for d in range(hd):
            o[d] += w * kv_value(vp[d])


@njit(cache=True, parallel=True, fastmath=True)
def _attention_par(q, kc, vc, pos0, n_head, n_kv, hd, scale, out):
    for it in prange(q.shape[0] * n_head):
        _attend(it, q, kc, vc, pos0, n_head, n_kv, hd, scale, out)


@njit(cache=True, parallel=True, fastmath=True)
def _attention_batch(q, kc, vc, pos0, n_head, n_kv, hd, scale, out):
    """Prompt batches: per head, S = Q K^T, a causal softmax, O = P V as float products in 4 x 4
    register tiles (:func:`~ggq.runtime.kernels.floats.rows_times_x`); parallel over heads."""
    T = q.shape[0]
    n = pos0 + T
    grp = n_head // n_kv
    for h in prange(n_head):
        kvh = h // grp
        kf = np.empty((n, hd), np.float32)
        vt = np.empty((hd, n), np.float32)
        for d in range(hd):
            for p in range(n):
                kf[p, d] = kv_value(kc[kvh * hd + d, p])
        for p in range(n):
            for d in range(hd):
                vt[d, p] = kv_value(vc[p, kvh * hd + d])
        qh = np.ascontiguousarray(q[:, h * hd:(h + 1) * hd])
        s = np.empty((T, n), np.float32)
        rows_times_x(kf, n, 0, qh, s)  # s[t, p] = k_p . q_t
        for t in range(T):
            m = pos0 + t + 1  # keys visible to token t
            _softmax(s[t], m, scale)
            s[t, m:] = 0.0
        o = np.empty((T, hd), np.float32)
        rows_times_x(vt, hd, 0, s, o)  # o[t, d] = sum_p v_p[d] * s[t, p]
        out[:, h * hd:(h + 1) * hd] = o


@njit(cache=True, fastmath=True)
def _attention(q, kc, vc, pos0, n_head, n_kv, hd, scale, out):
    """Causal GQA: q (T, n_head*hd), caches ``kc`` (n_kv*hd, n_ctx) (transposed) and ``vc``
    (n_ctx, n_kv*hd) holding positions < pos0+T; out (T, n_head*hd). Prompt batches of >= 4 tokens as float matrix products per head; decode
    per (token, head), in parallel unless the work is too small to pay for a parallel region."""
    T = q.shape[0]
    if T >= 4:
        _attention_batch(q, kc, vc, pos0, n_head, n_kv, hd, scale, out)
    elif T * n_head * (pos0 + T) * hd < 65536:
        for it in range(T * n_head):
            _attend(it, q, kc, vc, pos0, n_head, n_kv, hd, scale, out)
    else:
        _attention_par(q, kc, vc, pos0, n_head, n_kv, hd, scale, out)


@njit(cache=True, fastmath=True, inline="always")
def _swiglu_row(g, u):
    for j in range(g.shape[0]):
        x = g[j]
        g[j] = x / (np.float32(1.0) + expf(-x)) * u[j]


@njit(cache=True, parallel=True, fastmath=True)
def _swiglu_par(gate, up):
    for t in prange(gate.shape[0]):
        _swiglu_row(gate[t], up[t])


@njit(cache=True, fastmath=True)
def _swiglu(gate, up):
    """gate <- silu(gate) * up (ggml_swiglu), rows in parallel for prompt batches."""
    if gate.shape[0] > 1:
        _swiglu_par(gate, up)
    else:
        _swiglu_row(gate[0], up[0])


@njit(cache=True, inline="always")
def _reads_q8(mats, m):
    """Whether matrix ``m`` (-1: none) is an integer family, i.e. reads the 8-bit activations."""
    return m >= 0 and mats[m, C_FAM] >= FAM_N32


@njit(cache=True)
def _quant(x, xq, xd, xs16, xs32):
    if x.shape[1] % 32 == 0:
        if x.shape[0] > 1:
            quantize_act_par(x, xq, xd, xs16, xs32)
        else:
            quantize_act(x, xq, xd, xs16, xs32)


@njit(cache=True)
def _abufs(T, n):
    nb = max(n // 32, 1)
    return (np.empty((T, nb * 32), np.int8), np.empty((T, nb), np.float32),
            np.empty((T, 2 * nb), np.float32), np.empty((T, nb), np.float32))


@njit(cache=True, fastmath=True)
def forward(tokens, pos0, all_logits, mats, u8, i8, f32, u16, u32, vecs, lay, ip, eps, attn_scale,
            inv_freq, rope_mscale, kc, vc, logits):
    """Run ``tokens`` (int64 (T,)) at positions pos0.. through all layers, filling the KV caches
    ``kc`` (n_layer, n_kv*hd, n_ctx) and ``vc`` (n_layer, n_ctx, n_kv*hd) (float32, or fp16 bits
    as uint16) and ``logits`` (float32 (T or 1, n_vocab)):
    every row when ``all_logits``, else the last token's. One compiled call per batch."""
    T = tokens.shape[0]
    n_embd = ip[I_EMBD]
    n_head = ip[I_HEAD]
    n_kv = ip[I_KV]
    hd = ip[I_HD]
    n_ff = ip[I_FF]
    nq = n_head * hd
    nkv = n_kv * hd
    x = np.empty((T, n_embd), np.float32)
    for t in range(T):
        get_row(ip[I_TOKEMB], mats, u8, i8, f32, u16, u32, tokens[t], x[t])
    h = np.empty((T, n_embd), np.float32)
    q = np.empty((T, nq), np.float32)
    k = np.empty((T, nkv), np.float32)
    v = np.empty((T, nkv), np.float32)
    att = np.empty((T, nq), np.float32)
    o = np.empty((T, n_embd), np.float32)
    gate = np.empty((T, n_ff), np.float32)
    up = np.empty((T, n_ff), np.float32)
    qkv = np.empty((T, nq + 2 * nkv), np.float32)
    gu = np.empty((T, 2 * n_ff), np.float32)
    e_q, e_d, e_s16, e_s32 = _abufs(T, n_embd)
    a_q, a_d, a_s16, a_s32 = _abufs(T, nq)
    f_q, f_d, f_s16, f_s32 = _abufs(T, n_ff)
    rcos, rsin = _rope_table(T, ip[I_ROT], pos0, inv_freq, rope_mscale)
    for l in range(ip[I_LAYER]):
        L = lay[l]
        an = L[L_ATTN_NORM]
        _rmsnorm(x, vecs[an:an + n_embd], eps, h)
        if _reads_q8(mats, L[L_WQ]) or _reads_q8(mats, L[L_WK]) or _reads_q8(mats, L[L_WV]):
            _quant(h, e_q, e_d, e_s16, e_s32)
        if L[L_WK] < 0:  # fused Q|K|V rows: one parallel region
            matmul(L[L_WQ], mats, u8, i8, f32, u16, u32, h, e_q, e_d, e_s16, e_s32, qkv)
            q[:] = qkv[:, :nq]
            k[:] = qkv[:, nq:nq + nkv]
            v[:] = qkv[:, nq + nkv:]
        else:
            matmul(L[L_WQ], mats, u8, i8, f32, u16, u32, h, e_q, e_d, e_s16, e_s32, q)
            matmul(L[L_WK], mats, u8, i8, f32, u16, u32, h, e_q, e_d, e_s16, e_s32, k)
            matmul(L[L_WV], mats, u8, i8, f32, u16, u32, h, e_q, e_d, e_s16, e_s32, v)
        if L[L_BQ] >= 0:
            for t in range(T):
                q[t] += vecs[L[L_BQ]:L[L_BQ] + nq]
                k[t] += vecs[L[L_BK]:L[L_BK] + nkv]
                v[t] += vecs[L[L_BV]:L[L_BV] + nkv]
        _rope(q, n_head, hd, ip[I_ROT], ip[I_NEOX], rcos, rsin)
        _rope(k, n_kv, hd, ip[I_ROT], ip[I_NEOX], rcos, rsin)
        _kv_store_t(kc[l], pos0, k)
        _kv_store(vc[l], pos0, v)
        _attention(q, kc[l], vc[l], pos0, n_head, n_kv, hd, attn_scale, att)
        if _reads_q8(mats, L[L_WO]):
            _quant(att, a_q, a_d, a_s16, a_s32)
        matmul(L[L_WO], mats, u8, i8, f32, u16, u32, att, a_q, a_d, a_s16, a_s32, o)
        x += o
        fn = L[L_FFN_NORM]
        _rmsnorm(x, vecs[fn:fn + n_embd], eps, h)
        if _reads_q8(mats, L[L_GATE]) or _reads_q8(mats, L[L_UP]):
            _quant(h, e_q, e_d, e_s16, e_s32)
        if L[L_UP] < 0:  # fused gate|up rows
            matmul(L[L_GATE], mats, u8, i8, f32, u16, u32, h, e_q, e_d, e_s16, e_s32, gu)
            gate[:] = gu[:, :n_ff]
            up[:] = gu[:, n_ff:]
        else:
            matmul(L[L_GATE], mats, u8, i8, f32, u16, u32, h, e_q, e_d, e_s16, e_s32, gate)
            matmul(L[L_UP], mats, u8, i8, f32, u16, u32, h, e_q, e_d, e_s16, e_s32, up)
        _swiglu(gate, up)
        if _reads_q8(mats, L[L_DOWN]):
            _quant(gate, f_q, f_d, f_s16, f_s32)
        matmul(L[L_DOWN], mats, u8, i8, f32, u16, u32, gate, f_q, f_d, f_s16, f_s32, o)
        x += o
    on = ip[I_OUTNORM]
    if all_logits:
        hf = np.empty((T, n_embd), np.float32)
        _rmsnorm(x, vecs[on:on + n_embd], eps, hf)
    else:
        hf = np.empty((1, n_embd), np.float32)
        _rmsnorm(x[T - 1:T], vecs[on:on + n_embd], eps, hf)
    o_q, o_d, o_s16, o_s32 = _abufs(hf.shape[0], n_embd)
    if _reads_q8(mats, ip[I_OUT]):
        _quant(hf, o_q, o_d, o_s16, o_s32)
    matmul(ip[I_OUT], mats, u8, i8, f32, u16, u32, hf, o_q, o_d, o_s16, o_s32, logits)


def _opt_float(v):
    return None if v is None else float(v)


def _dequant_vec(t) -> np.ndarray:
    """A 1-D norm/bias tensor as float32."""
    from gguf.quants import dequantize

    raw = np.asarray(t.raw).reshape(-1)
    if t.qtype == T.F32:
        return raw.view(np.float32).copy()
    if t.qtype == T.F16:
        return raw.view(np.float16).astype(np.float32)
    return dequantize(raw, t.qtype).astype(np.float32).reshape(-1)


class Model:
    """A GGUF model ready to run: see the module docstring and ``specs/runtime.md``.

    Attributes: ``arch``, ``n_vocab``, ``n_ctx``, ``metadata`` (GGUF key -> value), ``reader``
    (gguf.GGUFReader), ``n_past`` (tokens in the KV cache), ``path``, ``load_seconds``.
    """

    n_batch = 512

    @classmethod
    def load(cls, path, n_ctx: int | None = None, n_threads: int | None = None, kv_type: str = "f32") -> "Model":
        """Load the GGUF at ``path``. ``kv_type``: the KV cache's element type, ``"f32"`` (exact) or
        ``"f16"`` (half the memory, as llama.cpp's default cache). GGQError for a missing/malformed
        file, an unsupported arch/type or an unknown ``kv_type``."""
        self = cls()
        t0 = time.perf_counter()
        if kv_type not in KV_TYPES:
            raise GGQError(f"unknown KV cache type {kv_type!r} (valid: {', '.join(KV_TYPES)})")
        gf = open_gguf(path)
        self.path = gf.path
        self._gf = gf
        self.metadata = gf.metadata
        self.arch = gf.arch
        name = gf.path.name
        md = gf.metadata
        a = self.arch

        def hp(key, default=None, required=True):
            v = md.get(f"{a}.{key}", default)
            if v is None and required:
                raise GGQError(f"{name}: missing metadata {a}.{key}")
            return v

        n_layer = int(hp("block_count"))
        n_embd = int(hp("embedding_length"))
        n_ff = int(hp("feed_forward_length"))
        n_head = int(hp("attention.head_count"))
        n_kv = int(hp("attention.head_count_kv", n_head))
        hd = int(hp("attention.key_length", n_embd // n_head))
        if int(hp("attention.value_length", hd)) != hd:
            raise GGQError(f"{name}: different key and value head sizes are not supported")
        if n_head % n_kv:
            raise GGQError(f"{name}: head_count {n_head} is not a multiple of head_count_kv {n_kv}")
        n_rot = int(hp("rope.dimension_count", hd))
        eps = float(hp("attention.layer_norm_rms_epsilon", 1e-5))
        base = float(hp("rope.freq_base", 10000.0))
        ctx_train = int(hp("context_length", 4096))
        # llama.cpp: type defaults to linear; factor from rope.scaling.factor or the old rope.scale_linear
        stype = hp("rope.scaling.type", "linear", required=False)
        sfactor = float(hp("rope.scaling.factor", None, required=False) or hp("rope.scale_linear", 0.0, required=False)
                        or 0.0)
        if stype not in SCALING_TYPES:
            if sfactor not in (0.0, 1.0):
                raise GGQError(f"{name}: rope scaling {stype!r} is not supported")
            stype = "none"
        self.n_ctx = int(n_ctx) if n_ctx else min(ctx_train, 4096)
        self.n_layer, self.n_embd, self.n_head, self.n_kv, self.head_dim, self.n_ff = n_layer, n_embd, n_head, n_kv, hd, n_ff

        tens = gf.tensors

        def get(tname, shape, optional=False):
            t = tens.get(tname)
            if t is None:
                if optional:
                    return None
                raise GGQError(f"{name}: missing tensor {tname}")
            if tuple(t.ne) != tuple(shape):
                raise GGQError(f"{name}: tensor {tname} has shape {list(t.ne)}, expected {list(shape)}")
            return t

        emb = tens.get("token_embd.weight")
        if emb is None or len(emb.ne) != 2 or emb.ne[0] != n_embd:
            raise GGQError(f"{name}: missing or malformed token_embd.weight")
        self.n_vocab = int(emb.ne[1])
        nq, nkv = n_head * hd, n_kv * hd
        mats, vecs = [], []  # (TensorInfo), (array)
        vec_off = [0]

        def add_mat(t):
            if t.qtype not in SUPPORTED_TYPES:
                raise GGQError(f"{name}: tensor {t.name} has type {t.qtype.name}, which ggq cannot run")
            mats.append(t)
            return len(mats) - 1

        def add_vec(t):
            if t is None:
                return -1
            arr = _dequant_vec(t)
            off = vec_off[0]
            vecs.append(arr)
            vec_off[0] += -(-arr.size // 16) * 16
            vecs.append(np.zeros(-(-arr.size // 16) * 16 - arr.size, np.float32))
            return off

        lay = np.full((n_layer, 12), -1, np.int64)
        for i in range(n_layer):
            p = f"blk.{i}."
            lay[i, L_ATTN_NORM] = add_vec(get(p + "attn_norm.weight", (n_embd,)))
            wq, wk, wv = (get(p + "attn_q.weight", (n_embd, nq)), get(p + "attn_k.weight", (n_embd, nkv)),
                          get(p + "attn_v.weight", (n_embd, nkv)))
            if _fusable(wq, wk, wv):
                lay[i, L_WQ] = add_mat(_Fused(wq, wk, wv))
            else:
                lay[i, L_WQ], lay[i, L_WK], lay[i, L_WV] = add_mat(wq), add_mat(wk), add_mat(wv)
            lay[i, L_WO] = add_mat(get(p + "attn_output.weight", (nq, n_embd)))
            lay[i, L_FFN_NORM] = add_vec(get(p + "ffn_norm.weight", (n_embd,)))
            wg, wu = get(p + "ffn_gate.weight", (n_embd, n_ff)), get(p + "ffn_up.weight", (n_embd, n_ff))
            if _fusable(wg, wu):
                lay[i, L_GATE] = add_mat(_Fused(wg, wu))
            else:
                lay[i, L_GATE], lay[i, L_UP] = add_mat(wg), add_mat(wu)
            lay[i, L_DOWN] = add_mat(get(p + "ffn_down.weight", (n_ff, n_embd)))
            bq = get(p + "attn_q.bias", (nq,), optional=True)
            if bq is not None:
                lay[i, L_BQ] = add_vec(bq)
                lay[i, L_BK] = add_vec(get(p + "attn_k.bias", (nkv,)))
                lay[i, L_BV] = add_vec(get(p + "attn_v.bias", (nkv,)))
        i_emb = add_mat(emb)
        i_onorm = add_vec(get("output_norm.weight", (n_embd,)))
        out = get("output.weight", (n_embd, self.n_vocab), optional=True)
        i_out = add_mat(out) if out is not None else i_emb
        self.tied_output = out is None

        rf = get("rope_freqs.weight", (n_rot // 2,), optional=True)
        self._inv_freq, self._rope_mscale = rope_frequencies(
            n_rot, base, stype, sfactor, int(hp("rope.scaling.original_context_length", ctx_train, required=False)),
            None if rf is None else _dequant_vec(rf), float(hp("rope.scaling.attn_factor", 1.0, required=False)),
            float(hp("rope.scaling.yarn_beta_fast", 32.0, required=False)),
            float(hp("rope.scaling.yarn_beta_slow", 1.0, required=False)),
            _opt_float(hp("rope.scaling.yarn_ext_factor", None, required=False)),
            float(hp("rope.scaling.yarn_log_multiplier", 0.0, required=False)))
        self._neox = 1 if a == "qwen2" else 0

        try:
            arena = WeightArena([(t.qtype, t.n_rows, t.n_cols) for t in mats])
        except ValueError as e:
            raise GGQError(f"{name}: {e}") from None
        mm = getattr(gf.data, "_mmap", None)
        for j, t in enumerate(mats):
            arena.fill(j, t.raw)
            for part in getattr(t, "parts", (t,)):
                _release(mm, part.offset, part.nbytes)
        self.arena = arena
        self._vecs = np.concatenate(vecs).astype(np.float32) if vecs else np.zeros(16, np.float32)
        self._lay = lay
        self._ip = np.array([n_embd, n_head, n_kv, hd, n_rot, self._neox, n_ff, self.n_vocab, n_layer, i_emb,
                             i_onorm, i_out], np.int64)
        self._eps = eps
        self._attn_scale = 1.0 / math.sqrt(hd)
        self.kv_type = kv_type
        self._kc = np.zeros((n_layer, nkv, self.n_ctx), KV_TYPES[kv_type])  # K transposed: [dim][position]
        self._vc = np.zeros((n_layer, self.n_ctx, nkv), KV_TYPES[kv_type])
        self.n_past = 0
        if n_threads:
            numba.set_num_threads(max(1, min(int(n_threads), numba.config.NUMBA_NUM_THREADS)))
        self.n_threads = numba.get_num_threads()
        self.load_seconds = time.perf_counter() - t0
        self.file_size = gf.size
        return self

    @property
    def reader(self):
        """The file's ``gguf.GGUFReader`` (built on first access: slow for big vocabularies; the
        same key/values are in :attr:`metadata` already)."""
        return self._gf.reader

    # ------------------------------------------------------------------ KV cache control
    def reset(self) -> None:
        """Forget all tokens (n_past = 0)."""
        self.n_past = 0

    def truncate(self, n_past: int) -> None:
        """Keep the first ``n_past`` tokens of the KV cache (0 <= n_past <= self.n_past)."""
        if not 0 <= n_past <= self.n_past:
            raise GGQError(f"cannot truncate the KV cache to {n_past} tokens (it holds {self.n_past})")
        self.n_past = int(n_past)

    @property
    def kv_cache_bytes(self) -> int:
        return self._kc.nbytes + self._vc.nbytes

    # ------------------------------------------------------------------ evaluation
    def eval(self, tokens, all_logits: bool = False) -> np.ndarray:
        """Append ``tokens`` at positions n_past...; return float32 logits of the last token
        (n_vocab,), or of every token (len(tokens), n_vocab) with ``all_logits``.

        GGQError if a token id is out of range or the context would overflow n_ctx."""
        toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
        n = toks.shape[0]
        if n == 0:
            raise GGQError("eval() needs at least one token")
        if toks.min() < 0 or toks.max() >= self.n_vocab:
            raise GGQError(f"token id out of range 0..{self.n_vocab - 1}")
        if self.n_past + n > self.n_ctx:
            raise GGQError(f"context full: {self.n_past} + {n} tokens exceed n_ctx={self.n_ctx}")
        outs = []
        for s in range(0, n, self.n_batch):
            chunk = toks[s:s + self.n_batch]
            last = s + self.n_batch >= n
            if not all_logits and not last:
                lg = np.empty((1, self.n_vocab), np.float32)
            else:
                lg = np.empty((chunk.shape[0] if all_logits else 1, self.n_vocab), np.float32)
            self._forward(chunk, lg, all_logits)
            self.n_past += chunk.shape[0]
            if all_logits:
                outs.append(lg)
            elif last:
                outs.append(lg[0])
        return np.concatenate(outs) if all_logits else outs[-1]

    def _forward(self, chunk, logits, all_logits):
        mats, u8, i8, f32, u16, u32 = self.arena.args
        forward(chunk, self.n_past, all_logits, mats, u8, i8, f32, u16, u32, self._vecs, self._lay, self._ip,
                self._eps, np.float32(self._attn_scale), self._inv_freq,
                self._rope_mscale, self._kc, self._vc, logits)

    def __repr__(self):
        return f"<ggq Model {self.path.name} arch={self.arch} n_vocab={self.n_vocab} n_ctx={self.n_ctx} n_past={self.n_past}>"


class _Fused:
    """Matrices with the same type and row length stacked into one (Q|K|V, gate|up), so one
    parallel region computes them all and the rows split evenly over the threads."""

    def __init__(self, *parts):
        self.parts = parts
        self.name = "+".join(p.name for p in parts)
        self.qtype = parts[0].qtype
        self.n_cols = parts[0].n_cols
        self.n_rows = sum(p.n_rows for p in parts)

    @property
    def raw(self):
        return np.concatenate([np.asarray(p.raw) for p in self.parts])


def _fusable(*ts) -> bool:
    from ggq.runtime.kernels.repack import FAMILY_OF, FAM_N32, G

    t0 = ts[0]
    return (t0.qtype in FAMILY_OF and FAMILY_OF[t0.qtype] >= FAM_N32
            and all(t.qtype == t0.qtype and t.n_cols == t0.n_cols and t.n_rows % G == 0 for t in ts))


def _release(mm, offset: int, nbytes: int) -> None:
    """Drop the file pages of [offset, offset+nbytes) from this process's resident set (best effort)."""
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    page = mmap.PAGESIZE
    start = (offset + page - 1) // page * page
    end = (offset + nbytes) // page * page
    if end > start:
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):
            pass
