"""Make real GPTQ and AWQ checkpoints of SmolLM2-135M-Instruct on this CPU with gptqmodel.

gptqmodel declares a newer torch than this machine has, so it lives in its own virtual
environment, never in the project's venv:

    python3.11 -m venv VENV                       # no --system-site-packages
    VENV/bin/pip install torch==2.13.0 transformers==5.23.0 accelerate numpy safetensors \\
        threadpoolctl packaging device-smi protobuf pillow requests pypcre tokenicer logbar \\
        jinja2 datasets pyarrow dill torchao defuser sentencepiece
    VENV/bin/pip install --no-deps gptqmodel==7.7.0
    GPTQMODEL_CPU_WORKERS=2 VENV/bin/python tools/make_gptq_awq.py SRC OUT [gptq|awq|gptq-act ...]
    VENV/bin/python tools/make_gptq_awq.py reference OUT/smollm2-gptq OUT/smollm2-awq

``SRC`` is a float SmolLM2 checkpoint (``tools/smollm2_checkpoint.py`` builds one); ``OUT`` gets
``smollm2-gptq`` (4-bit, symmetric, group 64, no act-order: maps to Q4_0 losslessly),
``smollm2-awq`` (4-bit GEMM, asymmetric, group 64: maps to Q4_1) and optionally
``smollm2-gptq-act`` (act-order: requantized on import). Group 64 because SmolLM2's hidden
size 576 is not a multiple of 128. Calibration text: the first lines of wikitext-2's test set
(``../shared/data/wikitext-2-raw/wiki.test.raw``). Each takes about 3 minutes on 2 cores.
``tests/test_quantized_import.py`` uses these folders when they exist under
``.cache/tests/`` (skipped otherwise).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WIKI = Path(os.environ.get("GGQ_SHARED", REPO.parent / "shared")) / "data" / "wikitext-2-raw" / "wiki.test.raw"


def calibration(n: int = 128, min_chars: int = 200) -> list[str]:
    """``n`` non-heading wikitext-2 paragraphs of at least ``min_chars`` characters."""
    out = []
    for line in WIKI.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if len(line) >= min_chars and not line.startswith("="):
            out.append(line[:2000])
            if len(out) == n:
                break
    return out


def make(src: Path, out: Path, kind: str) -> Path:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    from gptqmodel import AWQConfig, GPTQConfig, GPTQModel

    if kind == "gptq":
        cfg = GPTQConfig(bits=4, group_size=64, sym=True, desc_act=False)
    elif kind == "gptq-act":
        cfg = GPTQConfig(bits=4, group_size=64, sym=True, desc_act=True)
    elif kind == "gptq8":
        cfg = GPTQConfig(bits=8, group_size=64, sym=True, desc_act=False)
    elif kind == "awq":
        cfg = AWQConfig(bits=4, group_size=64, sym=False)
    else:
        raise SystemExit(f"unknown kind {kind!r}")
    target = out / f"smollm2-{kind}"
    if (target / "config.json").exists():
        print(f"{target} exists")
        return target
    t0 = time.time()
    model = GPTQModel.load(str(src), cfg)  # no device= (the CPU is chosen by itself)
    model.quantize(calibration(), batch_size=1)
    tmp = target.with_name(target.name + ".tmp")
    model.save(str(tmp))
    tmp.rename(target)
    print(f"{target}: {time.time() - t0:.0f} s")
    return target


def reference(ckpt: Path) -> Path:
    """Write ``<ckpt>.reference.safetensors`` (beside the folder, not in it): every quantized linear's weight (out, in) as
    gptqmodel itself dequantizes it (its torch kernels' ``dequantize_weight``), for the tests."""
    import torch
    from gptqmodel import BACKEND, GPTQModel
    from safetensors.torch import save_file

    target = ckpt.with_name(ckpt.name + ".reference.safetensors")
    if target.exists():
        return target
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    ref = {}
    if qc["quant_method"] == "awq":  # gptqmodel's own AWQ-GEMM dequantization, on the stored tensors
        from gptqmodel.quantization.awq.utils.packing_utils import dequantize_gemm
        from safetensors.torch import load_file

        sd = load_file(str(ckpt / "model.safetensors"))
        for k in [k for k in sd if k.endswith(".qweight")]:
            p = k[: -len(".qweight")]
            w = dequantize_gemm(sd[k], sd[p + ".qzeros"], sd[p + ".scales"], qc["bits"], qc["group_size"])
            ref[p + ".weight"] = w.T.float().contiguous()
            ref[p + ".weight_dtype"] = torch.tensor([{torch.float16: 16, torch.bfloat16: 17}.get(w.dtype, 32)])
        save_file(ref, str(target))
        print(f"{target}: {len(ref) // 2} tensors")
        return target
    model = GPTQModel.load(str(ckpt), backend=BACKEND.GPTQ_TORCH)
    with torch.no_grad():
        for name, mod in model.model.named_modules():
            if hasattr(mod, "dequantize_weight") and hasattr(mod, "qweight"):
                w = mod.dequantize_weight()
                if tuple(w.shape) == (mod.in_features, mod.out_features):
                    w = w.T  # torch kernels return (in, out); square layers are transposed too
                ref[f"{name}.weight"] = w.float().contiguous().cpu()
                ref[f"{name}.weight_dtype"] = torch.tensor([{torch.float16: 16, torch.bfloat16: 17}.get(w.dtype, 32)])
    save_file(ref, str(target))
    print(f"{target}: {len(ref) // 2} tensors, dequantized in {set(int(v) for k, v in ref.items() if k.endswith('_dtype'))}")
    return target


def main(argv: list[str]) -> int:
    if len(argv) >= 3 and argv[1] == "reference":
        for p in argv[2:]:
            reference(Path(p))
        return 0
    if len(argv) < 3:
        print(__doc__)
        return 2
    src, out = Path(argv[1]), Path(argv[2])
    out.mkdir(parents=True, exist_ok=True)
    for kind in argv[3:] or ["gptq", "awq"]:
        make(src, out, kind)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
