"""The `teacher` step, and the tokenizer preflight that runs before any step.

The teacher is resolved once per change of the `teacher` section: a given model is checked (tokenizer and
config, no weights), `tiny` is trained from scratch on the training split. `preflight` compares the
student's and the teacher's vocabularies before the workflow (or a sweep's shared teacher pass) spends
anything on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdray.config import Config, with_overrides
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

    cfg = with_overrides(
        ctx.cfg,
        {
            "model.name_or_path": "tiny",
            "model.init": "scratch",
            "model.tiny_layers": t.tiny_layers,
            "model.tiny_hidden": t.tiny_hidden,
            "objective.method": "sft",
            "objective.terms": [{"name": "ce"}],
            "objective.on_policy_fraction": 0.0,
            "objective.teacher_generations": False,
            # the teacher's own budget, independent of the student's `train` section: sweeping the
            # student's hyper-parameters must not retrain the teacher
            "train.num_workers": 1,
            "train.cpus_per_worker": max(1, int(t.num_cpus)),  # the teacher's cores, as when it scores
            "train.use_gpu": t.num_gpus > 0,
            "train.resources": dict(t.resources),
            "train.batch_size": t.batch_size,
            "train.grad_accum": 1,
            "train.max_steps": t.train_steps,
            "train.max_examples": None,  # a data-efficiency study limits the student, not the teacher
            "train.lr": t.train_lr,
            "train.warmup_steps": min(20, t.train_steps // 10),
            "train.lr_schedule": "cosine",
            "train.seed": ctx.cfg.data.seed,
            "train.checkpoint_every": max(t.train_steps // 4, 1),
            "train.eval_every": max(t.train_steps // 4, 1),
        },
    )
    run = distill(
        cfg, read_jsonl(data.outputs["train"]), read_jsonl(data.outputs["eval"]), workdir=ctx.directory,
        name="teacher", tracking=run_tracking(ctx), **ctx.train_display("teacher (cross-entropy)"),
    )  # fmt: skip
    log_curves(ctx, run.history, "teacher_learning_curves.png")
    return {"path": str(run.export_path), "revision": None, "trained_steps": t.train_steps}


def preflight(cfg: Config) -> None:
    """Compare the student's and the teacher's vocabularies from tokenizer and config files at the start,
    before any teacher is trained or loaded and before any data pass (a teacher the workflow trains from
    scratch has a known tokenizer); a student built in code or cut from the teacher shares its tokenizer."""
    from kdray.teacher.preflight import preflight_workflow

    preflight_workflow(cfg)
