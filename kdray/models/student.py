"""The trainable student: a causal LM plus, for X-KD, the reward head, as one module.

One module because DDP only synchronises the gradients of parameters used in *its* forward: a head
called beside a DDP-wrapped LM would train differently on every worker.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kdray.models.reward_head import RewardHead


class Student(nn.Module):
    """forward(input_ids, attention_mask) -> (logits (B, L, V), μ (B, L) | None, log σ (B, L) | None)."""

    def __init__(self, lm: Any, head: RewardHead | None = None) -> None:
        super().__init__()
        self.lm, self.head = lm, head

    @classmethod
    def with_reward_head(cls, lm: Any, **head_kwargs: Any) -> Student:
        """The student for X-KD/AVA: the LM and a fresh RewardHead on its final hidden state."""
        return cls(lm, RewardHead(lm.config.hidden_size, **head_kwargs))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Logits and, with a head, the reward posterior per position."""
        out = self.lm(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=self.head is not None
        )
        if self.head is None:
            return out.logits, None, None
        mu, log_sigma = self.head(out.hidden_states[-1])
        return out.logits, mu, log_sigma
