"""Evaluation metrics (METHODS.md §5): task scores, diversity, distillation agreement, LCA uncertainty.

Plain Python + numpy over strings and arrays, so the evaluation step, tests and notebooks share them.
sacreBLEU and rouge-score are imported where used.
"""

from __future__ import annotations

import math
import random
import re
import statistics
from collections import Counter
from collections.abc import Sequence

import numpy as np

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str) -> str | None:
    """The final number of a GSM8K-style answer: after the last `####`, else the last number in the text.

    Commas are dropped and trailing `.0` normalised, so "1,000" and "1000.0" compare equal to "1000".
    """
    tail = text.rsplit("####", 1)[1] if "####" in text else text
    numbers = _NUMBER.findall(tail)
    if not numbers:
        return None
    value = numbers[0 if "####" in text else -1].replace(",", "")
    if "." in value:
        value = value.rstrip("0").rstrip(".")
    return value


def exact_match_hits(predictions: Sequence[str], answers: Sequence[str]) -> list[bool]:
    """Per prediction: does its extracted final number equal the reference answer's."""
    _same_length(predictions, answers)
    return [extract_answer(p) == extract_answer(str(a)) for p, a in zip(predictions, answers, strict=True)]


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """Share of predictions whose extracted final number equals the reference answer."""
    hits = exact_match_hits(predictions, answers)
    return sum(hits) / len(hits) if hits else 0.0


def bootstrap_ci(
    values: Sequence[float], *, level: float = 0.95, n: int = 10000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (resampled with replacement, seeded)."""
    if not values:
        raise ValueError("bootstrap_ci: no values")
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(n))
    return means[int((1 - level) / 2 * n)], means[min(int((1 + level) / 2 * n), n - 1)]


def paired_lead(
    base_hits: Sequence[bool], hits: Sequence[bool], *, level: float = 0.95, n: int = 2000, seed: int = 0
) -> dict[str, float]:
    """How far `hits` leads `base_hits` on the same prompts, in percentage points, with a paired bootstrap
    interval (prompts resampled, both models' answers kept together). Pairing is why this is tighter than
    comparing two accuracies: the prompts both models get right or both get wrong add no noise. An
    interval that excludes 0 says the lead is beyond the evaluation's sampling noise on this prompt set;
    it says nothing of the spread between training seeds."""
    if len(base_hits) != len(hits):
        raise ValueError(f"paired_lead: {len(base_hits)} baseline answers but {len(hits)} answers")
    diffs = [100.0 * (int(b) - int(a)) for a, b in zip(base_hits, hits, strict=True)]
    lo, hi = bootstrap_ci(diffs, level=level, n=n, seed=seed)
    return {"lead": statistics.fmean(diffs), "lead_lo": lo, "lead_hi": hi, "prompts": float(len(diffs))}


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus sacreBLEU (0-100) with its default 13a tokenisation."""
    import sacrebleu

    _same_length(predictions, references)
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 (0-1) with stemming, as summarisation papers report them."""
    from rouge_score import rouge_scorer

    _same_length(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    totals = Counter()
    for p, r in zip(predictions, references, strict=True):
        for name, score in scorer.score(r, p).items():
            totals[name] += score.fmeasure
    n = max(len(predictions), 1)
    return {name: totals[name] / n for name in ("rouge1", "rouge2", "rougeL")}


def distinct_n(samples: Sequence[str], n: int = 2) -> float:
    """Distinct n-grams / all n-grams over whitespace tokens of all samples (higher = more diverse)."""
    grams = [tuple(t[i : i + n]) for s in samples for t in [s.split()] for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def self_bleu(samples: Sequence[str]) -> float:
    """Mean sentence BLEU of each sample against the others (lower = more diverse); 0 for < 2 samples."""
    import sacrebleu

    if len(samples) < 2:
        return 0.0
    scores = [
        sacrebleu.sentence_bleu(s, [o for j, o in enumerate(samples) if j != i]).score
        for i, s in enumerate(samples)
    ]
    return float(np.mean(scores))


def top1_agreement(student_top1: np.ndarray, teacher_top1: np.ndarray, mask: np.ndarray) -> float:
    """Share of counted positions where the student's argmax token is the teacher's."""
    mask = np.asarray(mask, bool)
    return float((np.asarray(student_top1) == np.asarray(teacher_top1))[mask].mean()) if mask.any() else 0.0


def topk_mass_coverage(student_probs_at_teacher_topk: np.ndarray, mask: np.ndarray) -> float:
    """Mean student probability mass on the teacher's top-k ids, (B, T, k) -> scalar over counted positions."""
    mass = np.asarray(student_probs_at_teacher_topk).sum(-1)
    mask = np.asarray(mask, bool)
    return float(mass[mask].mean()) if mask.any() else 0.0


def _gibbs(loglik: np.ndarray, temperature: float) -> np.ndarray:
    z = np.asarray(loglik, float) / temperature
    z = z - z.max()
    p = np.exp(z)
    return p / p.sum()


def lca_uncertainty(
    sample_answers: Sequence[str | None],
    sample_logliks: Sequence[float],
    greedy_answer: str | None,
    greedy_loglik: float,
    *,
    temperature: float = 1.0,
    eps: float = 1e-6,
) -> float:
    """U_LCA = KL(P_samples ‖ P_anchored-at-greedy) over answer clusters (METHODS.md §3, ours).

    P_samples: Gibbs probabilities π(y) ∝ exp(ℓ(y)/τ) of the K samples (length-normalised
    log-likelihoods ℓ), summed per answer cluster. P_anchored: the same over {samples ∪ greedy}, so the
    greedy output's weight is added to its own cluster. When the samples already agree with the greedy
    answer the two are close (low uncertainty); mass away from the greedy cluster raises U_LCA.
    Clusters are the answers as given (None, "no answer", is a cluster of its own); `eps` keeps the KL
    finite when a cluster is empty under one side; `temperature` is the Gibbs τ, not a sampling one.

    This formula is kdray's own design. The LCA paper (Lin et al., arXiv 2412.07255) describes a KL
    between the sampling distribution and the greedy "label source", anchored by Gibbs probabilities, but
    its exact formula and code could not be read; every evaluation calls this one function, so a
    faithful formula, once known, replaces it here alone (docs/evaluation.md).
    """
    if len(sample_answers) != len(sample_logliks) or not sample_answers:
        raise ValueError("lca_uncertainty needs one log-likelihood per sample and at least one sample")
    clusters = sorted({str(a) for a in sample_answers} | {str(greedy_answer)})
    index = {c: i for i, c in enumerate(clusters)}
    p_samples = np.zeros(len(clusters))
    for a, w in zip(sample_answers, _gibbs(np.asarray(sample_logliks), temperature), strict=True):
        p_samples[index[str(a)]] += w
    weights = _gibbs(np.append(np.asarray(sample_logliks, float), greedy_loglik), temperature)
    p_anchor = np.zeros(len(clusters))
    for a, w in zip([*sample_answers, greedy_answer], weights, strict=True):
        p_anchor[index[str(a)]] += w
    p, q = p_samples + eps, p_anchor + eps
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * (np.log(p) - np.log(q))))


def answer_entropy(sample_answers: Sequence[str | None]) -> float:
    """Entropy of the empirical answer distribution over samples: the plain baseline next to LCA."""
    counts = np.array(list(Counter(map(str, sample_answers)).values()), float)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve of `scores` for predicting `labels` (ties count half); NaN if one class."""
    s, y = np.asarray(scores, float), np.asarray(labels, bool)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def _same_length(a: Sequence[object], b: Sequence[object]) -> None:
    if len(a) != len(b):
        raise ValueError(f"{len(a)} predictions but {len(b)} references")
