"""Ray Tune sweeps: ASHA, a failing trial, one teacher pass for all trials, MLflow, resume, best config.

Two sweeps of tiny models on the generated arithmetic task, each on a real local Ray: one in this
process (8 trials, one with an injected fault, into a real MLflow server; its best config is then run
by the workflow), one as `workflows/sweep.py` in a subprocess that is killed and run again.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ray = pytest.importorskip("ray")

from servers import subprocess_env  # noqa: E402

from kdray.config import ConfigError, config_from_dict, load_config, with_overrides  # noqa: E402
from kdray.models.tiny import save_tiny_checkpoint  # noqa: E402
from kdray.teacher.teacher import LEDGER_ENV, read_ledger  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TRAIN_ROWS = 96
STEPS, EVAL_EVERY = 12, 3  # four evaluations: ASHA's rungs at 1 and 2 (reduction factor 2)


def sweep_config(workdir: Path, teacher: Path, **tune) -> dict:
    cfg = {
        "model": {"name_or_path": "tiny", "init": "scratch", "tiny_layers": 1, "tiny_hidden": 32},
        "teacher": {"name_or_path": str(teacher), "top_k": 8, "batch_size": 8, "num_cpus": 1},
        "data": {
            "task": "arithmetic", "format": "generated", "num_examples": TRAIN_ROWS, "eval_examples": 16,
            "max_prompt_tokens": 96, "max_response_tokens": 48, "difficulty": 1,
        },
        "objective": {
            "method": "xkd", "terms": [{"name": "xkd", "params": {"variant": "divergence", "q_form": "logprobs"}}],
        },
        "train": {"batch_size": 8, "max_steps": STEPS, "eval_every": EVAL_EVERY, "lr": 1e-3},
        "tracking": {"enabled": False, "log_every": 1},
        "workflow": {"workdir": str(workdir)},
        "tune": {
            "num_samples": 8, "max_concurrent": 2, "grace_period": 1, "reduction_factor": 2,
            "search_space": {
                "train.lr": {"type": "loguniform", "low": 1e-4, "high": 3e-2},
                "objective.terms.0.params.lambda_td": {"type": "loguniform", "low": 0.01, "high": 10.0},
            },
            **tune,
        },
    }  # fmt: skip
    return cfg


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """A tiny random teacher saved as an HF checkpoint: the sweep needs its outputs, not its skill."""
    return save_tiny_checkpoint(
        tmp_path_factory.mktemp("teacher") / "t", hidden_size=32, num_layers=1, seed=1
    )


# ---------------------------------------------------------------------------------- up-front checks


def test_a_dimension_that_changes_the_teacher_pass_is_refused(tmp_path, teacher):
    from kdray.tune.space import check_shared_teacher_pass

    base = sweep_config(tmp_path, teacher)
    assert check_shared_teacher_pass(config_from_dict(base)) == []  # student-side dimensions only: fine
    # the loss temperature moves the teacher's serving temperature: listed values, one pass each
    temp = "objective.terms.0.params.temperature"
    base["tune"]["search_space"][temp] = {"type": "choice", "values": [1.0, 2.0]}
    assert check_shared_teacher_pass(config_from_dict(base)) == [temp]
    base["tune"]["search_space"][temp] = {"type": "uniform", "low": 1.0, "high": 2.0}
    with pytest.raises(ConfigError, match=r"list the values"):
        check_shared_teacher_pass(config_from_dict(base))
    del base["tune"]["search_space"][temp]
    base["tune"]["search_space"]["teacher.top_k"] = {"type": "choice", "values": [8, 16]}
    with pytest.raises(
        ConfigError, match=r"tune.search_space\['teacher.top_k'\] = 16 changes the teacher step"
    ):
        check_shared_teacher_pass(config_from_dict(base))
    del base["tune"]["search_space"]["teacher.top_k"]
    base["tune"]["search_space"]["train.batch_size"] = {"type": "choice", "values": [8, 16]}
    with pytest.raises(ConfigError, match=r"= 16 changes the teacher_outputs step"):
        check_shared_teacher_pass(config_from_dict(base))
    # GKD's λ: a trial with every batch on-policy reads no teacher output, the others share the pass
    base["objective"] = {"method": "gkd", "terms": [{"name": "jsd"}], "on_policy_fraction": 0.5}
    base["tune"]["search_space"] = {}
    base["tune"]["search_space"]["objective.on_policy_fraction"] = {
        "type": "choice",
        "values": [0.0, 0.5, 1.0],
    }
    check_shared_teacher_pass(config_from_dict(base))
    # a loss parameter the term does not take is caught before any trial starts
    base["tune"]["search_space"]["objective.terms.0.params.lambda_td"] = {"type": "choice", "values": [0.1]}
    with pytest.raises(ConfigError, match=r"lambda_td.*is invalid.*has no parameter"):
        check_shared_teacher_pass(config_from_dict(base))


def test_local_dataset_rebatches_across_chunks_in_order():
    """A trial's in-process data: exact batches across chunk borders, ragged rows as object columns."""
    import numpy as np

    from kdray.data.local import LocalDataset

    def chunk(first: int, n: int, width: int) -> dict:
        ids = np.arange(first, first + n)
        return {"id": ids, "input_ids": np.stack([np.full(width, i) for i in ids])}

    ds = LocalDataset(lambda: [chunk(0, 5, 3), chunk(5, 2, 4), chunk(7, 6, 3)])
    batches = list(ds.iter_batches(batch_size=4))
    assert [b["id"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12]]
    assert batches[0]["input_ids"].shape == (4, 3)  # one width: a regular array
    assert batches[1]["input_ids"].dtype == object  # widths 3 and 4: rows kept as they are
    assert [len(r) for r in batches[1]["input_ids"]] == [3, 4, 4, 3]
    assert [b["id"].tolist() for b in ds.iter_batches(batch_size=4, drop_last=True)][-1] == [8, 9, 10, 11]
    assert sum(len(b["id"]) for b in ds.iter_batches(batch_size=4)) == 13  # read again: a new epoch


def test_search_space_maps_to_tune_domains():
    from ray import tune

    from kdray.config import SearchDim
    from kdray.tune.space import param_space

    space = param_space(
        {
            "train.lr": SearchDim("loguniform", low=1e-4, high=1e-2),
            "objective.terms.0.weight": SearchDim("uniform", low=0.0, high=1.0),
            "objective.terms.0.params.q_form": SearchDim("choice", values=("logits", "logprobs")),
            "train.seed": SearchDim("grid", values=(0, 1)),
            "train.batch_size": SearchDim("randint", low=4, high=9),
        }
    )
    assert isinstance(space["train.lr"], tune.search.sample.Float)
    assert space["train.lr"].lower == 1e-4 and space["train.lr"].upper == 1e-2
    assert isinstance(space["train.lr"].sampler, tune.search.sample.LogUniform)
    assert space["objective.terms.0.params.q_form"].categories == ["logits", "logprobs"]
    assert space["train.seed"] == {"grid_search": [0, 1]}
    assert (space["train.batch_size"].lower, space["train.batch_size"].upper) == (4, 9)


def test_best_config_yaml_loads_and_holds_the_trial_values(tmp_path, teacher):
    from kdray.tune.report import write_best_config

    cfg = config_from_dict(sweep_config(tmp_path, teacher))
    best = {"trial_id": "t_00003", "metric": 1.25, "step": STEPS,
            "config": {"train.lr": 0.004, "objective.terms.0.params.lambda_td": 0.3}}  # fmt: skip
    path = write_best_config(cfg, best, tmp_path / "best.yaml")
    loaded = load_config(path)
    assert loaded.train.lr == 0.004 and loaded.objective.terms[0].params["lambda_td"] == 0.3
    assert loaded.train.checkpoint_every == EVAL_EVERY  # the trial's cadence
    assert dict(loaded.tune.search_space) == {}
    assert loaded.model == cfg.model and loaded.data == cfg.data


def test_resuming_a_sweep_under_a_changed_config_is_refused(tmp_path, teacher):
    from kdray.tune.runner import SWEEP_STATE, _sweep_fingerprint, sweep_dir

    cfg = config_from_dict(sweep_config(tmp_path, teacher))
    directory = sweep_dir(cfg)
    directory.mkdir(parents=True)
    (directory / SWEEP_STATE).write_text(json.dumps({"config": _sweep_fingerprint(cfg)}))
    assert _sweep_fingerprint(with_overrides(cfg, {"tracking.enabled": True})) == _sweep_fingerprint(cfg)
    from kdray.tune import run_sweep

    changed = with_overrides(cfg, {"tune.num_samples": 4})
    with pytest.raises(ConfigError, match="started with a different config"):
        run_sweep(changed)


# ---------------------------------------------------------------- one sweep in this process, 8 trials


def faulty_trial(config, **kwargs):
    """`run_trial`, except that the trial with index 3 raises before it trains (an injected fault)."""
    from ray import tune

    from kdray.tune.trial import run_trial

    if tune.get_context().get_trial_id().endswith("_00003"):
        raise RuntimeError("injected fault in trial 3")
    return run_trial(config, **kwargs)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, teacher, mlflow_server):
    """8 trials with ASHA into a real MLflow server, a teacher ledger counting every forward pass."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this module
    root = tmp_path_factory.mktemp("sweep")
    ledger = root / "ledger.jsonl"
    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
        runtime_env={"env_vars": {LEDGER_ENV: str(ledger)}},
    )  # fmt: skip
    ray.data.DataContext.get_current().enable_progress_bars = False
    raw = sweep_config(root / "run", teacher)
    # a top-k signal cannot be re-tempered: each temperature value costs its own teacher pass
    raw["tune"]["search_space"]["objective.terms.0.params.temperature"] = {
        "type": "choice",
        "values": [1.0, 2.0],
    }
    raw["tracking"] = {
        "enabled": True,
        "tracking_uri": mlflow_server.uri,
        "experiment": "sweep-test",
        "log_every": 1,
    }
    cfg = config_from_dict(raw)
    from kdray.tune import run_sweep

    result = run_sweep(cfg, run_name="sweep-under-test", trainable=faulty_trial, verbose=0)
    yield cfg, result, ledger, mlflow_server
    ray.shutdown()


@pytest.mark.slow
def test_sweep_runs_eight_trials_asha_stops_some_and_a_failing_trial_is_reported(sweep):
    cfg, result, _, _ = sweep
    assert len(result.trials) == 8
    by_status: dict[str, list] = {}
    for t in result.trials:
        by_status.setdefault(t["status"], []).append(t)
    (failed,) = by_status["failed"]
    assert failed["trial_id"].endswith("_00003") and "injected fault" in failed["error"]
    # ASHA cut some trials at a rung; the rest ran all four evaluations
    assert by_status.get("stopped early"), result.table(cfg.tune.metric)
    assert all(t["iterations"] < STEPS // EVAL_EVERY for t in by_status["stopped early"])
    assert all(t["iterations"] == STEPS // EVAL_EVERY for t in by_status["completed"])
    assert all(math.isfinite(t["metric"]) for t in result.trials if t["status"] != "failed")
    # the best is the completed trial with the lowest held-out loss
    completed = by_status["completed"]
    assert result.best["trial_id"] == min(completed, key=lambda t: t["metric"])["trial_id"]
    assert (result.directory / "search.png").stat().st_size > 10_000


@pytest.mark.slow
def test_the_teacher_scores_the_data_once_per_temperature_for_the_whole_sweep(sweep):
    _, result, ledger, _ = sweep
    passes = read_ledger(ledger)
    assert passes, "no teacher forward pass was recorded"
    assert {p["op"] for p in passes} == {"logprobs"}
    # one pass over the training split per swept temperature (1.0 and 2.0), not one per trial
    assert sum(p["rows"] for p in passes) == 2 * TRAIN_ROWS
    temps = {t["config"]["objective.terms.0.params.temperature"] for t in result.trials if t.get("config")}
    assert temps <= {1.0, 2.0}
    _, _, outputs = result.teacher_steps
    assert outputs.outputs["rows"] == TRAIN_ROWS
    trial_pids = {
        json.loads(line)["pid"]
        for t in result.trials
        if t["path"] and (Path(t["path"]) / "kdray_trial.jsonl").exists()
        for line in (Path(t["path"]) / "kdray_trial.jsonl").read_text().splitlines()
    }
    assert not trial_pids & {p["pid"] for p in passes}  # no trial ran a teacher


@pytest.mark.slow
def test_sweep_is_a_parent_run_with_a_nested_run_per_trial(sweep):
    from mlflow import MlflowClient

    _, result, _, server = sweep
    client = MlflowClient(server.uri)
    parent = client.get_run(result.parent_run_id)
    assert (
        parent.info.status == "FINISHED" and parent.data.tags["kdray.best_trial"] == result.best["trial_id"]
    )
    artifacts = {a.path for a in client.list_artifacts(result.parent_run_id)}
    assert {"search.png", "best_config.yaml", "trials.md"} <= artifacts
    experiment = client.get_experiment_by_name("sweep-test").experiment_id
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'")
    trials = {r.data.tags["kdray.trial_id"]: r for r in children if "kdray.trial_id" in r.data.tags}
    steps = {r.data.tags["kdray.step"] for r in children if "kdray.step" in r.data.tags}
    assert steps == {"data", "teacher", "teacher_outputs"}
    assert set(trials) == {t["trial_id"] for t in result.trials}
    for t in result.trials:
        run = trials[t["trial_id"]]
        assert float(run.data.params["train.lr"]) == pytest.approx(t["config"]["train.lr"])
        expected = {"completed": "FINISHED", "stopped early": "KILLED", "failed": "FAILED"}[t["status"]]
        assert run.info.status == expected, t
        if t["status"] == "failed":
            continue
        curve = client.get_metric_history(run.info.run_id, "loss")
        assert sorted(m.step for m in curve) == list(range(1, t["iterations"] * EVAL_EVERY + 1))
        evals = sorted(client.get_metric_history(run.info.run_id, "eval_loss"), key=lambda m: m.step)
        assert evals[-1].value == pytest.approx(t["metric"])
        if t["status"] == "stopped early":
            assert run.data.tags.get("kdray.early_stopped") == "true"


@pytest.mark.slow
def test_best_config_reproduces_the_best_trial_under_the_workflow(sweep):
    from kdray.workflow import run_workflow

    _, result, _, _ = sweep
    best = load_config(result.best_config_path)
    cfg = with_overrides(
        best,
        {
            "workflow.steps": ["data", "teacher", "teacher_outputs", "distill"],
            "workflow.baseline": False,
            "tracking.enabled": False,
        },
    )
    run = run_workflow(cfg)
    by_step = {s.step: s for s in run.steps}
    assert all(by_step[s].cached for s in ("data", "teacher", "teacher_outputs"))  # the sweep's own pass
    final = by_step["distill"].outputs["final"]
    assert final["step"] == STEPS
    assert final["eval_loss"] == pytest.approx(result.best["metric"], rel=1e-5)


# --------------------------------------------------------------- the sweep driver killed, then resumed


def _trial_events(directory: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for path in directory.glob("trials/*/kdray_trial.jsonl"):
        out[path.parent.name] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_finished_trials(tmp_path, teacher):
    raw = sweep_config(tmp_path / "run", teacher, scheduler="fifo", num_samples=4, max_concurrent=1)
    # trials of about 6 s each (a reused actor runs 12 tiny steps in a quarter second): the kill must land while
    # the third trial runs
    raw["train"].update(max_steps=300, eval_every=75)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    ledger = tmp_path / "ledger.jsonl"
    env = {**subprocess_env(), LEDGER_ENV: str(ledger)}
    cmd = [sys.executable, str(REPO / "workflows" / "sweep.py"), "--config", str(path)]
    directory = tmp_path / "run" / "sweeps" / "sweep"

    def ended() -> set[str]:
        return {n for n, ev in _trial_events(directory).items() if any(e["event"] == "end" for e in ev)}

    with (tmp_path / "first.log").open("w") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = time.time() + 400
            while len(ended()) < 2:
                assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                assert time.time() < deadline, "two trials did not finish in time"
                time.sleep(0.5)
            time.sleep(2.5)  # Tune saves its experiment state every 2 s (TUNE_GLOBAL_CHECKPOINT_S)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
            proc.wait()
    before = _trial_events(directory)
    finished_before = ended()
    assert 2 <= len(finished_before) < 4, "the kill came too late to test a resume"

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert "resuming" in out
    after = _trial_events(directory)
    assert len(after) == 4 and ended() == set(after)
    for name in finished_before:
        # a trial that ended in its worker just before the kill, but before Tune's next save of its
        # experiment state, is restored by Tune: it must resume at its last step and train no further
        final = before[name][-1]["step"]
        again = [(e["event"], e.get("step")) for e in after[name][len(before[name]) :]]
        assert after[name][: len(before[name])] == before[name], name
        assert again in ([], [("start", None), ("resumed_at", final), ("end", final)]), (
            f"finished trial {name} was run again: {again}"
        )
    rows = [json.loads(line) for line in (directory / "trials.jsonl").read_text().splitlines()]
    assert sorted(r["status"] for r in rows) == ["completed"] * 4
    # one teacher pass for the whole sweep, across both drivers
    assert sum(p["rows"] for p in read_ledger(ledger)) == TRAIN_ROWS
    assert load_config(directory / "best_config.yaml").train.lr in {r["config"]["train.lr"] for r in rows}


@pytest.mark.slow
def test_on_policy_trials_share_one_teacher_pool(sweep, tmp_path, teacher):
    """GKD with every batch sampled from the student: each trial scores its samples through the one
    TeacherPool the sweep started (no teacher actor per trial, no pass over the data)."""
    from kdray.tune import run_sweep

    _, _, ledger, _ = sweep  # its Ray records every teacher forward pass in this ledger
    seen = len(read_ledger(ledger))
    raw = sweep_config(tmp_path / "run", teacher, scheduler="fifo", num_samples=1)
    raw["objective"] = {
        "method": "gkd", "terms": [{"name": "jsd", "params": {"beta": 0.5}}], "on_policy_fraction": 1.0,
        "max_new_tokens": 8,
    }  # fmt: skip
    raw["train"].update(max_steps=4, eval_every=2)
    raw["tune"]["search_space"] = {"objective.terms.0.params.beta": {"type": "grid", "values": [0.1, 0.9]}}
    result = run_sweep(config_from_dict(raw), verbose=0)
    assert [t["status"] for t in result.trials] == ["completed", "completed"]
    assert result.teacher_steps[2].outputs["signal_cache"] is None  # nothing to precompute
    passes = read_ledger(ledger)[seen:]
    assert len({p["pid"] for p in passes}) == 1, passes  # one pool replica served both trials
    assert sum(p["rows"] for p in passes) >= 2 * 4 * 8  # every sampled batch of both trials
