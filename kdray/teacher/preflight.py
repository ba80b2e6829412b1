"""Preflight: compare teacher and student vocabularies before any weights load (METHODS.md §4).

Token-level distillation pairs the teacher's and the student's distributions id by id; with different
tokenizers that pairing is silently wrong. Tokenizers and configs are small files, so the check costs
a second, while a mismatch found after loading a 7B teacher onto a GPU costs minutes. Which pairs a run
accepts comes from its declarations: the method's tokenizer rule (`Method.tokenizer`) and the
cross-tokenizer loss it chose (`objective.cross_tokenizer`). `preflight_config` runs the check from a
config alone, at the start of the workflow and of `distill`, before any teacher or data pass.
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
    cross_tokenizer: str | None = None,
    teacher_name: str = "teacher",
    student_name: str = "student",
) -> VocabPlan:
    """The slicing plan for two tokenizers and head sizes, or a VocabularyMismatchError naming both.

    Which pairs are accepted is declared: any pair for a text-only method or a method whose rule is
    `cross_tokenizer`, or when a cross-tokenizer loss (`uld`, `gold`) is chosen; equal vocabularies
    otherwise."""
    if isinstance(method, str):
        method = get_method(method)
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    same = teacher_vocab == student_vocab
    size = len(teacher_tokenizer) if same else min(len(teacher_tokenizer), len(student_tokenizer))
    accepts_any = method.tokenizer in ("text_only", "cross_tokenizer") or cross_tokenizer is not None
    if not same and not accepts_any:
        text_only = sorted(name for name, m in METHODS.items() if m.text_only)
        only_t = sorted(set(teacher_vocab) - set(student_vocab))[:5]
        moved = sorted(
            t for t in set(teacher_vocab) & set(student_vocab) if teacher_vocab[t] != student_vocab[t]
        )[:5]
        raise VocabularyMismatchError(
            f"method {method.name!r} compares token distributions, but the tokenizers differ: teacher "
            f"{_describe(teacher_name, teacher_tokenizer, teacher_head)} vs student "
            f"{_describe(student_name, student_tokenizer, student_head)}; e.g. tokens only in the teacher: "
            f"{only_t}, tokens with different ids: {moved}. Set objective.cross_tokenizer: uld or gold (a "
            f"cross-tokenizer loss on the response text both cover), use a text-only method "
            f"({', '.join(text_only)}), or a student with the teacher's tokenizer."
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
    cross_tokenizer: str | None = None,
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
        cross_tokenizer=cross_tokenizer,
        teacher_name=teacher,
        student_name=student,
    )


def shares_teacher_tokenizer(model: Any) -> bool:
    """A student built in code (`tiny`) or cut from the teacher uses the teacher's tokenizer by design."""
    return model.name_or_path in ("tiny", "teacher") or model.init == "layer_pruned"


def student_tokenizer_path(cfg: Any, teacher_path: str | None) -> str:
    """Where the student's tokenizer comes from: the teacher's for a student that shares it (`tiny` with
    no teacher is the character tokenizer), else the student's own model."""
    if shares_teacher_tokenizer(cfg.model):
        return teacher_path or "tiny"
    return cfg.model.name_or_path


def preflight_config(cfg: Any, teacher_path: str | None = None) -> VocabPlan | None:
    """The tokenizer check of a run, from tokenizer and config files only (no weights, no data).

    `teacher_path` is the resolved teacher (what `distill` is given); None reads it from the config,
    where `tiny` is a teacher the workflow trains from scratch with kdray's character tokenizer, known
    before it exists. None is returned when the student shares the teacher's tokenizer by design.
    """
    if shares_teacher_tokenizer(cfg.model):
        return None
    t, m = cfg.teacher, cfg.model
    method, loss = get_method(cfg.objective.method), cfg.objective.cross_tokenizer
    if teacher_path is None and t.name_or_path == "tiny":
        from kdray.models.loading import load_model_config, load_tokenizer
        from kdray.models.tokenizer import char_tokenizer

        teacher_tokenizer = char_tokenizer()
        student = {"revision": m.revision, "gguf_file": m.gguf_file}
        return check_vocabularies(
            teacher_tokenizer,
            load_tokenizer(m.name_or_path, **student),
            teacher_head=len(teacher_tokenizer),
            student_head=load_model_config(m.name_or_path, **student).vocab_size,
            method=method,
            cross_tokenizer=loss,
            teacher_name="tiny (trained from scratch by the workflow with the character tokenizer)",
            student_name=m.name_or_path,
        )
    configured = teacher_path is None or teacher_path == t.name_or_path
    return preflight(
        teacher_path or t.name_or_path, m.name_or_path, method=method, cross_tokenizer=loss,
        teacher_revision=t.revision if configured else None, teacher_gguf=t.gguf_file if configured else None,
        student_revision=m.revision, student_gguf=m.gguf_file,
    )  # fmt: skip


def preflight_workflow(cfg: Any) -> VocabPlan | None:
    """`preflight_config` at the start of the workflow (and of a sweep's shared teacher pass)."""
    return preflight_config(cfg)


def preflight_summary(cfg: Any) -> str:
    """`preflight_workflow`, said in a line for `kdray config`: the check `kdray run` makes before any
    step (raises what it would raise, naming both tokenizers and the fix)."""
    plan = preflight_workflow(cfg)
    if plan is None:
        how = "is built in code" if cfg.model.name_or_path == "tiny" else "starts from the teacher"
        return f"[preflight] tokenizers: the student {how} and uses the teacher's tokenizer"
    if plan.same_tokenizer:
        sliced = (
            f"; heads of {plan.teacher_head} (teacher) and {plan.student_head} (student) sliced to it"
            if plan.needs_slicing
            else ""
        )
        return f"[preflight] tokenizers: teacher and student share one vocabulary of {plan.vocab_size} tokens{sliced}"
    return (
        f"[preflight] tokenizers differ (teacher head {plan.teacher_head}, student head {plan.student_head}): "
        f"accepted for method {cfg.objective.method!r}"
        + (
            f" with cross_tokenizer {cfg.objective.cross_tokenizer!r}"
            if cfg.objective.cross_tokenizer
            else ""
        )
    )
