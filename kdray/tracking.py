"""One `Tracker`: an MLflow run on rank 0, a no-op on every other rank.

MLflow's client does the sending (`log_batch`, `log_artifacts`, `set_terminated`). What it lacks is
durability: its asynchronous logging (`synchronous=False`) keeps queued batches in memory and drops a
batch whose request failed (mlflow.utils.async_logging), so an outage or a crash loses metrics, and
its artifact calls block. kdray adds only a write-ahead spool: each call becomes one numbered record
file, renamed into place whole, and returns; a daemon thread sends the records in order, retrying while
the server is down, and deletes each one MLflow has taken. What is on disk is exactly what is unsent.
Only `MlflowClient` is used, not the fluent run state: one process holds several trackers (a workflow's
run and one nested run per step).
"""

from __future__ import annotations

import fcntl
import itertools
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kdray.runs import TrackingUnavailableError, create_run, finite_number, flatten, is_permanent, mlflow_key

logger = logging.getLogger(__name__)

__all__ = ["Tracker", "TrackingUnavailableError"]

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)
RETRY_S = 1.0  # between tries while the server is down
# items per record: at most 100 params or tags per `log_batch` (MLflow's REST API); metrics records are
# sent 10 at a time, under its limit of 1000 metrics
_LIMITS = {"metrics": 100, "params": 100, "tags": 100}
# MLflow reads these per request, process-wide: without them one request to a dead server retries for
# ~4 minutes, while the sender retries by itself. The timeout only bounds a hung server.
_FAIL_FAST_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
Records = list[tuple[Path, dict[str, Any]]]  # unsent records as (file, record), oldest first


class Tracker:
    """The MLflow run of rank 0: created (nested under `parent_run_id`) or attached by `run_id` (a Ray
    Train worker logging into the driver's run; nothing is sent at construction). Any other rank, or
    `enabled=False`, gives a tracker whose calls do nothing, so callers never branch on the rank. `log_*`
    write to the spool and return; `close()` waits up to `timeout_s`, and if the server is still down
    leaves the spool for `Tracker(uri, experiment, run_id=..., spool_dir=...)` to resend. Creating a run
    is the one blocking call (`kdray.runs.create_run`).

    The spool (`spool_dir`, default `~/.cache/kdray/mlflow-spool/<run_id>`): `<n>.json` per unsent call,
    an artifact's copy in a folder of `files/`, the run in `spool.run`, and `spool.lock` held by the live tracker."""

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
    ) -> None:
        self.tracking_uri, self.experiment, self.enabled = tracking_uri, experiment, enabled and rank == 0
        self.run_id, self._experiment_id, self._dir, self._closed = run_id, None, None, False
        if not self.enabled:
            return
        from mlflow import MlflowClient

        if tracking_uri.startswith(("http://", "https://")):
            for key, value in _FAIL_FAST_HTTP.items():
                os.environ.setdefault(key, value)  # an explicit user setting wins
        elif tracking_uri.startswith("sqlite:///"):
            Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self._client, self._mutex = MlflowClient(tracking_uri), threading.Lock()
        self._interval_s = flush_interval_s
        unsent = spool_dir is not None and any(Path(spool_dir).glob("*.json"))
        if unsent and (other := (Path(spool_dir) / "spool.run").read_text().strip()) != run_id:
            # checked before creating a run that could not use the spool: those calls belong elsewhere
            raise ValueError(
                f"spool dir {spool_dir} holds unsent calls of run {other}; resend them with Tracker(uri, "
                f"experiment, run_id={other!r}, spool_dir={str(spool_dir)!r}).close() or use another dir"
            )
        if run_id is None:
            kwargs = {"name": run_name, "parent": parent_run_id, "tags": tags, "timeout_s": create_timeout_s}
            self.run_id, self._experiment_id = create_run(self._client, experiment, tracking_uri, **kwargs)
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        self._open_spool(Path(spool_dir) if spool_dir else cache / "kdray" / "mlflow-spool" / self.run_id)
        if run_id and tags:
            self.set_tags(tags)
        self._wake, self._stop, self._sent_cv = threading.Event(), threading.Event(), threading.Condition()
        self._thread = threading.Thread(target=self._send_loop, name=f"mlflow-{self.run_id[:8]}", daemon=True)
        self._thread.start()

    @property
    def experiment_id(self) -> str | None:
        """The run's experiment (asked of the server once); None on non-zero ranks."""
        if self._experiment_id is None and self.enabled:
            self._experiment_id = self._client.get_run(self.run_id).info.experiment_id
        return self._experiment_id

    @property
    def active(self) -> bool:
        """Whether calls reach MLflow: rank 0, enabled, not closed yet."""
        return self._dir is not None and not self._closed

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Nested dicts become dotted keys; values become strings cut to MLflow's 6000 characters."""
        self._append("params", {mlflow_key(k): str(v)[:MAX_PARAM_LENGTH] for k, v in flatten(params).items()})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Tags are mutable (unlike params): the last value set wins."""
        self._append("tags", {str(k): str(v) for k, v in tags.items()})

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """Finite numbers only: NaN, inf, None, strings and multi-element tensors are skipped, not raised."""
        clean = {mlflow_key(k): n for k, v in metrics.items() if (n := finite_number(v)) is not None}
        self._append("metrics", clean, step=int(step), ts=int(time.time() * 1000))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copies the file (or directory) into the spool now: the caller may delete or rewrite it."""
        path = Path(path)
        copy = shutil.copytree if path.is_dir() else shutil.copy2
        self._log_file(f"{artifact_path or '.'}/{path.name}", lambda to: copy(path, to))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._log_file(artifact_file, lambda target: target.write_text(text, encoding="utf-8"))

    def log_figure(self, fig: Any, artifact_file: str) -> None:
        """Rendered now (PNG unless the suffix says otherwise): the figure may be closed or changed after."""
        self._log_file(artifact_file, lambda target: fig.savefig(target, dpi=100, bbox_inches="tight"))

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything logged so far reached the server; False on timeout (nothing is lost)."""
        if self._dir is None:
            return True
        target = self._written
        if self._stop.is_set():  # closed: no sender left to wait for
            return self._sent >= target
        self._wake.set()
        with self._sent_cv:
            return self._sent_cv.wait_for(lambda: self._sent >= target, timeout=timeout_s)

    def close(self, status: str | None = "FINISHED", timeout_s: float = 60.0) -> None:
        """Send the spool and mark the run `status`; a server still down leaves the spool for a replay.
        `status=None` sends without ending the run: an attached tracker leaves that to the run's owner."""
        if not self.active:
            return
        if status is not None:
            self._write({"op": "terminate", "status": status, "end_time": int(time.time() * 1000)})
        self._closed = True
        sent = self.flush(timeout_s)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5.0)  # a daemon: one stuck in a request must not hold up the caller
        done = sent and not self._thread.is_alive()  # read once: the sender may end between two reads
        os.close(self._lock)
        if done:  # everything sent: the spool goes
            return shutil.rmtree(self._dir, ignore_errors=True)
        resend = f"Tracker({self.tracking_uri!r}, {self.experiment!r}, run_id={self.run_id!r}, spool_dir={str(self._dir)!r})"
        logger.warning(
            "MLflow at %s did not take all of run %s within %.0fs; the unsent calls are kept in %s. "
            "Resend them with %s.close() once the server is up (`kdray doctor` checks it).",
            *(self.tracking_uri, self.run_id, timeout_s, self._dir, resend),
        )

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        interrupted = exc_type is not None and issubclass(exc_type, KeyboardInterrupt)
        self.close("FINISHED" if exc_type is None else "KILLED" if interrupted else "FAILED")

    def _open_spool(self, directory: Path) -> None:
        """Take `directory` (resuming what a dead process left there) unless a live tracker holds it."""
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(directory / "spool.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock)
            raise ValueError(f"spool dir {directory} is held by a live Tracker; give each its own") from None
        for torn in directory.glob("*.tmp"):  # a crash mid-write: that call never returned
            torn.unlink()
        (directory / "spool.run").write_text(self.run_id)
        numbers = sorted(int(path.stem) for path in directory.glob("*.json")) or [0, -1]  # none: 0 and 0
        self._dir, self._sent, self._written = directory, numbers[0], numbers[-1] + 1

    def _append(self, op: str, items: dict[str, Any], **extra: Any) -> None:
        """One record per `log_batch`-sized chunk of `items`."""
        pairs = list(items.items())
        for i in range(0, len(pairs), _LIMITS[op]) if self.active else ():
            self._write({"op": op, op: dict(pairs[i : i + _LIMITS[op]]), **extra})

    def _log_file(self, artifact_file: str, write: Callable[[Path], Any]) -> None:
        """Queue an upload of what `write` puts into the record's own folder, written now."""
        where = Path(artifact_file).parent.as_posix()
        record = {"op": "artifact", "artifact_path": None if where == "." else where}
        self._write(record, lambda folder: write(folder / Path(artifact_file).name))

    def _write(self, record: dict[str, Any], files: Callable[[Path], Any] | None = None) -> None:
        """Record number n is whole on disk (renamed into place) before n + 1 starts, and before the
        caller goes on: a crash of this process loses nothing it logged, and the sender never sees a gap."""
        if not self.active:
            return
        with self._mutex:
            name, folder = f"{self._written:012d}", self._dir / "files" / os.urandom(8).hex()  # not reused
            try:
                if files is not None:
                    folder.mkdir(parents=True)
                    files(folder)
                    record = {**record, "folder": folder.name}
                (self._dir / f"{name}.tmp").write_bytes(json.dumps(record, allow_nan=False).encode())
                os.replace(self._dir / f"{name}.tmp", self._dir / f"{name}.json")
            except OSError as err:
                shutil.rmtree(folder, ignore_errors=True)
                logger.warning("%s call lost: could not write the spool %s: %s", record["op"], self._dir, err)
                return
            self._written += 1

    def _unsent(self, limit: int = 5000) -> list[Records]:
        """The oldest unsent records as requests: up to 10 consecutive metrics records (of at most 100
        metrics each; `log_batch` takes 1000) in one, any other record alone."""
        records = [(path, _load(path)) for path in sorted(self._dir.glob("*.json"))[:limit]]
        units = []
        for op, group in itertools.groupby(records, lambda item: item[1].get("op")):
            items, size = list(group), 10 if op == "metrics" else 1
            units += [items[i : i + size] for i in range(0, len(items), size)]
        return units

    def _send_loop(self) -> None:
        """Send what the spool holds every `flush_interval_s` (at once when woken), in order; while the
        server is down, try again every `RETRY_S`: `log_*` never wait for it."""
        down = False
        while not self._stop.wait(RETRY_S if down else 0):
            if not down and self._wake.wait(self._interval_s):
                self._wake.clear()
            try:
                while not self._stop.is_set() and (units := self._unsent()):
                    for unit in units:
                        self._deliver(unit)
            except Exception as err:  # transient: the server is down or overloaded
                if not down:
                    where = (self.tracking_uri, str(err)[:200], self._dir)
                    logger.warning("MLflow at %s unreachable (%s); buffering in %s and retrying", *where)
                down = True
                continue
            if down:
                logger.info("MLflow at %s reachable again; run %s resent", self.tracking_uri, self.run_id)
            down = False

    def _deliver(self, unit: Records) -> None:
        """Send `unit` and delete it; a record MLflow rejects for good is found, logged and dropped."""
        try:
            self._send([record for _, record in unit])
        except Exception as err:
            if not is_permanent(err):
                raise
            if len(unit) > 1:  # one bad record: send the others one by one
                for item in unit:
                    self._deliver([item])
                return
            op = unit[0][1].get("op")
            logger.warning("dropped a %s record of run %s that cannot be sent: %s", op, self.run_id, err)
        for path, record in unit:
            if record.get("op") == "artifact":
                shutil.rmtree(self._dir / "files" / record["folder"], ignore_errors=True)
            path.unlink(missing_ok=True)
        with self._sent_cv:
            self._sent = int(unit[-1][0].stem) + 1
            self._sent_cv.notify_all()

    def _send(self, records: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric, Param, RunTag

        first, op = records[0], records[0].get("op")
        if op == "artifact":  # the folder holds the one file or directory logged
            folder = self._dir / "files" / first["folder"]
            return self._client.log_artifacts(self.run_id, str(folder), first["artifact_path"])
        if op == "terminate":
            return self._client.set_terminated(self.run_id, first["status"], first["end_time"])
        if op not in _LIMITS:
            raise ValueError(f"unreadable spool record {first!r}")
        metrics = [Metric(k, v, r["ts"], r["step"]) for r in records for k, v in r.get("metrics", {}).items()]
        params = [Param(k, v) for k, v in first.get("params", {}).items()]
        tags = [RunTag(k, v) for k, v in first.get("tags", {}).items()]
        self._client.log_batch(self.run_id, metrics=metrics, params=params, tags=tags, synchronous=True)


def _load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_bytes())
    except ValueError:  # refused by `_send` as a bad record: logged and dropped
        return {"op": "unreadable", "file": str(path)}
