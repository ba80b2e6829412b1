"""One `Tracker`: an MLflow run on rank 0, a no-op on every other rank.

MLflow's client does the sending (`log_batch`, `log_artifact(s)`, `set_terminated`). What it lacks is
durability: its asynchronous logging (`synchronous=False`) holds queued batches in memory, sends them from
a thread pool in no fixed order and drops a batch whose request failed (mlflow.utils.async_logging), so a
server down for a minute, or a crash, would lose metrics. kdray adds a write-ahead log: each call is
appended to a JSONL spool on local disk and returns at once; a daemon thread sends the spool in order,
retrying while the server is down, and a process given the same `spool_dir` resends what a dead one left.
Only `MlflowClient` is used, never the fluent run state: one process holds several trackers (a workflow's
parent run and one nested run per step; a Ray Train rank 0 attached to the driver's run).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from kdray.runs import experiment_id, flatten, git_commit, is_permanent, mlflow_key
from kdray.spool import Records, Spool

logger = logging.getLogger(__name__)

__all__ = ["Tracker", "TrackingUnavailableError"]

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)
MAX_BACKOFF_S = 5.0
# log_batch limits of the MLflow REST API: 1000 metrics, 100 params, 100 tags, 1000 entities in all
_LIMITS = {"metrics": 1000, "params": 100, "tags": 100}
# MLflow reads these per request, process-wide: without them one request to a dead server retries for
# ~4 minutes, while the sender retries by itself. The timeout only bounds a hung server.
_FAIL_FAST_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


class TrackingUnavailableError(RuntimeError):
    """The tracking store did not answer while a run had to be created (the only blocking step)."""


class Tracker:
    """The MLflow run of rank 0: created (nested under `parent_run_id`) or attached by `run_id` (a Ray
    Train worker logging into the driver's run: nothing is sent at construction, so it works with the
    server down). Any other rank, or `enabled=False`, gives a tracker whose calls do nothing, so callers
    never branch on the rank. `log_*` append to the spool (`spool_dir`, default
    `~/.cache/kdray/mlflow-spool/<run_id>`) and return; `close()` waits up to `timeout_s` and, if the
    server is still down, leaves the spool for `Tracker(uri, experiment, run_id=..., spool_dir=...)` to
    resend. Creating a run is the one blocking call: it retries for `create_timeout_s`, then raises
    `TrackingUnavailableError`."""

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
        experiment_id: str | None = None,
    ) -> None:
        self.tracking_uri, self.experiment, self.enabled = tracking_uri, experiment, enabled and rank == 0
        self._run_id, self._experiment_id, self._spool, self._closed = run_id, experiment_id, None, False
        self._flush_interval_s, self._create_timeout_s = flush_interval_s, create_timeout_s
        if not self.enabled:
            return
        from mlflow import MlflowClient

        if tracking_uri.startswith(("http://", "https://")):
            for key, value in _FAIL_FAST_HTTP.items():
                os.environ.setdefault(key, value)  # an explicit user setting wins
        elif tracking_uri.startswith("sqlite:///"):
            Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self._client = MlflowClient(tracking_uri)
        if spool_dir is not None:
            Spool.check_free(Path(spool_dir), run_id)  # before a run is created that could not use it
        if run_id is None:
            self._run_id = self._create_run(run_name, parent_run_id, tags or {})
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kdray" / "mlflow-spool"
        self._spool = Spool.open(Path(spool_dir) if spool_dir else None, root, self._run_id)
        if run_id is not None and tags:
            self.set_tags(tags)
        self._wake, self._stop, self._sent = threading.Event(), threading.Event(), threading.Condition()
        self._thread = threading.Thread(target=self._send_loop, name=f"kdray-mlflow-{self._run_id[:8]}")
        self._thread.daemon = True
        self._thread.start()

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

    @property
    def active(self) -> bool:
        """Whether calls reach MLflow: rank 0, enabled, not closed yet."""
        return self._spool is not None and not self._closed

    def child(self, run_name: str, tags: Mapping[str, Any] | None = None) -> Tracker:
        """A nested run (one per workflow step) in the same experiment, with its own spool and sender."""
        return Tracker(
            self.tracking_uri,
            self.experiment,
            run_name=run_name,
            parent_run_id=self.run_id,
            tags=tags,
            enabled=self.enabled,
            spool_dir=self._spool.dir / "children" / uuid.uuid4().hex[:12] if self._spool else None,
            flush_interval_s=self._flush_interval_s,
            create_timeout_s=self._create_timeout_s,
            experiment_id=self.experiment_id,
        )

    # ---- logging: append to the spool, never touch the server ---------------------------------------

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Nested dicts become dotted keys; values become strings cut to MLflow's 6000 characters."""
        self._append("params", {mlflow_key(k): str(v)[:MAX_PARAM_LENGTH] for k, v in flatten(params).items()})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Tags are mutable (unlike params): the last value set wins."""
        self._append("tags", {str(k): str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Finite numbers only: NaN, inf, None, strings and multi-element tensors are skipped, not raised."""
        clean = {mlflow_key(k): n for k, v in metrics.items() if (n := _finite(v)) is not None}
        self._append("metrics", clean, step=int(step), ts=_now_ms())

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copies the file (or directory) into the spool now: the caller may delete or rewrite it."""
        path = Path(path)
        if not path.exists():
            logger.warning("artifact %s not logged: no such file or directory", path)
            return
        copy = shutil.copytree if path.is_dir() else shutil.copy2
        self._log_file(
            f"{artifact_path}/{path.name}" if artifact_path else path.name, lambda to: copy(path, to)
        )

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        """JSON, or YAML when `artifact_file` ends in .yaml/.yml."""
        import yaml

        yml = artifact_file.endswith((".yaml", ".yml"))
        text = yaml.safe_dump(obj, sort_keys=False) if yml else json.dumps(obj, indent=2, default=str)
        self.log_text(text, artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._log_file(artifact_file, lambda target: target.write_text(text, encoding="utf-8"))

    def log_figure(self, fig: Any, artifact_file: str) -> None:
        """Rendered now (PNG unless the suffix says otherwise): the figure may be closed or changed after."""
        self._log_file(artifact_file, lambda target: fig.savefig(target, dpi=100, bbox_inches="tight"))

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
        `status=None` sends without ending the run: an attached tracker leaves that to the run's owner."""
        if not self.active:
            return
        if status is not None:
            self._spool.append_line(_line({"op": "terminate", "status": status, "end_time": _now_ms()}))
        self._closed = True
        sent = self.flush(timeout_s)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5.0)  # a daemon: one stuck in a request must not hold up the caller
        done = sent and not self._thread.is_alive()  # read once: the sender may end between two reads
        self._spool.release(remove=done)
        if not done:
            where = f"Tracker({self.tracking_uri!r}, {self.experiment!r}, run_id={self.run_id!r}, spool_dir={str(self._spool.dir)!r})"
            logger.warning(
                "MLflow at %s did not take all of run %s within %.0fs; the unsent calls are kept in %s. "
                "Resend them with %s.close() once the server is up (`kdray doctor` checks it).",
                *(self.tracking_uri, self.run_id, timeout_s, self._spool.dir, where),
            )

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        self.close("FINISHED" if exc_type is None else "KILLED" if interrupted else "FAILED")

    # ---- internals ----------------------------------------------------------------------------------

    def _append(self, op: str, items: dict[str, Any], **extra: Any) -> None:
        """One spool line per `log_batch`-sized chunk of `items`."""
        pairs = list(items.items())
        for i in range(0, len(pairs), _LIMITS[op]) if self.active else ():
            self._spool.append_line(_line({"op": op, op: dict(pairs[i : i + _LIMITS[op]]), **extra}))

    def _log_file(self, artifact_file: str, write: Callable[[Path], Any]) -> None:
        """Write the artifact into its own spool folder now, and queue its upload."""
        if not self.active:
            return
        target = self._spool.dir / "files" / uuid.uuid4().hex / Path(artifact_file).name
        try:
            target.parent.mkdir(parents=True)
            write(target)
        except OSError as err:
            logger.warning("artifact %s not logged: writing it to the spool failed: %s", artifact_file, err)
            return
        folder = Path(artifact_file).parent.as_posix()
        record = {"op": "artifact", "file": target.relative_to(self._spool.dir).as_posix()}
        self._spool.append_line(_line({**record, "artifact_path": None if folder == "." else folder}))

    def _create_run(self, run_name: str | None, parent: str | None, tags: Mapping[str, Any]) -> str:
        from kdray import __version__

        # host and pid: a later workflow run can tell that this one's process died (kdray.runs)
        host = {
            "kdray.version": __version__,
            "kdray.host": socket.gethostname(),
            "kdray.pid": str(os.getpid()),
        }
        all_tags = {**host, **{str(k): str(v) for k, v in tags.items()}}
        if commit := git_commit():
            all_tags["mlflow.source.git.commit"] = commit
        if parent:
            all_tags["mlflow.parentRunId"] = parent  # how the MLflow UI nests runs
        deadline, delay = time.monotonic() + self._create_timeout_s, 0.5
        while True:
            try:
                if self._experiment_id is None:
                    self._experiment_id = experiment_id(self._client, self.experiment, self.tracking_uri)
                return self._client.create_run(
                    self._experiment_id, run_name=run_name, tags=all_tags
                ).info.run_id
            except Exception as err:
                if is_permanent(err):
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
        delay = 0.0  # > 0 while the server is down
        while not self._stop.is_set():
            if delay:
                self._stop.wait(delay)
            elif self._wake.wait(self._flush_interval_s):
                self._wake.clear()
            try:
                while not self._stop.is_set() and (records := self._spool.read(self._spool.sent)):
                    for unit in _requests(records):
                        self._deliver(unit)
            except Exception as err:  # transient: the server is down or overloaded
                if not delay:
                    where = (self.tracking_uri, str(err)[:200], self._spool.dir)
                    logger.warning("MLflow at %s unreachable (%s); buffering in %s and retrying", *where)
                delay = min(MAX_BACKOFF_S, max(0.25, 2 * delay))
                continue
            if delay:
                logger.info("MLflow at %s reachable again; run %s resent", self.tracking_uri, self.run_id)
            delay = 0.0

    def _deliver(self, unit: Records) -> None:
        """Send `unit` and mark it sent; a record MLflow rejects for good is found, logged and dropped."""
        try:
            self._send(unit)
        except Exception as err:
            if not is_permanent(err):
                raise
            if len(unit) > 1:  # one bad record: send the others one by one
                for record in unit:
                    self._deliver([record])
                return
            logger.warning(
                "MLflow rejected a %s record of run %s; dropped: %s", unit[0][1].get("op"), self.run_id, err
            )
        self._spool.advance(unit[-1][0])
        if unit[0][1].get("op") == "artifact":
            shutil.rmtree((self._spool.dir / unit[0][1]["file"]).parent, ignore_errors=True)
        with self._sent:
            self._sent.notify_all()

    def _send(self, unit: Records) -> None:
        from mlflow.entities import Metric, Param, RunTag

        first = unit[0][1]
        if first.get("op") == "artifact":
            local = self._spool.dir / first["file"]
            if local.is_dir():
                dest = "/".join(p for p in (first["artifact_path"], local.name) if p)
                return self._client.log_artifacts(self.run_id, str(local), dest)
            return self._client.log_artifact(self.run_id, str(local), first["artifact_path"])
        if first.get("op") == "terminate":
            return self._client.set_terminated(self.run_id, first["status"], first["end_time"])
        if first.get("op") not in _LIMITS:
            raise ValueError(f"unreadable spool record {first!r}")
        metrics, params, tags = [], {}, {}
        for _, record in unit:
            metrics += [
                Metric(k, v, record["ts"], record["step"]) for k, v in record.get("metrics", {}).items()
            ]
            for key, value in record.get("params", {}).items():
                if params.setdefault(key, value) != value:  # MLflow refuses a batch with a key twice
                    logger.warning("param %s logged twice with different values; kept %r", key, params[key])
            tags.update(record.get("tags", {}))
        params_, tags_ = [Param(k, v) for k, v in params.items()], [RunTag(k, v) for k, v in tags.items()]
        self._client.log_batch(self.run_id, metrics=metrics, params=params_, tags=tags_, synchronous=True)


def _requests(records: Records) -> Iterator[Records]:
    """One request each: an artifact or terminate record alone, consecutive metrics/params/tags batched."""
    unit, counts = [], Counter()
    for offset, record in records:
        sizes = Counter({kind: len(record.get(kind, ())) for kind in _LIMITS})
        total = counts + sizes
        batchable = record.get("op") in _LIMITS
        if unit and (not batchable or any(total[k] > _LIMITS[k] for k in _LIMITS) or total.total() > 1000):
            yield unit
            unit, counts = [], Counter()
        if not batchable:
            yield [(offset, record)]
            continue
        unit.append((offset, record))
        counts += sizes
    if unit:
        yield unit


def _line(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def _now_ms() -> int:
    return int(time.time() * 1000)


def _finite(value: Any) -> float | None:
    if isinstance(value, (str, bytes)) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor with more than one element
        return None
    return number if math.isfinite(number) else None
