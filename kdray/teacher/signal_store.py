"""Compact storage of a teacher signal for the signal cache and the Ray object store.

The wire format (ARCHITECTURE.md) is `topk_ids int32 [B,T,k]`, `topk_logprobs float32 [B,T,k]`,
`token_logprobs float32 [B,T]`, `mask bool [B,T]`: 8k+5 bytes per token. Stored, ids fit in uint16
whenever the vocabulary does (≤ 65536 ids: SmolLM2, Llama-2, Mistral; not Llama-3 or Qwen) and
log-probs in float16: 4k+3 bytes per token (6k+3 with int32 ids), about half.

float16 error on log-probs: 11 significant bits, so a value x is stored with |error| ≤ |x|·2⁻¹¹
(≤ 2⁻²⁵ near 0, where float16 is subnormal). Over the range that matters, [-32, 0], that is at most
2⁻⁷ ≈ 0.0078 (at -30: spacing 2⁻⁶ = 0.0156, half of it in error), i.e. a relative error ≤ 0.8%
on a probability of e⁻³⁰, and ≤ 0.05% on probabilities above e⁻² (|x| < 2). See `FLOAT16_RELATIVE_ERROR`.

Infinities: -inf (an empty slot, which the sparse losses treat as absent) is kept as -inf; finite values
beyond float16's range (|x| > 65504) are clamped to ±65504 instead of overflowing to ±inf, so a finite
log-prob stays finite and no NaN can appear (NaN in stays NaN; the teacher never emits one).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Signal = dict[str, np.ndarray]

#: max |stored - x| / |x| for a normal float16 (round to nearest, 10 fraction bits)
FLOAT16_RELATIVE_ERROR = 2.0**-11
#: max |stored - x| for |x| below float16's smallest normal number (subnormal spacing 2⁻²⁴, halved)
FLOAT16_ABSOLUTE_ERROR = 2.0**-25
#: the largest vocabulary whose ids fit in uint16
UINT16_VOCAB = 1 << 16

_FLOATS = ("topk_logprobs", "token_logprobs")


def float16_error_bound(values: np.ndarray) -> np.ndarray:
    """The largest |float16(x) - x| that `compact` can introduce at each value of `values`."""
    return np.maximum(np.abs(values) * FLOAT16_RELATIVE_ERROR, FLOAT16_ABSOLUTE_ERROR)


def _to_float16(values: np.ndarray) -> np.ndarray:
    """Round to float16 keeping finite values finite (clamped to ±65504) and ±inf as they are."""
    values = np.asarray(values, np.float32)
    limit = float(np.finfo(np.float16).max)
    clamped = np.where(np.isfinite(values), np.clip(values, -limit, limit), values)
    return clamped.astype(np.float16)


def compact(signal: Mapping[str, np.ndarray], vocab_size: int) -> Signal:
    """A smaller copy of `signal` for storage: ids uint16 (vocab ≤ 65536) else int32, log-probs float16,
    mask bool. Other keys pass through unchanged. `expand` restores the wire dtypes."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size!r} must be >= 1")
    out: Signal = dict(signal)
    if "topk_ids" in signal:
        ids = np.asarray(signal["topk_ids"])
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(
                f"topk_ids span [{ids.min()}, {ids.max()}], outside the vocabulary 0..{vocab_size - 1}: "
                "pass the teacher's vocab_size (the tokenizer length)"
            )
        out["topk_ids"] = ids.astype(np.uint16 if vocab_size <= UINT16_VOCAB else np.int32)
    for key in _FLOATS:
        if key in signal:
            out[key] = _to_float16(signal[key])
    if "mask" in signal:
        out["mask"] = np.asarray(signal["mask"], bool)
    return out


def expand(stored: Mapping[str, np.ndarray]) -> Signal:
    """The wire format back from `compact`'s output: ids int32, log-probs float32, mask bool."""
    out: Signal = dict(stored)
    if "topk_ids" in stored:
        out["topk_ids"] = np.asarray(stored["topk_ids"]).astype(np.int32)
    for key in _FLOATS:
        if key in stored:
            out[key] = np.asarray(stored[key]).astype(np.float32)
    if "mask" in stored:
        out["mask"] = np.asarray(stored["mask"], bool)
    return out


def signal_nbytes_per_token(signal: Mapping[str, np.ndarray]) -> float:
    """Bytes per token position (B·T of `token_logprobs` or `mask`) of every array in `signal`."""
    ref = signal.get("token_logprobs", signal.get("mask"))
    if ref is None:
        raise KeyError(f"signal needs 'token_logprobs' or 'mask' to count tokens; it has {sorted(signal)}")
    positions = int(np.prod(np.shape(ref)))
    if positions == 0:
        raise ValueError("signal has no token positions")
    return sum(np.asarray(v).nbytes for v in signal.values()) / positions
