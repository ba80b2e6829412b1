"""Alignment by text of two tokenizations of one response (METHODS.md §4; docs/cross_tokenizer.md).

Why its own module: pairing a student's tokens with a teacher's by the characters they cover is needed
by the teacher's scorer (`kdray.teacher.cross_signal`, on the tokenizers alone) and by the losses
(`kdray.losses.cross_tokenizer`, on the groups it returns); neither needs the other's code.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Span = tuple[int, int]
#: the student's token indices and the teacher's that cover the same characters of the response
Group = tuple[list[int], list[int]]


def normalise_offsets(offsets: Sequence[Sequence[int]], text_length: int | None = None) -> list[Span]:
    """Make a tokenizer's character spans a contiguous partition of the text, in token order.

    Fast tokenizers do not all cover the text exactly: with `trim_offsets` a "Ġworld" token reports
    (6, 11) for " world" and a run of spaces may report an empty span; byte-level BPE splits a multi-byte
    character over two tokens that both claim it ("ĠÃ" (17, 19), "¼" (18, 19) for " ü"). The rule: each
    token starts where the previous one ended (a gap goes to the token *after* it, where "Ġ"/"▁" tokens
    carry their leading space; an overlap is taken off the later token), ends no earlier than it starts,
    and the last token runs to `text_length` (stripped trailing text joins it). A token left with an
    empty span is the tail of its predecessor, and `align_tokens` keeps it in its predecessor's group.
    """
    out: list[Span] = []
    cursor = 0
    for k, pair in enumerate(offsets):
        start, end = int(pair[0]), int(pair[1])
        if start < 0 or end < start:
            raise ValueError(
                f"offsets[{k}]=({start}, {end}) is not a character span (need 0 <= start <= end)"
            )
        end = max(end, cursor)
        out.append((cursor, end))
        cursor = end
    if text_length is not None:
        if cursor > text_length:
            raise ValueError(
                f"offsets reach character {cursor}, past the text's length {text_length}; "
                "pass the offsets of this very text"
            )
        if out and cursor < text_length:
            out[-1] = (out[-1][0], text_length)
    return out


def response_offsets(tokenizer: Any, text: str) -> list[Span]:
    """Character spans of the tokens of `text` tokenised alone, normalised by `normalise_offsets`.

    The tokens are those of `tokenizer(text, add_special_tokens=False)`, i.e. what
    `kdray.models.prompts.encode_response` produces before it appends EOS.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(
            f"{type(tokenizer).__name__} is not a fast tokenizer, so it has no offset mapping; load it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True)"
        )
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return normalise_offsets(enc["offset_mapping"], len(text))


def align_tokens(
    student_offsets: Sequence[Sequence[int]], teacher_offsets: Sequence[Sequence[int]]
) -> list[Group]:
    """Group the tokens of one response so that each group covers the same characters on both sides.

    Walks both token lists, extending the side whose current end is earlier, and closes a group when both
    ends coincide (the byte-offset walk of TRL GOLD, on characters). Before closing, tokens ending no later
    than the shared end (empty spans after `normalise_offsets`: the second half of a split character) join
    the group, so no group starts in the middle of a character. When one side runs out first, everything
    left forms a final group; a group with an empty side carries no comparison and is dropped. Only the
    ends are read; with offsets from `response_offsets` the groups partition the text.
    """
    s_end = [int(pair[1]) for pair in student_offsets]
    t_end = [int(pair[1]) for pair in teacher_offsets]
    ns, nt = len(s_end), len(t_end)
    groups: list[Group] = []
    i = j = 0
    while i < ns and j < nt:
        s_group, t_group = [i], [j]
        e_s, e_t = s_end[i], t_end[j]
        i, j = i + 1, j + 1
        while e_s != e_t:
            if e_s < e_t and i < ns:
                s_group.append(i)
                e_s, i = max(e_s, s_end[i]), i + 1
            elif e_t < e_s and j < nt:
                t_group.append(j)
                e_t, j = max(e_t, t_end[j]), j + 1
            else:  # the side that is behind has no tokens left: the rest is one last group
                s_group.extend(range(i, ns))
                t_group.extend(range(j, nt))
                i, j = ns, nt
                break
        while i < ns and s_end[i] <= e_s:
            s_group.append(i)
            i += 1
        while j < nt and t_end[j] <= e_t:
            t_group.append(j)
            j += 1
        groups.append((s_group, t_group))
    return groups  # tokens left on one side only would form a group with an empty side: dropped


def response_groups(
    student_tokenizer: Any, teacher_tokenizer: Any, text: str, *, eos: bool = True
) -> list[Group]:
    """Groups for a response tokenised as `encode_response` does on each side (text tokens, then EOS).

    EOS has no text, so the walk cannot place it; with `eos=True` the two EOS positions form their own
    last group (ULD's `skip_*_eos` corresponds to `eos=False`).
    """
    s_offsets = response_offsets(student_tokenizer, text)
    t_offsets = response_offsets(teacher_tokenizer, text)
    groups = align_tokens(s_offsets, t_offsets)
    if eos:
        groups.append(([len(s_offsets)], [len(t_offsets)]))
    return groups
