"""Read a task's examples from jsonl, parquet, a Multi30k directory, an HF dataset or the generator.

Parsing happens here, in plain Python, one line at a time: Ray Data's `read_json` aborts the whole
dataset on one malformed line (ENVIRONMENT.md), whereas here a bad line is counted with its line number
and skipped (or stops the run, `on_malformed="fail"`). An empty result is an error: Ray Data would
silently yield zero batches and a run would "train" on nothing.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kdray.data.records import ADAPTERS, MalformedRow, Record, adapt_row

__all__ = ["FORMATS", "ReadResult", "detect_format", "read_records"]

FORMATS = ("auto", "jsonl", "json", "parquet", "multi30k", "hf", "generated")
_BIG_FILE = 8 << 20  # show a progress bar (on a TTY only) for files larger than this
_SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".gz": "jsonl"}


@dataclass
class ReadResult:
    """The records read and the rows skipped as malformed (each names its file, line and field)."""

    records: list[Record]
    malformed: list[MalformedRow] = field(default_factory=list)
    source: str = ""

    def summary(self) -> str:
        """One log line: how many records, how many rows skipped and where (the first few)."""
        text = f"read {len(self.records)} records from {self.source}"
        if self.malformed:
            where = ", ".join(f"line {m.line_no} ({m.field or 'line'})" for m in self.malformed[:5])
            more = f" and {len(self.malformed) - 5} more" if len(self.malformed) > 5 else ""
            text += f"; skipped {len(self.malformed)} malformed rows: {where}{more}"
        return text


def _looks_local(source: str) -> bool:
    # hub ids are "org/name"; a path anchor, a glob or a data-file suffix means a local path was meant
    return (
        source.startswith(("/", "./", "../", "~"))
        or any(c in source for c in "*?[")
        or (Path(source).suffix in _SUFFIXES)
    )


def detect_format(source: str, split: str = "train") -> tuple[str, list[Path]]:
    """The reader for `source` and the local files it reads (empty for an HF hub name).

    A directory holding `*.en.gz` is Multi30k; one holding `{split}.jsonl` / `{split}.parquet` reads that
    file (the layout of ../shared/data/gsm8k); a file or glob goes by suffix; anything else is a hub name.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        if sorted(path.glob("*.en.gz")):
            return "multi30k", [path]
        for suffix, fmt in (
            (".jsonl", "jsonl"),
            (".parquet", "parquet"),
            (".json", "json"),
            (".jsonl.gz", "jsonl"),
        ):
            if (path / f"{split}{suffix}").is_file():
                return fmt, [path / f"{split}{suffix}"]
        raise FileNotFoundError(
            f"data directory {path.resolve()} has none of {split}.jsonl, {split}.parquet, {split}.json, "
            f"{split}.jsonl.gz (split {split!r}) nor a Multi30k pair {split}.en.gz/{split}.de.gz; it holds "
            f"{sorted(p.name for p in path.iterdir())[:10]}"
        )
    if path.is_file() or any(c in source for c in "*?[") or _looks_local(source):
        files = _local_files(source)
        kinds = {_SUFFIXES.get(f.suffix) for f in files}
        if len(kinds) != 1 or None in kinds:
            raise ValueError(
                f"cannot tell the format of {source!r} from the suffixes of {[f.name for f in files[:5]]}; "
                f"use files ending in {sorted(_SUFFIXES)} or pass format= explicitly"
            )
        return kinds.pop(), files
    return "hf", []


# --- raw rows: (line number, row or the parse error) -------------------------------------------------


def _open_text(path: Path) -> Any:
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else path.open(encoding="utf-8")


def _progress(lines: Iterable[str], path: Path) -> Iterable[str]:
    """A tqdm bar for big files; tqdm's `disable=None` keeps it silent when stderr is not a TTY (logs, CI)."""
    if path.stat().st_size < _BIG_FILE:
        return lines
    from tqdm.auto import tqdm

    return tqdm(lines, desc=f"reading {path.name}", unit=" lines", disable=None, leave=False)


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """Each non-blank line parsed on its own: one bad line yields its error, never aborts the file."""
    with _open_text(path) as fh:
        for line_no, line in enumerate(_progress(fh, path), start=1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as err:
                yield (
                    line_no,
                    MalformedRow(
                        str(path),
                        line_no,
                        None,
                        f"not valid JSON ({err.msg} at column {err.colno})",
                        "fix or delete the line",
                    ),
                )


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """A `.json` file: a JSON array of rows (numbered by position), or JSON lines despite the suffix."""
    with _open_text(path) as fh:
        head = fh.read(1024).lstrip()
    if not head.startswith("["):
        yield from _jsonl_rows(path)
        return
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}:{err.lineno}: not valid JSON ({err.msg}); the whole array is unusable"
        ) from err
    yield from enumerate(rows, start=1)


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    row_no = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):  # bounded memory on large files
        for row in batch.to_pylist():
            row_no += 1
            yield row_no, row


def _multi30k_rows(directory: Path, split: str) -> Iterator[tuple[int, Any]]:
    """`{split}.en.gz` and `{split}.de.gz`, one sentence a line, zipped into `{source, target}` rows."""
    en, de = directory / f"{split}.en.gz", directory / f"{split}.de.gz"
    missing = [str(p) for p in (en, de) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"Multi30k directory {directory} lacks {missing} for split {split!r}; it holds "
            f"{sorted(p.name for p in directory.glob('*.gz'))}"
        )
    with _open_text(en) as fe, _open_text(de) as fd:
        sources, targets = fe.read().splitlines(), fd.read().splitlines()
    if len(sources) != len(targets):
        raise ValueError(
            f"Multi30k files do not align: {en} has {len(sources)} lines but {de} has {len(targets)}; "
            "each English line must have its German translation on the same line"
        )
    for line_no, (text, target) in enumerate(zip(sources, targets, strict=True), start=1):
        yield line_no, {"source": text, "target": target}


def _hf_rows(source: str, subset: str | None, split: str, files: list[Path]) -> Iterator[tuple[int, Any]]:
    """`datasets.load_dataset`: a hub name, or local files through the json/parquet builders."""
    import datasets

    try:
        if files:
            builder = "parquet" if files[0].suffix == ".parquet" else "json"
            data = datasets.load_dataset(builder, data_files={split: [str(f) for f in files]}, split=split)
        else:
            data = datasets.load_dataset(source, subset, split=split)
    except (OSError, ValueError) as err:  # ConnectionError and the hub's not-found errors are OSErrors
        where = (
            f"local files {[str(f) for f in files]}"
            if files
            else f"HF dataset {source!r} (subset {subset!r})"
        )
        local = Path(source).expanduser().resolve()
        hint = "" if files or local.exists() else f" (not a local path either: {local} does not exist)"
        message = f"could not load {where}, split {split!r}{hint}: {type(err).__name__}: {err}"
        raise (ValueError(message) if isinstance(err, ValueError) else FileNotFoundError(message)) from err
    yield from enumerate(data, start=1)


# --- records -----------------------------------------------------------------------------------------


def raw_rows(
    fmt: str, source: str, files: list[Path], split: str, subset: str | None
) -> Iterator[tuple[str, int, Any]]:
    """(file name, 1-based line/row number, raw row or MalformedRow) over every file of the source."""
    if fmt == "hf":
        label = f"{source}[{split}]" if not files else str(files[0])
        for line_no, row in _hf_rows(source, subset, split, files):
            yield label, line_no, row
        return
    if fmt == "multi30k":
        for line_no, row in _multi30k_rows(files[0], split):
            yield str(files[0] / f"{split}.en.gz"), line_no, row
        return
    readers = {"jsonl": _jsonl_rows, "json": _json_rows, "parquet": _parquet_rows}
    for path in files:
        for line_no, row in readers[fmt](path):
            yield str(path), line_no, row


def _local_files(source: str) -> list[Path]:
    """The files a path or glob names; a miss is an error naming the resolved path."""
    path = Path(source).expanduser()
    is_glob = any(c in source for c in "*?[")
    files = [Path(p) for p in sorted(glob.glob(str(path)))] if is_glob else [path]
    files = [f for f in files if f.is_file()]
    if not files:
        what = "a glob matching no file" if is_glob else "no file or directory"
        raise FileNotFoundError(
            f"data source {source!r} not found: looked for a jsonl/json/parquet file, a directory with "
            f"{{split}}.jsonl or a Multi30k directory; found {what} at {path.resolve()}"
        )
    return files


def resolve_files(source: str, format: str, split: str) -> tuple[str, list[Path]]:
    """The reader and its files for an explicit or `auto` format."""
    if format not in FORMATS:
        raise ValueError(f"data format {format!r} is not one of {FORMATS}")
    if format == "auto":
        return detect_format(source, split)
    path = Path(source).expanduser()
    if format == "hf":  # a hub name or a local directory go to load_dataset as they are; files via builders
        hub_or_dir = path.is_dir() or not (path.exists() or _looks_local(source))
        return "hf", [] if hub_or_dir else _local_files(source)
    if format == "multi30k":
        if not path.is_dir():
            raise FileNotFoundError(f"Multi30k source {source!r} is not a directory ({path.resolve()})")
        return "multi30k", [path]
    if path.is_dir():
        wanted = path / f"{split}.{format}"
        if not wanted.is_file():
            raise FileNotFoundError(f"data directory {path.resolve()} has no {wanted.name} (split {split!r})")
        return format, [wanted]
    return format, _local_files(source)  # an explicit format wins over the suffix


def read_records(
    task: str,
    source: str | os.PathLike[str] | None,
    format: str = "auto",
    split: str = "train",
    limit: int | None = None,
    on_malformed: Literal["skip", "fail"] = "skip",
    subset: str | None = None,
    *,
    prefix: str | None = None,
    seed: int = 0,
    difficulty: int = 2,
) -> ReadResult:
    """The first `limit` good records of `split` (None = all), with every malformed row skipped before them.

    `source=None` (or format `generated`) generates the arithmetic task (`seed`, `difficulty`; size
    `limit`, else `arithmetic.DEFAULT_SIZES[split]`). `prefix` overrides the task's prompt prefix.
    Raises FileNotFoundError for a missing path (naming what was looked for), MalformedRow on the first
    bad row when `on_malformed="fail"`, and ValueError when no record at all was read.
    """
    if task not in ADAPTERS:
        raise ValueError(f"task {task!r} is not one of {sorted(ADAPTERS)}")
    if on_malformed not in ("skip", "fail"):
        raise ValueError(f"on_malformed={on_malformed!r} is not one of 'skip', 'fail'")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit!r} must be >= 1 (or None for all)")
    if source is None or format == "generated":
        return read_generated(task, source, split, limit, seed, difficulty)
    source = os.fspath(source)
    fmt, files = resolve_files(source, format, split)
    if fmt == "multi30k" and task != "translation":
        raise ValueError(f"{source!r} is a Multi30k translation directory but the task is {task!r}")
    result = ReadResult(records=[], source=f"{source} ({fmt}, split {split!r})")
    for label, line_no, row in raw_rows(fmt, source, files, split, subset):
        try:
            if isinstance(row, MalformedRow):
                raise row
            record = adapt_row(task, row, source=label, line_no=line_no, prefix=prefix)
        except MalformedRow as bad:
            if on_malformed == "fail":
                raise
            result.malformed.append(bad)
            continue
        if record["id"] is None:  # stable per source and line, so caches and logs can point at the row
            record["id"] = f"{Path(label).name}:{line_no}"
        result.records.append(record)
        if limit is not None and len(result.records) >= limit:
            break
    check_not_empty(result)
    return result


def read_generated(
    task: str,
    source: Any,
    split: str,
    limit: int | None,
    seed: int,
    difficulty: int,
    generate: Callable[..., list[dict[str, Any]]] | None = None,
    what: str = "arithmetic",
) -> ReadResult:
    """The records of `format: generated`: `generate(n, seed, difficulty, split=split)` (default: the
    arithmetic task's prompts and answers; the preference reader passes its pair generator), with the
    checks both share: no source, only the arithmetic task, a known split."""
    from kdray.data.arithmetic import DEFAULT_SIZES, generate_arithmetic

    if source is not None:
        raise ValueError(f"format='generated' takes no source (got {source!r}); drop data.source")
    if task != "arithmetic":
        raise ValueError(f"only the 'arithmetic' task is generated; task {task!r} needs a data source")
    if split not in DEFAULT_SIZES:
        raise ValueError(f"generated arithmetic has splits {sorted(DEFAULT_SIZES)}, not {split!r}")
    n = limit if limit is not None else DEFAULT_SIZES[split]
    records = (generate or generate_arithmetic)(n, seed, difficulty, split=split)
    return ReadResult(
        records=records, source=f"generated {what} (seed {seed}, difficulty {difficulty}, {split})"
    )


def check_not_empty(result: ReadResult) -> None:
    if result.records:
        return
    detail = (
        f"; all {len(result.malformed)} rows were malformed, the first: {result.malformed[0]}"
        if result.malformed
        else ""
    )
    raise ValueError(f"no records read from {result.source}: the source is empty{detail}")
