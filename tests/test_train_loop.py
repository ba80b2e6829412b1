"""The training loop in process (no Ray): a session that keeps its checkpoints, data given as arrays."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kdray.models.tokenizer import char_tokenizer
from kdray.train.loop import LoopSpec, TrainingLoop
from kdray.train.resume import SNAPSHOT, recover_damaged_snapshot
from kdray.train.step import NonFiniteLossError
from kdray.train.trainer import read_history

T = 10


class Rows:
    """A data shard of fixed rows, read as Ray Data's `iter_batches` reads one."""

    def __init__(self, rows: list[dict[str, np.ndarray]]) -> None:
        self.rows = rows

    def iter_batches(self, batch_size: int, batch_format: str, drop_last: bool):
        for i in range(0, len(self.rows) - batch_size + 1, batch_size):
            chunk = self.rows[i : i + batch_size]
            yield {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}


class Session:
    """Rank 0 of 1 in this process; a reported checkpoint is copied (the loop deletes its own)."""

    rank, world_size, flush_before_report = 0, 1, False

    def __init__(self, rows: Rows, saved: object = None, keep_in: Path | None = None) -> None:
        self.rows, self.saved, self.keep_in = rows, saved, keep_in

    def dataset(self, name: str):
        return self.rows if name == "train" else None

    def checkpoint(self):
        return self.saved

    def make_checkpoint(self, directory: str):
        from ray.train import Checkpoint

        return Checkpoint.from_directory(directory)

    def report(self, metrics: dict, checkpoint) -> None:
        if checkpoint is not None:
            from ray.train import Checkpoint

            # as Ray Train lays them out: checkpoint_* directories beside its run snapshot
            target = (
                self.keep_in / f"checkpoint_{metrics['step']:03d}" if self.keep_in else tempfile.mkdtemp()
            )
            copy = shutil.copytree(checkpoint.path, target, dirs_exist_ok=True)
            self.saved = (metrics["step"], Checkpoint.from_directory(copy))

    def device(self, use_gpu: bool) -> torch.device:
        return torch.device("cpu")

    def prepare(self, student):
        return student


def _rows(nan_from: int | None = None) -> list[dict[str, np.ndarray]]:
    """16 rows of random tokens with random dense teacher logits; from row `nan_from` on one is NaN."""
    vocab = len(char_tokenizer())
    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        logits = rng.normal(size=(T, vocab)).astype(np.float32)
        if nan_from is not None and i >= nan_from:
            logits[4, 0] = np.nan
        ids = rng.integers(3, vocab, size=T)
        rows.append({"input_ids": ids, "attention_mask": np.ones(T, bool), "teacher_logits": logits,
                     "response_mask": np.arange(T) >= 3})  # fmt: skip
    return rows


def _spec(metrics: Path, run_dir: Path | None = None, **train) -> LoopSpec:
    """The worker spec `distill` would build for this config (`trainer.loop_spec`)."""
    from kdray.config import config_from_dict
    from kdray.train.trainer import loop_spec

    cfg = config_from_dict({
        "model": {"name_or_path": "tiny", "init": "scratch", "tiny_layers": 1, "tiny_hidden": 32},
        "objective": {"method": "supervised_kd", "terms": [{"name": "forward_kl"}]},
        "train": {"batch_size": 1, "eval_every": 100, **train},
        "tracking": {"log_every": 1},
    })  # fmt: skip
    spec = loop_spec(cfg, teacher_path=None, metrics_path=metrics, export_path=None)
    spec.run_dir = str(run_dir) if run_dir else None
    return spec


def test_a_persistent_nan_is_refused_again_after_a_restore_naming_the_step(tmp_path):
    """Rows from step 3 on carry a NaN teacher logit: steps 3..12 are skipped and step 12 raises. A
    restart from the step-8 checkpoint must count on from 6 skipped steps (not from 0, which let the
    run finish with every later step skipped) and refuse at step 12 again."""
    rows = _rows(nan_from=2)
    spec = _spec(tmp_path / "metrics.jsonl", max_steps=16, checkpoint_every=4)
    session = Session(Rows(rows))
    with pytest.raises(
        NonFiniteLossError, match=r"^step 12: 10 consecutive steps.*checkpoint of step 8 is kept"
    ):
        TrainingLoop(spec, session).run()
    step, checkpoint = session.saved
    assert step == 8
    restarted = Session(Rows(rows), saved=checkpoint)
    with pytest.raises(NonFiniteLossError, match=r"^step 12: 10 consecutive"):
        TrainingLoop(spec, restarted).run()


def test_a_damaged_run_snapshot_resumes_from_the_latest_intact_checkpoint(tmp_path):
    """A full disk removes or empties Ray Train's snapshot and cuts the last checkpoint short: the run
    resumes from the checkpoint before it and logs the uninterrupted run's losses from there on."""
    rows, run_dir = _rows(), tmp_path / "ray_train" / "distill"
    run_dir.mkdir(parents=True)
    TrainingLoop(
        _spec(tmp_path / "full.jsonl", max_steps=6, checkpoint_every=2), Session(Rows(rows), keep_in=run_dir)
    ).run()
    (run_dir / SNAPSHOT).write_text('{"checkpoints": []}')
    assert recover_damaged_snapshot(run_dir) is None  # a valid snapshot: Ray's business, nothing touched
    (run_dir / SNAPSHOT).unlink()  # a full disk may leave none at all: Ray would start over
    assert recover_damaged_snapshot(run_dir) == run_dir / "checkpoint_006"
    (run_dir / SNAPSHOT).write_text("")
    last = run_dir / "checkpoint_006" / "state.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    resume_from = recover_damaged_snapshot(run_dir)
    assert resume_from == run_dir / "checkpoint_004"
    assert not (run_dir / SNAPSHOT).exists() and len(list(run_dir.glob(f"{SNAPSHOT}.damaged-*"))) == 1
    # Ray, its snapshot moved aside, hands the worker no checkpoint: the loop finds that one in the run dir
    spec = _spec(tmp_path / "resumed.jsonl", max_steps=6, checkpoint_every=2, run_dir=run_dir)
    TrainingLoop(spec, Session(Rows(rows))).run()
    resumed, full = read_history(tmp_path / "resumed.jsonl"), read_history(tmp_path / "full.jsonl")
    assert [h["step"] for h in resumed] == [5, 6] and resumed[-1]["consumed_rows"] == 6
    np.testing.assert_allclose([h["loss"] for h in resumed], [h["loss"] for h in full[4:]], rtol=1e-5)


def test_the_final_checkpoint_holds_no_optimizer_and_a_run_restored_from_it_only_exports(tmp_path):
    """After the last step nothing is left to optimise: the final checkpoint keeps the weights and the
    loop state (a third of the bytes with AdamW), and a worker restarted from it takes no step and exports
    the trained weights."""
    rows, run_dir = _rows(), tmp_path / "ray_train" / "distill"
    run_dir.mkdir(parents=True)
    spec = _spec(tmp_path / "m.jsonl", max_steps=4, checkpoint_every=2)
    TrainingLoop(spec, Session(Rows(rows), keep_in=run_dir)).run()
    middle, final = (torch.load(run_dir / f"checkpoint_00{s}" / "state.pt") for s in (2, 4))
    assert {"optimizer", "scheduler"} <= set(middle) and not {"optimizer", "scheduler"} & set(final)
    assert final["loop"]["step"] == 4
    spec = _spec(tmp_path / "again.jsonl", max_steps=4, checkpoint_every=2, run_dir=run_dir)
    spec.export_path = str(tmp_path / "student")
    TrainingLoop(spec, Session(Rows(rows))).run()
    assert not (tmp_path / "again.jsonl").exists()  # no step taken, none logged
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "student").state_dict()
    trained = {k.removeprefix("lm."): v for k, v in final["student"].items() if k.startswith("lm.")}
    assert trained.keys() == exported.keys()
    for name, value in trained.items():
        torch.testing.assert_close(exported[name], value)


class SlowRows(Rows):
    """A shard whose every batch arrives `delay` seconds late (a teacher that cannot keep up)."""

    delay = 0.3

    def iter_batches(self, batch_size: int, batch_format: str, drop_last: bool):
        import time

        for batch in super().iter_batches(batch_size, batch_format, drop_last):
            time.sleep(self.delay)
            yield batch


def test_throughput_counts_the_time_spent_waiting_for_data(tmp_path):
    """tokens/s is over wall time: a step cannot be faster than its batch arrives (each took >= 0.3 s
    to come, so <= 10 tokens / 0.3 s), and the wait itself is logged."""
    spec = _spec(tmp_path / "metrics.jsonl", max_steps=3, checkpoint_every=10)
    TrainingLoop(spec, Session(SlowRows(_rows()))).run()
    history = read_history(tmp_path / "metrics.jsonl")
    assert [h["step"] for h in history] == [1, 2, 3]
    for h in history:
        assert h["data_wait_s"] >= SlowRows.delay
        assert h["tokens_per_s"] <= T / SlowRows.delay
