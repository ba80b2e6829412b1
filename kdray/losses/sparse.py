"""Divergences against a sparse teacher signal: top-k ids and log-probs per position (METHODS.md §2).

A served teacher (vLLM) returns only its k most likely tokens. With the default *tail bucket*, both
distributions are coarsened to k+1 categories (the teacher's top-k ids plus "everything else"); any §1
divergence on the coarsened pair is exact for it and a lower bound of the full-vocabulary value (data
processing inequality). *Renormalised* top-k drops the tail on both sides: biased, offered for comparison.

Temperature: the teacher's log-probs arrive already at the temperature they were served with (the
teacher config's `temperature`); `temperature` here divides the student's logits and applies the τ²
factor. Serve the teacher at the loss temperature for the two to agree.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from kdray.losses.divergences import TEMPERATURE_SQUARED, check_temperature, get_divergence, loss_dtype

Tensor = torch.Tensor
SparseMode = Literal["tail", "renormalize"]


def teacher_tail_logprob(topk_logprobs: Tensor) -> Tensor:
    """log(1 − Σ_top-k p) of the leftover mass, (..., k) -> (..., 1).

    `log(-expm1(lse))` keeps precision when the tail is tiny; the logsumexp is clamped at 0 because
    served top-k probabilities can sum to 1+ε, which would make the tail NaN (it becomes -inf = empty).
    """
    lse = torch.logsumexp(topk_logprobs, dim=-1, keepdim=True).clamp_max(0.0)
    return torch.log(-torch.expm1(lse))


def _student_topk_and_tail(
    student_logprobs: Tensor, topk_ids: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Student log-probs at the teacher's ids (invalid slots -inf), of everything else, and where the
    ids cover the whole vocabulary.

    The tail is a logsumexp over the tokens outside the top-k instead of log(1 − Σ q_topk): no
    cancellation when the top-k holds almost all mass, and an exact zero (-inf) when k = V. One
    vocabulary-sized copy (the log-probs with the top-k set to -inf) is all it allocates.
    """
    ids = topk_ids.long()
    gathered = student_logprobs.gather(-1, ids).masked_fill(~valid, float("-inf"))
    # an invalid (padding) slot may hold any id: point it at the row's first valid id, so that it
    # removes nothing from the tail; a row with no valid slot keeps the whole distribution (log 1 = 0)
    any_valid = valid.any(dim=-1, keepdim=True)
    first_valid = ids.gather(-1, valid.to(torch.uint8).argmax(dim=-1, keepdim=True))
    ids = torch.where(valid, ids, first_valid)
    outside = student_logprobs.scatter(-1, ids, float("-inf"))
    tail = torch.logsumexp(outside, dim=-1, keepdim=True).masked_fill(~any_valid, 0.0)
    vocab = student_logprobs.shape[-1]
    if ids.shape[-1] < vocab:  # fewer slots than tokens: the ids cannot cover the vocabulary
        return gathered, tail, torch.zeros_like(tail, dtype=torch.bool)
    hit = torch.zeros(student_logprobs.shape, dtype=torch.bool, device=ids.device).scatter_(-1, ids, True)
    return gathered, tail, (hit & any_valid).all(dim=-1, keepdim=True)


def sparse_logprobs(
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    *,
    temperature: float = 1.0,
    mode: SparseMode = "tail",
) -> tuple[Tensor, Tensor]:
    """Coarsened (student, teacher) log-probs: (B, T, k+1) for "tail", (B, T, k) for "renormalize".

    Slots whose teacher log-prob is -inf (padding when fewer than k tokens were returned) count as
    absent on both sides.
    """
    check_temperature(temperature)
    if topk_ids.shape != topk_logprobs.shape:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_logprobs {tuple(topk_logprobs.shape)} differ"
        )
    if topk_ids.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"teacher signal positions {tuple(topk_ids.shape[:-1])} do not match student logits "
            f"{tuple(student_logits.shape[:-1])}: align the signal at the response start"
        )
    dtype = loss_dtype(student_logits)
    teacher = topk_logprobs.to(dtype)
    valid = torch.isfinite(teacher)
    logits = student_logits.to(dtype)
    # at τ = 1 no vocabulary-sized copy: log_softmax reads the logits as they are
    student_full = F.log_softmax(logits / temperature if temperature != 1 else logits, dim=-1)
    student_topk, student_tail, covers_all = _student_topk_and_tail(student_full, topk_ids, valid)
    if mode == "tail":
        student = torch.cat([student_topk, student_tail], dim=-1)
        # no token left outside the ids: the teacher's tail is empty by definition, whatever float
        # rounding says (1e-7 of phantom mass against an exactly empty student tail would explode)
        tail = teacher_tail_logprob(teacher).masked_fill(covers_all, float("-inf"))
        teacher = torch.cat([teacher, tail], dim=-1)
    elif mode == "renormalize":
        student = student_topk - torch.logsumexp(student_topk, dim=-1, keepdim=True)
        teacher = teacher - torch.logsumexp(teacher, dim=-1, keepdim=True)
    else:
        raise ValueError(f"sparse mode {mode!r} is not one of 'tail', 'renormalize'")
    return student, teacher


def sparse_divergence(
    name: str,
    student_logits: Tensor,
    topk_ids: Tensor,
    topk_logprobs: Tensor,
    *,
    temperature: float = 1.0,
    mode: SparseMode = "tail",
    **params: float,
) -> Tensor:
    """Divergence `name` per position against a top-k teacher signal: (B, T, V) + (B, T, k) -> (B, T)."""
    fn = get_divergence(name)
    log_q, log_p = sparse_logprobs(
        student_logits, topk_ids, topk_logprobs, temperature=temperature, mode=mode
    )
    values = fn(log_q, log_p, **params)
    return values * temperature**2 if name in TEMPERATURE_SQUARED else values
