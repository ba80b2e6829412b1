"""Readers, task adapters and the generated arithmetic task: real data, malformed rows, formats, errors."""

from __future__ import annotations

import gzip
import json
import pickle
import re
import subprocess
import sys

import pytest

from kdray.data import (
    MalformedRow,
    adapt_row,
    arithmetic_splits,
    generate_arithmetic,
    gsm8k_record,
    read_config_split,
    read_records,
)

GOOD = [
    {"question": "Ann has 3 cats and gets 2 more. How many cats?", "answer": "3 + 2 = 5\n#### 5"},
    {
        "question": "A box holds 1,000 pins. How many pins in 2 boxes?",
        "answer": "2 * 1000 = 2000\n#### 2,000",
    },
    {"question": "Bo has 9 figs and eats 4. How many are left?", "answer": "9 - 4 = 5\n#### 5"},
]


def fields(records):
    return [(r["prompt"], r["response"], r["answer"]) for r in records]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- real data -----------------------------------------------------------------------------------


def test_gsm8k_test_split_reads_every_row(data_dir):
    result = read_records("gsm8k", data_dir / "gsm8k", split="test")
    assert len(result.records) == 1319 and result.malformed == []
    for record in result.records:
        assert re.fullmatch(r"-?\d+(\.\d+)?", record["answer"]), record
        assert record["answer"] == record["response"].rsplit("####", 1)[1].strip().replace(",", "")
    first = result.records[0]
    assert first["prompt"].startswith("Janet’s ducks lay 16 eggs per day.")
    assert first["answer"] == "18" and first["response"].endswith("#### 18")
    assert first["id"] == "test.jsonl:1"


def test_gsm8k_answers_with_thousands_separators_are_plain_numbers(data_dir):
    records = read_records("gsm8k", data_dir / "gsm8k", split="train").records
    assert len(records) == 7473
    with_commas = [r for r in records if re.search(r"#### [\d,]*,\d", r["response"])]
    assert with_commas, "GSM8K train has answers such as '#### 1,600'"
    assert all("," not in r["answer"] for r in with_commas)


def test_multi30k_val_pairs(data_dir):
    result = read_records("translation", data_dir / "multi30k", split="val")
    assert len(result.records) == 1014 and result.malformed == []
    first = result.records[0]
    assert first["prompt"] == "Translate English to German: A group of men are loading cotton onto a truck"
    assert first["response"] == "Eine Gruppe von Männern lädt Baumwolle auf einen Lastwagen"
    assert first["answer"] is None


# --- malformed rows ------------------------------------------------------------------------------


@pytest.fixture
def messy_jsonl(tmp_path):
    lines = [
        json.dumps(GOOD[0]),  # 1
        "{this is not json",  # 2
        json.dumps({"question": "no answer here"}),  # 3
        "",  # 4: blank lines are not rows
        json.dumps({"question": "q?", "answer": "the answer is 4"}),  # 5: no '####'
        json.dumps(GOOD[1]),  # 6
        json.dumps([1, 2]),  # 7: not an object
        json.dumps({"question": 7, "answer": "#### 7"}),  # 8: wrong type
        json.dumps(GOOD[2]),  # 9
    ]
    path = tmp_path / "messy.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_skip_mode_keeps_every_good_row_and_names_the_bad_ones(messy_jsonl):
    result = read_records("gsm8k", messy_jsonl, on_malformed="skip")
    assert fields(result.records) == fields([gsm8k_record(r) for r in GOOD])
    assert [r["id"] for r in result.records] == ["messy.jsonl:1", "messy.jsonl:6", "messy.jsonl:9"]
    assert [(m.line_no, m.field) for m in result.malformed] == [
        (2, None),
        (3, "answer"),
        (5, "answer"),
        (7, None),
        (8, "question"),
    ]
    assert all(m.source == str(messy_jsonl) for m in result.malformed)
    assert "skipped 5 malformed rows: line 2" in result.summary()


def test_fail_mode_raises_with_file_and_line(messy_jsonl):
    with pytest.raises(MalformedRow, match=re.escape(f"{messy_jsonl}:2:")) as err:
        read_records("gsm8k", messy_jsonl, on_malformed="fail")
    assert err.value.line_no == 2 and "fix" in str(err.value)


def test_missing_final_number_message_names_field_and_fix():
    with pytest.raises(MalformedRow) as err:
        gsm8k_record({"question": "q", "answer": "it is 4"}, source="x.jsonl", line_no=12)
    message = str(err.value)
    assert message.startswith("x.jsonl:12:") and "'answer'" in message and "#### <number>" in message


def test_malformed_row_survives_pickling():
    bad = MalformedRow("f.jsonl", 3, "answer", "missing", "add it")
    back = pickle.loads(pickle.dumps(bad))
    assert (back.source, back.line_no, back.field, str(back)) == ("f.jsonl", 3, "answer", str(bad))


def test_limit_stops_after_that_many_good_records(messy_jsonl):
    result = read_records("gsm8k", messy_jsonl, limit=2)
    assert [r["id"] for r in result.records] == ["messy.jsonl:1", "messy.jsonl:6"]


# --- formats -------------------------------------------------------------------------------------


def test_parquet_and_hf_load_dataset_match_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = write_jsonl(tmp_path / "rows.jsonl", GOOD)
    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(GOOD), parquet)
    expected = fields(read_records("gsm8k", jsonl).records)
    assert fields(read_records("gsm8k", parquet).records) == expected
    assert fields(read_records("gsm8k", parquet, format="hf").records) == expected  # load_dataset("parquet")
    assert fields(read_records("gsm8k", jsonl, format="hf").records) == expected  # load_dataset("json")


def test_directory_layout_json_array_and_glob(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", GOOD[:2])
    write_jsonl(tmp_path / "test.jsonl", GOOD[2:])
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "rows.json").write_text(json.dumps(GOOD), encoding="utf-8")
    assert len(read_records("gsm8k", tmp_path, split="train").records) == 2
    assert fields(read_records("gsm8k", tmp_path, split="test").records) == fields([gsm8k_record(GOOD[2])])
    assert len(read_records("gsm8k", tmp_path / "more" / "rows.json").records) == 3
    assert len(read_records("gsm8k", str(tmp_path / "*.jsonl")).records) == 3


def test_translation_and_summarization_column_variants():
    a = adapt_row("translation", {"en": "A dog.", "de": "Ein Hund."})
    b = adapt_row("translation", {"source": "A dog.", "target": "Ein Hund."})
    c = adapt_row("translation", {"translation": {"en": "A dog.", "de": "Ein Hund."}}, prefix="EN>DE: ")
    assert a == b and a["prompt"] == "Translate English to German: A dog." and c["prompt"] == "EN>DE: A dog."
    s1 = adapt_row("summarization", {"document": "Long text.", "summary": "Short."})
    s2 = adapt_row("summarization", {"article": "Long text.", "highlights": "Short."})
    assert s1 == s2 and s1["response"] == "Short."
    with pytest.raises(MalformedRow, match="'target' or 'de'"):
        adapt_row("translation", {"en": "A dog."})


def test_multi30k_misaligned_files_name_both_counts(tmp_path):
    for lang, lines in (("en", ["a", "b", "c"]), ("de", ["x", "y"])):
        with gzip.open(tmp_path / f"train.{lang}.gz", "wt", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"train\.en\.gz has 3 lines but .*train\.de\.gz has 2"):
        read_records("translation", tmp_path)
    with pytest.raises(ValueError, match="Multi30k translation directory but the task is 'gsm8k'"):
        read_records("gsm8k", tmp_path)


# --- errors --------------------------------------------------------------------------------------


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nowhere" / "train.jsonl"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        read_records("gsm8k", missing)
    with pytest.raises(FileNotFoundError, match=r"has none of dev\.jsonl"):
        read_records("gsm8k", tmp_path, split="dev")


def test_empty_source_is_an_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no records read from .*empty\.jsonl"):
        read_records("gsm8k", empty)
    bad_only = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}])
    with pytest.raises(ValueError, match="all 1 rows were malformed"):
        read_records("gsm8k", bad_only)


# --- generated arithmetic ------------------------------------------------------------------------

_STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
_APPLY = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__, "/": int.__floordiv__}


def check_chain(response: str) -> int:
    """Re-evaluate every `a op b = c` line and the final number; returns the number of steps."""
    *lines, final = response.split("\n")
    previous = None
    for line in lines:
        (a, op, b, c), *_ = _STEP.findall(line)
        a, b, c = int(a), int(b), int(c)
        assert _APPLY[op](a, b) == c and (op != "/" or a % b == 0), line
        assert previous is None or a == previous, f"{line!r} does not continue from {previous}"
        previous = c
    assert final == f"#### {previous}"
    return len(lines)


def test_arithmetic_is_deterministic_and_correct():
    records = generate_arithmetic(200, seed=3, difficulty=3)
    assert records == generate_arithmetic(200, seed=3, difficulty=3)
    assert records != generate_arithmetic(200, seed=4, difficulty=3)
    assert len({r["prompt"] for r in records}) == 200
    for r in records:
        assert check_chain(r["response"]) == 3
        assert int(r["answer"]) >= 0 and r["response"].endswith(f"#### {r['answer']}")
        assert len(r["prompt"]) <= 220 and len(r["response"]) <= 220
        assert gsm8k_record({"question": r["prompt"], "answer": r["response"]})["answer"] == r["answer"]


def test_arithmetic_difficulty_sets_the_number_of_steps():
    for difficulty in (1, 2, 3, 4):
        steps = {check_chain(r["response"]) for r in generate_arithmetic(50, seed=0, difficulty=difficulty)}
        assert steps == {difficulty}
    with pytest.raises(ValueError, match="difficulty=5"):
        generate_arithmetic(1, difficulty=5)


def test_arithmetic_splits_are_disjoint_even_across_seeds():
    train, test = arithmetic_splits(1000, 200, seed=0, difficulty=1)
    _, other_test = arithmetic_splits(10, 200, seed=1, difficulty=1)
    train_questions = {r["prompt"] for r in train}
    assert len(train) == 1000 and len(test) == 200
    assert train_questions.isdisjoint(r["prompt"] for r in test)
    assert train_questions.isdisjoint(r["prompt"] for r in other_test)
    assert arithmetic_splits(500, 20, seed=0, difficulty=1)[0] == train[:500]  # growing n extends the list


def test_generated_source_through_read_records():
    result = read_records("arithmetic", None, split="test", limit=30, seed=2, difficulty=2)
    assert result.records == generate_arithmetic(30, seed=2, difficulty=2, split="test")
    with pytest.raises(ValueError, match="needs a data source"):
        read_records("gsm8k", None)


def test_config_builder_reads_train_and_eval_splits(data_dir):
    from kdray.config import DataConfig

    generated = DataConfig(num_examples=12, eval_examples=5, difficulty=1)
    assert len(read_config_split(generated).records) == 12
    assert read_config_split(generated, "eval").records == generate_arithmetic(5, 0, 1, split="test")
    gsm8k = DataConfig(task="gsm8k", source=str(data_dir / "gsm8k"), num_examples=None, eval_examples=None)
    assert len(read_config_split(gsm8k, "eval").records) == 1319


def test_importing_kdray_data_stays_light():
    code = "import sys, kdray.data; print([m for m in ('torch', 'ray', 'transformers', 'datasets', 'pyarrow') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
