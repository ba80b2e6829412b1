"""On-policy data: student sampling, the per-step on/off-policy coin, DistiLLM's replay buffer and schedule.

Everything here is plain torch/numpy and runs inside a training worker; the teacher is reached through
a callable (`score_fn`), which in a Ray run is a TeacherPool call and in tests a local Teacher.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

Tensor = torch.Tensor


def on_policy_coin(seed: int, step: int, fraction: float) -> bool:
    """GKD's λ coin for global step `step`: a pure function of (seed, step), so every worker draws the
    same answer without communicating, and a resumed run redraws the same coins."""
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    return bool(np.random.default_rng([seed, step]).random() < fraction)


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: Any) -> tuple[Tensor, Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        attn[i, width - len(p) :] = 1
    return ids.to(device), attn.to(device)


class _Stepper:
    """Incremental decoding of one model with its KV cache (position ids from the attention mask)."""

    def __init__(self, model: Any) -> None:
        self.model, self.past = model, None

    def __call__(self, ids: Tensor, attn: Tensor) -> Tensor:
        pos = (attn.cumsum(-1) - 1).clamp_min(0)
        if self.past is not None:
            ids, pos = ids[:, -1:], pos[:, -1:]
        out = self.model(
            input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=self.past, use_cache=True
        )
        self.past = out.past_key_values
        return out.logits[:, -1].float()


@torch.no_grad()
def sample_student(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int | None,
    pad_id: int,
    temperature: float = 1.0,
    seed: int = 0,
    vocab_size: int | None = None,
    teacher_model: Any = None,
    mix_alpha: float = 0.0,
) -> list[dict[str, Any]]:
    """Sample one response per prompt from the student (or from α·p_teacher + (1−α)·q_student).

    Returns per prompt: `response_ids` (EOS kept), `old_logprobs` (student log-probs of those tokens at
    temperature 1, the sampling policy for MiniLLM's ratio) and `mix_logprobs` (log-probs under the
    distribution actually sampled from). Teacher mixing needs the teacher model in this process.
    """
    if mix_alpha > 0 and teacher_model is None:
        raise ValueError("teacher-mixed sampling (mix_alpha > 0) needs a local teacher model in the worker")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids, attn = _left_pad(prompts, pad_id, device)
    student, teacher = _Stepper(model), _Stepper(teacher_model) if mix_alpha > 0 else None
    gen = torch.Generator(device=device).manual_seed(seed)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    tokens, old_lp, mix_lp = [], [], []
    for _ in range(max_new_tokens):
        logits = student(ids, attn)[..., :vocab_size]
        logq = torch.log_softmax(logits, -1)
        sample_logits = torch.log_softmax(logits / temperature, -1)
        if teacher is not None:
            logp = torch.log_softmax(teacher(ids, attn)[..., : logq.shape[-1]], -1)
            sample_logits = torch.logaddexp(
                logp + math.log(mix_alpha), sample_logits + math.log1p(-mix_alpha)
            )
        y = torch.multinomial(sample_logits.exp(), 1, generator=gen).squeeze(-1)
        y = torch.where(done, torch.full_like(y, pad_id), y)
        tokens.append(y)
        old_lp.append(logq.gather(-1, y[:, None]).squeeze(-1))
        mix_lp.append(sample_logits.gather(-1, y[:, None]).squeeze(-1))
        ids = torch.cat([ids, y[:, None]], 1)
        attn = torch.cat([attn, (~done).long()[:, None]], 1)
        if eos_id is not None:
            done = done | (y == eos_id)
        if bool(done.all()):
            break
    model.train(was_training)
    return _unstack(tokens, old_lp, mix_lp, len(prompts), eos_id)


def _unstack(
    tokens: list[Tensor], old: list[Tensor], mix: list[Tensor], n: int, eos_id: int | None
) -> list[dict]:
    t, o, m = (torch.stack(x, 1).cpu() for x in (tokens, old, mix))
    out = []
    for i in range(n):
        row = t[i].tolist()
        length = row.index(eos_id) + 1 if eos_id is not None and eos_id in row else len(row)
        out.append(
            {
                "response_ids": row[:length],
                "old_logprobs": o[i, :length].numpy(),
                "mix_logprobs": m[i, :length].numpy(),
            }
        )
    return out


def sampled_batch(
    prompts: Sequence[Sequence[int]],
    samples: Sequence[dict[str, Any]],
    score_fn: Callable[[list[list[int]], list[int]], dict[str, np.ndarray]],
    pad_id: int,
) -> dict[str, np.ndarray]:
    """A training micro-batch from student samples: prompt+response tokens, masks, the teacher's score
    of those sequences (via `score_fn`) and the sampling log-probs, all aligned with the input tokens."""
    seqs = [list(p) + list(s["response_ids"]) for p, s in zip(prompts, samples, strict=True)]
    lengths = [len(p) for p in prompts]
    signal = score_fn(seqs, lengths)
    width = signal["mask"].shape[1]
    b = len(seqs)
    batch = {
        "input_ids": np.full((b, width), pad_id, np.int64),
        "attention_mask": np.zeros((b, width), bool),
        "response_mask": np.asarray(signal["mask"], bool),
        "old_logprobs": np.zeros((b, width), np.float32),
        "mix_logprobs": np.zeros((b, width), np.float32),
    }
    for i, (seq, n_prompt, s) in enumerate(zip(seqs, lengths, samples, strict=True)):
        batch["input_ids"][i, : len(seq)] = seq
        batch["attention_mask"][i, : len(seq)] = True
        batch["old_logprobs"][i, n_prompt : len(seq)] = s["old_logprobs"]
        batch["mix_logprobs"][i, n_prompt : len(seq)] = s["mix_logprobs"]
    batch.update({k: v for k, v in signal.items() if k != "mask"})
    return batch


class ReplayBuffer:
    """DistiLLM's replay buffer of student samples: FIFO with a capacity, sampled uniformly, seeded."""

    def __init__(self, capacity: int = 1000, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"replay buffer capacity={capacity!r} must be >= 1")
        self.items: deque[Any] = deque(maxlen=capacity)
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, items: Sequence[Any]) -> None:
        """Append samples; the oldest fall out once the buffer is full."""
        self.items.extend(items)

    def sample(self, n: int) -> list[Any]:
        """n samples drawn with replacement (the buffer may hold fewer than n)."""
        if not self.items:
            raise ValueError("the replay buffer is empty: add student samples before sampling")
        idx = self.rng.integers(0, len(self.items), size=n)
        return [self.items[i] for i in idx]

    def state_dict(self) -> dict[str, Any]:
        """Contents and RNG state, for checkpoints."""
        return {"items": list(self.items), "capacity": self.items.maxlen, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`."""
        self.items = deque(state["items"], maxlen=state["capacity"])
        self.rng.bit_generator.state = state["rng"]


class AdaptiveOffPolicy:
    """DistiLLM's adaptive student-generated-output ratio: starts at 0 and rises by `increment` each time
    the validation loss rises by at least `threshold` over the previous evaluation (capped at 1)."""

    def __init__(self, increment: float = 0.1, threshold: float = 0.1, initial: float = 0.0) -> None:
        self.prob, self.increment, self.threshold = initial, increment, threshold
        self.prev_val: float | None = None

    def update(self, val_loss: float) -> float:
        """Feed a validation loss; returns the probability of using student samples from now on."""
        if self.prev_val is not None and val_loss - self.prev_val >= self.threshold:
            self.prob = min(1.0, self.prob + self.increment)
        self.prev_val = float(val_loss)
        return self.prob

    def use_student_data(self, seed: int, step: int) -> bool:
        """The per-step draw, identical on every worker (see `on_policy_coin`)."""
        return on_policy_coin(seed + 7919, step, self.prob)

    def state_dict(self) -> dict[str, float | None]:
        """Probability and last validation loss, for checkpoints."""
        return {"prob": self.prob, "prev_val": self.prev_val}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        """Restore from `state_dict()`."""
        self.prob = float(state["prob"])  # type: ignore[arg-type]
        self.prev_val = state["prev_val"]
