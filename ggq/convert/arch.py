"""The architecture table: which Hugging Face architectures ggq converts, and how.

For each supported ``architectures[0]`` of a ``config.json`` this module knows the GGUF
architecture, the hyperparameters llama.cpp reads (``{arch}.context_length``, ...), the tensor
names (through gguf's own ``TensorNameMap``) and the row permutation of Q and K that llama.cpp's
converter applies for the ``llama`` architecture (Hugging Face stores Q/K rows in rotate-half
order; llama.cpp's ``llama`` rope (type NORM) rotates adjacent pairs).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import gguf
import numpy as np

from ggq.errors import GGQError


@dataclass(frozen=True)
class ArchSpec:
    """How one Hugging Face architecture maps to GGUF."""

    hf_name: str
    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool  # undo HF's rotate-half row order for llama's adjacent-pair rope
    write_vocab_size: bool  # llama.cpp writes {arch}.vocab_size for llama-family models

    @property
    def name(self) -> str:
        """GGUF architecture name, e.g. ``llama``, ``qwen2``."""
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


ARCHITECTURES: dict[str, ArchSpec] = {
    s.hf_name: s
    for s in (
        ArchSpec("LlamaForCausalLM", gguf.MODEL_ARCH.LLAMA, permute_qk=True, write_vocab_size=True),
        ArchSpec("MistralForCausalLM", gguf.MODEL_ARCH.LLAMA, permute_qk=True, write_vocab_size=True),
        ArchSpec("Qwen2ForCausalLM", gguf.MODEL_ARCH.QWEN2, permute_qk=False, write_vocab_size=False),
    )
}

# Hugging Face tensors that hold no weights llama.cpp needs
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def arch_for(config: dict, where: str) -> ArchSpec:
    """The :class:`ArchSpec` for ``config['architectures'][0]``; GGQError naming the supported ones."""
    names = config.get("architectures") or []
    if not isinstance(names, list) or not names:
        raise GGQError(f"{where}: config.json has no 'architectures' entry (supported: {', '.join(ARCHITECTURES)})")
    spec = ARCHITECTURES.get(names[0])
    if spec is None:
        raise GGQError(f"{where}: unsupported architecture {names[0]} (supported: {', '.join(ARCHITECTURES)})")
    return spec


def _get(cfg: dict, keys: tuple[str, ...], where: str, default=None, required=True):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    if required and default is None:
        raise GGQError(f"{where}: config.json lacks {keys[0]}")
    return default


@dataclass
class HParams:
    """The hyperparameters llama.cpp reads, from a config.json (Llama/Mistral/Qwen2 names)."""

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

    @classmethod
    def from_config(cls, cfg: dict, where: str) -> "HParams":
        n_embd = int(_get(cfg, ("hidden_size", "n_embd", "dim"), where))
        n_head = int(_get(cfg, ("num_attention_heads", "n_head", "n_heads"), where))
        rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
        if "rope_type" not in rope and "type" in rope:
            rope["rope_type"] = rope["type"]
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
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
            )
        except (TypeError, ValueError) as e:
            raise GGQError(f"{where}: invalid hyperparameter in config.json ({e})") from None
        if hp.n_head <= 0 or hp.n_head_kv <= 0 or hp.n_head % hp.n_head_kv:
            raise GGQError(f"{where}: config.json has {hp.n_head} attention heads and {hp.n_head_kv} key-value heads")
        return hp

    def write(self, w: gguf.GGUFWriter, spec: ArchSpec) -> None:
        """Add ``{arch}.*`` keys the way llama.cpp's convert_hf_to_gguf.py does."""
        w.add_block_count(self.n_layer)
        w.add_context_length(self.n_ctx)
        w.add_embedding_length(self.n_embd)
        w.add_feed_forward_length(self.n_ff)
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        rope_type = str(self.rope.get("rope_type", "")).lower()
        factor = self.rope.get("factor")
        if rope_type == "linear" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(factor))
        elif rope_type == "yarn" and factor is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(float(factor))
            if "original_max_position_embeddings" in self.rope:
                w.add_rope_scaling_orig_ctx_len(int(self.rope["original_max_position_embeddings"]))
        w.add_rope_freq_base(self.rope_theta)
        w.add_layer_norm_rms_eps(self.rms_eps)
        if self.explicit_head_dim:
            w.add_key_length(self.head_dim)
            w.add_value_length(self.head_dim)
        if spec.write_vocab_size:
            w.add_vocab_size(self.vocab_size)
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
    """Hugging Face tensor names to GGUF names for one architecture, with gguf's TensorNameMap."""

    def __init__(self, spec: ArchSpec, n_layer: int):
        self.spec = spec
        self.tmap = gguf.get_tensor_name_map(spec.gguf_arch, n_layer)

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF name (``blk.0.attn_q.weight``), None for tensors to drop, GGQError if unknown."""
        if _IGNORED.search(hf_name):
            return None
        name = self.tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGQError(f"cannot map tensor {hf_name!r} of a {self.spec.hf_name} checkpoint to a GGUF name")
        return name


_LAYER = re.compile(r"\.(\d+)\.")


def natural_key(hf_name: str) -> tuple:
    """Sort key ordering tensors by layer number (embeddings first, final norm and head last)."""
    m = _LAYER.search(hf_name)
    if m:
        return (1, int(m.group(1)), hf_name)
    return (0 if "embed" in hf_name else 2, 0, hf_name)
