"""Results files: a re-run resumes row by row under the same arguments, and re-runs under others."""

from __future__ import annotations

import json

import pytest

from kdray.results import ResumableResults, latest_run, read_rows


def test_a_rerun_skips_finished_rows_and_another_setting_runs_its_own(tmp_path):
    path = tmp_path / "bench" / "rows.jsonl"
    first = ResumableResults(path, shape="--steps 10", seed=3)
    first.record({"model": "teacher", "score": 70.0})
    assert "student" not in first  # killed here: the student never finished

    again = ResumableResults(path, shape="--steps 10", seed=3)
    assert "teacher" in again and "student" not in again
    again.reuse("teacher")
    again.record({"model": "student", "score": 40.0})
    again.record({"model": "teacher", "score": -1.0})  # already done: the file's row stands
    rows = read_rows(path)
    assert [r["model"] for r in rows] == ["teacher", "student"]
    assert [r["model"] for r in again.rows] == ["teacher", "student", "teacher"]
    assert again.rows[-1]["score"] == 70.0
    assert {r["seed"] for r in rows} == {3} and all(r["commit"] and r["cpu"] for r in rows)

    other = ResumableResults(path, shape="--steps 20", seed=3)
    assert not other.done
    other.record({"model": "teacher", "score": 75.0})
    latest = latest_run(read_rows(path))
    assert set(latest) == {"teacher"} and latest["teacher"]["score"] == 75.0


def test_a_half_written_line_names_its_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"model": "a"}) + "\n\n" + '{"model": "b", "sc')
    with pytest.raises(ValueError, match=r"rows\.jsonl:3: not a JSON row"):
        read_rows(path)
    assert read_rows(tmp_path / "missing.jsonl") == []


def test_update_rows_merges_into_the_named_rows_only(tmp_path):
    from kdray.results import append_rows, read_rows, update_rows

    path = tmp_path / "rows.jsonl"
    append_rows(path, [{"key": "a", "x": 1}, {"key": "b", "x": 2}, {"x": 3}])
    assert update_rows(path, {"b": {"y": 9}, "missing": {"y": 0}}) == 1
    assert read_rows(path) == [{"key": "a", "x": 1}, {"key": "b", "x": 2, "y": 9}, {"x": 3}]
    assert not list(tmp_path.glob("*.tmp"))


def test_rows_carry_the_commit_the_code_was_loaded_from_not_the_working_directorys(tmp_path, monkeypatch):
    """A benchmark runs for hours while its checkout moves on, from any working directory: its rows name
    the commit of kdray's own checkout as read when the process started."""
    import subprocess
    from pathlib import Path

    import kdray
    from kdray.determinism import code_commit, provenance

    source = Path(kdray.__file__).resolve().parent
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True)
    if head.returncode:
        pytest.skip("kdray is not running from a git checkout")
    other = tmp_path / "other"
    other.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=other, check=True)
    env = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "x"], cwd=other, check=True)
    monkeypatch.chdir(other)
    code_commit.cache_clear()
    first = provenance(0)["commit"]
    assert first == head.stdout.strip()[:7]
    monkeypatch.setattr("kdray.runs.git_commit", lambda path=None: "f" * 40)  # HEAD moves on
    assert provenance(0)["commit"] == first
    code_commit.cache_clear()
