"""Where a step's batches come from when the method is on-policy (GKD with λ > 0, MiniLLM, DistiLLM).

The student samples responses to the batch's prompts inside the worker; the teacher scores them through
the TeacherPool's actors. Scoring is asynchronous: while the teacher scores micro-batch i, the student
already samples micro-batch i+1.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from kdray.train.batches import prompts_of, regularize_batch
from kdray.train.onpolicy import on_policy_coin, sample_student, sampled_batch

ON_POLICY_METHODS = frozenset({"minillm", "distillm"})


class OnPolicySource:
    """Decides per step whether to replace the data batches with scored student samples, and makes them."""

    def __init__(self, spec: Any, state: Any, student: Any, tokenizer: Any, rank: int) -> None:
        self.spec, self.state, self.student, self.rank = spec, state, student, rank
        self.enabled = spec.on_policy_fraction > 0 or spec.method in ON_POLICY_METHODS
        self.handles = list(spec.teacher_handles)
        if self.enabled and not self.handles:
            raise ValueError(
                f"method {spec.method!r} with on_policy_fraction={spec.on_policy_fraction} samples from the student "
                "and needs a teacher pool to score the samples; none was passed to the trainer"
            )
        self.eos_id, self.vocab_size = tokenizer.eos_token_id, len(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.latencies: list[float] = []
        self.on_policy_steps = 0
        self._next_handle = rank

    def wants(self, step: int) -> bool:
        """The per-step decision, a pure function of (seed, step) so every worker agrees."""
        if self.spec.method == "minillm":
            return True
        if self.spec.method == "distillm":
            return self.state.adaptive.use_student_data(self.spec.seed, step)
        return on_policy_coin(self.spec.seed, step, self.spec.on_policy_fraction)

    def maybe_replace(self, step: int, micro: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The data micro-batches, or scored student samples for the same prompts."""
        if not (self.enabled and self.wants(step)):
            return micro
        self.on_policy_steps += 1
        if self.state.replay is not None and len(self.state.replay) >= len(micro) and self._replay_coin(step):
            return self.state.replay.sample(len(micro))
        pending = []
        for i, batch in enumerate(micro):
            prompts = prompts_of(batch)
            samples = sample_student(
                self.student.lm, prompts, max_new_tokens=self.spec.max_new_tokens, eos_id=self.eos_id,
                pad_id=self.pad_id, temperature=self.spec.sampling_temperature, vocab_size=self.vocab_size,
                seed=hash((self.spec.seed, step, self.rank, i)) % (1 << 31),
            )  # fmt: skip
            seqs = [p + s["response_ids"] for p, s in zip(prompts, samples, strict=True)]
            pending.append(
                (prompts, samples, self._submit(seqs, [len(p) for p in prompts]), time.perf_counter())
            )
        out = [self._collect(*item) for item in pending]
        if self.state.replay is not None:
            self.state.replay.add(out)
        return out

    def _replay_coin(self, step: int) -> bool:
        # DistiLLM reuses buffered samples for half of its student-data steps (ours: the paper's ratio
        # could not be read); fresh samples keep the buffer current.
        return on_policy_coin(self.spec.seed + 104729, step, 0.5)

    def _submit(self, seqs: list[list[int]], lengths: list[int]) -> Any:
        handle = self.handles[self._next_handle % len(self.handles)]
        self._next_handle += 1
        return handle, handle.score.remote(seqs, None, lengths), seqs, lengths

    def _collect(self, prompts: Sequence[list[int]], samples: list[dict], submitted: Any, t0: float) -> dict:
        import ray

        handle, ref, seqs, lengths = submitted
        for attempt in range(len(self.handles) + 1):
            try:
                signal = ray.get(ref)
                break
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                if attempt == len(self.handles):
                    raise
                handle = self.handles[(self.handles.index(handle) + 1) % len(self.handles)]
                ref = handle.score.remote(seqs, None, lengths)  # another replica answers instead
        self.latencies.append(time.perf_counter() - t0)
        batch = sampled_batch(prompts, samples, lambda s, n: signal, self.pad_id)
        return regularize_batch(batch, self.pad_id)

    def metrics(self) -> dict[str, float]:
        """Teacher latency of on-policy scoring since the last call, and how many steps were on-policy."""
        out: dict[str, float] = {"on_policy_steps": float(self.on_policy_steps)}
        if self.latencies:
            out["teacher_latency_s"] = float(np.mean(self.latencies))
            self.latencies.clear()
        return out
