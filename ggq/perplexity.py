"""Perplexity and KL divergence of a GGUF model on a text, with llama.cpp's ``llama-perplexity`` method.

Method (``perplexity()`` and ``kl_divergence()`` in llama.cpp's tools/perplexity/perplexity.cpp):

* the whole text is tokenized once, with the vocabulary's BOS (``add_special=True``, no parsing of
  special-token text);
* it needs at least ``2 * n_ctx`` tokens; it is cut into ``len // n_ctx`` chunks of ``n_ctx``
  tokens (``--chunks`` takes the first N);
* each chunk is evaluated from an empty KV cache, its first token replaced by BOS when the
  vocabulary adds BOS;
* only the second half is scored: the logits at positions ``first = n_ctx // 2 .. n_ctx - 2``
  predict tokens ``first + 1 .. n_ctx - 1`` (``n_ctx - 1 - first`` tokens per chunk);
* ``PPL = exp(mean nll)``, its error ``PPL * sqrt((mean(nll^2) - mean(nll)^2) / (count - 1))``.

``--save-logits`` writes the reference model's log-probabilities of the scored positions (format in
``specs/perplexity.md``: llama.cpp's 16-bit log-probability quantization in a self-describing file
that records the vocabulary size, a vocabulary hash and the token ids); ``--kl-base`` evaluates
another model on the same tokens and prints llama-perplexity's KL-divergence statistics.

The model object only needs ``eval(tokens, all_logits=True)``, ``reset()``, ``n_vocab`` (the
interface of :class:`ggq.runtime.model.Model`), so the same code scores llama.cpp's logits in the
agreement check (``tools/perplexity_check.py``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ggq.errors import GGQError, show

#: a base log-probability below this does not enter the KL sum (llama.cpp's threshold)
KL_LOGP_FLOOR = -16.0
MAGIC = b"GGQLOGP\0"
HEADER_SIZE = 4096
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------- tokens


def _exp(x: float) -> float:
    """``math.exp`` that overflows to infinity (a perplexity of a broken model is inf, as llama.cpp
    prints it) instead of raising OverflowError."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf

def vocab_hash(tokens) -> str:
    """sha256 (hex) of the vocabulary's token texts joined by NUL: identifies a vocabulary."""
    h = hashlib.sha256()
    for t in tokens:
        h.update(str(t).encode("utf-8", errors="surrogatepass"))
        h.update(b"\0")
    return h.hexdigest()


def tokenize_text(tok, text: str) -> list[int]:
    """Token ids of the whole text as llama-perplexity makes them: ``common_tokenize(ctx, text, true)``,
    i.e. with BOS when the vocabulary adds it and special-token text left as plain text."""
    return list(tok.encode(text, add_special=True, parse_special=False))


def chunk_tokens(tokens, n_ctx: int, n_chunks: int | None = None, source: str = "text") -> np.ndarray:
    """Cut ``tokens`` into ``(n_chunk, n_ctx)`` int32 chunks (``len // n_ctx`` of them, or the first
    ``n_chunks``). Raises :class:`GGQError` when there are fewer than ``2 * n_ctx`` tokens (llama.cpp's
    minimum) or ``n_ctx`` is below 4."""
    if n_ctx < 4:
        raise GGQError(f"--ctx {n_ctx}: the context must be at least 4 tokens")
    n = len(tokens)
    if n < 2 * n_ctx:
        raise GGQError(f"{source}: tokenizes to only {n} tokens; perplexity with a context of {n_ctx} "
                       f"needs at least {2 * n_ctx}")
    n_max = n // n_ctx
    n_chunk = n_max if n_chunks is None or n_chunks <= 0 else min(n_chunks, n_max)
    return np.asarray(tokens[: n_chunk * n_ctx], dtype=np.int32).reshape(n_chunk, n_ctx)


# ---------------------------------------------------------------------------------------- logits

def chunk_logits(model, chunk: np.ndarray, first: int, n_batch: int, bos_id: int | None) -> np.ndarray:
    """float32 ``(n_ctx - first, n_vocab)`` logits at positions ``first .. n_ctx - 1`` of one chunk.

    The KV cache is cleared, the chunk's first token replaced by ``bos_id`` (when not None) and the
    chunk evaluated in pieces of ``n_batch`` tokens, as llama-perplexity does.
    """
    toks = [int(t) for t in chunk]
    if bos_id is not None:
        toks[0] = int(bos_id)
    model.reset()
    out = []
    for s in range(0, len(toks), n_batch):
        piece = toks[s: s + n_batch]
        lg = model.eval(piece, all_logits=True)
        lg = np.asarray(lg, dtype=np.float32).reshape(len(piece), -1)
        if s + len(piece) > first:
            out.append(lg[max(0, first - s):])
    return np.concatenate(out, axis=0)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis of float32 ``(n, n_vocab)`` logits."""
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def quantize_logprobs(logits: np.ndarray):
    """llama.cpp's 16-bit log-probability code (``log_softmax`` with a ``uint16 *`` in perplexity.cpp).

    ``logits`` float32 ``(n, n_vocab)`` -> ``(scale float32 (n,), min_logp float32 (n,), q uint16
    (n, n_vocab))`` with ``log p[i] ~= scale * q[i] + min_logp``: values span ``[max - 16, max]`` of
    the logits in 65535 steps; anything lower gets code 0 (= ``min_logp``).
    """
    x = np.asarray(logits, dtype=np.float32)
    mx = x.max(axis=1)
    mn = np.maximum(x.min(axis=1), mx - 16.0)
    lse = np.log(np.exp((x - mx[:, None]).astype(np.float64)).sum(axis=1))
    min_logp = (mn - mx - lse).astype(np.float32)
    scale = ((mx - mn) / 65535.0).astype(np.float32)
    inv = np.where(scale > 0, 1.0 / np.where(scale > 0, scale, 1.0), 0.0).astype(np.float32)
    q = np.rint(inv[:, None] * (x - mn[:, None]))
    q = np.where(x > mn[:, None], q, 0.0)
    q = np.clip(q, 0, 65535).astype(np.uint16)
    return scale, min_logp, q


def dequantize_logprobs(scale: np.ndarray, min_logp: np.ndarray, q: np.ndarray) -> np.ndarray:
    """float32 ``(n, n_vocab)`` log-probabilities ``scale * q + min_logp`` (see :func:`quantize_logprobs`)."""
    return scale[:, None].astype(np.float32) * q.astype(np.float32) + min_logp[:, None].astype(np.float32)


# ---------------------------------------------------------------------------------------- logits file

@dataclass
class LogitsFile:
    """A ``--save-logits`` file opened for reading (memory-mapped); layout in specs/perplexity.md."""

    path: Path
    header: dict
    tokens: np.ndarray          # int32 (n_chunk, n_ctx)
    _mm: np.memmap = field(repr=False)

    @property
    def n_vocab(self) -> int:
        """Vocabulary size the log-probabilities were stored for."""
        return int(self.header["n_vocab"])

    @property
    def n_ctx(self) -> int:
        return int(self.header["n_ctx"])

    @property
    def n_chunk(self) -> int:
        return int(self.header["n_chunk"])

    @property
    def n_scored(self) -> int:
        return int(self.header["n_scored"])

    def chunk(self, i: int):
        """``(scale (n_scored,), min_logp (n_scored,), q uint16 (n_scored, n_vocab))`` of chunk ``i``."""
        ns, nv = self.n_scored, self.n_vocab
        size = _chunk_bytes(ns, nv)
        off = _data_offset(self.n_chunk, self.n_ctx) + i * size
        raw = self._mm[off: off + size]
        scale = raw[: 4 * ns].view(np.float32)
        min_logp = raw[4 * ns: 8 * ns].view(np.float32)
        q = raw[8 * ns:].view(np.uint16).reshape(ns, nv)
        return scale, min_logp, q

    @classmethod
    def open(cls, path) -> "LogitsFile":
        """Open and validate; :class:`GGQError` for a missing, foreign, truncated or inconsistent file."""
        path = Path(path)
        try:
            size = path.stat().st_size
            with open(path, "rb") as fh:
                head = fh.read(HEADER_SIZE)
        except OSError as e:
            raise GGQError(f"{path}: cannot read logits file: {e.strerror}") from e
        if len(head) < HEADER_SIZE or head[:8] != MAGIC:
            raise GGQError(f"{path}: not a ggq logits file (made with `ggq perplexity --save-logits`)")
        try:
            hlen = int(np.frombuffer(head[8:12], dtype="<u4")[0])
            header = json.loads(head[12: 12 + hlen].decode("utf-8"))
            if not isinstance(header, dict):
                raise ValueError("not a JSON object")
            n_vocab, n_ctx, n_chunk = int(header["n_vocab"]), int(header["n_ctx"]), int(header["n_chunk"])
            n_scored = int(header["n_scored"])
        except (ValueError, KeyError, TypeError, OverflowError, UnicodeDecodeError, RecursionError) as e:
            raise GGQError(f"{path}: corrupt logits file header ({show(str(e))})") from None
        if header.get("version") != FORMAT_VERSION:
            raise GGQError(f"{path}: unsupported logits file version {header.get('version')}")
        if n_scored != n_ctx - 1 - n_ctx // 2 or n_vocab <= 0 or n_chunk <= 0 or n_ctx < 2:
            raise GGQError(f"{path}: inconsistent logits file header (n_ctx {n_ctx}, n_scored {n_scored})")
        want = _data_offset(n_chunk, n_ctx) + n_chunk * _chunk_bytes(n_scored, n_vocab)
        if size != want:
            raise GGQError(f"{path}: logits file is {size} bytes, its header says {want} (truncated?)")
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        toks = mm[HEADER_SIZE: HEADER_SIZE + 4 * n_chunk * n_ctx].view(np.int32).reshape(n_chunk, n_ctx)
        if toks.min() < 0 or toks.max() >= n_vocab:
            raise GGQError(f"{path}: token ids outside the vocabulary of {n_vocab}")
        return cls(path, header, np.asarray(toks), mm)


def _chunk_bytes(n_scored: int, n_vocab: int) -> int:
    return 8 * n_scored + 2 * n_scored * n_vocab


def _data_offset(n_chunk: int, n_ctx: int) -> int:
    n = HEADER_SIZE + 4 * n_chunk * n_ctx
    return (n + 63) // 64 * 64


class LogitsWriter:
    """Writes a logits file chunk by chunk (header and all token ids first); atomic on close."""

    def __init__(self, path, chunks: np.ndarray, n_vocab: int, header: dict):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.part")  # as atomic_output: one per process
        n_chunk, n_ctx = chunks.shape
        self.header = dict(header, format="ggq-logprobs", version=FORMAT_VERSION, n_vocab=int(n_vocab),
                           n_ctx=int(n_ctx), n_chunk=int(n_chunk), first=n_ctx // 2,
                           n_scored=n_ctx - 1 - n_ctx // 2)
        blob = json.dumps(self.header).encode("utf-8")
        if 12 + len(blob) > HEADER_SIZE:
            raise GGQError(f"{path}: logits file header too long")
        try:
            self.fh = open(self.tmp, "wb")
        except OSError as e:
            raise GGQError(f"{path}: cannot write logits file: {e.strerror}") from e
        head = MAGIC + np.uint32(len(blob)).tobytes() + blob
        pad = _data_offset(n_chunk, n_ctx) - HEADER_SIZE - 4 * n_chunk * n_ctx
        self.n_written = 0
        try:
            self._write(head + b"\0" * (HEADER_SIZE - len(head)),
                        np.ascontiguousarray(chunks, dtype="<i4").tobytes(), b"\0" * pad)
        except BaseException:  # Ctrl-C while writing the header: no partial file left
            self.close(ok=False)
            raise

    def _write(self, *parts: bytes) -> None:
        try:
            for b in parts:
                self.fh.write(b)
        except OSError as e:  # disk full: no partial file left, one clear line
            self.close(ok=False)
            raise GGQError(f"{self.path}: write failed ({e.strerror or e})") from None

    def write_chunk(self, logits: np.ndarray) -> None:
        """Append one chunk: float32 logits ``(n_scored, n_vocab)`` of the scored positions."""
        scale, min_logp, q = quantize_logprobs(logits)
        self._write(scale.astype("<f4").tobytes(), min_logp.astype("<f4").tobytes(), q.astype("<u2").tobytes())
        self.n_written += 1

    def close(self, ok: bool = True) -> None:
        """Finish: rename the temporary file into place if ``ok`` and every chunk was written, else delete it."""
        try:
            if not self.fh.closed:
                self.fh.close()
            if ok and self.n_written == self.header["n_chunk"]:
                os.replace(self.tmp, self.path)
                return
        except OSError as e:
            self.tmp.unlink(missing_ok=True)
            raise GGQError(f"{self.path}: write failed ({e.strerror or e})") from None
        self.tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------- statistics

def _mean_and_uncertainty(s: float, s2: float, count: int):
    """llama.cpp's ``mean_and_uncertainty``: mean and standard error from a sum and a sum of squares."""
    if count < 1:
        return 0.0, 0.0
    f = s / count
    df = s2 / count - f * f
    df = math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0
    return f, df


def _percentile(sorted_values: np.ndarray, fraction: float) -> float:
    """llama.cpp's linear-interpolation percentile on sorted values."""
    v = sorted_values
    if fraction <= 0:
        return float(v[0])
    if fraction >= 1:
        return float(v[-1])
    p = fraction * (len(v) - 1)
    ip = int(p)
    p -= ip
    return float((1 - p) * v[ip] + p * v[min(ip + 1, len(v) - 1)])


def _median(sorted_values: np.ndarray) -> float:
    n = len(sorted_values)
    return float(0.5 * (sorted_values[n // 2] + sorted_values[n // 2 - 1]) if n % 2 == 0 else sorted_values[n // 2])


@dataclass
class PerplexityResult:
    """Perplexity over ``count`` scored tokens of ``n_chunk`` chunks."""

    n_ctx: int
    n_chunk: int
    count: int = 0
    sum_nll: float = 0.0
    sum_nll2: float = 0.0
    chunk_ppl: list = field(default_factory=list)   # running estimate after each chunk

    def add(self, nll: np.ndarray) -> None:
        """Accumulate float64 negative log-likelihoods (nats) of one chunk's scored tokens."""
        self.sum_nll += float(nll.sum())
        self.sum_nll2 += float((nll * nll).sum())
        self.count += len(nll)
        self.chunk_ppl.append(_exp(self.sum_nll / self.count))

    @property
    def ppl(self) -> float:
        """``exp(mean nll)`` over the scored tokens so far."""
        return _exp(self.sum_nll / self.count)

    @property
    def ppl_error(self) -> float:
        """Standard error of the PPL as llama.cpp's final estimate prints it (``nll2 * ppl``)."""
        m = self.sum_nll / self.count
        v = self.sum_nll2 / self.count - m * m
        return math.sqrt(v / (self.count - 1)) * self.ppl if v > 0 and self.count > 1 else float("nan")

    def report(self) -> str:
        """Two lines: what was scored, and llama.cpp's ``Final estimate: PPL = x +/- e``."""
        return (f"chunks {self.n_chunk}, n_ctx {self.n_ctx}, scored tokens {self.count}\n"
                f"Final estimate: PPL = {self.ppl:.4f} +/- {self.ppl_error:.5f}")


@dataclass
class KLResult:
    """Accumulated KL-divergence statistics of a model against a base (llama.cpp's kl_divergence_result)."""

    n_ctx: int
    n_chunk: int
    count: int = 0
    sum_nll: float = 0.0
    sum_nll2: float = 0.0
    sum_nll_base: float = 0.0
    sum_nll_base2: float = 0.0
    sum_nll_nll_base: float = 0.0
    sum_kld: float = 0.0
    sum_kld2: float = 0.0
    sum_p_diff: float = 0.0
    sum_p_diff2: float = 0.0
    sum_p_diff4: float = 0.0
    n_same_top: int = 0
    kld_values: list = field(default_factory=list)
    p_diff_values: list = field(default_factory=list)

    def add(self, logits: np.ndarray, base_chunk, targets: np.ndarray) -> None:
        """One chunk: float32 logits ``(n_scored, n_vocab)``, the base's quantized log-probs of the same
        positions (:meth:`LogitsFile.chunk`), int targets ``(n_scored,)``.

        Per position (llama.cpp's ``log_softmax(..., base_log_prob, tok, kld)``): nll of the target
        for both models, ``KL = sum_i p_base(i) * (log p_base(i) - log q(i))`` over base entries with
        ``log p_base > -16``, top-1 agreement, ``dp = q(target) - p_base(target)``.
        """
        scale, min_logp, q = base_chunk
        lq = log_softmax(logits)
        lb = dequantize_logprobs(scale, min_logp, q).astype(np.float64)
        rows = np.arange(len(targets))
        nll = -lq[rows, targets]
        nll_b = -lb[rows, targets]
        keep = lb > KL_LOGP_FLOOR
        pb = np.where(keep, np.exp(np.where(keep, lb, 0.0)), 0.0)
        kld = (pb * np.where(keep, lb - lq, 0.0)).sum(axis=1)
        same = np.argmax(logits, axis=1) == np.argmax(q, axis=1)
        p_diff = np.exp(-nll) - np.exp(-nll_b)
        self.count += len(targets)
        self.sum_nll += nll.sum()
        self.sum_nll2 += (nll * nll).sum()
        self.sum_nll_base += nll_b.sum()
        self.sum_nll_base2 += (nll_b * nll_b).sum()
        self.sum_nll_nll_base += (nll * nll_b).sum()
        self.sum_kld += kld.sum()
        self.sum_kld2 += (kld * kld).sum()
        self.sum_p_diff += p_diff.sum()
        self.sum_p_diff2 += (p_diff ** 2).sum()
        self.sum_p_diff4 += (p_diff ** 4).sum()
        self.n_same_top += int(same.sum())
        self.kld_values.append(kld.astype(np.float32))
        self.p_diff_values.append(p_diff.astype(np.float32))

    def _cov(self) -> float:
        if self.count < 10:
            return 0.0
        c = self.count
        return (self.sum_nll_nll_base / c - (self.sum_nll / c) * (self.sum_nll_base / c)) / (c - 1)

    def stats(self) -> dict:
        """All of llama-perplexity's KL-mode summary numbers (probabilities as fractions, not %)."""
        c = self.count
        lp, dlp = _mean_and_uncertainty(self.sum_nll, self.sum_nll2, c)
        lb, dlb = _mean_and_uncertainty(self.sum_nll_base, self.sum_nll_base2, c)
        cov = self._cov()
        ppl, ppl_b = _exp(lp), _exp(lb)
        ratio_unc = math.sqrt(max(dlp * dlp + dlb * dlb - 2 * cov, 0.0))
        ppl_unc, ppl_b_unc = ppl * dlp, ppl_b * dlb
        kl, dkl = _mean_and_uncertainty(self.sum_kld, self.sum_kld2, c)
        mse, dmse = _mean_and_uncertainty(self.sum_p_diff2, self.sum_p_diff4, c)
        rms = math.sqrt(mse)
        pd, dpd = _mean_and_uncertainty(self.sum_p_diff, self.sum_p_diff2, c)
        top = self.n_same_top / c
        kv = np.sort(np.concatenate(self.kld_values)) if self.kld_values else np.zeros(1, np.float32)
        pv = np.sort(np.concatenate(self.p_diff_values)) if self.p_diff_values else np.zeros(1, np.float32)
        return {
            "count": c, "ppl": ppl, "ppl_unc": ppl_unc, "ppl_base": ppl_b, "ppl_base_unc": ppl_b_unc,
            "cor": cov / (dlp * dlb) if dlp > 0 and dlb > 0 else float("nan"),
            "ln_ratio": lp - lb, "ln_ratio_unc": ratio_unc,
            "ratio": _exp(lp - lb), "ratio_unc": _exp(lp - lb) * ratio_unc,
            "diff": ppl - ppl_b,
            "diff_unc": math.sqrt(max(ppl_unc ** 2 + ppl_b_unc ** 2 - 2 * ppl * ppl_b * cov, 0.0)),
            "kld": kl, "kld_unc": dkl, "kld_max": float(kv[-1]), "kld_min": float(kv[0]),
            "kld_median": _median(kv),
            "kld_pct": {p: _percentile(kv, p / 100) for p in (99.9, 99.0, 95.0, 90.0, 10.0, 5.0, 1.0, 0.1)},
            "dp_mean": pd, "dp_mean_unc": dpd, "dp_max": float(pv[-1]), "dp_min": float(pv[0]),
            "dp_median": _median(pv),
            "dp_pct": {p: _percentile(pv, p / 100)
                       for p in (99.9, 99.0, 95.0, 90.0, 75.0, 25.0, 10.0, 5.0, 1.0, 0.1)},
            "dp_rms": rms, "dp_rms_unc": 0.5 / rms * dmse if rms > 0 else 0.0,
            "same_top": top, "same_top_unc": math.sqrt(top * (1 - top) / (c - 1)) if c > 1 else 0.0,
        }

    def report(self) -> str:
        """The three summary sections llama-perplexity prints in KL mode."""
        s = self.stats()
        L = ["====== Perplexity statistics ======",
             f"Mean PPL(Q)                   : {s['ppl']:10.6f} ± {s['ppl_unc']:10.6f}",
             f"Mean PPL(base)                : {s['ppl_base']:10.6f} ± {s['ppl_base_unc']:10.6f}",
             f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * s['cor']:6.2f}%",
             f"Mean ln(PPL(Q)/PPL(base))     : {s['ln_ratio']:10.6f} ± {s['ln_ratio_unc']:10.6f}",
             f"Mean PPL(Q)/PPL(base)         : {s['ratio']:10.6f} ± {s['ratio_unc']:10.6f}",
             f"Mean PPL(Q)-PPL(base)         : {s['diff']:10.6f} ± {s['diff_unc']:10.6f}",
             "",
             "====== KL divergence statistics ======",
             f"Mean    KLD: {s['kld']:10.6f} ± {s['kld_unc']:10.6f}",
             f"Maximum KLD: {s['kld_max']:10.6f}"]
        for p in (99.9, 99.0, 95.0, 90.0):
            L.append(f"{p:4.1f}%   KLD: {s['kld_pct'][p]:10.6f}")
        L.append(f"Median  KLD: {s['kld_median']:10.6f}")
        for p in (10.0, 5.0, 1.0, 0.1):
            L.append(f"{p:4.1f}%   KLD: {s['kld_pct'][p]:10.6f}")
        L += [f"Minimum KLD: {s['kld_min']:10.6f}", "",
              "====== Token probability statistics ======",
              f"Mean    Δp: {100 * s['dp_mean']:6.3f} ± {100 * s['dp_mean_unc']:5.3f} %",
              f"Maximum Δp: {100 * s['dp_max']:6.3f}%"]
        for p in (99.9, 99.0, 95.0, 90.0, 75.0):
            L.append(f"{p:4.1f}%   Δp: {100 * s['dp_pct'][p]:6.3f}%")
        L.append(f"Median  Δp: {100 * s['dp_median']:6.3f}%")
        for p in (25.0, 10.0, 5.0, 1.0, 0.1):
            L.append(f"{p:4.1f}%   Δp: {100 * s['dp_pct'][p]:6.3f}%")
        L += [f"Minimum Δp: {100 * s['dp_min']:6.3f}%",
              f"RMS Δp    : {100 * s['dp_rms']:6.3f} ± {100 * s['dp_rms_unc']:5.3f} %",
              f"Same top p: {100 * s['same_top']:6.3f} ± {100 * s['same_top_unc']:5.3f} %"]
        return "\n".join(L)


# ---------------------------------------------------------------------------------------- drivers

def _bar(total: int, progress: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, disable=not progress, desc=desc, unit="chunk", file=sys.stderr, dynamic_ncols=True)


def compute_perplexity(model, chunks: np.ndarray, bos_id: int | None, n_batch: int | None = None,
                       writer: LogitsWriter | None = None, progress: bool = False) -> PerplexityResult:
    """Perplexity of ``model`` over int32 ``chunks`` ``(n_chunk, n_ctx)`` (llama.cpp's ``perplexity()``).

    ``bos_id``: replaces each chunk's first token (None when the vocabulary adds no BOS).
    ``n_batch``: tokens per ``model.eval`` call (default ``n_ctx``). ``writer``: also store the scored
    positions' log-probabilities (``--save-logits``).
    """
    n_chunk, n_ctx = chunks.shape
    first = n_ctx // 2
    n_batch = min(n_batch or n_ctx, n_ctx)
    res = PerplexityResult(n_ctx=n_ctx, n_chunk=n_chunk)
    with _bar(n_chunk, progress, "perplexity") as bar:
        for chunk in chunks:
            lg = chunk_logits(model, chunk, first, n_batch, bos_id)[:-1]    # positions first .. n_ctx-2
            targets = chunk[first + 1:].astype(np.int64)
            lp = log_softmax(lg)
            res.add(-lp[np.arange(len(targets)), targets])
            if writer is not None:
                writer.write_chunk(lg)
            bar.update(1)
            bar.set_postfix_str(f"PPL {res.ppl:.4f}")
    return res


def compute_kl(model, base: LogitsFile, bos_id: int | None, n_chunks: int | None = None,
               n_batch: int | None = None, progress: bool = False) -> KLResult:
    """KL divergence of ``model`` against the base log-probabilities in ``base`` on its own tokens
    (llama.cpp's ``kl_divergence()``); ``n_chunks`` limits to the first N chunks."""
    n_ctx = base.n_ctx
    n_chunk = base.n_chunk if not n_chunks or n_chunks <= 0 else min(n_chunks, base.n_chunk)
    first = n_ctx // 2
    n_batch = min(n_batch or n_ctx, n_ctx)
    res = KLResult(n_ctx=n_ctx, n_chunk=n_chunk)
    with _bar(n_chunk, progress, "KL divergence") as bar:
        for i in range(n_chunk):
            chunk = base.tokens[i]
            lg = chunk_logits(model, chunk, first, n_batch, bos_id)[:-1]
            res.add(lg, base.chunk(i), chunk[first + 1:].astype(np.int64))
            s_nll = res.sum_nll / res.count
            s_kl = res.sum_kld / res.count
            bar.update(1)
            bar.set_postfix_str(f"PPL {_exp(s_nll):.4f} KLD {s_kl:.5f} top {100 * res.n_same_top / res.count:.2f}%")
    return res


def model_context_length(md: dict) -> int | None:
    """The training context ``<arch>.context_length`` from GGUF metadata, or None."""
    arch = md.get("general.architecture")
    v = md.get(f"{arch}.context_length")
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def run(model_path, text_path=None, n_ctx: int | None = None, n_chunks: int | None = None,
        n_batch: int | None = None, n_threads: int | None = None, save_logits=None, kl_base=None,
        progress: bool = True, load_model=None):
    """``ggq perplexity``: validate inputs (before loading weights), then compute.

    Returns a :class:`PerplexityResult` or, with ``kl_base``, a :class:`KLResult`. ``load_model``
    (tests/tools) replaces ``Model.load(path, n_ctx=..., n_threads=...)``. Raises :class:`GGQError`
    for a text shorter than ``2 * n_ctx`` tokens, a context longer than the model's, a logits file
    made with another vocabulary, or unreadable files.
    """
    from ggq.runtime.tokenizer import Tokenizer, read_metadata

    model_path = Path(model_path)
    md = read_metadata(model_path)
    tok = Tokenizer.from_metadata(md, source=str(model_path))
    if tok.add_eos:
        raise GGQError(f"{model_path}: the vocabulary adds EOS; llama-perplexity's method does not apply")
    bos_id = tok.bos_id if tok.add_bos else None
    base = None
    if kl_base is not None:
        base = LogitsFile.open(kl_base)
        if base.n_vocab != tok.n_vocab or base.header.get("vocab_sha256") != vocab_hash(tok.tokens):
            raise GGQError(f"{kl_base}: made with another vocabulary ({base.n_vocab} tokens, "
                           f"{model_path.name} has {tok.n_vocab})")
        if n_ctx is not None and n_ctx != base.n_ctx:
            raise GGQError(f"{kl_base}: computed with --ctx {base.n_ctx}, not {n_ctx}")
        n_ctx = base.n_ctx
    n_ctx = n_ctx or 512
    ctx_train = model_context_length(md)
    if ctx_train is not None and n_ctx > ctx_train:
        raise GGQError(f"{model_path}: --ctx {n_ctx} is longer than the model's context of {ctx_train} tokens")
    if n_batch is not None and n_batch <= 0:
        raise GGQError(f"--batch {n_batch}: must be positive")
    chunks = None
    if base is None:
        if text_path is None:
            raise GGQError("perplexity needs --text FILE (or --kl-base FILE)")
        try:
            text = Path(text_path).read_text(encoding="utf-8", errors="replace")
        except OSError as e:
            raise GGQError(f"{text_path}: cannot read: {e.strerror}") from e
        chunks = chunk_tokens(tokenize_text(tok, text), n_ctx, n_chunks, source=str(text_path))

    if load_model is None:
        from ggq.runtime.model import Model

        load_model = Model.load
    model = load_model(str(model_path), n_ctx=n_ctx, n_threads=n_threads)
    if int(model.n_vocab) != tok.n_vocab:
        raise GGQError(f"{model_path}: model has {model.n_vocab} logits for {tok.n_vocab} tokens")
    if base is not None:
        return compute_kl(model, base, bos_id, n_chunks=n_chunks, n_batch=n_batch, progress=progress)
    writer = None
    ok = False
    try:
        if save_logits is not None:
            writer = LogitsWriter(save_logits, chunks, tok.n_vocab,
                                  {"vocab_sha256": vocab_hash(tok.tokens), "model": model_path.name,
                                   "text": Path(text_path).name, "add_bos": bos_id is not None})
        res = compute_perplexity(model, chunks, bos_id, n_batch=n_batch, writer=writer, progress=progress)
        ok = True
    finally:
        if writer is not None:
            writer.close(ok)
    return res
