"""Fixtures of the edge tests; shared helpers live in edge_kit.py beside this file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# importlib mode puts no test directory on sys.path; the helpers module needs it.
sys.path.insert(0, str(Path(__file__).parent))

from edge_kit import TOKEN


@pytest.fixture
def site(tmp_path: Path) -> Path:
    (tmp_path / "models").mkdir()
    return tmp_path


@pytest.fixture
def admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}
