"""``ggq convert``'s checks of a checkpoint before it writes a byte.

A ``config.json`` and the tensors beside it come from strangers; the converter trusts neither
until they agree:

* :func:`check_sizes` (before any tensor is planned): every count and length of
  :class:`~ggq.convert.arch.HParams` is between 1 and 2**31 - 1, the float values fit the float32
  keys they are written to, ``num_hidden_layers`` is not more than the layers the tensor names
  number, and no length exceeds the largest dimension of any checkpoint tensor -- so
  ``num_hidden_layers``, ``vocab_size`` or ``hidden_size`` of 10**9 are refused at once instead of
  building a 10**9-entry name map, vocabulary or rope table;
* :func:`check_plan` (after the tensors are named): the planned GGUF tensors are exactly what
  the family's runtime reads, with the shapes the hyper-parameters give -- the family's own
  :meth:`~ggq.models.base.Family.load_layer` run over the plan (as :func:`ggq.runtime.model.plan_model`
  runs it over a GGUF file), ``blk.N`` groups numbered 0 .. ``num_hidden_layers`` - 1,
  ``token_embd`` of ``(hidden_size, vocab_size)``; so a missing ``o_proj``, a changed shape or a
  wrong ``hidden_size`` is an error, not a file ``ggq generate`` refuses.

Safetensors headers (offsets inside the file, not overlapping, sizes matching shape and dtype,
nesting depth) are checked where they are read, in :mod:`ggq.convert.checkpoint`.
"""

from __future__ import annotations

import math
import re

import numpy as np

from ggq.errors import GGQError, show

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_NUM = re.compile(r"\.(\d{1,9})\.")  # as arch.natural_key: longer numbers are no layer
_BLK = re.compile(r"blk\.(\d+)\.")


def check_sizes(hp, tensor_shapes: dict, where: str) -> None:
    """GGQError naming ``where`` (the config) unless the hyper-parameters ``hp`` are plausible for
    a checkpoint whose tensors have ``tensor_shapes`` ({name: shape}); see the module docstring."""
    for name, key in (("n_layer", "num_hidden_layers"), ("n_embd", "hidden_size"), ("n_ff", "intermediate_size"),
                      ("n_head", "num_attention_heads"), ("n_head_kv", "num_key_value_heads"),
                      ("head_dim", "head_dim"), ("vocab_size", "vocab_size"), ("n_ctx", "max_position_embeddings")):
        v = getattr(hp, name)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v < 2**31:
            raise GGQError(f"{where}: {key} is {show(v)}; it must be between 1 and 2**31 - 1")
    for name, key, positive in (("rms_eps", "rms_norm_eps", True), ("rope_theta", "rope_theta", True)):
        v = getattr(hp, name)
        if not (math.isfinite(v) and abs(v) <= _FLOAT32_MAX) or (positive and v <= 0):
            raise GGQError(f"{where}: {key} is {show(v)}; it must be finite, > 0 and fit a float32")
    _check_rope(getattr(hp, "rope", None) or {}, where)
    layers = set()
    biggest = 0
    for n, shape in tensor_shapes.items():
        m = _NUM.search(n)
        if m:
            layers.add(int(m.group(1)))
        if shape:
            biggest = max(biggest, max(int(x) for x in shape))
    if hp.n_layer > len(layers):
        raise GGQError(f"{where}: num_hidden_layers is {hp.n_layer} but the checkpoint's tensor names number "
                       f"{len(layers)} layers")
    for name, key in (("n_embd", "hidden_size"), ("n_ff", "intermediate_size"), ("vocab_size", "vocab_size")):
        v = getattr(hp, name)
        if v > biggest:
            raise GGQError(f"{where}: {key} is {v} but no checkpoint tensor has a dimension that large "
                           f"(largest {biggest})")
    if hp.n_head * hp.head_dim > 4 * biggest or hp.n_head_kv > hp.n_head:
        raise GGQError(f"{where}: {hp.n_head} attention heads of {hp.head_dim} and {hp.n_head_kv} key-value heads "
                       f"do not fit the checkpoint's tensors")


class _PlanBuilder:
    """The runtime's :class:`~ggq.runtime.model.LayerBuilder` interface over planned tensors:
    checks names and shapes, reads nothing."""

    def __init__(self, ne_of: dict, where: str):
        self.ne_of = ne_of
        self.where = where

    def has(self, name):
        return name in self.ne_of

    def tensor(self, name, ne, optional=False):
        got = self.ne_of.get(name)
        if got is None:
            if optional:
                return None
            raise GGQError(f"{self.where}: the checkpoint has no tensor for {name}, which the model needs")
        if tuple(got) != tuple(ne):
            raise GGQError(f"{self.where}: tensor {name} would have shape {list(got)}, but config.json gives "
                           f"{list(ne)}")
        return got

    def mat(self, name, ne, optional=False):
        return -1 if self.tensor(name, ne, optional) is None else 0

    def stacked(self, *named):
        for n, ne in named:
            self.tensor(n, ne)
        return [0] * len(named)

    def vec(self, name, n, optional=False):
        return -1 if self.tensor(name, (n,), optional) is None else 0

    def vec_array(self, name, n, optional=False):
        self.tensor(name, (n,), optional)
        return None


def check_plan(planned, fam, hp, where: str) -> None:
    """GGQError naming ``where`` unless the planned tensors (``.name``, ``.ne``) are the ones the
    family's runtime reads, with the shapes ``hp`` gives (see the module docstring)."""
    from ggq.models.base import RunParams
    from ggq.runtime import ops

    ne_of = {p.name: tuple(p.ne) for p in planned}
    layers = {int(m.group(1)) for n in ne_of if (m := _BLK.match(n))}
    if len(layers) != hp.n_layer or (layers and (min(layers) != 0 or max(layers) != hp.n_layer - 1)):
        have = f"blk.0 .. blk.{max(layers)} ({len(layers)} layers)" if layers else "none"
        raise GGQError(f"{where}: num_hidden_layers is {hp.n_layer} but the checkpoint's layers map to {have}")
    b = _PlanBuilder(ne_of, where)
    emb = ne_of.get("token_embd.weight")
    if emb is None or len(emb) != 2 or emb[0] != hp.n_embd:
        raise GGQError(f"{where}: the token embedding has shape {list(emb or ())}, expected "
                       f"{hp.n_embd} columns (hidden_size)")
    n_vocab = emb[1]
    b.mat("output.weight", (hp.n_embd, n_vocab), optional=True)
    b.vec("output_norm.weight", hp.n_embd)
    rp = RunParams(n_layer=hp.n_layer, n_embd=hp.n_embd, n_ff=hp.n_ff, n_head=hp.n_head, n_kv=hp.n_head_kv,
                   head_dim=hp.head_dim, n_rot=hp.head_dim, eps=hp.rms_eps, ctx_train=hp.n_ctx,
                   rope_base=hp.rope_theta)
    row = np.full(ops.N_L, -1, np.int64)
    for i in range(hp.n_layer):
        fam.load_layer(b, i, rp, row)


def check_vocab_written(w, n_vocab: int, where) -> None:
    """GGQError naming ``where`` (the checkpoint folder) unless the token arrays the vocabulary
    writer added to the GGUFWriter ``w`` have ``n_vocab`` entries, the token embedding's rows (the
    runtime and llama.cpp both size the vocabulary by ``token_embd``): e.g. an added token with an
    id outside the vocabulary."""
    kv = w.kv_data[0] if isinstance(w.kv_data, list) else w.kv_data
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        v = kv.get(key)
        if v is not None and len(v.value) != n_vocab:
            raise GGQError(f"{where}: the tokenizer gives {key} {len(v.value)} entries but the token embedding has "
                           f"{n_vocab} rows")


_F16_MAX = 65504.0


def check_finite(x: np.ndarray, target, what: str) -> None:
    """GGQError naming ``what`` (file and tensor) if the float32 values ``x`` about to be stored as
    ggml type ``target`` hold NaN or infinity, or exceed float16's range for an F16 target: the
    output would load but compute garbage (llama.cpp's ``ggml_validate_row_data`` refuses such
    rows when it checks them)."""
    if not np.isfinite(x).all():
        raise GGQError(f"{what} has non-finite values (NaN or infinity)")
    if getattr(target, "name", target) == "F16" and x.size and float(np.abs(x).max()) > _F16_MAX:
        raise GGQError(f"{what} has values beyond float16's range (|x| > 65504); choose F32 or BF16")


#: rope parameters of config.json that become float32 GGUF keys or rope tables, and whether > 0 is required
_ROPE_NUMBERS = {"factor": True, "extrapolation_factor": False, "attention_factor": False, "attn_factor": False,
                 "beta_fast": False, "beta_slow": False, "low_freq_factor": True, "high_freq_factor": True,
                 "partial_rotary_factor": True, "rope_theta": True}


def _check_rope(rope: dict, where: str) -> None:
    """GGQError unless the rope parameters (:func:`ggq.convert.arch.rope_parameters`, and its
    per-kind ``full_attention`` / ``sliding_attention`` entries) that ggq writes or computes with
    are finite numbers fitting a float32 (positive where a scale), and
    ``original_max_position_embeddings`` a count."""
    if not isinstance(rope, dict):
        raise GGQError(f"{where}: rope_scaling / rope_parameters is not a JSON object")
    for kind in ("full_attention", "sliding_attention"):
        if kind in rope:
            _check_rope(rope[kind], where)
    for key, positive in _ROPE_NUMBERS.items():
        v = rope.get(key)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and abs(v) <= _FLOAT32_MAX) \
                or (positive and v <= 0):
            raise GGQError(f"{where}: rope parameter {key} is {show(v)}; it must be a finite number"
                           + (" > 0" if positive else ""))
    v = rope.get("original_max_position_embeddings")
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 1 <= v < 2**31):
        raise GGQError(f"{where}: rope parameter original_max_position_embeddings is {show(v)}; it must be a count")

