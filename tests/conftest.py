"""Shared test fixtures. Tests use tiny models built in code and real data from ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA_DIR = Path(
    os.environ.get("KDRAY_DATA_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared real data (GSM8K, Multi30k); tests that need it skip with the path they looked at."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"shared data not found at {DATA_DIR.resolve()} (set KDRAY_DATA_DIR)")
    return DATA_DIR
