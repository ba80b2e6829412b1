"""X-KD: experiential knowledge distillation, AVRIL applied to distillation (METHODS.md §3).

The student's logits are a soft Q-function, Q(s, a) = z(s)[a] / τ_Q, and its policy is softmax(Q). A
reward head on the final hidden state gives a Gaussian posterior N(μ_t, σ_t²) over the teacher's
per-token reward. On the realized tokens y of a demonstration, the TD residual
δ_t = Q(s_t, y_t) − γ·Q(s_{t+1}, y_{t+1}) (pairs only where a next step exists, as AVRIL's code builds
them; `terminal="zero"` sets Q := 0 after the last token instead) must be likely under that
posterior (TD negative log-likelihood), the posterior stays close to the N(0, 1) prior (KL), and the
policy imitates the teacher (cross-entropy on the demonstration, or a divergence to the teacher).

    L = imitation + λ_td · TD-NLL + λ_kl · KL(N(μ, σ²) ‖ N(0, 1))

Q is *not* detached in the TD term: that is the consistency regulariser tying policy and reward
(Chan & van der Schaar 2021, AVRIL; γ = 1 and unit weights as in its reference code).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch

from kdray.losses.divergences import loss_dtype
from kdray.losses.reduce import chunked_per_token, masked_mean
from kdray.losses.signal import teacher_divergence, token_cross_entropy
from kdray.losses.sparse import SparseMode

Tensor = torch.Tensor
QForm = Literal["logits", "logprobs"]
Variant = Literal["sequence", "divergence"]
Terminal = Literal["drop", "zero"]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


def _q_taken(student_logits: Tensor, target_ids: Tensor, q_form: QForm, tau_q: float) -> Tensor:
    z = student_logits.to(loss_dtype(student_logits)) / tau_q
    targets = target_ids.long().clamp(0, z.shape[-1] - 1).unsqueeze(-1)
    q = z.gather(-1, targets).squeeze(-1)
    if q_form == "logprobs":
        q = q - torch.logsumexp(z, dim=-1)
    return q


def q_values(
    student_logits: Tensor,
    target_ids: Tensor,
    *,
    q_form: QForm = "logits",
    tau_q: float = 1.0,
    chunk_size: int | None = None,
) -> Tensor:
    """Q(s_t, y_t) of the realized tokens, (B, T, V) + (B, T) -> (B, T).

    `logits`: Q = z / τ_Q (softmax ignores a per-state shift, the TD residual does not: the gauge is a
    modelling choice). `logprobs`: Q = log_softmax(z / τ_Q), so δ_t = log q(y_t|s_t) − γ log q(y_{t+1}|s_{t+1}).
    """
    if q_form not in ("logits", "logprobs"):
        raise ValueError(f"q_form={q_form!r} is not one of 'logits', 'logprobs'")
    if not tau_q > 0:
        raise ValueError(f"tau_q={tau_q!r} must be positive")
    return chunked_per_token(_q_taken, student_logits, target_ids, q_form, tau_q, chunk_size=chunk_size)


def td_residual(q_taken: Tensor, mask: Tensor, *, gamma: float = 1.0) -> Tensor:
    """δ_t = Q_t − γ·Q_{t+1}, where Q_{t+1} := 0 past the last counted token of each row, (B, T) -> (B, T).

    The next position counts only if it is itself a response token, so right padding and the end of
    the response (EOS) both end the episode.
    """
    mask = mask.bool()
    next_q = torch.where(mask[:, 1:], q_taken[:, 1:], q_taken.new_zeros(()))
    next_q = torch.cat([next_q, torch.zeros_like(q_taken[:, :1])], dim=1)
    return q_taken - gamma * next_q


def td_pairs(mask: Tensor, terminal: Terminal = "drop") -> Tensor:
    """(B, T) mask of the positions that form a TD pair (s_t, a_t, s_{t+1}, a_{t+1}).

    `drop` (AVRIL's code, `load_data`): only where the next position is a counted token too, so the last
    token of a response is never a current state. `zero`: every counted token, Q := 0 after the last.
    """
    mask = mask.bool()
    if terminal == "zero":
        return mask
    if terminal != "drop":
        raise ValueError(f"xkd terminal={terminal!r} is not one of 'drop', 'zero'")
    has_next = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], dim=1)
    return mask & has_next


def gaussian_nll(residual: Tensor, mu: Tensor, log_sigma: Tensor) -> Tensor:
    """−log N(δ; μ, σ²) = ½ log 2π + log σ + (δ − μ)² / (2σ²), elementwise."""
    return _HALF_LOG_2PI + log_sigma + 0.5 * ((residual - mu) * torch.exp(-log_sigma)) ** 2


def prior_kl(mu: Tensor, log_sigma: Tensor) -> Tensor:
    """KL(N(μ, σ²) ‖ N(0, 1)) = ½(μ² + σ² − 1 − 2 log σ), elementwise."""
    return 0.5 * (mu**2 + torch.exp(2.0 * log_sigma) - 1.0) - log_sigma


def xkd_loss(
    student_logits: Tensor,
    target_ids: Tensor,
    mask: Tensor,
    reward_mu: Tensor,
    reward_log_sigma: Tensor,
    *,
    teacher_signal: Mapping[str, Tensor] | None = None,
    variant: Variant = "divergence",
    divergence: str = "forward_kl",
    temperature: float = 1.0,
    sparse_mode: SparseMode = "tail",
    q_form: QForm = "logits",
    tau_q: float = 1.0,
    gamma: float = 1.0,
    lambda_td: float = 1.0,
    lambda_kl: float = 1.0,
    terminal: Terminal = "drop",
    log_sigma_min: float | None = None,
    log_sigma_max: float | None = None,
    num_tokens: int | Tensor | None = None,
    chunk_size: int | None = None,
    **divergence_params: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The X-KD objective and its terms by name, averaged over the (global) counted tokens.

    Shapes: logits (B, T, V); target_ids, mask, reward_mu, reward_log_sigma (B, T). `target_ids` are the
    demonstration's tokens (teacher-generated or ground truth) aligned with the logits. `variant`
    chooses the imitation term: "sequence" = cross-entropy on the demonstration, "divergence" = the
    §1 divergence `divergence` to `teacher_signal` at every position. The policy is softmax(Q) with
    Q = z/τ_Q throughout: the imitation term sees z/τ_Q as the student's logits, as the TD term does.
    The TD and prior terms count the TD pairs (`terminal`) over the same global token count as the
    imitation term, so the three stay on one scale. `log_sigma_min/max` clamp log σ (None = no clamp,
    as AVRIL's code); the clamp is a guard for a posterior that collapses onto a near-exact residual.
    """
    policy_logits = student_logits if tau_q == 1.0 else student_logits / tau_q
    if log_sigma_min is not None or log_sigma_max is not None:
        reward_log_sigma = reward_log_sigma.clamp(log_sigma_min, log_sigma_max)
    if variant == "sequence":
        imitation = token_cross_entropy(policy_logits, target_ids, chunk_size=chunk_size)
    elif variant == "divergence":
        if teacher_signal is None:
            raise ValueError(
                "xkd variant='divergence' needs a teacher signal; use variant='sequence' without one"
            )
        imitation = teacher_divergence(
            divergence,
            policy_logits,
            teacher_signal,
            temperature=temperature,
            sparse_mode=sparse_mode,
            chunk_size=chunk_size,
            **divergence_params,
        )
    else:
        raise ValueError(f"xkd variant={variant!r} is not one of 'sequence', 'divergence'")
    q = q_values(student_logits, target_ids, q_form=q_form, tau_q=tau_q, chunk_size=chunk_size)
    residual = td_residual(q, mask, gamma=gamma)
    pairs = td_pairs(mask, terminal)
    if num_tokens is None:
        num_tokens = mask.bool().sum()  # one denominator for all three terms
    terms = {
        "imitation": masked_mean(imitation, mask, num_tokens),
        "td_nll": masked_mean(gaussian_nll(residual, reward_mu, reward_log_sigma), pairs, num_tokens),
        "prior_kl": masked_mean(prior_kl(reward_mu, reward_log_sigma), pairs, num_tokens),
    }
    total = terms["imitation"] + lambda_td * terms["td_nll"] + lambda_kl * terms["prior_kl"]
    with torch.no_grad():
        # the learned per-token reward (the posterior mean): logged, not optimised
        terms["reward_mu"] = masked_mean(reward_mu.detach(), pairs, num_tokens)
        terms["td_residual"] = masked_mean(residual.detach(), pairs, num_tokens)
    return total, terms
