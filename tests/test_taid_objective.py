"""TAID target and schedule; the objective builder and registry."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from kdray.losses import LOSSES, Term, build_objective
from kdray.losses import divergences as D
from kdray.losses.reduce import masked_mean
from kdray.losses.taid import TAIDSchedule, taid_per_token, taid_target_logprobs


def pair(seed=0, shape=(2, 4, 13)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)


def test_taid_target_interpolates_logits():
    s, t = pair()
    torch.testing.assert_close(taid_target_logprobs(s, t, 0.0), torch.log_softmax(s, -1))
    torch.testing.assert_close(taid_target_logprobs(s, t, 1.0), torch.log_softmax(t, -1))
    torch.testing.assert_close(taid_target_logprobs(s, t, 0.3), torch.log_softmax(0.7 * s + 0.3 * t, -1))


def test_taid_loss_endpoints_and_detached_target():
    s, t = pair(1)
    assert taid_per_token(s, t, t=0.0).abs().max() < 1e-6
    torch.testing.assert_close(taid_per_token(s, t, t=1.0), D.forward_kl(s, t))
    # gradient equals that of cross-entropy against the fixed target (student side detached in p_t)
    x = s.clone().requires_grad_()
    taid_per_token(x, t, t=0.4).sum().backward()
    target = taid_target_logprobs(s, t, 0.4).exp()
    torch.testing.assert_close(x.grad, torch.softmax(s, -1) - target)


def reference_taid(losses, total, *, t_start=0.4, t_end=1.0, alpha=5e-4, beta=0.99, adaptive=True):
    """TAID's `update_t` written out with numpy, one call per (1-based) step."""
    t, m, prev, out = t_start, 0.0, None, []
    for step, loss in enumerate(losses, 1):
        t_lin = t_start + (t_end - t_start) * step / total
        if not adaptive:
            t = t_lin
        elif prev is not None:  # the first call only records the loss
            m = beta * m + (1 - beta) * (prev - loss) / (prev + 1e-15)
            t = min(t_end, max(t_lin, t + alpha / (1 + np.exp(-m)) * (1 - t)))
        prev = loss
        out.append(t)
    return out


def test_taid_schedule_by_hand():
    sched = TAIDSchedule(total_steps=10, alpha=0.5, beta=0.5)  # a large step so the adaptive part shows
    assert sched.update(1, 2.0) == 0.4  # first call: records the loss only
    assert sched.prev_loss == 2.0 and sched.momentum == 0.0
    # δ = (2 − 1)/2 = 0.5, m = 0.25, Δ = 0.5·σ(0.25)·0.6 = 0.1686...; t_lin(2) = 0.52 < 0.4 + Δ
    t2 = 0.4 + 0.5 / (1 + np.exp(-0.25)) * 0.6
    assert sched.update(2, 1.0) == pytest.approx(t2, abs=1e-12)
    assert sched.momentum == pytest.approx(0.25)
    # a rising loss: δ = (1 − 4)/1 = −3, m = 0.125 − 1.5 = −1.375, a smaller but still positive step
    t3 = max(0.4 + 0.6 * 0.3, t2 + 0.5 / (1 + np.exp(1.375)) * (1 - t2))
    assert sched.update(3, 4.0) == pytest.approx(t3, abs=1e-12)


def test_taid_schedule_matches_reference_update():
    rng = np.random.default_rng(0)
    losses = list(5.0 - 0.03 * np.arange(60) + 0.5 * rng.random(60))
    for kwargs in ({}, {"alpha": 0.05, "beta": 0.9}, {"t_start": 0.2, "t_end": 0.8}, {"adaptive": False}):
        sched = TAIDSchedule(total_steps=60, **kwargs)
        got = [sched.update(step, loss) for step, loss in enumerate(losses, 1)]
        np.testing.assert_allclose(got, reference_taid(losses, 60, **kwargs), rtol=0, atol=1e-12)
    off = TAIDSchedule(total_steps=4, adaptive=False)
    assert [off.update(s, 1.0 / s) for s in range(1, 5)] == pytest.approx([0.55, 0.7, 0.85, 1.0])
    assert off.momentum == 0.0  # t follows t_lin only, from the very first call


def test_taid_schedule_monotone_and_capped():
    rng = np.random.default_rng(1)
    for t_end, alpha in ((1.0, 5e-4), (0.9, 0.3), (0.7, 1.0)):
        sched = TAIDSchedule(total_steps=200, t_end=t_end, alpha=alpha)
        losses = np.exp(rng.normal(0.0, 1.5, 300))  # noisy, often rising: momentum goes both ways
        ts = [sched.update(step, loss) for step, loss in enumerate(losses, 1)]  # runs past total_steps too
        assert all(b >= a for a, b in itertools.pairwise(ts)) and max(ts) <= t_end
        assert ts[-1] == pytest.approx(t_end)
    # an extreme momentum (a loss jump after a near-zero loss) must not overflow the sigmoid
    sched = TAIDSchedule(10)
    sched.update(1, 1e-12)
    assert 0.4 <= sched.update(2, 1e6) <= 1.0


def test_taid_schedule_skips_non_finite_and_resumes_exactly():
    sched = TAIDSchedule(10)
    assert sched.update(1, float("nan")) == 0.4 and sched.prev_loss is None  # still before the first call
    assert sched.update(2, float("inf")) == 0.4
    assert sched.update(3, 2.0) == 0.4  # this is the first real call
    a, b = TAIDSchedule(50), TAIDSchedule(50)
    b.update(1, 9.0)
    b.load_state_dict(TAIDSchedule(50).state_dict())  # a fresh state: the next call is again the first
    assert b.prev_loss is None and b.update(1, 5.0) == 0.4
    for step in range(2, 10):
        a.update(step, 3.0 / step)
    b.load_state_dict(a.state_dict())
    assert [a.update(s, 0.2 / s) for s in range(10, 15)] == [b.update(s, 0.2 / s) for s in range(10, 15)]
    c = TAIDSchedule(50)
    c.load_state_dict(TAIDSchedule(50, adaptive=False).state_dict())
    assert not c.adaptive


# ---- objective ---------------------------------------------------------------------------------


def batch_and_signal(seed=2):
    s, t = pair(seed)
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 13, (2, 4), generator=g)
    mask = torch.tensor([[True, True, True, False], [True, True, False, False]])
    return s, {"target_ids": targets, "mask": mask}, {"teacher_logits": t}


def test_weighted_sum_and_logged_terms():
    s, batch, sig = batch_and_signal()
    obj = build_objective(
        [
            {"name": "forward_kl", "weight": 0.7, "params": {"temperature": 2.0}},
            {"name": "ce", "weight": 0.3},
            {"name": "jsd", "weight": 1.0, "params": {"beta": 0.1}},
        ]
    )
    loss, logs = obj(s, batch, sig)
    fkl = masked_mean(D.forward_kl(s, sig["teacher_logits"], temperature=2.0), batch["mask"])
    ce = torch.nn.functional.cross_entropy(s[batch["mask"]], batch["target_ids"][batch["mask"]])
    j = masked_mean(D.jsd(s, sig["teacher_logits"], beta=0.1), batch["mask"])
    torch.testing.assert_close(loss, 0.7 * fkl + 0.3 * ce + j)
    assert set(logs) == {"forward_kl", "ce", "jsd", "loss"}
    torch.testing.assert_close(logs["ce"], ce)


def test_xkd_term_logs_subterms_and_needs_reward_head():
    s, batch, sig = batch_and_signal()
    obj = build_objective([Term("xkd", 1.0, {"divergence": "tvd", "lambda_td": 0.5})])
    with pytest.raises(KeyError, match="reward_mu"):
        obj(s, batch, sig)
    batch = {**batch, "reward_mu": torch.zeros(2, 4), "reward_log_sigma": torch.zeros(2, 4)}
    loss, logs = obj(s, batch, sig)
    assert {"xkd", "xkd/imitation", "xkd/td_nll", "xkd/prior_kl", "xkd/reward_mu", "loss"} <= set(logs)
    torch.testing.assert_close(loss, logs["xkd/imitation"] + 0.5 * logs["xkd/td_nll"] + logs["xkd/prior_kl"])


def test_taid_runtime_t_and_sparse_refusal():
    s, batch, sig = batch_and_signal()
    obj = build_objective([Term("taid")])
    loss0, _ = obj(s, batch, sig, runtime={"taid": {"t": 0.0}})
    assert loss0.abs() < 1e-6
    loss1, logs = obj(s, batch, sig, runtime={"taid": {"t": 1.0}})
    torch.testing.assert_close(loss1, masked_mean(D.forward_kl(s, sig["teacher_logits"]), batch["mask"]))
    assert logs["taid/t"].item() == 1.0
    sparse = {
        "topk_ids": torch.zeros(2, 4, 3, dtype=torch.int32),
        "topk_logprobs": torch.full((2, 4, 3), -1.0),
    }
    with pytest.raises(ValueError, match="top_k: null"):
        obj(s, batch, sparse)
    # a full-vocabulary "top-k" (what a teacher with top_k: null serves) is the dense signal in disguise
    lp = torch.log_softmax(sig["teacher_logits"], -1)
    order = torch.randperm(13, generator=torch.Generator().manual_seed(0))
    full = {"topk_ids": order.expand(2, 4, 13).int(), "topk_logprobs": lp[..., order]}
    for t in (0.3, 1.0):
        got = obj(s, batch, full, runtime={"taid": {"t": t}})[0]
        torch.testing.assert_close(got, obj(s, batch, sig, runtime={"taid": {"t": t}})[0])


def test_sparse_signal_goes_through_same_terms():
    s, batch, sig = batch_and_signal()
    lp = torch.log_softmax(sig["teacher_logits"], -1)
    full = {
        "topk_ids": lp.argsort(-1, descending=True).int(),
        "topk_logprobs": lp.sort(-1, descending=True).values,
    }
    obj = build_objective([Term("reverse_kl")])
    torch.testing.assert_close(obj(s, batch, full)[0], obj(s, batch, sig)[0], rtol=1e-5, atol=1e-6)


def test_duplicate_terms_get_distinct_labels():
    s, batch, sig = batch_and_signal()
    obj = build_objective([Term("forward_kl"), Term("forward_kl", 0.5, {"temperature": 2.0})])
    _, logs = obj(s, batch, sig)
    assert {"forward_kl", "forward_kl#2"} <= set(logs)


def test_builder_errors_name_the_problem():
    with pytest.raises(ValueError, match="did you mean 'forward_kl'"):
        build_objective([Term("forward_kll")])
    with pytest.raises(ValueError, match=r"no parameter.*'betta'"):
        build_objective([Term("jsd", 1.0, {"betta": 0.5})])
    with pytest.raises(ValueError, match="weight=-1"):
        build_objective([Term("ce", -1.0)])
    with pytest.raises(ValueError, match="at least one"):
        build_objective([])
    s, batch, _ = batch_and_signal()
    with pytest.raises(ValueError, match="needs a teacher signal"):
        build_objective([Term("forward_kl")])(s, batch, None)


def test_registry_covers_every_divergence_and_method_term():
    method_terms = {"ce", "xkd", "taid", "minillm", "ava_pref", "pad", "uld", "gold"}
    assert set(D.DIVERGENCES) | method_terms == set(LOSSES)


def test_needs_teacher():
    assert not build_objective([Term("ce")]).needs_teacher
    assert not build_objective([Term("xkd", 1.0, {"variant": "sequence"})]).needs_teacher
    assert build_objective([Term("ce"), Term("forward_kl")]).needs_teacher
