"""Reduction of per-token values and memory-bounded evaluation over positions.

Per-token losses are averaged over the unmasked response tokens of the *global* batch (METHODS.md):
each shard divides its sum by the global count, so shard losses add up to the unsharded loss and
gradient accumulation / data parallelism give the same gradient as one big batch.
"""

from __future__ import annotations

import functools
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

    The float32 vocabulary-sized intermediates (upcast logits, log-softmaxes, mixtures) exist for one
    chunk at a time, in the forward and again when backward recomputes them, and the logits' gradient is
    written chunk by chunk into one buffer (`_ChunkedPerToken`): slicing the logits under autograd would
    allocate a full-size gradient per chunk. The result equals the unchunked evaluation. Tensors in
    `args` / `kwargs` shaped (B, T, ...) are sliced with the logits; everything else is passed whole.
    When one of them needs a gradient of its own, each chunk runs under activation checkpointing
    instead, which differentiates every input (at the cost of those full-size slice gradients).
    """
    length = student_logits.shape[1]
    if chunk_size is None or chunk_size >= length:
        return fn(student_logits, *args, **kwargs)
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive number of positions or None")
    spans = [(start, min(start + chunk_size, length)) for start in range(0, length, chunk_size)]
    if torch.is_grad_enabled() and student_logits.requires_grad:
        if not any(t.requires_grad for t in _tensors((args, kwargs))):
            return _ChunkedPerToken.apply(student_logits, fn, spans, args, kwargs)
        fn = functools.partial(checkpoint, fn, use_reentrant=False)
    return torch.cat([_call(fn, student_logits, args, kwargs, span) for span in spans], dim=1)


def _call(
    fn: Callable[..., Tensor],
    logits: Tensor,
    args: Any,
    kwargs: Any,
    span: tuple[int, int],
) -> Tensor:
    """`fn` on the positions `span` of `logits` and of every positional tensor in `args` / `kwargs`."""
    (start, end), (batch, length) = span, logits.shape[:2]
    chunk_args = slice_positions(args, start, end, batch, length)
    chunk_kwargs = slice_positions(kwargs, start, end, batch, length)
    return fn(logits[:, start:end], *chunk_args, **chunk_kwargs)


def _tensors(tree: Any) -> list[Tensor]:
    """Every tensor in a nested dict/list/tuple."""
    if isinstance(tree, Tensor):
        return [tree]
    if isinstance(tree, Mapping):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


class _ChunkedPerToken(torch.autograd.Function):
    """Per-token values a chunk at a time; backward recomputes each chunk and writes its gradient into one
    (B, T, V) buffer, so the step holds the logits, their gradient and one chunk's intermediates."""

    @staticmethod
    def forward(
        ctx: Any,
        logits: Tensor,
        fn: Callable[..., Tensor],
        spans: list,
        args: Any,
        kwargs: Any,
    ) -> Tensor:
        ctx.save_for_backward(logits)
        ctx.fn, ctx.spans, ctx.args, ctx.kwargs = fn, spans, args, kwargs
        return torch.cat([_call(fn, logits, args, kwargs, span) for span in spans], dim=1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        (logits,) = ctx.saved_tensors
        batch, length = logits.shape[:2]
        grad = torch.empty_like(logits)  # every span is written below: no full-size memset
        for start, end in ctx.spans:
            with torch.enable_grad():
                chunk = logits[:, start:end].detach().requires_grad_(True)
                chunk_args = slice_positions(ctx.args, start, end, batch, length)
                chunk_kwargs = slice_positions(ctx.kwargs, start, end, batch, length)
                values = ctx.fn(chunk, *chunk_args, **chunk_kwargs)
                (chunk_grad,) = torch.autograd.grad(values, chunk, grad_out[:, start:end], allow_unused=True)
            if chunk_grad is None:
                grad[:, start:end].zero_()
            else:
                grad[:, start:end] = chunk_grad
        return grad, None, None, None, None
