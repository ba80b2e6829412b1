"""DistiLLM's adaptive off-policy schedule and its replay buffer of student samples (REFERENCES.md §3)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from kdray.train.onpolicy import AdaptiveOffPolicy, ReplayBuffer

# ---- the threshold trigger -----------------------------------------------------------------------


def test_trigger_compares_with_the_loss_at_the_last_raise():
    sched = AdaptiveOffPolicy()
    seq = [
        (2.0, 0.0),  # first call: the pre-training loss, recorded only
        (2.05, 0.0),
        (2.11, 0.1),  # ≥ 2.0 + 0.1: raise, and 2.11 becomes the reference
        (2.15, 0.1),  # would be ≥ 2.05 + 0.1 against the previous evaluation, but not against 2.11
        (2.22, 0.2),  # ≥ 2.11 + 0.1
        (1.0, 0.2),  # a drop moves nothing (thr never falls, the reference stays 2.22)
        (1.15, 0.2),
        (2.30, 0.2),
        (2.33, 0.3),
    ]
    for loss, thr in seq:
        assert sched.update(loss) == pytest.approx(thr), (loss, thr)
    assert sched.prev_val == 2.33
    assert sched.update(float("nan")) == pytest.approx(0.3) and sched.prev_val == 2.33
    restored = AdaptiveOffPolicy()
    restored.load_state_dict(sched.state_dict())
    assert restored.update(2.43) == pytest.approx(0.4) == sched.update(2.43)


def test_threshold_is_capped_at_one_and_starts_where_told():
    sched = AdaptiveOffPolicy()
    sched.update(0.0)
    thrs = [sched.update(0.1 * (i + 1)) for i in range(12)]
    assert thrs[9] == 1.0 and thrs[-1] == 1.0  # exactly 1.0 after ten raises of 0.1
    high = AdaptiveOffPolicy(init_threshold=0.95, loss_eps=0.2)
    assert high.update(1.0) == 0.95 and high.update(1.19) == 0.95 and high.update(1.2) == 1.0
    with pytest.raises(ValueError, match="replay"):
        AdaptiveOffPolicy(replay="sometimes")


# ---- the per-step choice -------------------------------------------------------------------------


def test_choose_is_a_function_of_seed_and_step_and_zero_threshold_means_data():
    sched = AdaptiveOffPolicy(init_threshold=0.5)
    a = [sched.choose(3, s, 100, 1000, 1000) for s in range(200)]
    assert a == [sched.choose(3, s, 100, 1000, 1000) for s in range(200)]
    assert a != [sched.choose(4, s, 100, 1000, 1000) for s in range(200)]
    assert {AdaptiveOffPolicy().choose(0, s, 100, 0, 1000) for s in range(200)} == {"data"}
    assert sched.fresh_probability(25, 100) == pytest.approx(0.375)
    assert AdaptiveOffPolicy(0.5, replay="constant").fresh_probability(25, 100) == pytest.approx(0.25)
    assert AdaptiveOffPolicy(0.5, replay="increasing").fresh_probability(25, 100) == pytest.approx(0.125)


def within(count: int, p: float, n: int, sigmas: float = 5.0) -> bool:
    return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


@pytest.mark.parametrize("replay", ["decreasing", "constant", "increasing"])
def test_choice_frequencies_once_the_buffer_is_full(replay):
    thr, total, n = 0.6, 20000, 20000
    sched = AdaptiveOffPolicy(init_threshold=thr, replay=replay)
    picks = np.array([sched.choose(7, s, total, 1000, 1000) for s in range(n)])
    samp = np.array([sched.fresh_probability(s, total) for s in range(n)])
    fresh, replayed = picks == "fresh", picks == "replay"
    # counts of independent Bernoulli draws with per-step probabilities samp(s), thr − samp(s), 1 − thr
    for hit, p in ((fresh, samp), (replayed, thr - samp)):
        assert abs(hit.sum() - p.sum()) <= 5 * np.sqrt((p * (1 - p)).sum()), (replay, hit.sum(), p.sum())
    assert within(int((picks == "data").sum()), 1 - thr, n)
    # and per half of the run, where the decreasing/increasing schedules differ most
    for half in (slice(0, n // 2), slice(n // 2, n)):
        p = samp[half]
        assert abs(fresh[half].sum() - p.sum()) <= 5 * np.sqrt((p * (1 - p)).sum())


def test_until_the_buffer_is_full_student_steps_are_fresh():
    sched = AdaptiveOffPolicy(init_threshold=0.6)
    picks = [sched.choose(1, s, 5000, 999, 1000) for s in range(5000)]
    assert "replay" not in picks and within(picks.count("fresh"), 0.6, 5000)


# ---- the replay buffer ---------------------------------------------------------------------------

PAD = 99


def sampled_rows(first_id: int, lengths: list[int], width: int | None = None, k: int = 3) -> dict:
    """A right-padded micro-batch shaped like a scored student sample; row i's tokens start at first_id+i."""
    rng = np.random.default_rng(first_id)
    b, w = len(lengths), width or max(lengths)
    batch = {
        "input_ids": np.full((b, w), PAD, np.int64),
        "attention_mask": np.zeros((b, w), bool),
        "response_mask": np.zeros((b, w), bool),
        "old_logprobs": np.zeros((b, w), np.float32),
        "topk_ids": np.zeros((b, w, k), np.int32),
        "topk_logprobs": np.zeros((b, w, k), np.float32),
        "sample_id": np.arange(first_id, first_id + b),  # a per-row (not per-token) column rides along
    }
    for i, n in enumerate(lengths):
        batch["input_ids"][i, :n] = first_id + i + np.arange(n)
        batch["attention_mask"][i, :n] = True
        batch["response_mask"][i, 2:n] = True
        batch["old_logprobs"][i, 2:n] = -rng.random(n - 2)
        batch["topk_ids"][i, :n] = rng.integers(0, 50, (n, k))
        batch["topk_logprobs"][i, :n] = -rng.random((n, k))
    return batch


def test_buffer_is_fifo_in_rows():
    buf = ReplayBuffer(capacity=5, seed=0)
    buf.add_batch(sampled_rows(0, [3, 4, 5]))
    buf.add_batch(sampled_rows(3, [4, 6, 3, 5]))
    assert len(buf) == 5 and [int(r["sample_id"]) for r in buf.rows] == [2, 3, 4, 5, 6]
    assert [len(r["input_ids"]) for r in buf.rows] == [5, 4, 6, 3, 5]  # padding trimmed per row


def test_sampling_is_uniform_without_replacement():
    buf = ReplayBuffer(capacity=10, seed=1)
    buf.add_batch(sampled_rows(0, [3, 4, 5, 6, 7]))
    ids = sorted(buf.sample_batch(5, PAD)["sample_id"].tolist())
    assert ids == [0, 1, 2, 3, 4]  # all five, none twice
    with pytest.raises(ValueError, match="fewer than the 6"):
        buf.sample_batch(6, PAD)
    seen = np.zeros(5)
    for _ in range(2000):
        draw = buf.sample_batch(2, PAD)["sample_id"]
        assert draw[0] != draw[1]
        seen[draw] += 1
    assert all(within(int(c), 2 / 5, 2000) for c in seen), seen


def test_round_trip_preserves_rows_exactly():
    batch = sampled_rows(10, [4, 7, 5, 6], width=9)  # two all-padding columns at the end
    buf = ReplayBuffer(capacity=8, seed=2)
    buf.add_batch(batch)
    batch["topk_ids"][:] = -1  # the buffer holds copies
    original = sampled_rows(10, [4, 7, 5, 6], width=7)  # the same rows at their regular width
    got = buf.sample_batch(4, PAD)
    order = np.argsort(got["sample_id"])
    assert set(got) == set(original)
    for key, value in original.items():
        assert got[key].dtype == value.dtype, key
        np.testing.assert_array_equal(got[key][order], value, err_msg=key)
    # a draw of shorter rows is re-padded to its own longest row (input_ids with pad, the rest with 0)
    buf = ReplayBuffer(capacity=2, seed=0)
    buf.add_batch(sampled_rows(0, [3, 2]))
    got = buf.sample_batch(2, PAD)
    short = int(np.argmin(got["attention_mask"].sum(1)))
    assert got["input_ids"].shape == (2, 3) and got["input_ids"][short, 2] == PAD
    assert got["topk_ids"].shape == (2, 3, 3) and not got["topk_ids"][short, 2].any()


def test_state_dict_reproduces_the_next_samples():
    buf = ReplayBuffer(capacity=6, seed=3)
    buf.add_batch(sampled_rows(0, [3, 4, 5, 6]))
    buf.add_batch(sampled_rows(4, [5, 3, 4]))
    buf.sample_batch(3, PAD)  # advance the RNG
    other = ReplayBuffer(capacity=1, seed=99)
    saved = io.BytesIO()  # through a checkpoint, which kdray loads without unpickling objects
    torch.save(buf.state_dict(), saved)
    saved.seek(0)
    other.load_state_dict(torch.load(saved, weights_only=True))
    assert len(other) == 6 and other.capacity == 6
    for _ in range(3):
        a, b = buf.sample_batch(4, PAD), other.sample_batch(4, PAD)
        assert set(a) == set(b)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    other.add_batch(sampled_rows(20, [3]))
    assert len(other) == 6 and int(other.rows[-1]["sample_id"]) == 20  # still FIFO at the restored capacity
