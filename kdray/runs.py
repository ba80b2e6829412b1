"""MLflow runs apart from logging into them (that is `kdray.tracking`): where the store is, what a key
may be named, a run's provenance, and the runs a workflow or a sweep creates, looks up and ends.

A process killed with SIGKILL cannot end its own run, a stopped workflow cannot end its steps' runs, and
a resumed Tune trial has to find the run it started: these are queries of MLflow's client, keyed by
kdray's tags (`kdray.host`, `kdray.pid`, `mlflow.parentRunId`).
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "TrackingUnavailableError",
    "artifact_root",
    "close_child_runs",
    "close_stale_runs",
    "create_run",
    "experiment_id",
    "find_run",
    "finite_number",
    "flatten",
    "git_commit",
    "is_permanent",
    "mlflow_key",
    "resolve_tracking_uri",
    "retry",
]

_BAD_KEY_CHARS = re.compile(r"[^/\w.\- ]")


def resolve_tracking_uri(uri: str | None, workdir: str | Path) -> str:
    """`uri`, else `$MLFLOW_TRACKING_URI`, else a sqlite file in the workdir (a run is tracked with no server)."""
    return (
        uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"
    )


def mlflow_key(key: Any) -> str:
    """`key` as MLflow accepts it: letters, digits, `_ - . / ` and spaces, no empty or `..` path parts.
    Anything else becomes `_` (parentheses are dropped), so `scores.student (xkd).exact_match` is logged
    as `scores.student xkd.exact_match` instead of being rejected and lost."""
    clean = _BAD_KEY_CHARS.sub("_", str(key).replace("(", "").replace(")", "")).strip()
    return "/".join(p if p not in ("", ".", "..") else "_" for p in clean.split("/")) or "_"


def finite_number(value: Any) -> float | None:
    """`value` as a float if it is one finite number (a Python or NumPy scalar, a one-element tensor);
    None for NaN, inf, None, strings and multi-element tensors: metrics MLflow and a plot can take."""
    if isinstance(value, (str, bytes)) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor with more than one element
        return None
    return number if math.isfinite(number) else None


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`: MLflow params are flat, config sections are not."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        out.update(flatten(value, name) if isinstance(value, Mapping) and value else {name: value})
    return out


@lru_cache(maxsize=8)
def git_commit(path: str | Path | None = None) -> str | None:
    """Commit of the git checkout holding `path` (default: the kdray sources), None outside a checkout."""
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def retry(
    fn: Callable[[], Any], *, what: str, attempts: int | None = None, timeout_s: float | None = None
) -> Any:
    """`fn()`, tried up to `attempts` times 2, 4, 8... s apart (at most 60 s) while the next try starts
    within `timeout_s`; an error no retry can fix is raised at once. For the calls that must block
    (creating or finding a run, registering a model), unlike logging, which the spool retries. One of
    the two bounds is required: a blocking call never waits without one."""
    if attempts is None and timeout_s is None:
        raise TypeError(f"retry({what!r}): give attempts= or timeout_s=, or it could wait forever")
    attempts = attempts if attempts is not None else 1_000_000
    deadline = time.monotonic() + (timeout_s if timeout_s is not None else math.inf)
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as err:
            delay = min(60, 2**attempt)
            if attempt == attempts or is_permanent(err) or time.monotonic() + delay > deadline:
                raise
            logger.warning("%s failed (%s); try %d in %ds", what, err, attempt + 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def is_permanent(err: BaseException) -> bool:
    """Errors that waiting cannot heal: a local mistake (a bad record, an unwritable artifact store) or a
    4xx answer from MLflow (invalid value, no such run, permission denied); 429 and 5xx are transient."""
    if isinstance(err, (ValueError, TypeError, KeyError, FileNotFoundError, PermissionError)):
        return True
    status = err.get_http_status_code() if hasattr(err, "get_http_status_code") else None
    return isinstance(status, int) and 400 <= status < 500 and status != 429


def artifact_root(tracking_uri: str) -> str | None:
    """Where a new experiment's artifacts go: beside a local SQLite store (`<db dir>/mlartifacts`), not in
    `./mlruns` of whatever directory the process runs in (MLflow's default for a local store); a server
    decides for itself (None)."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()
    return None


def experiment_id(client: Any, name: str, tracking_uri: str = "") -> str:
    """The id of experiment `name`, created if missing (another process creating it first is fine)."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            # "custom_model_development" makes the MLflow 3 UI open the runs table, not the GenAI traces page
            return client.create_experiment(
                name,
                artifact_location=artifact_root(tracking_uri),
                tags={"mlflow.experimentKind": "custom_model_development"},
            )
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise ValueError(f"MLflow experiment {name!r} is deleted; restore it or set tracking.experiment")
    return experiment.experiment_id


class TrackingUnavailableError(RuntimeError):
    """The tracking store did not answer while a run had to be created (the only blocking step)."""


def create_run(
    client: Any,
    experiment: str,
    tracking_uri: str,
    *,
    name: str | None = None,
    parent: str | None = None,
    tags: Mapping[str, Any] | None = None,
    timeout_s: float = 120.0,
) -> tuple[str, str]:
    """(run id, experiment id) of a new run of `experiment`, nested under `parent`, tagged with its
    provenance: kdray's version, the commit, and the host and pid by which `close_stale_runs` tells that
    its process died. Retries for `timeout_s`, then raises `TrackingUnavailableError`."""
    from kdray import __version__

    all_tags = {
        "kdray.version": __version__,
        "kdray.host": socket.gethostname(),
        "kdray.pid": str(os.getpid()),
    }
    all_tags |= {str(k): str(v) for k, v in (tags or {}).items()}
    if commit := git_commit():
        all_tags["mlflow.source.git.commit"] = commit
    if parent:
        all_tags["mlflow.parentRunId"] = parent  # how the MLflow UI nests runs

    def create() -> tuple[str, str]:
        experiment_key = experiment_id(client, experiment, tracking_uri)
        return client.create_run(experiment_key, run_name=name, tags=all_tags).info.run_id, experiment_key

    try:
        return retry(create, timeout_s=timeout_s, what=f"creating a run at MLflow {tracking_uri}")
    except Exception as err:
        if is_permanent(err):
            raise
        raise TrackingUnavailableError(
            f"MLflow at {tracking_uri} did not answer within {timeout_s:.0f}s ({type(err).__name__}: "
            f"{str(err)[:300]}). Start the server or fix tracking.tracking_uri / $MLFLOW_TRACKING_URI "
            "(`kdray doctor` checks it), or run without tracking with `tracking.enabled: false`."
        ) from err


def find_run(tracking_uri: str, experiment: str, tags: Mapping[str, str]) -> str | None:
    """The id of the newest run of `experiment` carrying every tag in `tags`, or None: how a resumed
    Tune trial finds the MLflow run it started before its sweep was interrupted."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = retry(
        lambda: client.search_runs([found.experiment_id], filter_string=where, max_results=1,
                                   order_by=["attributes.start_time DESC"]),
        attempts=5, what=f"searching runs of {experiment!r}",
    )  # fmt: skip
    return runs[0].info.run_id if runs else None


def close_stale_runs(tracking_uri: str, experiment: str) -> list[str]:
    """Mark KILLED the runs of `experiment` still RUNNING whose process on this host is gone (by their
    `kdray.host` and `kdray.pid` tags): a run killed with SIGKILL, or by a power cut, cannot end its own
    MLflow run, so the next workflow run does. Returns the ids it closed."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    where = f"attributes.status = 'RUNNING' and tags.`kdray.host` = '{socket.gethostname()}'"
    closed = []
    for run in client.search_runs([found.experiment_id], filter_string=where, max_results=1000):
        pid = int(run.data.tags.get("kdray.pid") or 0)
        if pid and not _process_alive(pid):
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
    return closed


def close_child_runs(tracking_uri: str, parent_run_id: str, status: str = "KILLED") -> list[str]:
    """Mark `status` the nested runs of `parent_run_id` still RUNNING: a workflow stopped by a signal
    stops its step tasks with it, and they cannot end their own runs. Returns the ids it closed."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    where = f"attributes.status = 'RUNNING' and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    closed = []
    for run in client.search_runs([parent.info.experiment_id], filter_string=where, max_results=1000):
        client.set_terminated(run.info.run_id, status=status)
        closed.append(run.info.run_id)
    return closed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True
