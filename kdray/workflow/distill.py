"""The `distill` step (the student, with the configured objective) and the `baseline` step beside it.

The baseline is the same student, data and budget trained with cross-entropy only: the row the
evaluation compares the distilled student against. Both resume from their own checkpoints after a kill.
"""

from __future__ import annotations

from typing import Any

from kdray.config import with_overrides
from kdray.workflow.base import StepContext, StepResult, finite, log_curves, read_jsonl, run_tracking


def distill_step(
    ctx: StepContext, data: StepResult, teacher: StepResult, outputs: StepResult
) -> dict[str, Any]:
    """Train the student with the configured objective (teacher signal from the cache, on-policy batches
    scored by a TeacherPool), resuming from the step's own checkpoints after a kill."""
    from kdray.data.cache import SignalCache
    from kdray.train.trainer import distill

    signal = None  # `distill` checks the tokenizers again, against the resolved teacher
    if outputs.outputs.get("signal_cache"):
        signal = SignalCache(outputs.outputs["cache_dir"]).read(outputs.outputs["signal_cache"])
    run = distill(
        ctx.cfg, read_jsonl(data.outputs["train"]), read_jsonl(data.outputs["eval"]), workdir=ctx.directory,
        name="student", teacher_path=teacher.outputs["path"], signal_dataset=signal,
        tracking=run_tracking(ctx), **ctx.train_display(f"student ({ctx.cfg.objective.method})"),
    )  # fmt: skip
    log_curves(ctx, run.history, "learning_curves.png")
    return {"student": str(run.export_path), "metrics": str(run.metrics_path), "final": finite(run.final)}


def baseline_step(
    ctx: StepContext, data: StepResult, teacher: StepResult, after: Any = None
) -> dict[str, Any]:
    """The SFT-only student: the same model, data and budget, cross-entropy on the references only.
    (`after` is an ordering-only edge of the DAG: the teacher pass, or the student where the machine
    cannot train both at once.)"""
    from kdray.train.trainer import distill

    cfg = with_overrides(
        ctx.cfg,
        {
            "objective.method": "sft",
            "objective.terms": [{"name": "ce"}],
            "objective.on_policy_fraction": 0.0,
            "objective.teacher_generations": False,
        },
    )
    run = distill(
        cfg, read_jsonl(data.outputs["train"]), read_jsonl(data.outputs["eval"]), workdir=ctx.directory,
        name="baseline", teacher_path=teacher.outputs["path"], tracking=run_tracking(ctx),
        **ctx.train_display("baseline (SFT only)"),
    )  # fmt: skip
    log_curves(ctx, run.history, "learning_curves.png")
    return {"student": str(run.export_path), "metrics": str(run.metrics_path), "final": finite(run.final)}
