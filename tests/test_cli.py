"""The `kdray` command line: run/eval/doctor argument handling, held-out scoring of a saved model, and
the doctor's verdicts (a real unreachable MLflow URI, a real local store)."""

from __future__ import annotations

import socket

from kdray.cli import build_parser, main
from kdray.doctor import Check, check_mlflow, doctor
from kdray.models.tiny import save_tiny_checkpoint


def test_run_refuses_a_bad_config_with_the_key_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_stepz: 3\n")
    assert main(["run", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "max_stepz" in err and "max_steps" in err


def test_run_parses_overrides_after_the_config():
    args = build_parser().parse_args(
        ["run", "--config", "c.yaml", "train.lr=1e-3", "teacher.top_k=8", "--set", "train.seed=1"]
    )
    assert args.config == "c.yaml" and args.overrides == ["train.lr=1e-3", "teacher.top_k=8"]
    assert args.set_overrides == ["train.seed=1"]


def test_every_config_command_takes_one_shape(tmp_path, capsys):
    import pytest

    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  lr: 0.1\n")
    # `kdray config` takes the path positional or as --config, overrides positional or with --set
    for argv in (
        ["config", str(cfg), "train.max_steps=7", "--set", "train.lr=0.2"],
        ["config", "--config", str(cfg), "--set", "train.lr=0.2", "train.max_steps=7"],
    ):
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "  lr: 0.2\n" in out and "  max_steps: 7\n" in out
    # eval: overrides among the model directories, and after the options
    model = save_tiny_checkpoint(tmp_path / "m", hidden_size=32, num_layers=1, seed=0)
    gen = tmp_path / "g.yaml"
    gen.write_text("data:\n  task: arithmetic\n  format: generated\n")
    argv = ["eval", str(model), "--config", str(gen), "--limit", "2", "data.max_response_tokens=4"]
    assert main(argv) == 0 and "(arithmetic, 2 held-out)" in capsys.readouterr().out
    for argv, message in (
        (["run", "train.lr=1"], "the config is missing: add --config PATH"),
        (["run", "--config", str(cfg), "oops"], "'oops' is not a section.key=value override"),
        (["sweep", "--config", str(cfg), "--bogus"], "unrecognized arguments: --bogus"),
    ):
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err


def test_sweep_refuses_bad_search_spaces_before_ray_starts(tmp_path, capsys):
    import ray

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("tune:\n  num_samples: 2\n")
    assert main(["sweep", "--config", str(cfg)]) == 2
    assert "tune.search_space is empty" in capsys.readouterr().err
    cfg.write_text("tune:\n  search_space:\n    teacher.top_k: {type: choice, values: [8, 16]}\n")
    assert main(["sweep", "--config", str(cfg)]) == 2
    assert "changes the teacher step" in capsys.readouterr().err
    assert main(["sweep", "--config", str(cfg), "tune.search_space={}", "train.num_workers=2"]) == 2
    assert "train.num_workers = 2" in capsys.readouterr().err
    assert not ray.is_initialized()


def test_eval_scores_a_saved_model_on_the_held_out_split(tmp_path, capsys):
    model = save_tiny_checkpoint(tmp_path / "m", hidden_size=32, num_layers=1, seed=0)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("data:\n  task: arithmetic\n  format: generated\n  max_response_tokens: 8\n")
    assert main(["eval", str(model), "--config", str(cfg), "--limit", "4"]) == 0
    table = capsys.readouterr().out
    assert "| model (arithmetic, 4 held-out) | exact_match |" in table and str(model) in table
    assert main(["eval", str(tmp_path / "missing"), "--config", str(cfg)]) == 2


def test_doctor_fails_on_an_unreachable_tracking_server(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (check,) = check_mlflow(f"http://127.0.0.1:{port}")
    assert check.status == "FAIL" and "unreachable" in check.detail


def test_doctor_accepts_a_writable_local_store(tmp_path):
    (check,) = check_mlflow(f"sqlite:///{tmp_path}/mlflow.db")
    assert check.status == "ok"


def test_doctor_checks_the_store_a_configs_runs_will_use(tmp_path, monkeypatch, capsys):
    from kdray.config import load_config
    from kdray.doctor import doctor as run_doctor

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"workflow:\n  workdir: {tmp_path / 'runs'}\n")
    args = build_parser().parse_args(["doctor", "--config", str(cfg)])
    assert run_doctor(checks=(check_mlflow,), config=load_config(args.config)) == 0
    assert f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}" in capsys.readouterr().out
    # without a config: the default config's workdir, as `kdray run` with it would use (not the cwd)
    assert run_doctor(checks=(check_mlflow,)) == 0
    assert "runs/default/mlflow.db" in capsys.readouterr().out


def test_doctor_exit_code_and_crashing_checks(capsys):
    def fine():
        return [Check("a", "ok", "fine"), Check("b", "warn", "slow")]

    def broken():
        raise OSError("disk on fire")

    assert doctor((fine,)) == 0
    assert doctor((fine, broken)) == 1
    out = capsys.readouterr().out
    assert "FAIL  broken" in out and "disk on fire" in out


def test_config_checks_tokenizers_before_any_work(tmp_path, capsys):
    """`kdray config` refuses a teacher/student pair `kdray run` would refuse, naming both and the fix."""
    from kdray.models.tokenizer import char_tokenizer

    teacher = save_tiny_checkpoint(tmp_path / "teacher", hidden_size=32, num_layers=1, seed=1)
    student = save_tiny_checkpoint(tmp_path / "student", hidden_size=32, num_layers=1, seed=2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model:\n  name_or_path: {student}\nteacher:\n  name_or_path: {teacher}\n")
    assert main(["config", str(cfg)]) == 0
    assert "share one vocabulary" in capsys.readouterr().err

    char_tokenizer("0123456789+-=abc").save_pretrained(student)  # another tokenizer beside the weights
    assert main(["config", str(cfg), "objective.method=supervised_kd"]) == 2
    err = capsys.readouterr().err
    assert "tokenizers differ" in err and "objective.cross_tokenizer" in err
    assert main(["config", str(cfg), "objective.method=seqkd"]) == 0  # text-only: any pair
    assert "tokenizers differ" in capsys.readouterr().err
    assert main(["config", str(cfg), "--no-preflight", "objective.method=supervised_kd"]) == 0


def test_bench_runs_the_checkout_s_benchmark_and_reports_every_table(tmp_path, capfd):
    import shutil
    from pathlib import Path

    out = tmp_path / "perf.jsonl"
    shutil.copy(Path(__file__).resolve().parents[1] / "benchmarks" / "perf.jsonl", out)
    assert main(["bench", "--report", "--out", str(out)]) == 0
    printed = capfd.readouterr().out
    assert "| teacher signal | chunk (positions) |" in printed and "| system | allocator |" in printed
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["bench", "--report", "--out", str(empty)]) == 0
    assert "no throughput rows; run python workflows/benchmark_perf.py --throughput" in capfd.readouterr().out
