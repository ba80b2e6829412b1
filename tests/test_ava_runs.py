"""AVA through real Ray: pairs kept whole by Ray Data and a two-worker split, AVA-d and AVA-p trained by
Ray Train with no teacher, the exported reward model scored, served by the CLI and registered in MLflow."""

from __future__ import annotations

import json
import math
import re
import threading

import pytest
import torch

from kdray.config import config_from_dict
from kdray.data import generate_arithmetic
from kdray.data.preferences import arithmetic_pair_splits, arithmetic_pairs
from kdray.data.tokenize import tokenize_example
from kdray.losses.ava import check_pair_layout
from kdray.models import Student
from kdray.models.tokenizer import char_tokenizer

TOK = char_tokenizer()


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ray = pytest.importorskip("ray")


def test_pairs_stay_whole_through_ray_data_and_a_two_worker_split(ray_session):
    from kdray.data import pipeline
    from kdray.train.batches import micro_batches

    pipeline.deterministic_order()
    pairs = arithmetic_pairs(27, seed=5, difficulty=1, split="train")
    rows = pipeline.paired_rows(pairs, block_rows=4, splits=2)
    assert len(rows) == 48  # 54 rows cut to whole global batches of 4 x 2
    ds = pipeline.tokenized(
        pipeline.records_dataset(rows, block_rows=4), "tiny", max_prompt_tokens=160, max_response_tokens=96,
        chat_template=True, batch_size=4,
    )  # fmt: skip
    shards = ds.streaming_split(2, equal=True)
    seen: list[list[dict]] = [[], []]

    def consume(i: int) -> None:  # a streaming split is read by its consumers at the same time
        seen[i].extend(micro_batches(shards[i], 4, TOK.pad_token_id, max_epochs=1))

    threads = [threading.Thread(target=consume, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    by_id = {p["id"]: p for p in pairs}
    ids = []
    for batch in seen[0] + seen[1]:
        check_pair_layout(torch.tensor(batch["pair_sign"].tolist()))
        for i in range(0, 4, 2):
            pair = by_id[batch["id"][i]]
            assert batch["id"][i + 1] == pair["id"]
            assert (batch["response"][i], batch["response"][i + 1]) == (pair["chosen"], pair["rejected"])
            ids.append(pair["id"])
    assert len(seen[0]) == len(seen[1]) == 6 and sorted(ids) == sorted(p["id"] for p in pairs[:24])
    with pytest.raises(ValueError, match="even batch size"):
        pipeline.paired_rows(pairs, block_rows=3)


def run_cfg(method: str, steps: int):
    return config_from_dict(
        {
            "model": {"name_or_path": "tiny", "tiny_layers": 1, "tiny_hidden": 32},
            # no teacher exists: a run that touched one would fail on this path
            "teacher": {"name_or_path": "/nonexistent/teacher"},
            "data": {"preferences": method == "ava_p", "max_prompt_tokens": 160, "max_response_tokens": 96},
            "objective": {"method": method},
            "train": {"batch_size": 8, "max_steps": steps, "lr": 3e-3, "warmup_steps": 0,
                      "checkpoint_every": steps, "eval_every": steps, "seed": 0},
            "tracking": {"log_every": 1},
        }
    )  # fmt: skip


TOKENIZATION = {"max_prompt_tokens": 160, "max_response_tokens": 96, "chat_template": True}


@pytest.fixture(scope="module")
def ava_d_run(ray_session, tmp_path_factory):
    from kdray.train.trainer import distill

    train = generate_arithmetic(400, seed=0, difficulty=1, split="train")
    held_out = generate_arithmetic(16, seed=0, difficulty=1, split="test")
    return distill(run_cfg("ava_d", 40), train, held_out, workdir=tmp_path_factory.mktemp("ava_d"))


def test_ava_d_trains_its_reward_head_with_no_teacher(ava_d_run):
    from kdray.models.build import load_reward_head
    from kdray.models.reward_head import RewardHead

    h = ava_d_run.history
    assert [r["step"] for r in h] == list(range(1, 41))

    def head_loss(rows):  # the reward posterior's own terms: TD-NLL and the prior
        return sum(r["xkd/td_nll"] + r["xkd/prior_kl"] for r in rows) / len(rows)

    def mean(key, rows):
        return sum(r[key] for r in rows) / len(rows)

    # the posterior fits the TD residuals (it narrows, so its prior term grows, but less than it gains)
    assert mean("xkd/td_nll", h[-5:]) < 0.5 * mean("xkd/td_nll", h[:5])  # measured: 0.15
    assert head_loss(h[-5:]) < 0.9 * head_loss(h[:5])  # measured: 0.78
    assert mean("loss", h[-5:]) < 0.85 * mean("loss", h[:5])  # measured: 0.73 after 40 steps
    assert "teacher_rows_scored" not in h[-1] and "ava_pref" not in h[-1]
    head = load_reward_head(ava_d_run.export_path)
    torch.manual_seed(0)
    initial = RewardHead(32)
    assert not torch.allclose(head.proj.weight, initial.proj.weight) and head.proj.bias.abs().sum() > 0


@pytest.fixture(scope="module")
def ava_p_run(ray_session, tmp_path_factory):
    from kdray.train.trainer import distill

    train, held_out = arithmetic_pair_splits(120, 12, seed=0, difficulty=1)
    run = distill(run_cfg("ava_p", 30), train, held_out, workdir=tmp_path_factory.mktemp("ava_p"))
    return run, held_out


def test_ava_p_run_trains_the_preference_term_and_exports_the_reward_model(ava_p_run):
    run, _ = ava_p_run
    final = run.final
    assert final["consumed_rows"] == 30 * 8 and math.isfinite(final["ava_pref/bt"])
    assert 0 <= final["ava_pref/accuracy"] <= 1 and "eval_loss" in final
    assert (run.export_path / "reward_head.pt").is_file()


def test_reward_scores_sum_the_head_over_the_response_in_any_batching(ava_p_run):
    from kdray.models.build import load_reward_head
    from kdray.models.loading import load_causal_lm
    from kdray.reward import RewardModel, preference_accuracy, score_pairs

    run, held_out = ava_p_run
    rows = [{"prompt": p["prompt"], "response": p[k]} for p in held_out[:3] for k in ("chosen", "rejected")]
    batched = RewardModel(run.export_path, batch_size=16, **TOKENIZATION).scores(rows)
    single = RewardModel(run.export_path, batch_size=1, **TOKENIZATION).scores(rows)
    assert batched == pytest.approx(single, abs=1e-5)
    lm, tok = load_causal_lm(str(run.export_path))
    model = Student(lm.eval(), load_reward_head(run.export_path))
    for row, score in zip(rows, batched, strict=True):
        ex = tokenize_example(
            tok, row["prompt"], row["response"], max_prompt_tokens=160, max_response_tokens=96
        )
        with torch.no_grad():
            _, mu, _ = model(torch.tensor([ex["input_ids"]]))
        # μ at t is the reward of the token at t + 1: sum over the positions that emit the response
        expected = sum(float(mu[0, t]) for t in range(len(ex["input_ids"]) - 1) if ex["response_mask"][t + 1])
        assert score == pytest.approx(expected, abs=1e-5)
    scored = score_pairs(run.export_path, held_out, **TOKENIZATION)
    accuracy = preference_accuracy(run.export_path, held_out, **TOKENIZATION)
    assert accuracy == sum(c > r for c, r in scored) / len(held_out)


def test_reward_cli_scores_rows_and_pairs(ava_p_run, tmp_path, capsys):
    from kdray.cli import main
    from kdray.reward import preference_accuracy, reward_scores

    run, held_out = ava_p_run
    flags = ["--max-prompt-tokens", "160", "--max-response-tokens", "96"]
    pairs = write_jsonl(
        tmp_path / "pairs.jsonl", [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in held_out]
    )
    run_dir = run.export_path.parent  # a run directory: the one export with a head under it
    assert main(["reward", "--model", str(run_dir), "--data", str(pairs), *flags]) == 0
    *lines, summary = capsys.readouterr().out.strip().split("\n")
    assert len(lines) == len(held_out) and all(json.loads(x)["correct"] in (True, False) for x in lines)
    accuracy = preference_accuracy(run.export_path, held_out, **TOKENIZATION)
    assert summary.startswith(f"preference accuracy: {accuracy:.4f} over {len(held_out)} pairs")

    rows = [{"prompt": p["prompt"], "response": p["chosen"]} for p in held_out[:4]]
    demos = write_jsonl(tmp_path / "rows.jsonl", rows)
    assert main(["reward", "--model", str(run.export_path), "--data", str(demos), *flags]) == 0
    printed = [json.loads(x)["reward"] for x in capsys.readouterr().out.strip().split("\n")]
    assert printed == pytest.approx(reward_scores(run.export_path, rows, **TOKENIZATION))

    bad = write_jsonl(tmp_path / "bad.jsonl", [rows[0], {"prompt": "p"}])
    assert main(["reward", "--model", str(run.export_path), "--data", str(bad)]) == 2
    assert re.search(r"bad\.jsonl:2: malformed row \(field 'response'\)", capsys.readouterr().err)
    assert main(["reward", "--model", str(tmp_path), "--data", str(demos)]) == 2
    assert "exactly one exported student with a reward head" in capsys.readouterr().err


def test_reward_model_is_registered_beside_the_policy_in_mlflow(ava_p_run, tmp_path, monkeypatch):
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    from kdray.registry import log_student
    from kdray.reward import reward_scores
    from kdray.tracking import Tracker

    run, held_out = ava_p_run
    plain = {**TOKENIZATION, "chat_template": False}  # not the default: the logged model must keep it
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with Tracker(uri, "kdray-ava", spool_dir=tmp_path / "spool", run_name="register") as tracker:
        version = log_student(
            tracker, run.export_path, registered_model="ava-tiny", reward_tokenization=plain
        )
    assert version == "1"
    client = MlflowClient(uri)
    assert {m.name for m in client.search_registered_models()} == {"ava-tiny", "ava-tiny-reward"}
    reward_version = client.get_model_version("ava-tiny-reward", "1")
    assert reward_version.run_id == tracker.run_id == client.get_model_version("ava-tiny", "1").run_id

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # models:/ URIs resolve through the global URI
    loaded = mlflow.pyfunc.load_model("models:/ava-tiny-reward/1")
    rows = [{"prompt": p["prompt"], "response": p["rejected"]} for p in held_out[:3]]
    expected = reward_scores(run.export_path, rows, **plain)
    assert expected != pytest.approx(reward_scores(run.export_path, rows, **TOKENIZATION), abs=1e-5)
    assert loaded.predict(pd.DataFrame(rows)) == pytest.approx(expected, abs=1e-5)
    assert loaded.predict(rows) == pytest.approx(expected, abs=1e-5)


@pytest.mark.slow
def test_ava_p_ranks_held_out_arithmetic_pairs(tmp_path):
    """workflows/ava.py end to end: a tiny student from scratch, no teacher, held-out pairs ranked."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "workflows" / "ava.py"
    rows = tmp_path / "ava.jsonl"  # not the repository's benchmarks/ava.jsonl
    out = subprocess.run(
        [sys.executable, str(script), "--workdir", str(tmp_path), "--out", str(rows)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert (
        json.loads(rows.read_text().splitlines()[-1])["held_out_preference_accuracy"]
        == result["held_out_preference_accuracy"]
    )
    assert result["held_out_pairs"] == 200
    assert result["held_out_preference_accuracy"] >= 0.75, result
