"""LCA uncertainty in evaluation: how well a model's own samples flag its wrong greedy answers.

For each held-out prompt the model answers greedily and draws K samples; every output gets its
length-normalised log-likelihood ℓ (the mean log-prob of its generated tokens under the model at
temperature 1). Three uncertainty scores per prompt then predict "the greedy answer is wrong":

- U_LCA (`metrics.lca_uncertainty`, kdray's own design: METHODS.md §3, docs/evaluation.md);
- the entropy of the samples' answers (`metrics.answer_entropy`), the plain baseline;
- −ℓ(greedy): a less likely greedy output is more uncertain.

Each is reported as an AUROC. Only tasks with exact-match answers (arithmetic, GSM8K) have a "wrong"
that is cheap and unambiguous, so the others are skipped (`lca_applies`).

Sampling and scoring go through the Teacher class, the same generation path (chat template, EOS
handling) as `greedy_generations`, and its `score` gives the token log-probs of the generated ids
themselves, never of re-tokenized text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: tasks whose records carry an exact-match `answer`: the only ones LCA evaluation applies to
EXACT_MATCH_TASKS = ("arithmetic", "gsm8k")
#: the summary keys, in table order, with their column titles
SUMMARY_COLUMNS = {
    "lca_auroc": "LCA AUROC",
    "entropy_auroc": "entropy AUROC",
    "loglik_auroc": "loglik AUROC",
    "greedy_accuracy": "greedy accuracy",
}


def lca_applies(task: str) -> bool:
    """Whether LCA evaluation means anything for `task` (it needs exact-match answers)."""
    return task in EXACT_MATCH_TASKS


def not_applicable(task: str) -> str:
    """The line callers print instead of an LCA table for a task without exact-match answers."""
    return (
        f"LCA uncertainty: does not apply to the {task} task (it needs exact-match answers: "
        f"{', '.join(EXACT_MATCH_TASKS)})"
    )


def generate_scored(
    model: Any,
    prompts: Sequence[str],
    *,
    n: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
) -> list[list[dict[str, Any]]]:
    """`model.generate` (a Teacher) plus each output's `loglik`: the mean log-prob of its generated
    tokens (EOS included when generated) under the model at temperature 1.

    The log-probs come from `Teacher.score` on the exact prompt + generated ids with the prompt masked
    out, so what is scored is what was generated.
    """
    if model.temperature != 1.0:
        raise ValueError(f"log-likelihoods are taken at temperature 1; the scorer is at {model.temperature}")
    outs = model.generate(prompts, n=n, temperature=temperature, max_new_tokens=max_new_tokens, seed=seed)
    flat = [o for per in outs for o in per]
    signal = model.score(
        [o["prompt_ids"] + list(o["token_ids"]) for o in flat], k=1,
        prompt_lengths=[len(o["prompt_ids"]) for o in flat],
    )  # fmt: skip
    counted = signal["mask"].sum(1)
    totals = np.where(signal["mask"], signal["token_logprobs"], 0.0).sum(1)
    # a generation always holds at least one token (EOS at worst); max(., 1) only guards the division
    for o, total, count in zip(flat, totals, counted, strict=True):
        o["loglik"] = float(total / max(int(count), 1))
    return outs


def reference_answer(record: Mapping[str, Any]) -> str | None:
    """The record's exact-match answer as `extract_answer` normalises it (same rule as `task_scores`)."""
    from kdray.eval.metrics import extract_answer

    return extract_answer(str(record.get("answer") or record["response"]))


def lca_rows(
    model_path: str | Path,
    records: Sequence[Mapping[str, Any]],
    *,
    samples: int = 8,
    temperature: float = 1.0,
    max_new_tokens: int,
    chat_template: bool = True,
    seed: int = 0,
    batch_size: int = 32,
    desc: str | None = None,
) -> list[dict[str, Any]]:
    """Per prompt: the greedy output, its answer and correctness, the K sample answers, every ℓ, and the
    three uncertainty scores. Batch i samples with seed `seed + i`, so a rerun gives the same rows."""
    from tqdm.auto import tqdm

    from kdray.eval.metrics import answer_entropy, extract_answer, lca_uncertainty
    from kdray.teacher import Teacher

    if samples < 1 or not temperature > 0:
        raise ValueError(
            f"LCA evaluation needs samples >= 1 and temperature > 0; got {samples}, {temperature}"
        )
    if not records:
        raise ValueError("LCA evaluation: no records to evaluate")
    for i, r in enumerate(records):
        if r.get("answer") is None:
            raise ValueError(
                f"LCA evaluation needs exact-match answers, but record {i} (id {r.get('id')!r}) has none; "
                f"it applies to the {', '.join(EXACT_MATCH_TASKS)} tasks only"
            )
    model = Teacher(str(model_path), top_k=1, batch_size=batch_size, chat_template=chat_template)
    rows: list[dict[str, Any]] = []
    try:
        starts = range(0, len(records), batch_size)
        for batch, start in enumerate(
            tqdm(starts, desc=desc or f"LCA ({Path(model_path).name})", disable=None)
        ):
            chunk = records[start : start + batch_size]
            prompts = [r["prompt"] for r in chunk]
            greedy = generate_scored(
                model, prompts, n=1, temperature=0.0, max_new_tokens=max_new_tokens, seed=0
            )
            drawn = generate_scored(
                model, prompts, n=samples, temperature=temperature, max_new_tokens=max_new_tokens,
                seed=seed + batch,
            )  # fmt: skip
            for r, (g,), outs in zip(chunk, greedy, drawn, strict=True):
                answer, reference = extract_answer(g["text"]), reference_answer(r)
                sample_answers = [extract_answer(o["text"]) for o in outs]
                sample_logliks = [o["loglik"] for o in outs]
                rows.append({
                    "id": r.get("id"),
                    "greedy": g["text"],
                    "greedy_answer": answer,
                    "reference": reference,
                    "correct": answer is not None and answer == reference,
                    "greedy_loglik": g["loglik"],
                    "sample_answers": sample_answers,
                    "sample_logliks": sample_logliks,
                    "u_lca": lca_uncertainty(sample_answers, sample_logliks, answer, g["loglik"]),
                    "u_entropy": answer_entropy(sample_answers),
                    "u_loglik": -g["loglik"],
                })  # fmt: skip
    finally:
        model.close()
    return rows


def lca_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """AUROC of each uncertainty score for "the greedy answer is wrong" (NaN when every greedy answer is
    right, or every one wrong), the greedy accuracy in [0, 1] and the number of prompts."""
    from kdray.eval.metrics import auroc

    wrong = [not r["correct"] for r in rows]
    return {
        "lca_auroc": auroc([r["u_lca"] for r in rows], wrong),
        "entropy_auroc": auroc([r["u_entropy"] for r in rows], wrong),
        "loglik_auroc": auroc([r["u_loglik"] for r in rows], wrong),
        "greedy_accuracy": float(np.mean([r["correct"] for r in rows])) if rows else math.nan,
        "prompts": float(len(rows)),
    }


def lca_evaluation(
    model_path: str | Path,
    records: Sequence[Mapping[str, Any]],
    *,
    samples: int = 8,
    temperature: float = 1.0,
    max_new_tokens: int,
    chat_template: bool = True,
    seed: int = 0,
    batch_size: int = 32,
    desc: str | None = None,
) -> dict[str, float]:
    """The LCA summary of the model at `model_path` on exact-match `records` (see `lca_summary`)."""
    rows = lca_rows(
        model_path, records, samples=samples, temperature=temperature, max_new_tokens=max_new_tokens,
        chat_template=chat_template, seed=seed, batch_size=batch_size, desc=desc,
    )  # fmt: skip
    return lca_summary(rows)


def format_lca_table(results: Mapping[str, Mapping[str, float]], task: str, n: int, samples: int) -> str:
    """The LCA table as markdown: one row per model, the three AUROCs and the greedy accuracy."""
    head = (
        f"| model ({task}, {n} prompts, {samples} samples) | " + " | ".join(SUMMARY_COLUMNS.values()) + " |"
    )
    lines = [head, "|---|" + "---:|" * len(SUMMARY_COLUMNS)]
    for label, values in results.items():
        cells = [f"{values.get(k, math.nan):.3f}" for k in SUMMARY_COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def evaluate_models_lca(
    models: Mapping[str, tuple[str, str]],
    records: Sequence[Mapping[str, Any]],
    *,
    task: str,
    samples: int,
    temperature: float,
    max_new_tokens: int,
    chat_template: bool,
    seed: int,
    directory: Path | None = None,
) -> dict[str, dict[str, float]]:
    """LCA summaries of several models ({short: (label, path)}) keyed by short name; {} when the task has
    no exact-match answers or `samples` is 0. With `directory`, each model's per-prompt rows go to
    `lca_<short>.jsonl` there (the evidence behind an AUROC)."""
    import json

    if samples == 0 or not lca_applies(task):
        return {}
    out: dict[str, dict[str, float]] = {}
    for short, (label, path) in models.items():
        rows = lca_rows(
            path, records, samples=samples, temperature=temperature, max_new_tokens=max_new_tokens,
            chat_template=chat_template, seed=seed, desc=f"LCA {label}",
        )  # fmt: skip
        if directory is not None:
            with (Path(directory) / f"lca_{short}.jsonl").open("w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        out[short] = lca_summary(rows)
    return out
