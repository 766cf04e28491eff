"""Shared fixtures: the real corpora beside the checkout, and a quiet environment for the CLI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CORPORA = REPO.parent / "shared" / "corpora"
SAMPLE = REPO / "data" / "sample"

# Progress bars off in tests; the CLI must behave the same without a terminal.
os.environ.setdefault("SOKHAN_PROGRESS", "0")
# Triton kernels run in Triton's CPU interpreter unless the caller chose otherwise (TRITON_INTERPRET=0 on a GPU):
# Triton reads this when a kernel is defined, so it is set here, before any test module imports a kernel file.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def corpora_dir() -> Path:
    """``../shared/corpora`` (real Persian, Chinese and English text); skips the test where it is absent."""
    if not (CORPORA / "README.md").exists():
        pytest.skip(f"real corpora not found at {CORPORA} (they sit beside the checkout in ../shared/corpora)")
    return CORPORA


@pytest.fixture
def sample_dir() -> Path:
    """The bundled sample corpus, ``data/sample``."""
    return SAMPLE
