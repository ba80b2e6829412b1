"""What every step receives and returns, and the few helpers the steps share.

A step is a function `step(ctx, *inputs) -> outputs`: `ctx` (a `StepContext`) is its directory, the
resolved config and its MLflow run; `inputs` are the `StepResult`s of the steps it depends on. The helpers
here read and write the jsonl files steps hand to each other and log a training's curves to the step's run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdray.config import Config


@dataclass(frozen=True)
class StepResult:
    """What a step produced: its key, directory and outputs; `cached` when a finished run was reused."""

    step: str
    key: str
    directory: str
    outputs: dict[str, Any]
    cached: bool
    seconds: float


@dataclass
class StepContext:
    """What a running step may use: its directory, the resolved config and its MLflow run (or None)."""

    step: str
    key: str
    directory: Path
    cfg: Config
    tracker: Any
    progress: bool = False

    def train_display(self, label: str) -> dict[str, Any]:
        """How a training run shows its progress: a bar on a terminal, log lines otherwise."""
        return {"progress_desc": label, "progress_bar": self.progress}


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a jsonl file (one JSON object a line; blank lines skipped)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_jsonl(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Write `records` to `path`, one JSON object a line."""
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def finite(d: Mapping[str, Any]) -> dict[str, Any]:
    """`d` without its non-finite float values (NaN, ±inf), which JSON records cannot hold."""
    import math

    return {k: v for k, v in d.items() if not (isinstance(v, float) and not math.isfinite(v))}


def run_tracking(ctx: StepContext) -> dict[str, Any] | None:
    """Where a Ray Train worker logs its per-step metrics: this step's MLflow run."""
    if ctx.tracker is None:
        return None
    return {
        "tracking_uri": ctx.tracker.tracking_uri,
        "experiment": ctx.tracker.experiment,
        "run_id": ctx.tracker.run_id,
        "spool_dir": str(ctx.directory / "mlflow-spool-rank0"),
        "system_metrics_s": ctx.cfg.tracking.system_metrics_s,
    }


def log_curves(ctx: StepContext, history: Sequence[Mapping[str, Any]], name: str) -> None:
    """Log a training's learning curves (its metrics history) to the step's MLflow run as figure `name`."""
    if ctx.tracker is None or not history:
        return
    from kdray.plots import learning_curves

    ctx.tracker.log_figure(learning_curves(history), name)
