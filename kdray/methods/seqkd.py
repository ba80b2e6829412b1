"""SeqKD: cross-entropy on the teacher's own generations (Kim & Rush 2016)."""

from kdray.methods.base import Method

METHOD = Method(
    name="seqkd",
    summary="cross-entropy on teacher-generated responses (greedy by default)",
    terms=({"name": "ce", "weight": 1.0, "params": {}},),
    needs=frozenset({"generations"}),
    data="off_policy",
    tokenizer="text_only",
    generations=True,
    reference="Kim & Rush 2016, Sequence-Level Knowledge Distillation (beam search)",
    deviations=(
        "Teacher generations are greedy (objective.generation_temperature: 0), not beam search: "
        "one pass of the served teacher per row.",
    ),
)
