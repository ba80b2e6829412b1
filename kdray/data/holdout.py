"""The training and held-out splits of a config, disjoint by construction.

Why: a held-out score means something only if no evaluated prompt was trained on. When the two splits
come from different files (GSM8K's train.jsonl / test.jsonl, Multi30k's train / val, two HF splits),
the files are trusted to be different but not assumed to be: a training row whose prompt also appears in
the held-out split is dropped and counted. When they come from the same rows (one jsonl or parquet file,
a glob, or `split == eval_split`), reading "the first N rows" for evaluation would evaluate on training
data; instead each row goes to one side by a seeded hash of its prompt (`data.holdout_fraction` of the
rows are held out), so the sides cannot share a prompt, duplicates land together, and the assignment of
a row does not change when other rows are added, removed or reordered.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kdray.data.readers import ReadResult, check_not_empty, resolve_files
from kdray.data.records import Record

if TYPE_CHECKING:
    from kdray.config import DataConfig

__all__ = ["holdout_split", "prompt_key", "read_config_split", "shares_rows"]


def prompt_key(record: Record) -> str:
    """Identity of a record's prompt (text or chat messages): two records with the same key would let an
    evaluation see a prompt the student trained on."""
    return hashlib.sha256(json.dumps(record["prompt"], sort_keys=True).encode()).hexdigest()


def holdout_split(records: Sequence[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, held_out): a record is held out when the seeded hash of its prompt, read as a number in
    [0, 1), is below `fraction`. Order within each side is the input order."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"data.holdout_fraction={fraction!r} must be between 0 and 1 (exclusive)")
    train: list[Record] = []
    held: list[Record] = []
    for record in records:
        digest = hashlib.sha256(f"kdray-holdout/{seed}/{prompt_key(record)}".encode()).digest()
        (held if int.from_bytes(digest[:8], "big") / 2**64 < fraction else train).append(record)
    return train, held


def shares_rows(config: DataConfig) -> bool:
    """Whether the training and the held-out split read the same rows: the same split name, or (for file
    sources, where the split names only pick a file in a directory) the same files."""
    if config.split == config.eval_split:
        return True
    if config.source is None or config.format == "generated":
        return False  # the generator draws each split's questions from its own hash range
    fmt, train_files = resolve_files(str(config.source), config.format, config.split)
    if fmt == "multi30k" or not train_files:
        return False  # the reader selects the split inside the dataset (Multi30k, an HF name or directory)
    _, eval_files = resolve_files(str(config.source), config.format, config.eval_split)
    return {Path(f).resolve() for f in train_files} == {Path(f).resolve() for f in eval_files}


def _reader(config: DataConfig) -> Callable[[str, int | None], ReadResult]:
    """read(split, limit) for demonstrations, or preference pairs under `data.preferences`."""
    from kdray.data.preferences import read_preferences
    from kdray.data.readers import read_records

    common: dict[str, Any] = {
        "format": config.format,
        "on_malformed": config.on_malformed,
        "subset": config.subset,
        "seed": config.seed,
        "difficulty": config.difficulty,
    }
    if config.preferences:
        return lambda split, limit: read_preferences(
            config.source, split=split, limit=limit, task=config.task, **common
        )
    return lambda split, limit: read_records(config.task, config.source, split=split, limit=limit, **common)


def read_config_split(config: DataConfig, which: Literal["train", "eval"] = "train") -> ReadResult:
    """The records (or preference pairs) of the training or the held-out split of `config`, with its
    limits (`num_examples`, `eval_examples`), never sharing a prompt with the other split. The result's
    `source` says how the split was drawn and what was dropped, for the run's log."""
    if which not in ("train", "eval"):
        raise ValueError(f"which={which!r} is not one of 'train', 'eval'")
    read = _reader(config)
    limit = config.num_examples if which == "train" else config.eval_examples
    if shares_rows(config):
        everything = read(config.split, None)
        train, held = holdout_split(everything.records, config.holdout_fraction, config.seed)
        side = train if which == "train" else held
        if not side:
            raise ValueError(
                f"holding out data.holdout_fraction={config.holdout_fraction} of the {len(everything.records)} "
                f"rows of {everything.source} leaves the {which} split empty: change data.holdout_fraction, "
                "or give the held-out rows their own file (data.eval_split)"
            )
        how = (
            f"; held out by a hash of each prompt: {len(held)} of {len(everything.records)} rows "
            f"(data.holdout_fraction={config.holdout_fraction}), the other {len(train)} for training"
        )
        return ReadResult(
            records=side[:limit], malformed=everything.malformed, source=everything.source + how
        )
    result = read(config.split if which == "train" else config.eval_split, limit)
    if which == "eval":
        return result
    held_keys = {prompt_key(r) for r in read(config.eval_split, config.eval_examples).records}
    kept = [r for r in result.records if prompt_key(r) not in held_keys]
    if len(kept) < len(result.records):
        result.source += (
            f"; dropped {len(result.records) - len(kept)} training rows whose prompt is also in the "
            f"held-out split {config.eval_split!r}"
        )
        result.records = kept
        check_not_empty(result)
    return result
