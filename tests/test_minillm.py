"""MiniLLM: future returns by hand, the policy-gradient estimator, clipping, importance weights."""

from __future__ import annotations

import pytest
import torch

from kdray.losses import divergences as D
from kdray.losses.minillm import future_returns, minillm_loss
from kdray.losses.reduce import masked_mean


def test_future_returns_by_hand():
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    mask = torch.tensor([[True, True, True, False]])
    # R_{t+1}: future counted rewards after t; normalised by how many there are
    torch.testing.assert_close(future_returns(r, mask, normalise=False), torch.tensor([[5.0, 3.0, 0.0, 0.0]]))
    torch.testing.assert_close(future_returns(r, mask), torch.tensor([[2.5, 3.0, 0.0, 0.0]]))
    torch.testing.assert_close(
        future_returns(r, mask, gamma=0.5, normalise=False), torch.tensor([[2 + 0.5 * 3, 3.0, 0.0, 0.0]])
    )


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


@pytest.mark.parametrize("baseline", [False, True])
def test_on_policy_gradient_is_reinforce_plus_single_step(baseline):
    logits, targets, mask, signal, old = setup()
    x = logits.clone().requires_grad_()
    loss, terms = minillm_loss(x, targets, mask, signal, old, baseline=baseline)
    loss.backward()
    # reference: at ratio 1 the clipped surrogate's gradient is −A_t ∇log q(y_t) (REINFORCE with R_{t+1})
    y = logits.clone().requires_grad_()
    logq = torch.log_softmax(y, -1).gather(-1, targets[..., None]).squeeze(-1)
    adv = future_returns(signal["token_logprobs"] - old, mask)
    if baseline:  # the batch-mean return subtracted
        adv = adv - adv[mask].mean()
    ref = masked_mean(-adv * logq, mask) + masked_mean(D.reverse_kl(y, signal["teacher_logits"]), mask)
    ref.backward()
    torch.testing.assert_close(x.grad, y.grad)
    assert terms["clip_fraction"] == 0.0
    torch.testing.assert_close(terms["reward"], masked_mean(signal["token_logprobs"] - old, mask))


def test_clipping_stops_gradient_outside_trust_region():
    logits, targets, mask, signal, old = setup(1)
    far_old = old - 1.0  # the current policy is e^1 ≈ 2.7x the sampling policy: outside the 0.2 clip
    x = logits.clone().requires_grad_()
    _, terms = minillm_loss(x, targets, mask, signal, far_old, single_step=False, baseline=False)
    adv = future_returns(signal["token_logprobs"] - far_old, mask)
    assert terms["clip_fraction"] == 1.0
    x2 = logits.clone().requires_grad_()
    minillm_loss(x2, targets, mask, signal, far_old, single_step=False, baseline=False)[0].backward()
    # positive advantage with ratio > 1+clip: the min picks the clipped constant -> no gradient there
    pos = (adv > 0) & mask
    assert pos.any()
    token_grad = x2.grad.abs().sum(-1)
    assert (token_grad[pos] == 0).all()


def test_importance_weights_scale_the_terms():
    logits, targets, mask, signal, old = setup(2)
    _, plain = minillm_loss(logits, targets, mask, signal, old)
    _, mixed = minillm_loss(
        logits, targets, mask, signal, old, mix_logprobs=old - torch.log(torch.tensor(2.0))
    )
    # q_old / mix = 2 everywhere: every weighted term doubles
    torch.testing.assert_close(mixed["single_step"], 2 * plain["single_step"])
    torch.testing.assert_close(mixed["long_term"], 2 * plain["long_term"])


def test_needs_teacher_token_logprobs():
    logits, targets, mask, signal, old = setup()
    with pytest.raises(KeyError, match="token_logprobs"):
        minillm_loss(logits, targets, mask, {"teacher_logits": signal["teacher_logits"]}, old)


def test_gradcheck_float64():
    logits, targets, mask, signal, old = setup(3, B=2, T=4, V=4)
    signal = {k: v.double() for k, v in signal.items()}
    x = logits.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: minillm_loss(z, targets, mask, signal, old.double())[0], (x,))
