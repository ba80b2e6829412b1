"""Learning-rate schedules as LambdaLR multipliers: linear warmup, then constant, linear or cosine decay."""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_lambda(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate after `step` scheduler steps (0-based, as LambdaLR counts)."""
    if kind not in ("constant", "linear", "cosine"):
        raise ValueError(f"lr schedule {kind!r} is not one of 'constant', 'linear', 'cosine'")

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor
