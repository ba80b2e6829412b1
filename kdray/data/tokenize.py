"""Prompt/response records -> unpadded token ids with a response mask: the one row layout.

A row carries `input_ids` and `response_mask` (and, once scored, the teacher signal) for its real
tokens only, from the tokenizer through the teacher and the signal cache to the training worker, which
pads once, to its own micro-batch (`kdray.train.batches.regularize_batch`). `collate` pads a list of
rows for the in-process consumers (the reward model, benchmarks).

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
    "TEACHER_RESPONSE_COLUMNS",
    "TOKEN_COLUMNS",
    "Tokenize",
    "collate",
    "pad_id_of",
    "ragged",
    "row_lengths",
    "tokenize_example",
    "unpadded",
]

Example = dict[str, list]

#: per-token columns: one entry per real token of a row (T or T x k), aligned with its input tokens: what
#: padding would lengthen (the worker pads them once, `kdray.train.batches.regularize_batch`)
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
#: per teacher-response-token columns of the cross-tokenizer signal: one entry per token of the teacher's
#: tokenization of the response (`xtok_teacher_mask` is True on each), not per student token
#: (`kdray.losses.cross_tokenizer_term`)
TEACHER_RESPONSE_COLUMNS = (
    "xtok_topk_ids",
    "xtok_topk_logprobs",
    "xtok_token_logprobs",
    "xtok_teacher_mask",
    "xtok_teacher_group",
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


def ragged(rows: Sequence[Any], dtype: Any = None) -> np.ndarray:
    """A 1-D object array holding one array per row: how Ray Data carries a column of unequal rows."""
    out = np.empty(len(rows), dtype=object)
    for i, row in enumerate(rows):  # one by one: rows of one shape must not merge into a 2-D array
        out[i] = np.asarray(row, dtype=dtype)
    return out


def row_lengths(batch: Mapping[str, Any]) -> list[int]:
    """Each row's real tokens: its `attention_mask` sum where the batch has one (rows right-padded), else
    the length of its `input_ids` (rows unpadded, or a 2-D array of rows that happen to be equal)."""
    masks = batch.get("attention_mask")
    if masks is not None:
        return [int(np.asarray(m, bool).sum()) for m in masks]
    return [len(r) for r in batch["input_ids"]]


def unpadded(batch: Mapping[str, Any]) -> dict[str, Any]:
    """Every per-token column cut to each row's real tokens (`row_lengths`), `attention_mask` dropped (an
    unpadded row is all real): a teacher's signal padded to its batch comes back row by row."""
    lengths = row_lengths(batch)
    out = {key: value for key, value in batch.items() if key != "attention_mask"}
    for key in TOKEN_COLUMNS:
        if key in out:
            out[key] = ragged([np.asarray(r)[:n] for r, n in zip(batch[key], lengths, strict=True)])
    if "xtok_teacher_mask" in batch:  # the cross-tokenizer signal: rows as long as the teacher's tokens
        teacher = [int(np.asarray(m, bool).sum()) for m in batch["xtok_teacher_mask"]]
        for key in TEACHER_RESPONSE_COLUMNS:
            if key in out:
                out[key] = ragged([np.asarray(r)[:n] for r, n in zip(batch[key], teacher, strict=True)])
    return out


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
    """Ray Data `map_batches` callable: adds unpadded `input_ids` (int64) and `response_mask` (bool) rows.

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
        revision: str | None = None,
        gguf_file: str | None = None,
    ) -> None:
        if isinstance(tokenizer, (str, os.PathLike)):
            tokenizer = _load_tokenizer(os.fspath(tokenizer), revision, gguf_file)
        self.tokenizer = tokenizer
        self.max_prompt_tokens, self.max_response_tokens = max_prompt_tokens, max_response_tokens
        self.chat_template = chat_template

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
        return {
            **batch,
            "input_ids": ragged([e["input_ids"] for e in examples], np.int64),
            "response_mask": ragged([e["response_mask"] for e in examples], bool),
        }
