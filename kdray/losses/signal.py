"""Per-token terms against whatever teacher signal a batch carries: dense logits or sparse top-k.

The teacher-signal dict follows the wire format of ARCHITECTURE.md: either `teacher_logits (B, T, V)`
or `topk_ids (B, T, k)` + `topk_logprobs (B, T, k)` (+ `token_logprobs (B, T)`). One entry point keeps
every method (supervised KD, GKD, X-KD, ...) agnostic of where the signal came from.

Temperature: a served signal carries the temperature its log-probs were computed at (`temperature`,
one value per row). Dense logits are divided by the loss temperature here. A full-vocabulary signal
(k = V) is re-tempered exactly (log-probs × served τ are the logits up to a per-position constant). A
true top-k cannot be re-tempered (its normaliser needs every logit), so the loss temperature must equal
the served one, and a mismatch is refused instead of pulling the student toward a distribution nobody
chose.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from kdray.losses.divergences import divergence, loss_dtype
from kdray.losses.reduce import chunked_per_token
from kdray.losses.sparse import SparseMode, sparse_divergence

Tensor = torch.Tensor


def is_sparse(teacher_signal: Mapping[str, Tensor]) -> bool:
    """True for a top-k signal, False for dense logits; a clear error when it is neither."""
    if "teacher_logits" in teacher_signal:
        return False
    if "topk_ids" in teacher_signal and "topk_logprobs" in teacher_signal:
        return True
    raise KeyError(
        "teacher signal has neither 'teacher_logits' nor 'topk_ids' + 'topk_logprobs' "
        f"(it has {sorted(teacher_signal)}); a supervised-only objective ('ce') needs no teacher"
    )


class SignalTemperatureError(ValueError):
    """A top-k teacher signal was served at another temperature than the loss asks for."""


def served_temperature(teacher_signal: Mapping[str, Tensor]) -> float:
    """The temperature a served signal was computed at (1.0 for a signal that records none)."""
    value = teacher_signal.get("temperature")
    if value is None:
        return 1.0
    values = torch.unique(torch.as_tensor(value, dtype=torch.float32).reshape(-1))
    if values.numel() != 1:
        raise SignalTemperatureError(
            f"one batch mixes teacher signals served at temperatures {values.tolist()}: the cache or the "
            "teacher pool mixes two teacher passes"
        )
    return float(values[0])


def check_signal_temperature(teacher_signal: Mapping[str, Tensor], temperature: float, term: str) -> None:
    """Refuse a top-k signal served at another temperature than `temperature` (the term's)."""
    served = served_temperature(teacher_signal)
    if abs(served - temperature) > 1e-6:
        raise SignalTemperatureError(
            f"loss term {term!r} reads the teacher at temperature {temperature:g}, but its top-k signal was "
            f"served at temperature {served:g}, and a top-k cannot be re-tempered. Set teacher.temperature to "
            f"{temperature:g} (or leave it unset: it then follows the loss), or set the term's temperature to "
            f"{served:g}; a full-vocabulary signal (teacher.top_k: null) can be read at any temperature."
        )


def full_teacher_logits(teacher_signal: Mapping[str, Tensor], vocab_size: int) -> Tensor | None:
    """Teacher logits (up to a per-position constant) at temperature 1, (B, T, V), from dense logits or a
    full-vocabulary top-k (k = V) served at any temperature; None for a true top-k."""
    if "teacher_logits" in teacher_signal:
        return teacher_signal["teacher_logits"]
    ids, logprobs = teacher_signal["topk_ids"], teacher_signal["topk_logprobs"]
    if ids.shape[-1] != vocab_size:
        return None
    dense = torch.full(ids.shape, float("-inf"), dtype=logprobs.dtype, device=logprobs.device)
    return dense.scatter(-1, ids.long(), logprobs) * served_temperature(teacher_signal)


def teacher_divergence(
    name: str,
    student_logits: Tensor,
    teacher_signal: Mapping[str, Tensor],
    *,
    temperature: float = 1.0,
    sparse_mode: SparseMode = "tail",
    chunk_size: int | None = None,
    **params: float,
) -> Tensor:
    """Divergence `name` per position (B, T) to a dense or sparse teacher signal, chunked if asked."""
    full = (
        full_teacher_logits(teacher_signal, student_logits.shape[-1]) if is_sparse(teacher_signal) else None
    )
    if full is not None:
        teacher_signal = {"teacher_logits": full}  # k = V: exact at any loss temperature
    if is_sparse(teacher_signal):
        check_signal_temperature(teacher_signal, temperature, name)
        ids, logprobs = teacher_signal["topk_ids"], teacher_signal["topk_logprobs"]

        def fn(logits: Tensor, ids: Tensor, logprobs: Tensor) -> Tensor:
            return sparse_divergence(
                name, logits, ids, logprobs, temperature=temperature, mode=sparse_mode, **params
            )

        return chunked_per_token(fn, student_logits, ids, logprobs, chunk_size=chunk_size)

    def dense(logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return divergence(name, logits, teacher_logits, temperature=temperature, **params)

    return chunked_per_token(dense, student_logits, teacher_signal["teacher_logits"], chunk_size=chunk_size)


def _token_ce(student_logits: Tensor, target_ids: Tensor) -> Tensor:
    logits = student_logits.to(loss_dtype(student_logits))
    # masked positions may hold -100 / pad ids; clamp so the gather is valid, the mask drops them later
    targets = target_ids.long().clamp(0, logits.shape[-1] - 1)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def token_cross_entropy(
    student_logits: Tensor, target_ids: Tensor, *, chunk_size: int | None = None
) -> Tensor:
    """−log q(y_t | s_t) per position, (B, T, V) + (B, T) -> (B, T)."""
    return chunked_per_token(_token_ce, student_logits, target_ids, chunk_size=chunk_size)
