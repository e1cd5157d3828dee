"""Measure the error table of specs/imports.md: bitsandbytes checkpoints of SmolLM2-135M-Instruct.

Quantizes the real SmolLM2 checkpoint of the tests (``.cache/tests/smollm2-hf``, loaded as bf16,
as published) with transformers' ``BitsAndBytesConfig`` (NF4, NF4 + double quantization, FP4, 8-bit)
into ``.cache/tests/bnb-smollm2/<kind>``, then for every quantized linear layer compares, against
bitsandbytes' own dequantization (``functional.dequantize_4bit`` / ``int8_vectorwise_dequant``):

* ggq's mapping (``TensorSource.native``, LLM.int8 -> Q8_0 only) and, for int8, the plain mapping
  ``d = fp16(SCB / 127)``, ``c = q`` (no multiple search);
* dequantize-then-quantize with ggq's quantizer, for each ggml type (rows regrouped 4 at a time,
  2304 weights, so that 256-weight K-quant blocks fit SmolLM2's 576-wide rows);
* the checkpoint itself against the bf16 weights it was made from (bitsandbytes' own error).

Prints a markdown table of relative RMS errors (``||x - ref|| / ||ref||`` over all layers).
FP8: compressed-tensors per-channel (FP8_DYNAMIC) and per-tensor schemes, and W8A8 int8 per-channel
(``tests/fp8_checkpoints.py``);
SmolLM2's 576-wide matrices do not tile into 128x128 blocks, so block scales are measured in the tests.
Usage: ``python tools/import_error_table.py [--kinds nf4,nf4-dq,fp4,int8,ct-fp8-channel,ct-fp8-tensor]``
(a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

FP8_KINDS = {"ct-fp8-channel": "FP8_DYNAMIC", "ct-fp8-tensor": "TENSOR", "ct-w8a8-channel": "W8A8"}
KINDS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    "nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
    "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"),
    "int8": dict(load_in_8bit=True),
}
TYPES_4BIT = ["Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0"]
BPW = {"Q4_0": 4.5, "Q4_1": 5.0, "Q4_K": 4.5, "Q5_0": 5.5, "Q5_1": 6.0, "Q5_K": 5.5, "Q6_K": 6.5625, "Q8_0": 8.5}


def build(src: Path, root: Path, kind: str) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    d = root / kind
    if kind in FP8_KINDS and not (d / "config.json").exists():
        import fp8_checkpoints as fc

        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, device_map="cpu")
        fc._ct(d, src, FP8_KINDS[kind], model)
    elif not (d / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16, device_map="cpu",
                                                     quantization_config=BitsAndBytesConfig(**KINDS[kind]))
        model.save_pretrained(d)
    return d


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kinds", default=",".join([*KINDS, *FP8_KINDS]))
    args = ap.parse_args()
    import torch
    from gguf import GGMLQuantizationType as T
    from safetensors.torch import load_file

    import bnb_checkpoints as bc
    from ggq import quants
    from ggq.convert.checkpoint import open_checkpoint
    from ggq.convert.quantized import prepare
    from ggq.convert.quantized.bnb import write_blocks

    src = REPO / ".cache" / "tests" / "smollm2-hf"
    root = REPO / ".cache" / "tests" / "bnb-smollm2"
    orig = load_file(str(src / "model.safetensors"))
    rows = []
    for kind in args.kinds.split(","):
        d = build(src, root, kind)
        if kind in FP8_KINDS:
            import fp8_checkpoints as fc

            ref = fc.reference_dequantize(d)
        else:
            ref = bc.bnb_dequantize(d)
        ck = open_checkpoint(d)
        prepare(ck)
        raw = load_file(str(d / "model.safetensors"))
        acc: dict[str, float] = {}
        total = 0.0

        def add(key, got, w, acc=acc):
            acc[key] = acc.get(key, 0.0) + float(((got.astype(np.float64) - w) ** 2).sum())

        for name, w in ref.items():
            w64 = w.astype(np.float64)
            total += float((w64 ** 2).sum())
            add("checkpoint vs bf16 original", orig[name].to(torch.bfloat16).float().numpy(), w64)
            assert np.array_equal(ck.tensors[name].load(), w), name
            if kind == "ct-w8a8-channel":
                add("ggq Q8_0 (codes kept)", quants.dequantize(ck.tensors[name].native("Q8_0"), T.Q8_0), w64)
                add("dequantize-then-quantize Q8_0", quants.dequantize(quants.quantize(w, T.Q8_0), T.Q8_0), w64)
            elif kind in FP8_KINDS:
                from ggq.convert.quantized.fp8 import fp8_to_q8_0

                add("ggq Q8_0 (FP8-aligned and max/k steps)", quants.dequantize(ck.tensors[name].native("Q8_0"), T.Q8_0), w64)
                p = name[: -len("weight")]
                v = raw[name].float().numpy()
                sc = raw[p + "weight_scale"].float().numpy()
                sc = np.broadcast_to(sc.reshape(-1, 1) if sc.size > 1 else sc.reshape(1, 1), w.shape)
                data, _ = fp8_to_q8_0(v, np.ascontiguousarray(sc, np.float32), w, aligned=False)
                add("Q8_0 max/k steps only (no FP8 alignment)", quants.dequantize(data, T.Q8_0), w64)
                add("dequantize-then-quantize Q8_0", quants.dequantize(quants.quantize(w, T.Q8_0), T.Q8_0), w64)
            elif kind == "int8":
                add("ggq Q8_0 (codes kept)", quants.dequantize(ck.tensors[name].native("Q8_0"), T.Q8_0), w64)
                q = raw[name].numpy()
                s = raw[name[: -len("weight")] + "SCB"].numpy().astype(np.float64) / 127
                d16 = np.repeat(s[:, None], q.shape[1] // 32, axis=1)  # float64: rounded to fp16 once
                add("Q8_0 d = fp16(SCB/127), c = q", quants.dequantize(write_blocks(T.Q8_0, q, d16), T.Q8_0), w64)
                add("dequantize-then-quantize Q8_0", quants.dequantize(quants.quantize(w, T.Q8_0), T.Q8_0), w64)
            else:
                flat = w.reshape(-1, 2304) if w.size % 2304 == 0 else w
                for t in TYPES_4BIT:
                    g = quants.dequantize(quants.quantize(flat, T[t]), T[t]).reshape(w.shape)
                    add(f"dequantize-then-quantize {t} ({BPW[t]} bpw)", g, w64)
        for key, e in acc.items():
            rows.append((kind, key, np.sqrt(e / total)))
        print(f"{kind}: {len(ref)} tensors", file=sys.stderr, flush=True)
    print("| checkpoint | GGUF | relative RMS error vs the checkpoint library's own dequantization |")
    print("| --- | --- | --- |")
    for kind, key, v in rows:
        print(f"| {kind} | {key} | {v:.3g} |")


if __name__ == "__main__":
    main()
