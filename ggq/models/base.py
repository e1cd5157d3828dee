"""The family contract: what a module of :mod:`ggq.models` declares, and the defaults it inherits.

A family is a :class:`Family` subclass (one per GGUF architecture) whose instances a module lists
in ``FAMILIES``. Like llama.cpp's ``conversion/<family>.py`` classes plus ``src/models/<arch>.cpp``,
it holds everything the architecture means to ggq:

Converter (``ggq convert``):
    ``hf_architectures``   the ``config.json`` ``architectures[0]`` names it converts;
    ``gguf_arch``          the GGUF architecture it writes (``general.architecture``);
    :meth:`hparams`        the hyper-parameters read from ``config.json`` (:class:`~ggq.convert.arch.HParams`);
    :meth:`write_hparams`  the ``{arch}.*`` keys llama.cpp's converter writes;
    :meth:`write_vocab`    which tokenizer export llama.cpp's converter takes (:mod:`ggq.convert.vocab`);
    :meth:`tensor_rule`    each checkpoint tensor's GGUF name and transformation (:class:`TensorRule`),
                           or None to drop it;
    :meth:`extra_tensors`  tensors made from the config (rope factors), written first;
    :meth:`is_70b`         llama.cpp's LLM_TYPE_70B classification, which the quantization mixes use.

Runtime (``ggq run/generate/bench/perplexity``):
    ``gguf_aliases``       other ``general.architecture`` names it runs;
    ``chat_template``      its chat format, for files without ``tokenizer.chat_template``;
    :meth:`run_params`     the hyper-parameters read from GGUF metadata (:class:`RunParams`, keys from
                           ``gguf.Keys``);
    :meth:`rope`           the rope kinds (inverse frequencies and cos/sin scale) for a context size;
    :meth:`load_layer`     which GGUF tensors fill which columns of a layer's row of the layer table
                           (llama.cpp's ``load_arch_tensors``);
    ``forward``            the compiled forward pass, a sequence of :mod:`ggq.runtime.ops` calls with
                           :data:`FORWARD_SIGNATURE`'s arguments (one compiled call per batch).

Nothing outside ``ggq/models/`` names an architecture: the converter, the runtime, the quantization
mixes and the imatrix collector find a family through :mod:`ggq.models` (``for_checkpoint``,
``for_gguf``). ``specs/model-families.md`` walks through adding one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import gguf
import numpy as np

from ggq.convert.arch import HParams, NameMap
from ggq.errors import GGQError, show
from ggq.runtime import ops
from ggq.runtime.rope import SCALING_TYPES, rope_frequencies

K = gguf.Keys

# tensors of multimodal checkpoints that are not the text model (llama.cpp's TextModel.filter_tensors)
_MULTIMODAL_PREFIXES = ("mlp", "vit.", "vpm.", "siglip2.", "conformer.", "merger.", "resampler.", "sound_encoder.",
                        "sound_projection.", "speech_embeddings.")
_MULTIMODAL_PARTS = ("visual.", "vision.", "audio.", "talker.", "vision_", "audio_", "token2wav.", "code2wav.",
                     "projector.", "pre_mm_projector_norm", "image_newline", "view_seperator", "patch_embed",
                     "patch_embedding", "patch_merger.", "patch_merge_mlp.", "model.connector.")

#: the arguments every family's ``forward`` takes, in order (see :mod:`ggq.runtime.ops`)
FORWARD_SIGNATURE = ("tokens", "pos", "seq", "all_logits", "W", "vecs", "lay", "ip", "fp", "inv_freq", "mscale",
                     "kc", "vc", "logits")


@dataclass(frozen=True)
class TensorRule:
    """How one checkpoint tensor becomes a GGUF tensor.

    ``name``: the GGUF name; ``permute_heads``: > 0 to reorder Q/K rows from Hugging Face's
    rotate-half order to NORM rope's adjacent pairs with this many heads
    (:func:`~ggq.convert.arch.permute_qk_rows`; works on block bytes too); ``add``: a constant
    added to every value (Gemma's RMSNorm multiplies by ``1 + w``, llama.cpp's by the stored
    weight); ``rows``: keep at most this many leading rows (Gemma 3's embedding rows past the
    tokenizer's vocabulary), None for all."""

    name: str
    permute_heads: int = 0
    add: float = 0.0
    rows: int | None = None


@dataclass
class RunParams:
    """Hyper-parameters of a GGUF model as the runtime uses them (llama.cpp's llama_hparams).

    Lengths in elements; ``rope_*`` as in :func:`ggq.runtime.rope.rope_frequencies`;
    ``attn_scale``: the factor on q.k (default 1/sqrt(head_dim)); ``attn_softcap`` /
    ``final_softcap``: logit soft-capping (0: none); ``embd_scale``: factor on embedding rows;
    ``swa_window``: sliding window in positions and ``swa_layers``: which layers use it;
    ``rope_kinds``: per layer, the rope kind index (:meth:`Family.rope`)."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_kv: int
    head_dim: int
    n_rot: int
    eps: float
    ctx_train: int
    rope_base: float
    rope_scaling: str = "none"
    rope_factor: float = 0.0
    rope_orig_ctx: int = 0
    rope_attn_factor: float = 1.0
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_ext_factor: float | None = None
    yarn_log_mul: float = 0.0
    neox: bool = False
    attn_scale: float = 0.0
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    embd_scale: float = 1.0
    rope_base_swa: float = 0.0
    swa_window: int = 0
    swa_layers: list[bool] = field(default_factory=list)
    rope_kinds: list[int] = field(default_factory=list)

    @property
    def n_q(self) -> int:
        return self.n_head * self.head_dim

    @property
    def n_kv_dim(self) -> int:
        return self.n_kv * self.head_dim

    def check(self, where: str) -> None:
        """GGQError naming ``where`` unless the hyper-parameters are in range and consistent, before
        anything is allocated from them or compiled code runs on them: counts and lengths positive
        and below 2**31; ``n_head`` a multiple of ``n_kv``; ``n_rot`` even and at most
        ``head_dim`` (the rope kernel rotates dims ``< n_rot`` of each head: a larger value would
        write into the next head or past the buffer); ``eps`` finite and > 0 (RMSNorm divides by
        sqrt(mean + eps)); rope base, factors and the yarn parameters finite (base, attention factor
        and original context > 0, scaling factor >= 0); scales and soft-caps finite and >= 0;
        sliding window >= 0. (llama.cpp's llama_model::load_hparams checks a subset of these; the
        rest are what ggq's kernels rely on.)"""
        def bad(msg: str):
            raise GGQError(f"{where}: {msg}")

        for name in ("n_layer", "n_embd", "n_ff", "n_head", "n_kv", "head_dim", "ctx_train"):
            v = getattr(self, name)
            if not 1 <= v < 2**31:
                bad(f"{_KEY_OF[name]} is {v}; it must be between 1 and 2**31 - 1")
        if self.n_head % self.n_kv:
            bad(f"attention.head_count {self.n_head} is not a multiple of attention.head_count_kv {self.n_kv}")
        if self.n_rot < 2 or self.n_rot % 2 or self.n_rot > self.head_dim:
            bad(f"rope.dimension_count {self.n_rot} must be even, at least 2 and at most the head size {self.head_dim}")
        if not (math.isfinite(self.eps) and self.eps > 0):
            bad(f"attention.layer_norm_rms_epsilon {self.eps!r} must be finite and > 0")
        for name, lo, strict in (("rope_base", 0.0, True), ("rope_attn_factor", 0.0, True), ("rope_factor", 0.0, False),
                                 ("attn_scale", 0.0, False), ("attn_softcap", 0.0, False),
                                 ("final_softcap", 0.0, False), ("embd_scale", 0.0, False),
                                 ("yarn_beta_fast", None, False), ("yarn_beta_slow", None, False),
                                 ("yarn_log_mul", None, False), ("yarn_ext_factor", None, False)):
            v = getattr(self, name)
            if v is None:
                continue
            if not math.isfinite(v) or (lo is not None and (v <= lo if strict else v < lo)):
                bad(f"{_KEY_OF[name]} {v!r} must be finite" + ("" if lo is None else " and > 0" if strict else " and >= 0"))
        if self.rope_base_swa and not (math.isfinite(self.rope_base_swa) and self.rope_base_swa > 0):
            bad(f"rope.freq_base_swa {self.rope_base_swa!r} must be finite and > 0")
        if self.rope_scaling == "yarn" and self.rope_orig_ctx < 1:
            bad(f"rope.scaling.original_context_length {self.rope_orig_ctx} must be > 0 for yarn scaling")
        if not 0 <= self.swa_window < 2**31:
            bad(f"attention.sliding_window {self.swa_window} must be between 0 and 2**31 - 1")
        if (self.swa_layers and len(self.swa_layers) != self.n_layer) or (
                self.rope_kinds and len(self.rope_kinds) != self.n_layer):
            bad("the sliding-window pattern does not cover every layer")

    def int_params(self, n_vocab: int, tok_emb: int, out_norm: int, out: int) -> np.ndarray:
        """The ``ip`` array of :mod:`ggq.runtime.ops` (I_* order)."""
        return np.array([self.n_embd, self.n_head, self.n_kv, self.head_dim, self.n_rot, int(self.neox), self.n_ff,
                         n_vocab, self.n_layer, tok_emb, out_norm, out, self.swa_window], np.int64)

    def float_params(self) -> np.ndarray:
        """The ``fp`` array of :mod:`ggq.runtime.ops` (F_* order)."""
        scale = self.attn_scale or 1.0 / math.sqrt(self.head_dim)
        return np.array([self.eps, scale, self.attn_softcap, self.final_softcap, self.embd_scale], np.float64)


#: RunParams field -> the GGUF key (without ``{arch}.``) it comes from, for messages
_KEY_OF = {"n_layer": "block_count", "n_embd": "embedding_length", "n_ff": "feed_forward_length",
           "n_head": "attention.head_count", "n_kv": "attention.head_count_kv", "head_dim": "attention.key_length",
           "ctx_train": "context_length", "rope_base": "rope.freq_base", "rope_attn_factor": "rope.scaling.attn_factor",
           "rope_factor": "rope.scaling.factor", "attn_scale": "the attention scale",
           "attn_softcap": "attn_logit_softcapping", "final_softcap": "final_logit_softcapping",
           "embd_scale": "the embedding scale", "yarn_beta_fast": "rope.scaling.yarn_beta_fast",
           "yarn_beta_slow": "rope.scaling.yarn_beta_slow", "yarn_log_mul": "rope.scaling.yarn_log_multiplier",
           "yarn_ext_factor": "rope.scaling.yarn_ext_factor"}


class Metadata:
    """Typed access to one architecture's GGUF keys (``gguf.Keys`` templates) for a file named ``where``.

    ``get(key, default, kind, n_layer)``: the value of ``key.format(arch=...)``, or ``default`` when
    the key is missing; GGQError naming the file when it is missing and no default is given, or
    when its value has the wrong type. As llama.cpp's ``llama_model_loader::get_key``, the value
    type must match: ``kind=int`` takes only GGUF integer types, ``kind=float`` integer or float
    types, never a bool, a string or an array. ``n_layer``: the key may also be a per-layer array
    (llama.cpp's ``get_key_or_arr``: head counts, feed-forward length) of exactly ``n_layer``
    entries; ggq runs only models whose entries are all equal."""

    _MISSING = object()

    def __init__(self, md: dict, arch: str, where: str):
        self.md, self.arch, self.where = md, arch, where

    def raw(self, key: str, default=None):
        return self.md.get(key.format(arch=self.arch), default)

    def get(self, key: str, default=_MISSING, kind=int, n_layer: int | None = None):
        full = key.format(arch=self.arch)
        v = self.md.get(full)
        if v is None:
            if default is self._MISSING:
                raise GGQError(f"{self.where}: missing metadata {full}")
            return default
        if isinstance(v, list):
            if n_layer is None:
                raise GGQError(f"{self.where}: metadata {full} is an array; a single number is expected")
            if len(v) != n_layer:
                raise GGQError(f"{self.where}: metadata {full} has {len(v)} entries for {n_layer} layers")
            if any(x != v[0] for x in v):
                raise GGQError(f"{self.where}: metadata {full} differs between layers, which ggq does not run")
            v = v[0]
        ok = type(v) is int or (kind is float and type(v) is float)
        if not ok:
            raise GGQError(f"{self.where}: metadata {full} has an invalid value {show(v)} "
                           f"({'an integer' if kind is int else 'a number'} is expected)")
        try:
            return kind(v)
        except (TypeError, ValueError, OverflowError):
            raise GGQError(f"{self.where}: metadata {full} has an invalid value {show(v)}") from None


class Family:
    """One GGUF architecture: see the module docstring for what a subclass declares."""

    hf_architectures: tuple[str, ...] = ()
    gguf_arch: gguf.MODEL_ARCH
    gguf_aliases: tuple[str, ...] = ()
    #: undo Hugging Face's rotate-half Q/K row order (llama's NORM rope turns adjacent pairs)
    permute_qk = False
    #: llama.cpp writes {arch}.vocab_size for this family
    write_vocab_size = False
    #: write {arch}.rope.dimension_count in the llama-like key set
    write_rope_dims = False
    #: the compiled forward pass (FORWARD_SIGNATURE)
    forward = None
    #: the family's chat format (jinja, transformers' conventions), used when a file has no
    #: tokenizer.chat_template; None: ggq's plain fallback
    chat_template: str | None = None

    @property
    def name(self) -> str:
        """GGUF architecture name, e.g. ``llama``, ``qwen2``."""
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    @property
    def gguf_names(self) -> tuple[str, ...]:
        return (self.name, *self.gguf_aliases)

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # ------------------------------------------------------------------ converter

    def hparams(self, cfg: dict, model_dir) -> HParams:
        """Hyper-parameters of the checkpoint in ``model_dir`` from its config ``cfg`` (read through
        transformers' AutoConfig when it knows the model type, as llama.cpp's converter does).
        GGQError for missing or invalid values."""
        return HParams.from_config(cfg, f"{model_dir}/config.json", model_dir)

    def write_hparams(self, w: gguf.GGUFWriter, hp: HParams) -> None:
        """Add the ``{arch}.*`` keys llama.cpp's converter writes (default: the llama-like set)."""
        hp.write(w, self.write_vocab_size, self.write_rope_dims)

    def write_vocab(self, w: gguf.GGUFWriter, model_dir, cfg: dict) -> None:
        """Add the ``tokenizer.*`` keys llama.cpp's converter writes for this family."""
        raise NotImplementedError

    def tensor_rule(self, hf_name: str, hp: HParams, names: NameMap) -> TensorRule | None:
        """The GGUF name and transformation of checkpoint tensor ``hf_name``, None to drop it;
        GGQError for a tensor the family does not know. Default, as llama.cpp's ModelBase and
        TextModel filters: ``language_model.`` removed from the name, the tensors of vision and
        audio towers and their projectors dropped, the rest named through gguf's TensorNameMap,
        Q/K rows permuted when :attr:`permute_qk`."""
        hf_name = hf_name.replace("language_model.", "")
        if hf_name.startswith(_MULTIMODAL_PREFIXES) or any(s in hf_name for s in _MULTIMODAL_PARTS):
            return None
        name = names.gguf_name(hf_name)
        if name is None:
            return None
        heads = 0
        if self.permute_qk:
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                heads = hp.n_head
            elif hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                heads = hp.n_head_kv
        return TensorRule(name, permute_heads=heads)

    def dropped_note(self, hf_names: list[str]) -> str | None:
        """A note for the user about the checkpoint tensors :meth:`tensor_rule` dropped (None: no note)."""
        return None

    def extra_tensors(self, hp: HParams, model_dir) -> list[tuple[str, np.ndarray]]:
        """Tensors computed from the config, written before the checkpoint's: llama3-style rope
        factors (``rope_freqs.weight``) by default."""
        factors = hp.llama3_rope_factors()
        return [] if factors is None else [("rope_freqs.weight", factors)]

    def is_70b(self, n_layer: int, n_head: int, n_head_kv: int) -> bool:
        """Whether llama.cpp classifies the model as LLM_TYPE_70B (its quantization mixes give such
        models' attn_v more bits)."""
        return False

    # ------------------------------------------------------------------ runtime

    def run_params(self, md: Metadata, tensors: dict) -> RunParams:
        """Hyper-parameters from the GGUF metadata, with llama.cpp's defaults (llama_model::load_hparams)."""
        n_layer = md.get(K.LLM.BLOCK_COUNT)
        if not 1 <= n_layer < 2**31:
            raise GGQError(f"{md.where}: block_count {n_layer} must be between 1 and 2**31 - 1")
        n_embd = md.get(K.LLM.EMBEDDING_LENGTH)
        n_head = md.get(K.Attention.HEAD_COUNT, n_layer=n_layer)
        if n_head <= 0:
            raise GGQError(f"{md.where}: head_count {n_head} is not positive")
        n_kv = md.get(K.Attention.HEAD_COUNT_KV, n_head, n_layer=n_layer)
        hd = md.get(K.Attention.KEY_LENGTH, n_embd // n_head)
        if md.get(K.Attention.VALUE_LENGTH, hd) != hd:
            raise GGQError(f"{md.where}: different key and value head sizes are not supported")
        if n_kv <= 0 or n_head % n_kv:
            raise GGQError(f"{md.where}: head_count {n_head} is not a multiple of head_count_kv {n_kv}")
        ctx_train = md.get(K.LLM.CONTEXT_LENGTH)  # required, as in llama.cpp
        # llama.cpp: type defaults to linear; factor from rope.scaling.factor or the old rope.scale_linear
        stype = md.raw(K.Rope.SCALING_TYPE, "linear")
        factor = md.get(K.Rope.SCALING_FACTOR, 0.0, float) or md.get("{arch}.rope.scale_linear", 0.0, float)
        if stype not in SCALING_TYPES:
            if factor not in (0.0, 1.0):
                raise GGQError(f"{md.where}: rope scaling {show(stype)} is not supported")
            stype = "none"
        ext = md.raw(K.Rope.SCALING_YARN_EXT_FACTOR)
        rp = RunParams(
            n_layer=n_layer, n_embd=n_embd, n_ff=md.get(K.LLM.FEED_FORWARD_LENGTH, n_layer=n_layer),
            n_head=n_head, n_kv=n_kv, head_dim=hd, n_rot=md.get(K.Rope.DIMENSION_COUNT, hd),
            eps=md.get(K.Attention.LAYERNORM_RMS_EPS, 1e-5, float), ctx_train=ctx_train,
            rope_base=md.get(K.Rope.FREQ_BASE, 10000.0, float), rope_scaling=stype, rope_factor=factor,
            rope_orig_ctx=md.get(K.Rope.SCALING_ORIG_CTX_LEN, ctx_train),
            rope_attn_factor=md.get(K.Rope.SCALING_ATTN_FACTOR, 1.0, float),
            yarn_beta_fast=md.get(K.Rope.SCALING_YARN_BETA_FAST, 32.0, float),
            yarn_beta_slow=md.get(K.Rope.SCALING_YARN_BETA_SLOW, 1.0, float),
            yarn_ext_factor=None if ext is None else md.get(K.Rope.SCALING_YARN_EXT_FACTOR, 0.0, float),
            yarn_log_mul=md.get(K.Rope.SCALING_YARN_LOG_MUL, 0.0, float))
        rp.check(md.where)  # before a family derives anything from these values
        return rp

    def rope(self, rp: RunParams, b, n_ctx: int) -> tuple[np.ndarray, np.ndarray]:
        """The rope kinds: inverse frequencies float64 ``(n_kinds, n_rot/2)`` and cos/sin scales
        ``(n_kinds,)`` (:func:`~ggq.runtime.rope.rope_frequencies`). Default: one kind, with
        llama3-style ``rope_freqs.weight`` factors when the file has them. ``b``: the layer
        builder (for optional tensors)."""
        rf = b.vec_array("rope_freqs.weight", rp.n_rot // 2, optional=True)
        inv, ms = rope_frequencies(rp.n_rot, rp.rope_base, rp.rope_scaling, rp.rope_factor, rp.rope_orig_ctx, rf,
                                   rp.rope_attn_factor, rp.yarn_beta_fast, rp.yarn_beta_slow, rp.yarn_ext_factor,
                                   rp.yarn_log_mul)
        return inv[None, :], np.array([ms])

    def load_layer(self, b, i: int, rp: RunParams, L: np.ndarray) -> None:
        """Fill ``L`` (the int64 row of layer ``i`` in the layer table, ``ops.L_*`` columns) with the
        layer's tensors through the builder ``b`` (GGQError for a missing or misshapen tensor).
        Default: a llama-like layer (:func:`load_attention`, :func:`load_ffn`)."""
        load_attention(b, i, rp, L)
        load_ffn(b, i, rp, L)


MT = gguf.MODEL_TENSOR


def tn(kind: gguf.MODEL_TENSOR, bid: int | None = None, suffix: str = ".weight") -> str:
    """GGUF tensor name from gguf's ``TENSOR_NAMES`` (``tn(MT.ATTN_Q, 3)`` = ``blk.3.attn_q.weight``)."""
    name = gguf.TENSOR_NAMES[kind]
    return (name.format(bid=bid) if bid is not None else name) + suffix


def load_attention(b, i: int, rp: RunParams, L: np.ndarray, qk_norm: bool = False, post_norm: bool = False) -> None:
    """The attention tensors of layer ``i`` as llama.cpp's llama-like archs create them: attn_norm;
    a fused attn_qkv (Phi-3) or attn_q/attn_k/attn_v (stacked into one matrix when possible) with
    their optional biases; attn_output; per-head attn_q_norm/attn_k_norm (``qk_norm``: Qwen 3,
    Gemma 3) and post_attention_norm (``post_norm``: Gemma 2/3)."""
    E, Q, KV = rp.n_embd, rp.n_q, rp.n_kv_dim
    L[ops.L_ATTN_NORM] = b.vec(tn(MT.ATTN_NORM, i), E)
    if b.has(tn(MT.ATTN_QKV, i)):
        L[ops.L_WQ] = b.mat(tn(MT.ATTN_QKV, i), (E, Q + 2 * KV))
    else:
        L[ops.L_WQ], L[ops.L_WK], L[ops.L_WV] = b.stacked(
            (tn(MT.ATTN_Q, i), (E, Q)), (tn(MT.ATTN_K, i), (E, KV)), (tn(MT.ATTN_V, i), (E, KV)))
    if b.has(tn(MT.ATTN_Q, i, ".bias")):
        L[ops.L_BQ] = b.vec(tn(MT.ATTN_Q, i, ".bias"), Q)
        L[ops.L_BK] = b.vec(tn(MT.ATTN_K, i, ".bias"), KV)
        L[ops.L_BV] = b.vec(tn(MT.ATTN_V, i, ".bias"), KV)
    L[ops.L_WO] = b.mat(tn(MT.ATTN_OUT, i), (Q, E))
    if qk_norm:
        L[ops.L_Q_NORM] = b.vec(tn(MT.ATTN_Q_NORM, i), rp.head_dim)
        L[ops.L_K_NORM] = b.vec(tn(MT.ATTN_K_NORM, i), rp.head_dim)
    if post_norm:
        L[ops.L_POST_ATTN_NORM] = b.vec(tn(MT.ATTN_POST_NORM, i), E)


def load_ffn(b, i: int, rp: RunParams, L: np.ndarray, post_norm: bool = False) -> None:
    """The FFN tensors of layer ``i``: ffn_norm; ffn_gate and ffn_up (stacked when possible), or one
    ffn_up of 2 n_ff rows holding gate then up (Phi-3); ffn_down; post_ffw_norm (``post_norm``)."""
    E, F = rp.n_embd, rp.n_ff
    L[ops.L_FFN_NORM] = b.vec(tn(MT.FFN_NORM, i), E)
    if b.has(tn(MT.FFN_GATE, i)):
        L[ops.L_GATE], L[ops.L_UP] = b.stacked((tn(MT.FFN_GATE, i), (E, F)), (tn(MT.FFN_UP, i), (E, F)))
    else:
        L[ops.L_GATE] = b.mat(tn(MT.FFN_UP, i), (E, 2 * F))
    L[ops.L_DOWN] = b.mat(tn(MT.FFN_DOWN, i), (F, E))
    if post_norm:
        L[ops.L_POST_FFN_NORM] = b.vec(tn(MT.FFN_POST_NORM, i), E)


def sliding_window_layers(md: Metadata, n_layer: int, n_pattern: int) -> list[bool]:
    """Which layers use the sliding window: llama.cpp's ``load_swa_pattern``: a per-layer array
    ``{arch}.attention.sliding_window_pattern`` if the file has one, else every layer ``il`` with
    ``il % n < n - 1`` (``n`` the key's scalar value or ``n_pattern``; n = 0: all layers)."""
    v = md.raw(K.Attention.SLIDING_WINDOW_PATTERN)
    if isinstance(v, list):
        if len(v) < n_layer:
            raise GGQError(f"{md.where}: {K.Attention.SLIDING_WINDOW_PATTERN.format(arch=md.arch)} has "
                           f"{len(v)} entries for {n_layer} layers")
        return [bool(x) for x in v[:n_layer]]
    if v is not None:
        n_pattern = md.get(K.Attention.SLIDING_WINDOW_PATTERN)
    return [n_pattern == 0 or il % n_pattern < n_pattern - 1 for il in range(n_layer)]


__all__ = ["Family", "FORWARD_SIGNATURE", "MT", "Metadata", "RunParams", "TensorRule", "load_attention", "load_ffn",
           "sliding_window_layers", "tn", "ops"]
