"""A Hugging Face checkpoint of a real model's shape with random weights, for speed measurements.

    python tools/synthetic_checkpoint.py qwen3-0.6b OUT_DIR [--tokenizer DIR]

Shapes (``SHAPES``) are those of public models; weights are seeded normal draws (scaled so that
activations stay finite), stored in bfloat16 like the originals. The tokenizer is copied from
``--tokenizer`` (default: the SmolLM2 checkpoint the tests build under ``.cache/tests/smollm2-hf``);
the config's ``vocab_size`` keeps the original's, so ids past the tokenizer's are padding in the
GGUF. Speed depends on shapes and types only, so these stand in for the real weights, which this
machine cannot download.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: name -> (architecture, config class, config values)
SHAPES = {
    "qwen3-0.6b": ("Qwen3ForCausalLM", "Qwen3Config", dict(
        hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
        head_dim=128, vocab_size=151936, max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=True)),
    # the issue-11 "real size" llama: hidden 2048, 24 layers (1.56 B parameters with this vocabulary;
    # Q4_K_M ~0.95 GB, Q8_0 ~1.66 GB)
    "llama-1.5b": ("LlamaForCausalLM", "LlamaConfig", dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=8,
        vocab_size=49152, max_position_embeddings=8192, rope_theta=5e5, rms_norm_eps=1e-5,
        tie_word_embeddings=True)),
    "qwen2.5-0.5b": ("Qwen2ForCausalLM", "Qwen2Config", dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
        vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
        tie_word_embeddings=True)),
}


def build(name: str, out: Path, tokenizer: Path, seed: int = 0) -> Path:
    """Write the random checkpoint ``name`` into ``out`` (idempotent: kept if ``out`` has weights)."""
    import torch
    import transformers

    out = Path(out)
    if (out / "model.safetensors").exists():
        return out
    arch, cfg_cls, values = SHAPES[name]
    cfg = getattr(transformers, cfg_cls)(**values, bos_token_id=1, eos_token_id=2)
    cfg.architectures = [arch]
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = getattr(transformers, arch)(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (tokenizer / f).exists():
            shutil.copy(tokenizer / f, tmp / f)
    tmp.rename(out)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path)
    ap.add_argument("--tokenizer", type=Path, default=REPO / ".cache" / "tests" / "smollm2-hf")
    a = ap.parse_args(argv)
    print(build(a.shape, a.out, a.tokenizer))


if __name__ == "__main__":
    main()
