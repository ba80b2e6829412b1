"""The `uld` and `gold` loss terms: cross-tokenizer distillation inside a training step (METHODS.md §4).

The pure functions of `kdray.losses.cross_tokenizer` compare one example's rows; this module feeds them
from a training batch. The teacher scored its *own* tokenization of each response
(`kdray.teacher.cross_signal`), so its signal is per teacher response token, not per student position,
and the batch says which student and which teacher tokens cover the same text:

- `xtok_topk_ids`, `xtok_topk_logprobs` (B, T_t, k) and `xtok_token_logprobs` (B, T_t): the teacher's
  top-k and realized-token log-probs, row j predicting teacher response token j (target-aligned);
- `xtok_teacher_mask` (B, T_t): True on the teacher response tokens that were kept;
- `xtok_teacher_group` (B, T_t) and `xtok_student_group` (B, L-1, shifted like the student's logits):
  the `response_groups` index of each token, -1 for tokens in no group.

The student's rows are its logits at the response positions (sliced to its tokenizer by the step), the
teacher's are its top-k expanded with `topk_to_dense` (exact for ULD: a missing token is a zero after
sorting). Each example's distillation value is the reference's per-example mean over its groups; the
examples are weighted by their counted student tokens over the step's global token count, the
normalisation every kdray term uses, so gradient accumulation and data parallelism stay exact (for
examples of one length it is the reference's batch mean). `ce_weight` adds cross-entropy on the
student's own tokens, as ULD's reference does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kdray.losses.cross_tokenizer import align_batch, gold_loss, topk_to_dense, uld_loss, vocab_map
from kdray.losses.divergences import loss_dtype
from kdray.losses.reduce import masked_mean
from kdray.losses.signal import check_signal_temperature, token_cross_entropy
from kdray.methods.cross_tokenizer import cross_tokenizer_params

Tensor = torch.Tensor

#: teacher-side columns, per teacher response token (not aligned with the student's input tokens)
TEACHER_COLUMNS = (
    "xtok_topk_ids",
    "xtok_topk_logprobs",
    "xtok_token_logprobs",
    "xtok_teacher_mask",
    "xtok_teacher_group",
)
#: student-side column, aligned with the student's input tokens
STUDENT_COLUMN = "xtok_student_group"
CROSS_COLUMNS = (*TEACHER_COLUMNS, STUDENT_COLUMN)


def _need(signal: Mapping[str, Tensor] | None, term: str) -> Mapping[str, Tensor]:
    missing = [k for k in CROSS_COLUMNS if signal is None or k not in signal]
    if missing:
        raise ValueError(
            f"loss term {term!r} reads the teacher's own tokenization of each response, but the batch lacks "
            f"{missing}: set objective.cross_tokenizer: {term} so the teacher scorer serves it"
        )
    return signal  # type: ignore[return-value]


def _groups(student_group: Tensor, teacher_group: Tensor) -> list[tuple[list[int], list[int]]]:
    """(student rows, teacher rows) per group id present on both sides, in order."""
    s_ids, t_ids = student_group.tolist(), teacher_group.tolist()
    by_group: dict[int, tuple[list[int], list[int]]] = {}
    for i, g in enumerate(s_ids):
        if g >= 0:
            by_group.setdefault(g, ([], []))[0].append(i)
    for j, g in enumerate(t_ids):
        if g >= 0 and g in by_group:
            by_group[g][1].append(j)
    return [by_group[g] for g in sorted(by_group) if by_group[g][1]]


def _example_rows(
    student_logits: Tensor,
    batch: Mapping[str, Tensor],
    signal: Mapping[str, Tensor],
    *,
    align: str,
    temperature: float,
    teacher_vocab_size: int | None,
) -> tuple[dict[str, list[Any]], Tensor]:
    """Per-example inputs of `align_batch` and each example's counted student tokens."""
    mask = batch["mask"]
    lists: dict[str, list[Any]] = {k: [] for k in ("s", "t", "groups", "s_ids", "t_obs")}
    topk_ids = signal["xtok_topk_ids"]
    width = teacher_vocab_size or (int(topk_ids.max()) + 1 if topk_ids.numel() else 1)
    for b in range(student_logits.shape[0]):
        t_keep = signal["xtok_teacher_mask"][b].bool()
        n_t = int(t_keep.sum())
        if align == "text":
            rows = mask[b] & (signal[STUDENT_COLUMN][b] >= 0)
            lists["groups"].append(
                _groups(signal[STUDENT_COLUMN][b][rows], signal["xtok_teacher_group"][b][:n_t])
            )
        else:
            rows = mask[b]
        logits = student_logits[b][rows]
        lists["s"].append(torch.log_softmax(logits.to(loss_dtype(logits)) / temperature, dim=-1))
        lists["s_ids"].append(batch["target_ids"][b][rows])
        lists["t"].append(
            topk_to_dense(topk_ids[b, :n_t], signal["xtok_topk_logprobs"][b, :n_t].float(), width)
        )
        lists["t_obs"].append(signal["xtok_token_logprobs"][b, :n_t].float())
    return lists, mask.sum(-1)


def cross_tokenizer_term(
    loss: str,
    student_logits: Tensor,
    batch: Mapping[str, Tensor],
    teacher_signal: Mapping[str, Tensor] | None = None,
    *,
    num_tokens: int | Tensor | None = None,
    chunk_size: int | None = None,
    vocab_map: tuple[Tensor, Tensor] | None = None,
    teacher_vocab_size: int | None = None,
    **knobs: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """ce_weight·CE + distil_weight·(ULD or GOLD) of a batch; sub-terms `ce`, `distil` (and GOLD's
    `matched`, `unmatched`), plus `rows`, the number of aligned rows per example (token-weighted mean).

    `knobs` are those of `kdray.methods.cross_tokenizer` (unset ones take `loss`'s reference defaults).
    `vocab_map` (student ids, teacher ids of equal token strings) and `teacher_vocab_size` come from the
    training loop at call time (`cross_runtime`), not from the config: GOLD needs the map.
    """
    p = cross_tokenizer_params(loss, knobs)
    temperature, align, strategy = p["temperature"], p["align"], p["strategy"]
    signal = _need(teacher_signal, loss)
    check_signal_temperature(signal, temperature, loss)
    if loss == "gold" and vocab_map is None:
        raise ValueError(
            "loss term 'gold' needs the vocabulary map of the two tokenizers (runtime `vocab_map`, built by "
            "cross_runtime from the student's and the teacher's tokenizers)"
        )
    lists, counts = _example_rows(
        student_logits, batch, signal, align=align, temperature=temperature,
        teacher_vocab_size=teacher_vocab_size,
    )  # fmt: skip
    pairs = align_batch(
        lists["s"], lists["t"], align=align,  # type: ignore[arg-type]
        groups=lists["groups"] if align == "text" else None, student_token_ids=lists["s_ids"],
        teacher_observed_logprobs=lists["t_obs"], strategy=strategy,  # type: ignore[arg-type]
    )  # fmt: skip
    total_tokens = float(num_tokens) if num_tokens is not None else float(counts.sum())
    weights = counts.to(loss_dtype(student_logits)) / max(total_tokens, 1.0)
    zero = student_logits.new_zeros((), dtype=loss_dtype(student_logits))
    distil, matched, unmatched = zero, zero.detach(), zero.detach()
    for w, (s_rows, t_rows) in zip(weights, pairs, strict=True):
        if loss == "uld":
            distil = distil + w * uld_loss(s_rows, t_rows)
        else:
            value, parts = gold_loss(
                s_rows, t_rows, vocab_map[0], vocab_map[1], beta=p["beta"],  # type: ignore[index]
                matched_weight=p["matched_weight"], unmatched_weight=p["unmatched_weight"],
            )  # fmt: skip
            distil = distil + w * value
            matched, unmatched = matched + w * parts["matched"], unmatched + w * parts["unmatched"]
    with torch.set_grad_enabled(torch.is_grad_enabled() and p["ce_weight"] > 0):
        values = token_cross_entropy(student_logits, batch["target_ids"], chunk_size=chunk_size)
        ce = masked_mean(values, batch["mask"], num_tokens)
    total = p["ce_weight"] * ce + p["distil_weight"] * distil
    subs = {"ce": ce.detach(), "distil": distil.detach()}
    # weighted like the loss, so the values of micro-batches and workers add up to the step's
    subs["rows"] = sum((w * s.shape[0] for w, (s, _) in zip(weights, pairs, strict=True)), zero.detach())
    if loss == "gold":
        subs.update(matched=matched, unmatched=unmatched)
    return total, subs


def cross_runtime(terms: Any, student_tokenizer: Any, teacher_path: str | None) -> dict[str, dict[str, Any]]:
    """Per-call parameters of the objective's cross-tokenizer terms, by label: the vocabulary map of the
    two tokenizers and the teacher's vocabulary size, computed once per run from tokenizer files."""
    labels = [t.label for t in terms if t.name in ("uld", "gold")]
    if not labels:
        return {}
    if not teacher_path:
        raise ValueError(
            f"loss terms {labels} compare the student with a teacher, but the run has no teacher path"
        )
    from kdray.models.loading import load_tokenizer

    teacher_tokenizer = load_tokenizer(teacher_path)
    mapping = vocab_map(student_tokenizer, teacher_tokenizer)
    return {label: {"vocab_map": mapping, "teacher_vocab_size": len(teacher_tokenizer)} for label in labels}
