"""The X-KD reward head: a Gaussian posterior over the teacher's per-token reward.

Linear(d -> 2) on the student's final hidden state gives μ_t and log σ_t (METHODS.md §3, ours). It
trains with the student and is dropped from the exported model; its μ is the recovered reward.
"""

from __future__ import annotations

import torch
from torch import nn


class RewardHead(nn.Module):
    """hidden (B, T, d) -> (μ, log σ), each (B, T); log σ unclamped, as AVRIL's encoder (the X-KD term's
    `log_sigma_min/max` clamp it in the loss when asked).

    Initialised at the prior N(0, 1) (zero bias, small weights) so the KL term starts near 0 and the
    first steps are driven by the TD residual. `detach_input=True` keeps reward gradients out of the
    student's trunk (an ablation; by default the head and the student share features).
    """

    def __init__(self, hidden_size: int, *, detach_input: bool = False, init_std: float = 0.02) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden_size, 2)
        self.detach_input = detach_input
        nn.init.normal_(self.proj.weight, std=init_std)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """μ and log σ per position, in float32 whatever the trunk's dtype."""
        if self.detach_input:
            hidden = hidden.detach()
        out = self.proj(hidden.to(self.proj.weight.dtype)).float()
        mu, log_sigma = out.unbind(-1)
        return mu, log_sigma
