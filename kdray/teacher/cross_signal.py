"""The teacher signal over the teacher's own tokenization, for cross-tokenizer distillation (METHODS.md §4).

With two tokenizers, scoring the student's token ids with the teacher would feed the teacher ids from
another vocabulary. So each row is rendered a second time for the teacher, as it would see it served:
the prompt through the teacher's own chat template, the response text tokenised by the teacher's
tokenizer plus its EOS (what `kdray.data.tokenize` does for the student). The teacher scores that
sequence; only its response rows travel on, target-aligned (row j predicts teacher response token j),
beside the student's untouched row. `response_groups` (character spans of the response text) says
which student tokens and which teacher tokens cover the same characters; a group cut by either side's
truncation is dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from kdray.models.prompts import encode_response


def load_student_tokenizer(name_or_path: str) -> Any:
    """The student's tokenizer by name or path; `tiny` is kdray's character tokenizer."""
    if name_or_path == "tiny":
        from kdray.models.tokenizer import char_tokenizer

        return char_tokenizer()
    from kdray.models.loading import load_tokenizer

    return load_tokenizer(name_or_path)


def _student_response(batch: Mapping[str, Any], i: int) -> list[int]:
    """The response token ids of row i of a tokenized batch (padding dropped)."""
    ids = np.asarray(batch["input_ids"][i]).reshape(-1)
    resp = np.asarray(batch["response_mask"][i], bool).reshape(-1)
    if "attention_mask" in batch:
        resp = resp & np.asarray(batch["attention_mask"][i], bool).reshape(-1)
    return ids[resp].astype(np.int64).tolist()


class CrossTokenizerSignal:
    """Adds the `xtok_*` columns (`kdray.losses.cross_tokenizer_term`) to a tokenized student batch.

    `teacher` is a `kdray.teacher.Teacher`; the student's rows must be `kdray.data.tokenize` output of
    the same prompt/response columns with `student_tokenizer` (checked row by row: a row tokenised by
    another tokenizer would silently pair unrelated tokens).
    """

    def __init__(
        self, teacher: Any, student_tokenizer: Any, *, max_prompt_tokens: int, max_response_tokens: int
    ) -> None:
        self.teacher, self.student_tokenizer = teacher, student_tokenizer
        self.max_prompt_tokens, self.max_response_tokens = max_prompt_tokens, max_response_tokens

    def _row(self, prompt: str, response: str, student: list[int]) -> tuple[list[int], int, int, list]:
        """(teacher ids, prompt length, response tokens kept, groups kept) of one example."""
        from kdray.losses.alignment import response_groups

        tok = self.teacher.tokenizer
        head = self.teacher.encode_prompt(prompt)[-self.max_prompt_tokens :]
        tail = encode_response(tok, response)[: self.max_response_tokens]
        expected = encode_response(self.student_tokenizer, response)[: len(student)]
        if student != expected:
            raise ValueError(
                f"a student row's response tokens {student[:8]}... are not the student tokenizer's "
                f"({type(self.student_tokenizer).__name__}) tokens of its text {expected[:8]}...: the rows "
                "were tokenised with another tokenizer; tokenize them with the student's"
            )
        kept_t = min(len(tail), max(self.teacher.max_length - len(head), 0))
        groups = [
            (s, t)
            for s, t in response_groups(self.student_tokenizer, tok, response, eos=True)
            if max(s) < len(student) and max(t) < kept_t
        ]
        return head + tail, len(head), kept_t, groups

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        missing = [c for c in ("prompt", "response", "input_ids", "response_mask") if c not in batch]
        if missing:
            raise KeyError(
                f"the cross-tokenizer teacher signal needs columns {missing}; it has {sorted(batch)}"
            )
        rows = [
            self._row(str(p), str(r), _student_response(batch, i))
            for i, (p, r) in enumerate(zip(batch["prompt"], batch["response"], strict=True))
        ]
        sig = self.teacher.score([r[0] for r in rows], prompt_lengths=[r[1] for r in rows])
        b, k = len(rows), sig["topk_ids"].shape[-1]
        width_t = max(max(r[2] for r in rows), 1)
        width_s = max(len(np.asarray(x).reshape(-1)) for x in batch["input_ids"])
        out = {
            "xtok_topk_ids": np.zeros((b, width_t, k), np.int32),
            "xtok_topk_logprobs": np.zeros((b, width_t, k), np.float32),
            "xtok_token_logprobs": np.zeros((b, width_t), np.float32),
            "xtok_teacher_mask": np.zeros((b, width_t), bool),
            "xtok_teacher_group": np.full((b, width_t), -1, np.int32),
            "xtok_student_group": np.full((b, width_s), -1, np.int32),
        }
        for i, (_, start, n_t, groups) in enumerate(rows):
            span = slice(start, start + n_t)  # position start+j holds the distribution of response token j
            out["xtok_topk_ids"][i, :n_t] = sig["topk_ids"][i, span]
            out["xtok_topk_logprobs"][i, :n_t] = sig["topk_logprobs"][i, span]
            out["xtok_token_logprobs"][i, :n_t] = sig["token_logprobs"][i, span]
            out["xtok_teacher_mask"][i, :n_t] = True
            first = int(np.argmax(np.asarray(batch["response_mask"][i], bool).reshape(-1)))
            for g, (s_tokens, t_tokens) in enumerate(groups):
                out["xtok_teacher_group"][i, t_tokens] = g
                out["xtok_student_group"][i, [first + s for s in s_tokens]] = g
        return {**batch, **out, "temperature": sig["temperature"]}
