"""The `teacher` step, and the tokenizer preflight that runs before any step.

The teacher is resolved once per change of the `teacher` section: a given model is checked (tokenizer and
config, no weights), `tiny` is trained from scratch on the training split. `preflight` compares the
student's and the teacher's vocabularies before the workflow (or a sweep's shared teacher pass) spends
anything on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdray.config import Config
from kdray.workflow.base import StepContext, StepResult, log_curves, read_jsonl, run_tracking


def teacher_step(ctx: StepContext, data: StepResult) -> dict[str, Any]:
    """Resolve the teacher: a given model is checked (tokenizer and config load, no weights), `tiny`
    means train one from scratch with plain cross-entropy on the training split (self-contained tasks)."""
    from kdray.train.trainer import reads_teacher

    t = ctx.cfg.teacher
    if t.name_or_path == "tiny" and ctx.cfg.model.name_or_path != "teacher" and not reads_teacher(ctx.cfg):
        reason = f"method {ctx.cfg.objective.method!r} reads nothing of a teacher and the student is not cut from one"
        print(f"[teacher] not trained: {reason}", flush=True)
        return {"path": None, "revision": None, "skipped": reason}
    if t.name_or_path != "tiny":
        from kdray.models.loading import load_model_config, load_tokenizer

        local = Path(t.name_or_path).expanduser()
        # a local directory by absolute path: Ray workers do not share the driver's working directory
        path = str(local.resolve()) if local.is_dir() else t.name_or_path
        load_tokenizer(path, revision=t.revision, gguf_file=t.gguf_file)
        config = load_model_config(path, revision=t.revision, gguf_file=t.gguf_file)
        return {"path": path, "revision": t.revision, "vocab_size": int(config.vocab_size)}
    from kdray.train.trainer import distill

    cfg = teacher_training_config(ctx.cfg)
    run = distill(
        cfg, read_jsonl(data.outputs["train"]), read_jsonl(data.outputs["eval"]), workdir=ctx.directory,
        name="teacher", tracking=run_tracking(ctx), **ctx.train_display("teacher (cross-entropy)"),
    )  # fmt: skip
    log_curves(ctx, run.history, "teacher_learning_curves.png")
    return {"path": str(run.export_path), "revision": None, "trained_steps": t.train_steps}


def teacher_training_config(cfg: Config) -> Config:
    """The run that trains a `tiny` teacher, built from the `teacher` and `data` sections alone (and where
    to log it): nothing of the student's `model`, `objective` or `train` sections reaches it, so the
    teacher step's cache key (those two sections) names exactly one teacher, and sweeping the student
    never changes it. Cross-entropy on the training split, one worker on the teacher's own cores."""
    from kdray.config import LossTerm, ModelConfig, ObjectiveConfig, TrainConfig

    t = cfg.teacher
    every = max(t.train_steps // 4, 1)
    return Config(
        model=ModelConfig(name_or_path="tiny", init="scratch", tiny_layers=t.tiny_layers,
                          tiny_hidden=t.tiny_hidden, dtype=t.dtype),
        teacher=t,
        data=cfg.data,
        objective=ObjectiveConfig(method="sft", terms=(LossTerm(name="ce"),), on_policy_fraction=0.0),
        train=TrainConfig(num_workers=1, cpus_per_worker=max(1, int(t.num_cpus)), use_gpu=t.num_gpus > 0,
                          resources=dict(t.resources), batch_size=t.batch_size, max_steps=t.train_steps,
                          lr=t.train_lr, warmup_steps=min(20, t.train_steps // 10), lr_schedule="cosine",
                          seed=cfg.data.seed, checkpoint_every=every, eval_every=every),
        tracking=cfg.tracking,
        workflow=cfg.workflow,
    )  # fmt: skip


def preflight(cfg: Config) -> None:
    """Compare the student's and the teacher's vocabularies from tokenizer and config files at the start,
    before any teacher is trained or loaded and before any data pass (a teacher the workflow trains from
    scratch has a known tokenizer); a student built in code or cut from the teacher shares its tokenizer."""
    from kdray.teacher.preflight import preflight_workflow

    preflight_workflow(cfg)
