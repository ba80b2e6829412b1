"""TAID: distillation toward a target interpolated from student to teacher logits (Shing et al. 2025)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kdray.methods.base import Method


def _state(max_steps: int, params: Mapping[str, Any], seed: int) -> Any:
    from kdray.train.state import TAIDState

    return TAIDState(max_steps, params)


METHOD = Method(
    name="taid",
    summary="KL to softmax((1−t)·sg[z_student] + t·z_teacher); t rises adaptively from 0.4 to 1",
    terms=({"name": "taid", "weight": 1.0, "params": {"temperature": 1.0}},),
    needs=frozenset({"topk_logprobs"}),
    data="off_policy",
    tokenizer="same_vocab",
    params={"t_start": 0.4, "t_end": 1.0, "alpha": 5e-4, "beta": 0.99, "adaptive": True},
    state=_state,
    reference="Shing et al. 2025 (TAID); SakanaAI/TAID @a062892",
    deviations=(
        "t is updated from the loss all-reduced over the workers, so every worker holds the same t "
        "(the reference uses each rank's local loss, and t drifts apart).",
        "t moves on training steps only (the reference's update also runs on validation batches).",
        "The loss reads KL(p_t ‖ q) rather than the cross-entropy: the same gradient, 0 at agreement.",
        "Needs full teacher log-probs (teacher.top_k: null): logits cannot be interpolated from a top-k.",
    ),
)
