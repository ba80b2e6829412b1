"""The Teacher: a plain class serving log-probs, generations and rewards of a causal LM.

It is a plain class first (tests and scripts call it directly) and a Ray actor second
(`ray.remote(Teacher)` in TeacherPool, and the `map_batches` callable of Ray Data). Every method is a
pure function of its inputs, so a call retried after an actor restart gives the same answer.

Signal layout (ARCHITECTURE.md): arrays are aligned with the input tokens. Position t holds the
teacher's distribution over token t given tokens < t; position 0 has no context and is masked out.
A student's `logits[:, :-1]` therefore pairs with the signal's `[:, 1:]`.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Signal = dict[str, np.ndarray]

#: a file each teacher process appends one JSON line to per forward pass (op, rows, tokens, pid): the
#: audit of what a run or a sweep cost in teacher compute, whichever processes the teachers ran in
LEDGER_ENV = "KDRAY_TEACHER_LEDGER"


def _ledger(op: str, rows: int, tokens: int) -> None:
    path = os.environ.get(LEDGER_ENV)
    if not path:
        return
    import json
    import time

    line = json.dumps({"op": op, "rows": rows, "tokens": tokens, "pid": os.getpid(), "t": time.time()})
    # one O_APPEND write per line: lines from many processes never interleave
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


def read_ledger(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The forward passes recorded in a teacher ledger file (see `LEDGER_ENV`)."""
    import json

    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Teacher:
    """Serve a causal LM (hub name or local path; transformers or vLLM backend) as a distillation teacher."""

    def __init__(
        self,
        name_or_path: str | None = None,
        *,
        backend: str = "hf",
        revision: str | None = None,
        gguf_file: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        top_k: int | None = 64,
        temperature: float = 1.0,
        max_length: int | None = None,
        truncate: bool = False,
        batch_size: int = 8,
        chat_template: bool = True,
        model: Any = None,
        tokenizer: Any = None,
        backend_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        if temperature <= 0:
            raise ValueError(f"teacher temperature={temperature!r} must be > 0")
        self.name = name_or_path or type(model).__name__
        # where the tokenizer comes from: a `TeacherClient` loads the same one beside the pool's replicas
        self.source = {"name_or_path": name_or_path, "revision": revision, "gguf_file": gguf_file}
        self.temperature, self.truncate, self.chat_template = temperature, truncate, chat_template
        self.backend = _make_backend(
            backend, name_or_path, model=model, tokenizer=tokenizer, revision=revision, gguf_file=gguf_file,
            dtype=dtype, device=device, batch_size=batch_size, top_k=top_k, extra=dict(backend_kwargs or {}),
        )  # fmt: skip
        self.tokenizer = self.backend.tokenizer
        self.vocab_size = self.backend.vocab_size
        self.max_length = min(max_length or self.backend.max_length, self.backend.max_length)
        # say now, not mid-run, when the backend cannot serve the configured k (e.g. vLLM's logprob cap)
        # or temperature (vLLM's prompt log-probs are at temperature 1)
        self.top_k = self._check_k(top_k)
        if hasattr(self.backend, "check_temperature"):
            self.backend.check_temperature(temperature)

    # ---- checks ------------------------------------------------------------------------------

    def _check_k(self, k: int | None) -> int:
        if k is None:
            k = self.vocab_size
        cap = self.backend.max_top_k()
        if not 1 <= k <= cap:
            raise ValueError(
                f"top_k={k} is not servable by the {self.backend.name} backend of {self.name}: "
                f"allowed 1..{cap} (vocabulary {self.vocab_size})"
            )
        return k

    def _fit(self, sequences: list[list[int]]) -> list[list[int]]:
        """Check lengths against the context; cut from the right when `truncate` is on."""
        if not sequences:
            raise ValueError("empty batch: no sequences to score")
        for i, seq in enumerate(sequences):
            if not seq:
                raise ValueError(f"sequence {i} is empty")
            if len(seq) > self.max_length and not self.truncate:
                raise ValueError(
                    f"sequence {i} has {len(seq)} tokens, more than the teacher's context of {self.max_length}; "
                    "shorten it or set teacher.truncate: true (cuts the end of the response)"
                )
        return [seq[: self.max_length] for seq in sequences]

    # ---- scoring -----------------------------------------------------------------------------

    def logprobs(self, batch: Mapping[str, Any], k: int | None = None) -> Signal:
        """Teacher signal for a tokenized batch: `input_ids` (ragged lists or a padded 2-D array) with
        optional `attention_mask` and `response_mask` (True = counts). Returns `topk_ids int32 [B,T,k]`,
        `topk_logprobs float32 [B,T,k]`, `token_logprobs float32 [B,T]`, `mask bool [B,T]` and
        `temperature float32 [B]` (the temperature the log-probs were computed at).
        """
        sequences, width, response = _unpad(batch)
        return self._signal(sequences, width, response, k)

    def score(
        self,
        sequences: Sequence[Sequence[int]],
        k: int | None = None,
        prompt_lengths: Sequence[int] | None = None,
    ) -> Signal:
        """Signal for prompt+response token sequences; with `prompt_lengths`, only response tokens count."""
        seqs = [list(map(int, s)) for s in sequences]
        if prompt_lengths is not None and len(prompt_lengths) != len(seqs):
            raise ValueError(f"{len(prompt_lengths)} prompt lengths for {len(seqs)} sequences")
        width = max((len(s) for s in seqs), default=0)
        response = np.zeros((len(seqs), width), bool)
        for i, s in enumerate(seqs):
            response[i, (prompt_lengths[i] if prompt_lengths is not None else 1) : len(s)] = True
        return self._signal(seqs, width, response, k)

    def _signal(self, sequences: list[list[int]], width: int, response: np.ndarray, k: int | None) -> Signal:
        k = self.top_k if k is None else self._check_k(k)
        fitted = self._fit(sequences)
        rows = self.backend.logprobs(fitted, k, temperature=self.temperature)
        _ledger("logprobs", len(fitted), sum(len(x) for x in fitted))
        b = len(sequences)
        out = {
            "topk_ids": np.zeros((b, width, k), np.int32),
            "topk_logprobs": np.zeros((b, width, k), np.float32),
            "token_logprobs": np.zeros((b, width), np.float32),
            "mask": np.zeros((b, width), bool),
            # the temperature travels with the log-probs, so no consumer can read them at another one
            "temperature": np.full(b, self.temperature, np.float32),
        }
        for i, (ids, lp, tok) in enumerate(rows):
            n = len(tok)
            out["topk_ids"][i, :n], out["topk_logprobs"][i, :n], out["token_logprobs"][i, :n] = ids, lp, tok
            out["mask"][i, 1:n] = response[i, 1:n]  # truncated-away positions (>= n) never count
        return out

    # ---- text --------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt: the model's own chat template for text (with the assistant cue)."""
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        # one rendering for the data pipeline and the teacher: the student learns the prompts it is scored on
        from kdray.models.prompts import encode_prompt

        return encode_prompt(self.tokenizer, prompt, chat_template=self.chat_template)

    def generate(
        self,
        prompts: Sequence[str] | Sequence[Sequence[int]],
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 64,
        seed: int = 0,
    ) -> list[list[dict[str, Any]]]:
        """n samples per prompt (temperature 0 = greedy): dicts with `text`, `token_ids`, `prompt_ids`."""
        if not prompts:
            raise ValueError("generate: the prompt list is empty")
        if n < 1 or max_new_tokens < 1 or temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(
                f"generate: need n >= 1, max_new_tokens >= 1, temperature >= 0, 0 < top_p <= 1; got n={n}, "
                f"max_new_tokens={max_new_tokens}, temperature={temperature}, top_p={top_p}"
            )
        encoded = [self.encode_prompt(p) for p in prompts]
        for i, ids in enumerate(encoded):
            if len(ids) + max_new_tokens > self.max_length:
                raise ValueError(
                    f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} it exceeds the "
                    f"teacher's context of {self.max_length}"
                )
        samples = self.backend.generate(
            encoded, n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed
        )
        _ledger("generate", len(encoded) * n, sum(len(s) for per in samples for s in per))
        return [
            [
                {"text": self.tokenizer.decode(s, skip_special_tokens=True), "token_ids": s, "prompt_ids": p}
                for s in per_prompt
            ]
            for p, per_prompt in zip(encoded, samples, strict=True)
        ]

    def reward(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        """Length-normalised mean log-prob of each response given its prompt (float32 [N])."""
        if len(prompts) != len(responses):
            raise ValueError(f"reward: {len(prompts)} prompts but {len(responses)} responses")
        if not prompts:
            raise ValueError("reward: the prompt list is empty")
        heads = [self.encode_prompt(p) for p in prompts]
        tails = [list(self.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses]
        for i, t in enumerate(tails):
            if not t:
                raise ValueError(f"reward: response {i} is empty")
        sig = self.score(
            [h + t for h, t in zip(heads, tails, strict=True)], k=1, prompt_lengths=[len(h) for h in heads]
        )
        counted = sig["mask"].sum(1)
        return (np.where(sig["mask"], sig["token_logprobs"], 0.0).sum(1) / np.maximum(counted, 1)).astype(
            np.float32
        )

    # ---- service -----------------------------------------------------------------------------

    def close(self) -> None:
        """Release the backend's engine (vLLM worker processes); the pool calls it before killing a replica."""
        if hasattr(self.backend, "close"):
            self.backend.close()

    def info(self) -> dict[str, Any]:
        """Where and what this teacher is: the pool's health check and placement tests read it."""
        node_id = None
        if "ray" in sys.modules:
            import ray

            if ray.is_initialized():
                node_id = ray.get_runtime_context().get_node_id()
        return {
            "pid": os.getpid(),
            "node_id": node_id,
            "hostname": socket.gethostname(),
            "model": self.name,
            "backend": self.backend.name,
            "device": str(getattr(self.backend, "device", "cpu")),
            "vocab_size": self.vocab_size,
            "top_k": self.top_k,
            "max_length": self.max_length,
            "temperature": self.temperature,
            "chat_template": self.chat_template,
            "source": self.source,
        }

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        """Ray Data `map_batches` callable: the batch's columns plus the teacher signal columns."""
        return {**batch, **self.logprobs(batch)}


#: the columns of a batch that `Teacher.logprobs` reads (`_unpad`); a client sends only these
SCORED_COLUMNS = ("input_ids", "attention_mask", "response_mask")


def _unpad(batch: Mapping[str, Any]) -> tuple[list[list[int]], int, np.ndarray]:
    """Ragged token lists, the padded width, and the response mask (default: every real token but the first)."""
    if "input_ids" not in batch:
        raise KeyError(f"teacher batch needs 'input_ids'; it has {sorted(batch)}")
    raw = batch["input_ids"]
    rows = [np.asarray(r).reshape(-1) for r in raw]
    if not rows:
        raise ValueError("empty batch: no sequences to score")
    width = max(len(r) for r in rows)
    attn = batch.get("attention_mask")
    resp = batch.get("response_mask")
    sequences, response = [], np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        keep = np.asarray(attn[i], bool).reshape(-1) if attn is not None else np.ones(len(r), bool)
        if len(keep) != len(r):
            raise ValueError(f"row {i}: attention_mask has {len(keep)} entries for {len(r)} input_ids")
        seq = r[keep].astype(np.int64).tolist()
        sequences.append(seq)
        if resp is not None:
            response[i, : len(seq)] = np.asarray(resp[i], bool).reshape(-1)[keep]
        else:
            response[i, 1 : len(seq)] = True
    return sequences, width, response


def _make_backend(
    kind: str, name_or_path: str | None, *, model: Any, tokenizer: Any, extra: dict, **kw: Any
) -> Any:
    """Build the backend: an in-memory model, or a checkpoint by name/path (transformers or vLLM)."""
    if kind == "hf":
        from kdray.teacher.hf_backend import HFBackend

        if model is None:
            if name_or_path is None:
                raise ValueError("Teacher needs a model name or path (or an in-memory model and tokenizer)")
            from kdray.models.loading import load_causal_lm

            model, tokenizer = load_causal_lm(
                name_or_path,
                revision=kw["revision"],
                gguf_file=kw["gguf_file"],
                dtype=kw["dtype"],
                device=kw["device"],
            )
        elif tokenizer is None:
            raise ValueError("an in-memory teacher model needs its tokenizer too")
        return HFBackend(model, tokenizer, batch_size=kw["batch_size"], **extra)
    if kind == "vllm":
        if name_or_path is None or model is not None:
            raise ValueError("the vllm backend loads its own engine: pass name_or_path, not a model object")
        from kdray.teacher.vllm_backend import VLLMBackend

        # vLLM caps the log-probs it returns (max_logprobs, 20 by default): raise the cap to the k this
        # teacher serves (None = the whole vocabulary) unless the caller set it
        extra.setdefault("max_logprobs", kw["top_k"])
        return VLLMBackend(
            name_or_path, revision=kw["revision"], gguf_file=kw["gguf_file"], dtype=kw["dtype"], **extra
        )
    raise ValueError(f"teacher backend {kind!r} is not one of 'hf', 'vllm'")
