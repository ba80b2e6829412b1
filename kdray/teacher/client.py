"""TeacherClient: the Teacher's interface, answered by a TeacherPool's replicas.

A run has one set of teacher replicas (a `TeacherPool`), whatever reads the teacher: the signal pass and
the teacher's generations (Ray Data stages), PAD's judge, and the on-policy scoring of the training loop.
Each of those holds a client: its forward passes run in the replicas, on the teacher's resources, with the
pool's routing, back-pressure and failover; what it does with text (the teacher's tokenizer, its prompt
encoding and context length, which the cross-tokenizer signal and PAD's judge prompt need) runs in the
client's own process, from the tokenizer files and the replicas' `info()`. A client loads no model.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from kdray.teacher.pool import TeacherPool
from kdray.teacher.teacher import SCORED_COLUMNS, Signal, Teacher

__all__ = ["TeacherClient"]


class TeacherClient:
    """A `Teacher` whose calls go to the replicas behind `handles` (`TeacherPool.handles`).

    `prefer` rotates the replicas so that clients started side by side (one per replica, e.g. Ray Data's
    actors) each send to their own replica first: every client's routing sees only its own requests, so
    without it they would all pick the first idle one. Any replica takes over when that one fails.
    """

    def __init__(self, handles: Iterable[Any], *, prefer: int = 0, name: str = "teacher") -> None:
        from kdray.models.loading import load_tokenizer

        handles = list(handles)
        if not handles:
            raise ValueError(f"teacher client {name!r}: no replicas to call (an empty TeacherPool.handles)")
        prefer %= len(handles)
        self.pool = TeacherPool.attach(handles[prefer:] + handles[:prefer], name=name)
        info = next(i for i in self.pool.wait_ready() if i)
        self.name, self.vocab_size, self.top_k = info["model"], int(info["vocab_size"]), int(info["top_k"])
        self.max_length, self.temperature = int(info["max_length"]), float(info["temperature"])
        self.chat_template = bool(info["chat_template"])
        self.tokenizer = load_tokenizer(**info["source"])

    #: the replicas' own rendering of a prompt (one home: `Teacher.encode_prompt`)
    encode_prompt = Teacher.encode_prompt

    def logprobs(self, batch: Mapping[str, Any], k: int | None = None) -> Signal:
        """See `Teacher.logprobs`. Only the token columns it reads cross to the replica, not the
        batch's text and other columns (a Ray Data batch carries prompt, response, ids, ...)."""
        return self.pool.logprobs({c: batch[c] for c in SCORED_COLUMNS if c in batch}, k)

    def score(
        self, sequences: Sequence[Sequence[int]], k: int | None = None, prompt_lengths: Any = None
    ) -> Signal:
        """See `Teacher.score`."""
        return self.pool.score(sequences, k, prompt_lengths)

    def generate(self, prompts: Sequence[Any], **kwargs: Any) -> list[list[dict[str, Any]]]:
        """See `Teacher.generate`."""
        return self.pool.generate(prompts, **kwargs)

    def reward(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """See `Teacher.reward`."""
        return self.pool.reward(prompts, responses)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """As `Teacher.__call__`: the batch's columns plus the teacher signal columns."""
        return {**batch, **self.logprobs(batch)}

    def close(self) -> None:
        """Stop routing; the replicas stay (the pool that started them stops them)."""
        self.pool.close()
