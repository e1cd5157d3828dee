"""RoPE frequencies and magnitude scale from a GGUF's hyper-parameters, as llama.cpp computes them.

The rotation of pair ``i`` (dims ``2i, 2i+1`` for NORM rope, ``i, i + n_rot/2`` for NEOX) at
position ``p`` is by the angle ``p * inv_freq[i]``, with cos and sin multiplied by ``mscale``.
Every scaling type llama.cpp reads from ``{arch}.rope.scaling.*`` reduces to that form:

* none: ``inv_freq[i] = base ** (-2i / n_rot)``, ``mscale = attn_factor``;
* llama3 style ``rope_freqs.weight`` factors divide ``inv_freq`` (``theta / ff`` in
  ggml_rope_cache_init);
* linear: ``inv_freq *= freq_scale`` (``freq_scale = 1 / factor``);
* yarn: each pair mixes the interpolated and the extrapolated angle with a ramp over the
  "correction dims" (beta_fast = 32, beta_slow = 1 rotations in the original context), and cos/sin
  are scaled by ``1 + 0.1 ln(factor)`` (llama.cpp's rope_yarn, rope_yarn_ramp and
  ggml_rope_yarn_corr_dims in ggml-cpu/ops.cpp and ggml.c, with the yarn_attn_factor set up in
  llama_context's constructor; from the YaRN paper's reference code).
"""

from __future__ import annotations

import math

import numpy as np

#: scaling types ggq runs (llama.cpp's llama_rope_scaling_type names)
SCALING_TYPES = ("none", "linear", "yarn")


def _yarn_corr_dim(n_rot: int, n_ctx_orig: int, n_rotations: float, base: float) -> float:
    """Dimension whose wavelength makes ``n_rotations`` turns in ``n_ctx_orig`` positions."""
    return n_rot * math.log(n_ctx_orig / (n_rotations * 2 * math.pi)) / (2 * math.log(base))


def _mscale(scale: float, m: float) -> float:
    return 1.0 if scale <= 1.0 else 0.1 * m * math.log(scale) + 1.0


def rope_frequencies(n_rot: int, base: float, scaling: str = "none", factor: float = 0.0, n_ctx_orig: int = 0,
                     freq_factors: np.ndarray | None = None, attn_factor: float = 1.0, beta_fast: float = 32.0,
                     beta_slow: float = 1.0, ext_factor: float | None = None, yarn_log_mul: float = 0.0):
    """RoPE parameters for ``n_rot`` rotated dims: returns ``(inv_freq, mscale)``, ``inv_freq``
    float64 ``(n_rot // 2,)`` radians per position for each dim pair, ``mscale`` the float factor
    on cos and sin.

    ``scaling``: ``{arch}.rope.scaling.type`` (``none``/``linear``/``yarn``; ValueError for
    others); ``factor``: ``rope.scaling.factor`` (0 = none); ``n_ctx_orig``:
    ``rope.scaling.original_context_length`` (yarn); ``freq_factors``: ``rope_freqs.weight``
    (llama3-style, float (n_rot // 2,)); ``attn_factor``: ``rope.scaling.attn_factor``;
    ``beta_fast``/``beta_slow``/``ext_factor``/``yarn_log_mul``: the yarn parameters (llama.cpp's
    defaults: 32, 1, 1 for yarn else 0, 0). Same arithmetic as llama.cpp, in float64.
    """
    if scaling not in SCALING_TYPES:
        raise ValueError(f"rope scaling {scaling!r} is not supported")
    inv = base ** (-np.arange(0, n_rot, 2, dtype=np.float64) / n_rot)
    if freq_factors is not None:
        inv = inv / np.asarray(freq_factors, np.float64)
    freq_scale = 1.0 if scaling == "none" or not factor else 1.0 / factor
    if ext_factor is None:
        ext_factor = 1.0 if scaling == "yarn" else 0.0
    mscale = 1.0
    if ext_factor != 0.0:
        f = 1.0 / freq_scale
        if yarn_log_mul != 0.0:
            mscale = _mscale(f, 1.0) / _mscale(f, yarn_log_mul)
        else:
            mscale = _mscale(f, 1.0)
        mscale /= 1.0 + 0.1 * math.log(f)  # cancelled again inside rope_yarn
    mscale *= attn_factor
    if ext_factor == 0.0:
        return inv * freq_scale, mscale
    lo = max(0.0, math.floor(_yarn_corr_dim(n_rot, n_ctx_orig, beta_fast, base)))
    hi = min(n_rot - 1.0, math.ceil(_yarn_corr_dim(n_rot, n_ctx_orig, beta_slow, base)))
    i = np.arange(n_rot // 2, dtype=np.float64)
    ramp = 1.0 - np.clip((i - lo) / max(0.001, hi - lo), 0.0, 1.0)
    mix = ramp * ext_factor
    inv = inv * (freq_scale * (1.0 - mix) + mix)
    return inv, mscale * (1.0 + 0.1 * math.log(1.0 / freq_scale))
