"""A finished sweep's trials as rows: status, metric, starts and error per trial, the best one, and the
best config written as a YAML for `workflows/xkd.py`."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdray.config import Config, dump_config, with_overrides


def max_evaluations(cfg: Config) -> int:
    """Reports a full-length trial makes: one per `train.eval_every` steps and one at the last step."""
    t = cfg.train
    return math.ceil(t.max_steps / t.eval_every)


def trial_rows(cfg: Config, results: Any, directory: Path) -> list[dict[str, Any]]:
    """One row per trial: its sampled config, status, evaluations run and last reported metric."""
    from kdray.tune.trial import EVENTS, trial_files

    full = max_evaluations(cfg)
    rows = []
    for r in results:
        metrics = r.metrics or {}
        trial_id = metrics.get("trial_id") or trial_id_of(r.path)
        iterations = int(metrics.get("training_iteration", 0) or 0)
        if r.error is not None:
            status = "failed"
        elif iterations >= full:
            status = "completed"
        else:
            status = "stopped early"
        value = metrics.get(cfg.tune.metric)
        files = trial_files(directory, trial_id)
        events = files / EVENTS
        rows.append(
            {
                "trial_id": trial_id,
                "status": status,
                "iterations": iterations,
                "metric": float(value) if isinstance(value, (int, float)) else None,
                "step": metrics.get("step"),
                "config": dict(r.config or {}),
                "error": error_line(r.error),
                "path": str(files),
                "tune_path": r.path,
                "starts": trial_starts(events),
            }
        )
    sign = 1 if cfg.tune.mode == "min" else -1
    rows.sort(
        key=lambda t: (
            t["status"] == "failed",
            t["metric"] is None,
            sign * t["metric"] if t["metric"] is not None else 0,
        )
    )
    return rows


def trial_id_of(path: str | None) -> str:
    """A trial's id from its Tune directory name (`<trainable>_<id>_<index>_<values>_<date>`), for a
    trial that failed before it reported anything."""
    import re

    found = re.search(r"_([0-9a-f]{5}_\d{5})_", Path(path).name) if path else None
    return found.group(1) if found else "?"


def trial_starts(events: Path) -> int:
    """How many times the trial started: more than once when a restored sweep resumed it."""
    if not events.exists():
        return 0
    lines = [line for line in events.read_text().splitlines() if line.strip()]
    return sum(1 for line in lines if json.loads(line).get("event") == "start")


def error_line(error: BaseException | None) -> str | None:
    if error is None:
        return None
    text = str(error).strip().splitlines()
    return text[-1][:500] if text else type(error).__name__


def best_trial(cfg: Config, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The best trial that ran its full length (a trial stopped early was judged worse at a rung); if
    none did, the best of the rest."""
    ok = [r for r in rows if r["status"] != "failed" and r["metric"] is not None]
    full = [r for r in ok if r["status"] == "completed"] or ok
    if not full:
        return None
    pick = min if cfg.tune.mode == "min" else max
    return dict(pick(full, key=lambda r: r["metric"]))


def write_best_config(cfg: Config, best: Mapping[str, Any], path: Path) -> Path:
    """The best trial's config as a YAML for `workflows/xkd.py`: the base with its values, the same
    checkpoint cadence, and an empty search space (it is one point now)."""
    from kdray.tune.space import trial_config

    chosen = with_overrides(trial_config(cfg, best["config"]), {"tune.search_space": {}})
    header = [
        f"# Best trial {best['trial_id']} of sweep {cfg.tune.name!r}: {cfg.tune.metric} = {best['metric']:.6g}",
        "# after " + f"{best['step']} steps" if best.get("step") else "#",
        "# Its sampled values: " + ", ".join(f"{k}={v!r}" for k, v in sorted(best["config"].items())),
        "# Reproduce (or carry on to evaluation and registration):",
        f"#   python workflows/xkd.py --config {path}",
        "",
    ]
    path.write_text("\n".join(header) + dump_config(chosen))
    return path
