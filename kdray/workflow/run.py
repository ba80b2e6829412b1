"""`run_workflow`: the whole DAG on the connected Ray cluster, under one parent MLflow run.

The driver's side of a run: check the config and the tokenizers before any step, open the parent run
(tagged with the student's lineage, `lineage_tags`), execute the DAG and put the evaluation's table and
metrics on the parent run.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kdray import __version__
from kdray.config import Config, config_to_dict
from kdray.workflow.base import StepResult
from kdray.workflow.dag import build_dag
from kdray.workflow.evaluate import summary_metrics
from kdray.workflow.teacher import preflight


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
    preflight(cfg)  # tokenizer files only: a refused tokenizer pair must not cost one either
    workdir = Path(cfg.workflow.workdir).expanduser().resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cfg_dict = config_to_dict(cfg)
    parent = None
    tracking = None
    if cfg.tracking.enabled:
        from kdray.runs import close_stale_runs, flatten, git_commit, resolve_tracking_uri
        from kdray.tracking import Tracker

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
            from kdray.runs import close_child_runs

            with contextlib.suppress(Exception):  # the store may be what failed; the resume closes them
                close_child_runs(parent.tracking_uri, parent.run_id)
        raise
    except BaseException:
        if parent is not None:
            parent.close(status="FAILED")
        raise
    return WorkflowResult(
        steps[-1], parent.run_id if parent else None, tracking["tracking_uri"] if tracking else None, steps
    )


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
