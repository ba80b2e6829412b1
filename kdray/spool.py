"""The on-disk spool behind `kdray.tracking.Tracker`: an append-only JSONL of tracking calls and the
byte offset up to which the server has them.

Appends are flushed to the OS at once, so a crashed process loses nothing it logged; the offset is
replaced atomically, so a crash never leaves it half-written; a lock file keeps two live trackers off
one spool.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import uuid
from contextlib import suppress
from pathlib import Path
from typing import Any

logger = logging.getLogger("kdray.tracking")


class Spool:
    """Append-only JSONL of tracking calls, and the byte offset up to which the server has them."""

    def __init__(self, directory: Path, run_id: str, lock_fd: int | None) -> None:
        self.dir = directory
        self.path = directory / "spool.jsonl"
        self._offset_path = directory / "spool.offset"
        self._lock_fd = lock_fd
        (directory / "spool.run").write_text(run_id)
        self._file = open(self.path, "ab")  # noqa: SIM115 - kept open for the tracker's lifetime
        self.written = self._file.tell()
        self.sent = read_offset(self._offset_path)
        if self.sent >= self.written:  # all sent by an earlier tracker (or empty): start afresh
            self._file.truncate(0)
            self.written = 0
            self.advance(0)
        elif last_byte(self.path) != b"\n":
            self._file.write(b"\n")  # a crash mid-line: terminate it, the reader skips it as unreadable
            self._file.flush()
            self.written = self._file.tell()
        self._lock = threading.Lock()

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), allow_nan=False).encode() + b"\n"
        with self._lock:
            try:
                self._file.write(line)
                self._file.flush()  # to the OS: survives a crash of this process
            except (OSError, ValueError) as err:
                logger.warning("tracking call lost: could not write the spool %s: %s", self.path, err)
                return
            self.written += len(line)

    def read(self, start: int, limit: int = 5000) -> list[tuple[int, dict[str, Any]]]:
        """Complete lines from byte `start` on, as (offset after the line, record)."""
        out: list[tuple[int, dict[str, Any]]] = []
        with open(self.path, "rb") as f:
            f.seek(start)
            offset = start
            for raw in f:
                if not raw.endswith(b"\n") or len(out) >= limit:
                    break
                offset += len(raw)
                try:
                    out.append((offset, json.loads(raw)))
                except ValueError:
                    out.append((offset, {"op": "unreadable", "line": raw[:200].decode(errors="replace")}))
        return out

    def advance(self, offset: int) -> None:
        tmp = self._offset_path.with_suffix(".tmp")
        tmp.write_text(str(offset))
        os.replace(tmp, self._offset_path)  # atomic: a crash never leaves a half-written offset
        self.sent = offset

    def release(self) -> None:
        with self._lock:
            self._file.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def remove(self) -> None:
        """Everything was sent: delete the spool (children's spools, if any, stay)."""
        self.release()
        for name in ("spool.jsonl", "spool.offset", "spool.run", "spool.lock"):
            (self.dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.dir / "files", ignore_errors=True)
        for directory in (self.dir / "children", self.dir):
            with suppress(OSError):
                directory.rmdir()  # not empty while a child's spool is left


def open_spool(explicit: Path | None, root: Path, run_id: str) -> Spool:
    """The explicit dir, else `<root>/<run_id>` (resumed if a dead process left it), else a fresh sibling."""
    candidates = (
        [explicit] if explicit else [root / run_id, root / f"{run_id}-{os.getpid()}-{uuid.uuid4().hex[:6]}"]
    )
    for directory in candidates:
        directory.mkdir(parents=True, exist_ok=True)
        fd = try_lock(directory / "spool.lock")
        if fd is not False:
            return Spool(directory, run_id, fd)
    raise ValueError(f"spool dir {explicit} is in use by another live Tracker; give each tracker its own")


def check_spool_free(directory: Path, run_id: str | None) -> None:
    """Refuse a spool holding unsent calls of another run: they would be sent to the wrong run."""
    run_file = directory / "spool.run"
    if not run_file.is_file() or not (directory / "spool.jsonl").is_file():
        return
    other = run_file.read_text().strip()
    unsent = (directory / "spool.jsonl").stat().st_size > read_offset(directory / "spool.offset")
    if unsent and other != run_id:
        raise ValueError(
            f"spool dir {directory} holds unsent calls of run {other}; resend them with "
            f"Tracker(uri, experiment, run_id={other!r}, spool_dir={str(directory)!r}).close() or use another dir"
        )


def try_lock(path: Path) -> int | bool | None:
    """An exclusive lock on the spool: fd, None where flock does not exist, False if another holder has it."""
    try:
        import fcntl
    except ImportError:
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    return fd


def default_spool_root() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "kdray" / "mlflow-spool"


def read_offset(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)
