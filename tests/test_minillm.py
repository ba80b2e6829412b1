"""MiniLLM: returns by hand, the policy-gradient estimator, clipping, importance weights, whitening,
sparse signals and several PPO epochs on one rollout (values vs numpy: test_minillm_reference.py)."""

from __future__ import annotations

import inspect

import pytest
import torch

from kdray.losses import divergences as D
from kdray.losses import minillm as M
from kdray.losses.minillm import future_returns, minillm_loss, whiten_advantages
from kdray.losses.reduce import masked_mean


def test_future_returns_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[True, True, True, False]])
    # R_t includes r_t (the reference's return); the uncounted last reward is dropped
    torch.testing.assert_close(
        future_returns(r, mask, gamma=1.0, normalise=False), torch.tensor([[6.0, 5.0, 3.0, 0.0]])
    )
    # ÷ L_t = counted tokens from t to the end inclusive (1 where there are none)
    torch.testing.assert_close(future_returns(r, mask, gamma=1.0), torch.tensor([[2.0, 2.5, 3.0, 0.0]]))
    torch.testing.assert_close(
        future_returns(r, mask, gamma=0.5, normalise=False),
        torch.tensor([[1 + 0.5 * 2 + 0.25 * 3, 2 + 0.5 * 3, 3.0, 0.0]]),
    )
    # a hole in the mask: the uncounted position still sees the counted tokens after it
    hole = torch.tensor([[True, False, True, True]])
    torch.testing.assert_close(future_returns(r, hole, gamma=1.0), torch.tensor([[8 / 3, 7 / 2, 7 / 2, 4.0]]))


def setup(seed=0, B=3, T=5, V=9):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g)
    teacher = torch.randn(B, T, V, generator=g)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[-1, 3:] = False
    old = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    tlp = torch.log_softmax(teacher, -1)
    signal = {"teacher_logits": teacher, "token_logprobs": tlp.gather(-1, targets[..., None]).squeeze(-1)}
    return logits, targets, mask, signal, old


def advantages_by_hand(signal, old, mask, whiten=True, scaling=0.5, gamma=0.95):
    rewards = ((signal["token_logprobs"] - old) / scaling).clamp(-100, 100)
    adv = future_returns(rewards, mask, gamma=gamma)
    if whiten:  # population mean / variance over counted tokens
        mean, var = adv[mask].mean(), adv[mask].var(unbiased=False)
        adv = (adv - mean) / torch.sqrt(var + 1e-8)
    return adv


@pytest.mark.parametrize("whiten", [False, True])
def test_on_policy_gradient_is_reinforce_plus_single_step(whiten):
    logits, targets, mask, signal, old = setup()
    x = logits.clone().requires_grad_()
    loss, terms = minillm_loss(x, targets, mask, signal, old, whiten=whiten)
    loss.backward()
    # at ratio 1 the clipped surrogate's gradient is −A_t ∇log q(y_t) (REINFORCE with the return R_t)
    y = logits.clone().requires_grad_()
    logq = torch.log_softmax(y, -1).gather(-1, targets[..., None]).squeeze(-1)
    adv = advantages_by_hand(signal, old, mask, whiten=whiten)
    ref = masked_mean(-adv * logq, mask) + masked_mean(D.reverse_kl(y, signal["teacher_logits"]), mask)
    ref.backward()
    torch.testing.assert_close(x.grad, y.grad)
    assert terms["clip_fraction"] == 0.0
    torch.testing.assert_close(terms["ratio_mean"], torch.tensor(1.0))
    torch.testing.assert_close(terms["reward"], masked_mean((signal["token_logprobs"] - old) / 0.5, mask))


def test_clipping_stops_gradient_outside_trust_region():
    logits, targets, mask, signal, old = setup(1)
    far_old = old - 1.0  # the current policy is e^1 ≈ 2.7x the sampling policy: outside the 0.2 clip
    x = logits.clone().requires_grad_()
    _, terms = minillm_loss(x, targets, mask, signal, far_old, single_step=False)
    assert terms["clip_fraction"] == 1.0
    minillm_loss(x, targets, mask, signal, far_old, single_step=False)[0].backward()
    # positive advantage with ratio > 1+clip: the max picks the clipped constant -> no gradient there
    adv = advantages_by_hand(signal, far_old, mask)
    pos, neg = (adv > 0) & mask, (adv < 0) & mask
    assert pos.any() and neg.any()
    token_grad = x.grad.abs().sum(-1)
    assert (token_grad[pos] == 0).all()
    assert (token_grad[neg] > 0).all()  # negative advantage: the unclipped ratio still pushes down


def test_importance_weight_is_applied_inside_the_clip():
    logits, targets, mask, signal, old = setup(2)
    _, plain = minillm_loss(logits, targets, mask, signal, old)
    # w = q_old / mix = 1.1 everywhere, inside the trust region: the long-term part scales by 1.1
    _, inside = minillm_loss(logits, targets, mask, signal, old, mix_logprobs=old - torch.tensor(1.1).log())
    torch.testing.assert_close(inside["long_term"], 1.1 * plain["long_term"])
    # the single-step part carries no importance weight (reference `_reg_loss`)
    torch.testing.assert_close(inside["single_step"], plain["single_step"])
    # w = 2 at ratio 1: ratio = 2 is clipped to 1.2 where A > 0 (the max of −2A and −1.2A is −1.2A)
    _, outside = minillm_loss(logits, targets, mask, signal, old, mix_logprobs=old - torch.tensor(2.0).log())
    adv = advantages_by_hand(signal, old, mask)
    expected = masked_mean(torch.where(adv > 0, -1.2 * adv, -2.0 * adv), mask)
    torch.testing.assert_close(outside["long_term"], expected)
    assert outside["clip_fraction"] == 1.0
    torch.testing.assert_close(outside["ratio_mean"], torch.tensor(2.0))


def test_reward_scaling_and_clip():
    logits, targets, mask, signal, old = setup(4)
    _, terms = minillm_loss(logits, targets, mask, signal, old, reward_scaling=0.25, reward_clip=1.0)
    expected = ((signal["token_logprobs"] - old) / 0.25).clamp(-1.0, 1.0)
    torch.testing.assert_close(terms["reward"], masked_mean(expected, mask))
    # whitening cancels a common reward scale as long as the reward clip does not bind
    a = minillm_loss(logits, targets, mask, signal, old, reward_scaling=0.5)[1]["long_term"]
    b = minillm_loss(logits, targets, mask, signal, old, reward_scaling=2.0)[1]["long_term"]
    torch.testing.assert_close(a, b)


def test_whiten_padding_is_the_reference_quirk():
    logits, targets, mask, signal, old = setup(5)
    counted = minillm_loss(logits, targets, mask, signal, old)[1]["long_term"]
    quirk = minillm_loss(logits, targets, mask, signal, old, whiten_padding=True)[1]["long_term"]
    assert not torch.isclose(counted, quirk)  # padding zeros shift μ and var
    full = torch.ones_like(mask)
    torch.testing.assert_close(
        minillm_loss(logits, targets, full, signal, old)[1]["long_term"],
        minillm_loss(logits, targets, full, signal, old, whiten_padding=True)[1]["long_term"],
    )


def test_whitening_statistics_are_global_under_distributed(monkeypatch):
    # two "ranks": this one holds `mine`, the other `theirs`; a fake all-reduce adds the other's
    # float64 (sum, sum of squares, count), so whitening must equal whitening of both together
    g = torch.Generator().manual_seed(6)
    mine, theirs = torch.randn(2, 4, generator=g), 3 + 2 * torch.randn(3, 4, generator=g)
    mask_mine, mask_theirs = torch.rand(2, 4, generator=g) > 0.3, torch.rand(3, 4, generator=g) > 0.3
    other = torch.stack(
        [
            theirs[mask_theirs].double().sum(),
            theirs[mask_theirs].double().pow(2).sum(),
            mask_theirs.sum().double(),
        ]
    )
    calls = []

    def all_reduce(t):
        assert t.dtype == torch.float64
        calls.append(t.clone())
        t += other

    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    got = whiten_advantages(mine, mask_mine)
    both = torch.cat([mine[mask_mine], theirs[mask_theirs]])
    expected = (mine - both.mean()) / torch.sqrt(both.var(unbiased=False) + M.WHITEN_EPS)
    assert len(calls) == 1
    torch.testing.assert_close(got[mask_mine], expected[mask_mine])


def test_sparse_signal():
    logits, targets, mask, signal, old = setup(7)
    V = logits.shape[-1]
    # a top-k signal with k = V is the dense signal
    lp, ids = torch.log_softmax(signal["teacher_logits"], -1).topk(V, -1)
    full = {"topk_ids": ids, "topk_logprobs": lp, "token_logprobs": signal["token_logprobs"]}
    dense_loss, dense = minillm_loss(logits, targets, mask, signal, old)
    sparse_loss, _ = minillm_loss(logits, targets, mask, full, old)
    torch.testing.assert_close(sparse_loss, dense_loss)
    # a true top-k only changes the single-step part (a lower bound of the full reverse KL)
    lp3, ids3 = lp[..., :3], ids[..., :3]
    _, top3 = minillm_loss(logits, targets, mask, {**full, "topk_ids": ids3, "topk_logprobs": lp3}, old)
    torch.testing.assert_close(top3["long_term"], dense["long_term"])
    assert top3["single_step"] < dense["single_step"]


def test_needs_teacher_token_logprobs():
    logits, targets, mask, signal, old = setup()
    with pytest.raises(KeyError, match="token_logprobs"):
        minillm_loss(logits, targets, mask, {"teacher_logits": signal["teacher_logits"]}, old)


def test_keyword_only_knobs_with_reference_defaults():
    # objective.py exposes the keyword-only parameters to configs: no `baseline`, the paper's defaults
    params = inspect.signature(minillm_loss).parameters
    knobs = {n: p.default for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert knobs == {
        "mix_logprobs": None,
        "clip": 0.2,
        "gamma": 0.95,
        "reward_scaling": 0.5,
        "reward_clip": 100.0,
        "length_normalise": True,
        "whiten": True,
        "whiten_padding": False,
        "single_step": True,
        "num_tokens": None,
        "chunk_size": None,
    }


def test_bf16_logits_compute_in_float32():
    logits, targets, mask, signal, old = setup(8)
    loss, terms = minillm_loss(logits.bfloat16(), targets, mask, signal, old)
    assert loss.dtype == torch.float32 and terms["long_term"].dtype == torch.float32


def test_ppo_epochs_on_one_rollout_make_the_clip_bind():
    # several optimiser steps on one fixed rollout: the first sees ratio 1 (nothing clipped), later
    # ones have moved the policy past 1 ± clip, which is what the clip is there to stop
    torch.manual_seed(0)
    B, T, V = 4, 6, 8
    logits = torch.nn.Parameter(torch.randn(B, T, V))
    teacher = torch.randn(B, T, V) * 2
    with torch.no_grad():
        targets = torch.distributions.Categorical(logits=logits).sample()  # a student rollout
        old = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)  # fixed
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 4:] = False
    signal = {
        "teacher_logits": teacher,
        "token_logprobs": torch.log_softmax(teacher, -1).gather(-1, targets[..., None]).squeeze(-1),
    }
    opt = torch.optim.Adam([logits], lr=0.5)
    fractions = []
    for _ in range(4):
        loss, terms = minillm_loss(logits, targets, mask, signal, old)
        fractions.append(terms["clip_fraction"].item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert fractions[0] == 0.0
    assert max(fractions[1:]) > 0.0, fractions


def test_gradcheck_float64():
    logits, targets, mask, signal, old = setup(3, B=2, T=4, V=4)
    signal = {k: v.double() for k, v in signal.items()}
    x = logits.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: minillm_loss(z, targets, mask, signal, old.double())[0], (x,))
