"""In-process datasets with the slice of Ray Data's interface the training loop reads (`iter_batches`).

A Tune trial trains one student in its own actor. Reading its data through Ray Data would start read
and map tasks that need CPUs of their own, which the trials already hold (on a small machine the sweep
would wait for itself). A trial's data is small and already made (the teacher-signal cache, or records
to tokenize), so it is read here with pyarrow, in the order and with the values Ray Data would give:
the same rows reach the same optimizer step in a trial and in the workflow's distill step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Batch = dict[str, Any]


def _rows_of(column: Any) -> list[Any]:
    """A batch column as a list of per-row values (arrays stay arrays, strings stay strings)."""
    return list(column)


def _column(values: list[Any]) -> np.ndarray:
    """Rows back into one column: a regular array when every row has one shape, else an object array
    of rows (what Ray Data hands out for a batch spanning blocks padded to different widths)."""
    first = values[0]
    if isinstance(first, np.ndarray):
        if all(isinstance(v, np.ndarray) and v.shape == first.shape for v in values):
            return np.stack(values)
    elif not isinstance(first, (str, bytes)) and first is not None:
        try:
            return np.asarray(values)
        except ValueError:
            pass
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


class LocalDataset:
    """Chunks of rows (dicts of equal-length columns), re-batched on the fly; read again each epoch."""

    def __init__(self, chunks: Callable[[], Iterable[Mapping[str, Any]]], rows: int | None = None) -> None:
        self._chunks = chunks
        self._rows = rows

    @classmethod
    def from_parquet(
        cls,
        files: Sequence[str | Path],
        transform: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
    ) -> LocalDataset:
        """Parquet files read one at a time, in the order given, each passed through `transform`."""
        import pyarrow.parquet as pq
        import ray.data  # noqa: F401  registers Ray's tensor extension types, so tensors read as arrays
        from ray.data.block import BlockAccessor

        paths = [str(f) for f in files]
        if not paths:
            raise FileNotFoundError("no parquet files to read")

        def chunks() -> Iterator[Mapping[str, Any]]:
            for path in paths:
                batch = BlockAccessor.for_block(pq.read_table(path)).to_batch_format("numpy")
                yield transform(batch) if transform else batch

        rows = sum(pq.ParquetFile(p).metadata.num_rows for p in paths)
        return cls(chunks, rows)

    @classmethod
    def from_batches(cls, batches: Sequence[Mapping[str, Any]]) -> LocalDataset:
        """Batches already in memory (e.g. tokenized held-out records)."""
        kept = list(batches)
        return cls(lambda: kept, sum(len(next(iter(b.values()))) for b in kept if b))

    def count(self) -> int | None:
        """Rows, when known without reading them."""
        return self._rows

    def iter_batches(
        self, *, batch_size: int, batch_format: str = "numpy", drop_last: bool = False
    ) -> Iterator[Batch]:
        """Batches of exactly `batch_size` rows in order (the last one shorter unless `drop_last`)."""
        if batch_format != "numpy":
            raise ValueError(f"LocalDataset serves numpy batches only, not {batch_format!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        pending: dict[str, list[Any]] = {}
        start = 0  # rows before it were handed out; the lists are cut back once per chunk, not per batch
        for chunk in self._chunks():
            n = len(next(iter(chunk.values()))) if chunk else 0
            if n == 0:
                continue
            if not pending:
                pending = {k: [] for k in chunk}
            for key, rows in pending.items():
                del rows[:start]
                rows.extend(_rows_of(chunk[key]))
            start = 0
            available = len(next(iter(pending.values())))
            while available - start >= batch_size:
                yield {k: _column(v[start : start + batch_size]) for k, v in pending.items()}
                start += batch_size
        if pending and len(next(iter(pending.values()))) > start and not drop_last:
            yield {k: _column(v[start:]) for k, v in pending.items()}


def tokenized_records(
    records: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    *,
    max_prompt_tokens: int,
    max_response_tokens: int,
    chat_template: bool,
    batch_size: int,
) -> LocalDataset:
    """Records tokenized in this process, `batch_size` rows per chunk (as the Ray Data pipeline cuts
    them): `Tokenize` is the same callable the pipeline maps over its blocks."""
    from kdray.data.tokenize import Tokenize

    tokenize = Tokenize(
        tokenizer,
        max_prompt_tokens=max_prompt_tokens,
        max_response_tokens=max_response_tokens,
        chat_template=chat_template,
    )
    columns = sorted({k for r in records for k in r})
    batches = []
    for start in range(0, len(records), batch_size):
        rows = records[start : start + batch_size]
        batch = {}
        for key in columns:
            values = np.empty(len(rows), dtype=object)
            values[:] = [r.get(key) for r in rows]
            batch[key] = values
        batches.append(tokenize(batch))
    return LocalDataset.from_batches(batches)
