"""`run_sweep`: a Ray Tune search over a config's `tune.search_space`, sharing one teacher pass.

    data → teacher → teacher_outputs (once, the workflow's own cached steps) → Tuner(trials) → best config

The workflow's first three steps run (or are reused) exactly as under `workflows/xkd.py`, so the
teacher scores the data once and every trial reads that signal cache; on-policy methods get one
TeacherPool that all trials call. Trials are `kdray.tune.trial.run_trial`, each holding one student
worker's resources. ASHA stops poor trials at their evaluations. The sweep's directory
(`<workdir>/sweeps/<tune.name>`) holds Tune's state: running the same sweep again restores it
(`Tuner.restore`), keeping finished trials and resuming unfinished ones from their checkpoints.
In MLflow the sweep is a parent run with a nested run per trial (and per workflow step); the best
config, ready for `workflows/xkd.py`, and a plot of the search are logged as its artifacts.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ray.tune import Callback

from kdray.config import Config, config_to_dict, dump_config, with_overrides
from kdray.tune.report import best_trial, max_evaluations, trial_rows, write_best_config

logger = logging.getLogger("kdray.tune")

SWEEP_STATE = "kdray_sweep.json"


@dataclass
class SweepResult:
    """What a sweep produced: every trial's row, the best one, and where the best config was written."""

    directory: Path
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    best_config_path: Path | None
    parent_run_id: str | None
    tracking_uri: str | None
    teacher_steps: list[Any] = field(default_factory=list)

    def table(self, metric: str) -> str:
        """The trials as markdown, best first (failed trials last, with their error)."""
        dims = sorted({k for t in self.trials for k in t["config"]})
        head = f"| trial | status | evals | {metric} | " + " | ".join(dims) + " |"
        lines = [head, "|---|---|---:|---:|" + "---|" * len(dims)]
        for t in self.trials:
            value = t.get("metric")
            cells = [
                t["trial_id"], t["status"], str(t.get("iterations", 0)),
                f"{value:.4f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-",
                *[_short(t["config"].get(d)) for d in dims],
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def sweep_dir(cfg: Config) -> Path:
    """Where the sweep's Tune state, trials and best config live."""
    return Path(cfg.workflow.workdir).expanduser().resolve() / "sweeps" / cfg.tune.name


def run_sweep(
    cfg: Config,
    *,
    run_name: str | None = None,
    trainable: Any = None,
    verbose: int = 1,
) -> SweepResult:
    """Run (or resume) the sweep of `cfg` on the connected Ray cluster.

    `trainable` replaces `run_trial` (same keyword arguments); tests inject faults through it.
    """
    from ray import tune

    from kdray.teacher.preflight import student_tokenizer_path
    from kdray.train.trainer import worker_resources
    from kdray.tune.space import (
        check_shared_teacher_pass,
        check_trials_fit,
        param_space,
        teacher_pass_variants,
    )
    from kdray.tune.trial import run_trial
    from kdray.validate import teacher_temperature
    from kdray.workflow import run_teacher_steps

    check_trials_fit(cfg)
    per_pass = check_shared_teacher_pass(cfg)
    directory = sweep_dir(cfg)
    directory.mkdir(parents=True, exist_ok=True)
    state_path = directory / SWEEP_STATE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    _check_same_sweep(cfg, state, directory)
    state["config"] = _sweep_fingerprint(cfg)
    parent, tracking = _parent_run(cfg, run_name, state.get("parent_run_id"))
    if parent is not None:
        state["parent_run_id"] = parent.run_id
    state_path.write_text(json.dumps(state))
    pool = None
    try:
        steps = run_teacher_steps(cfg, tracking)
        data, teacher, outputs = steps
        passes = {}
        for overrides in teacher_pass_variants(cfg, per_pass) if per_pass else []:
            variant = with_overrides(cfg, overrides)  # a served temperature of its own: its own pass
            out = run_teacher_steps(variant, tracking)[2].outputs
            passes[f"{teacher_temperature(variant):g}"] = {
                "signal_cache": out.get("signal_cache"), "cache_dir": out.get("cache_dir"),
            }  # fmt: skip
        inputs = {
            "train": data.outputs["train"],
            "eval": data.outputs["eval"],
            "teacher_path": teacher.outputs["path"],
            "tokenizer_path": student_tokenizer_path(cfg, teacher.outputs["path"]),
            "signal_cache": outputs.outputs.get("signal_cache"),
            "cache_dir": outputs.outputs.get("cache_dir"),
            "sweep_dir": str(directory),
            "teacher_passes": passes,
        }
        pool = _shared_pool(cfg, teacher.outputs["path"]) if teacher.outputs["path"] else None
        fn = tune.with_parameters(
            trainable or run_trial,
            base=config_to_dict(cfg),
            inputs=inputs,
            tracking={**tracking, "sweep": cfg.tune.name} if tracking else None,
            teacher_handles=pool.handles if pool is not None else [],
        )
        # one student worker's bundle, nothing for the teacher: it ran once, before the trials
        fn = tune.with_resources(fn, worker_resources(cfg))
        # Tune's own state file: saved often, so a killed driver loses at most a few seconds of it
        os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
        # every trial checkpoint at each evaluation forces a state save (num_to_keep): expected here
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        storage = str(directory.parent)
        if tune.Tuner.can_restore(str(directory)):
            print(f"[sweep] resuming {directory}: finished trials are kept", flush=True)
            tuner = tune.Tuner.restore(
                str(directory), trainable=fn, resume_unfinished=True, resume_errored=False
            )
        else:
            tuner = tune.Tuner(
                fn,
                param_space=param_space(cfg.tune.search_space),
                tune_config=_tune_config(cfg),
                run_config=tune.RunConfig(
                    name=cfg.tune.name,
                    storage_path=storage,
                    failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                    callbacks=[TrialRuns(tracking)] if tracking else None,
                    verbose=verbose,
                ),
            )
        results = tuner.fit()
        rows = trial_rows(cfg, results, directory)
        best = best_trial(cfg, rows)
        best_path = None
        if best is not None:
            best_path = write_best_config(cfg, best, directory / "best_config.yaml")
        result = SweepResult(
            directory, rows, best, best_path,
            parent.run_id if parent else None, tracking["tracking_uri"] if tracking else None, steps,
        )  # fmt: skip
        _write_summary(cfg, result)
        if parent is not None:
            _log_sweep(parent, cfg, result)
            parent.close()
        return result
    except BaseException:
        if parent is not None:
            parent.close(status="FAILED")
        raise
    finally:
        if pool is not None:
            pool.close()


def _sweep_fingerprint(cfg: Config) -> str:
    """What a sweep's trials depend on: everything but tracking and the workflow's own knobs."""
    from kdray.data.cache import fingerprint

    d = config_to_dict(cfg)
    return fingerprint([{k: v for k, v in d.items() if k not in ("tracking", "workflow")}])[:16]


def _check_same_sweep(cfg: Config, state: Mapping[str, Any], directory: Path) -> None:
    """Tune restores a sweep's own search space and trials: resuming under a changed config would
    silently mix two sweeps in one table."""
    from kdray.config import ConfigError

    recorded = state.get("config")
    if recorded is not None and recorded != _sweep_fingerprint(cfg):
        raise ConfigError(
            f"{directory} holds sweep {cfg.tune.name!r} started with a different config (search space, "
            "objective, train or data). Give this one another tune.name, or delete that directory to "
            "start the sweep over."
        )


def _tune_config(cfg: Config) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search import BasicVariantGenerator

    t, full = cfg.tune, max_evaluations(cfg)
    scheduler = (
        ASHAScheduler(
            time_attr="training_iteration",
            max_t=min(full, t.max_iterations or full),
            grace_period=t.grace_period,
            reduction_factor=t.reduction_factor,
            # a trial at max_t runs to its natural end, so it ends its own MLflow run and leaves a
            # final checkpoint; stopping it there would cut it off inside its last report
            stop_last_trials=False,
        )
        if t.scheduler == "asha"
        else FIFOScheduler()
    )
    return tune.TuneConfig(
        metric=t.metric,
        mode=t.mode,
        scheduler=scheduler,
        search_alg=BasicVariantGenerator(random_state=t.seed, max_concurrent=t.max_concurrent or 0),
        num_samples=t.num_samples,
        max_concurrent_trials=t.max_concurrent,
        # a finished trial's actor takes the next trial: no new process, torch and the tokenizer loaded
        reuse_actors=True,
    )


def _parent_run(cfg: Config, run_name: str | None, run_id: str | None) -> tuple[Any, dict[str, Any] | None]:
    """The sweep's MLflow run: the one an interrupted run of this sweep started, or a new one."""
    if not cfg.tracking.enabled:
        return None, None
    from kdray.runs import flatten, git_commit, resolve_tracking_uri
    from kdray.tracking import Tracker
    from kdray.workflow import lineage_tags

    workdir = Path(cfg.workflow.workdir).expanduser().resolve()
    uri = resolve_tracking_uri(cfg.tracking.tracking_uri, workdir)
    if run_id is not None:
        parent = Tracker(uri, cfg.tracking.experiment, run_id=run_id)
    else:
        tags = {**lineage_tags(cfg, git_commit()), "kdray.sweep": cfg.tune.name}
        parent = Tracker(
            uri, cfg.tracking.experiment, run_name=run_name or f"sweep-{cfg.tune.name}", tags=tags
        )
        parent.log_params(flatten(config_to_dict(cfg)))
        parent.log_text(dump_config(cfg), "config.yaml")
    return parent, {
        "tracking_uri": uri,
        "experiment": cfg.tracking.experiment,
        "parent_run_id": parent.run_id,
    }


def _shared_pool(cfg: Config, teacher_path: str) -> Any:
    """One TeacherPool for every trial, when some trial samples on-policy batches."""
    from kdray.train.trainer import needs_pool, teacher_pool
    from kdray.tune.space import candidates

    configs = [cfg] + [
        with_overrides(cfg, {path: value})
        for path, dim in cfg.tune.search_space.items()
        for value in candidates(dim)
    ]
    if not any(needs_pool(c) for c in configs):
        return None
    return teacher_pool(cfg, teacher_path, name=f"sweep-{cfg.tune.name}-teacher")


def _write_summary(cfg: Config, result: SweepResult) -> None:
    (result.directory / "trials.jsonl").write_text(
        "".join(json.dumps(r, default=str) + "\n" for r in result.trials)
    )
    (result.directory / "trials.md").write_text(result.table(cfg.tune.metric) + "\n")
    if result.trials:
        from kdray.plots import search_plot

        fig = search_plot(
            result.trials, cfg.tune.metric, {k: d.type for k, d in cfg.tune.search_space.items()}
        )
        fig.savefig(result.directory / "search.png", dpi=120)


def _log_sweep(parent: Any, cfg: Config, result: SweepResult) -> None:
    parent.log_artifact(result.directory / "trials.md")
    parent.log_artifact(result.directory / "trials.jsonl")
    if (result.directory / "search.png").exists():
        parent.log_artifact(result.directory / "search.png")
    if result.best_config_path is not None:
        parent.log_artifact(result.best_config_path)
    counts: dict[str, int] = {}
    for t in result.trials:
        counts[t["status"]] = counts.get(t["status"], 0) + 1
    metrics = {f"trials_{k.replace(' ', '_')}": v for k, v in counts.items()}
    if result.best is not None:
        metrics[f"best_{cfg.tune.metric}"] = result.best["metric"]
        parent.set_tags({"kdray.best_trial": result.best["trial_id"]})
    parent.log_metrics(metrics, step=0)


class TrialRuns(Callback):
    """Ends the MLflow run of a trial that could not end it itself: ASHA stops a trial inside its report
    (the trial's code never runs again), so the driver marks its run KILLED and tags it early-stopped."""

    def __init__(self, tracking: Mapping[str, Any]) -> None:
        self.tracking = dict(tracking)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "KILLED", early=True)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._end(trial, "FAILED", early=False)

    def _end(self, trial: Any, status: str, *, early: bool) -> None:
        try:
            from mlflow import MlflowClient

            from kdray.runs import find_run

            t = self.tracking
            run_id = find_run(
                t["tracking_uri"], t["experiment"],
                {"kdray.trial_id": trial.trial_id, "mlflow.parentRunId": t["parent_run_id"]},
            )  # fmt: skip
            client = MlflowClient(t["tracking_uri"])
            if run_id is None:
                if status == "FAILED":  # it failed before it could open its run: say so in MLflow too
                    self._failed_run(client, trial)
                return
            if client.get_run(run_id).info.status != "RUNNING":
                return  # the trial ended its run itself (finished, or failed in its own code)
            if early:
                client.set_tag(run_id, "kdray.early_stopped", "true")
            client.set_terminated(run_id, status)
        except Exception as err:  # tracking must never stop the sweep
            logger.warning("could not mark the MLflow run of trial %s: %s", trial.trial_id, err)

    def _failed_run(self, client: Any, trial: Any) -> None:
        from kdray.runs import flatten

        t = self.tracking
        experiment = client.get_experiment_by_name(t["experiment"]).experiment_id
        error = trial.get_error()
        tags = {
            "mlflow.parentRunId": t["parent_run_id"],
            "mlflow.runName": str(trial),
            "kdray.trial_id": trial.trial_id,
            "kdray.sweep": t.get("sweep", ""),
            "kdray.error": (f"{type(error).__name__}: {error}" if error else "unknown error")[-5000:],
        }
        run = client.create_run(experiment, tags=tags)
        params = {
            k: str(v)[:6000] for k, v in flatten({**(trial.config or {}), "trial_id": trial.trial_id}).items()
        }
        for key, value in params.items():
            client.log_param(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id, "FAILED")
