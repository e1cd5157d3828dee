"""Bad input to `ggq convert` / `ggq info`: one-line errors, non-zero exit, no partial output."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from click.testing import CliRunner

from ggq.cli import main


def run(*args, env=None):
    r = CliRunner().invoke(main, [str(a) for a in args], env=env)
    return r


def assert_clean_error(r, *needles, out_dir: Path | None = None):
    assert r.exit_code == 1, (r.exit_code, r.output, r.exception)
    assert isinstance(r.exception, SystemExit), r.exception
    text = r.output.split("\r")[-1].strip()  # a progress bar may precede the error on the same line
    assert text.startswith("ggq: error: "), text
    assert "\n" not in text and "Traceback" not in text, text
    for n in needles:
        assert n in text, (n, text)
    if out_dir is not None:
        assert not [p for p in out_dir.iterdir() if p.suffix in (".gguf", ".tmp") or p.name.endswith(".tmp")], list(out_dir.iterdir())


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


def test_missing_config(ckpt, out_dir):
    (ckpt / "config.json").unlink()
    assert_clean_error(run("convert", ckpt, "-o", out_dir / "x.gguf"), "config.json", out_dir=out_dir)


def test_invalid_config(ckpt, out_dir):
    (ckpt / "config.json").write_text("{not json")
    assert_clean_error(run("convert", ckpt, "-o", out_dir / "x.gguf"), "config.json", "invalid JSON", out_dir=out_dir)


def test_unsupported_architecture(ckpt, out_dir):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(run("convert", ckpt, "-o", out_dir / "x.gguf"), "GPT2LMHeadModel", "LlamaForCausalLM",
                       "Qwen2ForCausalLM", out_dir=out_dir)


def test_missing_tokenizer(ckpt, out_dir):
    (ckpt / "tokenizer.model").unlink()
    assert_clean_error(run("convert", ckpt, "-o", out_dir / "x.gguf"), "tokenizer", out_dir=out_dir)


def test_truncated_safetensors(ckpt, out_dir):
    p = ckpt / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    assert_clean_error(run("convert", ckpt, "-o", out_dir / "x.gguf"), "model.safetensors", "truncated", out_dir=out_dir)


def test_corrupt_safetensors_header(ckpt, out_dir):
    p = ckpt / "model.safetensors"
    data = bytearray(p.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8:8 + n] = b"{" + b"x" * (n - 1)
    p.write_bytes(bytes(data))
    assert_clean_error(run("convert", ckpt, "-o", out_dir / "x.gguf"), "model.safetensors", "corrupt", out_dir=out_dir)


def test_no_weights(ckpt, out_dir):
    (ckpt / "model.safetensors").unlink()
    assert_clean_error(run("convert", ckpt, "-o", out_dir / "x.gguf"), "no weights", out_dir=out_dir)


def test_unknown_type(ckpt, out_dir):
    assert_clean_error(run("convert", ckpt, "--type", "Q7_X", "-o", out_dir / "x.gguf"), "Q7_X", "Q8_0", out_dir=out_dir)


def test_existing_output_needs_force(ckpt, out_dir):
    out = out_dir / "x.gguf"
    out.write_bytes(b"keep me")
    assert_clean_error(run("convert", ckpt, "-o", out), "exists", "--force")
    assert out.read_bytes() == b"keep me"
    r = run("convert", ckpt, "-o", out, "--force")
    assert r.exit_code == 0, r.output
    assert out.read_bytes()[:4] == b"GGUF"


def test_missing_source_and_offline_hub(out_dir):
    assert_clean_error(run("convert", out_dir / "nope", "-o", out_dir / "x.gguf"), "nope")
    r = run("convert", "some-org/some-model", "-o", out_dir / "x.gguf", env={"HF_HUB_OFFLINE": "1"})
    assert_clean_error(r, "some-org/some-model", "hub", out_dir=out_dir)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError(28, "No space left on device")])
def test_interrupted_or_failed_write_leaves_nothing(ckpt, out_dir, monkeypatch, exc):
    import gguf

    calls = {"n": 0}
    real = gguf.GGUFWriter.write_tensor_data

    def flaky(self, tensor, *a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise exc
        return real(self, tensor, *a, **k)

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", flaky)
    r = run("convert", ckpt, "-o", out_dir / "x.gguf")
    assert r.exit_code != 0
    if isinstance(exc, OSError):
        assert_clean_error(r, "x.gguf", "write failed")
    assert list(out_dir.iterdir()) == []


def test_info_errors(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 100)
    assert_clean_error(run("info", bad), "bad.gguf", "not a GGUF")
    trunc = tmp_path / "trunc.gguf"
    trunc.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 5, 10))
    assert_clean_error(run("info", trunc), "trunc.gguf")
    assert_clean_error(run("info", tmp_path / "missing.gguf"), "missing.gguf")
