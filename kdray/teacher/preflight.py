"""Preflight: compare teacher and student vocabularies before any weights load (METHODS.md §4).

Token-level distillation pairs the teacher's and the student's distributions id by id; with different
tokenizers that pairing is silently wrong. Tokenizers and configs are small files, so the check costs
a second, while a mismatch found after loading a 7B teacher onto a GPU costs minutes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kdray.methods import METHODS, Method, get_method


class VocabularyMismatchError(ValueError):
    """Teacher and student tokenizers differ for a method that compares token distributions."""


@dataclass(frozen=True)
class VocabPlan:
    """What the losses must do with the two heads: slice both to `vocab_size` when they are padded."""

    same_tokenizer: bool
    vocab_size: int
    teacher_head: int
    student_head: int

    @property
    def needs_slicing(self) -> bool:
        """True when either head is wider than the tokenizer (padded for hardware efficiency)."""
        return self.teacher_head != self.vocab_size or self.student_head != self.vocab_size


def _describe(name: str, tokenizer: Any, head: int) -> str:
    return f"{name} ({type(tokenizer).__name__}, {len(tokenizer)} tokens, head {head})"


def check_vocabularies(
    teacher_tokenizer: Any,
    student_tokenizer: Any,
    *,
    teacher_head: int,
    student_head: int,
    method: str | Method,
    teacher_name: str = "teacher",
    student_name: str = "student",
) -> VocabPlan:
    """The slicing plan for two tokenizers and head sizes, or a VocabularyMismatchError naming both.

    Which pairs are accepted is the method's declared tokenizer rule (`kdray.methods`)."""
    if isinstance(method, str):
        method = get_method(method)
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    same = teacher_vocab == student_vocab
    size = len(teacher_tokenizer) if same else min(len(teacher_tokenizer), len(student_tokenizer))
    if not same and not method.text_only:
        text_only = sorted(name for name, m in METHODS.items() if m.text_only)
        only_t = sorted(set(teacher_vocab) - set(student_vocab))[:5]
        moved = sorted(
            t for t in set(teacher_vocab) & set(student_vocab) if teacher_vocab[t] != student_vocab[t]
        )[:5]
        raise VocabularyMismatchError(
            f"method {method.name!r} compares token distributions, but the tokenizers differ: teacher "
            f"{_describe(teacher_name, teacher_tokenizer, teacher_head)} vs student "
            f"{_describe(student_name, student_tokenizer, student_head)}; e.g. tokens only in the teacher: "
            f"{only_t}, tokens with different ids: {moved}. Use a student with the teacher's tokenizer, or a "
            f"text-only method ({', '.join(text_only)})."
        )
    for who, head, tok in (
        ("teacher", teacher_head, teacher_tokenizer),
        ("student", student_head, student_tokenizer),
    ):
        if same and head < len(tok):
            raise VocabularyMismatchError(
                f"the {who} head has {head} outputs but its tokenizer has {len(tok)} tokens: ids past "
                f"{head - 1} could never be predicted; the checkpoint and tokenizer do not belong together"
            )
    return VocabPlan(same, size, teacher_head, student_head)


def preflight(
    teacher: str,
    student: str,
    *,
    method: str | Method,
    teacher_revision: str | None = None,
    student_revision: str | None = None,
    teacher_gguf: str | None = None,
    student_gguf: str | None = None,
) -> VocabPlan:
    """Load only tokenizers and configs of both models and return the VocabPlan (or refuse)."""
    from kdray.models.loading import load_model_config, load_tokenizer

    t_tok = load_tokenizer(teacher, revision=teacher_revision, gguf_file=teacher_gguf)
    s_tok = load_tokenizer(student, revision=student_revision, gguf_file=student_gguf)
    t_cfg = load_model_config(teacher, revision=teacher_revision, gguf_file=teacher_gguf)
    s_cfg = load_model_config(student, revision=student_revision, gguf_file=student_gguf)
    return check_vocabularies(
        t_tok,
        s_tok,
        teacher_head=t_cfg.vocab_size,
        student_head=s_cfg.vocab_size,
        method=method,
        teacher_name=teacher,
        student_name=student,
    )
