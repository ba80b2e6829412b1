"""Distillation losses in pure torch: divergences (dense and top-k), reduction, X-KD, TAID, objectives.

Nothing here knows about Ray, configs or models; the training step passes tensors and flat parameters.
"""

from kdray.losses.divergences import (
    DIVERGENCES,
    align_vocab,
    divergence,
    forward_kl,
    jsd,
    reverse_kl,
    skew_kl,
    skew_reverse_kl,
    tvd,
)
from kdray.losses.minillm import future_returns, minillm_loss
from kdray.losses.objective import LOSSES, TERMS, Objective, Term, TermSpec, build_objective
from kdray.losses.reduce import chunked_per_token, masked_mean
from kdray.losses.signal import teacher_divergence, token_cross_entropy
from kdray.losses.sparse import sparse_divergence, sparse_logprobs, teacher_tail_logprob
from kdray.losses.taid import TAIDSchedule, taid_per_token, taid_target_logprobs
from kdray.losses.xkd import gaussian_nll, prior_kl, q_values, td_residual, xkd_loss

__all__ = [
    "DIVERGENCES",
    "LOSSES",
    "TERMS",
    "Objective",
    "TAIDSchedule",
    "Term",
    "TermSpec",
    "align_vocab",
    "build_objective",
    "chunked_per_token",
    "divergence",
    "forward_kl",
    "future_returns",
    "gaussian_nll",
    "jsd",
    "masked_mean",
    "minillm_loss",
    "prior_kl",
    "q_values",
    "reverse_kl",
    "skew_kl",
    "skew_reverse_kl",
    "sparse_divergence",
    "sparse_logprobs",
    "taid_per_token",
    "taid_target_logprobs",
    "td_residual",
    "teacher_divergence",
    "teacher_tail_logprob",
    "token_cross_entropy",
    "tvd",
    "xkd_loss",
]
