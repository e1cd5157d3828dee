"""A GGUF model ready to run: weights repacked for the kernels, a KV cache, one compiled call per batch.

``Model.load(path)`` memory-maps the file (:mod:`ggq.runtime.loader`), finds its family
(:mod:`ggq.models`: llama, qwen2, qwen3, gemma2/3, phi3, ...), lets the family name the tensors of
each layer (:meth:`~ggq.models.base.Family.load_layer`) into the layer table, repacks the weights
into the kernel layouts (:mod:`ggq.runtime.kernels`; the file's pages are released as each tensor
is done) and allocates a KV cache. ``Model.eval(tokens)`` runs the tokens at positions
``n_past...`` through the family's compiled ``forward``, which loops over all layers with the ops
of :mod:`ggq.runtime.ops`. Prompt batches go through the same call with T rows (matrix-matrix
kernels); a single token is the decode path.

Several sequences: ``Model.load(path, n_seq=N)`` allocates N KV cache regions (N times the memory
of one). ``eval``, ``embed``, ``truncate``, ``reset`` and ``n_past`` work on sequence 0, or on
sequence ``i`` through ``seq=i`` or the view ``Model.seq(i)``; ``decode_batch(tokens, seqs)``
appends one token to each of several sequences in one forward call (every matrix product runs
once over the weights for all of them: what ``ggq serve`` does for its busy slots).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import numba
import numpy as np
import gguf
from gguf import GGMLQuantizationType as T

from ggq import models
from ggq.errors import GGQError, show
from ggq.models.base import Metadata, RunParams
from ggq.runtime import firstrun, ops
from ggq.runtime.kernels import SUPPORTED_TYPES, WeightArena
from ggq.runtime.loader import open_gguf
from ggq.runtime.memory import release_range
from ggq.runtime.ops import KT, KV_TYPES

def _dequant_vec(t) -> np.ndarray:
    """A 1-D norm/bias tensor as float32."""
    from gguf.quants import dequantize

    raw = np.asarray(t.raw).reshape(-1)
    if t.qtype == T.F32:
        return raw.view(np.float32).copy()
    if t.qtype == T.F16:
        return raw.view(np.float16).astype(np.float32)
    return dequantize(raw, t.qtype).astype(np.float32).reshape(-1)


class LayerBuilder:
    """What a family's ``load_layer`` names its tensors through (llama.cpp's ``create_tensor``).

    Matrices go to the weight arena (:meth:`mat`, :meth:`stacked`: an index into it), norm weights
    and biases to one float32 array (:meth:`vec`: an offset into it); -1 stands for an absent
    optional tensor. Shapes are in ggml ``ne`` order (``ne[0]`` = row length). GGQError naming the
    file for a missing required tensor, a wrong shape or a type ggq cannot run."""

    def __init__(self, tensors: dict, where: str, check_types: bool = True):
        self.tensors = tensors
        self.where = where
        self.check_types = check_types
        self.mats: list = []  # TensorInfo or _Fused, in arena order
        self.vecs: list[np.ndarray] = []
        self._vec_size = 0
        self.used: set[str] = set()  # names of the tensors looked up and found

    def has(self, name: str) -> bool:
        return name in self.tensors

    def tensor(self, name: str, ne, optional: bool = False):
        """The tensor ``name`` after checking its shape; None if absent and ``optional``."""
        t = self.tensors.get(name)
        if t is None:
            if optional:
                return None
            raise GGQError(f"{self.where}: missing tensor {name}")
        if tuple(t.ne) != tuple(ne):
            raise GGQError(f"{self.where}: tensor {name} has shape {list(t.ne)}, expected {list(ne)}")
        self.used.add(name)
        return t

    def check_all_used(self) -> None:
        """GGQError if the file has tensors that no lookup asked for: llama.cpp refuses such a file
        ("wrong number of tensors"), and a tensor nobody reads is a sign of a wrong architecture
        or hyper-parameters."""
        extra = [n for n in self.tensors if n not in self.used]
        if extra:
            raise GGQError(f"{self.where}: {len(extra)} tensor(s) that this architecture does not use, "
                           f"e.g. {show(extra[0])}")

    def _add_mat(self, t) -> int:
        if self.check_types and t.qtype not in SUPPORTED_TYPES:
            raise GGQError(f"{self.where}: tensor {t.name} has type {t.qtype.name}, which ggq cannot run")
        self.mats.append(t)
        return len(self.mats) - 1

    def mat(self, name: str, ne, optional: bool = False) -> int:
        """Arena index of matrix ``name`` (-1 if absent and ``optional``)."""
        t = self.tensor(name, ne, optional)
        return -1 if t is None else self._add_mat(t)

    def stacked(self, *named) -> list[int]:
        """Arena indices of the matrices ``(name, ne)`` that one input multiplies (Q, K, V; gate, up).
        When they share a type and row length and their row counts are multiples of 64 they are
        stacked into one matrix, so one parallel region computes them all: then the first index
        is that matrix and the others are -1 (the ops split its output)."""
        ts = [self.tensor(n, ne) for n, ne in named]
        if _fusable(*ts):
            return [self._add_mat(_Fused(*ts))] + [-1] * (len(ts) - 1)
        return [self._add_mat(t) for t in ts]

    def vec_array(self, name: str, n: int, optional: bool = False) -> np.ndarray | None:
        """The float32 values of the 1-D tensor ``name`` (``n`` elements), None if absent and ``optional``."""
        t = self.tensor(name, (n,), optional)
        if t is None:
            return None
        try:
            v = _dequant_vec(t)
        except (NotImplementedError, ValueError) as e:
            raise GGQError(f"{self.where}: cannot read tensor {name} of type {t.qtype.name} ({e})") from None
        return v

    def vec(self, name: str, n: int, optional: bool = False) -> int:
        """Offset of the 1-D tensor ``name`` in the runtime's vector array (-1 if absent and ``optional``)."""
        arr = self.vec_array(name, n, optional)
        if arr is None:
            return -1
        off = self._vec_size
        padded = -(-arr.size // 16) * 16
        self.vecs += [arr, np.zeros(padded - arr.size, np.float32)]
        self._vec_size += padded
        return off

    def vec_values(self) -> np.ndarray:
        return np.concatenate(self.vecs).astype(np.float32) if self.vecs else np.zeros(16, np.float32)


@dataclass
class ModelPlan:
    """A validated model before any weight is repacked: its family and hyper-parameters, the layer
    builder (matrices and vectors named), the layer table ``lay``, the context size, the
    vocabulary size, the arena indices of token_embd / output and the vector offset of
    output_norm, and the rope kinds (``inv_freq``, ``mscale``)."""

    family: object
    params: RunParams
    builder: LayerBuilder
    lay: np.ndarray
    n_ctx: int
    n_vocab: int
    i_emb: int
    i_onorm: int
    i_out: int
    tied_output: bool
    inv_freq: np.ndarray
    mscale: np.ndarray


def plan_model(gf, n_ctx: int | None = None, check_types: bool = True) -> ModelPlan:
    """Validate the model in the opened GGUF file ``gf`` (:func:`ggq.runtime.loader.open_gguf`)
    against its family before anything is allocated from its values or compiled code runs:
    hyper-parameters in range (:meth:`RunParams.check`), ``block_count`` equal to the file's
    ``blk.N`` groups, every tensor the forward pass reads present with the shape the
    hyper-parameters give (:class:`LayerBuilder`), the vocabulary consistent with
    ``token_embd.weight`` (:func:`check_vocab`), finite rope frequencies. ``check_types``: also
    refuse matrix types the runtime cannot run (``ggq quantize`` checks with False). Reads only the
    small norm and bias vectors. GGQError naming the file for any violation."""
    name = gf.path.name
    fam = models.for_gguf(gf.arch, name)
    rp = fam.run_params(Metadata(gf.metadata, gf.arch, name), gf.tensors)
    rp.check(name)
    n_layer, n_embd = rp.n_layer, rp.n_embd
    check_layers(gf.tensors, gf.arch, n_layer, name)
    n_ctx = int(n_ctx) if n_ctx else min(rp.ctx_train, 4096)
    if not 1 <= n_ctx < 2**31:
        raise GGQError(f"context size {n_ctx} must be between 1 and 2**31 - 1")
    b = LayerBuilder(gf.tensors, name, check_types=check_types)
    emb = gf.tensors.get("token_embd.weight")
    if emb is None or len(emb.ne) != 2 or emb.ne[0] != n_embd:
        raise GGQError(f"{name}: missing or malformed token_embd.weight (expected {n_embd} columns)")
    n_vocab = int(emb.ne[1])
    check_vocab(gf.metadata, gf.arch, n_vocab, name)
    lay = np.full((n_layer, ops.N_L), -1, np.int64)
    for i in range(n_layer):
        fam.load_layer(b, i, rp, lay[i])
        lay[i, ops.L_SWA] = int(bool(rp.swa_layers[i])) if rp.swa_layers else 0
        lay[i, ops.L_ROPE] = rp.rope_kinds[i] if rp.rope_kinds else 0
    i_emb = b.mat("token_embd.weight", emb.ne)
    i_onorm = b.vec("output_norm.weight", n_embd)
    i_out = b.mat("output.weight", (n_embd, n_vocab), optional=True)
    tied = i_out < 0
    if tied:
        i_out = i_emb
    try:
        inv_freq, mscale = fam.rope(rp, b, n_ctx)
    except (ValueError, ZeroDivisionError, OverflowError) as e:
        raise GGQError(f"{name}: invalid rope parameters ({e})") from None
    if not (np.all(np.isfinite(inv_freq)) and np.all(np.isfinite(mscale))):
        raise GGQError(f"{name}: the rope parameters give non-finite frequencies (rope.freq_base, "
                       f"rope.scaling.*, or rope factor tensors)")
    b.check_all_used()
    return ModelPlan(fam, rp, b, lay, n_ctx, n_vocab, i_emb, i_onorm, i_out, tied, inv_freq, mscale)


class Model:
    """A GGUF model ready to run: see the module docstring and ``specs/runtime.md``.

    Attributes: ``arch``, ``family`` (:class:`ggq.models.base.Family`), ``n_vocab``, ``n_ctx``
    (per sequence), ``n_seq`` (KV cache regions), ``metadata`` (GGUF key -> value), ``n_past``
    (tokens in sequence 0's KV cache; :meth:`past` for any), ``path``, ``load_seconds``.
    """

    n_batch = 512

    @classmethod
    def load(cls, path, n_ctx: int | None = None, n_threads: int | None = None, kv_type: str = "f32",
             loras: list[tuple[str, float]] | None = None, lora_type: str = "same", n_seq: int = 1) -> "Model":
        """Load the GGUF at ``path``. ``kv_type``: the KV cache's element type, ``"f32"`` (exact) or
        ``"f16"`` (half the memory, as llama.cpp's default cache). ``loras``: GGUF LoRA adapters
        ``(file, scale)`` merged into the weights at load (:mod:`ggq.runtime.lora`; the file is not
        changed), the merged tensors stored as ``lora_type`` says (``"same"``: the base tensor's type;
        ``"f32"``, ``"f16"``, ``"q8_0"``). ``n_seq``: KV cache regions of ``n_ctx`` positions each
        (sequences decoded together by :meth:`decode_batch`). GGQError for a missing/malformed file or
        adapter, an unsupported arch/type, an unknown ``kv_type`` or ``n_seq`` < 1."""
        self = cls()
        t0 = time.perf_counter()
        if kv_type not in KV_TYPES:
            raise GGQError(f"unknown KV cache type {kv_type!r} (valid: {', '.join(KV_TYPES)})")
        if not 1 <= int(n_seq) <= 4096:
            raise GGQError(f"the number of sequences must be between 1 and 4096, not {n_seq}")
        n_seq = int(n_seq)
        gf = open_gguf(path)
        self.adapters = []
        if loras:
            from ggq.runtime.lora import apply_adapters

            self.adapters = apply_adapters(gf, list(loras), lora_type)
        self.path = gf.path
        self._gf = gf
        self.metadata = gf.metadata
        self.arch = gf.arch
        name = gf.path.name
        plan = plan_model(gf, n_ctx)
        fam, rp, b, lay = plan.family, plan.params, plan.builder, plan.lay
        self.family, self.params, self.n_ctx, self.n_vocab = fam, rp, plan.n_ctx, plan.n_vocab
        n_layer, n_embd = rp.n_layer, rp.n_embd
        self.n_layer, self.n_embd, self.n_head, self.n_kv, self.head_dim, self.n_ff = (
            n_layer, n_embd, rp.n_head, rp.n_kv, rp.head_dim, rp.n_ff)
        i_emb, i_onorm, i_out = plan.i_emb, plan.i_onorm, plan.i_out
        self.tied_output = plan.tied_output
        self._inv_freq, self._rope_mscale = plan.inv_freq, plan.mscale

        try:
            arena = WeightArena([(t.qtype, t.n_rows, t.n_cols) for t in b.mats])
        except ValueError as e:
            raise GGQError(f"{name}: {e}") from None
        mm = getattr(gf.data, "_mmap", None)
        for j, t in enumerate(b.mats):
            row0 = 0
            for part in getattr(t, "parts", (t,)):  # stacked Q|K|V, gate|up: part by part, no copy
                row_bytes = part.nbytes // part.n_rows

                def release(r0, r1, part=part, row_bytes=row_bytes):
                    if part.offset >= 0:  # not a merged adapter tensor (in memory, offset -1)
                        release_range(mm, part.offset + r0 * row_bytes, (r1 - r0) * row_bytes)

                arena.fill(j, part.raw, row0=row0, release=release)
                if part.offset < 0:  # a merged adapter tensor (ggq.runtime.lora.MergedRows): free it
                    part.raw.release()
                row0 += part.n_rows
        release_range(mm, 0, gf.size)  # the header (vocabulary) and the vectors are read and copied too
        self.arena = arena
        self._vecs = b.vec_values()
        self._lay = lay
        self._ip = rp.int_params(self.n_vocab, i_emb, i_onorm, i_out)
        self._fp = rp.float_params()
        self._forward_fn = fam.forward
        self._first_run = None  # a firstrun.FirstRun while the forward compiles (warmup)
        self.kv_type = kv_type
        # per sequence: K in tiles of KT positions [layer][kv head][tile][dim][position],
        # V [layer][kv head][position][dim]
        n_kvh, hd = self.n_kv, self.head_dim
        self.n_seq = n_seq
        try:
            self._kc = np.zeros((n_seq, n_layer, n_kvh, -(-self.n_ctx // KT), hd, KT), KV_TYPES[kv_type])
            self._vc = np.zeros((n_seq, n_layer, n_kvh, self.n_ctx, hd), KV_TYPES[kv_type])
        except (MemoryError, ValueError):
            gib = 2 * n_seq * n_layer * n_kvh * self.n_ctx * hd * np.dtype(KV_TYPES[kv_type]).itemsize / 2**30
            what = f"{n_seq} sequences of {self.n_ctx}" if n_seq > 1 else f"a context of {self.n_ctx}"
            raise GGQError(f"{name}: cannot allocate a KV cache of {gib:.1f} GiB for {what} "
                           f"tokens (use a smaller --ctx-size)") from None
        self._past = [0] * n_seq
        if n_threads:
            numba.set_num_threads(max(1, min(int(n_threads), numba.config.NUMBA_NUM_THREADS)))
        self.n_threads = numba.get_num_threads()
        self.load_seconds = time.perf_counter() - t0
        self.file_size = gf.size
        return self

    # ------------------------------------------------------------------ KV cache control
    @property
    def n_past(self) -> int:
        """Tokens in sequence 0's KV cache."""
        return self._past[0]

    @n_past.setter
    def n_past(self, n: int) -> None:
        self._past[0] = int(n)

    def past(self, seq: int = 0) -> int:
        """Tokens in sequence ``seq``'s KV cache."""
        return self._past[self._check_seq(seq)]

    def _check_seq(self, seq) -> int:
        if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)) or not 0 <= seq < self.n_seq:
            raise GGQError(f"sequence {seq!r} out of range 0..{self.n_seq - 1}")
        return int(seq)

    def _check_append(self, tokens, seq, caller: str):
        """``(seq, token ids int64 (n,))`` for appending ``tokens`` to sequence ``seq``; GGQError for
        no tokens, an id outside the vocabulary or a context that would overflow n_ctx."""
        seq = self._check_seq(seq)
        toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
        n = toks.shape[0]
        if n == 0:
            raise GGQError(f"{caller}() needs at least one token")
        if toks.min() < 0 or toks.max() >= self.n_vocab:
            raise GGQError(f"token id out of range 0..{self.n_vocab - 1}")
        if self._past[seq] + n > self.n_ctx:
            raise GGQError(f"context full: {self._past[seq]} + {n} tokens exceed n_ctx={self.n_ctx}")
        return seq, toks

    def seq(self, i: int) -> "Sequence":
        """A view of sequence ``i``: :class:`Sequence`, with this model's single-sequence API."""
        return Sequence(self, self._check_seq(i))

    def reset(self, seq: int = 0) -> None:
        """Forget all tokens of sequence ``seq`` (its n_past = 0)."""
        self._past[self._check_seq(seq)] = 0

    def truncate(self, n_past: int, seq: int = 0) -> None:
        """Keep the first ``n_past`` tokens of sequence ``seq``'s KV cache (0 <= n_past <= its n_past)."""
        s = self._check_seq(seq)
        if not 0 <= n_past <= self._past[s]:
            raise GGQError(f"cannot truncate the KV cache to {n_past} tokens (it holds {self._past[s]})")
        self._past[s] = int(n_past)

    def warmup(self, repackers: bool = True, wait: bool = True) -> None:
        """Compile the forward pass for this file's types (or load it from Numba's on-disk cache):
        one decode step at position 0, then the cache is cleared; the compiled code covers every
        batch size. Then the compiled load-time repackers of its types, for the next load. Safe to
        run in a background thread while nothing else uses the model.

        When the forward is not in the cache (a fresh install, a new ggq) it is compiled on two
        cores (:mod:`ggq.runtime.firstrun`): the attention and the whole forward in a second
        process, the other ops here. With ``wait`` False this returns as soon as the model can
        run (its forward then runs as Python over the compiled ops, with the same results) and
        :meth:`finish_compile` later switches to the compiled forward; with ``wait`` True it
        returns with the compiled forward in use."""
        fwd = self.family.forward
        if self._forward_fn is fwd and self._first_run is None:
            i1 = np.zeros(1, np.int64)
            sig = firstrun.signature(self._forward_args(i1, i1, i1, False, self._ip,
                                                        np.empty((1, self.n_vocab), np.float32)))
            if firstrun.load_cached(fwd, sig) is False:
                q = np.empty((1, self.n_head * self.head_dim), np.float32)
                kv = np.empty((1, self.n_kv * self.head_dim), np.float32)
                att = firstrun.signature((0, q, kv, kv, self._kc, self._vc, i1, i1, self._ip, self._fp, False, q))
                fr = self._first_run = firstrun.FirstRun(fwd, sig, att)
                self._forward_fn = fr.python_forward
                fr.compile_rest(self._forward_args(i1, i1, i1, False, self._ip,
                                                   np.empty((1, self.n_vocab), np.float32)))
        self.eval([0])
        self.reset()
        if wait:
            self.finish_compile()
        if repackers:
            self.compile_repackers()

    def finish_compile(self) -> None:
        """After :meth:`warmup` with ``wait`` False on a first run: wait until the helper process
        has compiled the forward, load it and use it from the next batch on (no-op otherwise)."""
        fr = self._first_run
        if fr is not None:
            self._forward_fn = fr.finish()
            self._first_run = None

    def compile_repackers(self) -> None:
        """Compile (or load) the load-time repackers of this file's types, so that the next load
        repacks with them (a fresh install repacks with numpy meanwhile)."""
        from ggq.runtime.kernels.fastpack import precompile

        precompile(sorted({q for q, _, _ in self.arena.specs}))

    @property
    def compiled_types(self) -> list[str]:
        """The ggml types of the matrices, i.e. the kernels this file compiles (e.g. ['Q4_K', 'Q6_K'])."""
        from gguf import GGMLQuantizationType

        from ggq.runtime.kernels.repack import C_QT

        return sorted({GGMLQuantizationType(int(q)).name for q in self.arena.mats[:, C_QT] if q >= 0})

    @property
    def kv_cache_bytes(self) -> int:
        return self._kc.nbytes + self._vc.nbytes

    # ------------------------------------------------------------------ evaluation
    def eval(self, tokens, all_logits: bool = False, seq: int = 0) -> np.ndarray:
        """Append ``tokens`` to sequence ``seq`` at its positions n_past...; return float32 logits of
        the last token (n_vocab,), or of every token (len(tokens), n_vocab) with ``all_logits``.

        GGQError if a token id is out of range, the context would overflow n_ctx, the sequence
        does not exist, or the logits are not finite (NaN or infinity: the model's values
        overflow; the sampler cannot use them)."""
        seq, toks = self._check_append(tokens, seq, "eval")
        n = toks.shape[0]
        outs = []
        for s in range(0, n, self.n_batch):
            chunk = toks[s:s + self.n_batch]
            last = s + self.n_batch >= n
            if not all_logits and not last:
                lg = np.empty((1, self.n_vocab), np.float32)
            else:
                lg = np.empty((chunk.shape[0] if all_logits else 1, self.n_vocab), np.float32)
            self._forward(chunk, lg, all_logits, seq=seq)
            if not np.isfinite(lg).all():  # overflowing weights or activations: NaN/inf logits
                where = self._first_non_finite_layer(chunk, all_logits, seq)
                p = self._past[seq]
                raise GGQError(f"{self.path.name}: the model produced non-finite values (NaN or infinity) "
                               f"{where} at positions {p}..{p + chunk.shape[0] - 1}; its "
                               f"weights or hyper-parameters overflow float32")
            self._past[seq] += chunk.shape[0]
            if all_logits:
                outs.append(lg)
            elif last:
                outs.append(lg[0])
        return np.concatenate(outs) if all_logits else outs[-1]

    def embed(self, tokens, seq: int = 0) -> np.ndarray:
        """Append ``tokens`` to sequence ``seq`` at its positions n_past... (filling the KV cache as
        :meth:`eval` does) and return their final hidden states: float32 (len(tokens), n_embd), the
        output norm applied (what the output matrix multiplies into logits), one row per token.

        GGQError as :meth:`eval` (token out of range, context full, non-finite values)."""
        seq, toks = self._check_append(tokens, seq, "embed")
        n = toks.shape[0]
        ip = self._ip.copy()
        ip[ops.I_OUT] = -1  # ops.output: the normed hidden states instead of logits
        out = np.empty((n, self.n_embd), np.float32)
        for s in range(0, n, self.n_batch):
            chunk = toks[s:s + self.n_batch]
            h = out[s:s + chunk.shape[0]]
            self._forward(chunk, h, True, ip, seq)
            if not np.isfinite(h).all():
                p = self._past[seq]
                raise GGQError(f"{self.path.name}: the model produced non-finite values (NaN or infinity) at "
                               f"positions {p}..{p + chunk.shape[0] - 1}")
            self._past[seq] += chunk.shape[0]
        return out

    def decode_batch(self, tokens, seqs) -> np.ndarray:
        """Append one token to each of several sequences in one forward call: ``tokens[i]`` goes to
        sequence ``seqs[i]`` at its position n_past (int64-convertible (n,) each, the sequences
        distinct). Returns float32 logits (n, n_vocab), row i for tokens[i]; each sequence's n_past
        grows by one.

        Every matrix product runs with T = n rows (one pass over the weights for all sequences),
        rope turns each row by its own position, K and V are stored in each sequence's cache at its
        position, and each row attends to its own sequence's cache (the decode attention path).
        The logits equal :meth:`eval` of that token alone on that sequence: bit for bit with the
        integer kernels (each row's arithmetic does not depend on the other rows), to float32
        rounding with F32/F16/BF16 weights (their single-row kernel sums in another order).

        GGQError (nothing appended) for lengths that differ, no tokens, a repeated or unknown
        sequence, a token id out of range, a full context, or non-finite logits."""
        toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
        sq = np.asarray(seqs, dtype=np.int64).reshape(-1)
        n = toks.shape[0]
        if n == 0 or sq.shape[0] != n:
            raise GGQError(f"decode_batch() needs one sequence per token and at least one token "
                           f"({n} tokens, {sq.shape[0]} sequences)")
        if toks.min() < 0 or toks.max() >= self.n_vocab:
            raise GGQError(f"token id out of range 0..{self.n_vocab - 1}")
        if sq.min() < 0 or sq.max() >= self.n_seq or np.unique(sq).shape[0] != n:
            raise GGQError(f"decode_batch(): sequences must be distinct and in 0..{self.n_seq - 1}")
        pos = np.array([self._past[s] for s in sq], np.int64)
        if pos.max() >= self.n_ctx:
            s = int(sq[pos.argmax()])
            raise GGQError(f"context full: sequence {s} holds {self._past[s]} tokens, n_ctx={self.n_ctx}")
        lg = np.empty((n, self.n_vocab), np.float32)
        self._forward_fn(*self._forward_args(toks, pos, sq, True, self._ip, lg))
        if not np.isfinite(lg).all():
            bad = [int(sq[i]) for i in range(n) if not np.isfinite(lg[i]).all()]
            raise GGQError(f"{self.path.name}: the model produced non-finite values (NaN or infinity) for "
                           f"sequence(s) {bad}; its weights or hyper-parameters overflow float32")
        for s in sq:
            self._past[s] += 1
        return lg

    def _forward(self, chunk, logits, all_logits, ip=None, seq=0):
        T = chunk.shape[0]
        p0 = self._past[seq]
        self._forward_fn(*self._forward_args(chunk, np.arange(p0, p0 + T, dtype=np.int64), np.full(T, seq, np.int64),
                                             all_logits, self._ip if ip is None else ip, logits))

    def _forward_args(self, tokens, pos, seq, all_logits, ip, logits) -> tuple:
        """The arguments of the family's ``forward`` (see :func:`ggq.models.llama.forward`)."""
        return (tokens, pos, seq, all_logits, self.arena.args, self._vecs, self._lay, ip, self._fp,
                self._inv_freq, self._rope_mscale, self._kc, self._vc, logits)

    def _first_non_finite_layer(self, chunk, all_logits, seq=0) -> str:
        """Where a batch whose logits were not finite first went wrong, for the error message: the
        batch is run again through its first k layers only (then the output norm and head),
        bisecting k, about log2(n_layer) passes on this error path only; "at layer N" is the first
        layer after which the logits are no longer finite, "in the token embeddings" if they are
        not finite with no layer at all. The KV cache entries of these positions are rewritten by
        each pass (the caller raises; the positions are not counted in ``n_past``)."""
        lg = np.empty((chunk.shape[0] if all_logits else 1, self.n_vocab), np.float32)
        ip = self._ip.copy()
        lo, hi = 0, self.n_layer  # logits finite after lo layers (or lo = 0 unknown), not after hi
        ip[ops.I_LAYER] = 0
        self._forward(chunk, lg, all_logits, ip, seq)
        if not np.isfinite(lg).all():
            return "in the token embeddings"
        while hi - lo > 1:
            mid = (lo + hi) // 2
            ip[ops.I_LAYER] = mid
            self._forward(chunk, lg, all_logits, ip, seq)
            if np.isfinite(lg).all():
                lo = mid
            else:
                hi = mid
        return f"at layer {hi - 1} (blk.{hi - 1})"

    def __repr__(self):
        return (f"<ggq Model {self.path.name} arch={self.arch} n_vocab={self.n_vocab} n_ctx={self.n_ctx} "
                f"n_seq={self.n_seq} n_past={self._past}>")


class Sequence:
    """Sequence ``index`` of ``model`` (:meth:`Model.seq`) with the single-sequence API of
    :class:`Model`: ``eval``, ``embed``, ``truncate``, ``reset``, ``n_past``, and the model's
    ``n_ctx``, ``n_vocab``, ``n_embd``, ``path``. What ``ggq serve``'s slots hold."""

    def __init__(self, model: Model, index: int):
        self.model, self.index = model, index
        self.n_ctx, self.n_vocab, self.n_embd, self.path = model.n_ctx, model.n_vocab, model.n_embd, model.path

    @property
    def n_past(self) -> int:
        return self.model.past(self.index)

    def eval(self, tokens, all_logits: bool = False) -> np.ndarray:
        return self.model.eval(tokens, all_logits, seq=self.index)

    def embed(self, tokens) -> np.ndarray:
        return self.model.embed(tokens, seq=self.index)

    def truncate(self, n_past: int) -> None:
        self.model.truncate(n_past, seq=self.index)

    def reset(self) -> None:
        self.model.reset(seq=self.index)


_BLK = re.compile(r"blk\.(\d+)\.")


def check_layers(tensors, arch: str, n_layer: int, where: str) -> None:
    """GGQError unless the file's ``blk.N.*`` tensors are exactly the layers 0 .. n_layer - 1
    (``{arch}.block_count``): llama.cpp fails on a missing layer tensor; a block count smaller
    than the file's layers would silently run fewer."""
    layers = set()
    for t in tensors:
        m = _BLK.match(t)
        if m:
            layers.add(int(m.group(1)))
    if len(layers) != n_layer or (layers and (min(layers) != 0 or max(layers) != n_layer - 1)):
        have = f"blk.0 .. blk.{max(layers)} ({len(layers)} layers)" if layers else "no blk.N tensors"
        raise GGQError(f"{where}: {arch}.block_count is {n_layer} but the file has {have}")


#: tokenizer.ggml.* keys holding a token id
_TOKEN_ID_KEYS = tuple(v for k, v in vars(gguf.Keys.Tokenizer).items() if k.endswith("_ID")) + (
    "tokenizer.ggml.cls_token_id",)


def check_vocab(md: dict, arch: str, n_vocab: int, where: str) -> None:
    """GGQError unless the vocabulary agrees with ``token_embd.weight``'s ``n_vocab`` rows: the
    ``tokenizer.ggml.tokens`` / ``scores`` / ``token_type`` arrays (when present) have ``n_vocab``
    entries (llama.cpp sizes token_embd by the token count), ``{arch}.vocab_size`` (when present)
    equals it, and every special token id is an integer in range (the sampler and decoder index
    the token arrays with them)."""
    from ggq.runtime.tokenizer import check_vocab_array

    for key, kind in (("tokenizer.ggml.tokens", str), ("tokenizer.ggml.scores", (int, float)),
                      ("tokenizer.ggml.token_type", int)):
        v = md.get(key)
        if v is None:
            continue
        if not isinstance(v, list):
            raise GGQError(f"{where}: {key} is not an array")
        if len(v) != n_vocab:
            raise GGQError(f"{where}: {key} has {len(v)} entries but token_embd.weight has {n_vocab} rows")
        check_vocab_array(md, key, kind, n_vocab, where)
    check_vocab_array(md, "tokenizer.ggml.merges", str, None, where)
    vs = md.get(f"{arch}.vocab_size")
    if vs is not None and vs != n_vocab:
        raise GGQError(f"{where}: {arch}.vocab_size is {show(vs)} but token_embd.weight has {n_vocab} rows")
    for k in _TOKEN_ID_KEYS:
        v = md.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n_vocab:
            raise GGQError(f"{where}: {k} = {show(v)} is not a token id (0 .. {n_vocab - 1})")


class _Fused:
    """Matrices with the same type and row length stacked into one (Q|K|V, gate|up), so one
    parallel region computes them all and the rows split evenly over the threads."""

    def __init__(self, *parts):
        self.parts = parts
        self.name = "+".join(p.name for p in parts)
        self.qtype = parts[0].qtype
        self.n_cols = parts[0].n_cols
        self.n_rows = sum(p.n_rows for p in parts)


def _fusable(*ts) -> bool:
    from ggq.runtime.kernels.repack import FAM_N4, FAMILY_OF, G

    t0 = ts[0]
    return (t0.qtype in FAMILY_OF and FAMILY_OF[t0.qtype] >= FAM_N4
            and all(t.qtype == t0.qtype and t.n_cols == t0.n_cols and t.n_rows % G == 0 for t in ts))

