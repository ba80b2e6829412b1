"""Evaluation: task metrics, diversity, teacher-student agreement and LCA uncertainty."""

from kdray.eval.metrics import (
    answer_entropy,
    auroc,
    bleu,
    distinct_n,
    exact_match,
    extract_answer,
    lca_uncertainty,
    rouge,
    self_bleu,
    top1_agreement,
    topk_mass_coverage,
)

__all__ = [
    "answer_entropy",
    "auroc",
    "bleu",
    "distinct_n",
    "exact_match",
    "extract_answer",
    "lca_uncertainty",
    "rouge",
    "self_bleu",
    "top1_agreement",
    "topk_mass_coverage",
]
