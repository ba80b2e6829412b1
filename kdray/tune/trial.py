"""One Tune trial: the workflow's training loop in the trial's own actor, reading the shared teacher pass.

The trial runs `kdray.train.loop.TrainingLoop`, the same loop as a Ray Train worker, through
`TuneSession`: its data is read in-process (`kdray.data.local`) from the teacher-signal cache the sweep's
teacher_outputs step wrote, in the same order as the workflow's distill step reads it, so a trial's
curve is the curve its config gives under `workflows/xkd.py`. Each evaluation is a Tune report with a
checkpoint: ASHA may stop the trial there, and a restored sweep resumes the trial from it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from kdray.config import config_from_dict

#: per trial: one JSON line per start (with the step it resumed from) and per end
EVENTS = "kdray_trial.jsonl"


class TuneSession:
    """The loop's runner inside a Tune trial: rank 0 of 1, in-process datasets, reports to Tune."""

    rank, world_size = 0, 1
    flush_before_report = True  # a trial ASHA stops never returns from its report

    def __init__(
        self,
        datasets: Mapping[str, Any],
        tracker: Any = None,
        *,
        max_steps: int | None = None,
        on_last_step: Any = None,
    ) -> None:
        self.datasets = dict(datasets)
        self.tracker = tracker
        self.max_steps = max_steps
        self.on_last_step = on_last_step

    def dataset(self, name: str) -> Any:
        return self.datasets.get(name)

    def checkpoint(self) -> Any:
        from ray import tune

        return tune.get_checkpoint()

    def make_checkpoint(self, directory: str) -> Any:
        from ray.tune import Checkpoint

        return Checkpoint.from_directory(directory)

    def report(self, metrics: dict[str, Any], checkpoint: Any) -> None:
        from ray import tune

        if self.on_last_step is not None and metrics.get("step") == self.max_steps:
            # the trial's work is done before its last report: Tune may stop the trial inside it
            # (a scheduler's decision at the last rung), and nothing after it would run then
            self.on_last_step()
        tune.report(_tune_metrics(metrics), checkpoint=checkpoint)

    def device(self, use_gpu: bool) -> torch.device:
        # Tune gives a GPU trial its GPU as the only visible device
        return torch.device("cuda") if use_gpu and torch.cuda.is_available() else torch.device("cpu")

    def prepare(self, student: Any) -> Any:
        return student


def _tune_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Numbers only (a None stamp would make Tune's loggers choke), bookkeeping left out."""
    from kdray.train.loop import BOOKKEEPING

    return {k: v for k, v in metrics.items() if k not in BOOKKEEPING and isinstance(v, (int, float))}


def trial_files(sweep_dir: str | Path, trial_id: str) -> Path:
    """Where a trial's events, per-step metrics and MLflow spool are kept."""
    return Path(sweep_dir) / "trials" / trial_id


def _event(trial_dir: Path, **fields: Any) -> None:
    with (trial_dir / EVENTS).open("a") as f:
        f.write(json.dumps({"t": time.time(), "pid": os.getpid(), **fields}) + "\n")


def _records(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def trial_datasets(cfg: Any, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The trial's train and eval data, in the order and with the values of the workflow's Ray Data
    pipeline: the signal cache when the sweep's teacher pass wrote one, else the tokenized records."""
    from kdray.data.cache import SignalCache
    from kdray.data.local import tokenized_records
    from kdray.train.trainer import training_rows

    tok = {
        "max_prompt_tokens": cfg.data.max_prompt_tokens,
        "max_response_tokens": cfg.data.max_response_tokens,
        "chat_template": cfg.data.chat_template,
        "batch_size": cfg.train.batch_size,
    }
    tokenizer = inputs["tokenizer_path"]  # loaded as the pipeline's Tokenize loads it
    # records, or with data.preferences each pair as two consecutive rows, as `distill` lays them out
    train_rows, eval_rows = training_rows(cfg, _records(inputs["train"]), _records(inputs["eval"]))
    eval_ds = tokenized_records(eval_rows, tokenizer, **tok)
    passes = inputs.get("teacher_passes") or {}
    if passes:  # one teacher pass per swept teacher temperature: read the one this trial's loss wants
        from kdray.validate import teacher_temperature

        inputs = {**inputs, **passes[f"{teacher_temperature(cfg):g}"]}
    if inputs.get("signal_cache"):
        train_ds = SignalCache(inputs["cache_dir"]).local(inputs["signal_cache"])
    else:
        train_ds = tokenized_records(train_rows, tokenizer, **tok)
    return {"train": train_ds, "eval": eval_ds}


def run_trial(
    config: dict[str, Any],
    *,
    base: dict[str, Any],
    inputs: dict[str, Any],
    tracking: dict[str, Any] | None = None,
    teacher_handles: list[Any] | None = None,
) -> None:
    """Tune's trainable: train the student of `base` with the trial's `config` overrides.

    `inputs` names the shared teacher pass ({train, eval, teacher_path, tokenizer_path, signal_cache,
    cache_dir}) and the sweep's directory (`sweep_dir`); `tracking` the sweep's parent MLflow run
    ({tracking_uri, experiment, parent_run_id}); `teacher_handles` the one TeacherPool the sweep
    started for on-policy methods.
    """
    from ray import tune

    from kdray.train.loop import TrainingLoop
    from kdray.train.trainer import loop_spec
    from kdray.tune.space import trial_config

    context = tune.get_context()
    # kdray's own files of the trial live in the sweep directory: Tune's trial directory is a staging
    # area whose place changes when an actor is reused for the next trial
    trial_id = context.get_trial_id()
    trial_dir = trial_files(inputs["sweep_dir"], trial_id)
    trial_dir.mkdir(parents=True, exist_ok=True)
    cfg = trial_config(config_from_dict(base, "<sweep base config>"), config)
    spec = loop_spec(
        cfg, teacher_path=inputs["teacher_path"], metrics_path=trial_dir / "metrics.jsonl", export_path=None
    )
    spec.teacher_handles = list(teacher_handles or [])
    tracker = _trial_tracker(tracking, trial_id, context.get_trial_name(), trial_dir, config)
    restored = tune.get_checkpoint() is not None
    _event(trial_dir, event="start", trial_id=trial_id, restored=restored)
    ended: list[bool] = []

    def finish() -> None:
        if not ended:
            ended.append(True)
            _event(trial_dir, event="end", step=spec.max_steps)
            if tracker is not None:
                tracker.close(status="FINISHED", timeout_s=30)

    try:
        session = TuneSession(
            trial_datasets(cfg, inputs), tracker, max_steps=spec.max_steps, on_last_step=finish
        )
        loop = TrainingLoop(spec, session)
        _event(trial_dir, event="resumed_at", step=loop.state.step)
        loop.run()
    except Exception as err:
        _event(trial_dir, event="error", error=f"{type(err).__name__}: {err}"[:2000])
        if tracker is not None:
            tracker.set_tags({"kdray.error": f"{type(err).__name__}: {err}"[:5000]})
            tracker.close(status="FAILED", timeout_s=15)
        raise
    except BaseException:
        # Tune ends a trial it stops (ASHA, or the sweep shutting down) with SystemExit in its thread:
        # not a failure; the driver's TrialRuns callback marks the run
        if not ended:
            _event(trial_dir, event="stopped", step=loop.state.step if "loop" in locals() else None)
        raise
    finish()  # a trial restored at its last step has no report left to make


def _trial_tracker(
    tracking: Mapping[str, Any] | None,
    trial_id: str,
    trial_name: str,
    trial_dir: Path,
    overrides: Mapping[str, Any],
) -> Any:
    """The trial's MLflow run, nested under the sweep's: created on the trial's first start, found again
    by its `kdray.trial_id` tag when a restored sweep resumes the trial."""
    if not tracking:
        return None
    from kdray.runs import find_run
    from kdray.tracking import Tracker

    run_id = find_run(
        tracking["tracking_uri"], tracking["experiment"],
        {"kdray.trial_id": trial_id, "mlflow.parentRunId": tracking["parent_run_id"]},
    )  # fmt: skip
    common = {"spool_dir": trial_dir / "mlflow-spool"}
    if run_id is not None:
        return Tracker(tracking["tracking_uri"], tracking["experiment"], run_id=run_id, **common)
    tracker = Tracker(
        tracking["tracking_uri"], tracking["experiment"], run_name=trial_name,
        parent_run_id=tracking["parent_run_id"],
        tags={"kdray.trial_id": trial_id, "kdray.sweep": tracking.get("sweep", "")}, **common,
    )  # fmt: skip
    tracker.log_params({**overrides, "trial_id": trial_id})
    return tracker
