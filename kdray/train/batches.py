"""Batches as the training worker sees them: regular arrays, a resumable stream, prompts for sampling.

Rows arrive unpadded (`kdray.data.tokenize`: Ray Data hands a column of unequal rows out as an object
array); the worker pads every per-token column once, to the longest row of its own micro-batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from kdray.data.tokenize import TEACHER_RESPONSE_COLUMNS, TOKEN_COLUMNS, row_lengths

#: padding of the columns whose 0 means something (a group index: -1 = in no group)
_FILL = {"xtok_student_group": -1, "xtok_teacher_group": -1}


def _stack(column: Any, width: int, fill: Any) -> np.ndarray:
    rows = [np.asarray(r) for r in column]
    first = rows[0]
    out = np.full((len(rows), width, *first.shape[1:]), fill, dtype=first.dtype)
    for i, r in enumerate(rows):
        n = min(len(r), width)
        out[i, :n] = r[:n]
    return out


def regularize_batch(batch: Mapping[str, Any], pad_id: int) -> dict[str, Any]:
    """Every per-token column as one right-padded array of width max(real tokens), with the
    `attention_mask` of that padding (`row_lengths`); other columns unchanged."""
    lengths = row_lengths(batch)
    width = max(lengths) if lengths else 0
    out = dict(batch)
    for key in TOKEN_COLUMNS:
        if key in batch and key != "attention_mask":
            fill = pad_id if key == "input_ids" else _FILL.get(key, 0)
            out[key] = _stack(batch[key], width, fill)
    out["attention_mask"] = np.arange(width)[None, :] < np.asarray(lengths)[:, None]
    for key in TEACHER_RESPONSE_COLUMNS:
        if key in batch:
            # at least one position, as the teacher's signal has: a batch whose every teacher response
            # was cut away (a prompt filling the teacher's context) keeps a (B, 1) all-False mask
            longest = max([1, *(len(np.asarray(r)) for r in batch[key])])
            out[key] = _stack(batch[key], longest, _FILL.get(key, 0))
    return out


def micro_batches(
    shard: Any, batch_size: int, pad_id: int, *, skip: int = 0, max_epochs: int = 1000
) -> Iterator[dict[str, Any]]:
    """Micro-batches of `batch_size` rows from a Ray Data shard, epoch after epoch, skipping the first
    `skip` (the data position stored in a checkpoint, so a resumed run sees exactly the rows an
    uninterrupted one would). `drop_last` keeps every worker's step count equal.
    """

    def epochs() -> Iterator[dict[str, Any]]:
        for epoch in range(max_epochs):
            count = 0
            for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=True):
                count += 1
                yield regularize_batch(batch, pad_id)
            if count == 0:
                raise RuntimeError(
                    f"this worker's data shard yielded no batch of {batch_size} rows in epoch {epoch}: the dataset "
                    "is empty or smaller than train.batch_size x train.num_workers"
                )

    return itertools.islice(epochs(), skip, None)


def prompts_of(batch: Mapping[str, Any]) -> list[list[int]]:
    """Each row's prompt tokens: everything before its first response token."""
    prompts = []
    for ids, resp, attn in zip(
        batch["input_ids"], batch["response_mask"], batch["attention_mask"], strict=True
    ):
        resp = np.asarray(resp, bool)
        start = int(np.argmax(resp)) if resp.any() else int(np.asarray(attn, bool).sum())
        prompts.append([int(t) for t in np.asarray(ids)[:start]])
    return prompts
