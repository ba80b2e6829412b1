"""Held-out means held out: for every kind of source, the evaluation split shares no prompt with training."""

from __future__ import annotations

import json

import pytest

from kdray.config import DataConfig
from kdray.data import read_config_split
from kdray.data.holdout import holdout_split, prompt_key, shares_rows


def _rows(n: int, start: int = 0) -> list[dict[str, str]]:
    return [{"question": f"Tom has {i} apples and buys 2. How many?", "answer": f"{i}+2={i + 2}\n#### {i + 2}"}
            for i in range(start, start + n)]  # fmt: skip


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _both(config: DataConfig) -> tuple[list, list]:
    return read_config_split(config, "train").records, read_config_split(config, "eval").records


def _overlap(train, held) -> set[str]:
    return {prompt_key(r) for r in train} & {prompt_key(r) for r in held}


def test_one_file_is_split_by_prompt_hash_with_no_row_in_common(tmp_path):
    rows = _rows(300)
    source = _write(tmp_path / "all.jsonl", rows + rows[:20])  # duplicates must land on one side
    config = DataConfig(task="gsm8k", source=str(source), eval_examples=None, holdout_fraction=0.2)
    assert shares_rows(config)
    train, held = _both(config)
    assert _overlap(train, held) == set()
    assert len(train) + len(held) == 320 and 30 <= len(held) <= 90  # ~20% of 300 prompts
    # the first rows of the file are not the held-out split (what a plain read of "test" would return)
    assert [r["prompt"] for r in held[:16]] != [r["prompt"] for r in train[:16]]
    # a row's side depends on its prompt alone: reordering and appending rows moves nobody
    _write(tmp_path / "all.jsonl", list(reversed(rows)) + _rows(50, start=1000))
    train2, held2 = _both(config)
    assert {prompt_key(r) for r in held} <= {prompt_key(r) for r in held2}
    assert _overlap(train2, held2) == set()


def test_limits_apply_after_the_split_and_the_source_says_how_it_was_drawn(tmp_path):
    source = _write(tmp_path / "all.jsonl", _rows(200))
    config = DataConfig(task="gsm8k", source=str(source), num_examples=50, eval_examples=10)
    train = read_config_split(config, "train")
    held = read_config_split(config, "eval")
    assert len(train.records) == 50 and len(held.records) == 10
    assert _overlap(train.records, held.records) == set()
    assert "held out by a hash of each prompt" in held.summary()


def test_same_split_name_is_split_too(tmp_path):
    directory = tmp_path / "d"
    directory.mkdir()
    _write(directory / "train.jsonl", _rows(100))
    config = DataConfig(task="gsm8k", source=str(directory), eval_split="train", eval_examples=None)
    train, held = _both(config)
    assert held and _overlap(train, held) == set()


def test_separate_files_drop_training_rows_whose_prompt_is_held_out(tmp_path):
    directory = tmp_path / "d"
    directory.mkdir()
    _write(directory / "train.jsonl", _rows(60))
    _write(directory / "test.jsonl", _rows(10, start=55))  # 5 prompts leaked into the test file
    config = DataConfig(task="gsm8k", source=str(directory), eval_examples=None)
    assert not shares_rows(config)
    train = read_config_split(config, "train")
    held = read_config_split(config, "eval").records
    assert len(held) == 10 and len(train.records) == 55 and _overlap(train.records, held) == set()
    assert "dropped 5 training rows" in train.summary()


def test_hf_dataset_splits_and_hf_local_files(tmp_path):
    directory = tmp_path / "hf"
    directory.mkdir()
    _write(directory / "train.jsonl", _rows(40))
    _write(directory / "test.jsonl", _rows(8, start=38))  # 2 leaked
    config = DataConfig(task="gsm8k", source=str(directory), format="hf", eval_examples=None)
    train, held = _both(config)  # datasets.load_dataset(directory) picks the split inside
    assert len(held) == 8 and len(train) == 38 and _overlap(train, held) == set()
    one_file = DataConfig(
        task="gsm8k", source=str(directory / "train.jsonl"), format="hf", eval_examples=None
    )
    assert shares_rows(one_file)  # load_dataset("json", data_files=...) reads the same file for both names
    train, held = _both(one_file)
    assert held and _overlap(train, held) == set() and len(train) + len(held) == 40


def test_generated_and_preference_sources_are_disjoint():
    train, held = _both(DataConfig(num_examples=300, eval_examples=100))
    assert len(train) == 300 and len(held) == 100 and _overlap(train, held) == set()
    train, held = _both(DataConfig(num_examples=100, eval_examples=50, preferences=True))
    assert train and held and _overlap(train, held) == set()


def test_holdout_split_is_seeded_and_rejects_a_fraction_out_of_range():
    records = [{"prompt": f"p{i}"} for i in range(500)]
    a = holdout_split(records, 0.3, seed=0)[1]
    assert a == holdout_split(records, 0.3, seed=0)[1] and a != holdout_split(records, 0.3, seed=1)[1]
    with pytest.raises(ValueError, match="holdout_fraction"):
        DataConfig(holdout_fraction=1.0)


def test_an_empty_side_is_an_error_that_names_the_field(tmp_path):
    source = _write(tmp_path / "two.jsonl", _rows(2))
    config = DataConfig(task="gsm8k", source=str(source), holdout_fraction=0.01)
    with pytest.raises(
        ValueError, match=r"holdout_fraction=0.01 of the 2 rows .* leaves the eval split empty"
    ):
        read_config_split(config, "eval")
