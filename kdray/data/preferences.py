"""Preference pairs (prompt, chosen, rejected): read from files or the hub, or generated on arithmetic.

A pair record is also a demonstration record: `{prompt, response, chosen, rejected, answer, id}` with
`response` = the chosen response, so everything that reads demonstrations (evaluation, the SFT
baseline, X-KD's imitation) reads the chosen response, and only what knows about pairs (AVA-p's
preference term, `kdray.reward.preference_accuracy`) reads the rejected one.

Two layouts are read, the two that preference datasets use:
- plain strings: `{"prompt": ..., "chosen": ..., "rejected": ...}`;
- conversational: `chosen`/`rejected` are message lists (`[{"role": "user", ...}, {"role": "assistant",
  ...}]`) whose last message is the assistant's response; the prompt is the `prompt` field (a string or
  a message list) or else the last user message before that response. kdray renders one user turn, so
  earlier turns of a multi-turn conversation are not kept.

The files go through `kdray.data.readers` (jsonl, json, parquet, a `{split}.jsonl` directory, an HF
dataset by name or a local one saved with `save_to_disk`), so a malformed row is reported with its file,
row and field exactly as for demonstrations. The generated pairs (`arithmetic_pairs`) make a worked
answer's twin with one arithmetic slip, carried consistently through the later lines.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from kdray.data.records import MalformedRow, Record, parse_gsm8k_answer

if TYPE_CHECKING:
    from kdray.data.readers import ReadResult

__all__ = [
    "arithmetic_pair_splits",
    "arithmetic_pairs",
    "is_pair",
    "pair_record",
    "pair_rows",
    "read_preferences",
    "slip_answer",
]

_EXACT_MATCH_TASKS = ("gsm8k", "arithmetic")


def is_pair(record: Mapping[str, Any]) -> bool:
    """True for a preference pair record (it has a rejected response)."""
    return record.get("rejected") is not None


# --- one raw row -> a pair record ---------------------------------------------------------------------


def _messages(value: Any, key: str, source: str, line_no: int) -> list[Mapping[str, Any]]:
    """A message list with a string `role` and `content` in every message (else MalformedRow on `key`)."""
    if not value:
        raise MalformedRow(source, line_no, key, "is an empty message list", "drop the row")
    for i, m in enumerate(value):
        if not (
            isinstance(m, Mapping) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        ):
            raise MalformedRow(
                source, line_no, key, f"message {i} is not {{'role': str, 'content': str}} (got {m!r:.80})",
                "write each message as an object with string 'role' and 'content'",
            )  # fmt: skip
    return list(value)


def _last_user(messages: Sequence[Mapping[str, Any]], key: str, source: str, line_no: int) -> str:
    users = [m["content"] for m in messages if m["role"] == "user"]
    if not users:
        raise MalformedRow(
            source, line_no, key, "has no user message to take the prompt from",
            "add a 'prompt' field or a user turn before the assistant's response",
        )  # fmt: skip
    return users[-1]


def _response(row: Mapping[str, Any], key: str, source: str, line_no: int) -> tuple[str, str | None]:
    """(response text, the prompt its conversation implies or None) of `row[key]`, string or messages."""
    if key not in row or row[key] is None:
        raise MalformedRow(
            source, line_no, key, f"missing (the row has {sorted(row)})",
            "give each row 'prompt', 'chosen' and 'rejected' (strings, or message lists)",
        )  # fmt: skip
    value = row[key]
    if isinstance(value, str):
        text, prompt = value, None
    elif isinstance(value, (list, tuple)):
        messages = _messages(value, key, source, line_no)
        if messages[-1]["role"] != "assistant":
            raise MalformedRow(
                source, line_no, key, f"its last message is from {messages[-1]['role']!r}, not the assistant",
                "end the conversation with the assistant's response",
            )  # fmt: skip
        text = messages[-1]["content"]
        prompt = _last_user(messages[:-1], key, source, line_no) if len(messages) > 1 else None
    else:
        raise MalformedRow(
            source, line_no, key, f"is {type(value).__name__}, not a string or a message list",
            "store the response as a string or as a list of {role, content} messages",
        )  # fmt: skip
    if not text.strip():
        raise MalformedRow(source, line_no, key, "is an empty response", "drop the row or fill in the text")
    return text, prompt


def _prompt(row: Mapping[str, Any], implied: str | None, source: str, line_no: int) -> str:
    value = row.get("prompt")
    if isinstance(value, (list, tuple)):
        value = _last_user(_messages(value, "prompt", source, line_no), "prompt", source, line_no)
    elif value is not None and not isinstance(value, str):
        raise MalformedRow(
            source, line_no, "prompt", f"is {type(value).__name__}, not a string or a message list",
            "store the prompt as a string",
        )  # fmt: skip
    value = value if value is not None else implied
    if value is None:
        raise MalformedRow(
            source, line_no, "prompt", f"missing (the row has {sorted(row)}) and 'chosen' is no conversation",
            "add a 'prompt' field",
        )  # fmt: skip
    if not value.strip():
        raise MalformedRow(source, line_no, "prompt", "is empty", "drop the row or fill in the prompt")
    return value


def pair_record(
    row: Any,
    *,
    task: str = "arithmetic",
    source: str = "<row>",
    line_no: int = 1,
    prefix: str | None = None,
) -> Record:
    """One raw row in either layout -> a pair record; MalformedRow names the file, row and field.

    `answer` is the chosen response's final `#### n` on exact-match tasks (None elsewhere), so the
    pairs' held-out split scores like the task's demonstrations.
    """
    if not isinstance(row, Mapping):
        raise MalformedRow(
            source, line_no, None, f"is a {type(row).__name__}, not an object", "write one JSON object a row"
        )
    chosen, chosen_prompt = _response(row, "chosen", source, line_no)
    rejected, rejected_prompt = _response(row, "rejected", source, line_no)
    if chosen_prompt is not None and rejected_prompt is not None and chosen_prompt != rejected_prompt:
        raise MalformedRow(
            source, line_no, "rejected", "its user turn differs from the chosen conversation's",
            "pair two responses to the same prompt",
        )  # fmt: skip
    prompt = _prompt(row, chosen_prompt or rejected_prompt, source, line_no)
    if chosen == rejected:
        raise MalformedRow(
            source, line_no, "rejected", "is identical to 'chosen': the pair ranks nothing", "drop the row"
        )
    answer = parse_gsm8k_answer(chosen) if task in _EXACT_MATCH_TASKS else None
    row_id = row.get("id")
    return {
        "prompt": (prefix or "") + prompt,
        "response": chosen,
        "chosen": chosen,
        "rejected": rejected,
        "answer": answer,
        "id": None if row_id is None else str(row_id),
    }


# --- files, the hub, the generator -----------------------------------------------------------------


def read_preferences(
    source: str | os.PathLike[str] | None,
    format: str = "auto",
    split: str = "train",
    limit: int | None = None,
    on_malformed: Literal["skip", "fail"] = "skip",
    subset: str | None = None,
    *,
    task: str = "arithmetic",
    prefix: str | None = None,
    seed: int = 0,
    difficulty: int = 2,
) -> ReadResult:
    """The first `limit` good pairs of `split`, as `kdray.data.read_records` reads demonstrations.

    `source=None` (or format `generated`) generates arithmetic pairs (`seed`, `difficulty`; size `limit`,
    else the generator's default split size). Malformed rows are skipped and counted, or stop the read
    (`on_malformed="fail"`); no pair at all is an error.
    """
    from kdray.data.readers import ReadResult, check_not_empty, raw_rows, read_generated, resolve_files

    if on_malformed not in ("skip", "fail"):
        raise ValueError(f"on_malformed={on_malformed!r} is not one of 'skip', 'fail'")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit!r} must be >= 1 (or None for all)")
    if source is None or format == "generated":
        return read_generated(
            task, source, split, limit, seed, difficulty, arithmetic_pairs, "arithmetic pairs"
        )
    source = os.fspath(source)
    fmt, files = resolve_files(source, format, split)
    if fmt == "multi30k":
        raise ValueError(f"{source!r} is a Multi30k translation directory, not preference pairs")
    result = ReadResult(records=[], source=f"{source} ({fmt}, split {split!r}, preference pairs)")
    for label, line_no, row in raw_rows(fmt, source, files, split, subset):
        try:
            if isinstance(row, MalformedRow):
                raise row
            record = pair_record(row, task=task, source=label, line_no=line_no, prefix=prefix)
        except MalformedRow as bad:
            if on_malformed == "fail":
                raise
            result.malformed.append(bad)
            continue
        if record["id"] is None:
            record["id"] = f"{Path(label).name}:{line_no}"
        result.records.append(record)
        if limit is not None and len(result.records) >= limit:
            break
    check_not_empty(result)
    return result


# --- generated pairs: a worked answer and its twin with one slip -------------------------------------

#: one worked line of the generated task: `<text> a op b = c <text>`
_LINE = re.compile(r"^(?P<head>.*?)(?P<a>\d+) (?P<op>[-+*/]) (?P<b>\d+) = (?P<c>\d+)(?P<tail>.*)$")
#: a slip is a small miscount: the result off by 1 to 3 either way
_SLIPS = (-3, -2, -1, 1, 2, 3)


def _apply(op: str, a: int, b: int) -> int | None:
    """a op b when it keeps the task's rules (whole bags, something left), else None."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b if a - b >= 1 else None
    if op == "*":
        return a * b
    return a // b if b and a % b == 0 and a // b >= 1 else None


def slip_answer(answer: str, rng: random.Random) -> str | None:
    """The worked answer with one intermediate result changed by a small slip and the error carried on.

    Every later line starts from the slipped value (as in the generated task, each operation starts from
    the previous result), is recomputed from it, and `#### n` is the new final value: the rejected
    answer is wrong in exactly one step and consistent everywhere else. None when no slip keeps every
    later step valid (a division that would no longer come out even).
    """
    *lines, final = answer.strip().split("\n")
    parsed = [_LINE.match(line) for line in lines]
    if not lines or not all(parsed) or parse_gsm8k_answer(final) is None:
        raise ValueError(f"not a worked answer of the generated arithmetic task: {answer!r}")
    steps = [(m["head"], int(m["a"]), m["op"], int(m["b"]), int(m["c"]), m["tail"]) for m in parsed]  # type: ignore[index]
    for i in range(1, len(steps)):
        if steps[i][1] != steps[i - 1][4]:
            raise ValueError(f"line {i + 1} of {answer!r} does not start from the previous result")
    choices = [(j, d) for j in range(len(steps)) for d in _SLIPS]
    rng.shuffle(choices)
    for j, delta in choices:
        value = steps[j][4] + delta
        if value < 1:
            continue
        out = [f"{h}{a} {op} {b} = {c}{t}" for h, a, op, b, c, t in steps[:j]]
        head, a, op, b, _, tail = steps[j]
        out.append(f"{head}{a} {op} {b} = {value}{tail}")
        for head, _, op, b, _, tail in steps[j + 1 :]:
            nxt = _apply(op, value, b)
            if nxt is None:
                break
            out.append(f"{head}{value} {op} {b} = {nxt}{tail}")
            value = nxt
        else:
            return "\n".join([*out, f"#### {value}"])
    return None


def arithmetic_pairs(n: int, seed: int = 0, difficulty: int = 2, *, split: str | None = None) -> list[Record]:
    """`n` pairs on the generated arithmetic task: chosen = the record's worked answer, rejected = its
    twin with one slip (`slip_answer`). Deterministic in (seed, split, difficulty), and each slip in its
    record alone, so growing `n` extends the list; `split` keeps that split's questions, so train and
    test pairs never share a question (`arithmetic.split_of`)."""
    from kdray.data.arithmetic import generate_arithmetic

    if n < 0:
        raise ValueError(f"arithmetic pairs n={n!r} must be >= 0")
    size = n
    while True:
        pairs: list[Record] = []
        for record in generate_arithmetic(size, seed, difficulty, split=split):
            rng = random.Random(f"kdray-arithmetic-pairs/{record['id']}")
            rejected = slip_answer(record["response"], rng)
            if rejected is not None:  # rare: no slip keeps a later division even
                pairs.append({**record, "chosen": record["response"], "rejected": rejected})
        if len(pairs) >= n:
            return pairs[:n]
        size += n - len(pairs) + 8  # the generator's first k records are a prefix of its first k' > k


def arithmetic_pair_splits(
    n_train: int, n_test: int, seed: int = 0, difficulty: int = 2
) -> tuple[list[Record], list[Record]]:
    """Train and held-out pairs with disjoint questions (the generator's hash partition)."""
    return (
        arithmetic_pairs(n_train, seed, difficulty, split="train"),
        arithmetic_pairs(n_test, seed, difficulty, split="test"),
    )


# --- pairs -> training rows ---------------------------------------------------------------------------


def pair_rows(records: Sequence[Mapping[str, Any]]) -> list[Record]:
    """Training rows: each pair as two consecutive rows, chosen (`pair_sign` +1) then rejected (−1).

    A record without a rejected response is a plain demonstration (`pair_sign` 0); such rows are laid
    out two by two, so every pair starts at an even row and a micro-batch of an even number of rows never
    cuts one (an odd one out goes last). Rows keep `prompt`, `response`, `answer`, `id`.
    """
    rows: list[Record] = []
    single: list[Record] = []

    def row(r: Mapping[str, Any], response: str, sign: int) -> Record:
        return {"prompt": r["prompt"], "response": response, "answer": r.get("answer"), "id": r.get("id"),
                "pair_sign": sign}  # fmt: skip

    for r in records:
        if is_pair(r):
            rows += [row(r, r.get("chosen") or r["response"], 1), row(r, r["rejected"], -1)]
            continue
        single.append(row(r, r["response"], 0))
        if len(single) == 2:
            rows += single
            single = []
    return rows + single
