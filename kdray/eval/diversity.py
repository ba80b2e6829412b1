"""Quality against diversity: what a model's samples are worth, and how much they differ, per temperature.

A distilled student can match its teacher's greedy answers and still have collapsed onto one way of
writing them (mode-seeking losses such as reverse KL do this by design), and that shows only in its
samples. For each sampling temperature this draws K samples per held-out prompt and reports:

- the samples' quality: exact match averaged over samples (arithmetic, GSM8K) or corpus BLEU of all
  samples against the references (translation);
- distinct-2: distinct word bigrams / all bigrams among a prompt's samples, averaged over prompts
  (higher = more diverse);
- self-BLEU: each sample's BLEU against the prompt's other samples, averaged (lower = more diverse).

Rows over temperatures make a quality–diversity curve (`kdray.plots.quality_diversity`); the point at
temperature 1 is the usual diversity report. Samples go through the Teacher's generation path, as every
evaluation in kdray does, and are seeded, so a rerun draws the same samples.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["TEMPERATURES", "diversity_curve", "sample_scores"]

#: the default temperatures of a quality–diversity curve
TEMPERATURES = (0.3, 0.6, 1.0, 1.2)


def sample_scores(
    samples: Sequence[Sequence[str]], records: Sequence[Mapping[str, Any]], *, task: str
) -> dict[str, float]:
    """Quality, distinct-2 and self-BLEU of `samples` (one list of K texts per record)."""
    from kdray.eval.metrics import bleu, distinct_n, exact_match, self_bleu

    if len(samples) != len(records) or not records:
        raise ValueError(
            f"need one list of samples per record; got {len(samples)} for {len(records)} records"
        )
    if task in ("arithmetic", "gsm8k"):
        quality = 100.0 * float(
            np.mean(
                [exact_match(list(s), [r["answer"]] * len(s)) for s, r in zip(samples, records, strict=True)]
            )
        )
    else:
        flat = [(text, r["response"]) for s, r in zip(samples, records, strict=True) for text in s]
        quality = bleu([t for t, _ in flat], [ref for _, ref in flat])
    return {
        "quality": quality,
        "distinct_2": float(np.mean([distinct_n(list(s), 2) for s in samples])),
        "self_bleu": float(np.mean([self_bleu(list(s)) for s in samples])),
    }


def diversity_curve(
    model_path: str | Path,
    records: Sequence[Mapping[str, Any]],
    *,
    task: str,
    temperatures: Sequence[float] = TEMPERATURES,
    samples: int = 8,
    max_new_tokens: int,
    chat_template: bool = True,
    seed: int = 0,
    batch_size: int = 32,
) -> list[dict[str, float]]:
    """One row per temperature: `temperature`, `quality`, `distinct_2`, `self_bleu` of `samples` samples
    per record drawn from the model at `model_path`. Batch i of temperature t samples with seed
    `seed + i`, so the curve is reproducible."""
    from kdray.teacher import Teacher

    if samples < 2 or any(not t > 0 for t in temperatures):
        raise ValueError(
            f"a diversity curve needs samples >= 2 and temperatures > 0; got {samples}, {temperatures}"
        )
    model = Teacher(str(model_path), top_k=1, batch_size=batch_size, chat_template=chat_template)
    rows = []
    try:
        for temperature in temperatures:
            drawn: list[list[str]] = []
            for batch, start in enumerate(range(0, len(records), batch_size)):
                prompts = [r["prompt"] for r in records[start : start + batch_size]]
                outs = model.generate(
                    prompts,
                    n=samples,
                    temperature=temperature,
                    max_new_tokens=max_new_tokens,
                    seed=seed + batch,
                )
                drawn.extend([o["text"] for o in per] for per in outs)
            rows.append({"temperature": float(temperature), **sample_scores(drawn, records, task=task)})
    finally:
        model.close()
    return rows
