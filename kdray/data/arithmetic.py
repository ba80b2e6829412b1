"""A generated arithmetic-reasoning task in GSM8K format, so every workflow runs without a download.

Word problems (buying boxes of items, adding and removing some, splitting into equal bags) whose answer
is a GSM8K-style chain of thought, one `a op b = c` line per operation, ending in `#### n`.
`difficulty` (1..4) is the number of operations and widens the operand ranges. Texts stay short
(questions and answers under ~200 characters) because the tiny models are character-level.

Determinism: a record depends only on (seed, split, difficulty). Splits are disjoint by construction,
whatever the seeds and sizes: a question belongs to exactly one split by a hash of its text, so a test
question can never leak into training. Growing `n` extends the list (the first n are a prefix).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable

from kdray.data.records import Record, gsm8k_record

__all__ = ["DEFAULT_SIZES", "MAX_DIFFICULTY", "arithmetic_splits", "generate_arithmetic", "split_of"]

MAX_DIFFICULTY = 4
#: records generated when no size is asked for (DataConfig.num_examples / eval_examples = None).
DEFAULT_SIZES = {"train": 2000, "test": 200, "validation": 200}
#: a question's split: hash bucket 0 = test, 1 = validation, 2..7 = train (75% of the question space).
_BUCKETS = 8
_MAX_OPERAND = {1: 9, 2: 20, 3: 40, 4: 60}

_NAMES = [("Tom", "He"), ("Mia", "She"), ("Sam", "He"), ("Ana", "She"), ("Leo", "He"), ("Ivy", "She"),
          ("Max", "He"), ("Zoe", "She"), ("Ben", "He"), ("Eva", "She")]  # fmt: skip
_ITEMS = ["apples", "pears", "eggs", "pens", "cards", "books", "shells", "coins", "plums", "stamps"]

Step = tuple[str, str]  # (question sentence, chain-of-thought line)


def split_of(question: str) -> str:
    """The split a question belongs to (stable across Python runs: hashlib, not the salted `hash`)."""
    bucket = int(hashlib.sha1(question.encode()).hexdigest()[:8], 16) % _BUCKETS
    return "test" if bucket == 0 else "validation" if bucket == 1 else "train"


def _add(rng: random.Random, have: int, pron: str, items: str, top: int) -> tuple[Step, int] | None:
    x = rng.randint(2, top)
    verb = rng.choice(["buys", "finds", "gets"])
    return (f"{pron} {verb} {x} more.", f"{pron} has {have} + {x} = {have + x} {items}."), have + x


def _sub(rng: random.Random, have: int, pron: str, items: str, top: int) -> tuple[Step, int] | None:
    if have < 4:
        return None
    x = rng.randint(1, min(top, have - 2))  # keep at least two: later steps stay meaningful, plurals right
    verb = rng.choice(["gives away", "sells", "loses"])
    return (f"{pron} {verb} {x} of them.", f"{pron} has {have} - {x} = {have - x} {items} left."), have - x


def _div(rng: random.Random, have: int, pron: str, items: str, top: int) -> tuple[Step, int] | None:
    divisors = [k for k in range(2, 10) if have % k == 0 and have // k >= 2]
    if not divisors:
        return None
    k = rng.choice(divisors)
    return (
        f"{pron} packs them in {k} equal bags and keeps 1.",
        f"One bag holds {have} / {k} = {have // k} {items}.",
    ), have // k


def _mul(rng: random.Random, have: int, pron: str, items: str, top: int) -> tuple[Step, int] | None:
    if have > 3 * top:
        return None  # keep numbers small for character-level models
    k = rng.choice([2, 3])
    word = {2: "doubles", 3: "triples"}[k]
    return (f"{pron} {word} the {items}.", f"{pron} has {have} * {k} = {have * k} {items}."), have * k


_OPS: list[Callable[..., tuple[Step, int] | None]] = [_add, _sub, _div, _mul]


def _problem(rng: random.Random, difficulty: int) -> dict[str, str]:
    """One word problem with exactly `difficulty` operations, as a raw GSM8K row."""
    name, pron = rng.choice(_NAMES)
    items = rng.choice(_ITEMS)
    top = _MAX_OPERAND[difficulty]
    steps: list[Step] = []
    if rng.random() < 0.5:  # buying template: the first operation is a product
        boxes, per_box = rng.randint(2, min(top, 12)), rng.randint(2, min(top, 12))
        have = boxes * per_box
        steps.append(
            (
                f"{name} buys {boxes} boxes of {per_box} {items}.",
                f"{pron} buys {boxes} * {per_box} = {have} {items}.",
            )
        )
    else:
        have = rng.randint(2, 3 * top)
        steps.append((f"{name} has {have} {items}.", ""))
    while sum(1 for _, line in steps if line) < difficulty:
        made = rng.choice(_OPS)(rng, have, pron, items, top)
        if made is not None:
            step, have = made
            steps.append(step)
    question = " ".join(s for s, _ in steps) + f" How many {items} does {name} have now?"
    lines = [line for _, line in steps if line]
    return {"question": question, "answer": "\n".join([*lines, f"#### {have}"])}


def generate_arithmetic(
    n: int, seed: int = 0, difficulty: int = 2, *, split: str | None = None
) -> list[Record]:
    """`n` distinct problems in GSM8K record form; `split` (train/validation/test) keeps only that split's
    questions, None keeps all. Records pass through the GSM8K adapter, so they are validated like real data.
    """
    if not 1 <= difficulty <= MAX_DIFFICULTY:
        raise ValueError(f"arithmetic difficulty={difficulty!r} is invalid; allowed: 1..{MAX_DIFFICULTY}")
    if n < 0:
        raise ValueError(f"arithmetic n={n!r} must be >= 0")
    if split not in (None, "train", "validation", "test"):
        raise ValueError(f"arithmetic split={split!r} is not one of 'train', 'validation', 'test' (or None)")
    # a string seed is hashed with sha512 by `random`, so the stream is identical across runs and machines
    rng = random.Random(f"kdray-arithmetic/{seed}/{split}/{difficulty}")
    seen: set[str] = set()
    records: list[Record] = []
    attempts = 0
    while len(records) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise RuntimeError(f"could only generate {len(records)} distinct {split} problems of {n} asked")
        row = _problem(rng, difficulty)
        if row["question"] in seen or (split is not None and split_of(row["question"]) != split):
            continue
        seen.add(row["question"])
        row["id"] = f"arithmetic-d{difficulty}-s{seed}-{split or 'all'}-{len(records)}"
        records.append(gsm8k_record(row, source="<generated arithmetic>", line_no=len(records) + 1))
    return records


def arithmetic_splits(
    n_train: int, n_test: int, seed: int = 0, difficulty: int = 2
) -> tuple[list[Record], list[Record]]:
    """Train and test problems with disjoint questions (guaranteed by the hash partition, see `split_of`)."""
    train = generate_arithmetic(n_train, seed, difficulty, split="train")
    test = generate_arithmetic(n_test, seed, difficulty, split="test")
    return train, test
