"""The loss-memory benchmark: every setting computes the same loss, and the table reads its rows."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.servers import load_workflow

bp = load_workflow("benchmark_perf")


@pytest.mark.parametrize("teacher", ["dense", "top-8"])
def test_chunked_settings_measure_the_same_loss_and_gradient(teacher):
    whole = bp.measure_loss_step(teacher, None, vocab=300, length=40, hidden=16)
    chunked = bp.measure_loss_step(teacher, 16, vocab=300, length=40, hidden=16)
    assert chunked["loss"] == pytest.approx(whole["loss"], rel=1e-6)
    assert chunked["grad_norm"] == pytest.approx(whole["grad_norm"], rel=1e-5)


def test_each_setting_runs_in_a_fresh_process_and_the_table_has_every_row(tmp_path):
    out = tmp_path / "perf.jsonl"
    cmd = [sys.executable, bp.__file__, "--loss-memory", "--vocab", "256", "--length", "32", "--hidden", "8",
           "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(bp.SETTINGS) * len(bp.ALLOCATORS)
    assert {r["ratio_to_dense"] for r in rows if r["teacher"] == "dense" and r["chunk"] is None} == {1.0}
    table = bp.report(out)
    assert table.count("\n| ") == len(bp.SETTINGS) and "V = 256, T = 32" in table
