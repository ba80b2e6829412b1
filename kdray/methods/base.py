"""What a distillation method is, declared once: `Method`, read by the config, trainer, loop and docs.

A declaration is plain data (no torch, no Ray), so the config loader and the CLI can read it cheaply.
Its per-run state is built through a factory that imports what it needs only when a worker calls it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

#: what a method asks of the teacher
Need = Literal["topk_logprobs", "sample_scores", "generations", "rewards"]
#: where a method's training sequences come from
DataMode = Literal["off_policy", "on_policy", "adaptive"]
#: which teacher/student tokenizer pairs a method accepts
TokenizerRule = Literal["same_vocab", "text_only", "cross_tokenizer"]

NEEDS: tuple[str, ...] = ("topk_logprobs", "sample_scores", "generations", "rewards")
DATA_MODES: tuple[str, ...] = ("off_policy", "on_policy", "adaptive")
TOKENIZER_RULES: tuple[str, ...] = ("same_vocab", "text_only", "cross_tokenizer")


@dataclass(frozen=True)
class Method:
    """One distillation method: everything the rest of kdray needs to know about it.

    `terms` are the default loss terms (`{name, weight, params}`, as in a config) that `method: <name>`
    trains when the config gives none; `params` are the method-level knobs (schedules, sampling) with
    their reference defaults, set in a config under `objective.method_params`; `deviations` lists, one
    line each, where kdray's default differs from the reference and why (rendered into docs/methods.md).
    """

    name: str
    summary: str
    terms: tuple[Mapping[str, Any], ...]
    needs: frozenset[str]
    data: DataMode
    tokenizer: TokenizerRule
    reference: str
    on_policy_fraction: float = 0.0
    """Default λ: the probability that a step trains on student samples (1 = every step)."""
    generations: bool = False
    """Train on teacher-generated responses instead of the data's (SeqKD)."""
    pairs: bool = False
    """Train on preference pairs (prompt, chosen, rejected): the config must set `data.preferences`."""
    params: Mapping[str, Any] = field(default_factory=dict)
    """Method-level knobs and their reference defaults (`objective.method_params`)."""
    state: Callable[..., Any] | None = None
    """Factory `state(max_steps, params, seed)` of the per-run state a worker checkpoints, or None."""
    rollout_epochs_param: str | None = None
    """The param naming how many optimizer steps reuse one on-policy rollout (MiniLLM's PPO epochs)."""
    deviations: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.needs) - set(NEEDS))
        if unknown:
            raise ValueError(f"method {self.name!r}: unknown needs {unknown}; allowed {list(NEEDS)}")
        if self.data not in DATA_MODES:
            raise ValueError(f"method {self.name!r}: data={self.data!r}; allowed {list(DATA_MODES)}")
        if self.tokenizer not in TOKENIZER_RULES:
            raise ValueError(
                f"method {self.name!r}: tokenizer={self.tokenizer!r}; allowed {list(TOKENIZER_RULES)}"
            )
        if not 0.0 <= self.on_policy_fraction <= 1.0:
            raise ValueError(
                f"method {self.name!r}: on_policy_fraction={self.on_policy_fraction!r} not in [0, 1]"
            )
        if self.rollout_epochs_param is not None and self.rollout_epochs_param not in self.params:
            raise ValueError(f"method {self.name!r}: rollout_epochs_param names no param")

    @property
    def text_only(self) -> bool:
        """True when the method exchanges only text with the teacher, so any two tokenizers work."""
        return self.tokenizer == "text_only"
