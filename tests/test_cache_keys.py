"""Step cache keys follow the contents of the files a step reads and the package's code (no Ray)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from kdray.cli import main
from kdray.config import config_from_dict, with_overrides
from kdray.data.cache import code_fingerprint, content_fingerprint
from kdray.workflow import (
    DONE,
    KEY,
    StepResult,
    cache_root,
    explain_steps,
    key_components,
    key_of,
    prefix_keys,
    step_key,
)

ROWS = [{"question": f"What is {i} + 3?", "answer": f"{i} + 3 = {i + 3}\n#### {i + 3}"} for i in range(6)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def edit_one_line(path: Path) -> None:
    """Change the answer of the second row, keeping the file's size, and move its mtime on."""
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace("#### 4", "#### 5")
    stat = path.stat()
    path.write_text("".join(lines))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))


def gsm8k_config(tmp_path: Path, source: Path, **workflow) -> dict:
    """The tiny workflow of tests/test_workflow.py, reading a local GSM8K-format jsonl file."""
    return {
        "model": {"name_or_path": "tiny", "init": "scratch", "tiny_layers": 1, "tiny_hidden": 32},
        "teacher": {"name_or_path": "tiny", "tiny_layers": 1, "tiny_hidden": 32, "train_steps": 10,
                    "batch_size": 8, "top_k": 8},
        "data": {"task": "gsm8k", "format": "jsonl", "source": str(source), "split": "train",
                 "eval_split": "train", "eval_examples": 2, "max_prompt_tokens": 96, "max_response_tokens": 48},
        "objective": {"method": "xkd",
                      "terms": [{"name": "xkd", "params": {"variant": "divergence", "q_form": "logprobs"}}]},
        "train": {"batch_size": 8, "max_steps": 8, "checkpoint_every": 4, "eval_every": 4, "lr": 1e-3},
        "tracking": {"enabled": False},
        "workflow": {"workdir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "steps"), **workflow},
    }  # fmt: skip


# ------------------------------------------------------------------------------ content fingerprints


def test_file_fingerprint_follows_the_bytes_not_the_path(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    before = content_fingerprint(data)
    assert before is not None and content_fingerprint(str(data)) == before  # str or PathLike
    copy = tmp_path / "elsewhere" / "copy.jsonl"
    copy.parent.mkdir()
    copy.write_bytes(data.read_bytes())
    assert content_fingerprint(copy) == before
    edit_one_line(data)
    assert content_fingerprint(data) != before
    assert content_fingerprint(copy) == before


def test_no_fingerprint_for_hub_ids_and_none(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert content_fingerprint(None) is None
    assert content_fingerprint("openai/gsm8k") is None
    assert content_fingerprint("HuggingFaceTB/SmolLM2-135M-Instruct") is None


def test_directory_and_glob_fingerprints(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    write_jsonl(root / "train.jsonl", ROWS)
    write_jsonl(root / "sub" / "test.jsonl", ROWS[:2])
    before = content_fingerprint(root)
    assert before is not None and before != content_fingerprint(root / "train.jsonl")
    (root / ".cache").mkdir()  # hidden files and directories are not content
    (root / ".cache" / "lock").write_text("x")
    (root / ".notes").write_text("x")
    assert content_fingerprint(root) == before
    glob_before = content_fingerprint(str(root / "*.jsonl"))
    assert glob_before not in (None, before)
    edit_one_line(root / "train.jsonl")
    assert content_fingerprint(root) != before
    assert content_fingerprint(str(root / "*.jsonl")) != glob_before
    nested = content_fingerprint(root)
    (root / "sub" / "test.jsonl").write_text("")  # a file further down counts too
    assert content_fingerprint(root) != nested


def test_code_fingerprint_is_a_stable_sha256():
    assert code_fingerprint() == code_fingerprint()
    assert len(code_fingerprint()) == 64


# ------------------------------------------------------------------------------------- step keys


def test_data_key_follows_the_data_file(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    cfg = config_from_dict(gsm8k_config(tmp_path, data))
    before, prefix = step_key("data", cfg, []), prefix_keys(cfg)
    assert step_key("data", cfg, []) == before and prefix_keys(cfg) == prefix  # stable
    # what the key hashes for the file: its contents, recorded by field name
    assert key_components("data", cfg, [])["files"]["data.source"] == content_fingerprint(data)
    edit_one_line(data)
    assert step_key("data", cfg, []) != before
    after = prefix_keys(cfg)
    assert after["data"] != prefix["data"] and after["teacher_outputs"] != prefix["teacher_outputs"]
    # a config section the data step does not read leaves its key alone
    assert step_key("data", with_overrides(cfg, {"train.lr": 5e-4}), []) == after["data"]


def test_model_files_enter_only_the_steps_that_read_them(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    model = tmp_path / "student"
    model.mkdir()
    (model / "config.json").write_text('{"layers": 1}')
    cfg = config_from_dict(gsm8k_config(tmp_path, data, steps=["data"]))
    cfg = with_overrides(cfg, {"model.name_or_path": str(model), "model.init": "pretrained"})
    keys = {s: step_key(s, cfg, []) for s in ("data", "distill", "baseline")}
    (model / "config.json").write_text('{"layers": 2}')
    changed = {s for s in keys if step_key(s, cfg, []) != keys[s]}
    assert changed == {"distill", "baseline"}
    assert key_components("teacher", cfg, [])["files"] == {"teacher.name_or_path": None}  # `tiny`


# ---------------------------------------------------------------------------------------- explain


def finish(cfg, step: str, inputs=()) -> Path:
    """Mark a step finished as `run_step` does: `_KEY.json` when it starts, `_DONE.json` last."""
    components = key_components(step, cfg, list(inputs))
    directory = cache_root(cfg) / f"{step}-{key_of(components)}"
    directory.mkdir(parents=True)
    (directory / KEY).write_text(json.dumps(components, indent=1))
    (directory / DONE).write_text(json.dumps({"train": str(directory / "train.jsonl")}))
    return directory


def test_explain_says_the_data_step_runs_because_its_file_changed(tmp_path, capsys):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    cfg = config_from_dict(gsm8k_config(tmp_path, data))
    lines = explain_steps(cfg)
    assert [line.split()[0] for line in lines] == [
        "data", "teacher", "teacher_outputs", "distill", "baseline", "evaluate", "register",
    ]  # fmt: skip
    assert all("will run: never run" in line for line in lines)
    done = finish(cfg, "data")
    first, second = explain_steps(cfg)[:2]
    assert first.split()[:2] == ["data", "reused:"] and first.endswith(str(done))
    assert "never run" in second
    edit_one_line(data)
    first = explain_steps(cfg)[0]
    assert "will run" in first and "data.source contents changed" in first
    assert "config section" not in first and "kdray code changed" not in first
    # a changed config section is named as such
    seed = explain_steps(with_overrides(cfg, {"data.seed": 1}))[0]
    assert "config section data changed" in seed
    # and from the command line, without starting Ray
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(gsm8k_config(tmp_path, data)))
    assert main(["run", "--config", str(path), "--explain"]) == 0
    out = capsys.readouterr().out
    assert "data.source contents changed" in out and "never run" in out


def test_explain_names_the_changed_input_step(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    cfg = config_from_dict(gsm8k_config(tmp_path, data, steps=["data"]))
    keys = prefix_keys(cfg)
    old_data = StepResult("data", keys["data"], "", {}, True, 0.0)
    finish(cfg, "data")
    finish(cfg, "teacher", [old_data])
    edit_one_line(data)
    lines = explain_steps(cfg)
    assert "data.source contents changed" in lines[0]
    assert "input step data changed" in lines[1] and "teacher.name_or_path" not in lines[1]


def test_explain_with_resume_off_runs_everything(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    cfg = config_from_dict(gsm8k_config(tmp_path, data, resume=False))
    finish(cfg, "data")
    assert "workflow.resume is false" in explain_steps(cfg)[0]


# ------------------------------------------------------------------------------ teacher-less methods


def test_a_teacher_less_method_trains_no_teacher(tmp_path):
    from kdray.train.trainer import reads_teacher
    from kdray.workflow import StepContext, teacher_step

    source = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    base = config_from_dict(gsm8k_config(tmp_path, source))
    sft = with_overrides(base, {"objective.method": "sft", "objective.terms": [{"name": "ce"}]})
    assert reads_teacher(base) and not reads_teacher(sft)
    assert reads_teacher(with_overrides(sft, {"objective.teacher_generations": True}))
    ctx = StepContext("teacher", "k", tmp_path / "teacher-k", sft, tracker=None)
    ctx.directory.mkdir()
    data = StepResult("data", "d", str(tmp_path), {}, True, 0.0)
    out = teacher_step(ctx, data)  # returns at once: nothing to train, no Ray needed
    assert out["path"] is None and "reads nothing of a teacher" in out["skipped"]
    assert list(ctx.directory.iterdir()) == []


def test_a_data_efficiency_run_rescores_only_its_rows_and_keeps_the_teacher(tmp_path):
    """`train.max_examples` limits what the student reads: the teacher pass (which scores exactly those
    rows) gets a new key, the teacher does not, and the student's rows are the first N."""
    from kdray.train.trainer import student_records, training_rows

    cfg = config_from_dict(gsm8k_config(tmp_path, write_jsonl(tmp_path / "d.jsonl", ROWS)))
    few = with_overrides(cfg, {"train.max_examples": 4})
    full, limited = prefix_keys(cfg), prefix_keys(few)
    assert full["teacher"] == limited["teacher"] and full["data"] == limited["data"]
    assert full["teacher_outputs"] != limited["teacher_outputs"]
    records = [{"prompt": f"p{i}", "response": "r", "id": str(i)} for i in range(10)]
    assert [r["id"] for r in student_records(few, records)] == ["0", "1", "2", "3"]
    assert [r["id"] for r in training_rows(few, records, records[:2])[0]] == ["0", "1", "2", "3"]
    assert len(student_records(cfg, records)) == 10


def test_the_teacher_step_trains_from_the_teacher_and_data_sections_alone(tmp_path):
    """Whatever the student's sections say, the teacher trained under one teacher-step key is the same run:
    its training config is built from `teacher` and `data`, the two sections the key hashes."""
    from kdray.workflow.teacher import teacher_training_config

    cfg = config_from_dict(gsm8k_config(tmp_path, write_jsonl(tmp_path / "d.jsonl", ROWS)))
    student_side = {
        "model.tiny_vocab": 300, "model.dtype": "float32", "model.tiny_layers": 3,
        "objective.max_new_tokens": 7, "objective.method": "gkd", "objective.terms": None,
        "train.weight_decay": 0.1, "train.grad_clip": 0.5, "train.loss_chunk_size": 4, "train.lr": 0.5,
        "train.max_steps": 99, "train.batch_size": 4,
    }  # fmt: skip
    other = with_overrides(cfg, student_side)
    assert teacher_training_config(other) == teacher_training_config(cfg)
    assert prefix_keys(other)["teacher"] == prefix_keys(cfg)["teacher"]
    run = teacher_training_config(cfg)
    t = cfg.teacher
    assert (run.model.tiny_layers, run.model.tiny_hidden, run.model.init) == (
        t.tiny_layers,
        t.tiny_hidden,
        "scratch",
    )
    assert (run.train.max_steps, run.train.lr, run.train.batch_size) == (
        t.train_steps,
        t.train_lr,
        t.batch_size,
    )
    assert run.objective.method == "sft" and [term.name for term in run.objective.terms] == ["ce"]
    # a teacher-side change is a new teacher, under a new key
    longer = with_overrides(cfg, {"teacher.train_steps": 11})
    assert teacher_training_config(longer).train.max_steps == 11
    assert prefix_keys(longer)["teacher"] != prefix_keys(cfg)["teacher"]
