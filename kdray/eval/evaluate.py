"""Held-out evaluation of saved models: greedy generations scored for the task, and reward heat-map rows.

Everything here takes a model *directory* (a teacher, a baseline or an exported student), so the same
code scores any of them, in the workflow's evaluate step, in `kdray eval` and in the benchmarks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: the headline metric of each task (what the README tables report)
TASK_METRIC = {
    "arithmetic": "exact_match",
    "gsm8k": "exact_match",
    "translation": "bleu",
    "summarization": "rougeL",
}


def greedy_generations(
    model_path: str | Path | Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
    chat_template: bool = True,
    desc: str | None = None,
) -> list[str]:
    """Greedy completions of `prompts` by the model saved at `model_path` (transformers, on CPU or GPU),
    or by an already loaded `kdray.teacher.Teacher` (the registered model's pyfunc passes its own).

    Uses the Teacher's generation path so the prompt is rendered exactly as in training (chat template
    and all), in batches of `batch_size`, with a progress bar per batch on long evaluations. The
    evaluate step and the registered model both generate through here, so they agree token for token.
    """
    from tqdm.auto import tqdm

    from kdray.teacher import Teacher

    loaded = isinstance(model_path, Teacher)
    model = (
        model_path
        if loaded
        else Teacher(str(model_path), top_k=1, batch_size=batch_size, chat_template=chat_template)
    )
    name = Path(str(model.name if loaded else model_path)).name
    texts: list[str] = []
    try:
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc=desc or f"generating ({name})", disable=None):
            chunk = list(prompts[start : start + batch_size])
            outs = model.generate(chunk, temperature=0.0, max_new_tokens=max_new_tokens)
            texts.extend(o[0]["text"] for o in outs)
    finally:
        if not loaded:
            model.close()
    return texts


def heldout_cross_entropy(
    model: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    max_prompt_tokens: int,
    max_response_tokens: int,
    chat_template: bool = True,
    batch_size: int = 32,
) -> float:
    """Mean token cross-entropy (nats) of the references' response tokens under `model` (a directory or a
    loaded Teacher), tokenized and truncated as in training: the held-out CE training reports as
    `eval_loss`, computed the same way for the teacher, the SFT baseline and the student. Why: on 200
    problems exact match moves in steps of 0.5 points and its noise is several points; the CE of every
    reference token separates models whose greedy answers tie."""
    from kdray.data.tokenize import tokenize_example
    from kdray.teacher.teacher import Teacher

    scorer = model if isinstance(model, Teacher) else Teacher(
        str(model), top_k=1, batch_size=batch_size, chat_template=chat_template
    )  # fmt: skip
    total, count = 0.0, 0
    for start in range(0, len(records), batch_size):
        shape = {"max_prompt_tokens": max_prompt_tokens, "max_response_tokens": max_response_tokens}
        rows = [
            tokenize_example(
                scorer.tokenizer, r["prompt"], r["response"], chat_template=chat_template, **shape
            )
            for r in records[start : start + batch_size]
        ]
        batch = {
            "input_ids": [e["input_ids"] for e in rows],
            "response_mask": [e["response_mask"] for e in rows],
        }
        signal = scorer.logprobs(batch, k=1)
        mask = np.asarray(signal["mask"], bool)
        total -= float(np.asarray(signal["token_logprobs"], np.float64)[mask].sum())
        count += int(mask.sum())
    return total / max(count, 1)


def score_model(
    path: str | Path,
    records: Sequence[Mapping[str, Any]],
    *,
    task: str,
    max_new_tokens: int,
    max_prompt_tokens: int,
    max_response_tokens: int,
    chat_template: bool = True,
    desc: str | None = None,
) -> tuple[list[str], dict[str, float]]:
    """A saved model on held-out records: its greedy answers, and their task scores (`task_scores`)
    with the references' token cross-entropy (`heldout_ce`, `heldout_cross_entropy`) beside them. The
    model is loaded once for both passes."""
    from kdray.teacher import Teacher

    model = Teacher(str(path), top_k=1, batch_size=32, chat_template=chat_template)
    try:
        texts = greedy_generations(
            model, [r["prompt"] for r in records], max_new_tokens=max_new_tokens, chat_template=chat_template,
            desc=desc or f"evaluating {Path(str(path)).name}",
        )  # fmt: skip
        scores = task_scores(task, texts, records)
        scores["heldout_ce"] = heldout_cross_entropy(
            model, records, max_prompt_tokens=max_prompt_tokens, max_response_tokens=max_response_tokens,
            chat_template=chat_template,
        )  # fmt: skip
    finally:
        model.close()
    return texts, scores


def task_scores(
    task: str, predictions: Sequence[str], records: Sequence[Mapping[str, Any]]
) -> dict[str, float]:
    """Every metric of the task on held-out records; the headline one is named by `TASK_METRIC[task]`.

    Exact match is reported in percent, BLEU on its usual 0-100 scale, ROUGE as F1 in [0, 1].
    """
    from kdray.eval.metrics import bleu, distinct_n, exact_match, rouge

    if task not in TASK_METRIC:
        raise ValueError(f"unknown task {task!r}; one of {sorted(TASK_METRIC)}")
    out: dict[str, float] = {"distinct_2": distinct_n(predictions, 2)}
    if task in ("arithmetic", "gsm8k"):
        out["exact_match"] = 100.0 * exact_match(predictions, reference_answers(records))
    elif task == "translation":
        out["bleu"] = bleu(predictions, [r["response"] for r in records])
    else:
        out.update(rouge(predictions, [r["response"] for r in records]))
    return out


def reference_answers(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """The answer exact match compares against: the record's `answer`, else its whole `response`."""
    return [str(r.get("answer") or r["response"]) for r in records]


def reward_rows(
    student_path: str | Path,
    records: Sequence[Mapping[str, Any]],
    *,
    max_prompt_tokens: int,
    max_response_tokens: int,
    chat_template: bool = True,
) -> list[tuple[list[str], list[float]]]:
    """Per response token, the X-KD reward head's posterior mean μ on (prompt, reference response) pairs.

    Rows are (token strings, μ) for the reward heat-map; empty when the student has no reward head (any
    method but X-KD). μ at position t scores the token at t + 1, the action taken in state t.
    """
    import torch

    from kdray.data.tokenize import tokenize_example
    from kdray.models import Student
    from kdray.models.build import load_reward_head
    from kdray.models.loading import load_causal_lm

    head = load_reward_head(student_path)
    if head is None:
        return []
    lm, tokenizer = load_causal_lm(str(student_path), device="cpu")
    student = Student(lm.eval(), head)
    rows: list[tuple[list[str], list[float]]] = []
    with torch.no_grad():
        for r in records:
            ex = tokenize_example(
                tokenizer, r["prompt"], r["response"], max_prompt_tokens=max_prompt_tokens,
                max_response_tokens=max_response_tokens, chat_template=chat_template,
            )  # fmt: skip
            ids = torch.tensor([ex["input_ids"]])
            _, mu, _ = student(ids)
            # μ at t scores action ids[t + 1]; keep the response positions
            positions = [t for t in range(len(ex["input_ids"]) - 1) if ex["response_mask"][t + 1]]
            tokens = [tokenizer.decode([ex["input_ids"][t + 1]]) for t in positions]
            rows.append((tokens, [float(mu[0, t]) for t in positions]))
    return rows
