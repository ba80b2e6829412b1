"""Results files: one JSON line per measured row, the only place a README number may come from.

Why one home: every benchmark script resumes row by row (a killed run keeps what it finished and the
re-run skips it) and stamps each row with where it was measured (`kdray.determinism.provenance`). A row
counts as done only under the same arguments (its `args` field), so another setting re-runs it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a results file; none if it does not exist yet. A malformed line names its place."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{path}:{number}: not a JSON row ({err.msg}); fix or delete that line (a run killed while "
                f"writing leaves half a line) and re-run: finished rows are kept"
            ) from err
    return rows


def append_rows(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> int:
    """Append rows to `path` (its folder made if missing); returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(dict(row)) + "\n" for row in rows]
    with path.open("a") as f:
        f.writelines(lines)
    return len(lines)


def update_rows(path: str | Path, updates: Mapping[str, Mapping[str, Any]], key: str = "key") -> int:
    """Merge `updates[row[key]]` into the rows of `path` that have them, rewriting the file atomically (a
    crash leaves the old file or the new one, never half of one). For measurements added to finished rows;
    nothing else may be appending to `path` meanwhile. Returns how many rows changed."""
    import os

    path = Path(path)
    rows, changed = read_rows(path), 0
    for row in rows:
        if row.get(key) in updates:
            row.update(updates[row[key]])
            changed += 1
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, path)
    return changed


def latest_run(rows: list[dict[str, Any]], key: str = "args") -> dict[str, dict[str, Any]]:
    """The rows sharing the last row's `key` (the latest run's setting), by `model`, later rows winning."""
    if not rows:
        return {}
    shape = rows[-1].get(key)
    return {r["model"]: r for r in rows if r.get(key) == shape}


class ResumableResults:
    """The rows of one benchmark setting: what is done already, and a `record` that appends the rest.

    `shape` is the string of arguments that shape the rows; each new row is stamped with it and with
    `provenance(seed)` (seed, commit, CPU, threads, kernels).
    """

    def __init__(self, path: str | Path, *, shape: str, seed: int) -> None:
        from kdray.determinism import provenance

        self.path = Path(path)
        self.shape = shape
        self.done: dict[str, dict[str, Any]] = {
            r["model"]: r for r in read_rows(self.path) if r.get("args") == shape
        }
        self.stamp = {**provenance(seed), "args": shape}
        self.rows: list[dict[str, Any]] = []

    def __contains__(self, model: str) -> bool:
        return model in self.done

    def record(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """A finished row: appended (stamped) unless this setting's file holds it already; returned."""
        if row["model"] in self.done:
            stamped = self.done[row["model"]]
        else:
            stamped = {**row, **self.stamp}
            append_rows(self.path, [stamped])
            self.done[row["model"]] = stamped
        self.rows.append(stamped)
        return stamped

    def reuse(self, model: str) -> dict[str, Any]:
        """A row finished by an earlier run of this setting, counted as this run's."""
        return self.record(self.done[model])
