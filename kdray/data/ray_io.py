"""Records as a Ray Dataset: the only module of kdray.data that imports Ray.

Parsing happens on the driver (`read_records`), and the records enter Ray through `from_items`. Ray
Data's own `read_json` aborts the whole dataset on one malformed line and reports no line number
(ENVIRONMENT.md); parsing here keeps every good row and names each bad one. This suits the data sizes
of distillation sets (GSM8K: 7.5k rows, Multi30k: 29k pairs); very large corpora will need a sharded
text read with per-line parsing instead.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from kdray.data.readers import read_records
from kdray.data.records import MalformedRow

__all__ = ["read_dataset"]


def read_dataset(
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
    override_num_blocks: int | None = None,
) -> tuple[Any, list[MalformedRow]]:
    """`(ray.data.Dataset of records, malformed rows skipped)`; arguments as in `read_records`.

    Raises like `read_records` (missing path, first malformed row in fail mode, empty source) before any
    Ray work starts, so a bad source fails at submit time rather than as zero batches in the workers.
    """
    import ray.data

    result = read_records(
        task,
        source,
        format=format,
        split=split,
        limit=limit,
        on_malformed=on_malformed,
        subset=subset,
        prefix=prefix,
        seed=seed,
        difficulty=difficulty,
    )
    dataset = ray.data.from_items(result.records, override_num_blocks=override_num_blocks)
    return dataset, result.malformed
