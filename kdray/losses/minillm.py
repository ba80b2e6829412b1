"""MiniLLM: sequence-level reverse KL by policy gradient on student samples (Gu et al. 2024; METHODS.md §3).

The gradient of KL(q‖p) over whole sequences splits into a *single-step* part, the exact token-level
reverse KL over the vocabulary at each visited state (low variance), and a *long-term* part, a policy
gradient on the reward r_t = log p(y_t|s_t) − log q(y_t|s_t) summed over the future. Samples come from
the mixture α·p + (1−α)·q_old; per-token importance weights q_old/mix correct for it, and a PPO-style
clipped ratio q_θ/q_old keeps several optimiser steps on one rollout near the sampling policy.

The computation follows the reference code (microsoft/LMOps minillm/minillm/losses.py @4f2a9de,
REFERENCES.md §2) term by term: scaled and clipped rewards, inclusive length-normalised returns,
whitened advantages, the importance weight inside the clip, and an unweighted single-step term.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kdray.losses.divergences import loss_dtype
from kdray.losses.reduce import masked_mean
from kdray.losses.signal import teacher_divergence

Tensor = torch.Tensor

#: the reference's whitening epsilon: A = (R − μ) / sqrt(var + 1e-8)
WHITEN_EPS = 1e-8


def future_returns(rewards: Tensor, mask: Tensor, *, gamma: float = 0.95, normalise: bool = True) -> Tensor:
    """R_t = Σ_{k ≥ t} γ^{k−t} r_k over counted tokens, divided by L_t = counted tokens in [t, end].

    The return *includes* r_t, as in the reference (`_get_advantages_and_returns`), even though the
    paper's long-term term is written with R_{t+1}. The reference always divides by L_t (its
    `--length-norm` only changes logged statistics); `normalise=False` gives the plain discounted sum.
    Uncounted positions contribute no reward; where L_t = 0 the divisor is 1 (the reference's fill).
    """
    mask = mask.bool()
    r = torch.where(mask, rewards, torch.zeros((), dtype=rewards.dtype, device=rewards.device))
    m = mask.to(rewards.dtype)
    total = torch.zeros_like(r[:, 0])
    count = torch.zeros_like(r[:, 0])
    out = torch.zeros_like(r)
    for t in range(r.shape[1] - 1, -1, -1):  # right to left: out[t] sees t and every token after it
        total = r[:, t] + gamma * total
        count = m[:, t] + count
        out[:, t] = total / count.clamp_min(1.0) if normalise else total
    return out


def _reduce_device() -> torch.device:
    # NCCL reduces CUDA tensors only; every other backend here reduces on the CPU
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def whiten_advantages(returns: Tensor, mask: Tensor, *, include_padding: bool = False) -> Tensor:
    """A = (R − μ) / sqrt(var + 1e-8) with μ, var over the batch, detached (reference `utils.whiten`).

    Statistics over counted tokens by default; `include_padding` takes them over all B×T entries
    as the reference does. Under torch.distributed the sum, sum of squares and count are all-reduced
    in float64, so μ and var are global, as in the reference's multi-GPU runs; every rank must then
    call this the same number of times. var is the population variance (÷ n): the reference's
    multi-GPU path, which the paper ran; its single-process path uses torch.var_mean (÷ n − 1).
    """
    returns = returns.detach()
    r64 = returns.to(torch.float64)
    weight = torch.ones_like(r64) if include_padding else mask.bool().to(torch.float64)
    stats = torch.stack([(weight * r64).sum(), (weight * r64 * r64).sum(), weight.sum()])
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        stats = stats.to(_reduce_device())
        dist.all_reduce(stats)  # global sum, sum of squares and count over ranks
        stats = stats.to(returns.device)
    total, squares, count = stats.unbind()
    count = count.clamp_min(1.0)
    mean = total / count
    var = (squares / count - mean * mean).clamp_min(0.0)  # one-pass variance; float64 keeps it exact
    return ((returns - mean.to(returns.dtype)) * torch.rsqrt(var + WHITEN_EPS).to(returns.dtype)).detach()


def minillm_loss(
    student_logits: Tensor,
    target_ids: Tensor,
    mask: Tensor,
    teacher_signal: Mapping[str, Tensor],
    old_logprobs: Tensor,
    *,
    mix_logprobs: Tensor | None = None,
    clip: float = 0.2,
    gamma: float = 0.95,
    reward_scaling: float = 0.5,
    reward_clip: float = 100.0,
    length_normalise: bool = True,
    whiten: bool = True,
    whiten_padding: bool = False,
    single_step: bool = True,
    num_tokens: int | Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """MiniLLM objective on sampled sequences: clipped long-term policy gradient + single-step reverse KL.

    Shapes: logits (B, T, V); target_ids, mask, old_logprobs, mix_logprobs (B, T). The teacher signal
    must carry `token_logprobs` (log p of the sampled tokens) and, for the single-step part, top-k or
    dense logits. `old_logprobs` = log q_old, the sampling student's log-probs (fixed for the rollout);
    `mix_logprobs` = log-probs under the mixture actually sampled from (None = pure student sampling).

    As in the reference (microsoft/LMOps minillm/minillm/losses.py, defaults of the paper scripts):
    - r_t = clip((log p_t − log q_old,t) / reward_scaling, ±reward_clip);
    - R_t = Σ_{k≥t} γ^{k−t} r_k (r_t included), ÷ L_t if `length_normalise` (`future_returns`);
    - A = whitened R if `whiten` (over counted tokens; `whiten_padding` = over all B×T, the
      reference's quirk), detached; whitening is also the reference's only baseline;
    - ratio_t = exp(log q_θ − log q_old) · w_t with w_t = exp(log q_old − log mix), the importance
      weight applied *before* clipping (not clipped itself, fixed at rollout);
    - long_term = Σ mask · max(−A·ratio, −A·clip(ratio, 1 ± clip)) / num_tokens;
    - single_step = token-mean KL(q_θ‖p) over the vocabulary (no importance weight), if `single_step`.
    The total is their sum; the reference's pre-training LM term is a separate term in kdray.
    """
    if "token_logprobs" not in teacher_signal:
        raise KeyError("minillm needs the teacher's log-probs of the sampled tokens ('token_logprobs')")
    mask = mask.bool()
    logits = student_logits.to(loss_dtype(student_logits))
    logq = torch.log_softmax(logits, -1).gather(-1, target_ids.long().clamp_min(0)[..., None]).squeeze(-1)
    old = old_logprobs.to(logq.dtype).detach()
    zero = torch.zeros((), dtype=logq.dtype, device=logq.device)
    # reward from the rollout-time log-probs: constant over the PPO epochs of one rollout
    raw = (teacher_signal["token_logprobs"].to(logq.dtype).detach() - old) / reward_scaling
    rewards = torch.where(mask, raw.clamp(-reward_clip, reward_clip), zero)
    advantage = future_returns(rewards, mask, gamma=gamma, normalise=length_normalise).detach()
    if whiten:
        advantage = whiten_advantages(advantage, mask, include_padding=whiten_padding)
    weight = torch.ones_like(old) if mix_logprobs is None else torch.exp(old - mix_logprobs.to(old.dtype))
    # masked positions get log-ratio 0, so a stray value there cannot overflow exp
    ratio = torch.exp(torch.where(mask, logq - old, zero)) * weight.detach()
    surrogate = torch.maximum(-advantage * ratio, -advantage * ratio.clamp(1.0 - clip, 1.0 + clip))
    terms = {"long_term": masked_mean(surrogate, mask, num_tokens)}
    if single_step:
        rkl = teacher_divergence("reverse_kl", student_logits, teacher_signal, chunk_size=chunk_size)
        terms["single_step"] = masked_mean(rkl, mask, num_tokens)
    total = sum(terms.values())
    with torch.no_grad():
        terms["reward"] = masked_mean(rewards, mask, num_tokens)  # scaled, clipped r_t
        terms["clip_fraction"] = masked_mean(((ratio - 1).abs() > clip).to(logq.dtype), mask, num_tokens)
        terms["ratio_mean"] = masked_mean(ratio, mask, num_tokens)
    return total, terms
