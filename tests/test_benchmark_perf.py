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


@pytest.mark.slow
def test_throughput_rows_side_by_side_and_kdray_matches_trl_on_the_first_step(tmp_path, data_dir):
    """The throughput benchmark end to end with tiny models: one row per system, the same rows and tokens
    on every side, and, with the full-vocabulary signal, kdray's first loss is TRL's (same batch, same
    weights, same JSD): the two sides compute the same thing before they are timed against each other."""
    pytest.importorskip("trl.experimental.gkd", reason="TRL is the bench extra: pip install -e '.[bench]'")
    from kdray.models.tiny import save_tiny_checkpoint

    pt = load_workflow("perf_throughput")
    teacher = save_tiny_checkpoint(tmp_path / "teacher", hidden_size=32, num_layers=2, seed=0)
    student = save_tiny_checkpoint(tmp_path / "student", hidden_size=32, num_layers=1, seed=1)
    overrides = {"teacher": str(teacher), "student": str(student), "top_k": None, "steps": 2, "batch": 2,
                 "data": str(data_dir / "gsm8k")}  # fmt: skip
    rows = pt.throughput(True, tmp_path / "work", {"stock": {}}, overrides)
    by = {r["system"]: r for r in rows}
    assert sorted(by) == sorted(pt.SYSTEMS)
    assert len({r["tokens"] for r in rows}) == 1, "every side trains on the same tokens"
    # live: the teacher's float32 logits, as TRL computes them; cached: stored as float16 (signal_store)
    assert by["kdray-live"]["step0_loss"] == pytest.approx(by["trl"]["step0_loss"], rel=1e-4)
    assert by["kdray-cached"]["losses"] == pytest.approx(by["kdray-live"]["losses"], rel=1e-2)
    assert all(r["tokens_per_s"] > 0 and r["peak_rss_mib"] > 0 for r in rows)
    # start-up and the steady rate read apart: the first step ends before the last, after the process began
    assert all(0 < r["first_step_s"] < r["wall_s"] and r["steady_tokens_per_s"] > 0 for r in rows)
    assert all(0 < r["mfu"] < 1 for r in rows), "MFU: 6 N tokens/s over the matmul peak measured in the run"
    out = tmp_path / "perf.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = pt.report(out)
    assert table.count("\n| ") == len(pt.SYSTEMS) and "| 1.00x |" in table
