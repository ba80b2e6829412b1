"""Per-run method state that lives across steps and goes into checkpoints (TAID's t, DistiLLM's buffer).

A method declares a factory for its state (`kdray.methods.Method.state`); the training loop talks to
every state through the same few calls, so it names no method:

- `runtime()`: per-call parameters of the objective's terms, by term label (TAID's current t);
- `after_step(step, loss)`: after each optimizer step, with the loss all-reduced over the workers, so
  every worker advances the same state;
- `after_eval(eval_loss)`: after each held-out evaluation (and once before training when
  `initial_eval` is set); returns metrics to log;
- `state_dict()` / `load_state_dict()`: checkpointing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class MethodState:
    """The no-op state: methods without one behave as if they had this."""

    initial_eval = False
    """Evaluate once before the first step and feed it to `after_eval` (DistiLLM's starting dev loss)."""

    def runtime(self) -> dict[str, dict[str, Any]]:
        """Per-call term parameters by term label."""
        return {}

    def after_step(self, step: int, loss: float) -> None:
        """Advance after optimizer step `step` (1-based) whose global loss was `loss`."""

    def after_eval(self, eval_loss: float) -> dict[str, float]:
        """Feed a held-out loss; returns metrics to log."""
        return {}

    def metrics(self) -> dict[str, float]:
        """Metrics logged with every step."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore from `state_dict()`."""


class TAIDState(MethodState):
    """TAID's interpolation parameter t, advanced from the globally reduced loss on training steps only."""

    def __init__(self, max_steps: int, params: Mapping[str, Any]) -> None:
        from kdray.losses.taid import TAIDSchedule

        self.schedule = TAIDSchedule(
            max_steps,
            t_start=float(params["t_start"]),
            t_end=float(params["t_end"]),
            alpha=float(params["alpha"]),
            beta=float(params["beta"]),
            adaptive=bool(params["adaptive"]),
        )

    def runtime(self) -> dict[str, dict[str, Any]]:
        return {"taid": {"t": self.schedule.t}}

    def after_step(self, step: int, loss: float) -> None:
        self.schedule.update(step, loss)

    def metrics(self) -> dict[str, float]:
        return {"taid_t": float(self.schedule.t)}

    def state_dict(self) -> dict[str, Any]:
        return {"taid": self.schedule.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.schedule.load_state_dict(state["taid"])


class DistiLLMState(MethodState):
    """DistiLLM's adaptive off-policy threshold and its replay buffer of student samples (rows)."""

    initial_eval = True

    def __init__(self, max_steps: int, params: Mapping[str, Any], seed: int) -> None:
        from kdray.train.onpolicy import AdaptiveOffPolicy, ReplayBuffer

        self.max_steps = max_steps
        self.capacity = int(params["capacity"])
        self.adaptive = AdaptiveOffPolicy(
            init_threshold=float(params["init_threshold"]),
            loss_eps=float(params["loss_eps"]),
            increment=float(params["increment"]),
            replay=str(params["replay"]),
        )
        self.replay = ReplayBuffer(capacity=self.capacity, seed=seed)
        self.counts = {"fresh": 0, "replay": 0, "data": 0}

    def choose(self, seed: int, step: int) -> str:
        """Where step `step`'s batches come from: "fresh" student samples, "replay" or the "data"."""
        choice = self.adaptive.choose(seed, step, self.max_steps, len(self.replay), self.capacity)
        self.counts[choice] += 1
        return choice

    def after_eval(self, eval_loss: float) -> dict[str, float]:
        return {"student_data_prob": float(self.adaptive.update(eval_loss))}

    def metrics(self) -> dict[str, float]:
        return {f"batches_{k}": float(v) for k, v in self.counts.items()} | {
            "replay_rows": float(len(self.replay))
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "adaptive": self.adaptive.state_dict(),
            "replay": self.replay.state_dict(),
            "counts": dict(self.counts),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.adaptive.load_state_dict(state["adaptive"])
        self.replay.load_state_dict(state["replay"])
        self.counts = dict(state["counts"])


def method_state(method: str, max_steps: int, params: Mapping[str, Any], seed: int) -> MethodState:
    """The per-run state a method declares, or the no-op state."""
    from kdray.methods import get_method

    factory = get_method(method).state
    return MethodState() if factory is None else factory(max_steps, params, seed)
