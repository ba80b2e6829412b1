"""Token-level divergences between the teacher p and the student q (METHODS.md §1).

Two layers: `*_from_logprobs` functions work on normalised log-probabilities over the last dimension
(the full vocabulary, or the (k+1)-way coarsening of a sparse teacher signal, see `sparse.py`), and the
public `forward_kl(student_logits, teacher_logits, ...)` family applies temperature and float32 upcasting
to logits and returns one value per position, shape (B, T). Reduction is elsewhere (`reduce.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def loss_dtype(x: Tensor) -> torch.dtype:
    """float32 at least: loss math never runs in bf16/fp16 (METHODS.md: "all loss math in float32")."""
    return torch.promote_types(x.dtype, torch.float32)


def _finite(logp: Tensor) -> Tensor:
    # -inf log-probs (padded vocab, padded top-k slots) would give 0 * inf = NaN; the most negative
    # finite number gives the right limit p*log p -> 0 and a zero gradient through clamp_min.
    return logp.clamp_min(torch.finfo(logp.dtype).min)


def _kl(logp_a: Tensor, logp_b: Tensor) -> Tensor:
    """KL(a || b) summed over the last dimension, from log-probabilities."""
    logp_a, logp_b = _finite(logp_a), _finite(logp_b)
    return (logp_a.exp() * (logp_a - logp_b)).sum(-1)


def _log_mix(logp_a: Tensor, logp_b: Tensor, weight_a: float) -> Tensor:
    """log(w·a + (1−w)·b) by logsumexp: mixing log-probs linearly would be wrong (METHODS.md §1)."""
    # finite inputs: a logsumexp over two -inf entries has a NaN gradient
    stacked = torch.stack([_finite(logp_a) + math.log(weight_a), _finite(logp_b) + math.log1p(-weight_a)])
    return torch.logsumexp(stacked, dim=0)


def forward_kl_from_logprobs(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """KL(p || q) = Σ_v p_v (log p_v − log q_v): mode covering."""
    return _kl(teacher_logprobs, student_logprobs)


def reverse_kl_from_logprobs(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """KL(q || p) = Σ_v q_v (log q_v − log p_v): mode seeking."""
    return _kl(student_logprobs, teacher_logprobs)


def jsd_from_logprobs(student_logprobs: Tensor, teacher_logprobs: Tensor, beta: float = 0.5) -> Tensor:
    """GKD's generalised JSD: β·KL(p‖m) + (1−β)·KL(q‖m), m = βp + (1−β)q.

    The endpoints are special-cased (Agarwal et al. 2024, as TRL does): the interior formula is 0 at
    β ∈ {0, 1}, whereas GKD defines β=0 as forward KL and β=1 as reverse KL.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd: beta={beta!r} is outside [0, 1]")
    if beta == 0.0:
        return forward_kl_from_logprobs(student_logprobs, teacher_logprobs)
    if beta == 1.0:
        return reverse_kl_from_logprobs(student_logprobs, teacher_logprobs)
    log_m = _log_mix(teacher_logprobs, student_logprobs, beta)
    return beta * _kl(teacher_logprobs, log_m) + (1.0 - beta) * _kl(student_logprobs, log_m)


def skew_kl_from_logprobs(student_logprobs: Tensor, teacher_logprobs: Tensor, alpha: float = 0.1) -> Tensor:
    """DistiLLM skew KL: KL(p ‖ αp + (1−α)q); α=0 is forward KL."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew_kl: alpha={alpha!r} is outside [0, 1)")
    if alpha == 0.0:
        return forward_kl_from_logprobs(student_logprobs, teacher_logprobs)
    return _kl(teacher_logprobs, _log_mix(teacher_logprobs, student_logprobs, alpha))


def skew_reverse_kl_from_logprobs(
    student_logprobs: Tensor, teacher_logprobs: Tensor, alpha: float = 0.1
) -> Tensor:
    """DistiLLM skew reverse KL: KL(q ‖ αq + (1−α)p); α=0 is reverse KL."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"skew_reverse_kl: alpha={alpha!r} is outside [0, 1)")
    if alpha == 0.0:
        return reverse_kl_from_logprobs(student_logprobs, teacher_logprobs)
    return _kl(student_logprobs, _log_mix(student_logprobs, teacher_logprobs, alpha))


def tvd_from_logprobs(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """Total variation distance ½ Σ_v |p_v − q_v|."""
    return 0.5 * (teacher_logprobs.exp() - student_logprobs.exp()).abs().sum(-1)


DivergenceFn = Callable[..., Tensor]

#: name -> divergence on log-probabilities; the registry every other loss looks names up in.
DIVERGENCES: dict[str, DivergenceFn] = {
    "forward_kl": forward_kl_from_logprobs,
    "reverse_kl": reverse_kl_from_logprobs,
    "jsd": jsd_from_logprobs,
    "skew_kl": skew_kl_from_logprobs,
    "skew_reverse_kl": skew_reverse_kl_from_logprobs,
    "tvd": tvd_from_logprobs,
}

#: KL-type divergences get the τ² factor (Hinton et al. 2015: keeps gradient size independent of τ);
#: TVD is bounded in [0, 1] and is not rescaled.
TEMPERATURE_SQUARED = frozenset({"forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl"})


def get_divergence(name: str) -> DivergenceFn:
    """Look a divergence up by name, with the list of valid names in the error."""
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise ValueError(f"unknown divergence {name!r}; choose one of {sorted(DIVERGENCES)}") from None


def check_temperature(temperature: float) -> None:
    """Temperatures must be positive and finite; 0 would divide logits by zero."""
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature={temperature!r} must be a positive finite number")


def divergence(
    name: str,
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    **params: float,
) -> Tensor:
    """Divergence `name` per position between dense logits (B, T, V) -> (B, T), in float32 or wider."""
    check_temperature(temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"{name}: student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ; slice padded heads to the tokenizer length first "
            "(kdray.losses.align_vocab)"
        )
    dtype = loss_dtype(student_logits)
    log_q = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    values = get_divergence(name)(log_q, log_p, **params)
    return values * temperature**2 if name in TEMPERATURE_SQUARED else values


def forward_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Forward KL(p‖q) per position, (B, T, V) logits -> (B, T)."""
    return divergence("forward_kl", student_logits, teacher_logits, temperature=temperature)


def reverse_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Reverse KL(q‖p) per position, (B, T, V) logits -> (B, T)."""
    return divergence("reverse_kl", student_logits, teacher_logits, temperature=temperature)


def jsd(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, beta: float = 0.5
) -> Tensor:
    """GKD JSD(β) per position (β=0 forward KL, β=1 reverse KL), (B, T, V) -> (B, T)."""
    return divergence("jsd", student_logits, teacher_logits, temperature=temperature, beta=beta)


def skew_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, alpha: float = 0.1
) -> Tensor:
    """DistiLLM skew KL(p ‖ αp + (1−α)q) per position, (B, T, V) -> (B, T)."""
    return divergence("skew_kl", student_logits, teacher_logits, temperature=temperature, alpha=alpha)


def skew_reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, alpha: float = 0.1
) -> Tensor:
    """DistiLLM skew reverse KL(q ‖ αq + (1−α)p) per position, (B, T, V) -> (B, T)."""
    return divergence("skew_reverse_kl", student_logits, teacher_logits, temperature=temperature, alpha=alpha)


def tvd(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Total variation distance per position, (B, T, V) -> (B, T)."""
    return divergence("tvd", student_logits, teacher_logits, temperature=temperature)


def align_vocab(student_logits: Tensor, teacher_logits: Tensor, vocab_size: int) -> tuple[Tensor, Tensor]:
    """Slice both heads to the tokenizer's length (METHODS.md §4: padded heads, same tokenizer).

    Padded rows past the tokenizer are never real tokens; slicing drops them rather than letting
    random head rows take probability mass.
    """
    for who, logits in (("student", student_logits), ("teacher", teacher_logits)):
        if logits.shape[-1] < vocab_size:
            raise ValueError(
                f"{who} head has {logits.shape[-1]} outputs, fewer than the tokenizer's {vocab_size} tokens"
            )
    return student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]
