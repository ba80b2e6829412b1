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


def _sigmoid(x: float) -> float:
    """Logistic function without overflow for large |x| (momentum can be large after a near-zero loss)."""
    if x >= 0.0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


class TAIDSchedule:
    """The interpolation parameter t, updated as the reference's `update_t` does (REFERENCES.md §4).

    Per call with loss ℓ (the first call only records ℓ_prev = ℓ and leaves t and m alone, because there
    is no previous loss to compare with):
        δ = (ℓ_prev − ℓ) / (ℓ_prev + 1e-15);   m ← β·m + (1−β)·δ;   Δ = α·sigmoid(m)·(1 − t)
        t_lin = t_start + (t_end − t_start)·step/total;   t ← min(t_end, max(t_lin, t + Δ));   ℓ_prev ← ℓ
    With `adaptive=False` (the reference's --taid_disable_adaptive) t = t_lin on every call, the first
    included. t never decreases: t_lin rises with the step and Δ ≥ 0; it never exceeds t_end.

    Pass the globally all-reduced training loss, and only on training steps: then every DDP worker
    computes the same t (ours; the reference feeds each rank's local loss, validation batches included,
    so its ranks can drift apart). A non-finite loss (a skipped step) moves nothing. Arithmetic is float64
    (the reference keeps fp32 buffers).
    """

    def __init__(
        self,
        total_steps: int,
        *,
        t_start: float = 0.4,
        t_end: float = 1.0,
        alpha: float = 5e-4,
        beta: float = 0.99,
        adaptive: bool = True,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"TAIDSchedule: total_steps={total_steps!r} must be >= 1")
        if not 0.0 <= t_start <= t_end <= 1.0:
            raise ValueError(f"TAIDSchedule: need 0 <= t_start <= t_end <= 1, got {t_start!r}, {t_end!r}")
        if not 0.0 <= alpha <= 1.0 or not 0.0 <= beta <= 1.0:
            raise ValueError(f"TAIDSchedule: alpha={alpha!r} and beta={beta!r} must lie in [0, 1]")
        self.total_steps = total_steps
        self.t_start, self.t_end, self.alpha, self.beta = t_start, t_end, alpha, beta
        self.adaptive = adaptive
        self.t = t_start
        self.momentum = 0.0
        self.prev_loss: float | None = None  # None until the first call: that call only records the loss

    def linear(self, step: int) -> float:
        """t_lin, the floor under t at global step `step` (the step is clamped to [0, total_steps])."""
        frac = min(max(step, 0), self.total_steps) / self.total_steps
        return self.t_start + (self.t_end - self.t_start) * frac

    def update(self, step: int, loss: float) -> float:
        """Advance after optimisation step `step` (1-based global step) whose globally reduced loss was
        `loss`; returns the new t."""
        loss = float(loss)
        if not math.isfinite(loss):
            return self.t  # a skipped (non-finite) step must not move the schedule
        if not self.adaptive:
            self.t = min(self.t_end, self.linear(step))
        elif self.prev_loss is not None:
            delta = (self.prev_loss - loss) / (self.prev_loss + 1e-15)
            self.momentum = self.beta * self.momentum + (1.0 - self.beta) * delta
            step_up = self.alpha * _sigmoid(self.momentum) * (1.0 - self.t)
            self.t = min(self.t_end, max(self.linear(step), self.t + step_up))
        self.prev_loss = loss
        return self.t

    def state_dict(self) -> dict[str, float | int | bool | None]:
        """Everything needed to resume exactly (stored in training checkpoints); `prev_loss` None means
        the first call has not happened yet."""
        return {
            "total_steps": self.total_steps,
            "t": self.t,
            "momentum": self.momentum,
            "prev_loss": self.prev_loss,
            "adaptive": self.adaptive,
        }

    def load_state_dict(self, state: dict[str, float | int | bool | None]) -> None:
        """Restore from `state_dict()` (checkpoints written before `adaptive` existed keep the current one)."""
        self.total_steps = int(state["total_steps"])  # type: ignore[arg-type]
        self.t = float(state["t"])  # type: ignore[arg-type]
        self.momentum = float(state["momentum"])  # type: ignore[arg-type]
        prev = state["prev_loss"]
        self.prev_loss = None if prev is None else float(prev)
        self.adaptive = bool(state.get("adaptive", self.adaptive))
