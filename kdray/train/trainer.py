"""Driver-side glue: a config and data records in, a Ray Train run of the student out.

Builds the run's one TeacherPool (every teacher call goes to it: the signal pass, the teacher's
generations, PAD's judge, on-policy scoring), the Ray Data pipeline (tokens, teacher generations or the
streaming teacher signal, or a signal cache), and a TorchTrainer whose workers run
`train_loop_per_worker`. Reads the run's metrics back as a per-step history.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdray.console import ray_train_log_level
from kdray.methods import get_method
from kdray.train.loop import LoopSpec, spec_to_config, train_loop_per_worker


@dataclass
class DistillRun:
    """What a run produced: Ray's result, the per-step metrics, the exported student."""

    result: Any
    history: list[dict[str, Any]]
    export_path: Path | None
    metrics_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> dict[str, Any]:
        """The last logged metrics."""
        return self.history[-1] if self.history else {}


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """Per-step metrics, one dict per logged step; a step replayed after a failure keeps its last line."""
    by_step: dict[int, dict[str, Any]] = {}
    p = Path(path)
    if p.exists():
        for line in p.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                by_step[int(row["step"])] = row
    return [by_step[s] for s in sorted(by_step)]


def teacher_kwargs(cfg: Any, teacher_path: str) -> dict[str, Any]:
    """Teacher constructor arguments from the `teacher` section, with the resolved model path."""
    from kdray.validate import teacher_temperature

    t = cfg.teacher
    return {
        "name_or_path": teacher_path,
        "backend": t.backend,
        "revision": t.revision,
        "gguf_file": t.gguf_file,
        "top_k": t.top_k,
        "temperature": teacher_temperature(cfg),
        "batch_size": t.batch_size,
        "dtype": t.dtype,
        "truncate": t.truncate,
        "chat_template": cfg.data.chat_template,
    }


def loop_spec(
    cfg: Any, *, teacher_path: str | None, metrics_path: Path, export_path: Path | None
) -> LoopSpec:
    """The flat worker spec of a config."""
    m, o, t = cfg.model, cfg.objective, cfg.train
    return LoopSpec(
        student={
            "name_or_path": m.name_or_path,
            "init": m.init,
            "teacher_path": teacher_path,
            "keep_every": m.keep_every,
            "tiny_layers": m.tiny_layers,
            "tiny_hidden": m.tiny_hidden,
            "tiny_vocab": m.tiny_vocab,
            "revision": m.revision,
            "gguf_file": m.gguf_file,
            "dtype": m.dtype,
        },
        terms=[{"name": x.name, "weight": x.weight, "params": dict(x.params)} for x in o.terms],
        method=o.method,
        method_params=dict(o.method_params),
        on_policy_fraction=o.on_policy_fraction,
        sampling_temperature=o.sampling_temperature,
        max_new_tokens=o.max_new_tokens,
        batch_size=t.batch_size,
        grad_accum=t.grad_accum,
        lr=t.lr,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        max_steps=t.max_steps,
        lr_schedule=t.lr_schedule,
        grad_clip=t.grad_clip,
        checkpoint_every=t.checkpoint_every,
        eval_every=t.eval_every,
        log_every=cfg.tracking.log_every,
        seed=t.seed,
        num_threads=t.cpus_per_worker,
        loss_chunk_size=t.loss_chunk_size,
        use_gpu=t.use_gpu,
        precision=t.precision,
        metrics_path=str(metrics_path),
        export_path=str(export_path) if export_path else None,
        chat_template=cfg.data.chat_template,
    )


def needs_signal(cfg: Any) -> bool:
    """Off-policy batches carry a teacher signal unless every term works from the data alone."""
    from kdray.losses import build_objective

    if cfg.objective.on_policy_fraction >= 1.0:
        return False  # every batch is sampled and scored on the fly
    return build_objective(cfg.objective.terms).needs_teacher


def needs_generations(cfg: Any) -> bool:
    """The training responses are the teacher's generations (SeqKD, or `objective.teacher_generations`)."""
    return get_method(cfg.objective.method).generations or cfg.objective.teacher_generations


def needs_pool(cfg: Any) -> bool:
    """On-policy batches are scored by a TeacherPool from inside the training loop."""
    return cfg.objective.on_policy_fraction > 0 or get_method(cfg.objective.method).data == "adaptive"


def reads_teacher(cfg: Any) -> bool:
    """Whether training reads anything of a teacher: a signal, its generations, on-policy scores, its
    rewards (PAD's judge) or a cross-tokenizer signal. SFT and AVA do not, so the workflow trains no
    teacher for them unless the student is cut from it."""
    return bool(
        needs_signal(cfg)
        or needs_generations(cfg)
        or needs_pool(cfg)
        or get_method(cfg.objective.method).needs
        or cfg.objective.cross_tokenizer
    )


def _tokenize_options(cfg: Any) -> dict[str, Any]:
    d = cfg.data
    return {"max_prompt_tokens": d.max_prompt_tokens, "max_response_tokens": d.max_response_tokens,
            "chat_template": d.chat_template, "batch_size": cfg.train.batch_size}  # fmt: skip


def eval_dataset(cfg: Any, eval_records: Sequence[Mapping[str, Any]], *, tokenizer_path: str) -> Any:
    """The held-out split as a Ray Dataset, tokenized in this process (`pipeline.tokenized_here`)."""
    from kdray.data import pipeline

    pipeline.deterministic_order()
    return pipeline.tokenized_here(eval_records, tokenizer_path, **_tokenize_options(cfg))


def train_dataset(
    cfg: Any,
    train_records: Sequence[Mapping[str, Any]],
    *,
    teacher: Any,
    tokenizer_path: str,
    progress: Any = None,
) -> Any:
    """The training rows as a streaming Ray Dataset: teacher generations where the method trains on
    them, tokenized, then the teacher's signal where the method reads one, both from `teacher` (the
    run's TeacherPool, `teacher_pool`; None for a method that reads neither). `progress` (a
    TeacherProgress actor) counts the rows the teacher scores. A run reading the signal cache skips this."""
    from kdray.data import pipeline

    pipeline.deterministic_order()
    rows, tok = cfg.train.batch_size, _tokenize_options(cfg)
    train = pipeline.records_dataset(train_records, block_rows=rows)
    if needs_generations(cfg):
        train = pipeline.with_teacher_generations(
            train, _require_pool(teacher).handles, batch_size=rows, progress=progress,
            max_new_tokens=cfg.objective.max_new_tokens, temperature=cfg.objective.generation_temperature,
        )  # fmt: skip
    train = pipeline.tokenized(train, tokenizer_path, **tok)
    if needs_signal(cfg):
        train = pipeline.with_teacher_signal(
            train, _require_pool(teacher).handles, batch_size=rows, progress=progress,
            cross=cross_signal_options(cfg, tokenizer_path),
        )  # fmt: skip
    return train


def teacher_pool(cfg: Any, teacher_path: str | None, *, name: str = "teacher", wait: bool = True) -> Any:
    """The run's TeacherPool (`teacher` section: replicas and placement) serving the model at
    `teacher_path` with the data's chat template, at the temperature the loss reads the teacher at.
    `wait` returns once every replica has loaded it; `distill` does not wait, so the teacher loads while
    Ray Train starts its workers (the clients and the sampler wait for the replicas themselves)."""
    from kdray.teacher import TeacherPool

    t = cfg.teacher
    pool = TeacherPool(
        teacher_kwargs(cfg, _require(teacher_path)), replicas=t.replicas, num_cpus=t.num_cpus,
        num_gpus=t.num_gpus, resources=t.resources, max_restarts=t.max_restarts, name=name,
    )  # fmt: skip
    try:
        if wait:
            pool.wait_ready()
    except BaseException:
        pool.close()
        raise
    return pool


def _require_pool(pool: Any) -> Any:
    if pool is None:
        raise ValueError("this method reads the teacher, but no teacher pool was given (`teacher_pool`)")
    return pool


def cross_signal_options(cfg: Any, student_tokenizer: str) -> dict[str, Any] | None:
    """With `objective.cross_tokenizer` the teacher scores its own tokenization of each row, cut like the
    student's (`kdray.teacher.cross_signal`); None otherwise."""
    if cfg.objective.cross_tokenizer is None:
        return None
    return {
        "student_tokenizer": student_tokenizer,
        "max_prompt_tokens": cfg.data.max_prompt_tokens,
        "max_response_tokens": cfg.data.max_response_tokens,
    }


def _require(teacher_path: str | None) -> str:
    if not teacher_path:
        raise ValueError(
            "this method needs a teacher, but no teacher model path was given (teacher.name_or_path)"
        )
    return teacher_path


def distill(
    cfg: Any,
    train_records: Sequence[Mapping[str, Any]],
    eval_records: Sequence[Mapping[str, Any]],
    *,
    workdir: str | Path,
    teacher_path: str | None = None,
    name: str = "distill",
    signal_dataset: Any = None,
    export: bool = True,
    tracking: Mapping[str, Any] | None = None,
    progress_desc: str | None = None,
    progress_bar: bool = True,
) -> DistillRun:
    """Train the student of `cfg` on the records with Ray Train; resumes from `workdir` if interrupted.

    `tracking` names an MLflow run ({tracking_uri, experiment, run_id, spool_dir}) that rank 0 logs its
    per-step metrics into; `progress_desc` labels the run's progress: a bar over the steps, or (with
    `progress_bar=False`, for logs) one line per logged step.
    """
    from kdray.teacher.preflight import preflight_config

    if teacher_path:  # tokenizer files only: a refused pair costs a second, before any actor starts
        preflight_config(cfg, teacher_path)
    workdir = Path(workdir).resolve()
    train_records = student_records(cfg, train_records)  # before PAD groups its prompts' responses
    # the teacher stages Ray Data runs as clients of the pool: the signal, the generations, PAD's judge
    stages = [needs_signal(cfg), needs_generations(cfg), cfg.objective.method == "pad"]
    clients = 0 if signal_dataset is not None else sum(stages)
    wanted = clients > 0 or needs_pool(cfg)
    _check_capacity(cfg, pool=wanted, clients=clients, tokenizers=0 if signal_dataset is not None else 1)
    pool = teacher_pool(cfg, teacher_path, name=f"{name}-teacher", wait=False) if wanted else None
    try:
        return _distill(cfg, train_records, eval_records, workdir=workdir, teacher_path=teacher_path, name=name,
                        signal_dataset=signal_dataset, pool=pool, export=export, tracking=tracking,
                        progress_desc=progress_desc, progress_bar=progress_bar)  # fmt: skip
    finally:
        if pool is not None:
            pool.close()


def _distill(
    cfg: Any, train_records: Sequence[Mapping[str, Any]], eval_records: Sequence[Mapping[str, Any]], *,
    workdir: Path, teacher_path: str | None, name: str, signal_dataset: Any, pool: Any,
    export: bool, tracking: Mapping[str, Any] | None, progress_desc: str | None, progress_bar: bool,
) -> DistillRun:  # fmt: skip
    import ray.train
    from ray.train.torch import TorchTrainer

    from kdray.data.pipeline import progress_actor
    from kdray.teacher.preflight import student_tokenizer_path

    extra: dict[str, Any] = {}
    live = signal_dataset is None and (needs_signal(cfg) or needs_generations(cfg))
    if cfg.objective.method == "pad" and signal_dataset is None:
        # PAD's rows are built offline from the initial student's samples, scored by the teacher
        from kdray.train.pad_data import pad_rows

        prepared = pad_rows(cfg, train_records, teacher_path=_require(teacher_path), teacher=pool)
        train_records, extra["pad"] = prepared.rows, prepared.stats
    train_records, eval_records = training_rows(cfg, train_records, eval_records)
    metrics_path = workdir / name / "metrics.jsonl"
    export_path = workdir / name / "student" if export else None
    tokenizer_path = student_tokenizer_path(cfg, teacher_path)  # the student's rows, its own tokenizer
    progress = progress_actor() if live else None
    eval_ds = eval_dataset(cfg, eval_records, tokenizer_path=tokenizer_path)
    train_ds = signal_dataset
    if train_ds is None:
        train_ds = train_dataset(
            cfg, train_records, teacher=pool, tokenizer_path=tokenizer_path, progress=progress
        )
    train_ds = kept_for_epochs(cfg, train_ds, len(train_records), live=live)
    spec = loop_spec(cfg, teacher_path=teacher_path, metrics_path=metrics_path, export_path=export_path)
    spec.teacher_progress = progress if needs_signal(cfg) else None  # generations only take tickets
    from kdray.train.resume import recover_damaged_snapshot

    recover_damaged_snapshot(workdir / "ray_train" / name)  # the workers resume from what it leaves
    spec.run_dir = str(workdir / "ray_train" / name)
    spec.tracking = dict(tracking) if tracking else None
    spec.progress_desc = progress_desc
    spec.progress_bar = progress_bar
    if needs_pool(cfg):  # on-policy samples: the workers score them with the same replicas
        spec.teacher_handles = pool.handles
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=spec_to_config(spec),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker=worker_resources(cfg),
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(workdir / "ray_train"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            logging_config=ray.train.LoggingConfig(log_level=ray_train_log_level()),
        ),
        datasets={"train": train_ds, "eval": eval_ds},
        # one worker reads each dataset whole, in its own process: a split would add a coordinator actor
        # per dataset (a process start each, before the first batch) and divide nothing
        dataset_config=ray.train.DataConfig(
            datasets_to_split=["train", "eval"] if cfg.train.num_workers > 1 else []
        ),
    )
    try:
        result = trainer.fit()
    finally:
        if progress is not None:  # one per run: a sweep of many runs would otherwise keep them all alive
            import ray

            ray.kill(progress)
    return DistillRun(result, read_history(metrics_path), export_path, metrics_path, extra)


def _check_capacity(cfg: Any, *, pool: bool, clients: int = 0, tokenizers: int = 1) -> None:
    """Refuse a run whose actors cannot all be placed at once: Ray would wait for them forever.

    Beside the training workers a run holds its TeacherPool's replicas, one client actor per replica for
    each teacher stage (`pipeline.CLIENT_CPUS`) and a tokenizing actor for the train dataset
    (`pipeline.TOKENIZE_CPUS`; a cached signal needs none, the eval split is tokenized here): training
    workers that take every CPU would leave those pending and the run waiting without a word.
    """
    import ray

    from kdray.data.pipeline import CLIENT_CPUS, TOKENIZE_CPUS

    t, r = cfg.train, cfg.teacher.replicas
    need = {
        "CPU": t.num_workers * float(t.cpus_per_worker)
        + int(pool) * r * cfg.teacher.num_cpus
        + clients * r * CLIENT_CPUS
        + tokenizers * TOKENIZE_CPUS,
        "GPU": (t.num_workers if t.use_gpu else 0.0) + int(pool) * r * cfg.teacher.num_gpus,
    }
    have = ray.cluster_resources()
    short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if v > have.get(k, 0.0)}
    if short:
        detail = ", ".join(f"{k}: needs {v:g}, the cluster has {h:g}" for k, (v, h) in short.items())
        raise RuntimeError(
            f"this run cannot place all its actors at once ({detail}): {t.num_workers} training worker(s) "
            f"of {t.cpus_per_worker:g} CPU (train.cpus_per_worker), {tokenizers} tokenizer(s) of "
            f"{TOKENIZE_CPUS:g} CPU{', the TeacherPool' if pool else ''}"
            f"{f', {clients} teacher client(s) per replica' if clients else ''}. "
            "Precompute the signal (the workflow's teacher_outputs step), lower train.cpus_per_worker, "
            "teacher.replicas or teacher.num_cpus, or add nodes (ray.init(num_cpus=...) oversubscribes a "
            "small machine)."
        )


def training_rows(
    cfg: Any, train_records: Sequence[Mapping[str, Any]], eval_records: Sequence[Mapping[str, Any]]
) -> tuple[Sequence[Mapping[str, Any]], Sequence[Mapping[str, Any]]]:
    """The rows the datasets are built from: the records, or with `data.preferences` each pair as two
    consecutive rows (chosen, rejected) cut so that no block, shard or micro-batch splits a pair.
    Demonstrations may ride along with the pairs (`pair_sign` 0), but a split with no pair is refused."""
    train_records = student_records(cfg, train_records)
    if not cfg.data.preferences:
        return rows_consumed(cfg, train_records), eval_records
    from kdray.data.pipeline import paired_rows
    from kdray.data.preferences import is_pair

    for which, records in (("train", train_records), ("eval", eval_records)):
        if not any(is_pair(r) for r in records):
            raise ValueError(
                f"data.preferences is true but no {which} record has a 'rejected' response: read pairs with "
                "kdray.data.preferences (read_preferences, arithmetic_pairs), or set data.preferences: "
                "false for demonstrations"
            )
    rows, splits = cfg.train.batch_size, cfg.train.num_workers
    train = paired_rows(train_records, block_rows=rows, splits=splits)
    return rows_consumed(cfg, train), paired_rows(eval_records, block_rows=rows, splits=splits)


def kept_for_epochs(cfg: Any, train_ds: Any, rows: int, *, live: bool) -> Any:
    """The training dataset, materialized in the object store when the run reads it more than once (fewer
    rows than steps x global batch): Ray Data would otherwise re-read and re-tokenize every row, or
    re-read the signal cache, each epoch. A dataset a live teacher scores stays a stream: materialized,
    it would hold every row's signal in memory at once."""
    return train_ds.materialize() if rows < rows_per_run(cfg) and not live else train_ds


def student_records(cfg: Any, records: Sequence[Mapping[str, Any]]) -> Sequence[Mapping[str, Any]]:
    """The training records the student may read: the first `train.max_examples` (all when None). The
    teacher pass scores exactly these, so a cached pass and live scoring see the same rows."""
    n = cfg.train.max_examples
    return records if n is None else records[:n]


def rows_consumed(cfg: Any, records: Sequence[Mapping[str, Any]]) -> Sequence[Mapping[str, Any]]:
    """The records the run will read: steps x global batch rows in data order (epochs repeat when there
    are fewer). Rows past that are never trained on, and scoring them would only fill the object store
    with signal the student never reads (gigabytes at full vocabulary)."""
    needed = rows_per_run(cfg)
    return records[:needed] if len(records) > needed else records


def rows_per_run(cfg: Any) -> int:
    """Rows one run trains on: steps x batch x gradient accumulation x workers."""
    t = cfg.train
    return t.max_steps * t.batch_size * t.grad_accum * t.num_workers


def worker_resources(cfg: Any) -> dict[str, float]:
    """What one student worker holds: `train.cpus_per_worker` CPUs, 1 GPU if use_gpu, and the custom
    resources. A Ray Train worker's bundle, and a Tune trial's (a trial trains one worker)."""
    t = cfg.train
    return {"CPU": float(t.cpus_per_worker), **({"GPU": 1.0} if t.use_gpu else {}), **t.resources}
