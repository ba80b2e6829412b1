"""TAID: temporally adaptive interpolated distillation (Shing et al. 2025; METHODS.md §3).

The student learns from an intermediate target p_t = softmax((1−t)·sg[z_student] + t·z_teacher) that
moves from near the student (t small) to the teacher (t = 1), with t pushed forward faster while the
loss is improving. The schedule is a small stateful object so it can be checkpointed with the model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdray.losses.divergences import check_temperature, forward_kl_from_logprobs, loss_dtype

Tensor = torch.Tensor


def taid_target_logprobs(
    student_logits: Tensor, teacher_logits: Tensor, t: float, *, temperature: float = 1.0
) -> Tensor:
    """log p_t over the vocabulary, (B, T, V): interpolation of *logits*, the student side detached."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"taid: t={t!r} is outside [0, 1]")
    check_temperature(temperature)
    dtype = loss_dtype(student_logits)
    mixed = (1.0 - t) * student_logits.detach().to(dtype) + t * teacher_logits.to(dtype)
    return F.log_softmax(mixed / temperature, dim=-1)


def taid_per_token(
    student_logits: Tensor, teacher_logits: Tensor, *, t: float, temperature: float = 1.0
) -> Tensor:
    """KL(p_t ‖ q_θ) per position, (B, T, V) -> (B, T).

    This is the cross-entropy of q_θ against p_t minus the entropy of the detached target: the same
    gradient, and it reads 0 when student and target agree.
    """
    target = taid_target_logprobs(student_logits, teacher_logits, t, temperature=temperature)
    log_q = F.log_softmax(student_logits.to(loss_dtype(student_logits)) / temperature, dim=-1)
    return forward_kl_from_logprobs(log_q, target) * temperature**2


class TAIDSchedule:
    """The adaptive interpolation parameter t (TAID's reference update rule).

    rel = (ℓ_prev − ℓ) / (ℓ_prev + 1e-15); m ← β·m + (1−β)·rel;
    t ← min(t_end, max(t_start + (t_end − t_start)·step/total, t + α·sigmoid(m)·(1 − t))).
    t never decreases: the linear floor rises with the step and the adaptive part is non-negative.
    """

    def __init__(
        self,
        total_steps: int,
        *,
        t_start: float = 0.4,
        t_end: float = 1.0,
        alpha: float = 5e-4,
        beta: float = 0.99,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"TAIDSchedule: total_steps={total_steps!r} must be >= 1")
        if not 0.0 <= t_start <= t_end <= 1.0:
            raise ValueError(f"TAIDSchedule: need 0 <= t_start <= t_end <= 1, got {t_start!r}, {t_end!r}")
        self.total_steps = total_steps
        self.t_start, self.t_end, self.alpha, self.beta = t_start, t_end, alpha, beta
        self.t = t_start
        self.momentum = 0.0
        self.prev_loss: float | None = None

    def update(self, step: int, loss: float) -> float:
        """Advance after optimisation step `step` (1-based) whose loss was `loss`; returns the new t."""
        loss = float(loss)
        if not math.isfinite(loss):
            return self.t  # a skipped (non-finite) step must not move the schedule
        rel = 0.0 if self.prev_loss is None else (self.prev_loss - loss) / (self.prev_loss + 1e-15)
        self.momentum = self.beta * self.momentum + (1.0 - self.beta) * rel
        floor = self.t_start + (self.t_end - self.t_start) * min(step, self.total_steps) / self.total_steps
        adaptive = self.t + self.alpha / (1.0 + math.exp(-self.momentum)) * (1.0 - self.t)
        self.t = min(self.t_end, max(floor, adaptive))
        self.prev_loss = loss
        return self.t

    def state_dict(self) -> dict[str, float | int | None]:
        """Everything needed to resume the schedule exactly (stored in training checkpoints)."""
        return {
            "total_steps": self.total_steps,
            "t": self.t,
            "momentum": self.momentum,
            "prev_loss": self.prev_loss,
        }

    def load_state_dict(self, state: dict[str, float | int | None]) -> None:
        """Restore from `state_dict()`."""
        self.total_steps = int(state["total_steps"])  # type: ignore[arg-type]
        self.t = float(state["t"])  # type: ignore[arg-type]
        self.momentum = float(state["momentum"])  # type: ignore[arg-type]
        prev = state["prev_loss"]
        self.prev_loss = None if prev is None else float(prev)
