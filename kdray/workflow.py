"""The distillation workflow as a DAG of cached steps, composed with Ray's DAG API.

    data → teacher → teacher_outputs ─┬→ distill ──┬→ evaluate → register
                                      └→ baseline ─┘   (baseline: reads no teacher output; it
                                                        waits for the teacher pass only for its cores)

Each step takes flat inputs (the config, the outputs of the steps it depends on) and writes one artifact
directory, `<cache_dir>/<step>-<key>`, whose key hashes the config sections the step reads, the contents
of the local files it reads (data, checkpoints), the keys of its inputs and the package's code; the
directory's `_KEY.json` records those components, so `kdray run --explain` can say why a step will run
again. A step's directory counts as finished only once its `_DONE.json`
(written last, holding the step's outputs) exists, so re-running the workflow skips finished steps and a
run killed in the middle starts again at the step it died in; inside `distill`, Ray Train resumes from
the step's last checkpoint. Changing a config section re-runs exactly the steps that read it and the
steps after them.

Steps run as Ray tasks pinned to the driver's node (their directories are local paths); the work inside
them (teacher actors, Ray Data, Ray Train workers) spreads over the cluster as configured.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kdray import __version__
from kdray.config import Config, config_from_dict, config_to_dict, with_overrides

#: the config sections each step reads: its cache key hashes exactly these (and its inputs' keys)
STEP_SECTIONS: dict[str, tuple[str, ...]] = {
    "data": ("data",),
    "teacher": ("teacher", "data.max_prompt_tokens", "data.max_response_tokens", "data.chat_template"),
    "teacher_outputs": ("teacher", "data", "train.batch_size"),
    "distill": ("model", "objective", "train", "data", "teacher"),
    "baseline": ("model", "train", "data"),
    "evaluate": (
        "data",
        "workflow.eval_max_new_tokens",
        "workflow.samples",
        "workflow.lca_samples",
        "workflow.lca_temperature",
    ),
    "register": ("tracking.registered_model", "tracking.experiment"),
}
#: the config fields naming local files a step reads: its key hashes their contents (hub ids: nothing)
STEP_FILES: dict[str, tuple[str, ...]] = {
    "data": ("data.source",),  # every later step reads the data through the data step's key
    "teacher": ("teacher.name_or_path",),
    "distill": ("model.name_or_path",),
    "baseline": ("model.name_or_path",),
}
#: values of `*.name_or_path` that name no file: models built in code, the teacher's resolved model
_NOT_FILES = ("tiny", "teacher")
DONE = "_DONE.json"
KEY = "_KEY.json"


@dataclass(frozen=True)
class StepResult:
    """What a step produced: its key, directory and outputs; `cached` when a finished run was reused."""

    step: str
    key: str
    directory: str
    outputs: dict[str, Any]
    cached: bool
    seconds: float


@dataclass
class StepContext:
    """What a running step may use: its directory, the resolved config and its MLflow run (or None)."""

    step: str
    key: str
    directory: Path
    cfg: Config
    tracker: Any
    progress: bool = False

    def train_display(self, label: str) -> dict[str, Any]:
        """How a training run shows its progress: a bar on a terminal, log lines otherwise."""
        return {"progress_desc": label, "progress_bar": self.progress}


def _section(cfg_dict: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg_dict
    for part in dotted.split("."):
        node = node[part]
    return node


def key_components(step: str, cfg: Config, inputs: Sequence[StepResult]) -> dict[str, Any]:
    """What a step's cache key hashes, by name: a hash per config section it reads (STEP_SECTIONS), the
    content fingerprint per file field it reads (STEP_FILES; None for a hub id or a model built in code),
    the package's code fingerprint and version, and its inputs' (step, key) pairs. Recorded in the step
    directory's `_KEY.json`, where `explain_steps` finds what changed since."""
    from kdray.data.cache import code_fingerprint, content_fingerprint, fingerprint

    d = config_to_dict(cfg)
    sections = {name: fingerprint([_section(d, name)])[:16] for name in STEP_SECTIONS[step]}
    if step == "teacher_outputs":  # of the objective, only what changes the teacher's outputs: a sweep
        wanted = teacher_outputs_wanted(cfg)  # over loss weights reuses one teacher pass
        sections["objective.teacher_outputs"] = fingerprint([wanted])[:16]
    files: dict[str, str | None] = {}
    for name in STEP_FILES.get(step, ()):
        value = _section(d, name)
        model_in_code = name.endswith(".name_or_path") and value in _NOT_FILES
        files[name] = None if model_in_code else content_fingerprint(value)
    return {
        "step": step,
        "sections": sections,
        "files": files,
        "code": code_fingerprint(),
        "version": __version__,
        "inputs": [[i.step, i.key] for i in inputs],
    }


def key_of(components: Mapping[str, Any]) -> str:
    """The cache key of a step from its `key_components`."""
    from kdray.data.cache import fingerprint

    return fingerprint([components])[:16]


def step_key(step: str, cfg: Config, inputs: Sequence[StepResult]) -> str:
    """Hash of the step name, the config sections and file contents it reads, its inputs' keys and the
    package's code (see `key_components`)."""
    return key_of(key_components(step, cfg, inputs))


def explain_steps(cfg: Config) -> list[str]:
    """One line per step of the DAG, in order: `reused` or `will run` and why (`kdray run --explain`)."""
    from kdray.workflow_explain import explain_steps as explain

    return explain(cfg)


def teacher_outputs_wanted(cfg: Config) -> dict[str, Any]:
    """What the teacher pass must produce for `cfg`: a signal (at which temperature), generations (how
    long, how sampled). Two configs that want the same share one teacher pass (a sweep's trials)."""
    from kdray.train.trainer import needs_generations, needs_signal
    from kdray.validate import teacher_temperature

    o = cfg.objective
    generations = needs_generations(cfg)
    signal = needs_signal(cfg)
    return {
        "signal": signal,
        "temperature": teacher_temperature(cfg) if signal else None,
        "generations": generations,
        "max_new_tokens": o.max_new_tokens if generations else None,
        "generation_temperature": o.generation_temperature if generations else None,
    }


def finished(directory: Path) -> dict[str, Any] | None:
    """The recorded outputs of a finished step directory, None when it is absent or unfinished."""
    done = directory / DONE
    return json.loads(done.read_text()) if done.is_file() else None


# ---------------------------------------------------------------------------------------------- steps


def _records(path: str | Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_records(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    with path.open("w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def data_step(ctx: StepContext) -> dict[str, Any]:
    """Read (or generate) the train and held-out splits once; later steps read these jsonl files."""
    from kdray.data import read_config_split

    out: dict[str, Any] = {}
    for which in ("train", "eval"):
        result = read_config_split(ctx.cfg.data, which)  # type: ignore[arg-type]
        path = ctx.directory / f"{which}.jsonl"
        _write_records(path, result.records)
        print(f"[data] {which}: {result.summary()}", flush=True)
        out[which] = str(path)
        out[f"{which}_rows"] = len(result.records)
        out[f"{which}_malformed"] = len(result.malformed)
    if ctx.tracker is not None:
        ctx.tracker.log_metrics({k: v for k, v in out.items() if isinstance(v, int)}, step=0)
    return out


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
            "train.lr": t.train_lr,
            "train.warmup_steps": min(20, t.train_steps // 10),
            "train.lr_schedule": "cosine",
            "train.seed": ctx.cfg.data.seed,
            "train.checkpoint_every": max(t.train_steps // 4, 1),
            "train.eval_every": max(t.train_steps // 4, 1),
        },
    )
    run = distill(
        cfg, _records(data.outputs["train"]), _records(data.outputs["eval"]), workdir=ctx.directory,
        name="teacher", tracking=_run_tracking(ctx), **ctx.train_display("teacher (cross-entropy)"),
    )  # fmt: skip
    _log_curves(ctx, run.history, "teacher_learning_curves.png")
    return {"path": str(run.export_path), "revision": None, "trained_steps": t.train_steps}


def teacher_outputs_step(ctx: StepContext, data: StepResult, teacher: StepResult) -> dict[str, Any]:
    """One teacher pass over the training split, written to the signal cache (log-probs, and the
    teacher's generations for SeqKD / sequence-level X-KD); every later run or Tune trial reads it."""
    from kdray.data.cache import SignalCache, signal_cache_key
    from kdray.models.loading import load_model_config
    from kdray.train.trainer import build_datasets, needs_generations, needs_signal
    from kdray.validate import teacher_temperature

    cfg = ctx.cfg
    generations = needs_generations(cfg)
    if not (needs_signal(cfg) or generations):
        return {"signal_cache": None, "reason": f"method {cfg.objective.method!r} reads no teacher output"}
    t_path = teacher.outputs["path"]
    key = signal_cache_key(  # the teacher step's key names a trained teacher; a hub id names itself
        teacher=f"{t_path}@{teacher.key}", revision=cfg.teacher.revision, tokenizer=t_path,
        top_k=cfg.teacher.top_k, temperature=teacher_temperature(cfg),
        data=f"{data.key}:{ctx.key}", version=__version__,
    )  # fmt: skip
    cache = SignalCache(ctx.directory / "signal")
    train_ds, _ = build_datasets(
        cfg, _records(data.outputs["train"]), _records(data.outputs["eval"])[:1],
        teacher_path=t_path, tokenizer_path=t_path,
    )  # fmt: skip
    started = time.time()
    vocab = int(load_model_config(t_path).vocab_size)
    rows = cache.write(train_ds, key, vocab_size=vocab, meta={"teacher": t_path, "generations": generations})
    seconds = time.time() - started
    if ctx.tracker is not None:
        ctx.tracker.set_tags({"kdray.signal_cache_key": key})
        ctx.tracker.log_metrics({"rows": rows, "rows_per_s": rows / max(seconds, 1e-9)}, step=0)
    return {"signal_cache": key, "cache_dir": str(cache.root), "rows": rows, "generations": generations}


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
        ctx.cfg, _records(data.outputs["train"]), _records(data.outputs["eval"]), workdir=ctx.directory,
        name="student", teacher_path=teacher.outputs["path"], signal_dataset=signal,
        tracking=_run_tracking(ctx), **ctx.train_display(f"student ({ctx.cfg.objective.method})"),
    )  # fmt: skip
    _log_curves(ctx, run.history, "learning_curves.png")
    return {"student": str(run.export_path), "metrics": str(run.metrics_path), "final": _finite(run.final)}


def _preflight(cfg: Config) -> None:
    """Compare the student's and the teacher's vocabularies from tokenizer and config files at the start,
    before any teacher is trained or loaded and before any data pass (a teacher the workflow trains from
    scratch has a known tokenizer); a student built in code or cut from the teacher shares its tokenizer."""
    from kdray.teacher.preflight import preflight_workflow

    preflight_workflow(cfg)


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
        cfg, _records(data.outputs["train"]), _records(data.outputs["eval"]), workdir=ctx.directory,
        name="baseline", teacher_path=teacher.outputs["path"], tracking=_run_tracking(ctx),
        **ctx.train_display("baseline (SFT only)"),
    )  # fmt: skip
    _log_curves(ctx, run.history, "learning_curves.png")
    return {"student": str(run.export_path), "metrics": str(run.metrics_path), "final": _finite(run.final)}


def evaluate_step(
    ctx: StepContext,
    data: StepResult,
    teacher: StepResult,
    student: StepResult,
    baseline: StepResult | None = None,
) -> dict[str, Any]:
    """Greedy held-out generations of the teacher, the SFT baseline and the student, scored for the
    task; sample generations and (X-KD) the reward heat-map go to MLflow. On exact-match tasks the two
    students also get the LCA uncertainty AUROCs (a second table; `workflow.lca_samples: 0` skips it)."""
    from kdray.eval.evaluate import TASK_METRIC, greedy_generations, reward_rows, task_scores
    from kdray.eval.uncertainty import evaluate_models_lca, format_lca_table, lca_applies, not_applicable

    cfg = ctx.cfg
    records = _records(data.outputs["eval"])
    prompts = [r["prompt"] for r in records]
    new_tokens = cfg.workflow.eval_max_new_tokens or cfg.data.max_response_tokens
    models = {"teacher": ("teacher", teacher.outputs["path"])} if teacher.outputs.get("path") else {}
    if baseline is not None:
        models["baseline"] = ("student (SFT only)", baseline.outputs["student"])
    models["student"] = (f"student ({cfg.objective.method})", student.outputs["student"])
    metric = TASK_METRIC[cfg.data.task]
    scores: dict[str, dict[str, float]] = {}
    samples: list[dict[str, Any]] = []
    for short, (label, path) in models.items():
        texts = greedy_generations(
            path, prompts, max_new_tokens=new_tokens, chat_template=cfg.data.chat_template,
            desc=f"evaluating {label}",
        )  # fmt: skip
        scores[label] = task_scores(cfg.data.task, texts, records)
        if ctx.tracker is not None:
            ctx.tracker.log_metrics({f"{short}/{k}": v for k, v in scores[label].items()}, step=0)
        for r, text in list(zip(records, texts, strict=True))[: cfg.workflow.samples]:
            samples.append(
                {"model": label, "prompt": r["prompt"], "reference": r["response"], "output": text}
            )
    table = format_table(scores, metric, cfg.data.task, len(records))
    students = {short: models[short] for short in ("baseline", "student") if short in models}
    lca = evaluate_models_lca(
        students, records, task=cfg.data.task, samples=cfg.workflow.lca_samples,
        temperature=cfg.workflow.lca_temperature, max_new_tokens=new_tokens,
        chat_template=cfg.data.chat_template, seed=cfg.data.seed, directory=ctx.directory,
    )  # fmt: skip
    if lca:
        lca_scores = {students[short][0]: values for short, values in lca.items()}
        table += "\n\n" + format_lca_table(lca_scores, cfg.data.task, len(records), cfg.workflow.lca_samples)
    elif cfg.workflow.lca_samples and not lca_applies(cfg.data.task):
        table += "\n\n" + not_applicable(cfg.data.task)
    for short, values in lca.items():
        if ctx.tracker is not None:
            ctx.tracker.log_metrics({f"{short}/{k}": v for k, v in values.items() if k != "prompts"}, step=0)
            ctx.tracker.log_artifact(str(ctx.directory / f"lca_{short}.jsonl"))
    (ctx.directory / "table.md").write_text(table + "\n")
    _write_records(ctx.directory / "samples.jsonl", samples)
    rows = reward_rows(
        student.outputs["student"], records[: cfg.workflow.samples],
        max_prompt_tokens=cfg.data.max_prompt_tokens, max_response_tokens=cfg.data.max_response_tokens,
        chat_template=cfg.data.chat_template,
    )  # fmt: skip
    if ctx.tracker is not None:
        ctx.tracker.log_text(table, "table.md")
        ctx.tracker.log_artifact(str(ctx.directory / "samples.jsonl"))
        if rows:
            from kdray.plots import reward_heatmap

            ctx.tracker.log_figure(reward_heatmap(rows), "reward_heatmap.png")
    return {"metric": metric, "scores": scores, "table": table, "reward_rows": len(rows), "lca": lca}


def register_step(ctx: StepContext, student: StepResult, evaluation: StepResult | None) -> dict[str, Any]:
    """Log the student to MLflow as a model (pyfunc over the HF checkpoint) and register it."""
    if ctx.tracker is None:
        return {"registered": None, "student": student.outputs["student"], "reason": "tracking disabled"}
    name = ctx.cfg.tracking.registered_model or f"{ctx.cfg.tracking.experiment}-student"
    d = ctx.cfg.data  # a reward head's model (`<name>-reward`) tokenizes as the run did
    tokenization = {"max_prompt_tokens": d.max_prompt_tokens, "max_response_tokens": d.max_response_tokens,
                    "chat_template": d.chat_template}  # fmt: skip
    version = ctx.tracker.log_student(
        student.outputs["student"], registered_model=name, reward_tokenization=tokenization,
        max_new_tokens=ctx.cfg.workflow.eval_max_new_tokens or d.max_response_tokens,
        chat_template=d.chat_template,
    )  # fmt: skip
    return {"registered": name, "version": version, "student": student.outputs["student"]}


STEPS: dict[str, Callable[..., dict[str, Any]]] = {
    "data": data_step,
    "teacher": teacher_step,
    "teacher_outputs": teacher_outputs_step,
    "distill": distill_step,
    "baseline": baseline_step,
    "evaluate": evaluate_step,
    "register": register_step,
}


def format_table(scores: Mapping[str, Mapping[str, float]], metric: str, task: str, n: int) -> str:
    """The evaluation table as markdown, headline metric first."""
    extra = sorted({k for v in scores.values() for k in v} - {metric})
    head = f"| model ({task}, {n} held-out) | {metric} | " + " | ".join(extra) + " |"
    lines = [head, "|---|" + "---:|" * (1 + len(extra))]
    for label, values in scores.items():
        cells = [f"{values[metric]:.2f}"] + [f"{values.get(k, float('nan')):.3f}" for k in extra]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _finite(d: Mapping[str, Any]) -> dict[str, Any]:
    import math

    return {k: v for k, v in d.items() if not (isinstance(v, float) and not math.isfinite(v))}


def _run_tracking(ctx: StepContext) -> dict[str, Any] | None:
    """Where a Ray Train worker logs its per-step metrics: this step's MLflow run."""
    if ctx.tracker is None:
        return None
    return {
        "tracking_uri": ctx.tracker.tracking_uri,
        "experiment": ctx.tracker.experiment,
        "run_id": ctx.tracker.run_id,
        "spool_dir": str(ctx.directory / "mlflow-spool-rank0"),
    }


def _log_curves(ctx: StepContext, history: Sequence[Mapping[str, Any]], name: str) -> None:
    if ctx.tracker is None or not history:
        return
    from kdray.plots import learning_curves

    ctx.tracker.log_figure(learning_curves(history), name)


# ------------------------------------------------------------------------------------------ the DAG


def run_step(
    step: str, cfg_dict: dict[str, Any], options: dict[str, Any], *inputs: StepResult | None
) -> StepResult:
    """Run one step, or return its recorded outputs when its directory already finished.

    Runs inside a Ray task. `options["tracking"]` names the workflow's parent MLflow run, under which the
    step opens a nested run (tagged `kdray.cached` when it only reports a finished directory);
    `options["progress"]` says whether the driver's console shows progress bars (a terminal) or only
    log lines (a Ray job's log, CI).
    """
    from ray.data import DataContext

    from kdray.console import quiet_ray_data

    # per-operator Ray Data bars (one per map/split stage) drown the step's own progress in the log
    DataContext.get_current().enable_operator_progress_bars = False
    DataContext.get_current().enable_progress_bars = bool(options.get("progress"))
    quiet_ray_data()  # no execution plan per dataset on the console (kdray run --verbose shows them)
    tracking = options.get("tracking")
    cfg = config_from_dict(cfg_dict)
    present = [i for i in inputs if i is not None]
    components = key_components(step, cfg, present)
    key = key_of(components)
    directory = cache_root(cfg) / f"{step}-{key}"
    started = time.time()
    recorded = finished(directory) if cfg.workflow.resume else None
    tracker = _step_tracker(tracking, step, key, cached=recorded is not None)
    try:
        if recorded is not None:
            print(f"[{step}] finished earlier, reusing {directory}", flush=True)
            result = StepResult(step, key, str(directory), recorded, True, 0.0)
        else:
            print(f"[{step}] running -> {directory}", flush=True)
            if not cfg.workflow.resume:  # from scratch: no checkpoint of an earlier attempt is resumed
                shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True, exist_ok=True)
            (directory / DONE).unlink(missing_ok=True)
            _atomic_write(directory / KEY, json.dumps(components, indent=1))
            ctx = StepContext(step, key, directory, cfg, tracker, bool(options.get("progress")))
            outputs = STEPS[step](ctx, *inputs)
            _atomic_write(directory / DONE, json.dumps(outputs, indent=1, default=str))
            result = StepResult(step, key, str(directory), outputs, False, time.time() - started)
            print(f"[{step}] done in {result.seconds:.0f} s", flush=True)
        if tracker is not None:
            tracker.log_params({f"output.{k}": v for k, v in result.outputs.items() if k != "table"})
            tracker.close()
    except BaseException:
        if tracker is not None:
            tracker.close(status="FAILED")
        raise
    return result


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _step_tracker(tracking: dict[str, Any] | None, step: str, key: str, *, cached: bool) -> Any:
    if not tracking:
        return None
    from kdray.tracking import Tracker

    return Tracker(
        tracking["tracking_uri"], tracking["experiment"], run_name=step,
        parent_run_id=tracking["parent_run_id"],
        tags={"kdray.step": step, "kdray.step_key": key, "kdray.cached": str(cached).lower()},
    )  # fmt: skip


def cache_root(cfg: Config) -> Path:
    """Where step directories live: `workflow.cache_dir`, or `<workdir>/steps`."""
    return Path(cfg.workflow.cache_dir or Path(cfg.workflow.workdir) / "steps").expanduser().resolve()


def _step_task() -> tuple[Any, Any]:
    """`run_step` as a Ray task with no CPU of its own, pinned to this node (its directories are local
    paths), and that scheduling strategy."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return here, ray.remote(num_cpus=0, max_retries=0, scheduling_strategy=here)(run_step)


def dag_steps(cfg: Config) -> list[tuple[str, tuple[str, ...]]]:
    """The steps of the workflow for `cfg`, in order, each with the steps whose results it receives: the
    one wiring `build_dag` runs and `kdray run --explain` keys (ordering-only edges are `build_dag`'s,
    and stay out of the keys, as in `run_step`)."""
    wanted = set(cfg.workflow.steps)
    steps: list[tuple[str, tuple[str, ...]]] = [
        ("data", ()),
        ("teacher", ("data",)),
        ("teacher_outputs", ("data", "teacher")),
        ("distill", ("data", "teacher", "teacher_outputs")),
    ]
    baseline = cfg.workflow.baseline and "evaluate" in wanted
    last = "distill"
    if baseline:
        steps.append(("baseline", ("data", "teacher")))
        last = "baseline"
    if "evaluate" in wanted:
        steps.append(("evaluate", ("data", "teacher", "distill", *(("baseline",) if baseline else ()))))
        last = "evaluate"
    if "register" in wanted:
        steps.append(("register", ("distill", last)))
    return steps


def build_dag(cfg: Config, tracking: dict[str, Any] | None = None, *, progress: bool = False) -> Any:
    """The workflow as a Ray DAG (`.bind()`); `.execute()` returns the ObjectRef of every step's result.

    Steps are Ray tasks with no CPU of their own (the actors and workers they start hold the resources)
    pinned to this node. The baseline trains beside the student when the cluster has the CPUs for both
    trainings and a core to spare for their data pipelines (their start-up costs then overlap too);
    otherwise after it, since two trainings short of cores would only wait for each other's data. Either
    way it starts after the teacher pass, which holds the teacher's cores.
    """
    import ray

    here, task = _step_task()
    d = config_to_dict(cfg)
    options = {"tracking": tracking, "progress": progress}

    def node(step: str, *inputs: Any) -> Any:
        return task.options(name=f"kdray:{step}").bind(step, d, options, *inputs)

    nodes: dict[str, Any] = {}
    for step, inputs in dag_steps(cfg):
        args = [nodes[i] for i in inputs]
        if step == "baseline":
            train_cpus = cfg.train.num_workers * cfg.train.cpus_per_worker
            side_by_side = ray.cluster_resources().get("CPU", 0.0) >= 2 * train_cpus + 1
            # beside the student, not beside the teacher pass: that one holds the teacher's cores
            args.append(_after(nodes["teacher_outputs" if side_by_side else "distill"]))
        if step == "evaluate" and "baseline" not in inputs:
            args.append(None)  # the evaluate step's baseline argument
        nodes[step] = node(step, *args)
    return ray.remote(num_cpus=0, scheduling_strategy=here)(_gather).bind(*nodes.values())


def run_teacher_steps(cfg: Config, tracking: dict[str, Any] | None = None) -> list[StepResult]:
    """Run (or reuse) data → teacher → teacher_outputs: what every trial of a sweep shares. The teacher
    is trained or checked once and scores the data once; the trials only read the cache it writes."""
    import ray

    _preflight(cfg)
    _, task = _step_task()
    d = config_to_dict(cfg)
    options = {"tracking": tracking, "progress": sys.stderr.isatty()}
    data = ray.get(task.options(name="kdray:data").remote("data", d, options))
    teacher = ray.get(task.options(name="kdray:teacher").remote("teacher", d, options, data))
    outputs = ray.get(
        task.options(name="kdray:teacher_outputs").remote("teacher_outputs", d, options, data, teacher)
    )
    return [data, teacher, outputs]


def prefix_keys(cfg: Config) -> dict[str, str]:
    """The cache keys of data, teacher and teacher_outputs for `cfg`, computed without running them."""
    keys: dict[str, str] = {}
    inputs: list[StepResult] = []
    for step in ("data", "teacher", "teacher_outputs"):
        keys[step] = step_key(step, cfg, inputs)
        inputs = [*inputs, StepResult(step, keys[step], "", {}, True, 0.0)]
    return keys


def _after(node: Any) -> Any:
    """An ordering-only edge: the downstream step waits for `node` but does not receive its result."""
    import ray

    return ray.remote(num_cpus=0)(_none).bind(node)


def _none(_: Any) -> None:
    return None


def _gather(*results: StepResult) -> list[StepResult]:
    """The DAG's sink: every step's result, in order, for the summary."""
    return list(results)


@dataclass
class WorkflowResult:
    """The final step's result and the parent MLflow run (None when tracking is off)."""

    last: StepResult
    parent_run_id: str | None
    tracking_uri: str | None
    steps: list[StepResult]

    def to_dict(self) -> dict[str, Any]:
        return {
            "last": asdict(self.last),
            "parent_run_id": self.parent_run_id,
            "tracking_uri": self.tracking_uri,
            "steps": [asdict(s) for s in self.steps],
        }


def run_workflow(cfg: Config, *, run_name: str | None = None) -> WorkflowResult:
    """Run (or resume) the whole workflow on the connected Ray cluster under one parent MLflow run."""
    import ray

    from kdray.validate import validate_config

    validate_config(cfg)  # before any step: a bad term or temperature must not cost a teacher pass
    _preflight(cfg)  # tokenizer files only: a refused tokenizer pair must not cost one either
    workdir = Path(cfg.workflow.workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_dict = config_to_dict(cfg)
    parent = None
    tracking = None
    if cfg.tracking.enabled:
        from kdray.tracking import Tracker, close_stale_runs, flatten, git_commit, resolve_tracking_uri

        uri = resolve_tracking_uri(cfg.tracking.tracking_uri, workdir)
        for stale in close_stale_runs(uri, cfg.tracking.experiment):
            print(f"[mlflow] run {stale} was left RUNNING by a killed process: marked KILLED", flush=True)
        name = run_name or cfg.tracking.run_name or _default_run_name(cfg)
        parent = Tracker(uri, cfg.tracking.experiment, run_name=name, tags=lineage_tags(cfg, git_commit()))
        parent.log_params(flatten(cfg_dict))
        parent.log_text(_yaml(cfg), "config.yaml")
        tracking = {
            "tracking_uri": uri,
            "experiment": cfg.tracking.experiment,
            "parent_run_id": parent.run_id,
        }
    try:
        dag = build_dag(cfg, tracking, progress=sys.stderr.isatty())
        with warnings.catch_warnings():
            # Ray 2.60 marks DAGNode.execute() deprecated without naming a replacement; the executor is
            # confined to this line, so moving to its successor will be a local change
            warnings.filterwarnings("ignore", message=r"DAGNode\.execute\(\) is deprecated")
            steps = ray.get(dag.execute())
        if parent is not None:
            evaluation = next((s for s in steps if s.step == "evaluate"), None)
            if evaluation is not None:
                parent.log_text(evaluation.outputs["table"], "table.md")
                parent.log_metrics(summary_metrics(evaluation.outputs), step=0)
            parent.close()
    except KeyboardInterrupt:
        if parent is not None:
            parent.close(status="KILLED")
        raise
    except BaseException:
        if parent is not None:
            parent.close(status="FAILED")
        raise
    return WorkflowResult(
        steps[-1], parent.run_id if parent else None, tracking["tracking_uri"] if tracking else None, steps
    )


def summary_metrics(evaluation: Mapping[str, Any]) -> dict[str, float]:
    """The evaluate step's scores as the parent run's metrics (`<model>/<metric>`, e.g.
    `student xkd/exact_match`), so the runs table of the experiment shows each run's result."""
    out = {
        f"{label}/{name}": value
        for label, values in evaluation.get("scores", {}).items()
        for name, value in values.items()
    }
    for short, values in (evaluation.get("lca") or {}).items():
        out.update({f"{short}/{k}": v for k, v in values.items() if isinstance(v, (int, float))})
    return out


def _default_run_name(cfg: Config) -> str:
    student = cfg.model.name_or_path.rstrip("/").split("/")[-1]
    teacher = cfg.teacher.name_or_path.rstrip("/").split("/")[-1]
    return f"{cfg.objective.method}-{teacher}-to-{student}-{cfg.data.task}"


def lineage_tags(cfg: Config, commit: str | None) -> dict[str, str]:
    """Tags that say where a student came from: teacher and revision, tokenizer, loss mixture, code."""
    mixture = " + ".join(f"{t.weight:g}*{t.name}" for t in cfg.objective.terms)
    tags = {
        "kdray.version": __version__,
        "kdray.teacher": cfg.teacher.name_or_path,
        "kdray.teacher_revision": cfg.teacher.revision or "default",
        "kdray.tokenizer": cfg.teacher.name_or_path,
        "kdray.student": cfg.model.name_or_path,
        "kdray.method": cfg.objective.method,
        "kdray.objective": mixture,
        "kdray.task": cfg.data.task,
    }
    if commit:
        tags["kdray.git_commit"] = commit
    return tags


def _yaml(cfg: Config) -> str:
    from kdray.config import dump_config

    return dump_config(cfg)


def clear_step(cfg: Config, step: str) -> int:
    """Delete the finished directories of `step` (forcing it and the steps after it to run again)."""
    removed = 0
    for directory in cache_root(cfg).glob(f"{step}-*"):
        shutil.rmtree(directory)
        removed += 1
    return removed
