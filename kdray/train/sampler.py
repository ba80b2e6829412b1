"""Where a step's batches come from when the method samples from the student (GKD with λ > 0,
MiniLLM, DistiLLM's adaptive phase, any method with `objective.on_policy_fraction` > 0).

The method's declaration (`kdray.methods`) says how: a per-step coin with probability λ, or DistiLLM's
adaptive choice between fresh samples, replayed samples and the data. The student samples responses to
the batch's prompts inside the worker (from α·p_teacher + (1−α)·q_student when the method mixes in the
teacher, with a copy of the teacher in the worker); the teacher scores them through the TeacherPool's
actors. Scoring is asynchronous: while the teacher scores micro-batch i, the student samples i+1.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from kdray.methods import get_method
from kdray.train.batches import prompts_of, regularize_batch
from kdray.train.onpolicy import on_policy_coin, sample_student, sampled_batch


class OnPolicySource:
    """Decides per step whether to replace the data batches with scored student samples, and makes them."""

    def __init__(self, spec: Any, state: Any, student: Any, tokenizer: Any, rank: int) -> None:
        self.spec, self.state, self.student, self.rank = spec, state, student, rank
        self.method = get_method(spec.method)
        self.adaptive = self.method.data == "adaptive"
        self.enabled = spec.on_policy_fraction > 0 or self.adaptive
        if self.enabled and not spec.teacher_handles:
            raise ValueError(
                f"method {spec.method!r} with on_policy_fraction={spec.on_policy_fraction} samples from the student "
                "and needs a teacher pool to score the samples; none was passed to the trainer"
            )
        param = self.method.rollout_epochs_param
        self.rollout_epochs = int(spec.method_params[param]) if param else 1
        self.mix_alpha = float(spec.method_params.get("mix_alpha", 0.0))
        self._teacher_lm: Any = None
        self.eos_id, self.vocab_size = tokenizer.eos_token_id, len(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.latencies: list[float] = []
        self.on_policy_steps = 0
        self.last_on_policy = False
        self._pool: Any = None  # the TeacherPool's routing and failover over its replicas, attached once

    def choice(self, step: int) -> str:
        """ "fresh" (sample now), "replay" (from the buffer) or "data": a pure function of (seed, step) and
        state every worker shares, so every worker agrees."""
        if not self.enabled:
            return "data"
        if self.adaptive:
            return self.state.method.choose(self.spec.seed, step)
        return "fresh" if on_policy_coin(self.spec.seed, step, self.spec.on_policy_fraction) else "data"

    def maybe_replace(self, step: int, micro: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The data micro-batches, or student samples (fresh and scored, or replayed) for the same prompts."""
        choice = self.choice(step)
        self.last_on_policy = choice != "data"
        if choice == "data":
            return micro
        self.on_policy_steps += 1
        if choice == "replay":
            buffer = self.state.method.replay
            return [buffer.sample_batch(len(m["input_ids"]), self.pad_id) for m in micro]
        pending = []
        for i, batch in enumerate(micro):
            prompts = prompts_of(batch)
            samples = sample_student(
                self.student.lm, prompts, max_new_tokens=self.spec.max_new_tokens, eos_id=self.eos_id,
                pad_id=self.pad_id, temperature=self.spec.sampling_temperature, vocab_size=self.vocab_size,
                seed=hash((self.spec.seed, step, self.rank, i)) % (1 << 31),
                teacher_model=self._teacher(), mix_alpha=self.mix_alpha,
            )  # fmt: skip
            seqs = [p + s["response_ids"] for p, s in zip(prompts, samples, strict=True)]
            pending.append(
                (prompts, samples, self._submit(seqs, [len(p) for p in prompts]), time.perf_counter())
            )
        out = [self._collect(*item) for item in pending]
        if self.adaptive:
            for batch in out:
                self.state.method.replay.add_batch(batch)
        return out

    def _teacher(self) -> Any:
        """The teacher LM in this worker, loaded once, for teacher-mixed sampling (None when not mixing)."""
        if self.mix_alpha <= 0:
            return None
        if self._teacher_lm is None:
            from kdray.models.loading import load_causal_lm

            path = self.spec.student.get("teacher_path")
            if not path:
                raise ValueError(
                    f"method {self.spec.method!r} mixes the teacher into sampling (mix_alpha={self.mix_alpha}) "
                    "and needs the teacher's path; set objective.method_params.mix_alpha: 0 to sample the student alone"
                )
            device = next(self.student.lm.parameters()).device
            self._teacher_lm, _ = load_causal_lm(path, device=str(device))
            self._teacher_lm.eval()
        return self._teacher_lm

    def _submit(self, seqs: list[list[int]], lengths: list[int]) -> Any:
        if self._pool is None:
            from kdray.teacher.pool import TeacherPool

            self._pool = TeacherPool.attach(self.spec.teacher_handles, name=f"teacher@rank{self.rank}")
        return self._pool.submit("score", seqs, None, lengths)

    def _collect(self, prompts: Sequence[list[int]], samples: list[dict], submitted: Any, t0: float) -> dict:
        signal = submitted.result()  # another replica answers if this one died (TeacherPool)
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
