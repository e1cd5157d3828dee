"""What the families' converter rules share: config hyper-parameters, tensor names, Q/K row order.

Which architectures exist and what each means is in :mod:`ggq.models` (one module per family).
This module holds the pieces those modules compose: :class:`HParams` (the hyper-parameters
llama.cpp's converter reads from a ``config.json``, and the llama-like ``{arch}.*`` keys it writes),
:class:`NameMap` (Hugging Face tensor names to GGUF names through gguf's own ``TensorNameMap``),
:func:`permute_qk_rows` (Hugging Face stores Q/K rows in rotate-half order; llama.cpp's NORM rope
rotates adjacent pairs) and :func:`natural_key` (tensor order by layer).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from ggq.errors import GGQError, one_line, show


# Hugging Face tensors that hold no weights llama.cpp needs
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def find_hparam(cfg: dict, keys: tuple[str, ...]):
    """llama.cpp's find_hparam(optional=True): the value of the first key ``cfg`` has (even None)."""
    return next((cfg[k] for k in keys if k in cfg), None)


def rope_parameters(cfg: dict) -> dict:
    """The config's rope parameters as llama.cpp's TextModel.__init__ gathers them: ``rope_parameters``
    (transformers 5) or ``rope_scaling`` (4), with ``rope_theta``, ``rope_type`` (from ``type``),
    ``partial_rotary_factor`` and ``original_max_position_embeddings`` filled in from the top
    level, and a ``sliding_attention`` entry for a local rope base (Gemma 3's
    ``rope_local_base_freq``), unless the dict already has per-kind ``full_attention`` /
    ``sliding_attention`` entries (transformers 5's Gemma 3)."""
    rp = dict(cfg.get("rope_parameters", cfg.get("rope_scaling")) or {})
    theta = find_hparam(cfg, ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta", "rotary_emb_base"))
    local = find_hparam(cfg, ("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta",
                        "rope_local_base_freq"))
    partial = find_hparam(cfg, ("partial_rotary_factor", "rope_pct", "rope_percent"))
    orig_ctx = find_hparam(cfg, ("original_max_position_embeddings",))
    if "full_attention" not in rp and "sliding_attention" not in rp:
        if local is not None:
            rp["sliding_attention"] = {"rope_theta": local}
        if "rope_theta" not in rp and theta is not None:
            rp["rope_theta"] = theta
        if "rope_type" not in rp and rp.get("type") is not None:
            rp["rope_type"] = rp["type"]
        if "partial_rotary_factor" not in rp and partial is not None:
            rp["partial_rotary_factor"] = partial
        if "original_max_position_embeddings" not in rp and orig_ctx is not None:
            rp["original_max_position_embeddings"] = orig_ctx
    return rp


def _get(cfg: dict, keys: tuple[str, ...], where: str, default=None, required=True):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    if required and default is None:
        raise GGQError(f"{where}: config.json lacks {keys[0]}")
    return default


@dataclass
class HParams:
    """The hyperparameters llama.cpp's converter reads from a config.json (under any of the names its
    TextModel looks for); ``cfg`` keeps the whole config for family-specific keys, ``model_dir``
    the checkpoint folder."""

    n_ctx: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    rope: dict  # the config's rope parameters (rope_type, factor, ...), possibly empty
    vocab_size: int
    tie_embeddings: bool
    explicit_head_dim: bool
    cfg: dict = field(default_factory=dict, repr=False)
    model_dir: Path | None = None

    @classmethod
    def from_config(cls, cfg: dict, where: str, model_dir: Path | None = None) -> "HParams":
        """The hyper-parameters of config ``cfg`` (``where`` names it in errors); GGQError for a
        missing or invalid value (wrong JSON type, not a number, infinite, no heads)."""
        try:
            return cls._from_config(cfg, where, model_dir)
        except (TypeError, AttributeError, KeyError):
            raise GGQError(f"{where}: invalid hyperparameter in config.json (a value of the wrong JSON type)") from None
        except (ValueError, OverflowError) as e:
            raise GGQError(f"{where}: invalid hyperparameter in config.json ({one_line(str(e), 200)})") from None

    @classmethod
    def _from_config(cls, cfg: dict, where: str, model_dir: Path | None = None) -> "HParams":
        try:
            n_embd = int(_get(cfg, ("hidden_size", "n_embd", "dim"), where))
            n_head = int(_get(cfg, ("num_attention_heads", "n_head", "n_heads"), where))
        except (TypeError, ValueError, OverflowError) as e:
            raise GGQError(f"{where}: invalid hyperparameter in config.json ({one_line(str(e), 200)})") from None
        if n_head <= 0:
            raise GGQError(f"{where}: config.json has {show(n_head)} attention heads")
        rope = rope_parameters(cfg)
        theta = rope.get("full_attention", rope).get("rope_theta", 10000.0)
        head_dim = cfg.get("head_dim")
        try:
            hp = cls(
                n_ctx=int(_get(cfg, ("max_position_embeddings", "n_ctx", "n_positions", "max_sequence_length"), where)),
                n_embd=n_embd,
                n_layer=int(_get(cfg, ("num_hidden_layers", "n_layer", "n_layers"), where)),
                n_ff=int(_get(cfg, ("intermediate_size", "n_inner", "hidden_dim"), where)),
                n_head=n_head,
                n_head_kv=int(_get(cfg, ("num_key_value_heads", "n_kv_heads"), where, default=n_head)),
                head_dim=int(head_dim) if head_dim else n_embd // n_head,
                rms_eps=float(_get(cfg, ("rms_norm_eps", "norm_eps"), where, default=1e-6)),
                rope_theta=float(theta),
                rope=rope,
                vocab_size=int(_get(cfg, ("vocab_size",), where)),
                tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                explicit_head_dim=bool(head_dim),
                cfg=cfg,
                model_dir=None if model_dir is None else Path(model_dir),
            )
        except (TypeError, ValueError, OverflowError) as e:
            raise GGQError(f"{where}: invalid hyperparameter in config.json ({one_line(str(e), 200)})") from None
        if hp.n_head <= 0 or hp.n_head_kv <= 0 or hp.n_head % hp.n_head_kv:
            raise GGQError(f"{where}: config.json has {hp.n_head} attention heads and {hp.n_head_kv} key-value heads")
        return hp

    def write(self, w: gguf.GGUFWriter, write_vocab_size: bool = False, rope_dims: bool = True) -> None:
        """Add the ``{arch}.*`` keys llama.cpp's convert_hf_to_gguf.py writes for llama-like
        families (its TextModel.set_gguf_parameters): ``{arch}.vocab_size`` too when
        ``write_vocab_size`` (as for ``llama``); ``rope.dimension_count`` when ``rope_dims`` (llama's
        converter writes it; for qwen2 ggq adds it, the value llama.cpp's loader assumes)."""
        w.add_block_count(self.n_layer)
        w.add_context_length(self.n_ctx)
        w.add_embedding_length(self.n_embd)
        w.add_feed_forward_length(self.n_ff)
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        write_rope_scaling(w, self.rope.get("full_attention", self.rope))
        w.add_rope_freq_base(self.rope_theta)
        w.add_layer_norm_rms_eps(self.rms_eps)
        if self.explicit_head_dim:
            w.add_key_length(self.head_dim)
            w.add_value_length(self.head_dim)
        if write_vocab_size:
            w.add_vocab_size(self.vocab_size)
        if rope_dims:
            w.add_rope_dimension_count(self.head_dim)

    def llama3_rope_factors(self) -> np.ndarray | None:
        """``rope_freqs.weight`` (float32 ``(head_dim/2,)``) for Llama 3.1-style ``llama3`` rope
        scaling, computed as llama.cpp's converter does; None for other rope types."""
        if str(self.rope.get("rope_type", "")).lower() != "llama3":
            return None
        dim = self.head_dim
        freqs = 1.0 / (self.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
        factor = float(self.rope.get("factor", 8.0))
        lo = float(self.rope.get("low_freq_factor", 1.0))
        hi = float(self.rope.get("high_freq_factor", 4.0))
        old_ctx = float(self.rope.get("original_max_position_embeddings", 8192))
        lo_wl, hi_wl = old_ctx / lo, old_ctx / hi
        out = []
        for f in freqs:
            wl = 2 * math.pi / f
            if wl < hi_wl:
                out.append(1.0)
            elif wl > lo_wl:
                out.append(factor)
            else:
                smooth = (old_ctx / wl - lo) / (hi - lo)
                out.append(1.0 / ((1 - smooth) / factor + smooth))
        return np.asarray(out, dtype=np.float32)


def write_rope_scaling(w: gguf.GGUFWriter, rope: dict) -> None:
    """The ``{arch}.rope.scaling.*`` keys llama.cpp's TextModel writes for rope parameters ``rope``
    (:func:`rope_parameters`, the global layers' entry): linear and yarn (with its optional
    extrapolation/attention factors and betas) with a factor; ``longrope``/``su``: the type only."""
    rope_type = str(rope.get("rope_type", "")).lower()
    factor = rope.get("factor")
    if rope_type == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(factor))
    elif rope_type == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(factor))
        if rope.get("original_max_position_embeddings") is not None:
            w.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
        for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            v = rope.get(key, rope.get("attn_factor") if key == "attention_factor" else None)
            if v is not None:
                add(float(v))
    elif rope_type in ("su", "longrope"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)


def permute_qk_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder the output rows of a Q or K projection (weight ``(n_out, ...)`` or bias ``(n_out,)``)
    from Hugging Face's rotate-half order to the adjacent-pair order of llama.cpp's NORM rope.

    Within each head of ``d = n_out / n_head`` rows, row ``i`` of the first half and row ``i`` of the
    second half become rows ``2i`` and ``2i+1`` (same as ``LlamaModel.permute`` in llama.cpp's
    converter; ``n_head`` is the number of KV heads for K). Works on block bytes too, since only
    whole rows move.
    """
    n = rows.shape[0]
    return rows.reshape(n_head, 2, n // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


class NameMap:
    """Hugging Face tensor names to GGUF names for one GGUF architecture, with gguf's TensorNameMap
    (``label``: the Hugging Face architecture, for messages)."""

    def __init__(self, gguf_arch: gguf.MODEL_ARCH, n_layer: int, label: str = ""):
        self.label = label or gguf.MODEL_ARCH_NAMES[gguf_arch]
        self.tmap = gguf.get_tensor_name_map(gguf_arch, n_layer)

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF name (``blk.0.attn_q.weight``), None for tensors to drop, GGQError if unknown."""
        if _IGNORED.search(hf_name):
            return None
        name = self.tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGQError(f"cannot map tensor {show(hf_name)} of a {self.label} checkpoint to a GGUF name")
        return name


_LAYER = re.compile(r"\.(\d{1,9})\.")  # longer numbers are no layer (and int() of 4300+ digits raises)


def natural_key(hf_name: str) -> tuple:
    """Sort key ordering tensors by layer number (embeddings first, final norm and head last)."""
    m = _LAYER.search(hf_name)
    if m:
        return (1, int(m.group(1)), hf_name)
    return (0 if "embed" in hf_name else 2, 0, hf_name)
