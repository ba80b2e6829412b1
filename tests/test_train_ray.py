"""Students on Ray Train fed by Ray Data, on a real local Ray: data parallelism, failures, overlap, cache.

One Ray session for the module; every run is a few steps of tiny models on the generated task.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from kdray.config import config_from_dict, with_overrides  # noqa: E402
from kdray.data import generate_arithmetic  # noqa: E402
from kdray.models.build import load_reward_head  # noqa: E402
from kdray.models.tiny import save_tiny_checkpoint  # noqa: E402
from kdray.train.trainer import distill, read_history  # noqa: E402

STEPS = 6


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    return str(
        save_tiny_checkpoint(tmp_path_factory.mktemp("teacher") / "t", hidden_size=64, num_layers=2, seed=1)
    )


@pytest.fixture(scope="module")
def records():
    return generate_arithmetic(240, seed=0, difficulty=1), generate_arithmetic(
        16, seed=1, difficulty=1, split="test"
    )


def make_cfg(teacher_path, *, workers=1, global_batch=8, steps=STEPS, **train):
    return config_from_dict(
        {
            "model": {"name_or_path": "tiny", "tiny_layers": 1, "tiny_hidden": 32},
            "teacher": {"name_or_path": teacher_path, "top_k": 16, "num_cpus": 1, "batch_size": 8},
            "data": {"max_prompt_tokens": 96, "max_response_tokens": 96},
            "objective": {
                "method": "xkd",
                "terms": [{"name": "xkd", "params": {"divergence": "forward_kl"}}],
            },
            "train": {
                "num_workers": workers,
                "batch_size": global_batch // workers,
                "max_steps": steps,
                "checkpoint_every": 2,
                "eval_every": 3,
                "lr": 3e-3,
                "seed": 0,
                **train,
            },
            "tracking": {"log_every": 1},
        }
    )


@pytest.fixture(scope="module")
def one_worker(ray_session, teacher_path, records, tmp_path_factory):
    return distill(
        make_cfg(teacher_path), *records, workdir=tmp_path_factory.mktemp("w1"), teacher_path=teacher_path
    )


def test_workers_that_leave_no_cpu_for_the_tokenizers_are_refused_before_any_actor(
    ray_session, teacher_path, records, tmp_path
):
    """5 worker CPUs + 1 teacher replica fill the session's 6 CPUs: the train split's tokenizing actor
    and the signal stage's client of the teacher pool (0.25 CPU each; the eval split is tokenized in the
    driver) could never be placed, and Ray would wait for them without a word."""
    cfg = make_cfg(teacher_path, cpus_per_worker=5)
    with pytest.raises(RuntimeError, match="cannot place all its actors") as err:
        distill(cfg, *records, workdir=tmp_path / "w", teacher_path=teacher_path)
    assert "CPU: needs 6.5, the cluster has 6" in str(err.value)
    assert "1 tokenizer(s)" in str(err.value) and "train.cpus_per_worker" in str(err.value)
    assert "1 teacher client(s) per replica" in str(err.value)
    assert not any((tmp_path / "w").rglob("*")), "refused before the run wrote anything"


def losses(run):
    return np.array([h["loss"] for h in run.history])


def test_run_learns_exports_and_reports_every_step(one_worker):
    steps = [h["step"] for h in one_worker.history]
    assert steps == list(range(1, STEPS + 1))
    assert losses(one_worker)[-1] < losses(one_worker)[0]
    assert {"xkd/td_nll", "xkd/prior_kl", "xkd/reward_mu", "eval_loss", "lr", "tokens_per_s"} <= set(
        one_worker.history[2]
    )
    assert (one_worker.export_path / "config.json").is_file()
    # the reward head goes beside the HF checkpoint (transformers ignores it) and loads back
    head = load_reward_head(one_worker.export_path)
    assert head is not None and head.proj.weight.shape[1] == 32


def test_teacher_pass_overlaps_training(ray_session, teacher_path, tmp_path):
    # a run that reads 480 rows: the teacher streams ahead only as far as Ray Data's back-pressure lets
    # it, so training starts long before the teacher pass ends
    train, held_out = (
        generate_arithmetic(480, seed=2, difficulty=1),
        generate_arithmetic(8, seed=3, split="test"),
    )
    cfg = with_overrides(
        make_cfg(teacher_path, steps=60, checkpoint_every=60, eval_every=60), {"tracking.log_every": 60}
    )
    run = distill(cfg, train, held_out, workdir=tmp_path, teacher_path=teacher_path)
    before = run.final["teacher_rows_before_first_step"]
    assert 0 < before < 0.1 * len(train), f"{before} of {len(train)} rows were scored before the first step"
    assert run.final["teacher_rows_scored"] == len(train) == run.final["consumed_rows"]


def test_rows_past_what_the_run_reads_are_not_scored(ray_session, teacher_path, tmp_path):
    train, held_out = generate_arithmetic(400, seed=4, difficulty=1), generate_arithmetic(8, seed=5)
    run = distill(
        make_cfg(teacher_path, steps=2), train, held_out, workdir=tmp_path, teacher_path=teacher_path
    )
    assert run.final["teacher_rows_scored"] == 2 * 8 == run.final["consumed_rows"]


def test_two_workers_match_one_worker_with_twice_the_batch(
    ray_session, teacher_path, records, tmp_path, one_worker
):
    two = distill(make_cfg(teacher_path, workers=2), *records, workdir=tmp_path, teacher_path=teacher_path)
    np.testing.assert_allclose(losses(two), losses(one_worker), rtol=2e-3, atol=1e-4)
    assert two.final["consumed_rows"] == one_worker.final["consumed_rows"] == STEPS * 8
    assert two.final["eval_loss"] == pytest.approx(one_worker.final["eval_loss"], rel=1e-3)


def test_a_held_out_split_smaller_than_a_batch_is_scored_not_refused(
    ray_session, teacher_path, records, tmp_path, one_worker
):
    few = records[1][:3]  # 3 held-out rows, batch size 8: used to fail as "no batch of 8 rows"
    run = distill(
        make_cfg(teacher_path, steps=3), records[0], few, workdir=tmp_path, teacher_path=teacher_path
    )
    assert math.isfinite(run.final["eval_loss"]) and run.final["eval_loss"] > 0


def test_killed_worker_resumes_from_checkpoint_and_finishes_exactly(
    ray_session, teacher_path, records, tmp_path, one_worker
):
    cfg = make_cfg(teacher_path, max_failures=1)
    metrics = tmp_path / "distill" / "metrics.jsonl"
    killed: list[int] = []

    def kill_after_step_three():
        deadline = time.time() + 300
        while time.time() < deadline:
            history = read_history(metrics) if metrics.exists() else []
            if history and history[-1]["step"] >= 3:
                pid = history[-1]["worker_pid"]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_after_step_three, daemon=True)
    killer.start()
    run = distill(cfg, *records, workdir=tmp_path, teacher_path=teacher_path)
    killer.join(timeout=5)
    assert killed, "the worker was never killed"
    pids = {h["worker_pid"] for h in run.history}
    assert len(pids) == 2, f"expected a restarted worker, saw pids {pids}"
    assert [h["step"] for h in run.history] == list(range(1, STEPS + 1))
    assert run.final["consumed_rows"] == one_worker.final["consumed_rows"]
    # same data position, optimizer and RNG state after the restore: the same curve as without the kill
    np.testing.assert_allclose(losses(run), losses(one_worker), rtol=2e-3, atol=1e-4)


def test_signal_cache_round_trip_feeds_training(ray_session, teacher_path, records, tmp_path):
    from kdray.data.cache import SignalCache
    from kdray.train.trainer import teacher_pool, train_dataset

    cfg = make_cfg(teacher_path, steps=2)
    cache = SignalCache(tmp_path / "cache")
    with teacher_pool(cfg, teacher_path) as pool:
        live = train_dataset(cfg, records[0][:32], teacher=pool, tokenizer_path=teacher_path)
        assert cache.write(live, "k1", vocab_size=200, meta={"teacher": teacher_path}) == 32
        again = live.take_all()
    assert cache.complete("k1") and cache.metadata("k1")["rows"] == 32
    # one file for these 32 rows (not one per scoring batch), read back in the order they were scored
    assert len(cache.files("k1")) == 1
    cached = cache.read("k1").take_all()
    assert [r["id"] for r in cached] == [r["id"] for r in again] == [r["id"] for r in records[0][:32]]
    for a, b in zip(cached, again, strict=True):
        # a row carries its real tokens only, as scored and as cached: no padding crosses
        assert "attention_mask" not in b and len(a["input_ids"]) == len(b["input_ids"]) == len(b["topk_ids"])
        np.testing.assert_array_equal(a["topk_ids"], b["topk_ids"])
        np.testing.assert_allclose(a["topk_logprobs"], b["topk_logprobs"], atol=2e-2)  # float16 storage
    # a Tune trial's in-process reader: the same rows, order and values as Ray Data's
    local = [row for batch in cache.local("k1").iter_batches(batch_size=5) for row in _rows(batch)]
    assert [r["id"] for r in local] == [r["id"] for r in cached]
    for a, b in zip(local, cached, strict=True):
        for key in ("input_ids", "response_mask", "topk_ids", "topk_logprobs"):
            np.testing.assert_array_equal(a[key], b[key])
        assert "token_logprobs" not in a and "token_logprobs" not in b  # no cached loss reads it
    run = distill(
        cfg,
        records[0][:32],
        records[1],
        workdir=tmp_path,
        teacher_path=teacher_path,
        signal_dataset=cache.read("k1"),
    )
    assert [h["step"] for h in run.history] == [1, 2]
    with pytest.raises(FileNotFoundError, match="no complete teacher-signal cache entry 'nope'"):
        cache.read("nope")


def test_a_run_whose_actors_cannot_all_be_placed_is_refused(ray_session, teacher_path, records, tmp_path):
    # GKD streams the signal and scores student samples, both from the run's one TeacherPool (4 replicas
    # of 2 CPUs), with the signal stage's 4 clients and the train split's tokenizing actor:
    # 1 + 0.25 + 4 x 2 + 4 x 0.25 = 10.25 CPUs > 6 (two sets of replicas would have been 17.25)
    cfg = with_overrides(
        make_cfg(teacher_path),
        {"objective.method": "gkd", "objective.on_policy_fraction": 0.5, "teacher.replicas": 4,
         "teacher.num_cpus": 2},
    )  # fmt: skip
    with pytest.raises(
        RuntimeError,
        match=r"CPU: needs 10\.25, the cluster has 6.*1 tokenizer.*the TeacherPool, 1 teacher client",
    ):
        distill(cfg, *records, workdir=tmp_path, teacher_path=teacher_path)


def _rows(batch):
    n = len(batch["id"])
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]
