"""Prompt/response records -> token ids with a response mask, and padded numpy batches.

The prompt is rendered with the model's own chat template, exactly as the teacher does (`kdray.models.prompts`, one home for both), so
the student is trained on the token sequences the teacher scores and generates from. The response is
the plain tokenization of its text plus EOS (the model must learn to stop), and `response_mask` is True
exactly on those tokens: prompt tokens never count in a distillation loss.

Truncation keeps what matters: the prompt loses its beginning (the question and the assistant cue sit at
the end), the response loses its end. A cut response also loses its EOS, so the model is never taught
to stop mid-answer.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kdray.models.prompts import encode_prompt, encode_response

__all__ = [
    "TOKEN_COLUMNS",
    "Tokenize",
    "collate",
    "pad_batch",
    "pad_id_of",
    "tokenize_example",
]

Example = dict[str, list]

#: per-token columns: (B, T) or (B, T, k), aligned with the input tokens: what
#: padding lengthens (the worker pads them once, `kdray.train.batches.regularize_batch`)
TOKEN_COLUMNS = (
    "input_ids",
    "attention_mask",
    "response_mask",
    "topk_ids",
    "topk_logprobs",
    "token_logprobs",
    "teacher_logits",
    "old_logprobs",
    "mix_logprobs",
    "xtok_student_group",
)


def tokenize_example(
    tokenizer: Any,
    prompt: str,
    response: str,
    *,
    max_prompt_tokens: int,
    max_response_tokens: int,
    chat_template: bool = True,
) -> Example:
    """`input_ids` = prompt (left-truncated) + response (right-truncated); `response_mask` True on the response."""
    if max_prompt_tokens < 1 or max_response_tokens < 1:
        raise ValueError(
            f"max_prompt_tokens={max_prompt_tokens} and max_response_tokens={max_response_tokens} must be >= 1"
        )
    head = encode_prompt(tokenizer, prompt, chat_template=chat_template)[-max_prompt_tokens:]
    tail = encode_response(tokenizer, response)[:max_response_tokens]
    return {"input_ids": head + tail, "response_mask": [False] * len(head) + [True] * len(tail)}


def collate(
    examples: Sequence[Mapping[str, Sequence]], pad_id: int, *, width: int | None = None
) -> dict[str, np.ndarray]:
    """Right-padded `input_ids int64 [B,L]`, `attention_mask bool [B,L]`, `response_mask bool [B,L]`;
    L = the longest example, or `width` when given (a fixed shape across batches)."""
    if not examples:
        raise ValueError("collate: no examples (an empty batch would silently train on nothing)")
    longest = max(len(e["input_ids"]) for e in examples)
    if width is not None and width < longest:
        raise ValueError(f"collate: width={width} is shorter than the longest example ({longest} tokens)")
    width = longest if width is None else width
    out = {
        "input_ids": np.full((len(examples), width), pad_id, np.int64),
        "attention_mask": np.zeros((len(examples), width), bool),
        "response_mask": np.zeros((len(examples), width), bool),
    }
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        if len(e["response_mask"]) != n:
            raise ValueError(f"example {i}: {len(e['response_mask'])} mask entries for {n} input_ids")
        out["input_ids"][i, :n] = e["input_ids"]
        out["attention_mask"][i, :n] = True
        out["response_mask"][i, :n] = e["response_mask"]
    return out


def pad_batch(batch: Mapping[str, Any], pad_id: int, *, width: int | None = None) -> dict[str, Any]:
    """Re-pad a tokenized batch whose rows may be ragged.

    Ray Data hands out object arrays of 1-D rows when a batch spans blocks of different widths (seen with
    Ray 2.60: `iter_batches(batch_size=13)` over `map_batches(Tokenize, batch_size=8)` output). This turns
    either layout back into the padded arrays of `collate`, dropping old padding via `attention_mask`;
    other columns pass through.
    """
    rows = [np.asarray(r).reshape(-1) for r in batch["input_ids"]]
    attention = batch.get("attention_mask")
    keeps = (
        [np.asarray(a, bool).reshape(-1) for a in attention]
        if attention is not None
        else [np.ones(len(r), bool) for r in rows]
    )
    masks = [np.asarray(m, bool).reshape(-1) for m in batch["response_mask"]]
    examples = [
        {"input_ids": r[k], "response_mask": m[k]} for r, k, m in zip(rows, keeps, masks, strict=True)
    ]
    return {**batch, **collate(examples, pad_id, width=width)}


def pad_id_of(tokenizer: Any) -> int:
    """The padding id: the tokenizer's pad token, else EOS (padding is masked out either way)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _load_tokenizer(name_or_path: str, revision: str | None, gguf_file: str | None) -> Any:
    if name_or_path == "tiny":  # the tiny models of kdray.models are character-level
        from kdray.models.tokenizer import char_tokenizer

        return char_tokenizer()
    from kdray.models.loading import load_tokenizer

    return load_tokenizer(name_or_path, revision=revision, gguf_file=gguf_file)


class Tokenize:
    """Ray Data `map_batches` callable: adds `input_ids`, `attention_mask`, `response_mask` to a batch.

    Output arrays are right-padded per batch (width = the longest row of that batch) so no compute goes
    to padding; widths then differ between blocks, and a consumer that re-batches (`iter_batches` with
    another batch size) gets object arrays of ragged rows: `pad_batch` restores the padded layout, and
    `Teacher.logprobs` accepts both. `fixed_width=True` pads every batch to
    `max_prompt_tokens + max_response_tokens` instead, so all blocks share one tensor shape.
    Other columns (prompt, response, answer, id) pass through for evaluation. Give it a tokenizer
    name/path (loaded once per actor; `tiny` = the char tokenizer) or a tokenizer object.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_prompt_tokens: int = 256,
        max_response_tokens: int = 256,
        chat_template: bool = True,
        fixed_width: bool = False,
        revision: str | None = None,
        gguf_file: str | None = None,
    ) -> None:
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = _load_tokenizer(os.fspath(tokenizer), revision, gguf_file)
        self.tokenizer = tokenizer
        self.max_prompt_tokens, self.max_response_tokens = max_prompt_tokens, max_response_tokens
        self.chat_template = chat_template
        self.width = max_prompt_tokens + max_response_tokens if fixed_width else None
        self.pad_id = pad_id_of(tokenizer)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        missing = [c for c in ("prompt", "response") if c not in batch]
        if missing:
            raise KeyError(
                f"Tokenize needs columns 'prompt' and 'response'; missing {missing} in {sorted(batch)}"
            )
        examples = [
            tokenize_example(
                self.tokenizer,
                str(p),
                str(r),
                max_prompt_tokens=self.max_prompt_tokens,
                max_response_tokens=self.max_response_tokens,
                chat_template=self.chat_template,
            )
            for p, r in zip(batch["prompt"], batch["response"], strict=True)
        ]
        return {**batch, **collate(examples, self.pad_id, width=self.width)}
