"""MiniLLM: sequence-level reverse KL by policy gradient on student samples (Gu et al. 2024; METHODS.md §3).

The gradient of KL(q‖p) over whole sequences splits into a *single-step* part, the exact token-level
reverse KL over the vocabulary at each visited state (low variance), and a *long-term* part, a policy
gradient whose reward is r_t = log p(y_t|s_t) − log q(y_t|s_t) summed over the future. Samples come
from the mixture α·p + (1−α)·q_old; per-token importance weights q_old/mix correct for it, and a
PPO-style clipped ratio q_θ/q_old keeps the update near the sampling policy.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kdray.losses.divergences import loss_dtype
from kdray.losses.reduce import masked_mean
from kdray.losses.signal import teacher_divergence

Tensor = torch.Tensor


def future_returns(rewards: Tensor, mask: Tensor, *, gamma: float = 1.0, normalise: bool = True) -> Tensor:
    """R_{t+1} = Σ_{t' > t} γ^{t'-t-1} r_{t'} over counted tokens, optionally divided by their number.

    The *future* return (excluding t) is what the long-term part needs: the single-step part already
    accounts for r_t exactly. Length normalisation keeps long responses from dominating (MiniLLM §2.2).
    """
    mask = mask.bool()
    r = torch.where(mask, rewards, torch.zeros((), dtype=rewards.dtype, device=rewards.device))
    m = mask.to(rewards.dtype)
    total = torch.zeros_like(r[:, 0])
    count = torch.zeros_like(r[:, 0])
    out = torch.zeros_like(r)
    for t in range(r.shape[1] - 1, -1, -1):  # right to left: out[t] sees only tokens after t
        out[:, t] = total / count.clamp_min(1.0) if normalise else total
        total = r[:, t] + gamma * total
        count = m[:, t] + count
    return out


def minillm_loss(
    student_logits: Tensor,
    target_ids: Tensor,
    mask: Tensor,
    teacher_signal: Mapping[str, Tensor],
    old_logprobs: Tensor,
    *,
    mix_logprobs: Tensor | None = None,
    clip: float = 0.2,
    gamma: float = 1.0,
    single_step: bool = True,
    length_normalise: bool = True,
    baseline: bool = True,
    num_tokens: int | Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """MiniLLM objective on sampled sequences: single-step reverse KL + clipped long-term policy gradient.

    Shapes: logits (B, T, V); target_ids, mask, old_logprobs, mix_logprobs (B, T); the teacher signal
    must carry `token_logprobs` (log p of the sampled tokens) and, for the single-step part, top-k or
    dense logits. `old_logprobs` are the sampling student's log-probs (detached); `mix_logprobs` the
    log-probs under the mixture actually sampled from (None = pure student sampling). `baseline`
    subtracts the batch's mean return from the advantages (ours): the rewards log p − log q are mostly
    negative, and without a baseline the estimator, unbiased but noisy, mainly pushes probability off
    whatever was sampled; on the tiny-model test it then fails to learn at all.
    """
    if "token_logprobs" not in teacher_signal:
        raise KeyError("minillm needs the teacher's log-probs of the sampled tokens ('token_logprobs')")
    logits = student_logits.to(loss_dtype(student_logits))
    logq = torch.log_softmax(logits, -1).gather(-1, target_ids.long().clamp_min(0)[..., None]).squeeze(-1)
    old = old_logprobs.to(logq.dtype).detach()
    rewards = teacher_signal["token_logprobs"].to(logq.dtype) - old
    advantage = future_returns(rewards, mask, gamma=gamma, normalise=length_normalise).detach()
    if baseline:
        advantage = advantage - masked_mean(advantage, mask)
    weight = (
        torch.ones_like(old) if mix_logprobs is None else torch.exp(old - mix_logprobs.to(old.dtype)).detach()
    )
    ratio = torch.exp(logq - old)
    surrogate = torch.minimum(ratio * advantage, ratio.clamp(1.0 - clip, 1.0 + clip) * advantage)
    terms = {"long_term": masked_mean(-weight * surrogate, mask, num_tokens)}
    if single_step:
        rkl = teacher_divergence("reverse_kl", student_logits, teacher_signal, chunk_size=chunk_size)
        terms["single_step"] = masked_mean(weight * rkl, mask, num_tokens)
    total = sum(terms.values())
    with torch.no_grad():
        terms["reward"] = masked_mean(rewards, mask, num_tokens)
        terms["clip_fraction"] = masked_mean(((ratio - 1).abs() > clip).to(logq.dtype), mask, num_tokens)
    return total, terms
