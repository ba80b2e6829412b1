"""One `Tracker`: an MLflow run on rank 0, a no-op on every other rank.

MLflow's client does the sending (`log_batch`, `log_artifacts`, `set_terminated`). What it lacks is
durability: its asynchronous logging (`synchronous=False`) keeps queued batches in memory and drops a
batch whose request failed (mlflow.utils.async_logging), so an outage or a crash loses metrics, and
its artifact calls block. kdray adds only a write-ahead log: each call is appended to a JSONL spool on
local disk and returns; a daemon thread sends the spool in order, retrying while the server is down, and
a tracker given the same `spool_dir` resends what a dead process left. Only `MlflowClient` is used, not
the fluent run state: one process holds several trackers (a workflow's run and one nested run per step).
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from kdray.runs import experiment_id, flatten, git_commit, is_permanent, mlflow_key, retry

logger = logging.getLogger(__name__)

__all__ = ["Tracker", "TrackingUnavailableError"]

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH)
MAX_BACKOFF_S = 5.0
# log_batch limits of the MLflow REST API: 1000 metrics, 100 params, 100 tags
_LIMITS = {"metrics": 1000, "params": 100, "tags": 100}
# MLflow reads these per request, process-wide: without them one request to a dead server retries for
# ~4 minutes, while the sender retries by itself. The timeout only bounds a hung server.
_FAIL_FAST_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
Records = list[tuple[int, dict[str, Any]]]  # spool lines as (byte offset after the line, record)


class TrackingUnavailableError(RuntimeError):
    """The tracking store did not answer while a run had to be created (the only blocking step)."""


class Tracker:
    """The MLflow run of rank 0: created (nested under `parent_run_id`) or attached by `run_id` (a Ray
    Train worker logging into the driver's run; nothing is sent at construction). Any other rank, or
    `enabled=False`, gives a tracker whose calls do nothing, so callers never branch on the rank. `log_*`
    append to the spool and return; `close()` waits up to `timeout_s` and, if the server is still down,
    leaves the spool for `Tracker(uri, experiment, run_id=..., spool_dir=...)` to resend. Creating a run
    is the one blocking call: it retries for `create_timeout_s`, then raises `TrackingUnavailableError`.

    The spool (`spool_dir`, default `~/.cache/kdray/mlflow-spool/<run_id>`) holds `spool.jsonl`, the byte
    up to which the server has it (`spool.offset`, replaced atomically), its run (`spool.run`), artifact
    copies under `files/`, and `spool.lock`, which keeps two live trackers off one spool."""

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
        self._run_id, self._experiment_id, self._dir, self._closed = run_id, None, None, False
        if not self.enabled:
            return
        from mlflow import MlflowClient

        if tracking_uri.startswith(("http://", "https://")):
            for key, value in _FAIL_FAST_HTTP.items():
                os.environ.setdefault(key, value)  # an explicit user setting wins
        elif tracking_uri.startswith("sqlite:///"):
            Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self._client, self._mutex, self._interval_s = (
            MlflowClient(tracking_uri),
            threading.Lock(),
            flush_interval_s,
        )
        if spool_dir and (other := _unsent_run(Path(spool_dir))) not in (None, run_id):
            # checked before creating a run that could not use the spool: those calls belong elsewhere
            raise ValueError(
                f"spool dir {spool_dir} holds unsent calls of run {other}; resend them with Tracker(uri, "
                f"experiment, run_id={other!r}, spool_dir={str(spool_dir)!r}).close() or use another dir"
            )
        self._run_id = run_id or self._create_run(run_name, parent_run_id, tags or {}, create_timeout_s)
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
        self._open_spool(Path(spool_dir) if spool_dir else cache / "kdray" / "mlflow-spool" / self._run_id)
        if run_id and tags:
            self.set_tags(tags)
        self._wake, self._stop, self._sent_cv = threading.Event(), threading.Event(), threading.Condition()
        self._thread = threading.Thread(
            target=self._send_loop, name=f"kdray-mlflow-{self._run_id[:8]}", daemon=True
        )
        self._thread.start()

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None on non-zero ranks."""
        return self._run_id

    @property
    def experiment_id(self) -> str | None:
        """The run's experiment (asked of the server once); None on non-zero ranks."""
        if self._experiment_id is None and self.enabled:
            self._experiment_id = self._client.get_run(self._run_id).info.experiment_id
        return self._experiment_id

    @property
    def active(self) -> bool:
        """Whether calls reach MLflow: rank 0, enabled, not closed yet."""
        return self._dir is not None and not self._closed

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
            self._append_line(
                _line({"op": "terminate", "status": status, "end_time": int(time.time() * 1000)})
            )
        self._closed = True
        sent = self.flush(timeout_s)
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=5.0)  # a daemon: one stuck in a request must not hold up the caller
        done = sent and not self._thread.is_alive()  # read once: the sender may end between two reads
        self._file.close()
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

    # ---- the spool ----------------------------------------------------------------------------------

    def _open_spool(self, directory: Path) -> None:
        """Take `directory` (resuming what a dead process left there) unless a live tracker holds it."""
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = os.open(directory / "spool.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock)
            raise ValueError(
                f"spool dir {directory} is in use by a live Tracker; give each its own"
            ) from None
        self._dir, self._log = directory, directory / "spool.jsonl"
        (directory / "spool.run").write_text(self._run_id)
        self._file = open(self._log, "ab")  # noqa: SIM115 - open for the tracker's lifetime
        self._written, self._sent = self._file.tell(), _sent_offset(directory)
        if self._sent >= self._written:  # all sent by an earlier tracker, or empty: start afresh
            self._file.truncate(0)
            self._written = 0
            self._advance(0)
        elif self._log.read_bytes()[-1:] != b"\n":  # a crash mid-line: end it; `_read` drops it
            self._append_line(b"\n")

    def _append_line(self, line: bytes) -> None:
        """The line reaches the OS at once: a crash of this process loses nothing logged."""
        with self._mutex:
            try:
                self._file.write(line)
                self._file.flush()
            except (OSError, ValueError) as err:
                logger.warning("tracking call lost: could not write the spool %s: %s", self._log, err)
                return
            self._written += len(line)

    def _append(self, op: str, items: dict[str, Any], **extra: Any) -> None:
        """One spool line per `log_batch`-sized chunk of `items`."""
        pairs = list(items.items())
        for i in range(0, len(pairs), _LIMITS[op]) if self.active else ():
            self._append_line(_line({"op": op, op: dict(pairs[i : i + _LIMITS[op]]), **extra}))

    def _log_file(self, artifact_file: str, write: Callable[[Path], Any]) -> None:
        """Write the artifact into a folder of its own in the spool now, and queue its upload."""
        if not self.active:
            return
        folder = self._dir / "files" / uuid.uuid4().hex
        try:
            folder.mkdir(parents=True)
            write(folder / Path(artifact_file).name)
        except OSError as err:
            shutil.rmtree(folder, ignore_errors=True)
            logger.warning("artifact %s not logged: %s", artifact_file, err)
            return
        where = Path(artifact_file).parent.as_posix()
        record = {"op": "artifact", "folder": folder.name, "artifact_path": None if where == "." else where}
        self._append_line(_line(record))

    def _read(self, limit: int = 5000) -> Records:
        """Complete unsent lines; one that does not parse comes back as op `unreadable` (dropped, logged)."""
        out, offset = [], self._sent
        with open(self._log, "rb") as f:
            f.seek(offset)
            for raw in f:
                if not raw.endswith(b"\n") or len(out) >= limit:
                    break
                offset += len(raw)
                try:
                    out.append((offset, json.loads(raw)))
                except ValueError:
                    out.append((offset, {"op": "unreadable", "line": raw[:200].decode(errors="replace")}))
        return out

    def _advance(self, offset: int) -> None:
        (self._dir / "spool.offset.tmp").write_text(str(offset))
        os.replace(self._dir / "spool.offset.tmp", self._dir / "spool.offset")
        self._sent = offset

    # ---- sending ------------------------------------------------------------------------------------

    def _create_run(
        self, name: str | None, parent: str | None, tags: Mapping[str, Any], timeout_s: float
    ) -> str:
        from kdray import __version__

        # host and pid: a later workflow run can tell that this one's process died (kdray.runs)
        all_tags = {
            "kdray.version": __version__,
            "kdray.host": socket.gethostname(),
            "kdray.pid": str(os.getpid()),
        }
        all_tags |= {str(k): str(v) for k, v in tags.items()}
        if commit := git_commit():
            all_tags["mlflow.source.git.commit"] = commit
        if parent:
            all_tags["mlflow.parentRunId"] = parent  # how the MLflow UI nests runs

        def create() -> str:
            self._experiment_id = self._experiment_id or experiment_id(
                self._client, self.experiment, self.tracking_uri
            )
            return self._client.create_run(self._experiment_id, run_name=name, tags=all_tags).info.run_id

        try:
            return retry(create, timeout_s=timeout_s, what=f"creating a run at MLflow {self.tracking_uri}")
        except Exception as err:
            if is_permanent(err):
                raise
            raise TrackingUnavailableError(
                f"MLflow at {self.tracking_uri} did not answer within {timeout_s:.0f}s ({type(err).__name__}: "
                f"{str(err)[:300]}). Start the server or fix tracking.tracking_uri / $MLFLOW_TRACKING_URI "
                "(`kdray doctor` checks it), or run without tracking with `tracking.enabled: false`."
            ) from err

    def _send_loop(self) -> None:
        delay = 0.0  # > 0 while the server is down
        while not self._stop.is_set():
            if delay:
                self._stop.wait(delay)
            elif self._wake.wait(self._interval_s):
                self._wake.clear()
            try:
                while not self._stop.is_set() and (records := self._read()):
                    for unit in _requests(records):
                        self._deliver(unit)
            except Exception as err:  # transient: the server is down or overloaded
                if not delay:
                    where = (self.tracking_uri, str(err)[:200], self._dir)
                    logger.warning("MLflow at %s unreachable (%s); buffering in %s and retrying", *where)
                delay = min(MAX_BACKOFF_S, max(0.25, 2 * delay))
                continue
            if delay:
                logger.info("MLflow at %s reachable again; run %s resent", self.tracking_uri, self.run_id)
            delay = 0.0

    def _deliver(self, unit: Records) -> None:
        """Send `unit` and mark it sent; a record MLflow rejects for good is found, logged and dropped."""
        try:
            self._send([record for _, record in unit])
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
        self._advance(unit[-1][0])
        if unit[0][1].get("op") == "artifact":
            shutil.rmtree(self._dir / "files" / unit[0][1]["folder"], ignore_errors=True)
        with self._sent_cv:
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


def _requests(records: Records) -> Iterator[Records]:
    """Consecutive metrics lines go out as one `log_batch` (at most 1000 metrics); any other line alone."""
    unit, count = [], 0
    for item in records:
        size = len(item[1]["metrics"]) if item[1].get("op") == "metrics" else None
        if unit and (size is None or count + size > _LIMITS["metrics"]):
            yield unit
            unit, count = [], 0
        if size is None:
            yield [item]
        else:
            unit, count = [*unit, item], count + size
    if unit:
        yield unit


def _unsent_run(directory: Path) -> str | None:
    """The run whose calls `directory` holds unsent, if any."""
    run_file, log = directory / "spool.run", directory / "spool.jsonl"
    unsent = run_file.is_file() and log.is_file() and log.stat().st_size > _sent_offset(directory)
    return run_file.read_text().strip() if unsent else None


def _sent_offset(directory: Path) -> int:
    try:
        return int((directory / "spool.offset").read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _line(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def _finite(value: Any) -> float | None:
    if isinstance(value, (str, bytes)) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor with more than one element
        return None
    return number if math.isfinite(number) else None
