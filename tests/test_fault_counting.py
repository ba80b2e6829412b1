"""How `workflows/faults.py` counts rows lost, rows duplicated and steps redone from two metrics files."""

from __future__ import annotations

import json
import math
from pathlib import Path

from servers import load_workflow

ROOT = Path(__file__).resolve().parents[1]


def _fault_runs():
    return load_workflow("fault_runs")


def _write(path: Path, steps: list[int], loss=lambda s: 1.0 / s, consumed=lambda s: 8 * s) -> Path:
    path.write_text(
        "".join(json.dumps({"step": s, "loss": loss(s), "consumed_rows": consumed(s)}) + "\n" for s in steps)
    )
    return path


def test_replays_missing_steps_and_diverged_losses_are_counted(tmp_path):
    runs = _fault_runs()
    clean = _write(tmp_path / "clean.jsonl", list(range(1, 7)))

    def count(steps, **kw):
        return runs.compare(_write(tmp_path / "run.jsonl", steps, **kw), clean)

    # a restore at step 3 replays steps 3 and 4 with the same losses: nothing lost, two steps redone
    assert count([1, 2, 3, 4, 3, 4, 5, 6]) | {"compared_steps": 0} == {
        "steps": 6, "rows_lost": 0, "rows_duplicated": 0, "steps_redone": 2, "compared_steps": 0,
    }  # fmt: skip
    # a step never logged: its rows are lost
    assert count([1, 2, 3, 4, 6])["rows_lost"] == 8
    # a batch read at the wrong position after a restore: the losses differ from there on, one row
    # batch more consumed at the end
    shifted = count(
        [1, 2, 3, 4, 3, 4, 5, 6], loss=lambda s: 1.0 / s if s < 5 else 0.5, consumed=lambda s: 8 * s + 8
    )
    assert shifted["rows_duplicated"] == 16 and shifted["rows_lost"] == 0
    # fewer rows consumed than the clean run at the same step: lost, even with equal losses
    assert count(list(range(1, 7)), consumed=lambda s: 8 * s - 8)["rows_lost"] == 8
    # nan_loss compares only the steps before its fault: NaN after it is not a duplicate
    assert count(list(range(1, 7)), loss=lambda s: 1.0 / s if s < 4 else math.nan)["rows_duplicated"] == 24
    nan_run = runs.compare(tmp_path / "run.jsonl", clean, upto=3)
    assert (nan_run["rows_lost"], nan_run["rows_duplicated"], nan_run["compared_steps"]) == (0, 0, 3)


def test_the_innermost_error_is_quoted_with_its_cause_line():
    runs = _fault_runs()

    class ControllerError(Exception):
        pass

    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as err:
            raise ControllerError("Training failed due to controller error:\n[Errno 28] disk full") from err
    except ControllerError as err:
        assert runs.cause(err) == "OSError: [Errno 28] No space left on device"
    wrapped = ControllerError("Training failed due to controller error:\n[Errno 28] Error writing bytes")
    assert (
        runs.cause(wrapped)
        == "ControllerError: Training failed due to controller error: [Errno 28] Error writing bytes"
    )
