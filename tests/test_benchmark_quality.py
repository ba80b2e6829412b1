"""The quality benchmark: rows keyed by configuration (resumable), two student starts, seeds summarised."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from kdray.eval.metrics import bootstrap_ci
from tests.servers import load_workflow

ROOT = Path(__file__).resolve().parents[1]
bq = load_workflow("benchmark_quality")


def test_config_hash_is_stable_and_ignores_key_order():
    assert bq.config_hash({"a": 1, "b": [2, 3]}) == bq.config_hash({"b": [2, 3], "a": 1})
    assert bq.config_hash({"a": 1}) != bq.config_hash({"a": 2})


def test_second_stage_reads_on_where_the_first_stopped():
    rows = [{"i": i} for i in range(10)]
    assert [r["i"] for r in bq.rotate(rows, 4)] == [4, 5, 6, 7, 8, 9, 0, 1, 2, 3]
    assert [r["i"] for r in bq.rotate(rows, 14)] == [r["i"] for r in bq.rotate(rows, 4)]  # epochs wrap
    assert bq.rotate([], 3) == []


def _row(method, start, seed, score, shape, minutes=1.0):
    return {"key": f"{method}-{start}-{seed}", "model": f"student: {method}", "method": method, "start": start,
            "fraction": 1.0, "seed": seed, "score": score, "minutes": minutes, "params": 100, "task": "arithmetic",
            "shape": shape, "commit": "abc", "cpu": "cpu", "threads": 2}  # fmt: skip


def test_report_pairs_each_method_with_sft_of_the_same_seed_and_start(tmp_path):
    shape = {"task": "arithmetic", "student_steps": 10}
    rows = [
        {"key": "t", "model": "teacher (CE from scratch)", "score": 80.0, "params": 400, "minutes": 5.0,
         "task": "arithmetic", "shape": shape, "commit": "abc", "cpu": "cpu", "threads": 2},
        _row("sft", "scratch", 0, 10.0, shape), _row("sft", "scratch", 1, 20.0, shape),
        _row("supervised_kd", "scratch", 0, 13.0, shape), _row("supervised_kd", "scratch", 1, 25.0, shape),
        _row("supervised_kd", "two_stage", 0, 30.0, shape),  # no SFT row of that start: no paired lead
        _row("supervised_kd", "scratch", 2, 99.0, {"task": "arithmetic", "student_steps": 99}),  # other setting
        {**_row("sft", "scratch", 0, 50.0, shape), "task": "multi30k"},
    ]  # fmt: skip
    path = tmp_path / "quality.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:-2] + rows[-1:] + rows[-2:-1]))
    # the latest row's setting (student_steps 99) is the table: only its row
    assert "99.0" in bq.report(path, "arithmetic") and "13.0" not in bq.report(path, "arithmetic")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows[:-2] + rows[-1:]))
    lines = {line.split(" | ")[0] + " " + line.split(" | ")[1]: line for line in bq.report(path, "arithmetic").splitlines() if line.startswith("| ")}  # fmt: skip
    kd = lines["| supervised KD (forward KL) scratch"]
    lo, hi = bootstrap_ci([13.0, 25.0])
    assert f"19.0 ± {statistics.stdev([13.0, 25.0]):.1f} [{lo:.1f}, {hi:.1f}]" in kd
    assert "+4.0 ± 1.4" in kd  # leads 3 and 5, paired by seed
    assert f"| {19.0 / 80.0:.2f} |" in kd  # recovery against the teacher
    assert "| 1 | 30.0 [30.0, 30.0] |  |" in lines["| supervised KD (forward KL) two_stage"]
    assert "50.0" not in bq.report(path, "arithmetic")  # another task's rows stay out
    with pytest.raises(ValueError, match="no gsm8k rows"):
        bq.report(path, "gsm8k")


def test_sample_columns_average_the_seeds_that_have_them_and_the_plot_averages_each_temperature(tmp_path):
    shape = {"task": "arithmetic", "student_steps": 10}
    curve = [
        {"temperature": t, "quality": q, "distinct_2": d, "self_bleu": 50.0}
        for t, q, d in ((0.3, 10.0, 0.2), (1.0, 6.0, 0.5))
    ]
    rows = [
        {**_row("sft", "two_stage", 0, 10.0, shape), "distinct_2": 0.4, "self_bleu": 60.0, "lca_auroc": 0.7, "curve": curve},
        {**_row("sft", "two_stage", 1, 12.0, shape), "distinct_2": 0.6, "self_bleu": 40.0, "lca_auroc": float("nan"),
         "curve": [{**p, "quality": p["quality"] + 2.0} for p in curve]},
        _row("sft", "two_stage", 2, 14.0, shape),  # measured before the sample columns existed
    ]  # fmt: skip
    path = tmp_path / "quality.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    line = next(x for x in bq.report(path, "arithmetic").splitlines() if x.startswith("| student, SFT only"))
    # distinct-2 and self-BLEU over the 2 seeds that have them; LCA AUROC over the one that is a number
    assert "| 0.500 (2) | 50.0 (2) | 0.700 (1) |" in line
    png = tmp_path / "qd.png"
    bq.plot(path, "arithmetic", png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no multi30k rows with a diversity curve"):
        bq.plot(path, "multi30k", png)


@pytest.mark.slow
def test_rows_run_once_per_configuration_and_a_rerun_resumes(tmp_path):
    out, work = tmp_path / "quality.jsonl", tmp_path / "runs"
    argv = [sys.executable, str(ROOT / "workflows" / "benchmark_quality.py"), "--methods", "sft", "--seeds", "0",
            "--train-examples", "64", "--eval-examples", "8", "--teacher-steps", "3", "--student-steps", "4",
            "--teacher-size", "32x2", "--student-size", "16x1", "--batch-size", "4", "--max-new-tokens", "8",
            "--out", str(out), "--workdir", str(work)]  # fmt: skip
    first = subprocess.run([*argv, "--no-extras"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stderr[-3000:]
    teacher, *students = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["start"] for r in students) == ["scratch", "two_stage"]
    assert len({teacher["key"], *(r["key"] for r in students)}) == 3
    assert students[0]["params"] * 4 <= teacher["params"]  # a student of at most a quarter of the teacher
    # the two-stage row: SFT for half the budget (a checkpoint shared by every method), then the rest
    assert len(list(work.glob("arithmetic/sft-stage-*/sft/student/config.json"))) == 1
    assert "[two_stage sft seed 0 data 1] 2 steps" in first.stdout
    # a run killed before its last row: the rerun trains that row only (teacher and SFT stage reused)
    out.write_text("".join(line + "\n" for line in out.read_text().splitlines()[:-1]))
    second = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "[teacher]" not in second.stdout and "[scratch" not in second.stdout
    assert "[two_stage sft seed 0 data 1]" in second.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["key"] for r in rows] == [teacher["key"], *(r["key"] for r in students)]
    # the rerun's row has its samples measured; --fill-extras adds them to the rows measured without
    assert ["curve" in r for r in rows[1:]] == [False, True]
    fill = subprocess.run([*argv, "--fill-extras"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert fill.returncode == 0, fill.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    for row in rows[1:]:
        assert [p["temperature"] for p in row["curve"]] == [0.3, 0.6, 1.0, 1.2]
        assert 0.0 <= row["distinct_2"] <= 1.0 and "lca_auroc" in row
    assert rows[1]["score"] == students[0]["score"], "filling in the samples leaves the row's score alone"
