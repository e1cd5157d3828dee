"""Next-token sampling with llama.cpp's semantics and defaults.

The chain is the one llama.cpp's ``common_sampler_init`` (common/sampling.cpp) builds by default,
each step as in src/llama-sampler.cpp:

1. penalties over the last ``repeat_last_n`` accepted tokens (prompt and generated): a logit
   ``l`` of a token seen ``c`` times becomes ``l * r`` if ``l <= 0`` else ``l / r`` (``r`` =
   ``repeat_penalty``), then ``- c * frequency_penalty - presence_penalty``;
2. top-k: keep the ``top_k`` largest logits (``<= 0``: keep all);
3. top-p: softmax over the survivors, keep the smallest best-first prefix whose probability mass
   reaches ``top_p`` (``>= 1``: off);
4. min-p: keep tokens with ``p >= min_p * p_max``, i.e. ``logit >= max_logit + ln(min_p)``
   (``<= 0``: off);
5. temperature: ``logit / temp``; ``temp <= 0`` keeps only the largest logit (greedy);
6. dist: draw from the softmax of what is left with the seeded generator.

Defaults are llama.cpp's (``common_params_sampling``): temp 0.8, top_k 40, top_p 0.95,
min_p 0.05, repeat_penalty 1.0 (off), repeat_last_n 64, random seed. The random stream is numpy's
PCG64, so a seed reproduces ggq's own runs, not llama.cpp's (which uses mt19937).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

import numpy as np


@dataclass
class SamplerParams:
    """Sampling options; field names follow llama.cpp's CLI flags."""

    temp: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None  # None or negative: random
    min_keep: int = 0


class Sampler:
    """Stateful sampler: :meth:`accept` feeds the penalty window, :meth:`sample` draws a token.

    ``logits``: float32 ``(n_vocab,)`` raw scores from the model.
    """

    def __init__(self, params: SamplerParams | None = None, **kw):
        self.params = params if params is not None else SamplerParams(**kw)
        p = self.params
        seed = p.seed if p.seed is not None and p.seed >= 0 else None
        self.rng = np.random.default_rng(seed)
        self.history: deque[int] = deque(maxlen=max(0, p.repeat_last_n)) if p.repeat_last_n >= 0 else deque()
        self._penalty_on = p.repeat_last_n != 0 and (
            p.repeat_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0)

    def reset(self) -> None:
        """Forget the penalty window (the random stream continues)."""
        self.history.clear()

    def accept(self, token: int) -> None:
        """Record a token (prompt or generated) for the repeat penalty."""
        if self._penalty_on:
            self.history.append(int(token))

    def accept_many(self, tokens) -> None:
        for t in tokens:
            self.accept(t)

    def apply_penalties(self, logits: np.ndarray) -> np.ndarray:
        """Copy of ``logits`` (float32) with the repeat/frequency/presence penalties applied."""
        x = np.array(logits, dtype=np.float32, copy=True)
        if not self._penalty_on or not self.history:
            return x
        p = self.params
        counts = Counter(self.history)
        ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
        c = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
        v = x[ids]
        v = np.where(v <= 0, v * np.float32(p.repeat_penalty), v / np.float32(p.repeat_penalty))
        v = v - c * np.float32(p.frequency_penalty) - np.float32(p.presence_penalty)
        x[ids] = v.astype(np.float32)
        return x

    def candidates(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The distribution ``dist`` draws from: ``(ids int64 (m,), probs float64 (m,))``, best first.

        With ``temp <= 0`` this is the single argmax token (first one on ties) with probability 1.
        """
        p = self.params
        x = self.apply_penalties(logits)
        if p.temp <= 0:
            return np.array([int(np.argmax(x))]), np.array([1.0])
        n = x.shape[0]
        # top-k (sorted best first; llama.cpp sorts here too)
        k = n if p.top_k <= 0 else min(p.top_k, n)
        if k < n:
            ids = _top_k_ids(x, k)
        else:
            ids = np.arange(n)
        ids = ids[np.argsort(-x[ids], kind="stable")]
        lg = x[ids].astype(np.float64)
        # top-p
        if p.top_p < 1.0:
            pr = np.exp(lg - lg[0])
            pr /= pr.sum()
            cum = np.cumsum(pr)
            need = np.nonzero((cum >= p.top_p) & (np.arange(1, len(cum) + 1) >= p.min_keep))[0]
            last = int(need[0]) + 1 if len(need) else len(cum)
            ids, lg = ids[:last], lg[:last]
        # min-p
        if p.min_p > 0.0:
            keep = lg >= lg[0] + np.log(p.min_p)
            if keep.sum() >= max(1, p.min_keep):
                ids, lg = ids[keep], lg[keep]
        # temperature + softmax
        lg = lg / p.temp
        pr = np.exp(lg - lg.max())
        return ids, pr / pr.sum()

    def sample(self, logits: np.ndarray) -> int:
        """Draw the next token id from ``logits`` (not recorded: call :meth:`accept` with it)."""
        ids, pr = self.candidates(logits)
        if len(ids) == 1:
            return int(ids[0])
        u = self.rng.random()
        i = int(np.searchsorted(np.cumsum(pr), u, side="right"))
        return int(ids[min(i, len(ids) - 1)])


def _top_k_ids(x: np.ndarray, k: int) -> np.ndarray:
    """The ids of the ``k`` largest values of ``x`` (float32 (n,), 0 < k < n), in no order; ties at
    the k-th value broken arbitrarily (as ``np.argpartition``). Exact and faster on a vocabulary:
    when at least k values lie within 8 of the maximum (the usual case for logits), only those
    are partitioned (one comparison pass instead of a partition of all n), else all of ``x``."""
    m = x.max()
    if np.isfinite(m):  # -inf (banned, masked) values are never near; a NaN maximum takes the full path
        near = np.flatnonzero(x >= m - np.float32(8.0))
        if k <= near.shape[0] < x.shape[0] // 4:
            return near[np.argpartition(-x[near], k - 1)[:k]]
    return np.argpartition(-x, k - 1)[:k]

