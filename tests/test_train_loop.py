"""The training loop in process (no Ray): a session that keeps its checkpoints, data given as arrays."""

from __future__ import annotations

import shutil
import tempfile

import numpy as np
import pytest
import torch

from kdray.models.tokenizer import char_tokenizer
from kdray.train.loop import LoopSpec, TrainingLoop
from kdray.train.step import NonFiniteLossError

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

    def __init__(self, rows: Rows, saved: object = None) -> None:
        self.rows, self.saved = rows, saved

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

            copy = shutil.copytree(
                checkpoint.path, tempfile.mkdtemp(prefix="kdray-test-ckpt-"), dirs_exist_ok=True
            )
            self.saved = (metrics["step"], Checkpoint.from_directory(copy))

    def device(self, use_gpu: bool) -> torch.device:
        return torch.device("cpu")

    def prepare(self, student):
        return student


def test_a_persistent_nan_is_refused_again_after_a_restore_naming_the_step(tmp_path):
    """Rows from step 3 on carry a NaN teacher logit: steps 3..12 are skipped and step 12 raises. A
    restart from the step-8 checkpoint must count on from 6 skipped steps (not from 0, which let the
    run finish with every later step skipped) and refuse at step 12 again."""
    vocab = len(char_tokenizer())
    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        logits = rng.normal(size=(T, vocab)).astype(np.float32)
        if i >= 2:
            logits[4, 0] = np.nan
        ids = rng.integers(3, vocab, size=T)
        rows.append({"input_ids": ids, "attention_mask": np.ones(T, bool), "teacher_logits": logits,
                     "response_mask": np.arange(T) >= 3})  # fmt: skip
    spec = LoopSpec(
        student={"name_or_path": "tiny", "init": "scratch", "tiny_layers": 1, "tiny_hidden": 32},
        terms=[{"name": "forward_kl", "weight": 1.0, "params": {}}],
        batch_size=1, max_steps=16, checkpoint_every=4, eval_every=100, log_every=1,
        metrics_path=str(tmp_path / "metrics.jsonl"),
    )  # fmt: skip
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
