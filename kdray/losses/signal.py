"""Per-token terms against whatever teacher signal a batch carries: dense logits or sparse top-k.

The teacher-signal dict follows the wire format of ARCHITECTURE.md: either `teacher_logits (B, T, V)`
or `topk_ids (B, T, k)` + `topk_logprobs (B, T, k)` (+ `token_logprobs (B, T)`). One entry point keeps
every method (supervised KD, GKD, X-KD, ...) agnostic of where the signal came from.
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
    if is_sparse(teacher_signal):
        ids, logprobs = teacher_signal["topk_ids"], teacher_signal["topk_logprobs"]

        def fn(logits: Tensor, ids: Tensor, logprobs: Tensor) -> Tensor:
            return sparse_divergence(
                name, logits, ids, logprobs, temperature=temperature, mode=sparse_mode, **params
            )

        return chunked_per_token(fn, student_logits, ids, logprobs, chunk_size=chunk_size)

    def dense(logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return divergence(name, logits, teacher_logits, temperature=temperature, **params)

    return chunked_per_token(dense, student_logits, teacher_signal["teacher_logits"], chunk_size=chunk_size)


def dense_teacher_logits(teacher_signal: Mapping[str, Tensor], vocab_size: int) -> Tensor | None:
    """The teacher's full (B, T, V) log-probs when the signal holds them: dense logits, or a top-k with
    k = V (what a teacher serving `top_k: null` sends). None for a true top-k. Log-probs stand in for
    logits: they differ by a per-position constant, which every softmax ignores."""
    if "teacher_logits" in teacher_signal:
        return teacher_signal["teacher_logits"]
    ids, logprobs = teacher_signal["topk_ids"], teacher_signal["topk_logprobs"]
    if ids.shape[-1] != vocab_size:
        return None
    dense = torch.full(ids.shape, float("-inf"), dtype=logprobs.dtype, device=logprobs.device)
    return dense.scatter(-1, ids.long(), logprobs)


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
