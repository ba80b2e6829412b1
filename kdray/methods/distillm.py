"""DistiLLM: skew KL with adaptive off-policy student data and a replay buffer (Ko et al. 2024)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kdray.methods.base import Method


def _state(max_steps: int, params: Mapping[str, Any], seed: int) -> Any:
    from kdray.train.state import DistiLLMState

    return DistiLLMState(max_steps, params, seed)


METHOD = Method(
    name="distillm",
    summary="skew KL (α=0.1); student samples at an adaptive rate, fresh or replayed from a buffer",
    terms=({"name": "skew_kl", "weight": 1.0, "params": {"alpha": 0.1, "temperature": 1.0}},),
    needs=frozenset({"topk_logprobs", "sample_scores"}),
    data="adaptive",
    tokenizer="same_vocab",
    params={
        "init_threshold": 0.0,
        "loss_eps": 0.1,
        "increment": 0.1,
        "capacity": 1000,
        "replay": "decreasing",
    },
    state=_state,
    reference="Ko et al. 2024 (DistiLLM); jongwooko/distillm @d47e77f (adaptive-sfkl)",
    deviations=(
        "Skew KL as KL(p ‖ αp + (1−α)q); the reference's SFKL adds the teacher entropy H(p), a "
        "constant with the same gradient.",
        "The sampling draw is a function of (seed, step), identical on every worker (the reference "
        "draws per rank): data-parallel ranks train on the same kind of batch.",
        "The dev loss of the trigger is the held-out cross-entropy at every train.eval_every steps "
        "(the reference evaluates once per epoch).",
        "The generated EOS is kept and the KD mask is aligned with the sampled tokens (the reference "
        "strips the EOS and is off by one position on student samples).",
    ),
)
