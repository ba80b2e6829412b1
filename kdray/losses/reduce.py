"""Reduction of per-token values and memory-bounded evaluation over positions.

Per-token losses are averaged over the unmasked response tokens of the *global* batch (METHODS.md):
each shard divides its sum by the global count, so shard losses add up to the unsharded loss and
gradient accumulation / data parallelism give the same gradient as one big batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

Tensor = torch.Tensor


def masked_mean(values: Tensor, mask: Tensor, num_tokens: int | float | Tensor | None = None) -> Tensor:
    """Σ values[mask] / num_tokens (default: this batch's count). An all-masked batch gives 0, not NaN.

    `torch.where` rather than multiplication: a NaN/inf at a masked position must not leak into the sum.
    """
    if values.shape != mask.shape:
        raise ValueError(
            f"values {tuple(values.shape)} and mask {tuple(mask.shape)} must have the same shape"
        )
    mask = mask.bool()
    total = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    count = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, device=values.device)
    # max(count, 1): with no counted token the sum is 0 as well, so the result is 0 and keeps the graph
    return total / count.to(total.dtype).clamp_min(1.0)


def slice_positions(tree: Any, start: int, end: int, batch: int, length: int) -> Any:
    """Slice every tensor shaped (B, T, ...) in a nested dict/list along T; leave the rest as is."""
    if isinstance(tree, Tensor):
        if tree.dim() >= 2 and tree.shape[0] == batch and tree.shape[1] == length:
            return tree[:, start:end]
        return tree
    if isinstance(tree, Mapping):
        return {k: slice_positions(v, start, end, batch, length) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(slice_positions(v, start, end, batch, length) for v in tree)
    return tree


def chunked_per_token(
    fn: Callable[..., Tensor],
    student_logits: Tensor,
    *args: Any,
    chunk_size: int | None = None,
    **kwargs: Any,
) -> Tensor:
    """Evaluate `fn(student_logits, *args, **kwargs) -> (B, T)` a chunk of positions at a time.

    Each chunk runs under activation checkpointing, so the float32 vocabulary-sized intermediates
    (upcast logits, log-softmaxes, mixtures) exist for one chunk at a time, in the forward and again
    when backward recomputes them. The result equals the unchunked evaluation. Tensors in `args` /
    `kwargs` shaped (B, T, ...) are sliced with the logits; everything else is passed whole.
    """
    batch, length = student_logits.shape[:2]
    if chunk_size is None or chunk_size >= length:
        return fn(student_logits, *args, **kwargs)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive number of positions or None")
    pieces = []
    for start in range(0, length, chunk_size):
        end = min(start + chunk_size, length)
        chunk_args = slice_positions(args, start, end, batch, length)
        chunk_kwargs = slice_positions(kwargs, start, end, batch, length)
        logits = student_logits[:, start:end]
        if torch.is_grad_enabled() and logits.requires_grad:
            pieces.append(checkpoint(fn, logits, *chunk_args, use_reentrant=False, **chunk_kwargs))
        else:
            pieces.append(fn(logits, *chunk_args, **chunk_kwargs))
    return torch.cat(pieces, dim=1)
