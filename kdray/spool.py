"""The write-ahead log behind `kdray.tracking.Tracker`: MLflow's own asynchronous logging keeps failed
batches nowhere, so every tracking call is first appended here, on local disk, and sent from here."""

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

__all__ = ["Records", "Spool"]

Records = list[tuple[int, dict[str, Any]]]  # spool lines as (byte offset after the line, record)


class Spool:
    """The write-ahead log of one run: `spool.jsonl`, and in `spool.offset` the byte up to which the server
    has it. Appends reach the OS at once (a crash loses nothing logged), the offset is replaced atomically
    and `spool.lock` keeps two live trackers off one spool; artifacts wait as copies under `files/`."""

    def __init__(self, directory: Path, run_id: str, lock_fd: int | None) -> None:
        self.dir, self.path, self._lock_fd, self._mutex = (
            directory,
            directory / "spool.jsonl",
            lock_fd,
            threading.Lock(),
        )
        (directory / "spool.run").write_text(run_id)
        self._file = open(self.path, "ab")  # noqa: SIM115 - open for the tracker's lifetime
        self.written, self.sent = self._file.tell(), _sent_offset(directory)
        if self.sent >= self.written:  # all sent by an earlier tracker, or empty: start afresh
            self._file.truncate(0)
            self.written = 0
            self.advance(0)
        elif self.path.read_bytes()[-1:] != b"\n":  # a crash mid-line: end it, read() drops it
            self.append_line(b"\n")

    @classmethod
    def open(cls, explicit: Path | None, root: Path, run_id: str) -> Spool:
        """`explicit`, else `<root>/<run_id>` (resumed if a dead process left it), else a fresh sibling."""
        fresh = root / f"{run_id}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        for directory in [explicit] if explicit else [root / run_id, fresh]:
            directory.mkdir(parents=True, exist_ok=True)
            try:
                import fcntl
            except ImportError:  # no flock on this OS: no lock
                return cls(directory, run_id, None)
            fd = os.open(directory / "spool.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return cls(directory, run_id, fd)
            except OSError:
                os.close(fd)
        raise ValueError(f"spool dir {explicit} is in use by another live Tracker; give each tracker its own")

    @staticmethod
    def check_free(directory: Path, run_id: str | None) -> None:
        """Refuse a spool holding unsent calls of another run: they would be sent to the wrong run."""
        run_file, log = directory / "spool.run", directory / "spool.jsonl"
        unsent = run_file.is_file() and log.is_file() and log.stat().st_size > _sent_offset(directory)
        if unsent and (other := run_file.read_text().strip()) != run_id:
            raise ValueError(
                f"spool dir {directory} holds unsent calls of run {other}; resend them with Tracker(uri, "
                f"experiment, run_id={other!r}, spool_dir={str(directory)!r}).close() or use another dir"
            )

    def append_line(self, line: bytes) -> None:
        with self._mutex:
            try:
                self._file.write(line)
                self._file.flush()
            except (OSError, ValueError) as err:
                logger.warning("tracking call lost: could not write the spool %s: %s", self.path, err)
                return
            self.written += len(line)

    def read(self, start: int, limit: int = 5000) -> Records:
        """Complete lines from byte `start` on; a line that does not parse comes back as op `unreadable`."""
        out, offset = [], start
        with open(self.path, "rb") as f:
            f.seek(start)
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
        (self.dir / "spool.offset.tmp").write_text(str(offset))
        os.replace(self.dir / "spool.offset.tmp", self.dir / "spool.offset")
        self.sent = offset

    def release(self, remove: bool = False) -> None:
        """Close the log; with `remove` (everything was sent) delete it, keeping a child's unsent spool."""
        self._file.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        if remove:
            for name in ("spool.jsonl", "spool.offset", "spool.run", "spool.lock"):
                (self.dir / name).unlink(missing_ok=True)
            shutil.rmtree(self.dir / "files", ignore_errors=True)
            for directory in (self.dir / "children", self.dir):
                with suppress(OSError):
                    directory.rmdir()


def _sent_offset(directory: Path) -> int:
    try:
        return int((directory / "spool.offset").read_text().strip() or 0)
    except (OSError, ValueError):
        return 0
