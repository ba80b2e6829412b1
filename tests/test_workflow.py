"""The workflow DAG: step keys, resume after a kill during distill, and `ray job submit` against a head.

The end-to-end tests run `workflows/xkd.py` as a user does, in subprocesses, on tiny models: each one
pays Ray's start-up and two or three Ray Train starts (~20 s each on two cores).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from servers import RayHead, submit, subprocess_env

from kdray.config import config_from_dict, with_overrides
from kdray.workflow import StepResult, format_table, step_key

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def tiny_config(workdir: Path, **sections) -> dict:
    """A whole workflow in a minute or two: 1-layer models, 10 teacher steps, a few student steps."""
    cfg = {
        "model": {"name_or_path": "tiny", "init": "scratch", "tiny_layers": 1, "tiny_hidden": 32},
        "teacher": {
            "name_or_path": "tiny", "tiny_layers": 1, "tiny_hidden": 32, "train_steps": 10,
            "batch_size": 8, "top_k": 8,
        },
        "data": {
            "task": "arithmetic", "format": "generated", "num_examples": 96, "eval_examples": 8,
            "max_prompt_tokens": 96, "max_response_tokens": 48, "difficulty": 1,
        },
        "objective": {
            "method": "xkd", "terms": [{"name": "xkd", "params": {"variant": "divergence", "q_form": "logprobs"}}],
        },
        "train": {"batch_size": 8, "max_steps": 8, "checkpoint_every": 4, "eval_every": 4, "lr": 1e-3},
        "tracking": {"enabled": False, "log_every": 1},
        "workflow": {"workdir": str(workdir), "eval_max_new_tokens": 8, "samples": 2, "lca_samples": 2},
    }  # fmt: skip
    for name, values in sections.items():
        cfg[name] = {**cfg[name], **values}
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


# ------------------------------------------------------------------------------------- cache keys


def test_step_keys_follow_the_sections_each_step_reads(tmp_path):
    base = config_from_dict(tiny_config(tmp_path))
    data = StepResult("data", step_key("data", base, []), "", {}, False, 0.0)
    teacher = StepResult("teacher", step_key("teacher", base, [data]), "", {}, False, 0.0)

    def keys(cfg):
        return {
            "data": step_key("data", cfg, []),
            "teacher": step_key("teacher", cfg, [data]),
            "teacher_outputs": step_key("teacher_outputs", cfg, [data, teacher]),
            "distill": step_key("distill", cfg, [data, teacher]),
            "baseline": step_key("baseline", cfg, [data, teacher]),
        }

    before = keys(base)
    assert keys(base) == before  # deterministic
    # a student hyper-parameter: only the trainings re-run, never the data, teacher or its outputs
    lr = keys(with_overrides(base, {"train.lr": 5e-4}))
    assert {k for k in before if lr[k] != before[k]} == {"distill", "baseline"}
    # a loss weight (what a Tune sweep changes): the teacher pass is shared
    weight = keys(with_overrides(base, {"objective.terms": [{"name": "xkd", "weight": 0.5}]}))
    assert {k for k in before if weight[k] != before[k]} == {"distill"}
    # a teacher setting: its outputs and everything trained on them
    topk = keys(with_overrides(base, {"teacher.top_k": 4}))
    assert {k for k in before if topk[k] != before[k]} == {"teacher", "teacher_outputs", "distill"}
    # SeqKD needs teacher generations: a different teacher pass than X-KD's log-probs
    seqkd = keys(with_overrides(base, {"objective.method": "seqkd", "objective.terms": [{"name": "ce"}]}))
    assert seqkd["teacher_outputs"] != before["teacher_outputs"]
    # the data section reaches every step through the data step's key
    assert step_key("data", with_overrides(base, {"data.seed": 1}), []) != before["data"]


def test_format_table_puts_the_headline_metric_first():
    table = format_table(
        {
            "teacher": {"exact_match": 50.0, "distinct_2": 0.5},
            "student": {"exact_match": 10.0, "distinct_2": 0.25},
        },
        "exact_match",
        "arithmetic",
        8,
    )
    lines = table.splitlines()
    assert lines[0] == "| model (arithmetic, 8 held-out) | exact_match | distinct_2 |"
    assert lines[2] == "| teacher | 50.00 | 0.500 |" and lines[3] == "| student | 10.00 | 0.250 |"


# ------------------------------------------------------------------------ kill during distill, resume


def _tree_digest(directory: Path) -> dict[str, tuple[int, str]]:
    """Every file under a finished step directory: mtime (ns) and content hash."""
    return {
        str(p.relative_to(directory)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _wait_for(predicate, timeout: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the workflow exited ({proc.returncode}) before {what}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _logged_steps(metrics: Path) -> list[int]:
    if not metrics.exists():
        return []
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_killed_during_distill_rerun_skips_finished_steps_and_finishes(tmp_path):
    from kdray.models.tiny import save_tiny_checkpoint

    workdir = tmp_path / "run"
    # a saved teacher (its step checks it): training one would add a Ray Train start to a slow test
    teacher = save_tiny_checkpoint(tmp_path / "teacher", hidden_size=32, num_layers=1, seed=1)
    cfg = tiny_config(
        workdir,
        teacher={"name_or_path": str(teacher)},
        train={"max_steps": 24, "checkpoint_every": 4, "eval_every": 8},
        tracking={"log_every": 4},  # each logged step is a Ray Train report (a barrier): keep them few
        workflow={"baseline": False},
    )
    path = write_config(tmp_path / "cfg.yaml", cfg)
    cmd = [PYTHON, str(REPO / "workflows" / "xkd.py"), "--config", str(path)]
    log = (tmp_path / "first.log").open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    steps = workdir / "steps"
    try:
        # wait until the distill step has a checkpoint (step 4 logged) but is not done
        _wait_for(
            lambda: any(s >= 8 for d in steps.glob("distill-*") for s in _logged_steps(d / "student" / "metrics.jsonl")),
            timeout=400, proc=proc, what="the distill step's 8th step",
        )  # fmt: skip
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait()
    finished = {d.name: _tree_digest(d) for d in steps.iterdir() if (d / "_DONE.json").exists()}
    assert {n.split("-")[0] for n in finished} == {"data", "teacher", "teacher_outputs"}
    (distill_dir,) = steps.glob("distill-*")
    assert not (distill_dir / "_DONE.json").exists()
    logged_before = _logged_steps(distill_dir / "student" / "metrics.jsonl")
    assert max(logged_before) < 24

    second = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    for name in ("data", "teacher", "teacher_outputs"):
        assert f"[{name}] finished earlier" in out
    # finished steps untouched: same files, same bytes, same mtimes
    assert {n: _tree_digest(steps / n) for n in finished} == finished
    # the distill step resumed from its checkpoint rather than starting over, and finished
    logged = _logged_steps(distill_dir / "student" / "metrics.jsonl")
    resumed = logged[len(logged_before) :]
    assert resumed and resumed[0] > 1, f"distill restarted from scratch: {resumed[:5]}"
    assert max(logged) == 24
    done = json.loads((distill_dir / "_DONE.json").read_text())
    assert done["final"]["step"] == 24
    (evaluate_dir,) = steps.glob("evaluate-*")
    table = json.loads((evaluate_dir / "_DONE.json").read_text())["table"]
    assert "| teacher |" in table and "| student (xkd) |" in table
    assert "student (xkd)" in out  # the final table is printed


@pytest.mark.slow
def test_sigterm_stops_the_run_with_a_resume_hint_and_its_mlflow_runs_killed(tmp_path):
    """`kill` (or a scheduler's stop) mid-distill: exit 130, one line saying how to resume instead of a
    traceback, and no MLflow run left RUNNING."""
    from mlflow import MlflowClient

    from kdray.models.tiny import save_tiny_checkpoint

    workdir = tmp_path / "run"
    teacher = save_tiny_checkpoint(tmp_path / "teacher", hidden_size=32, num_layers=1, seed=1)
    cfg = tiny_config(
        workdir, teacher={"name_or_path": str(teacher)},
        train={"max_steps": 400, "checkpoint_every": 4, "eval_every": 200},
        tracking={"enabled": True, "log_every": 4}, workflow={"baseline": False},
    )  # fmt: skip
    path = write_config(tmp_path / "cfg.yaml", cfg)
    cmd = [PYTHON, str(REPO / "workflows" / "xkd.py"), "--config", str(path)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        _wait_for(
            lambda: any(_logged_steps(d / "student" / "metrics.jsonl") for d in (workdir / "steps").glob("distill-*")),
            timeout=400, proc=proc, what="the distill step's first logged step",
        )  # fmt: skip
        proc.send_signal(signal.SIGTERM)  # the driver only, as `kill PID` does
        out, err = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, (out + err)[-3000:]
    assert "[kdray] interrupted" in err and "run the same command again to resume" in err
    # no traceback from the driver (Ray's own workers may print theirs as they are torn down)
    assert not any(line.startswith("Traceback") for line in err.splitlines()), err[-3000:]
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and all(r.info.status != "RUNNING" for r in runs), [
        (r.info.run_name, r.info.status) for r in runs
    ]
    assert "KILLED" in {r.info.status for r in runs}


# ------------------------------------------------------------------------------ ray job submit


@pytest.mark.slow
def test_ray_job_submit_runs_the_workflow_into_mlflow(tmp_path, mlflow_server):
    """A head started here, the workflow submitted as a Ray job, tracked into a real MLflow server, and
    everything read back through the MLflow client: nested runs, metric series, artifacts, the model."""
    from mlflow import MlflowClient

    workdir = tmp_path / "run"
    name = f"job-{os.getpid()}"
    cfg = tiny_config(
        workdir,
        workflow={"baseline": False},
        tracking={"enabled": True, "tracking_uri": mlflow_server.uri, "experiment": "kdray-job-test",
                  "registered_model": "kdray-job-student", "log_every": 1, "system_metrics_s": 0.5},
    )  # fmt: skip
    path = write_config(tmp_path / "cfg.yaml", cfg)
    head = RayHead(Path("/tmp") / f"kdray-head-{os.getpid()}")
    try:
        entry = ["python", "workflows/xkd.py", "--config", str(path), "--run-name", name]
        proc = submit(head, REPO, entry, timeout=600)
    finally:
        head.stop()
    logs = proc.stdout + proc.stderr
    assert proc.returncode == 0, logs[-4000:]
    assert "succeeded" in logs
    for step in ("data", "teacher", "teacher_outputs", "distill", "evaluate", "register"):
        assert f"[{step}] running" in logs and f"[{step}] done" in logs, step
    assert "[student (xkd)] step 8/8" in logs  # training progress reaches the job's log

    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("kdray-job-test")
    (parent,) = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}'")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["kdray.method"] == "xkd" and parent.data.tags["kdray.teacher"] == "tiny"
    assert parent.data.params["train.max_steps"] == "8"
    children = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_step = {r.data.tags["kdray.step"]: r for r in children}
    assert set(by_step) == {"data", "teacher", "teacher_outputs", "distill", "evaluate", "register"}
    distill = by_step["distill"].info.run_id
    loss = client.get_metric_history(distill, "loss")
    assert sorted(m.step for m in loss) == list(range(1, 9))  # every step, once
    assert client.get_metric_history(distill, "xkd/td_nll")  # every loss term, X-KD parts included
    for key in ("lr", "tokens_per_s", "eval_loss"):
        assert client.get_metric_history(distill, key), key
    # MLflow's monitor of the training node, sampled into the distill run
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(
        by_step["distill"].data.metrics
    )
    artifacts = {a.path for a in client.list_artifacts(distill)}
    assert "learning_curves.png" in artifacts
    evaluation = {a.path for a in client.list_artifacts(by_step["evaluate"].info.run_id)}
    assert {"table.md", "samples.jsonl", "reward_heatmap.png"} <= evaluation
    assert "config.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert by_step["teacher_outputs"].data.tags["kdray.signal_cache_key"]
    (version,) = client.search_model_versions("name = 'kdray-job-student'")
    assert version.run_id == by_step["register"].info.run_id
