"""On-policy data: student sampling, the per-step on/off-policy coin, DistiLLM's replay buffer and schedule.

Everything here is plain torch/numpy and runs inside a training worker; the teacher is reached through
a callable (`score_fn`), which in a Ray run is a TeacherPool call and in tests a local Teacher.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from kdray.data.tokenize import TOKEN_COLUMNS
from kdray.train.batches import regularize_batch

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
    """Sample one response per prompt from the student, or from MiniLLM's teacher-mixed policy.

    The mixture is of *probabilities*, both sides at the same temperature τ, as the reference's patched
    `generate` does (REFERENCES.md §2): π = (1−α)·softmax(z_student/τ) + α·softmax(z_teacher/τ).
    Returns per prompt: `response_ids` (EOS kept), `old_logprobs` = log softmax(z_student/τ) of those
    tokens (the reference's log q at rollout, the PPO ratio's denominator) and `mix_logprobs` = log π of
    them (the distribution actually sampled; q/π is MiniLLM's per-token importance weight). With τ = 1,
    MiniLLM's default, these are the plain log-probs; without mixing the two are equal. Teacher mixing
    needs the teacher model in this process, with the student's vocabulary.
    """
    if not 0.0 <= mix_alpha <= 1.0:
        raise ValueError(f"mix_alpha={mix_alpha!r} must lie in [0, 1]")
    if not temperature > 0.0:
        raise ValueError(f"sampling temperature={temperature!r} must be > 0")
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
        logq = torch.log_softmax(student(ids, attn)[..., :vocab_size] / temperature, -1)
        log_pi = logq
        if teacher is not None:
            teacher_logits = teacher(ids, attn)[..., : logq.shape[-1]]
            if teacher_logits.shape != logq.shape:
                raise ValueError(
                    f"teacher-mixed sampling needs one vocabulary: teacher logits {tuple(teacher_logits.shape)}, "
                    f"student {tuple(logq.shape)}"
                )
            logp = torch.log_softmax(teacher_logits / temperature, -1)
            log_pi = torch.logaddexp(logp + math.log(mix_alpha), logq + math.log1p(-mix_alpha))
        y = torch.multinomial(log_pi.exp(), 1, generator=gen).squeeze(-1)
        y = torch.where(done, torch.full_like(y, pad_id), y)
        tokens.append(y)
        old_lp.append(logq.gather(-1, y[:, None]).squeeze(-1))
        mix_lp.append(log_pi.gather(-1, y[:, None]).squeeze(-1))
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
    """DistiLLM's replay buffer of student samples (REFERENCES.md §3).

    The unit is one sample (a row), as in the reference: a FIFO deque of at most `capacity` rows, the
    oldest falling out once it is full. A row keeps every column of the micro-batch it came from (tokens,
    masks, sampling log-probs, the teacher's score of it), the per-token columns trimmed of their right
    padding, so a replayed row trains exactly as it did when fresh: no re-scoring and no correction for
    staleness, as in the reference. Draws are uniform without replacement (the reference's
    `random.sample`) from the buffer's own seeded RNG, which is checkpointed with the contents.
    """

    def __init__(self, capacity: int = 1000, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"replay buffer capacity={capacity!r} must be >= 1")
        self.rows: deque[dict[str, np.ndarray]] = deque(maxlen=capacity)
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def capacity(self) -> int:
        """The most rows held."""
        return int(self.rows.maxlen or 0)

    def add_batch(self, batch: Mapping[str, Any]) -> None:
        """Append every row of a micro-batch (a dict of per-row columns, rows right-padded; a row's real
        length is its attention-mask sum). Arrays are copied: later edits of `batch` do not reach here."""
        n = len(batch["attention_mask"])
        short = {key: len(col) for key, col in batch.items() if len(col) != n}
        if short:
            raise ValueError(f"replay buffer: every column needs one entry per row ({n}); got {short}")
        for i in range(n):
            length = int(np.asarray(batch["attention_mask"][i], bool).sum())
            row = {}
            for key, col in batch.items():
                value = np.array(col[i])
                row[key] = value[:length] if key in TOKEN_COLUMNS else value
            self.rows.append(row)

    def sample_batch(self, n: int, pad_id: int) -> dict[str, np.ndarray]:
        """n distinct rows drawn uniformly, re-padded into one regular micro-batch (`regularize_batch`:
        input_ids padded with `pad_id`, the other per-token columns with 0, width = longest row)."""
        if n < 1:
            raise ValueError(f"replay buffer: cannot draw n={n!r} rows")
        if n > len(self.rows):
            raise ValueError(
                f"replay buffer holds {len(self.rows)} rows, fewer than the {n} requested (draws are without "
                "replacement): add student samples before replaying"
            )
        idx = self.rng.choice(len(self.rows), size=n, replace=False)
        rows = [self.rows[int(i)] for i in idx]
        keys = set(rows[0])
        if any(set(r) != keys for r in rows):
            raise ValueError("replay buffer: the drawn rows carry different columns; cannot batch them")
        batch: dict[str, Any] = {
            key: [r[key] for r in rows] if key in TOKEN_COLUMNS else np.stack([r[key] for r in rows])
            for key in rows[0]
        }
        return regularize_batch(batch, pad_id)

    def state_dict(self) -> dict[str, Any]:
        """Contents and RNG state, for checkpoints: numeric columns as tensors and text as lists, so a
        checkpoint loads with `torch.load(weights_only=True)` (no pickled numpy objects)."""
        return {
            "rows": [{key: _to_safe(value) for key, value in row.items()} for row in self.rows],
            "capacity": self.capacity,
            "rng": self.rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()`."""
        rows = ({key: _from_safe(value) for key, value in row.items()} for row in state["rows"])
        self.rows = deque(rows, maxlen=int(state["capacity"]))
        self.rng.bit_generator.state = state["rng"]


def _to_safe(value: np.ndarray) -> Any:
    """A replay column in a form `torch.load(weights_only=True)` accepts: a tensor, or a plain list."""
    value = np.asarray(value)
    if value.dtype.kind in "biuf":
        return torch.from_numpy(value.copy())  # a copy keeps 0-d rows 0-d (ascontiguousarray would not)
    return {"list": value.tolist(), "dtype": value.dtype.str}


def _from_safe(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.numpy()
    return np.array(value["list"], dtype=np.dtype(value["dtype"]))


REPLAY_SCHEDULES = ("decreasing", "constant", "increasing")


class AdaptiveOffPolicy:
    """DistiLLM's adaptive off-policy schedule, as its reference code runs it (REFERENCES.md §3).

    `threshold` (thr) is the probability that a step trains on student samples instead of the data. It
    starts at `init_threshold` and rises by `increment` (capped at 1) each time the validation loss is at
    least `loss_eps` above the loss recorded at the last raise; the first `update` records the
    pre-training loss. It never falls. Within student data, `replay` sets the share of fresh samples,
    samp (see `fresh_probability`); the rest are replayed from the buffer.
    """

    def __init__(
        self,
        init_threshold: float = 0.0,
        loss_eps: float = 0.1,
        increment: float = 0.1,
        replay: str = "decreasing",
    ) -> None:
        if replay not in REPLAY_SCHEDULES:
            raise ValueError(f"replay={replay!r}: choose one of {REPLAY_SCHEDULES}")
        if not 0.0 <= init_threshold <= 1.0:
            raise ValueError(f"init_threshold={init_threshold!r} must lie in [0, 1]")
        if increment < 0.0:
            raise ValueError(f"increment={increment!r} must be >= 0")
        self.threshold, self.loss_eps, self.increment, self.replay = (
            init_threshold,
            loss_eps,
            increment,
            replay,
        )
        self.prev_val: float | None = None  # None until the first (pre-training) evaluation

    def update(self, val_loss: float) -> float:
        """Feed a validation loss (the globally reduced one); returns thr. The comparison is against the
        loss at the last raise, not the previous evaluation, so slow drifts up also trigger."""
        val = float(val_loss)
        if not math.isfinite(val):
            return self.threshold
        if self.prev_val is None:
            self.prev_val = val
        elif val >= self.prev_val + self.loss_eps:
            # rounded so that ten raises of 0.1 reach exactly 1.0 (float sums stop at 0.9999999999999999)
            self.threshold = min(1.0, round(self.threshold + self.increment, 12))
            self.prev_val = val
        return self.threshold

    def fresh_probability(self, step: int, total_steps: int) -> float:
        """samp: thr·(1 − step/total) decreasing, thr·0.5 constant, thr·step/total increasing."""
        frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
        scale = {"decreasing": 1.0 - frac, "constant": 0.5, "increasing": frac}[self.replay]
        return self.threshold * scale

    def choose(self, seed: int, step: int, total_steps: int, buffer_len: int, capacity: int) -> str:
        """Where step `step`'s batch comes from: "fresh" (sample the student now, add the samples to the
        buffer, train on them), "replay" (train on buffered samples) or "data".

        With r ~ U(0, 1): fresh if r < samp or (r < thr and the buffer is not full); else replay if
        r < thr; else data. Once the buffer is full, P(fresh) = samp, P(replay) = thr − samp and
        P(data) = 1 − thr. r is a pure function of (seed, step) (ours: the reference draws per rank), so
        every worker takes the same branch; buffer lengths agree across workers because each fresh
        step adds the same number of rows on every worker.
        """
        r = float(np.random.default_rng([seed + 7919, step]).random())
        samp = self.fresh_probability(step, total_steps)
        if r < samp or (r < self.threshold and buffer_len < capacity):
            return "fresh"
        if r < self.threshold:
            return "replay"
        return "data"

    def state_dict(self) -> dict[str, float | None]:
        """thr and the loss at the last raise, for checkpoints."""
        return {"threshold": self.threshold, "prev_val": self.prev_val}

    def load_state_dict(self, state: dict[str, float | None]) -> None:
        """Restore from `state_dict()`."""
        self.threshold = float(state["threshold"])  # type: ignore[arg-type]
        prev = state["prev_val"]
        self.prev_val = None if prev is None else float(prev)
