"""The common example record and the task adapters that turn raw rows into it.

A record is a plain dict: `prompt: str`, `response: str`, `answer: str | None` (GSM8K-style tasks:
the final number, used by exact-match evaluation) and `id: str | None`. Every record of one task has
the same keys, because Ray Data infers one schema per block and a key missing in some rows breaks it.

Adapters raise `MalformedRow` naming the file, the 1-based line, the field and the fix, so a bad row in
a 7,000-line file is found in seconds; the readers decide whether to skip it (counted) or stop.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "ADAPTERS",
    "DEFAULT_PREFIXES",
    "MalformedRow",
    "Record",
    "adapt_row",
    "gsm8k_record",
    "parse_gsm8k_answer",
    "summarization_record",
    "translation_record",
]

Record = dict[str, Any]

#: Prompt prefixes per task; None = the raw question is the prompt (GSM8K is asked as written).
DEFAULT_PREFIXES: dict[str, str | None] = {
    "gsm8k": None,
    "arithmetic": None,
    "translation": "Translate English to German: ",
    "summarization": "Summarize: ",
}

# GSM8K writes "#### 1,234"; a few community variants use negatives or decimals, which we keep verbatim.
_FINAL = re.compile(r"####\s*(-?[\d,]*\.?\d+)\s*$")


class MalformedRow(ValueError):
    """A raw row lacks a field of its task or has it in the wrong shape.

    `field` is None when the line itself is unusable (not JSON, not an object).
    """

    def __init__(self, source: str, line_no: int, field: str | None, reason: str, fix: str = "") -> None:
        self.source, self.line_no, self.field, self.reason, self.fix = source, line_no, field, reason, fix
        where = f"field {field!r}" if field else "the whole line"
        message = f"{source}:{line_no}: malformed row ({where}): {reason}"
        super().__init__(f"{message}; fix: {fix}" if fix else message)

    def __reduce__(self) -> tuple[Any, ...]:
        # exceptions pickle through `args` by default, which would lose the structured fields (Ray ships them)
        return (type(self), (self.source, self.line_no, self.field, self.reason, self.fix))


def text_field(row: Mapping[str, Any], keys: tuple[str, ...], source: str, line_no: int) -> str:
    """The first of `keys` present in the row, as a non-empty string (else MalformedRow on that key)."""
    key = next((k for k in keys if k in row), None)
    if key is None:
        raise MalformedRow(
            source,
            line_no,
            keys[0],
            f"missing (the row has {sorted(row)})",
            f"add a {' or '.join(repr(k) for k in keys)} field",
        )
    value = row[key]
    if not isinstance(value, str):
        raise MalformedRow(
            source, line_no, key, f"is {type(value).__name__}, not a string", "store the text as a string"
        )
    if not value.strip():
        raise MalformedRow(source, line_no, key, "is empty", "drop the row or fill in the text")
    return value


def _row_id(row: Mapping[str, Any]) -> str | None:
    value = row.get("id")
    return None if value is None else str(value)


def parse_gsm8k_answer(text: str) -> str | None:
    """The final number after `####` with thousands separators removed; None when there is none."""
    match = _FINAL.search(text.strip())
    return match.group(1).replace(",", "") if match else None


def gsm8k_record(
    row: Mapping[str, Any], *, source: str = "<row>", line_no: int = 1, prefix: str | None = None
) -> Record:
    """`{question, answer}` -> prompt = question, response = the full answer (chain of thought and `#### n`)."""
    question = text_field(row, ("question",), source, line_no)
    answer_text = text_field(row, ("answer",), source, line_no)
    final = parse_gsm8k_answer(answer_text)
    if final is None:
        raise MalformedRow(
            source,
            line_no,
            "answer",
            f"no final '#### <number>' line (it ends with {answer_text.strip()[-40:]!r})",
            "end the answer with a line '#### <number>' as GSM8K does",
        )
    return {"prompt": (prefix or "") + question, "response": answer_text, "answer": final, "id": _row_id(row)}


def translation_record(
    row: Mapping[str, Any], *, source: str = "<row>", line_no: int = 1, prefix: str | None = None
) -> Record:
    """`{source, target}` or `{en, de}` (or HF's `{translation: {en, de}}`) -> prefixed source, target."""
    if isinstance(row.get("translation"), Mapping):  # the layout of the HF wmt*/multi30k datasets
        row = {**row, **row["translation"]}
    text = text_field(row, ("source", "en"), source, line_no)
    target = text_field(row, ("target", "de"), source, line_no)
    prefix = DEFAULT_PREFIXES["translation"] if prefix is None else prefix
    return {"prompt": prefix + text, "response": target, "answer": None, "id": _row_id(row)}


def summarization_record(
    row: Mapping[str, Any], *, source: str = "<row>", line_no: int = 1, prefix: str | None = None
) -> Record:
    """`{document, summary}` (XSum) or `{article, highlights}` (CNN/DailyMail) -> prefixed document, summary."""
    document = text_field(row, ("document", "article"), source, line_no)
    summary = text_field(row, ("summary", "highlights"), source, line_no)
    prefix = DEFAULT_PREFIXES["summarization"] if prefix is None else prefix
    return {"prompt": prefix + document, "response": summary, "answer": None, "id": _row_id(row)}


#: task name (DataConfig.task) -> adapter; generated arithmetic uses the GSM8K format.
ADAPTERS: dict[str, Callable[..., Record]] = {
    "gsm8k": gsm8k_record,
    "arithmetic": gsm8k_record,
    "translation": translation_record,
    "summarization": summarization_record,
}


def adapt_row(
    task: str, row: Any, *, source: str = "<row>", line_no: int = 1, prefix: str | None = None
) -> Record:
    """Apply the task's adapter to one raw row; a non-dict row is malformed as a whole."""
    if task not in ADAPTERS:
        raise ValueError(f"task {task!r} is not one of {sorted(ADAPTERS)}")
    if not isinstance(row, Mapping):
        raise MalformedRow(
            source,
            line_no,
            None,
            f"is a JSON {type(row).__name__}, not an object",
            "write one JSON object a line",
        )
    return ADAPTERS[task](row, source=source, line_no=line_no, prefix=prefix)
