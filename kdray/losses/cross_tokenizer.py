"""Cross-tokenizer distillation: ULD and GOLD's hybrid loss (METHODS.md §4; REFERENCES.md Part 2 §3-§4).

When student and teacher tokenise the same response differently, position t of one says nothing about
position t of the other, and column v of one vocabulary is not column v of the other. Three steps bridge
the two tokenisations:

1. `kdray.losses.alignment.align_tokens` groups the tokens of both sides into runs that cover the same characters of the
   response text (`response_offsets` gives each token's character span).
2. `merge_groups` turns each run of one side into one row over that side's vocabulary.
3. `uld_loss` compares rows with no vocabulary correspondence at all (sorted probabilities, Boizard et
   al. 2024); `gold_loss` compares the columns whose token strings are equal directly (JSD) and falls back
   to the sorted comparison for the rest (TRL's GOLD hybrid).

Convention, everywhere in this module: per-position tensors are *target-aligned*, row t is the
distribution that predicts response token t. For causal-LM logits over prompt+response with the response
starting at index s, that is `logits[s-1 : s-1+T]`. Temperature is the caller's: divide the logits before
the log-softmax. Loss math runs in float32 or wider, and no gradient reaches the teacher (it is detached).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F

from kdray.losses.alignment import Group
from kdray.losses.divergences import jsd_from_logprobs, loss_dtype

Tensor = torch.Tensor
Align = Literal["text", "position"]
MergeStrategy = Literal["observed", "bayesian"]

#: floor of every merged scalar probability and of the hybrid's matched probabilities, as in TRL GOLD:
#: one token the model deems impossible must not wipe out a whole group (log 0 = -inf).
PROB_FLOOR = 1e-8
_LOG_FLOOR = math.log(PROB_FLOOR)


# ---- group merging -------------------------------------------------------------------------------


def merge_groups(
    logprobs: Tensor,
    token_ids: Tensor | None,
    groups_side: Sequence[Sequence[int]],
    strategy: MergeStrategy = "observed",
    *,
    observed_logprobs: Tensor | None = None,
) -> Tensor:
    """One row of log-probabilities per group of one side, (T, V) -> (G, V), unnormalised as in TRL.

    `logprobs` is target-aligned (row t predicts token t). A one-token group is its row. For more tokens:
    - "observed" (TRL's default): row of the first token + Σ log p[k, token_k] over the later tokens, i.e.
      p(first token = v) × p(the observed rest of the group), the chain rule read left to right;
    - "bayesian": row of the last token + Σ log p[k, token_k] over the earlier tokens.
    Each scalar log p[k, token_k] is floored at log 1e-8. TRL slices the rows one position late for
    "observed" (each row predicts the *next* token, REFERENCES.md Part 2 §4); with target-aligned rows
    both strategies use the distribution of the token they claim. To reproduce TRL, pass rows shifted.

    `observed_logprobs` (T,) replaces the gather from `logprobs` for the scalars: a teacher that serves
    only its top-k still reports the log-prob of each observed token (`token_logprobs`).
    """
    if logprobs.dim() != 2:
        raise ValueError(f"merge_groups: logprobs must be (T, V), got shape {tuple(logprobs.shape)}")
    if strategy not in ("observed", "bayesian"):
        raise ValueError(f"merge_groups: strategy={strategy!r}; choose 'observed' or 'bayesian'")
    n = logprobs.shape[0]
    anchors, rest, rest_group = [], [], []
    for g, group in enumerate(groups_side):
        if not group or not all(0 <= k < n for k in group):
            raise ValueError(f"merge_groups: group {g}={list(group)} is empty or outside the {n} rows")
        anchor = group[0] if strategy == "observed" else group[-1]
        anchors.append(anchor)
        others = [k for k in group if k != anchor]
        rest.extend(others)
        rest_group.extend([g] * len(others))
    rows = logprobs[torch.tensor(anchors, dtype=torch.long, device=logprobs.device)]
    if not rest:
        return rows
    rest_t = torch.tensor(rest, dtype=torch.long, device=logprobs.device)
    if observed_logprobs is not None:
        scalars = observed_logprobs.to(logprobs.device)[rest_t]
    elif token_ids is None:
        raise ValueError(
            "merge_groups: groups of several tokens need token_ids (the observed tokens, shape (T,))"
        )
    else:
        ids = token_ids.to(logprobs.device).long()[rest_t]
        scalars = logprobs[rest_t, ids]
    scalars = scalars.to(rows.dtype).clamp_min(_LOG_FLOOR)
    extra = torch.zeros(rows.shape[0], dtype=rows.dtype, device=rows.device)
    extra = extra.index_add(0, torch.tensor(rest_group, dtype=torch.long, device=rows.device), scalars)
    return rows + extra[:, None]


def topk_to_dense(topk_ids: Tensor, topk_logprobs: Tensor, vocab_size: int) -> Tensor:
    """(..., k) top-k ids and log-probs -> (..., V) log-probs, -inf outside the top-k.

    For ULD this is exact top-k ULD: a missing token has probability 0 after sorting, just as the zero
    padding of the smaller vocabulary. Padded slots (-inf log-prob) may repeat ids; the max keeps the real one.
    """
    ids = topk_ids.long()
    if ids.numel() and int(ids.max()) >= vocab_size:
        raise ValueError(f"topk_ids reach {int(ids.max())}, past vocab_size={vocab_size}")
    base = torch.full(
        (*ids.shape[:-1], vocab_size), float("-inf"), dtype=topk_logprobs.dtype, device=ids.device
    )
    return base.scatter_reduce(-1, ids, topk_logprobs, reduce="amax", include_self=True)


def align_distributions(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    *,
    align: Align = "text",
    groups: Sequence[Group] | None = None,
    student_token_ids: Tensor | None = None,
    teacher_token_ids: Tensor | None = None,
    teacher_observed_logprobs: Tensor | None = None,
    strategy: MergeStrategy = "observed",
) -> tuple[Tensor, Tensor]:
    """Paired rows (G, V_s), (G, V_t) of one example from its (T_s, V_s) and (T_t, V_t) rows.

    "position" is the original ULD: the first min(T_s, T_t) rows, whatever text they stand for.
    "text" merges the `groups` of `align_tokens` on each side (token ids needed for multi-token groups).
    """
    if align == "position":
        n = min(student_logprobs.shape[0], teacher_logprobs.shape[0])
        return student_logprobs[:n], teacher_logprobs[:n]
    if align != "text":
        raise ValueError(
            f"align={align!r}; choose 'text' (groups from align_tokens) or 'position' (original ULD)"
        )
    if groups is None:
        raise ValueError("align='text' needs groups: pass align_tokens(student_offsets, teacher_offsets)")
    student = merge_groups(student_logprobs, student_token_ids, [s for s, _ in groups], strategy)
    teacher = merge_groups(
        teacher_logprobs,
        teacher_token_ids,
        [t for _, t in groups],
        strategy,
        observed_logprobs=teacher_observed_logprobs,
    )
    return student, teacher


# ---- ULD -----------------------------------------------------------------------------------------


def _check_rows(name: str, student: Tensor, teacher: Tensor) -> None:
    if student.dim() != 2 or teacher.dim() != 2:
        raise ValueError(
            f"{name}: expected (G, V_s) and (G, V_t) log-probs, got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"{name}: {student.shape[0]} student rows but {teacher.shape[0]} teacher rows; pair them first "
            "(align_distributions)"
        )


def _sorted_l1(student_probs: Tensor, teacher_probs: Tensor) -> Tensor:
    """Σ_v |sort↓(q)_v − sort↓(p)_v| per row, the shorter vocabulary zero-padded after sorting."""
    q = student_probs.sort(dim=-1, descending=True).values
    p = teacher_probs.sort(dim=-1, descending=True).values
    width = max(q.shape[-1], p.shape[-1])
    q = F.pad(q, (0, width - q.shape[-1]))
    p = F.pad(p, (0, width - p.shape[-1]))
    return (q - p).abs().sum(-1)


def uld_loss(student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
    """ULD of one example: sorted-probability L1 summed over the vocabulary, mean over the G rows.

    Sorting forgets which token is which, so two unrelated vocabularies can be compared; the price is that
    only the *shape* of the distribution is taught. No rows gives 0 (still attached to the student).
    """
    _check_rows("uld_loss", student_logprobs, teacher_logprobs)
    dtype = loss_dtype(student_logprobs)
    q = student_logprobs.to(dtype).exp()
    p = teacher_logprobs.detach().to(device=q.device, dtype=dtype).exp()
    return _sorted_l1(q, p).sum() / max(q.shape[0], 1)


def align_batch(
    student_logprobs: Sequence[Tensor],
    teacher_logprobs: Sequence[Tensor],
    *,
    align: Align = "text",
    groups: Sequence[Sequence[Group]] | None = None,
    student_token_ids: Sequence[Tensor] | None = None,
    teacher_token_ids: Sequence[Tensor] | None = None,
    teacher_observed_logprobs: Sequence[Tensor] | None = None,
    strategy: MergeStrategy = "observed",
) -> list[tuple[Tensor, Tensor]]:
    """`align_distributions` of each example, from parallel per-example lists (one entry per example)."""
    n = len(student_logprobs)
    lists = {
        "teacher_logprobs": teacher_logprobs,
        "groups": groups,
        "student_token_ids": student_token_ids,
        "teacher_token_ids": teacher_token_ids,
        "teacher_observed_logprobs": teacher_observed_logprobs,
    }
    for name, values in lists.items():
        if values is not None and len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries for {n} student examples")
    return [
        align_distributions(
            student_logprobs[i],
            teacher_logprobs[i],
            align=align,
            groups=_nth(groups, i),
            student_token_ids=_nth(student_token_ids, i),
            teacher_token_ids=_nth(teacher_token_ids, i),
            teacher_observed_logprobs=_nth(teacher_observed_logprobs, i),
            strategy=strategy,
        )
        for i in range(n)
    ]


def _nth(values: Sequence[Any] | None, i: int) -> Any:
    return None if values is None else values[i]


def uld_batch(
    student_logprobs: Sequence[Tensor],
    teacher_logprobs: Sequence[Tensor],
    *,
    align: Align = "text",
    groups: Sequence[Sequence[Group]] | None = None,
    student_token_ids: Sequence[Tensor] | None = None,
    teacher_token_ids: Sequence[Tensor] | None = None,
    teacher_observed_logprobs: Sequence[Tensor] | None = None,
    strategy: MergeStrategy = "observed",
) -> Tensor:
    """Batch mean of `uld_loss` over examples of different lengths (lists of (T, V) rows per example).

    As in the reference, an example with no aligned row contributes 0 and still counts in the mean.
    """
    if not student_logprobs:
        raise ValueError("uld_batch: empty batch, no examples")
    pairs = align_batch(
        student_logprobs,
        teacher_logprobs,
        align=align,
        groups=groups,
        student_token_ids=student_token_ids,
        teacher_token_ids=teacher_token_ids,
        teacher_observed_logprobs=teacher_observed_logprobs,
        strategy=strategy,
    )
    return torch.stack([uld_loss(s, t) for s, t in pairs]).mean()


# ---- GOLD hybrid ---------------------------------------------------------------------------------


def vocab_map(student_tokenizer: Any, teacher_tokenizer: Any) -> tuple[Tensor, Tensor]:
    """(student ids, teacher ids) of the tokens whose raw `get_vocab()` strings are equal, by teacher id.

    Exact string match, as TRL: "Ġx" (byte-level BPE) and "▁x" (SentencePiece) are different strings, so
    two tokenizer families share little beyond single characters. Raw strings are not text: a byte-level
    vocabulary's "ä" is the glyph of the byte 0xE4, yet it matches a character vocabulary's letter "ä".
    The map is one-to-one.
    """
    student_vocab = student_tokenizer.get_vocab()
    pairs: list[tuple[int, int]] = []
    used_student: set[int] = set()
    for token, teacher_id in sorted(teacher_tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        student_id = student_vocab.get(token)
        if student_id is not None and student_id not in used_student:
            used_student.add(student_id)
            pairs.append((student_id, teacher_id))
    student_ids = torch.tensor([s for s, _ in pairs], dtype=torch.long)
    teacher_ids = torch.tensor([t for _, t in pairs], dtype=torch.long)
    return student_ids, teacher_ids


def hybrid_weights(
    n_matched: int, teacher_vocab_size: int, matched_weight: float | None, unmatched_weight: float | None
) -> tuple[float, float]:
    """(w_m, w_u): by default the matched share of the teacher's vocabulary and the rest; one given
    weight sets the other to its complement, two given weights are used as they are."""
    if matched_weight is None and unmatched_weight is None:
        w_m = n_matched / max(teacher_vocab_size, 1)
        return w_m, 1.0 - w_m
    w_m = 1.0 - float(unmatched_weight or 0.0) if matched_weight is None else float(matched_weight)
    w_u = 1.0 - w_m if unmatched_weight is None else float(unmatched_weight)
    for name, w in (("matched_weight", w_m), ("unmatched_weight", w_u)):
        if not (w >= 0 and math.isfinite(w)):
            raise ValueError(f"gold_loss: {name}={w!r} must be a finite number >= 0")
    return w_m, w_u


def _check_ids(name: str, ids: Tensor, width: int) -> Tensor:
    ids = torch.as_tensor(ids).long()
    if ids.dim() != 1:
        raise ValueError(f"gold_loss: {name} must be 1-D, got shape {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= width):
        raise ValueError(
            f"gold_loss: {name} span [{int(ids.min())}, {int(ids.max())}], outside the {width} columns of the "
            "log-probs; slice padded heads to the tokenizer length and drop ids the head does not have"
        )
    return ids


def gold_loss(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    student_ids: Tensor,
    teacher_ids: Tensor,
    *,
    beta: float = 0.5,
    matched_weight: float | None = None,
    unmatched_weight: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GOLD's hybrid loss of one example: w_m·JSD(β) on matched columns + w_u·sorted L1 on the rest.

    Matched columns (`vocab_map`) name the same string on both sides, so they are compared one to one
    with kdray's generalised JSD(β) on the raw, un-renormalised probabilities floored at 1e-8 (as TRL).
    The unmatched columns have no correspondence and get ULD's sorted L1; if one side has none left, the
    other side is compared with zeros (ULD's padding rule; TRL skips the term, which changes the value by
    a teacher-only constant and not the gradient). Both parts are means over the G rows. Returns the total
    and the two unweighted parts, detached for logging.
    """
    _check_rows("gold_loss", student_logprobs, teacher_logprobs)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"gold_loss: beta={beta!r} is outside [0, 1]")
    v_s, v_t = student_logprobs.shape[-1], teacher_logprobs.shape[-1]
    dtype = loss_dtype(student_logprobs)
    log_q = student_logprobs.to(dtype)
    log_p = teacher_logprobs.detach().to(device=log_q.device, dtype=dtype)
    s_ids = _check_ids("student_ids", student_ids, v_s).to(log_q.device)
    t_ids = _check_ids("teacher_ids", teacher_ids, v_t).to(log_q.device)
    if s_ids.numel() != t_ids.numel():
        raise ValueError(
            f"gold_loss: {s_ids.numel()} student_ids but {t_ids.numel()} teacher_ids; use vocab_map"
        )
    rows = max(log_q.shape[0], 1)
    if s_ids.numel():
        per_row = jsd_from_logprobs(
            log_q[:, s_ids].clamp_min(_LOG_FLOOR), log_p[:, t_ids].clamp_min(_LOG_FLOOR), beta=beta
        )
        matched = per_row.sum() / rows
    else:  # nothing to compare one to one; the unmatched part carries the graph
        matched = log_q.new_zeros(())
    s_rest = torch.ones(v_s, dtype=torch.bool, device=log_q.device).index_fill(0, s_ids, False)
    t_rest = torch.ones(v_t, dtype=torch.bool, device=log_q.device).index_fill(0, t_ids, False)
    unmatched = _sorted_l1(log_q[:, s_rest].exp(), log_p[:, t_rest].exp()).sum() / rows
    w_m, w_u = hybrid_weights(int(t_ids.numel()), v_t, matched_weight, unmatched_weight)
    total = w_m * matched + w_u * unmatched
    return total, {"matched": matched.detach(), "unmatched": unmatched.detach()}
