"""Tracking against real MLflow: a sqlite store for the fast tests, a real `mlflow server` (killed and
restarted mid-run) for nesting over HTTP, buffering, resending a dead process's spool and the UI."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import struct
import tempfile
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from servers import free_port

from kdray.plots import learning_curves, reward_heatmap
from kdray.registry import log_student
from kdray.runs import flatten, git_commit, resolve_tracking_uri
from kdray.tracking import Tracker, TrackingUnavailableError

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
UI_WAIT_S = 90  # per page state; the UI answers in seconds, more when the CPUs are shared


def _history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


def _assert_series(uri: str, run_id: str, key: str, expected: list[tuple[int, float]]) -> None:
    """Every step exactly once, values equal up to float32 rounding of the inputs."""
    got = _history(uri, run_id, key)
    assert [step for step, _ in got] == [step for step, _ in expected], f"{key}: steps differ"
    assert [value for _, value in got] == pytest.approx([value for _, value in expected], rel=1e-6)


def _experiment(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    return experiment.experiment_id if experiment else client.create_experiment(name)


def _artifact_paths(uri: str, run_id: str, path: str | None = None) -> set[str]:
    client, out, todo = MlflowClient(uri), set(), [path]
    while todo:
        for info in client.list_artifacts(run_id, todo.pop()):
            (todo.append(info.path) if info.is_dir else out.add(info.path))
    return out


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


# ---------------------------------------------------------------------------------------------------
# fast tests: a sqlite store shared by the module (each test has its own experiment or run)
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _tracker(uri: str, spool: Path, **kwargs) -> Tracker:
    return Tracker(uri, "kdray-test", spool_dir=spool, flush_interval_s=0.05, **kwargs)


def test_params_are_flattened_truncated_and_batched(sqlite_uri, tmp_path):
    params = {
        "model": {"name": "tiny", "layers": 2, "lora": {"r": 8}},
        "prompt": "x" * 7000,
        "grid": {f"k{i}": i for i in range(250)},  # > 100 params: several log_batch calls
        "empty": {},
    }
    with _tracker(sqlite_uri, tmp_path / "spool", run_name="params") as tracker:
        tracker.log_params(params)
    logged = MlflowClient(sqlite_uri).get_run(tracker.run_id).data.params
    assert logged["model.name"] == "tiny"
    assert logged["model.layers"] == "2"
    assert logged["model.lora.r"] == "8"
    assert logged["prompt"] == "x" * 6000
    assert logged["empty"] == "{}"
    assert {k for k in logged if k.startswith("grid.")} == {f"grid.k{i}" for i in range(250)}
    assert logged["grid.k249"] == "249"


def test_flatten():
    assert flatten({"a": {"b": {"c": 1}, "d": 2}, "e": [1, 2]}) == {"a.b.c": 1, "a.d": 2, "e": [1, 2]}
    assert flatten({"x": 1}, prefix="cfg") == {"cfg.x": 1}


def test_child_run_is_nested_and_a_failure_marks_it_failed(sqlite_uri, tmp_path):
    client = MlflowClient(sqlite_uri)
    with _tracker(sqlite_uri, tmp_path / "spool", run_name="workflow", tags={"method": "xkd"}) as parent:
        nested = {"parent_run_id": parent.run_id}
        with _tracker(
            sqlite_uri, tmp_path / "spool-distill", run_name="distill", tags={"step": "distill"}, **nested
        ) as child:
            child.log_metrics({"loss": 1.0}, step=0)
        with (
            pytest.raises(RuntimeError),
            _tracker(sqlite_uri, tmp_path / "spool-eval", run_name="evaluate", **nested) as failing,
        ):
            raise RuntimeError("boom")
    run = client.get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert run.data.tags["step"] == "distill"
    assert run.info.run_name == "distill"
    assert run.info.experiment_id == parent.experiment_id
    assert run.info.status == "FINISHED"
    assert client.get_run(failing.run_id).info.status == "FAILED"
    parent_run = client.get_run(parent.run_id)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.data.tags["method"] == "xkd"
    assert parent_run.data.tags["kdray.version"]
    assert not list(tmp_path.glob("spool*")), "a fully sent spool is deleted on close"


def test_attached_tracker_logs_into_the_run_and_leaves_ending_it_to_the_owner(sqlite_uri, tmp_path):
    client = MlflowClient(sqlite_uri)
    with _tracker(sqlite_uri, tmp_path / "owner", run_name="step") as owner:
        worker = _tracker(sqlite_uri, tmp_path / "worker", run_id=owner.run_id)  # Ray Train rank 0
        worker.log_metrics({"loss": 0.5}, step=1)
        worker.close(status=None)
        assert client.get_run(owner.run_id).info.status == "RUNNING"
        assert worker.experiment_id == owner.experiment_id
    assert _history(sqlite_uri, owner.run_id, "loss") == [(1, 0.5)]
    assert client.get_run(owner.run_id).info.status == "FINISHED"


def test_metric_series_read_back_exactly_and_non_finite_skipped(sqlite_uri, tmp_path):
    import numpy as np
    import torch

    logged: dict[str, list[tuple[int, float]]] = {"loss": [], "loss/xkd": [], "lr": []}
    with _tracker(sqlite_uri, tmp_path / "spool", run_name="metrics") as tracker:
        for step in range(40):
            row = {
                "loss": 2.0 / (step + 1),
                "loss/xkd": np.float32(0.5 + step / 100),
                "lr": torch.tensor(1e-3 * 0.9**step),
                "nan": float("nan"),
                "inf": float("inf"),
                "text": "n/a",
                "none": None,
                "vector": torch.ones(3),
            }
            tracker.log_metrics(row, step=step)
            for key in logged:
                logged[key].append((step, float(row[key])))
    for key, expected in logged.items():
        _assert_series(sqlite_uri, tracker.run_id, key, expected)
    metrics = MlflowClient(sqlite_uri).get_run(tracker.run_id).data.metrics
    assert set(metrics) == {"loss", "loss/xkd", "lr"}


def test_artifacts_text_figure_and_file(sqlite_uri, tmp_path):
    source = tmp_path / "eval.jsonl"
    source.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    history = [{"step": s, "loss": 1.0 / (s + 1)} for s in range(10)]
    client = MlflowClient(sqlite_uri)
    with _tracker(sqlite_uri, tmp_path / "spool", run_name="artifacts") as tracker:
        tracker.log_text(json.dumps({"objective": {"method": "xkd"}}), "config/resolved.json")
        tracker.log_text("# notes\n", "notes.md")
        tracker.log_figure(learning_curves(history), "plots/learning_curves.png")
        tracker.log_artifact(source, "eval")
        source.unlink()  # the spool holds its own copy
        tracker.log_artifact(tmp_path / "missing.txt")  # warned about, never raised
    assert _artifact_paths(sqlite_uri, tracker.run_id) == {
        "config/resolved.json",
        "notes.md",
        "plots/learning_curves.png",
        "eval/eval.jsonl",
    }
    local = Path(client.download_artifacts(tracker.run_id, "config/resolved.json", str(tmp_path / "dl")))
    assert json.loads(local.read_text()) == {"objective": {"method": "xkd"}}
    png = Path(client.download_artifacts(tracker.run_id, "plots/learning_curves.png", str(tmp_path / "dl")))
    width, height = _png_size(png)
    assert width > 300 and height > 100


def test_non_zero_rank_and_disabled_tracker_do_nothing(tmp_path):
    db = tmp_path / "never.db"
    for tracker in (
        Tracker(f"sqlite:///{db}", "e", rank=1, spool_dir=tmp_path / "spool"),
        Tracker(f"sqlite:///{db}", "e", enabled=False, spool_dir=tmp_path / "spool"),
    ):
        with tracker:
            assert tracker.run_id is None and tracker.experiment_id is None
            tracker.log_params({"a": 1})
            tracker.set_tags({"t": 1})
            tracker.log_metrics({"loss": 1.0}, step=0)
            tracker.log_text("x", "x.txt")
            assert log_student(tracker, tmp_path, registered_model="m") is None
            assert tracker.flush(timeout_s=0)
    assert not db.exists()
    assert not (tmp_path / "spool").exists()


def test_resolve_tracking_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert (
        resolve_tracking_uri(None, tmp_path / "run") == f"sqlite:///{(tmp_path / 'run').resolve()}/mlflow.db"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://127.0.0.1:5000"
    assert resolve_tracking_uri("sqlite:////x/mlflow.db", tmp_path) == "sqlite:////x/mlflow.db"


def test_git_commit(tmp_path):
    commit = git_commit(Path(__file__).parent)
    if commit is None:
        pytest.skip("the tests do not run from a git checkout")
    assert re.fullmatch(r"[0-9a-f]{40}", commit)
    assert git_commit(tmp_path) is None


def test_unreachable_server_fails_run_creation_with_a_clear_error(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TrackingUnavailableError, match=r"kdray doctor.*tracking\.enabled: false") as err:
        Tracker(uri, "e", spool_dir=tmp_path / "spool", create_timeout_s=1.0)
    assert uri in str(err.value)
    assert time.monotonic() - start < 30


def test_spool_of_another_run_is_refused(sqlite_uri, tmp_path):
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "spool.run").write_text("0123abcd")
    (spool / "000000000003.json").write_text('{"op":"tags","tags":{"a":"b"}}')
    with pytest.raises(ValueError, match="unsent calls of run 0123abcd"):
        _tracker(sqlite_uri, spool, run_name="wrong-spool")


def test_spool_left_by_a_crash_mid_write_is_resent_and_a_corrupt_record_dropped(sqlite_uri, tmp_path, caplog):
    client = MlflowClient(sqlite_uri)
    run_id = client.create_run(_experiment(client, "kdray-test"), run_name="torn").info.run_id
    spool = tmp_path / "spool"
    # a process that never reached its server, then died while writing a record
    dead = Tracker(f"http://127.0.0.1:{free_port()}", "kdray-test", run_id=run_id, spool_dir=spool)
    for step in range(10):
        dead.log_metrics({"loss": float(step)}, step=step)
    dead.log_metrics({"loss": 10.0}, step=10)
    dead.close(timeout_s=0.2)
    records = sorted(spool.glob("*.json"))
    assert len(records) == 12, "ten metrics records, the corrupt one, and the terminate record"
    records[-2].write_bytes(b'{"op":"metrics","step":10,"ts":1,"metr')  # the disk lost its end
    (spool / "000000000099.tmp").write_bytes(b'{"op":"metrics","st')  # a write that never returned

    with (
        caplog.at_level(logging.WARNING, logger="kdray.tracking"),
        _tracker(sqlite_uri, spool, run_id=run_id) as resumed,
    ):
        resumed.log_metrics({"loss": 11.0}, step=11)
    assert "dropped a unreadable record" in caplog.text
    assert _history(sqlite_uri, run_id, "loss") == [(s, float(s)) for s in (*range(10), 11)]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_registered_student_answers_as_the_evaluate_step_in_a_fresh_process(
    sqlite_uri, tmp_path, monkeypatch
):
    import subprocess
    import sys

    import mlflow
    import torch

    from kdray.eval.evaluate import greedy_generations
    from kdray.models.build import export_student
    from kdray.models.tiny import tiny_causal_lm
    from kdray.models.tokenizer import char_tokenizer

    tokenizer = char_tokenizer()
    model = tiny_causal_lm(len(tokenizer), hidden_size=32, num_heads=2, seed=1)
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, attr, getattr(tokenizer, attr))
    export = export_student(model, tokenizer, tmp_path / "student")
    torch.save({"weight": torch.zeros(2, 32)}, export / "reward_head.pt")  # exports may carry the head

    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # artifacts go beside the store, not into ./mlruns of the process
    with _tracker(sqlite_uri, tmp_path / "spool", run_name="register") as tracker:
        version = log_student(tracker, export, registered_model="kdray-tiny-student", max_new_tokens=8)
        run_id = tracker.run_id
    assert version == "1"
    assert not (elsewhere / "mlruns").exists()
    store = Path(sqlite_uri[len("sqlite:///") :]).parent
    assert mlflow.MlflowClient(sqlite_uri).get_run(run_id).info.artifact_uri.startswith(store.as_uri())

    prompts = ["1+1=", "Tom has 3 apples.", "ab"]
    expected = greedy_generations(export, prompts, max_new_tokens=8)  # what the evaluate step prints
    script = (
        "import json, sys, mlflow\n"
        "model = mlflow.pyfunc.load_model('models:/kdray-tiny-student/1')\n"
        "print(json.dumps(model.predict(json.loads(sys.argv[1]))))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": sqlite_uri}  # models:/ URIs resolve through the global URI
    out = subprocess.run(
        [sys.executable, "-c", script, json.dumps(prompts)], env=env, cwd=elsewhere,
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected
    import pandas as pd

    monkeypatch.setenv("MLFLOW_TRACKING_URI", sqlite_uri)
    loaded = mlflow.pyfunc.load_model("models:/kdray-tiny-student/1")
    assert loaded.predict(pd.DataFrame({"prompt": prompts})) == expected  # the serving format
    # models-from-code: the model is kdray/serving/student.py, run at load time, not a pickled object
    flavor = mlflow.models.get_model_info("models:/kdray-tiny-student/1").flavors["python_function"]
    assert flavor.get("model_code_path", "").endswith("student.py") and "python_model" not in flavor


def test_keys_mlflow_would_reject_are_sanitised_not_dropped(sqlite_uri, tmp_path):
    import mlflow

    from kdray.runs import mlflow_key

    assert mlflow_key("output.scores.student (xkd).exact_match") == "output.scores.student xkd.exact_match"
    assert mlflow_key("a:b/../c//d") == "a_b/_/c/_/d" and mlflow_key("/x") == "_/x"
    with _tracker(sqlite_uri, tmp_path / "spool", run_name="keys") as tracker:
        tracker.log_params({"output": {"scores": {"student (xkd)": {"exact_match": 12.5}}}, "a:b": 1})
        tracker.log_metrics({"student (SFT only)/exact_match": 3.0}, step=0)
        run_id = tracker.run_id
    data = mlflow.MlflowClient(sqlite_uri).get_run(run_id).data
    assert data.params["output.scores.student xkd.exact_match"] == "12.5" and data.params["a_b"] == "1"
    assert data.metrics["student SFT only/exact_match"] == 3.0


def test_a_record_mlflow_refuses_is_dropped_alone_and_the_rest_of_its_batch_arrives(
    sqlite_uri, tmp_path, caplog
):
    with _tracker(sqlite_uri, tmp_path / "spool", run_name="refused") as tracker:
        tracker.log_params({"seed": 1})
        assert tracker.flush(timeout_s=30)
        tracker._wake.clear()  # the next lines go out in one pass of the sender
        tracker.log_metrics({"loss": 1.0}, step=0)
        tracker.log_params({"seed": 2})  # a param cannot change: MLflow answers 400
        # a metric name MLflow refuses, written past the key sanitising: its whole log_batch gets a 400
        tracker._append("metrics", {"bad\x00name": 2.0}, step=1, ts=1)
        tracker.log_metrics({"loss": 0.5}, step=1)
        with caplog.at_level(logging.WARNING, logger="kdray.tracking"):
            assert tracker.flush(timeout_s=30), "a refused record must not block the spool"
    assert "dropped a params record" in caplog.text and "dropped a metrics record" in caplog.text
    assert _history(sqlite_uri, tracker.run_id, "loss") == [(0, 1.0), (1, 0.5)]
    assert MlflowClient(sqlite_uri).get_run(tracker.run_id).data.params == {"seed": "1"}


def test_a_stopped_workflow_closes_the_nested_runs_its_steps_left_running(sqlite_uri):
    import mlflow

    from kdray.runs import close_child_runs

    client = mlflow.MlflowClient(sqlite_uri)
    experiment = client.create_experiment("stopped-workflow")
    parent = client.create_run(experiment)
    running = client.create_run(experiment, tags={"mlflow.parentRunId": parent.info.run_id})
    done = client.create_run(experiment, tags={"mlflow.parentRunId": parent.info.run_id})
    client.set_terminated(done.info.run_id, status="FINISHED")
    unrelated = client.create_run(experiment)
    assert close_child_runs(sqlite_uri, parent.info.run_id) == [running.info.run_id]
    status = {n: client.get_run(r.info.run_id).info.status
              for n, r in (("running", running), ("done", done), ("unrelated", unrelated), ("parent", parent))}  # fmt: skip
    assert status == {"running": "KILLED", "done": "FINISHED", "unrelated": "RUNNING", "parent": "RUNNING"}


def test_runs_left_running_by_a_dead_process_are_marked_killed(sqlite_uri):
    import socket
    import subprocess
    import sys

    import mlflow

    from kdray.runs import close_stale_runs

    client = mlflow.MlflowClient(sqlite_uri)
    experiment = client.create_experiment("stale-runs")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    host = socket.gethostname()
    killed = client.create_run(experiment, tags={"kdray.host": host, "kdray.pid": dead.stdout.strip()})
    alive = client.create_run(experiment, tags={"kdray.host": host, "kdray.pid": str(os.getpid())})
    other = client.create_run(experiment, tags={"kdray.host": "elsewhere", "kdray.pid": dead.stdout.strip()})
    assert close_stale_runs(sqlite_uri, "stale-runs") == [killed.info.run_id]
    status = {r: client.get_run(r.info.run_id).info.status for r in (killed, alive, other)}
    assert list(status.values()) == ["KILLED", "RUNNING", "RUNNING"]


def test_parent_run_metrics_come_from_the_evaluation():
    from kdray.workflow import summary_metrics

    evaluation = {
        "scores": {
            "teacher": {"exact_match": 70.0},
            "student (xkd)": {"exact_match": 61.5, "distinct_2": 0.2},
        },
        "lca": {"student": {"lca_auroc": 0.7, "prompts": [1, 2]}},
    }
    assert summary_metrics(evaluation) == {
        "teacher/exact_match": 70.0, "student (xkd)/exact_match": 61.5, "student (xkd)/distinct_2": 0.2,
        "student/lca_auroc": 0.7,
    }  # fmt: skip


def test_learning_curves_one_axes_per_family_and_sparse_eval():
    history = []
    for step in range(0, 100, 10):
        row = {"step": step, "loss": 1 / (step + 1), "loss/xkd": 0.5, "lr": 1e-3, "grad_norm": float("nan")}
        if step % 30 == 0:
            row["eval_loss"] = 2 / (step + 1)
        history.append(row)
    fig = learning_curves(history)
    assert len(fig.axes) == 2, "loss family (loss, loss/xkd, eval_loss) and lr; all-NaN grad_norm dropped"
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(lines) == {"loss", "loss/xkd", "eval_loss"}
    assert list(lines["eval_loss"].get_xdata()) == [0, 30, 60, 90]
    assert len(lines["loss"].get_xdata()) == 10
    assert len(learning_curves(history, keys=["lr"]).axes) == 1
    assert len(learning_curves([]).axes) == 1


def test_reward_heatmap_is_centred_at_zero_and_labelled():
    rows = [(["T", "h", "e", " "], [0.5, -0.2, 0.1, 0.0]), (["2", "\n"], [-1.5, 0.3]), ([], [])]
    fig = reward_heatmap(rows, title="μ")
    heat, colorbar = fig.axes
    image = heat.get_images()[0]
    assert image.norm.vmin == -image.norm.vmax == -1.5
    assert image.get_array().shape == (3, 4)
    assert [t.get_text() for t in heat.texts] == ["T", "h", "e", "␣", "2", "⏎"]
    assert colorbar.get_ylabel() == "reward posterior mean μ"
    with pytest.raises(ValueError, match="row 0: 2 tokens but 1"):
        reward_heatmap([(["a", "b"], [0.1])])


# ---------------------------------------------------------------------------------------------------
# a real `mlflow server`: one per module, stopped and restarted by the outage test
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(mlflow_server):
    return mlflow_server


def test_server_parent_and_nested_child_over_http(server, tmp_path):
    with Tracker(server.uri, "kdray-server", run_name="workflow", spool_dir=tmp_path / "spool") as parent:
        parent.log_params({"objective": {"method": "xkd", "temperature": 2.0}})
        with Tracker(server.uri, "kdray-server", run_name="distill", parent_run_id=parent.run_id) as child:
            child.log_params({"lr": 1e-3})
            for step in range(25):
                child.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
            child.log_text("distilled\n", "notes/distill.txt")
    client = MlflowClient(server.uri)
    nested = client.search_runs([parent.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert [r.info.run_id for r in nested] == [child.run_id]
    assert nested[0].data.params == {"lr": "0.001"}
    assert client.get_run(parent.run_id).data.params == {
        "objective.method": "xkd",
        "objective.temperature": "2.0",
    }
    _assert_series(server.uri, child.run_id, "loss", [(s, 1.0 / (s + 1)) for s in range(25)])
    assert _artifact_paths(server.uri, child.run_id) == {"notes/distill.txt"}
    assert {client.get_run(r).info.status for r in (parent.run_id, child.run_id)} == {"FINISHED"}


def test_a_new_tracker_resends_what_a_dead_process_left(server, tmp_path, caplog):
    client = MlflowClient(server.uri)
    run_id = client.create_run(_experiment(client, "kdray-resume"), run_name="resume").info.run_id
    spool = tmp_path / "spool"
    # the first process sees no server at all (another port): every call stays in its spool
    unreachable = f"http://127.0.0.1:{free_port()}"
    first = Tracker(unreachable, "kdray-resume", run_id=run_id, spool_dir=spool, flush_interval_s=0.05)
    for step in range(30):
        first.log_metrics({"loss": float(step)}, step=step)
    first.log_params({"seed": 7})
    first.log_text("from the first process\n", "notes/first.txt")
    with caplog.at_level(logging.WARNING, logger="kdray.tracking"):
        first.close(timeout_s=1.0)
    assert str(spool) in caplog.text and run_id in caplog.text, "the warning says how to resend"
    assert len(list(spool.glob("*.json"))) == 33, "30 metrics, a param, a file, and the end of the run"

    second = Tracker(server.uri, "kdray-resume", run_id=run_id, spool_dir=spool, flush_interval_s=0.05)
    second.log_metrics({"loss": 30.0}, step=30)
    second.close(timeout_s=240)
    assert _history(server.uri, run_id, "loss") == [(s, float(s)) for s in range(31)]
    run = client.get_run(run_id)
    assert run.data.params == {"seed": "7"}
    assert run.info.status == "FINISHED"
    assert _artifact_paths(server.uri, run_id) == {"notes/first.txt"}
    assert not spool.exists()


def test_mlflow_ui_shows_the_run(server, tmp_path):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    run_name = f"kdray-ui-{os.getpid()}"
    history = [{"step": step, "loss": 2.0 / (step + 1)} for step in range(20)]
    # what the evaluate step logs: generated samples as jsonl, and a plot as PNG
    answer = f"#### {os.getpid()}"
    samples = tmp_path / "samples.jsonl"
    samples.write_text(json.dumps({"prompt": "What is 2 + 2?", "output": answer}) + "\n")
    with Tracker(server.uri, "kdray-ui", run_name=run_name, spool_dir=tmp_path / "spool") as tracker:
        tracker.log_params({"objective": {"method": "xkd"}})
        for row in history:
            tracker.log_metrics({"loss": row["loss"]}, step=row["step"])
        tracker.log_figure(learning_curves(history), "plots/learning_curves.png")
        tracker.log_artifact(str(samples))

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    profile = tempfile.mkdtemp(prefix="chromium-", dir=tmp_path)
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))  # no selenium-manager
    try:
        driver.set_window_size(1400, 900)
        # MLflow 3 opens the GenAI overview by default; the runs table is the "machine_learning" workflow
        driver.get(f"{server.uri}/#/experiments/{tracker.experiment_id}/runs?workflowType=machine_learning")
        body = lambda d: d.find_element(By.TAG_NAME, "body").text  # noqa: E731
        WebDriverWait(driver, UI_WAIT_S).until(lambda d: run_name in body(d))
        for close in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
            close.click()  # the assistant side panel would hide half of the run page
        driver.find_element(By.LINK_TEXT, run_name).click()
        WebDriverWait(driver, UI_WAIT_S).until(lambda d: "objective.method" in body(d))
        assert tracker.run_id in driver.current_url
        # the run's charts, with the sidebar of the model-training workflow (the link drops that choice)
        charts = f"{driver.current_url.split('?')[0]}/model-metrics?workflowType=machine_learning"
        driver.get(charts)
        legend = f"{run_name} (loss)"
        WebDriverWait(driver, UI_WAIT_S).until(lambda d: legend in body(d))
        time.sleep(1)  # let the charts and tables finish drawing
        out_dir = Path(os.environ.get("KDRAY_TEST_ARTIFACTS", "test-artifacts"))
        out_dir.mkdir(parents=True, exist_ok=True)
        screenshot = out_dir / "mlflow_ui.png"
        assert driver.save_screenshot(str(screenshot))
        page = body(driver)
        # the artifacts view: the samples file opens as text, the plot as an image the browser decoded
        driver.get(f"{driver.current_url.split('/model-metrics')[0]}/artifacts")
        WebDriverWait(driver, UI_WAIT_S).until(lambda d: "samples.jsonl" in body(d) and "plots" in body(d))
        driver.find_element(By.XPATH, "//*[text()='samples.jsonl']").click()
        WebDriverWait(driver, UI_WAIT_S).until(lambda d: answer in body(d))
        driver.find_element(By.XPATH, "//*[text()='plots']").click()
        WebDriverWait(driver, UI_WAIT_S).until(lambda d: "learning_curves.png" in body(d))
        driver.find_element(By.XPATH, "//*[text()='learning_curves.png']").click()
        # the preview loads the file into a blob: URL; a decoded image has the plot's pixel width
        drawn = "return [...document.images].filter(i => i.src.startsWith('blob:')).map(i => i.naturalWidth)"
        WebDriverWait(driver, UI_WAIT_S).until(lambda d: any(w > 300 for w in d.execute_script(drawn)))
        assert "plots/learning_curves.png" in body(driver)
        assert driver.save_screenshot(str(out_dir / "mlflow_ui_artifacts.png"))
    finally:
        driver.quit()
    assert run_name in page
    width, height = _png_size(screenshot)
    assert width >= 1000 and height >= 500
    assert screenshot.stat().st_size > 20_000


def test_server_killed_mid_run_and_restarted_loses_nothing(server, tmp_path):
    """Last in the module: it kills the shared server (SIGKILL, like a crash) and restarts it."""
    tracker = Tracker(
        server.uri, "kdray-server", run_name="outage", spool_dir=tmp_path / "spool", flush_interval_s=0.1
    )
    expected = [(step, 1.0 / (step + 1)) for step in range(80)]
    for step, loss in expected[:20]:
        tracker.log_metrics({"loss": loss}, step=step)
    assert tracker.flush(timeout_s=60)

    server.stop(signal.SIGKILL)
    durations = []
    for step, loss in expected[20:70]:
        start = time.perf_counter()
        tracker.log_metrics({"loss": loss}, step=step)
        durations.append(time.perf_counter() - start)
        time.sleep(0.02)
    tracker.log_params({"during_outage": True})
    tracker.log_text("written while the server was down\n", "notes/outage.txt")
    assert max(durations) < 0.5, f"log_metrics blocked on a dead server: {max(durations):.2f}s"
    assert not tracker.flush(timeout_s=1.0), "nothing can reach a dead server"

    server.start()
    for step, loss in expected[70:]:
        tracker.log_metrics({"loss": loss}, step=step)
    tracker.close(timeout_s=240)

    _assert_series(server.uri, tracker.run_id, "loss", expected)
    run = MlflowClient(server.uri).get_run(tracker.run_id)
    assert run.data.params == {"during_outage": "True"}
    assert run.info.status == "FINISHED"
    assert _artifact_paths(server.uri, tracker.run_id) == {"notes/outage.txt"}
    assert not (tmp_path / "spool").exists()


def test_a_blocking_retry_stops_at_its_bound_and_refuses_to_have_none(monkeypatch):
    """`kdray.runs.retry`: a transient error is retried until the deadline; a permanent one is raised at
    once; a call with neither bound is refused rather than left to wait forever."""
    from kdray import runs

    sleeps, calls = [], []
    monkeypatch.setattr(runs.time, "sleep", sleeps.append)

    def down():
        calls.append(1)
        raise ConnectionError("refused")

    with pytest.raises(ConnectionError):
        runs.retry(down, what="x", timeout_s=7.0)
    assert sleeps == [2, 4] and len(calls) == 3  # a third wait (8 s) would pass the 7 s deadline
    with pytest.raises(ValueError, match="bad"):
        runs.retry(lambda: (_ for _ in ()).throw(ValueError("bad")), what="x", attempts=5)
    assert sleeps == [2, 4], "a permanent error is not retried"
    with pytest.raises(TypeError, match="attempts= or timeout_s="):
        runs.retry(down, what="x")
