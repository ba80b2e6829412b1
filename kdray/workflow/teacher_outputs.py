"""The `teacher_outputs` step: one teacher pass over the training split, into the signal cache.

The pass is the workflow's most expensive shared work, so its key reads of the objective only what changes
the teacher's outputs (`teacher_outputs_wanted`): the students of a sweep over loss weights or learning
rates all read one pass.
"""

from __future__ import annotations

import time
from typing import Any

from kdray import __version__
from kdray.workflow.base import StepContext, StepResult, read_jsonl

#: why a cross-tokenizer run has no cached pass: the teacher scores its own tokenization of each row,
#: which the distill step computes live (`kdray.teacher.cross_signal`) as it trains
LIVE_CROSS_TOKENIZER = (
    "objective.cross_tokenizer: the teacher scores its own tokenization of each row live in the distill step"
)


def teacher_outputs_step(ctx: StepContext, data: StepResult, teacher: StepResult) -> dict[str, Any]:
    """One teacher pass over the training split, written to the signal cache (log-probs, and the
    teacher's generations for SeqKD / sequence-level X-KD); every later run or Tune trial reads it."""
    from kdray.data.cache import SignalCache, signal_cache_key
    from kdray.models.loading import load_model_config
    from kdray.train.trainer import (
        needs_generations,
        needs_signal,
        student_records,
        teacher_pool,
        train_dataset,
    )
    from kdray.validate import teacher_temperature

    cfg = ctx.cfg
    generations = needs_generations(cfg)
    if not (needs_signal(cfg) or generations):
        return {"signal_cache": None, "reason": f"method {cfg.objective.method!r} reads no teacher output"}
    if cfg.objective.cross_tokenizer is not None:  # the cache holds rows in the student's tokens only
        return {"signal_cache": None, "reason": LIVE_CROSS_TOKENIZER}
    t_path = teacher.outputs["path"]
    key = signal_cache_key(  # the teacher step's key names a trained teacher; a hub id names itself
        teacher=f"{t_path}@{teacher.key}", revision=cfg.teacher.revision, tokenizer=t_path,
        top_k=cfg.teacher.top_k, temperature=teacher_temperature(cfg),
        data=f"{data.key}:{ctx.key}", version=__version__,
    )  # fmt: skip
    cache = SignalCache(ctx.directory / "signal")
    started = time.time()
    with teacher_pool(cfg, t_path, name="teacher-outputs") as pool:
        train_ds = train_dataset(  # the rows the student reads (train.max_examples), in data order
            cfg, student_records(cfg, read_jsonl(data.outputs["train"])), teacher=pool, tokenizer_path=t_path
        )
        vocab = int(load_model_config(t_path).vocab_size)
        meta = {"teacher": t_path, "generations": generations}
        rows = cache.write(train_ds, key, vocab_size=vocab, meta=meta)
    seconds = time.time() - started
    if ctx.tracker is not None:
        ctx.tracker.set_tags({"kdray.signal_cache_key": key})
        ctx.tracker.log_metrics({"rows": rows, "rows_per_s": rows / max(seconds, 1e-9)}, step=0)
    return {"signal_cache": key, "cache_dir": str(cache.root), "rows": rows, "generations": generations}
