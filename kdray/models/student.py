"""The trainable student: a causal LM plus, for X-KD, the reward head, as one module.

One module because DDP only synchronises the gradients of parameters used in *its* forward: a head
called beside a DDP-wrapped LM would train differently on every worker.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from kdray.models.reward_head import RewardHead


class Student(nn.Module):
    """forward(input_ids, attention_mask, logits_from) -> (logits (B, L', V), μ (B, L') | None,
    log σ (B, L') | None) at the positions `logits_from`.. of the input (L' = L − logits_from)."""

    def __init__(self, lm: Any, head: RewardHead | None = None) -> None:
        super().__init__()
        self.lm, self.head = lm, head
        # transformers' causal LMs apply the LM head to the kept positions only (`logits_to_keep`)
        self._keeps_logits = "logits_to_keep" in inspect.signature(lm.forward).parameters

    @classmethod
    def with_reward_head(cls, lm: Any, **head_kwargs: Any) -> Student:
        """The student for X-KD/AVA: the LM and a fresh RewardHead on its final hidden state."""
        return cls(lm, RewardHead(lm.config.hidden_size, **head_kwargs))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, logits_from: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Logits and, with a head, the reward posterior per position from `logits_from` on. Positions
        before it (a prompt no loss reads) still run through the body, which the later ones attend to,
        but skip the LM head: a (B, L, V) product and its gradient that are most of a small model's step
        at a 49k vocabulary."""
        keep = (
            {"logits_to_keep": input_ids.shape[1] - logits_from} if logits_from and self._keeps_logits else {}
        )
        out = self.lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=self.head is not None,
            **keep,
        )
        logits = out.logits if keep else out.logits[:, logits_from:]
        if self.head is None:
            return logits, None, None
        mu, log_sigma = self.head(out.hidden_states[-1][:, logits_from:])
        return logits, mu, log_sigma
