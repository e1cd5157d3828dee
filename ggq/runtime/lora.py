"""LoRA adapters in llama.cpp's GGUF format, applied at load time by merging into the weights.

:func:`read_adapter` opens an adapter file (``ggq convert-lora``'s or ``convert_lora_to_gguf.py``'s;
format in :mod:`ggq.convert.lora`) as hostile input and returns a
:class:`~ggq.convert.lora.Adapter`. :func:`apply_adapters` merges one or more of them into a base
GGUF opened by :func:`ggq.runtime.loader.open_gguf`, replacing the adapted tensors of
``gf.tensors`` by in-memory ones (the base file is never written). For each adapted tensor::

    W' = dequantize(W) + sum over adapters of  scale * alpha / r * B @ A      (float32)

(``alpha = 0``: no ``alpha / r`` factor, as llama.cpp), then stored in a ggml type by ``lora_type``:

* ``"same"`` (default): the base tensor's own type: F32 stays exact, F16/BF16 round the merged
  weights once, quantized types are requantized by ggq's own quantizer (:mod:`ggq.quants`; a type
  it cannot write, such as IQ4_NL, falls back to F32). Memory and speed are those of the base file;
  the requantization adds about the type's own rounding error again (``specs/imports.md``).
* ``"f32"``: every merged tensor in F32 (exact merge, more memory, float kernels for those matrices);
* ``"f16"``, ``"q8_0"``: every merged tensor in that type (Q8_0 needs rows of a multiple of 32
  weights, else F32): a middle way for 4-bit bases, whose requantization error is about as large
  as a typical adapter's change (``specs/imports.md``).

llama.cpp instead keeps ``A`` and ``B`` apart and adds ``scale * alpha / r * (x A^T) B^T`` to each
product; merging gives the same function (exactly up to float rounding for an F32 base).

Validation (one-line :class:`~ggq.errors.GGQError` naming the adapter file): a valid GGUF header
(:func:`~ggq.runtime.loader.open_gguf`), ``general.type = adapter``, ``adapter.type = lora``,
``general.architecture`` equal to the base's, ``adapter.lora.alpha`` (optional) a finite number, no
aLoRA invocation tokens; every tensor a ``NAME.lora_a`` / ``NAME.lora_b`` pair of matrices with
``lora_a`` ``ne = [n_in, r]``, ``lora_b`` ``ne = [r, n_out]``, the same ``r``, for a base matrix
``NAME`` of ``ne = [n_in, n_out]`` (not the token embeddings); a type ggq can dequantize; finite
values; a finite user scale.
"""

from __future__ import annotations

import math
import sys

import numpy as np
from gguf import GGMLQuantizationType

from ggq.convert.lora import Adapter, LoraPair, merge
from ggq.errors import GGQError, show

T = GGMLQuantizationType

#: --lora-type values -> the ggml type of merged tensors (None: the base tensor's own)
LORA_TYPES = {"same": None, "f32": T.F32, "f16": T.F16, "q8_0": T.Q8_0}
#: types ggq's quantizers cannot read but the runtime runs: dequantized by gguf-py to merge (kept in F32)
_GGUF_DEQUANT = (T.IQ4_NL,)


def read_adapter(path, base_arch: str | None = None) -> Adapter:
    """Read and validate the GGUF LoRA adapter at ``path`` (see the module docstring). ``base_arch``:
    the base model's ``general.architecture``, checked when given. Base shapes are checked by
    :func:`apply_adapters`. Returns an :class:`Adapter` with float32 ``a`` (r, n_in) and ``b``
    (n_out, r)."""
    from ggq import quants
    from ggq.runtime.loader import open_gguf

    gf = open_gguf(path, check_arch=False)
    where = str(gf.path)
    md = gf.metadata
    if md.get("general.type") != "adapter":
        raise GGQError(f"{where}: not an adapter file (general.type is {show(md.get('general.type'))}, not 'adapter')")
    if md.get("adapter.type") != "lora":
        raise GGQError(f"{where}: adapter.type is {show(md.get('adapter.type'))}; only 'lora' adapters are supported")
    if base_arch is not None and gf.arch != base_arch:
        raise GGQError(f"{where}: adapter for architecture {show(gf.arch)}, but the model is {show(base_arch)}")
    if md.get("adapter.alora.invocation_tokens") is not None:
        raise GGQError(f"{where}: aLoRA adapters (adapter.alora.invocation_tokens) are not supported")
    alpha = md.get("adapter.lora.alpha", 0.0)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise GGQError(f"{where}: adapter.lora.alpha {show(alpha)} is not a finite number")
    halves: dict[str, dict[str, object]] = {}
    for name, t in gf.tensors.items():
        base, dot, kind = name.rpartition(".")
        if not dot or kind not in ("lora_a", "lora_b"):
            raise GGQError(f"{where}: tensor {show(name)} is not a .lora_a or .lora_b tensor")
        halves.setdefault(base, {})[kind] = t
    if not halves:
        raise GGQError(f"{where}: the adapter has no tensors")
    ad = Adapter(where, gf.arch, float(alpha))
    for base, ab in halves.items():
        for kind in ("lora_a", "lora_b"):
            if kind not in ab:
                raise GGQError(f"{where}: {base}.{'lora_b' if kind == 'lora_a' else 'lora_a'} has no {base}.{kind}")
        a, b = ab["lora_a"], ab["lora_b"]
        if len(a.ne) != 2 or len(b.ne) != 2:
            raise GGQError(f"{where}: {base}: lora_a {list(a.ne)} and lora_b {list(b.ne)} must be matrices")
        if a.ne[1] != b.ne[0]:
            raise GGQError(f"{where}: {base}: lora_a has rank {a.ne[1]} but lora_b has rank {b.ne[0]}")
        if base == "token_embd.weight":
            raise GGQError(f"{where}: token embedding adapters are not supported")
        arrs = []
        for t in (a, b):
            if not quants.supported(t.qtype):
                raise GGQError(f"{where}: tensor {t.name} has type {t.qtype.name}, which ggq cannot read")
            try:
                x = quants.dequantize(np.asarray(t.raw), t.qtype).reshape(t.ne[1], t.ne[0])
            except ValueError as e:
                raise GGQError(f"{where}: cannot read tensor {t.name} ({e})") from None
            if not np.isfinite(x).all():
                raise GGQError(f"{where}: tensor {t.name} has non-finite values")
            arrs.append(np.ascontiguousarray(x, dtype=np.float32))
        ad.pairs[base] = LoraPair(base, arrs[0], arrs[1])
    return ad


def apply_adapters(gf, specs: list[tuple[str, float]], lora_type: str = "same") -> list[Adapter]:
    """Merge the adapters ``specs`` (``(path, scale)``) into the opened base GGUF ``gf``: every
    adapted tensor of ``gf.tensors`` is replaced by an in-memory
    :class:`~ggq.runtime.loader.TensorInfo` (``offset = -1``) of the type ``lora_type`` chooses
    (module docstring) whose ``raw`` is a :class:`MergedRows`: the merged block bytes, made when the
    loader repacks the tensor. Everything is validated here, before any merging. Returns the adapters. GGQError for an invalid adapter,
    a scale that is not finite, an unknown ``lora_type``, or an adapter that does not fit the base."""
    from ggq import quants
    from ggq.runtime.loader import TensorInfo

    if lora_type not in LORA_TYPES:
        raise GGQError(f"unknown --lora-type {show(lora_type)} (valid: {', '.join(LORA_TYPES)})")
    adapters = []
    for path, scale in specs:
        if not math.isfinite(scale):
            raise GGQError(f"{path}: the adapter scale {scale!r} is not finite")
        ad = read_adapter(path, gf.arch)
        for name, p in ad.pairs.items():
            t = gf.tensors.get(name)
            if t is None:
                if name == "output.weight" and "token_embd.weight" in gf.tensors:
                    raise GGQError(f"{ad.path}: the adapter targets output.weight, but {gf.path.name} ties the "
                                   "output to the token embeddings")
                raise GGQError(f"{ad.path}: tensor {name} of the adapter is not in {gf.path.name}")
            want = (p.a.shape[1], p.b.shape[0])
            if len(t.ne) != 2 or tuple(t.ne) != want:
                raise GGQError(f"{ad.path}: {name}: lora_b @ lora_a has ne {list(want)} but the model's tensor "
                               f"has {list(t.ne)}")
        adapters.append((ad, float(scale)))
    targets = sorted({n for ad, _ in adapters for n in ad.pairs})
    fallback = set()
    for name in targets:
        t = gf.tensors[name]
        if not quants.supported(t.qtype) and t.qtype not in _GGUF_DEQUANT:
            raise GGQError(f"{gf.path.name}: cannot apply an adapter to {name}: ggq cannot dequantize its type "
                           f"{t.qtype.name}")
        qt = t.qtype if LORA_TYPES[lora_type] is None else LORA_TYPES[lora_type]  # (T.F32 is 0: falsy)
        if qt == T.Q8_0 and t.ne[0] % 32:
            qt = T.F32
        if not quants.supported(qt):
            fallback.add(qt.name)
            qt = T.F32
        n_out, n_in = int(t.ne[1]), int(t.ne[0])
        row_bytes = quants.row_bytes(qt, n_in)
        raw = MergedRows((n_out, row_bytes), lambda t=t, qt=qt: _merged_bytes(t, qt, adapters))
        gf.tensors[name] = TensorInfo(name, qt, tuple(t.ne), -1, n_out * row_bytes, raw)
    if fallback:
        print(f"ggq: note: ggq cannot write {', '.join(sorted(fallback))}; tensors of that type merged with an "
              "adapter are kept in F32", file=sys.stderr)
    return [ad for ad, _ in adapters]


def _merged_bytes(t, qt: T, adapters) -> np.ndarray:
    """The block bytes (uint8 ``(n_out, row_bytes)``) of base tensor ``t`` merged with ``adapters``
    (float32 merge, :func:`ggq.convert.lora.merge`) and stored as ``qt``."""
    from ggq import quants

    raw = np.asarray(t.raw)
    if quants.supported(t.qtype):
        w = quants.dequantize(raw, t.qtype)
    else:  # IQ4_NL and the like: gguf-py's reference dequantizer
        from gguf.quants import dequantize

        w = dequantize(raw, t.qtype).astype(np.float32)
    w = merge(w.reshape(t.ne[1], t.ne[0]), adapters, t.name)
    with np.errstate(over="ignore", invalid="ignore"):  # checked below: one line, not numpy's warning
        data = quants.quantize(w, qt)
    # every type holds |w| <= 65504 (fp16's largest; block scales are at most that); beyond it, decode
    amax = float(np.abs(w).max(initial=0.0))
    if qt != T.F32 and amax > 65504 and np.isfinite(w).all():
        with np.errstate(over="ignore", invalid="ignore"):
            ok = np.isfinite(quants.dequantize(np.asarray(data), qt)).all()
        if not ok:
            who = ", ".join(str(ad.path) for ad, _ in adapters if t.name in ad.pairs)
            raise GGQError(f"{who}: merged into {t.name}, the adapter gives weights beyond {qt.name}'s range "
                           f"(largest {amax:.3g}); --lora-type f32 keeps them")
    return np.ascontiguousarray(data).view(np.uint8).reshape(t.ne[1], -1)


class MergedRows:
    """The block bytes of a merged tensor, made on first use and dropped by :meth:`release`: the
    loader repacks the tensors one by one, so only one merged tensor is in memory at a time (not
    a second copy of every adapted matrix). Indexing and ``np.asarray`` give the uint8
    ``shape`` array."""

    def __init__(self, shape: tuple[int, int], make):
        self.shape = shape
        self._make = make
        self._data: np.ndarray | None = None

    def _get(self) -> np.ndarray:
        if self._data is None:
            self._data = self._make()
        return self._data

    def __getitem__(self, key):
        return self._get()[key]

    def __array__(self, dtype=None, copy=None):
        a = self._get()
        return a if dtype is None else a.astype(dtype)

    def release(self) -> None:
        self._data = None


__all__ = ["read_adapter", "apply_adapters", "LORA_TYPES", "MergedRows"]
