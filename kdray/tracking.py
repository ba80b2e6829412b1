"""One `Tracker`: MLflow on rank 0, a no-op on every other rank.

Every call is appended to a spool on local disk and returns at once; a daemon thread sends the spool to
MLflow in order and retries forever while the server is down, so training never blocks on tracking and
a restarted process can resend what a dead one left unsent. Only `MlflowClient` is used (never the
fluent `mlflow.start_run` state), because several trackers live in one process (workflow driver: a
parent run and one nested run per step; Ray Train worker of rank 0: attached to an existing run).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdray.spool import Spool, check_spool_free, default_spool_root, open_spool

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

__all__ = ["Tracker", "TrackingUnavailableError", "flatten", "git_commit", "resolve_tracking_uri"]

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)
MAX_BACKOFF_S = 5.0
# log_batch limits of the MLflow REST API: 1000 metrics, 100 params, 100 tags, 1000 entities in all
_BATCH_LIMITS = {"metrics": 1000, "params": 100, "tags": 100}
# MLflow reads these per request and process-wide (no per-client setting): without them one request to a
# dead server retries for ~4 minutes. The sender retries by itself, so MLflow's own retries only hide outages.
# A refused connection fails at once; the timeout only bounds a hung server (30 s: a busy one answers).
_FAIL_FAST_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
# errors that retrying cannot fix: the record is dropped with a warning instead of blocking the spool
_PERMANENT_CODES = frozenset(
    {
        "INVALID_PARAMETER_VALUE",
        "BAD_REQUEST",
        "MALFORMED_REQUEST",
        "RESOURCE_DOES_NOT_EXIST",
        "RESOURCE_ALREADY_EXISTS",
        "INVALID_STATE",
        "PERMISSION_DENIED",
        "UNAUTHENTICATED",
        "ENDPOINT_NOT_FOUND",
    }
)


class TrackingUnavailableError(RuntimeError):
    """The tracking store did not answer while a run had to be created (the only blocking step)."""


def resolve_tracking_uri(uri: str | None, workdir: str | Path) -> str:
    """`uri`, else `$MLFLOW_TRACKING_URI`, else a sqlite file in the workdir (a run is tracked with no server)."""
    return (
        uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(workdir).resolve() / 'mlflow.db'}"
    )


_BAD_KEY_CHARS = re.compile(r"[^/\w.\- ]")


def mlflow_key(key: Any) -> str:
    """`key` as MLflow accepts it for a param or metric name: only letters, digits, `_ - . / ` and spaces
    (no colon either: Windows stores reject it), no empty or `..` path parts, no leading `/`. Anything
    else becomes `_` (parentheses are dropped), so `output.scores.student (xkd).exact_match` is logged
    as `output.scores.student xkd.exact_match` instead of being rejected and lost."""
    clean = _BAD_KEY_CHARS.sub("_", str(key).replace("(", "").replace(")", "")).strip()
    parts = [p if p not in ("", ".", "..") else "_" for p in clean.split("/")]
    return "/".join(parts) or "_"


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` -> `{"a.b": 1}`: MLflow params are flat, config sections are not."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
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


class Tracker:
    """MLflow run of rank 0 (created, nested under `parent_run_id`, or attached by `run_id`); no-op elsewhere.

    `log_*` calls write to the spool (`spool_dir/spool.jsonl`) and return; a daemon thread sends it every
    `flush_interval_s`. `close()` waits up to `timeout_s` and, if the server is still down, leaves the
    spool on disk: `Tracker(uri, experiment, run_id=..., spool_dir=...)` resends it.

    - `rank`/`enabled`: any rank but 0, or `enabled=False`, gives a tracker whose calls do nothing, so
      callers never branch on the rank (nothing is imported, created or written).
    - `run_id`: attach to an existing run (the Ray Train worker of rank 0 logging into the driver's run);
      nothing is sent at construction, so attaching works while the server is down.
    - `parent_run_id`: nest the new run under it (the `mlflow.parentRunId` tag the UI groups by).
    - `spool_dir`: default `~/.cache/kdray/mlflow-spool/<run_id>`; one live tracker per spool (a lock).
    - `create_timeout_s`: creating a run is the one blocking call; it retries that long, then raises
      `TrackingUnavailableError`.
    - `_experiment_id`, `_spool_root`: internal, set by `child()`.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        *,
        run_name: str | None = None,
        run_id: str | None = None,
        parent_run_id: str | None = None,
        tags: Mapping[str, Any] | None = None,
        rank: int = 0,
        enabled: bool = True,
        spool_dir: str | Path | None = None,
        flush_interval_s: float = 1.0,
        create_timeout_s: float = 120.0,
        _experiment_id: str | None = None,
        _spool_root: Path | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.enabled = enabled and rank == 0
        self._run_id = run_id
        self._experiment_id = _experiment_id
        self._spool: Spool | None = None
        self._closed = False
        if not self.enabled:
            return
        from mlflow import MlflowClient

        if tracking_uri.startswith(("http://", "https://")):
            for key, value in _FAIL_FAST_HTTP.items():
                os.environ.setdefault(key, value)  # an explicit user setting wins
        elif tracking_uri.startswith("sqlite:///"):
            Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self._client = MlflowClient(tracking_uri)
        self._create_timeout_s = create_timeout_s
        if spool_dir is not None:
            check_spool_free(Path(spool_dir), run_id)  # before a run is created that could not use it
        if run_id is None:
            self._run_id = self._create_run(experiment, run_name, parent_run_id, tags or {})
        root = _spool_root or default_spool_root()
        self._spool = open_spool(Path(spool_dir) if spool_dir else None, root, self.run_id)
        if run_id is not None and tags:
            self.set_tags(tags)
        self._flush_interval_s = flush_interval_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._sent = threading.Condition()
        self._split_until = 0
        self._thread = threading.Thread(target=self._send_loop, name=f"kdray-mlflow-{self.run_id[:8]}")
        self._thread.daemon = True
        self._thread.start()

    # ---- identity ---------------------------------------------------------------------------------

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None on non-zero ranks."""
        return self._run_id

    @property
    def experiment_id(self) -> str | None:
        """The run's experiment; None on non-zero ranks, or for an attached run while the server is down."""
        if self._experiment_id is None and self.enabled and self._run_id is not None:
            try:
                self._experiment_id = self._client.get_run(self._run_id).info.experiment_id
            except Exception as err:
                logger.warning("could not look up the experiment of run %s: %s", self._run_id, err)
        return self._experiment_id

    @property
    def spool_dir(self) -> Path | None:
        """Where unsent calls wait; pass it back with `run_id` to resend them after a crash."""
        return self._spool.dir if self._spool else None

    def child(self, run_name: str, tags: Mapping[str, Any] | None = None) -> Tracker:
        """A nested run (one per workflow step) in the same experiment, with its own spool and sender."""
        if not self.enabled:
            return Tracker(self.tracking_uri, self.experiment, enabled=False)
        return Tracker(
            self.tracking_uri,
            self.experiment,
            run_name=run_name,
            parent_run_id=self.run_id,
            tags=tags,
            flush_interval_s=self._flush_interval_s,
            create_timeout_s=self._create_timeout_s,
            _experiment_id=self.experiment_id,
            _spool_root=self._spool.dir / "children" if self._spool else None,
        )

    # ---- logging: append to the spool, never touch the server ---------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Nested dicts become dotted keys; values become strings cut to MLflow's 6000 characters."""
        if not self.active:
            return
        flat = {mlflow_key(k): _param_value(v) for k, v in flatten(params).items()}
        items = list(flat.items())
        for i in range(0, len(items), _BATCH_LIMITS["params"]):
            self._append({"op": "params", "params": dict(items[i : i + _BATCH_LIMITS["params"]])})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Tags are mutable (unlike params): the last value set wins."""
        items = [(str(k), str(v)) for k, v in tags.items()]
        for i in range(0, len(items), _BATCH_LIMITS["tags"]):
            self._append({"op": "tags", "tags": dict(items[i : i + _BATCH_LIMITS["tags"]])})

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Finite numbers only: NaN, inf, None, strings and multi-element tensors are skipped, not raised."""
        if not self.active:
            return
        clean: dict[str, float] = {}
        for key, value in metrics.items():
            number = _finite_float(value)
            if number is None:
                logger.debug("metric %s=%r at step %s skipped (not a finite number)", key, value, step)
            else:
                clean[mlflow_key(key)] = number
        items, ts = list(clean.items()), int(time.time() * 1000)
        for i in range(0, len(items), _BATCH_LIMITS["metrics"]):
            chunk = dict(items[i : i + _BATCH_LIMITS["metrics"]])
            self._append({"op": "metrics", "step": int(step), "ts": ts, "metrics": chunk})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copies the file (or directory) into the spool now: the caller may delete or rewrite it."""
        path = Path(path)
        if not path.exists():
            logger.warning("artifact %s not logged: no such file or directory", path)
            return
        copy = shutil.copytree if path.is_dir() else shutil.copy2
        self._log_file(path.name, artifact_path, lambda target: copy(path, target))

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """JSON, or YAML when `artifact_file` ends in .yaml/.yml."""

        def write(target: Path) -> None:
            if target.suffix in (".yaml", ".yml"):
                import yaml

                target.write_text(yaml.safe_dump(obj, sort_keys=False))
            else:
                target.write_text(json.dumps(obj, indent=2, default=str))

        self._log_file(Path(artifact_file).name, _artifact_dir(artifact_file), write)

    def log_text(self, text: str, artifact_file: str) -> None:
        name, directory = Path(artifact_file).name, _artifact_dir(artifact_file)
        self._log_file(name, directory, lambda target: target.write_text(text, encoding="utf-8"))

    def log_figure(self, fig: Figure, artifact_file: str) -> None:
        """Rendered now (PNG unless the suffix says otherwise), so the figure may be closed or changed after."""
        name, directory = Path(artifact_file).name, _artifact_dir(artifact_file)
        self._log_file(name, directory, lambda target: fig.savefig(target, dpi=100, bbox_inches="tight"))

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything logged so far reached the server; False on timeout (nothing is lost)."""
        if self._spool is None:
            return True
        target = self._spool.written
        if self._stop.is_set():  # closed: no sender left to wait for
            return self._spool.sent >= target
        self._wake.set()
        with self._sent:
            return self._sent.wait_for(lambda: self._spool.sent >= target, timeout=timeout_s)

    def close(self, status: str | None = "FINISHED", timeout_s: float = 60.0) -> None:
        """Send the spool and mark the run `status`; a server still down leaves the spool for a replay.

        `status=None` sends without ending the run: an attached tracker (the Ray Train worker) leaves
        that to the tracker that created the run.
        """
        if self._spool is None or self._closed:
            return
        if status is not None:
            self._append({"op": "terminate", "status": status, "end_time": int(time.time() * 1000)})
        self._closed = True
        done = self.flush(timeout_s)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5.0)  # a daemon: one stuck in a request must not hold up the caller
        if done and not self._thread.is_alive():
            self._spool.remove()
            return
        self._spool.release()
        logger.warning(
            "MLflow at %s did not take all of run %s within %.0fs; the unsent calls are kept in %s. "
            "Resend them with Tracker(%r, %r, run_id=%r, spool_dir=%r).close() once the server is up "
            "(check it with `kdray doctor`).",
            self.tracking_uri,
            self.run_id,
            timeout_s,
            self._spool.dir,
            self.tracking_uri,
            self.experiment,
            self.run_id,
            str(self._spool.dir),
        )

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            self.close("FINISHED")
        else:
            self.close("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    # ---- internals ----------------------------------------------------------------------------------

    @property
    def active(self) -> bool:
        """Whether calls reach MLflow: rank 0, enabled, not closed yet."""
        if self._spool is None:
            return False
        if self._closed:
            logger.debug("tracker of run %s is closed; call ignored", self._run_id)
            return False
        return True

    def _append(self, record: dict[str, Any]) -> None:
        if self.active:
            self._spool.append(record)

    def _log_file(self, name: str, artifact_path: str | None, write: Callable[[Path], Any]) -> None:
        """Write the artifact into its own spool folder now, and queue its upload."""
        if not self.active:
            return
        target = self._spool.dir / "files" / uuid.uuid4().hex / name
        try:
            target.parent.mkdir(parents=True)
            write(target)
        except OSError as err:
            logger.warning("artifact %s not logged: writing it to the spool failed: %s", name, err)
            return
        rel = target.relative_to(self._spool.dir).as_posix()
        self._append({"op": "artifact", "file": rel, "artifact_path": artifact_path})

    def _create_run(self, experiment: str, run_name: str | None, parent: str | None, tags: Mapping) -> str:
        from kdray import __version__

        all_tags = {
            "kdray.version": __version__,
            "kdray.host": socket.gethostname(),  # with the pid: a later run can tell this one was killed
            "kdray.pid": str(os.getpid()),
            **{str(k): str(v) for k, v in tags.items()},
        }
        if commit := git_commit():
            all_tags["mlflow.source.git.commit"] = commit
        if parent:
            all_tags["mlflow.parentRunId"] = parent  # how the MLflow UI nests runs

        def create() -> str:
            if self._experiment_id is None:
                self._experiment_id = _experiment_id(self._client, experiment, self.tracking_uri)
            run = self._client.create_run(self._experiment_id, run_name=run_name, tags=all_tags)
            return run.info.run_id

        deadline, delay = time.monotonic() + self._create_timeout_s, 0.5
        while True:
            try:
                return create()
            except Exception as err:
                if _is_permanent(err):
                    raise
                if time.monotonic() + delay > deadline:
                    raise TrackingUnavailableError(
                        f"MLflow at {self.tracking_uri} did not answer within {self._create_timeout_s:.0f}s "
                        f"({type(err).__name__}: {str(err)[:300]}). Start the server or fix "
                        "tracking.tracking_uri / $MLFLOW_TRACKING_URI (`kdray doctor` checks it), or run "
                        "without tracking with `tracking.enabled: false`."
                    ) from err
                logger.warning(
                    "MLflow at %s unreachable (%s); retrying in %.1fs", self.tracking_uri, err, delay
                )
                time.sleep(delay)
                delay = min(MAX_BACKOFF_S, 2 * delay)

    def _send_loop(self) -> None:
        delay, down = 0.0, False
        while not self._stop.is_set():
            if delay:
                self._stop.wait(delay)
            else:
                self._wake.wait(self._flush_interval_s)
                self._wake.clear()
            try:
                self._drain()
            except Exception as err:  # transient: the server is down or overloaded
                if not down:
                    logger.warning(
                        "MLflow at %s unreachable (%s); buffering in %s and retrying",
                        self.tracking_uri,
                        str(err)[:200],
                        self._spool.dir,
                    )
                down, delay = True, min(MAX_BACKOFF_S, max(0.25, 2 * delay))
                continue
            if down:
                logger.info(
                    "MLflow at %s reachable again; spool of run %s resent", self.tracking_uri, self.run_id
                )
            down, delay = False, 0.0

    def _drain(self) -> None:
        """Send everything in the spool, in order; raise on the first transient error."""
        while not self._stop.is_set():
            records = self._spool.read(self._spool.sent)
            if not records:
                return
            while records:
                unit = _take_unit(records, single=self._spool.sent < self._split_until)
                try:
                    self._send(unit)
                except Exception as err:
                    if not _is_permanent(err):
                        raise
                    if len(unit) > 1:  # find the bad record: resend this stretch one record at a time
                        self._split_until = unit[-1][0]
                        continue
                    logger.warning(
                        "MLflow rejected a %s record of run %s; dropped: %s",
                        unit[0][1].get("op"),
                        self.run_id,
                        err,
                    )
                self._spool.advance(unit[-1][0])
                for _, record in unit:
                    if record.get("op") == "artifact":
                        shutil.rmtree((self._spool.dir / record["file"]).parent, ignore_errors=True)
                with self._sent:
                    self._sent.notify_all()
                records = records[len(unit) :]

    def _send(self, unit: list[tuple[int, dict[str, Any]]]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        first = unit[0][1]
        op = first.get("op")
        if op == "artifact":
            local = self._spool.dir / first["file"]
            if local.is_dir():
                dest = "/".join(p for p in (first["artifact_path"], local.name) if p)
                self._client.log_artifacts(self.run_id, str(local), dest)
            else:
                self._client.log_artifact(self.run_id, str(local), first["artifact_path"])
        elif op == "terminate":
            self._client.set_terminated(self.run_id, first["status"], first["end_time"])
        elif op in _BATCH_LIMITS:
            metrics, params, tags = [], {}, {}
            for _, record in unit:
                for key, value in record.get("metrics", {}).items():
                    metrics.append(Metric(key, value, record["ts"], record["step"]))
                for key, value in record.get("params", {}).items():
                    if params.setdefault(key, value) != value:  # MLflow rejects duplicate keys in a batch
                        logger.warning(
                            "param %s logged twice with different values; kept %r", key, params[key]
                        )
                tags.update(record.get("tags", {}))
            self._client.log_batch(
                self.run_id,
                metrics=metrics,
                params=[Param(k, v) for k, v in params.items()],
                tags=[RunTag(k, v) for k, v in tags.items()],
                synchronous=True,
            )
        else:
            raise ValueError(f"unreadable spool record {first!r}")


def _take_unit(records: list[tuple[int, dict[str, Any]]], single: bool) -> list[tuple[int, dict[str, Any]]]:
    """The next request: one artifact/terminate record, or consecutive metrics/params/tags in one log_batch."""
    if single or records[0][1].get("op") not in _BATCH_LIMITS:
        return records[:1]
    counts = dict.fromkeys(_BATCH_LIMITS, 0)
    unit: list[tuple[int, dict[str, Any]]] = []
    for offset, record in records:
        if record.get("op") not in _BATCH_LIMITS:
            break
        sizes = {kind: len(record.get(kind, ())) for kind in _BATCH_LIMITS}
        over = any(counts[k] + sizes[k] > _BATCH_LIMITS[k] for k in _BATCH_LIMITS)
        if unit and (over or sum(counts.values()) + sum(sizes.values()) > 1000):
            break
        unit.append((offset, record))
        counts = {k: counts[k] + sizes[k] for k in _BATCH_LIMITS}
    return unit


def _is_permanent(err: BaseException) -> bool:
    # local mistakes (a bad record, an artifact store this host cannot write) never heal by waiting
    if isinstance(err, (ValueError, TypeError, KeyError, FileNotFoundError, PermissionError)):
        return True
    return getattr(err, "error_code", None) in _PERMANENT_CODES


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


def artifact_root(tracking_uri: str) -> str | None:
    """Where a new experiment's artifacts go: beside a local SQLite store (`<db dir>/mlartifacts`), not in
    `./mlruns` of whatever directory the process runs in (MLflow's default for a local store); a server
    decides for itself (None)."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///") :]).resolve().parent / "mlartifacts").as_uri()
    return None


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


def _experiment_id(client: Any, name: str, tracking_uri: str = "") -> str:
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
            if err.error_code != "RESOURCE_ALREADY_EXISTS":  # another process created it first
                raise
            experiment = client.get_experiment_by_name(name)
    if experiment.lifecycle_stage == "deleted":
        raise ValueError(f"MLflow experiment {name!r} is deleted; restore it or set tracking.experiment")
    return experiment.experiment_id


def _finite_float(value: Any) -> float | None:
    if isinstance(value, (str, bytes)) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor with more than one element
        return None
    return number if math.isfinite(number) else None


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    return text[:MAX_PARAM_LENGTH]


def _artifact_dir(artifact_file: str) -> str | None:
    parent = Path(artifact_file).parent.as_posix()
    return None if parent in ("", ".") else parent


def retry(fn: Callable[[], Any], *, attempts: int, what: str) -> Any:
    """`fn()`, tried `attempts` times with 2, 4, 8... s between tries; an error no retry can fix
    (MLflow's INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST...) is raised at once. For the calls that
    must block (registering a model, finding a run), unlike logging, which the spool retries forever."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as err:
            if attempt == attempts or _is_permanent(err):
                raise
            logger.warning(
                "%s failed (%s); attempt %d of %d in %ds", what, err, attempt + 1, attempts, 2**attempt
            )
            time.sleep(2**attempt)
    raise AssertionError("unreachable")
