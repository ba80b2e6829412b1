"""Every results table in the README is what `workflows/readme_tables.py` renders from its results file."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tables():
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "workflows" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_match_their_results_files():
    tables = _tables()
    readme = (ROOT / "README.md").read_text()
    changed = tables.render(readme)[1]
    assert changed == [], f"README tables {changed} differ: run python workflows/readme_tables.py"
    blocks = {match["name"] for match in tables.BLOCK.finditer(readme)}
    assert blocks == set(tables.TABLES), "every renderer has its block in the README"


def test_a_hand_edited_number_is_caught_and_an_unknown_block_named():
    tables = _tables()
    readme = (ROOT / "README.md").read_text()
    edited = readme.replace("| teacher (CE from scratch) | ", "| teacher (CE from scratch) | 9", 1)
    assert tables.render(edited)[1] != []
    with pytest.raises(KeyError, match="no renderer"):
        tables.render("<!-- table: nonsense -->\nx\n<!-- /table -->")
