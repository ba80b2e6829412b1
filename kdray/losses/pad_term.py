"""PAD's loss term: the student's rewards of a prompt's n responses ranked against the teacher's.

A prompt's n responses arrive as n consecutive rows of one micro-batch, each with its `group_pos`
(0..n−1, its place in the group) and the `teacher_reward` the data preparation gave it
(`kdray.train.pad_data`). Per row the student's reward is β · mean log q over the response's tokens
(`kdray.losses.pad.student_rewards`); the rows are reshaped to (groups, n) and `pad_loss` compares the
two Plackett–Luce ranking distributions. The term is averaged over the *global* number of groups of the
step (`num_groups` in the batch), as AVA-p's pairs are, so gradient accumulation and data parallelism
leave it unchanged. It reads no teacher signal: the teacher's judgement is in the rows.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kdray.losses.pad import pad_loss, student_rewards
from kdray.losses.signal import token_cross_entropy

Tensor = torch.Tensor

#: per-row columns of PAD's training rows: the place of the row in its prompt's group, the teacher's reward
GROUP_KEY = "group_pos"
REWARD_KEY = "teacher_reward"


class GroupLayoutError(ValueError):
    """The rows of a micro-batch are not whole groups at positions (n·g, …, n·g + n − 1)."""


def group_size(group_pos: Tensor) -> int:
    """n of a micro-batch laid out in whole groups; raises GroupLayoutError naming the first bad row.

    A group split across micro-batches or workers would rank one prompt's responses against another's,
    silently: the pipeline cuts rows into whole groups (`kdray.data.pipeline.grouped_rows`) and this
    check says so loudly if that ever fails.
    """
    pos = group_pos.detach().reshape(-1).long().cpu()
    n = int(pos.max()) + 1 if pos.numel() else 0
    if n < 2 or pos.numel() % n:
        raise GroupLayoutError(
            f"a micro-batch of {pos.numel()} rows has group positions up to {n - 1}: PAD needs whole groups "
            "of n >= 2 responses, so train.batch_size must be a multiple of method_params.n"
        )
    expected = torch.arange(pos.numel()) % n
    bad = (pos != expected).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise GroupLayoutError(
            f"micro-batch row {i} has group_pos {int(pos[i])}, expected {int(expected[i])} (groups of {n}): "
            "a prompt's responses were split across micro-batches or workers; feed them through "
            "kdray.data.pipeline.grouped_rows"
        )
    return n


def pad_term(
    student_logits: Tensor,
    batch: Mapping[str, Tensor],
    teacher_signal: Mapping[str, Tensor] | None = None,
    *,
    num_tokens: int | Tensor | None = None,
    chunk_size: int | None = None,
    beta: float = 10.0,
    loss: str = "jsd",
    jsd_form: str = "textbook",
) -> tuple[Tensor, dict[str, Tensor]]:
    """The objective's `pad` term: `pad_loss` summed over this micro-batch's groups / `num_groups`.

    `batch` holds `target_ids`, `mask` (every row's response positions), `group_pos` and
    `teacher_reward` (B,), and `num_groups` (the step's global count; default: this micro-batch's).
    Sub-terms (logged, not optimised, on the same global scale): `top1`, the share of groups whose
    student's best response is the teacher's, and `student_reward`, the mean student reward.
    """
    for key, hint in (
        (GROUP_KEY, "PAD's grouped rows, built by kdray.train.pad_data"),
        (REWARD_KEY, "the teacher's reward of each response, built by kdray.train.pad_data"),
        ("target_ids", "the response tokens"),
        ("mask", "the response positions"),
    ):
        if key not in batch:
            raise KeyError(f"loss term 'pad' needs batch[{key!r}] ({hint}); the batch has {sorted(batch)}")
    n = group_size(batch[GROUP_KEY])
    rows, width = batch["target_ids"].shape
    groups = rows // n
    logq = -token_cross_entropy(student_logits, batch["target_ids"], chunk_size=chunk_size)
    student = student_rewards(
        logq.reshape(groups, n, width), batch["mask"].reshape(groups, n, width), beta=beta
    )
    teacher = batch[REWARD_KEY].reshape(groups, n).to(student.device)
    num_groups = batch.get("num_groups")
    denom = float(groups if num_groups is None else max(int(num_groups), 1))
    value = pad_loss(student, teacher, loss, jsd_form=jsd_form) * (groups / denom)
    with torch.no_grad():
        top1 = (student.argmax(-1) == teacher.argmax(-1)).to(student.dtype).sum() / denom
        subs = {"top1": top1, "student_reward": student.detach().mean(-1).sum() / denom}
    return value, subs
