"""X-KD terms (METHODS.md §3): TD residual, Gaussian NLL, prior KL, both imitation variants, q_form."""

from __future__ import annotations

import math

import pytest
import torch

from kdray.losses import divergences as D
from kdray.losses.reduce import masked_mean
from kdray.losses.xkd import gaussian_nll, prior_kl, q_values, td_residual, xkd_loss
from kdray.models import RewardHead


def make(B=2, T=5, V=11, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype)
    teacher = torch.randn(B, T, V, generator=g, dtype=dtype)
    targets = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False  # a shorter second response, right-padded
    mu = torch.randn(B, T, generator=g, dtype=dtype) * 0.5
    log_sigma = torch.randn(B, T, generator=g, dtype=dtype) * 0.3
    return logits, teacher, targets, mask, mu, log_sigma


def test_td_residual_by_hand():
    q = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    got = td_residual(q, mask, gamma=0.5)
    # the last counted token of each row sees Q := 0 after it
    want = torch.tensor([[1 - 1.0, 2 - 1.5, 3 - 2.0, 4.0], [5 - 3.0, 6.0, 7.0, 8.0]])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("terminal", ["drop", "zero"])
def test_td_nll_equals_gaussian_formula_by_hand(terminal):
    logits, _, targets, mask, mu, log_sigma = make()
    gamma = 0.9
    _, terms = xkd_loss(
        logits, targets, mask, mu, log_sigma, variant="sequence", gamma=gamma, terminal=terminal
    )
    # by hand, loops and math only; `drop` forms pairs only where a next step exists (AVRIL's load_data),
    # `zero` scores the last token against Q := 0; both divide by the counted tokens
    total, count = 0.0, int(mask.sum())
    for b in range(logits.shape[0]):
        idx = [t for t in range(logits.shape[1]) if mask[b, t]]
        for i, t in enumerate(idx):
            if terminal == "drop" and i + 1 == len(idx):
                continue
            q_t = logits[b, t, targets[b, t]].item()
            q_next = logits[b, idx[i + 1], targets[b, idx[i + 1]]].item() if i + 1 < len(idx) else 0.0
            delta = q_t - gamma * q_next
            m, s = mu[b, t].item(), math.exp(log_sigma[b, t].item())
            total += 0.5 * math.log(2 * math.pi) + math.log(s) + (delta - m) ** 2 / (2 * s * s)
    assert terms["td_nll"].item() == pytest.approx(total / count, rel=1e-5)


def test_gaussian_nll_matches_torch_distribution():
    d, m, ls = torch.randn(20), torch.randn(20), torch.randn(20)
    ref = -torch.distributions.Normal(m, ls.exp()).log_prob(d)
    torch.testing.assert_close(gaussian_nll(d, m, ls), ref)


def test_prior_kl_zero_at_standard_normal_and_matches_torch():
    assert prior_kl(torch.zeros(3), torch.zeros(3)).abs().max() == 0.0
    m, ls = torch.randn(10), torch.randn(10)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m, ls.exp()), torch.distributions.Normal(0, 1)
    )
    torch.testing.assert_close(prior_kl(m, ls), ref)


def test_q_form_logprobs_gives_logprob_td():
    logits, _, targets, mask, *_ = make()
    q = q_values(logits, targets, q_form="logprobs")
    logq = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(q, logq)
    torch.testing.assert_close(td_residual(q, mask), td_residual(logq, mask))
    # the logits gauge differs by the per-state logsumexp, so the residuals differ
    assert not torch.allclose(q_values(logits, targets, q_form="logits"), q)


def test_tau_q_scales_logit_q():
    logits, _, targets, *_ = make()
    torch.testing.assert_close(q_values(logits, targets, tau_q=2.0), q_values(logits, targets) / 2.0)


def test_total_is_weighted_sum_of_terms_and_variants():
    logits, teacher, targets, mask, mu, ls = make()
    sig = {"teacher_logits": teacher}
    total, terms = xkd_loss(logits, targets, mask, mu, ls, teacher_signal=sig, lambda_td=0.3, lambda_kl=2.0)
    torch.testing.assert_close(total, terms["imitation"] + 0.3 * terms["td_nll"] + 2.0 * terms["prior_kl"])
    torch.testing.assert_close(terms["imitation"], masked_mean(D.forward_kl(logits, teacher), mask))
    _, seq = xkd_loss(logits, targets, mask, mu, ls, variant="sequence")
    ce = torch.nn.functional.cross_entropy(logits[mask], targets[mask])
    torch.testing.assert_close(seq["imitation"], ce)
    _, j = xkd_loss(logits, targets, mask, mu, ls, teacher_signal=sig, divergence="jsd", beta=0.2)
    torch.testing.assert_close(j["imitation"], masked_mean(D.jsd(logits, teacher, beta=0.2), mask))


def test_gradients_reach_student_logits_and_reward_head():
    logits, _, targets, mask, *_ = make()
    hidden = torch.randn(2, 5, 8)
    head = RewardHead(8)
    logits = logits.requires_grad_()
    mu, ls = head(hidden)
    # sequence variant: only the TD term ties logits to the head, so logits' gradient must come from it too
    total, _ = xkd_loss(logits, targets, mask, mu, ls, variant="sequence", lambda_kl=1.0)
    total.backward()
    assert logits.grad.abs().sum() > 0
    assert head.proj.weight.grad.abs().sum() > 0 and head.proj.bias.grad.abs().sum() > 0
    # TD term alone: Q is not detached, so the TD-NLL moves the logits as well as the head
    logits.grad = None
    mu, ls = head(hidden)
    q = q_values(logits, targets)
    masked_mean(gaussian_nll(td_residual(q, mask), mu, ls), mask).backward()
    assert logits.grad.abs().sum() > 0


def test_log_sigma_unclamped_by_default_clamped_on_request_and_detach_option():
    head = RewardHead(4)
    with torch.no_grad():
        head.proj.bias.copy_(torch.tensor([0.0, 50.0]))
    _, ls = head(torch.zeros(1, 2, 4))
    assert ls.max().item() == 50.0  # AVRIL's encoder does not clamp log σ
    logits, _, targets, mask, mu, _ = make()
    big = torch.full_like(mu, 50.0)
    _, free = xkd_loss(logits, targets, mask, mu, big, variant="sequence")
    _, clamped = xkd_loss(logits, targets, mask, mu, big, variant="sequence", log_sigma_max=5.0)
    _, at5 = xkd_loss(logits, targets, mask, mu, torch.full_like(mu, 5.0), variant="sequence")
    assert free["prior_kl"] > 1e6 and clamped["prior_kl"].item() == pytest.approx(at5["prior_kl"].item())
    h = torch.randn(1, 2, 4, requires_grad=True)
    RewardHead(4, detach_input=True)(h)[0].sum().backward()
    assert h.grad is None


def test_all_masked_is_zero():
    logits, teacher, targets, _, mu, ls = make()
    mask = torch.zeros(2, 5, dtype=torch.bool)
    total, terms = xkd_loss(logits, targets, mask, mu, ls, teacher_signal={"teacher_logits": teacher})
    assert total.item() == 0.0 and all(torch.isfinite(v) for v in terms.values())


def test_chunked_equals_unchunked():
    logits, teacher, targets, mask, mu, ls = make(T=9)
    sig = {"teacher_logits": teacher}
    a, ta = xkd_loss(logits, targets, mask, mu, ls, teacher_signal=sig)
    b, tb = xkd_loss(logits, targets, mask, mu, ls, teacher_signal=sig, chunk_size=2)
    torch.testing.assert_close(a, b)
    for name in ta:
        torch.testing.assert_close(ta[name], tb[name])


@pytest.mark.parametrize("variant", ["sequence", "divergence"])
@pytest.mark.parametrize("q_form", ["logits", "logprobs"])
def test_gradcheck_float64(variant, q_form):
    logits, teacher, targets, mask, mu, ls = make(B=2, T=3, V=5, dtype=torch.float64)
    inputs = tuple(x.requires_grad_() for x in (logits, mu, ls))

    def f(z, m, s):
        return xkd_loss(
            z,
            targets,
            mask,
            m,
            s,
            teacher_signal={"teacher_logits": teacher},
            variant=variant,
            q_form=q_form,
            gamma=0.8,
        )[0]

    assert torch.autograd.gradcheck(f, inputs)


def test_divergence_variant_without_teacher_is_explained():
    logits, _, targets, mask, mu, ls = make()
    with pytest.raises(ValueError, match="needs a teacher signal"):
        xkd_loss(logits, targets, mask, mu, ls)
