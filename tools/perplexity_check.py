"""Agreement check: ggq's perplexity against llama.cpp's on the same GGUF files and the same tokens.

llama.cpp's number is ggq's own llama-perplexity algorithm (``ggq.perplexity.compute_perplexity``)
fed with llama.cpp's logits through llama-cpp-python (:class:`LlamaCppModel`), so both sides score
identical token ids; the check also reports whether llama.cpp's own tokenizer gives those ids.

    python tools/perplexity_check.py [--chunks 20] [--ctx 512] [--types Q8_0,Q4_K_M] [--tol 0.005]

Files: SmolLM2-135M-Instruct converted by llama.cpp's converter (Q8_0) and quantized by
``llama_model_quantize`` from its F16 (Q4_K_M), cached under ``.cache/tests/perplexity``.
Exit status 1 when a relative difference exceeds ``--tol``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))

WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


class LlamaCppModel:
    """llama.cpp (``llama_cpp.Llama``) behind the interface of ``ggq.runtime.model.Model``.

    ``eval(tokens, all_logits=False)`` appends to the KV cache and returns float32 ``(n_vocab,)``
    or ``(len(tokens), n_vocab)`` logits; ``reset()``, ``truncate(n_past)``, ``metadata``,
    ``n_vocab``, ``n_ctx``, ``n_past`` as in ggq's Model.
    """

    def __init__(self, llm, metadata: dict):
        self.llm = llm
        self.metadata = metadata
        self.n_vocab = llm.n_vocab()
        self.n_ctx = llm.n_ctx()

    @classmethod
    def load(cls, path, n_ctx=None, n_threads=None):
        import llama_cpp

        from ggq.runtime.tokenizer import read_metadata

        n_ctx = n_ctx or 512
        llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                              n_threads=n_threads or 2, n_threads_batch=n_threads or 2,
                              verbose=False, n_gpu_layers=0, logits_all=True)
        return cls(llm, read_metadata(path))

    @property
    def n_past(self) -> int:
        return self.llm.n_tokens

    def reset(self) -> None:
        self.llm.reset()

    def truncate(self, n_past: int) -> None:
        self.llm.n_tokens = min(self.llm.n_tokens, int(n_past))

    def eval(self, tokens, all_logits: bool = False) -> np.ndarray:
        start = self.llm.n_tokens
        self.llm.eval([int(t) for t in tokens])
        lg = np.array(self.llm.scores[start: self.llm.n_tokens], dtype=np.float32)
        return lg if all_logits else lg[-1]


def smollm2_files(types, cache: Path | None = None) -> dict[str, Path]:
    """llama.cpp-made SmolLM2 GGUFs of ``types`` (``F16``/``Q8_0`` by its converter, others by its
    quantizer from the F16), built once under ``<cache>/perplexity``."""
    from llamacpp_ref import DEFAULT_CACHE, convert_hf, quantize_file
    from smollm2_checkpoint import build_checkpoint, fetch_gguf

    cache = Path(cache or DEFAULT_CACHE)
    hf = build_checkpoint(cache / "smollm2-hf", fetch_gguf(cache / "smollm2-gguf"))
    d = cache / "perplexity"
    d.mkdir(parents=True, exist_ok=True)
    out = {}
    f16 = d / "smollm2-llamacpp-F16.gguf"
    for t in types:
        p = d / f"smollm2-llamacpp-{t}.gguf"
        if not p.exists():
            if t in ("F16", "Q8_0"):
                convert_hf(hf, p, t.lower())
            else:
                if not f16.exists():
                    convert_hf(hf, f16, "f16")
                quantize_file(f16, p, t)
        out[t] = p
    return out


def check_tokens(model_path: Path, text: str, tokens) -> bool:
    """True if llama.cpp's tokenizer gives exactly ``tokens`` for the whole ``text`` (add BOS, no special
    parsing), i.e. ggq's tokens are llama-perplexity's."""
    import llama_cpp

    llm = llama_cpp.Llama(str(model_path), vocab_only=True, verbose=False)
    ref = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    return list(ref) == list(tokens)


def compare(path: Path, text_path: Path, n_ctx: int, n_chunks: int, n_threads: int | None = None,
            progress: bool = False) -> dict:
    """Perplexity of one file by ggq's runtime and by llama.cpp -> dict with both, and seconds."""
    from ggq.perplexity import run

    t0 = time.perf_counter()
    ref = run(path, text_path, n_ctx=n_ctx, n_chunks=n_chunks, n_threads=n_threads, progress=progress,
              load_model=LlamaCppModel.load)
    t1 = time.perf_counter()
    ours = run(path, text_path, n_ctx=n_ctx, n_chunks=n_chunks, n_threads=n_threads, progress=progress)
    t2 = time.perf_counter()
    return {"llamacpp": ref.ppl, "llamacpp_err": ref.ppl_error, "ggq": ours.ppl, "ggq_err": ours.ppl_error,
            "rel": ours.ppl / ref.ppl - 1, "s_llamacpp": t1 - t0, "s_ggq": t2 - t1, "count": ours.count}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", type=Path, default=WIKITEXT)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--types", default="Q8_0,Q4_K_M")
    ap.add_argument("--tol", type=float, default=0.005)
    ap.add_argument("-t", "--threads", type=int, default=None)
    a = ap.parse_args(argv)

    from ggq.perplexity import chunk_tokens, tokenize_text
    from ggq.runtime.tokenizer import Tokenizer

    files = smollm2_files(a.types.split(","))
    text = a.text.read_text(encoding="utf-8", errors="replace")
    worst = 0.0
    print(f"{a.chunks} chunks of {a.ctx} tokens from {a.text.name}")
    for t, p in files.items():
        tok = Tokenizer.from_gguf(p)
        toks = tokenize_text(tok, text)
        chunk_tokens(toks, a.ctx, a.chunks)  # fails early on a short text
        same = check_tokens(p, text, toks)
        r = compare(p, a.text, a.ctx, a.chunks, a.threads, progress=True)
        worst = max(worst, abs(r["rel"]))
        print(f"{t:7s} llama.cpp PPL {r['llamacpp']:.4f} ± {r['llamacpp_err']:.4f}  ggq PPL {r['ggq']:.4f} "
              f"± {r['ggq_err']:.4f}  diff {100 * r['rel']:+.3f}%  tokens identical to llama.cpp's: {same}  "
              f"time ggq/llama.cpp {r['s_ggq'] / r['s_llamacpp']:.2f}x")
    ok = worst <= a.tol
    print(f"worst relative difference {100 * worst:.3f}% (tolerance {100 * a.tol:.2f}%): {'OK' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
