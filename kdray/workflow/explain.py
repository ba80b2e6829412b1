"""`kdray run --explain`: which steps a run of the workflow would reuse, and why the others would run.

Each step's key is computed as `run_step` computes it, over the inputs `build_dag` wires, and compared
with the `_KEY.json` of the most recently finished directory of the same step under the cache root: the
components that differ (a config section, a file's contents, the package's code, an input step's key)
are the reasons. Nothing runs and Ray is not started.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kdray.config import Config
from kdray.workflow.base import StepResult
from kdray.workflow.dag import dag_steps
from kdray.workflow.keys import DONE, KEY, cache_root, finished, key_components, key_of


def last_finished(root: Path, step: str) -> Path | None:
    """The most recently finished `<step>-*` directory under `root` (by its done record's time), or None."""
    dirs = [d for d in root.glob(f"{step}-*") if (d / DONE).is_file()] if root.is_dir() else []
    return max(dirs, key=lambda d: ((d / DONE).stat().st_mtime_ns, d.name), default=None)


def read_components(directory: Path) -> dict[str, Any] | None:
    """The key components recorded in a step directory's `_KEY.json`; None when absent or unreadable."""
    try:
        recorded = json.loads((directory / KEY).read_text())
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def differences(now: Mapping[str, Any], before: Mapping[str, Any]) -> list[str]:
    """Why a key differs from a recorded one, one phrase per differing component."""
    reasons = []
    files_now, files_before = now.get("files", {}), before.get("files", {})
    for name in sorted(set(files_now) | set(files_before)):
        if files_now.get(name) != files_before.get(name):
            reasons.append(f"{name} contents changed")
    sections_now, sections_before = now.get("sections", {}), before.get("sections", {})
    for name in sorted(set(sections_now) | set(sections_before)):
        if sections_now.get(name) != sections_before.get(name):
            reasons.append(f"config section {name} changed")
    if now.get("code") != before.get("code"):
        reasons.append("kdray code changed")
    if now.get("version") != before.get("version"):
        reasons.append(f"kdray version changed ({before.get('version')} -> {now.get('version')})")
    inputs_before = {step: key for step, key in before.get("inputs", [])}
    for step, key in now.get("inputs", []):
        if inputs_before.get(step) != key:
            reasons.append(f"input step {step} changed")
    return list(dict.fromkeys(reasons))  # an input given twice (register: the student) is said once


def explain_steps(cfg: Config) -> list[str]:
    """One line per step of the DAG, in order: `reused` with the finished directory it would read, or
    `will run` and why (never run, an unfinished attempt to resume, or the components that differ from
    the step's most recently finished directory: a file's contents, a config section, the code, an
    input step). Computes keys only; runs nothing."""
    root = cache_root(cfg)
    results: dict[str, StepResult] = {}
    lines = []
    for step, needs in dag_steps(cfg):
        components = key_components(step, cfg, [results[n] for n in needs])
        key = key_of(components)
        directory = root / f"{step}-{key}"
        results[step] = StepResult(step, key, str(directory), {}, True, 0.0)
        if cfg.workflow.resume and finished(directory) is not None:
            lines.append(f"{step:<16} reused: {directory}")
            continue
        lines.append(f"{step:<16} will run: {'; '.join(_reasons(cfg, root, step, directory, components))}")
    return lines


def _reasons(cfg: Config, root: Path, step: str, directory: Path, components: Mapping[str, Any]) -> list[str]:
    if not cfg.workflow.resume:
        return ["workflow.resume is false (--fresh): every step runs again"]
    if directory.is_dir():
        return [f"an earlier attempt ({directory.name}) did not finish; it resumes there"]
    previous = last_finished(root, step)
    if previous is None:
        return ["never run"]
    recorded = read_components(previous)
    if recorded is None:
        return [f"{previous.name} finished before keys were recorded (no {KEY}); its inputs are unknown"]
    return differences(components, recorded) or [
        f"key differs from {previous.name} though its recorded components match (key format changed)"
    ]
