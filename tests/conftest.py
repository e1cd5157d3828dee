"""Shared fixtures: paths to ../shared data and optional heavy dependencies."""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    return CACHE
