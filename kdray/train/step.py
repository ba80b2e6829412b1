"""The student's training step, free of Ray: tests call it directly, Ray Train workers call it in a loop.

Alignment: a batch holds `input_ids (B, L)`, `attention_mask`, `response_mask` and the teacher signal
aligned with the input tokens (row t = distribution over token t). The student's logits at position t
predict token t+1, so the loss pairs `logits[:, :-1]` with `input_ids[:, 1:]`, the masks' `[:, 1:]`
and the signal's `[:, 1:]`.

Normalisation: every micro-batch's loss is its sum divided by the token count of the whole *global*
step (all micro-batches on all workers). Summing micro-batch gradients then gives the gradient of the
mean over the global batch; DDP averages over W workers, so each worker scales its loss by W.

Preference pairs (AVA-p) are consecutive rows, chosen then rejected, marked by a per-row `pair_sign`
(+1, −1; 0 for a row with no partner). The rejected rows are not demonstrations: `loss_mask` drops
them, so every token term and the token count see the chosen rows only, while `pair_mask` keeps every
row's response for the preference term, which is averaged over the step's global pair count.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kdray.losses.cross_tokenizer_term import CROSS_COLUMNS, STUDENT_COLUMN
from kdray.losses.objective import Objective

Tensor = torch.Tensor
SIGNAL_KEYS = ("topk_ids", "topk_logprobs", "token_logprobs", "teacher_logits", "temperature")
#: per-token columns of on-policy samples (MiniLLM's sampling log-probs), aligned with the input tokens
SAMPLE_KEYS = ("old_logprobs", "mix_logprobs")
#: per-row column of preference pairs: +1 chosen, -1 rejected (the next row after its chosen), 0 unpaired
PAIR_KEY = "pair_sign"
#: per-row columns of PAD's groups (`kdray.losses.pad_term`): place in the prompt's group, teacher's reward
GROUP_KEY, REWARD_KEY = "group_pos", "teacher_reward"
#: integer columns of the teacher's signal over its own tokenization (`objective.cross_tokenizer`,
#: `kdray.losses.cross_tokenizer_term.CROSS_COLUMNS`)
CROSS_INT_KEYS = ("xtok_topk_ids", "xtok_teacher_group", "xtok_student_group")


class NonFiniteLossError(FloatingPointError):
    """Too many consecutive steps had a NaN/inf loss; the message names the terms that were not finite."""


def to_tensors(batch: Mapping[str, Any], device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """numpy/list columns -> tensors on `device` (ids long, masks bool, floats float32); other columns dropped."""
    out: dict[str, Tensor] = {}
    for key, value in batch.items():
        if key not in ("input_ids", "attention_mask", "response_mask", PAIR_KEY, GROUP_KEY, REWARD_KEY,
                       *SIGNAL_KEYS, *SAMPLE_KEYS, *CROSS_COLUMNS):  # fmt: skip
            continue
        # a per-row int column may come as an object array (records tokenized in process, kdray.data.local)
        t = torch.as_tensor(np.asarray(value, dtype=np.int64) if key in (PAIR_KEY, GROUP_KEY) else value)
        if key in ("attention_mask", "response_mask", "xtok_teacher_mask"):
            t = t.bool()
        elif key in ("input_ids", "topk_ids", PAIR_KEY, GROUP_KEY, *CROSS_INT_KEYS):
            t = t.long()
        else:
            t = t.float()
        out[key] = t.to(device, non_blocking=True)
    return out


def response_positions(batch: Mapping[str, Tensor]) -> Tensor:
    """(B, L-1) mask of the predicted positions of every row's response (padding excluded)."""
    mask = batch["response_mask"][:, 1:]
    if "attention_mask" in batch:
        mask = mask & batch["attention_mask"][:, 1:]
    return mask


def loss_mask(batch: Mapping[str, Tensor]) -> Tensor:
    """(B, L-1) mask of the predicted positions that count: response tokens that are not padding, of
    rows that are demonstrations (a preference pair's rejected row is not one)."""
    mask = response_positions(batch)
    if PAIR_KEY in batch:
        mask = mask & (batch[PAIR_KEY] >= 0).reshape(-1, 1).to(mask.device)
    return mask


def predicted_from(batch: Mapping[str, Tensor]) -> int:
    """The first predicted position (of the L − 1) that some row's response needs: the student's logits
    are computed from there on, not over the prompt before it. Every loss reads positions inside the
    response mask only; the cross-tokenizer signal indexes student positions, so it keeps them all."""
    if STUDENT_COLUMN in batch or "response_mask" not in batch or batch["response_mask"].shape[1] < 2:
        return 0
    needed = batch["response_mask"][:, 1:].any(dim=0).to(torch.uint8)
    return int(needed.argmax())  # the first needed position (0 when none is): one read from the device


def teacher_signal(batch: Mapping[str, Tensor], vocab_size: int | None = None) -> dict[str, Tensor] | None:
    """The signal shifted to pair with `logits[:, :-1]`, from `predicted_from(batch)` on as the student's
    logits are; dense logits sliced to the tokenizer length. The cross-tokenizer signal is per teacher
    response token: only its student column shifts."""
    if STUDENT_COLUMN in batch:
        signal = {k: batch[k] for k in CROSS_COLUMNS if k in batch}
        signal[STUDENT_COLUMN] = batch[STUDENT_COLUMN][:, 1:]
        if "temperature" in batch:
            signal["temperature"] = batch["temperature"]
        return signal
    start = predicted_from(batch)
    if "teacher_logits" in batch:
        logits = batch["teacher_logits"][:, 1 + start :]
        return {"teacher_logits": logits[..., :vocab_size] if vocab_size else logits}
    if "topk_ids" in batch:
        signal = {
            k: batch[k][:, 1 + start :] for k in ("topk_ids", "topk_logprobs", "token_logprobs") if k in batch
        }
        if "temperature" in batch:  # one value per row, not per token: no shift
            signal["temperature"] = batch["temperature"]
        return signal
    return None


def student_forward(
    student: Any, batch: Mapping[str, Tensor], vocab_size: int | None = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """Student logits (B, L-1-s, V) and the loss batch (targets, mask, and the reward head's μ, log σ),
    from predicted position s = `predicted_from(batch)` on, as `teacher_signal(batch)` is.

    `student` is a `kdray.models.Student` (possibly DDP-wrapped): calling it, not its parts, is what
    makes DDP synchronise the LM's and the head's gradients.
    """
    start = predicted_from(batch)
    logits, mu, log_sigma = student(batch["input_ids"], batch.get("attention_mask"), start)
    logits = logits[:, :-1]
    if vocab_size is not None:
        logits = logits[..., :vocab_size]  # padded heads: only the tokenizer's ids are tokens
    loss_batch = {"target_ids": batch["input_ids"][:, 1 + start :], "mask": loss_mask(batch)[:, start:]}
    loss_batch.update({k: batch[k][:, 1 + start :] for k in SAMPLE_KEYS if k in batch})
    if PAIR_KEY in batch:
        loss_batch.update(pair_sign=batch[PAIR_KEY], pair_mask=response_positions(batch)[:, start:])
    loss_batch.update({k: batch[k] for k in (GROUP_KEY, REWARD_KEY) if k in batch})
    if mu is not None:
        loss_batch.update(reward_mu=mu[:, :-1], reward_log_sigma=log_sigma[:, :-1])
    return logits, loss_batch


@dataclass
class StepConfig:
    """Flat knobs of one optimisation step (built from TrainConfig by the trainer glue)."""

    grad_clip: float | None = 1.0
    chunk_size: int | None = None
    vocab_size: int | None = None
    max_bad_steps: int = 10
    #: run the student's forward under bf16 autocast (CUDA only; the losses still upcast to float32)
    autocast_bf16: bool = False
    bad_steps: int = field(default=0, init=False)


def _world() -> tuple[int, bool]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), True
    return 1, False


def global_token_count(micro_batches: Sequence[Mapping[str, Tensor]]) -> int:
    """Counted tokens over every micro-batch of the step on every worker (all-reduced under DDP)."""
    local = sum(int(loss_mask(b).sum()) for b in micro_batches)
    if not _world()[1]:
        return local
    t = torch.tensor([local], dtype=torch.long, device=_reduce_device())
    torch.distributed.all_reduce(t)
    return int(t.item())


def global_pair_count(micro_batches: Sequence[Mapping[str, Tensor]]) -> int | None:
    """Preference pairs (chosen rows) of the step on every worker; None when the batches hold no pairs.

    Every worker reads the same columns, so either all of them all-reduce here or none does.
    """
    if not micro_batches or PAIR_KEY not in micro_batches[0]:
        return None
    local = sum(int((b[PAIR_KEY] == 1).sum()) for b in micro_batches)
    if not _world()[1]:
        return local
    t = torch.tensor([local], dtype=torch.long, device=_reduce_device())
    torch.distributed.all_reduce(t)
    return int(t.item())


def global_group_count(micro_batches: Sequence[Mapping[str, Tensor]]) -> int | None:
    """PAD's prompt groups (rows at group position 0) of the step on every worker; None without groups."""
    if not micro_batches or GROUP_KEY not in micro_batches[0]:
        return None
    local = sum(int((b[GROUP_KEY] == 0).sum()) for b in micro_batches)
    if not _world()[1]:
        return local
    t = torch.tensor([local], dtype=torch.long, device=_reduce_device())
    torch.distributed.all_reduce(t)
    return int(t.item())


def _reduce_device() -> torch.device:
    backend = torch.distributed.get_backend()
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def _all_finite(value: bool) -> bool:
    """True only if every worker's step was finite, so all ranks skip together (a NaN on one rank
    would otherwise poison every rank's gradients through the all-reduce)."""
    if not _world()[1]:
        return value
    flag = torch.tensor([1.0 if value else 0.0], device=_reduce_device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item() > 0)


def train_step(
    student: Any,
    optimizer: torch.optim.Optimizer,
    objective: Objective,
    micro_batches: Sequence[Mapping[str, Tensor]],
    cfg: StepConfig,
    *,
    runtime: Mapping[str, Mapping[str, Any]] | None = None,
    params: Sequence[Tensor] | None = None,
    lm_batches: Sequence[Mapping[str, Tensor]] = (),
    lm_coef: float = 0.0,
) -> dict[str, float]:
    """One optimisation step over `micro_batches` (gradient accumulation); returns logged values.

    `lm_batches` with `lm_coef` > 0 add lm_coef × cross-entropy on those batches (their own global token
    mean) to the same step: MiniLLM's LM term on the data while the objective trains on student samples.
    A step whose loss or gradient is not finite on any worker is skipped on every worker; after
    `cfg.max_bad_steps` consecutive skips a NonFiniteLossError names the terms that went bad.
    """
    num_tokens = max(global_token_count(micro_batches), 1)
    num_pairs = global_pair_count(micro_batches)
    num_groups = global_group_count(micro_batches)
    world, _ = _world()
    optimizer.zero_grad(set_to_none=True)
    totals: dict[str, float] = {}
    finite = True
    if lm_coef > 0 and lm_batches:
        finite = _lm_term(student, lm_batches, lm_coef, cfg, world, totals)
    for mb in micro_batches:
        with _autocast(cfg.autocast_bf16):
            logits, loss_batch = student_forward(student, mb, cfg.vocab_size)
        if num_pairs is not None:
            loss_batch["num_pairs"] = torch.tensor(max(num_pairs, 1))
        if num_groups is not None:
            loss_batch["num_groups"] = torch.tensor(max(num_groups, 1))
        loss, logs = objective(
            logits,
            loss_batch,
            teacher_signal(mb, cfg.vocab_size),
            num_tokens=num_tokens,
            chunk_size=cfg.chunk_size,
            runtime=runtime,
        )
        finite = finite and bool(torch.isfinite(loss))
        if finite:
            (loss * world).backward()  # DDP averages gradients over workers; the loss is already global
        for k, v in logs.items():
            totals[k] = totals.get(k, 0.0) + float(v)
    params = list(params) if params is not None else [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = _clip(params, cfg.grad_clip) if finite else float("nan")
    finite = _all_finite(finite and math.isfinite(grad_norm))
    if finite:
        optimizer.step()
        cfg.bad_steps = 0
    else:
        optimizer.zero_grad(set_to_none=True)
        cfg.bad_steps += 1
        if cfg.bad_steps >= cfg.max_bad_steps:
            bad = sorted(k for k, v in totals.items() if not math.isfinite(v))
            raise NonFiniteLossError(
                f"{cfg.bad_steps} consecutive steps had a non-finite loss or gradient (terms: {bad or 'gradient'}); "
                "check the teacher signal for NaN logits, lower the learning rate, or use float32"
            )
    totals.update(grad_norm=grad_norm, num_tokens=float(num_tokens), skipped=float(not finite))
    return totals


def _lm_term(
    student: Any,
    batches: Sequence[Mapping[str, Tensor]],
    coef: float,
    cfg: StepConfig,
    world: int,
    totals: dict[str, float],
) -> bool:
    """Backward of coef × token cross-entropy on `batches`; logs it as `lm`; False if not finite."""
    from kdray.losses.reduce import masked_mean
    from kdray.losses.signal import token_cross_entropy

    num_tokens = max(global_token_count(batches), 1)
    finite = True
    for mb in batches:
        with _autocast(cfg.autocast_bf16):
            logits, loss_batch = student_forward(student, mb, cfg.vocab_size)
        ce = masked_mean(
            token_cross_entropy(logits, loss_batch["target_ids"], chunk_size=cfg.chunk_size),
            loss_batch["mask"],
            num_tokens,
        )
        finite = finite and bool(torch.isfinite(ce))
        if finite:
            (coef * ce * world).backward()
        totals["lm"] = totals.get("lm", 0.0) + float(ce.detach())
    return finite


def _autocast(enabled: bool) -> Any:
    """bf16 autocast on CUDA; a no-op elsewhere (bf16 matmuls are ~100x slower than float32 on CPU)."""
    if enabled and torch.cuda.is_available():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _clip(params: Sequence[Tensor], max_norm: float | None) -> float:
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return 0.0
    if max_norm is None:
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in with_grad])))
    return float(torch.nn.utils.clip_grad_norm_(with_grad, max_norm))
