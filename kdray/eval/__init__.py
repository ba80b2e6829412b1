"""Evaluation: task metrics, diversity, teacher-student agreement and LCA uncertainty."""

from kdray.eval.metrics import (
    answer_entropy,
    auroc,
    bleu,
    bootstrap_ci,
    distinct_n,
    exact_match,
    exact_match_hits,
    extract_answer,
    lca_uncertainty,
    paired_lead,
    rouge,
    self_bleu,
    top1_agreement,
    topk_mass_coverage,
)
from kdray.eval.uncertainty import lca_applies, lca_evaluation, lca_rows, lca_summary

__all__ = [
    "answer_entropy",
    "auroc",
    "bleu",
    "bootstrap_ci",
    "distinct_n",
    "exact_match",
    "exact_match_hits",
    "extract_answer",
    "lca_applies",
    "lca_evaluation",
    "lca_rows",
    "lca_summary",
    "lca_uncertainty",
    "paired_lead",
    "rouge",
    "self_bleu",
    "top1_agreement",
    "topk_mass_coverage",
]
