"""SmolLM2-135M -> Q4_K_M end to end: ggq vs llama.cpp, wall time and peak RSS, one run each.

* ggq: ``ggq.convert.pipeline.convert(HF folder, out, qtype="Q4_K_M")`` -- one streaming pass
  from the safetensors checkpoint straight to the K-quant mix.
* llama.cpp: ``convert_hf_to_gguf.py --outtype f16`` (subprocess) then ``llama_model_quantize``
  (llama-quantize's library call, all cores) -- the usual two-step recipe.
* and the requantization step alone from llama.cpp's F16 file: ``ggq quantize`` (requantize) vs
  ``llama_model_quantize``.

Each side runs in its own fresh Python process; peak RSS is the larger of that process's and its
children's ``ru_maxrss``. Both outputs are checked to have the same tensor types, and their sizes are
printed. Timings on a shared machine are noisy; ratios are ggq / llama.cpp (lower is better).

    python tools/bench_q4km_pipeline.py [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
CACHE = Path(os.environ.get("GGQ_TEST_CACHE", REPO / ".cache" / "tests"))


def _peak_mib() -> float:
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(self_kb, child_kb) / 1024


def step_ggq(hf: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    from ggq.convert.pipeline import convert

    t_import = time.perf_counter() - t0
    t1 = time.perf_counter()
    convert(str(hf), out, qtype="Q4_K_M", force=True, progress=False)
    return {"total_s": time.perf_counter() - t0, "import_s": t_import, "convert_s": time.perf_counter() - t1,
            "peak_rss_mib": _peak_mib()}


def step_llamacpp(hf: Path, out: Path) -> dict:
    from llamacpp_ref import convert_hf, quantize_file

    t0 = time.perf_counter()
    f16 = out.with_name(out.stem + "-f16.gguf")
    convert_hf(hf, f16, "f16")
    t1 = time.perf_counter()
    quantize_file(f16, out, "Q4_K_M", nthread=os.cpu_count() or 2)
    t2 = time.perf_counter()
    f16.unlink()
    return {"total_s": t2 - t0, "convert_f16_s": t1 - t0, "quantize_s": t2 - t1, "peak_rss_mib": _peak_mib()}


def step_ggq_quantize(f16: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    from ggq.convert.requantize import requantize

    requantize(f16, out, "Q4_K_M", force=True, progress=False)
    return {"total_s": time.perf_counter() - t0, "peak_rss_mib": _peak_mib()}


def step_llamacpp_quantize(f16: Path, out: Path) -> dict:
    from llamacpp_ref import quantize_file

    t0 = time.perf_counter()
    quantize_file(f16, out, "Q4_K_M", nthread=os.cpu_count() or 2)
    return {"total_s": time.perf_counter() - t0, "peak_rss_mib": _peak_mib()}


STEPS = {"ggq": step_ggq, "llamacpp": step_llamacpp, "ggq_quantize": step_ggq_quantize,
         "llamacpp_quantize": step_llamacpp_quantize}


def _run(step: str, hf: Path, out: Path) -> dict:
    res = subprocess.run([sys.executable, __file__, "--step", step, "--hf", str(hf), "--out", str(out)],
                         capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _types(path: Path) -> dict:
    import gguf

    return {t.name: int(t.tensor_type) for t in gguf.GGUFReader(path).tensors}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--step", choices=list(STEPS))
    ap.add_argument("--hf", type=Path, default=CACHE / "smollm2-hf")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--keep", type=Path, default=None, help="write the two outputs here (default: a temp folder)")
    a = ap.parse_args()
    if a.step:
        r = STEPS[a.step](a.hf, a.out)
        print(json.dumps(r))
        return 0
    if not (a.hf / "config.json").exists():
        from smollm2_checkpoint import build_checkpoint, fetch_gguf

        build_checkpoint(a.hf, fetch_gguf(CACHE / "smollm2-gguf"))
    with tempfile.TemporaryDirectory(dir=a.keep) as tmp:
        d = Path(a.keep or tmp)
        d.mkdir(parents=True, exist_ok=True)
        og, ol = d / "ggq-Q4_K_M.gguf", d / "llamacpp-Q4_K_M.gguf"
        # warm the Numba cache first so the timed run measures steady-state ggq, not JIT compilation
        subprocess.run([sys.executable, "-c", "import numpy as np, ggq.quants as q; from gguf import "
                        "GGMLQuantizationType as T; [q.quantize(np.ones((2, 256), np.float32), t) for t in "
                        "(T.Q4_K, T.Q6_K, T.Q5_0, T.Q8_0, T.F16)]"], check=True)
        rl = _run("llamacpp", a.hf, ol)
        rg = _run("ggq", a.hf, og)
        same = _types(og) == _types(ol)
        # requantization alone, from llama.cpp's F16 file: ggq quantize vs llama-quantize
        from llamacpp_ref import convert_hf

        f16 = d / "llamacpp-f16.gguf"
        convert_hf(a.hf, f16, "f16")
        ql = _run("llamacpp_quantize", f16, d / "lq.gguf")
        qg = _run("ggq_quantize", f16, d / "gq.gguf")
        qsame = (d / "lq.gguf").read_bytes() == (d / "gq.gguf").read_bytes()
        print(f"SmolLM2-135M -> Q4_K_M ({os.cpu_count()} cores)")
        print(f"  llama.cpp convert f16 + quantize: {rl['total_s']:6.1f} s "
              f"(convert {rl['convert_f16_s']:.1f} s, quantize {rl['quantize_s']:.1f} s), "
              f"peak RSS {rl['peak_rss_mib']:.0f} MiB, {ol.stat().st_size / 2**20:.2f} MiB")
        print(f"  ggq convert --type Q4_K_M:        {rg['total_s']:6.1f} s "
              f"(imports {rg['import_s']:.1f} s), peak RSS {rg['peak_rss_mib']:.0f} MiB, "
              f"{og.stat().st_size / 2**20:.2f} MiB")
        print(f"  ratio ggq/llama.cpp: time {rg['total_s'] / rl['total_s']:.2f}, "
              f"peak RSS {rg['peak_rss_mib'] / rl['peak_rss_mib']:.2f}; tensor types equal: {same}")
        print(f"  requantize F16 -> Q4_K_M: llama.cpp {ql['total_s']:.1f} s / {ql['peak_rss_mib']:.0f} MiB, "
              f"ggq {qg['total_s']:.1f} s / {qg['peak_rss_mib']:.0f} MiB; ratio time "
              f"{qg['total_s'] / ql['total_s']:.2f}, peak RSS {qg['peak_rss_mib'] / ql['peak_rss_mib']:.2f}; "
              f"files byte-identical: {qsame}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
