"""SFT only: cross-entropy on the data's responses, no teacher (the baseline every table compares to)."""

from kdray.methods.base import Method

METHOD = Method(
    name="sft",
    summary="cross-entropy on the references; the student trained alone",
    terms=({"name": "ce", "weight": 1.0, "params": {}},),
    needs=frozenset(),
    data="off_policy",
    tokenizer="text_only",
    reference="supervised fine-tuning (no teacher)",
)
