"""The teacher-signal cache: scored data written once as parquet, read back by later runs and Tune trials.

Keyed by everything that changes the signal (ARCHITECTURE.md): teacher id + revision, tokenizer, k,
temperature, the data, and the package version. A cache entry counts only once its `_SUCCESS` file
exists, written after every row landed, so an interrupted write is never read as complete.

`content_fingerprint` and `code_fingerprint` identify local files (data, checkpoints) and the package's
code by content: the workflow's step keys hash them, so an edited file or module re-runs what it feeds.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

#: the teacher signal as stored: k ids and k log-probs per real token, 4k bytes in compact form
#: (uint16 ids with a vocabulary of at most 65536, float16 log-probs): 256 at k = 64
SIGNAL_COLUMNS = ("topk_ids", "topk_logprobs")
#: what a teacher pass returns but no loss reads from the cache, so it is not stored: the log-prob of the
#: realized token is read only by MiniLLM's reward, on the student's own samples, which the teacher pool
#: scores live. Its 2 bytes per token were what kept the stored signal above 4k.
NOT_CACHED = ("token_logprobs",)


def fingerprint(items: Iterable[Any]) -> str:
    """sha256 over the JSON of each item, in order."""
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps(item, sort_keys=True, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identity of a tokenizer by its vocabulary (ids and pieces) and chat template."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return fingerprint([vocab, getattr(tokenizer, "chat_template", None)])


# memo of file digests: (resolved path, size, mtime_ns) -> sha256, so a checkpoint hashed by two steps (or
# two trials' keys) of one process is read once; an edit changes the size or the mtime and misses the memo
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}
_CHUNK = 1 << 20


def _file_digest(path: Path) -> str:
    """sha256 of one file's bytes, memoised per process by (resolved path, size, mtime_ns)."""
    resolved = path.resolve()
    stat = resolved.stat()
    memo = (str(resolved), stat.st_size, stat.st_mtime_ns)
    digest = _FILE_DIGESTS.get(memo)
    if digest is None:
        h = hashlib.sha256()
        with resolved.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        digest = _FILE_DIGESTS[memo] = h.hexdigest()
    return digest


def _tree_files(root: Path) -> list[tuple[str, Path]]:
    """(path relative to `root`, path) of every file under the directory `root`, hidden ones skipped."""
    found = []
    for here, dirs, files in os.walk(root, followlinks=True):  # HF snapshots are trees of symlinks
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            path = Path(here) / name
            if not name.startswith(".") and path.is_file():
                found.append((path.relative_to(root).as_posix(), path))
    return found


def _digest_files(files: Iterable[tuple[str, Path]]) -> str:
    """sha256 over (relative path, file sha256) of each file, sorted by relative path."""
    h = hashlib.sha256()
    for rel, path in sorted(files, key=lambda pair: pair[0]):
        h.update(f"{rel}\0{_file_digest(path)}\n".encode())
    return h.hexdigest()


def content_fingerprint(source: str | os.PathLike[str] | None) -> str | None:
    """The identity of the local data a config field names, by content: what a workflow step's cache key
    hashes besides the config, so editing a data file (or retraining a checkpoint in place) re-runs the
    steps that read it instead of reusing outputs computed from the old bytes.

    A file: sha256 of its bytes (not its path: a copy hashes the same). A directory: sha256 over
    (relative path, file sha256) of every file under it, sorted, hidden files and directories skipped.
    A glob (`*`, `?`, `[`): the matched files hashed the same way, relative to the pattern's fixed
    prefix. None for None and for anything that is not a local path (a hub id such as `org/name`).
    File digests are memoised per process by (resolved path, size, mtime_ns).
    """
    if source is None:
        return None
    text = os.path.expanduser(os.fspath(source))
    if any(c in text for c in "*?["):
        parts = Path(text).parts
        fixed = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), len(parts))
        root = Path(*parts[:fixed]) if fixed else Path(".")
        files: list[tuple[str, Path]] = []
        for match in sorted(glob.glob(text, recursive=True)):
            path = Path(match)
            if path.is_dir():
                rel = path.relative_to(root).as_posix()
                files.extend((f"{rel}/{inner}", p) for inner, p in _tree_files(path))
            elif path.is_file():
                files.append((path.relative_to(root).as_posix(), path))
        return _digest_files(files)
    path = Path(text)
    if path.is_file():
        return _file_digest(path)
    if path.is_dir():
        return _digest_files(_tree_files(path))
    return None


@functools.cache
def code_fingerprint() -> str:
    """The code version that produced a cached output: sha256 over the sorted relative paths and bytes of
    every `.py` file of the installed `kdray` package. Unlike `__version__`, it changes with every edit,
    so a step's cache is not reused across a code change that may change its outputs. Memoised."""
    import kdray

    package = Path(kdray.__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(package.rglob("*.py"), key=lambda p: p.relative_to(package).as_posix()):
        rel = path.relative_to(package)
        if any(part.startswith(".") for part in rel.parts):
            continue
        data = path.read_bytes()
        h.update(f"{rel.as_posix()}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def signal_cache_key(
    *,
    teacher: str,
    revision: str | None,
    tokenizer: str,
    top_k: int | None,
    temperature: float,
    data: str,
    version: str,
) -> str:
    """The cache key: a short hash of every input that changes the teacher signal."""
    parts = {
        "teacher": teacher,
        "revision": revision,
        "tokenizer": tokenizer,
        "top_k": top_k,
        "temperature": temperature,
        "data": data,
        "version": version,
    }
    return fingerprint([parts])[:20]


def _per_column(batch: Mapping[str, Any], convert: Any) -> dict[str, Any]:
    """Apply `convert({key: array})` to each signal column; row by row where Ray hands out an object
    array of ragged rows (a batch spanning blocks padded to different widths)."""
    out = dict(batch)
    for key in SIGNAL_COLUMNS:
        column = batch.get(key)
        if column is None:
            continue
        if np.asarray(column).dtype == object:
            rows = np.empty(len(column), dtype=object)
            rows[:] = [convert({key: np.asarray(r)})[key] for r in column]
            out[key] = rows
        else:
            out[key] = convert({key: column})[key]
    return out


def _compact_batch(batch: Mapping[str, Any], vocab_size: int) -> Any:
    """The stored form of a scored block, as an Arrow table whose every array column is variable-shaped.

    Why: blocks are padded to their own widths, so as fixed-shape tensors no two share a schema, and the
    Parquet writer cannot put blocks of different schemas in one file (one file per block made the cache
    slow to read). Variable-shaped tensors of one dtype and rank give every block the same schema."""
    import pyarrow as pa
    from ray.data.extensions import ArrowVariableShapedTensorArray

    from kdray.data.tokenize import unpadded
    from kdray.teacher.signal_store import compact

    kept = {key: value for key, value in batch.items() if key not in NOT_CACHED}
    # rows come unpadded from the teacher's scorer; a source that still pads (has `attention_mask`) is cut
    out = unpadded(_per_column(kept, lambda cols: compact(cols, vocab_size)))
    columns = {}
    for key, value in out.items():
        value = np.asarray(value)
        rows = value if value.ndim > 1 else None
        if value.dtype == object and len(value) and isinstance(value[0], np.ndarray):
            rows = value  # ragged rows already (a batch spanning blocks)
        columns[key] = (
            pa.array(value) if rows is None else ArrowVariableShapedTensorArray.from_numpy(list(rows))
        )
    return pa.table(columns)


def _expand_batch(batch: Mapping[str, Any]) -> dict[str, Any]:
    from kdray.teacher.signal_store import expand

    return _per_column(batch, expand)


def keep_order(ds: Any) -> Any:
    """`ds` with block order preserved in its own execution options: a Dataset copies Ray Data's context
    when it is made, so setting the process-wide option afterwards (`pipeline.deterministic_order`)
    would not reach one made before."""
    ds.context.execution_options.preserve_order = True
    return ds


#: in-memory bytes of scored rows gathered into one cache file (the files on disk are smaller, compressed)
SIGNAL_FILE_BYTES = 64 << 20


class SignalCache:
    """A directory of cache entries, one per key."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser()

    def path(self, key: str) -> Path:
        """Where entry `key` lives."""
        return self.root / key

    def complete(self, key: str) -> bool:
        """True when entry `key` was written to the end."""
        return (self.path(key) / "_SUCCESS").is_file()

    def metadata(self, key: str) -> dict[str, Any]:
        """What was recorded with the entry (row count, teacher, k, ...)."""
        return json.loads((self.path(key) / "_SUCCESS").read_text())

    def write(self, ds: Any, key: str, *, vocab_size: int, meta: Mapping[str, Any] | None = None) -> int:
        """Write a scored dataset (compact: uint16/int32 ids, float16 log-probs); returns the row count."""
        import pyarrow.parquet as pq

        final, tmp = self.path(key), self.root / f".{key}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        stored = ds.map_batches(_compact_batch, fn_kwargs={"vocab_size": vocab_size}, batch_size=None)
        keep_order(stored)
        # Written here, in the order the rows come: Ray Data's own write_parquet names and fills its files
        # in the order its write tasks finish, so the rows of a cache entry (the order students read)
        # changed from run to run. Few large files, not one per scoring batch: each file costs the
        # reader a Ray task, which on a small machine took longer than the rows.
        rows, writer, held, index = 0, None, 0, 0
        try:
            for table in stored.iter_batches(batch_size=None, batch_format="pyarrow"):
                if writer is not None and (held >= SIGNAL_FILE_BYTES or table.schema != writer.schema):
                    writer.close()
                    writer, held, index = None, 0, index + 1
                if writer is None:
                    writer = pq.ParquetWriter(str(tmp / f"part-{index:05d}.parquet"), table.schema)
                writer.write_table(table)
                rows, held = rows + table.num_rows, held + table.nbytes
        finally:
            if writer is not None:
                writer.close()
        (tmp / "_SUCCESS").write_text(json.dumps({"rows": rows, "key": key, **(meta or {})}, default=str))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        return rows

    def read(self, key: str) -> Any:
        """The cached scored dataset, with the wire dtypes restored, through the same interface as live
        scoring (a Ray Dataset with the same columns)."""
        import ray.data

        if not self.complete(key):
            raise FileNotFoundError(
                f"no complete teacher-signal cache entry {key!r} under {self.root} (missing {self.path(key)}/_SUCCESS)"
            )
        ds = ray.data.read_parquet([str(f) for f in self.files(key)])
        return keep_order(ds.map_batches(_expand_batch, batch_size=None))

    def files(self, key: str) -> list[Path]:
        """The entry's parquet files in write order (`part-NNNNN`, numbered as written): every reader (Ray
        Data here, a Tune trial's in-process reader) sees the rows in the order they were scored."""
        if not self.complete(key):
            raise FileNotFoundError(
                f"no complete teacher-signal cache entry {key!r} under {self.root} (missing {self.path(key)}/_SUCCESS)"
            )
        return sorted(self.path(key).glob("*.parquet"))

    def local(self, key: str) -> Any:
        """The entry as a `LocalDataset` read with pyarrow in this process (no Ray Data tasks): what a
        Tune trial trains on, in the same row order and with the same dtypes as `read`."""
        from kdray.data.local import LocalDataset

        return LocalDataset.from_parquet(self.files(key), transform=_expand_batch)
