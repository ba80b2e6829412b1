"""PAD's training data, built offline before training, as the reference does (REFERENCES.md Part 2 §2).

For every training prompt the *initial* student (the weights training starts from) samples `samples`
responses, seeded per prompt, at the method's temperature and top-p; `select_diverse` keeps the n most
mutually different (a prompt whose kept responses are not all distinct, or include an empty one, is
dropped). The teacher then scores each kept response: its mean per-token log-prob of the response under
its own tokenization and chat template (`Teacher.reward`) and, when α < 1, a pairwise multiple-choice
judge: for each ordered pair the teacher's next-token distribution after the judge prompt (the
distribution of its one answer token), read from its top-20 log-probs (`letter_probability`), with both
A/B orders averaged. `teacher_rewards` mixes the two into β·(α·log-prob + (1−α)·MCQ).

Both stages are Ray Data `map_batches` actors (the student sampler, then the teacher judge, a client of
the run's TeacherPool); a prompt's group travels as one row (JSON lists) until the driver lays it out as
n consecutive training rows, each with its `group_pos` and `teacher_reward`, cut into whole groups per
micro-batch and worker (`kdray.data.pipeline.grouped_rows`).
"""

from __future__ import annotations

import json
import math
import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: top log-probs of the judge's answer token, as the reference asks vLLM for (logprobs=20)
JUDGE_TOP_K = 20
#: what the judge's answer is read for: the first response shown is A, the second B
LETTERS = ("A", "B")


@dataclass
class PadData:
    """PAD's training rows and what the preparation did (prompts sampled, kept, dropped and why)."""

    rows: list[dict[str, Any]]
    stats: dict[str, Any] = field(default_factory=dict)


def prompt_seed(seed: int, prompt: str) -> int:
    """The sampling seed of one prompt: a pure function of the run's seed and the prompt's text, so a
    prompt's responses do not depend on which batch or actor sampled it."""
    return zlib.crc32(f"{seed}\x00{prompt}".encode()) & 0x7FFFFFFF


class PadSampler:
    """`map_batches` callable: `samples` responses per prompt from the initial student, n kept.

    Each output row is its input row plus `responses` (a JSON list of the n kept texts, in selection
    order) and `status`: "kept", "duplicates" (fewer than n distinct responses) or "empty" (a kept
    response is empty: it has no token for the teacher to score).
    """

    def __init__(
        self,
        *,
        student: Mapping[str, Any],
        seed: int,
        chat_template: bool,
        n: int,
        samples: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        batch_size: int = 8,
    ) -> None:
        from kdray.models.build import build_student
        from kdray.teacher import Teacher

        model, tokenizer = build_student(**student, device="cpu", seed=seed)
        # the Teacher class serves any causal LM: here it samples from the student as training starts
        self.model = Teacher(
            model=model.eval(),
            tokenizer=tokenizer,
            top_k=1,
            batch_size=batch_size,
            chat_template=chat_template,
        )
        self.seed, self.n, self.samples = seed, n, samples
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        from kdray.losses.pad import select_diverse

        responses, status = [], []
        for prompt in (str(p) for p in batch["prompt"]):
            outs = self.model.generate(
                [prompt], n=self.samples, temperature=self.temperature, top_p=self.top_p,
                max_new_tokens=self.max_new_tokens, seed=prompt_seed(self.seed, prompt),
            )[0]  # fmt: skip
            texts = [o["text"] for o in outs]
            chosen = select_diverse(texts, self.n)
            kept = [texts[i] for i in chosen] if chosen is not None else []
            responses.append(json.dumps(kept))
            status.append("duplicates" if chosen is None else "empty" if not all(kept) else "kept")
        return {
            **batch,
            "responses": np.array(responses, dtype=object),
            "status": np.array(status, dtype=object),
        }


def _shorten(text: str) -> str:
    return text if len(text) <= 4 else text[: len(text) * 3 // 4].rstrip(".") + "..."


def judge_prompt_ids(teacher: Any, question: str, first: str, second: str) -> list[int]:
    """The judge prompt's token ids (the teacher's chat template), responses cut until it fits.

    The reference cuts each response to 2500 teacher tokens + "..."; here both are cut by a quarter
    (+ "...") until the prompt and the answer token fit the teacher's context.
    """
    from kdray.losses.pad import mcq_prompt

    for _ in range(32):
        ids = teacher.encode_prompt(mcq_prompt(question, first, second))
        if len(ids) < teacher.max_length:
            return ids
        first, second = _shorten(first), _shorten(second)
    raise ValueError(
        f"the PAD judge prompt does not fit the teacher's context of {teacher.max_length} tokens even with "
        "the responses cut: shorten data.max_prompt_tokens, or set method_params.alpha: 1 (no judge)"
    )


def judge_probabilities(teacher: Any, question: str, responses: Sequence[str]) -> np.ndarray:
    """p_first (n, n): the teacher's probability that response i beats response j, both orders averaged.

    Every ordered pair (i, j), i ≠ j, is asked once with i shown as A: its answer token's distribution
    is the teacher's next-token distribution after the prompt, read from its top-20 log-probs by
    `letter_probability` (token texts merged by log-add). Asked as (i, j), i wins with P("A") and j with
    P("B"); asked as (j, i) the roles swap. p_first[i, j] = ½[P_A(i, j) + P_B(j, i)].
    """
    from kdray.losses.pad import letter_probability

    n = len(responses)
    order = [(i, j) for i in range(n) for j in range(n) if i != j]
    prompts = [judge_prompt_ids(teacher, question, responses[i], responses[j]) for i, j in order]
    filler = teacher.tokenizer.eos_token_id or 0  # the token after the prompt: its distribution is read
    sig = teacher.score([[*p, int(filler)] for p in prompts], k=min(JUDGE_TOP_K, teacher.vocab_size))
    p_first = np.zeros((n, n), np.float64)
    for row, ((i, j), prompt) in enumerate(zip(order, prompts, strict=True)):
        at = len(prompt)
        merged: dict[str, float] = {}
        for tid, lp in zip(sig["topk_ids"][row, at], sig["topk_logprobs"][row, at], strict=True):
            text = teacher.tokenizer.decode([int(tid)])
            merged[text] = float(np.logaddexp(merged[text], lp)) if text in merged else float(lp)
        p_a, p_b = (letter_probability(merged, letter) for letter in LETTERS)
        p_first[i, j] += 0.5 * p_a
        p_first[j, i] += 0.5 * p_b
    return p_first


def judge_groups(teacher: Any, batch: Mapping[str, Any], *, alpha: float, beta: float) -> dict[str, Any]:
    """The teacher's rewards of each kept group of `batch` (JSON lists per row), from `teacher` (a Teacher
    or a `TeacherClient`, serving at temperature 1): adds `teacher_logprob` (mean log-prob of each
    response), `mcq` (scores, or null when α = 1) and `teacher_reward` (β·(α·log-prob + (1−α)·MCQ)). Rows
    that were not kept pass through unscored."""
    import torch

    from kdray.losses.pad import mcq_scores, teacher_rewards

    groups = [json.loads(r) for r in batch["responses"]]
    kept = [i for i, s in enumerate(batch["status"]) if s == "kept"]
    flat = [(i, r) for i in kept for r in groups[i]]
    lps = (
        teacher.reward([str(batch["prompt"][i]) for i, _ in flat], [r for _, r in flat])
        if flat else np.zeros(0, np.float32)
    )  # fmt: skip
    out = {k: [None] * len(groups) for k in ("teacher_logprob", "mcq", "teacher_reward")}
    cursor = 0
    for i in kept:
        n = len(groups[i])
        mean_lp = torch.as_tensor(lps[cursor : cursor + n], dtype=torch.float64).reshape(1, n)
        cursor += n
        mcq = None
        if alpha < 1.0:
            p_first = judge_probabilities(teacher, str(batch["prompt"][i]), groups[i])
            mcq = mcq_scores(torch.as_tensor(p_first).unsqueeze(0))
        reward = teacher_rewards(mean_lp, mcq, alpha=alpha, beta=beta)
        out["teacher_logprob"][i] = json.dumps(mean_lp[0].tolist())
        out["mcq"][i] = json.dumps(mcq[0].tolist()) if mcq is not None else None
        out["teacher_reward"][i] = json.dumps(reward[0].tolist())
    return {**batch, **{k: np.array(v, dtype=object) for k, v in out.items()}}


class PadJudge:
    """`map_batches` callable: `judge_groups` with a client of the run's TeacherPool."""

    def __init__(
        self, teacher_handles: Sequence[Any], *, alpha: float, beta: float, progress: Any = None
    ) -> None:
        from kdray.data.pipeline import teacher_client

        self.teacher = teacher_client(teacher_handles, progress, "pad-judge")
        if self.teacher.temperature != 1.0:  # the reference reads the likelihood and the judge at 1
            raise ValueError(
                f"PAD's judge reads the teacher at temperature 1, but the run's teacher serves "
                f"{self.teacher.temperature}: unset teacher.temperature for method pad"
            )
        self.alpha, self.beta = alpha, beta

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        return judge_groups(self.teacher, batch, alpha=self.alpha, beta=self.beta)


def group_rows(scored: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each kept, scored prompt as n consecutive rows: `response`, `group_pos`, `teacher_reward`, and the
    teacher's `teacher_logprob` (and `mcq`) of that response; the record's other fields ride along."""
    rows: list[dict[str, Any]] = []
    drop = {"responses", "status", "teacher_logprob", "mcq", "teacher_reward", "response"}
    for rec in scored:
        if rec["status"] != "kept":
            continue
        base = {k: v for k, v in rec.items() if k not in drop}
        rewards, lps = json.loads(rec["teacher_reward"]), json.loads(rec["teacher_logprob"])
        mcq = json.loads(rec["mcq"]) if rec.get("mcq") else None
        for pos, text in enumerate(json.loads(rec["responses"])):
            if not math.isfinite(rewards[pos]):
                raise ValueError(
                    f"PAD: the teacher's reward of response {pos} of prompt {rec.get('id')!r} is {rewards[pos]}"
                )
            row = {**base, "response": text, "group_pos": pos, "teacher_reward": float(rewards[pos]),
                   "teacher_logprob": float(lps[pos])}  # fmt: skip
            if mcq is not None:
                row["mcq"] = float(mcq[pos])
            rows.append(row)
    return rows


def pad_params(cfg: Any) -> dict[str, Any]:
    """The knobs the preparation reads: the method's (n, samples, temperature, top_p, alpha) and the β of
    the `pad` term, so the teacher's and the student's rewards are sharpened alike."""
    beta = next((float(t.params.get("beta", 10.0)) for t in cfg.objective.terms if t.name == "pad"), 10.0)
    return {**cfg.objective.method_params, "beta": beta}


def pad_rows(cfg: Any, records: Sequence[Mapping[str, Any]], *, teacher_path: str, teacher: Any) -> PadData:
    """PAD's training rows from the training records, sampled and scored through Ray Data, the judge
    a client of `teacher` (the run's TeacherPool).

    Only the prompts the run can consume are sampled: max_steps x the global batch / n groups, plus a
    quarter for the prompts that get dropped. The rows are cut to whole global batches of whole groups.
    """
    from kdray.data import pipeline
    from kdray.train.trainer import loop_spec, rows_per_run

    p = pad_params(cfg)
    tr = cfg.train
    n = int(p["n"])
    needed = rows_per_run(cfg) // n
    prompts = list(records[: min(len(records), math.ceil(needed * 1.25) + 1)])
    pipeline.deterministic_order()
    # the student exactly as the training workers build it (same weights: same spec, same seed)
    student = loop_spec(cfg, teacher_path=teacher_path, metrics_path=Path(os.devnull), export_path=None)
    ds = pipeline.records_dataset(prompts, block_rows=tr.batch_size)
    ds = ds.map_batches(
        PadSampler,
        fn_constructor_kwargs={
            "student": student.student, "seed": tr.seed, "chat_template": cfg.data.chat_template, "n": n,
            "samples": int(p["samples"]), "temperature": float(p["temperature"]), "top_p": float(p["top_p"]),
            "max_new_tokens": cfg.objective.max_new_tokens, "batch_size": tr.batch_size,
        },
        batch_size=tr.batch_size,
        compute=pipeline.ray_data().ActorPoolStrategy(size=1),
        num_cpus=float(tr.cpus_per_worker),
    )  # fmt: skip
    replicas = len(teacher.handles)
    tickets = pipeline.progress_actor() if replicas > 1 else None  # each judge prefers its own replica
    ds = pipeline.client_stage(
        ds, PadJudge, batch_size=tr.batch_size, replicas=replicas, teacher_handles=teacher.handles,
        alpha=float(p["alpha"]), beta=float(p["beta"]), progress=tickets,
    )  # fmt: skip
    try:
        scored = ds.take_all()
    finally:
        if tickets is not None:
            import ray

            ray.kill(tickets)
    grouped = group_rows(scored)
    rows = pipeline.grouped_rows(grouped, group_size=n, block_rows=tr.batch_size, splits=tr.num_workers)
    status = [r["status"] for r in scored]
    stats = {
        "prompts_sampled": len(scored),
        "prompts_kept": status.count("kept"),
        "dropped_duplicates": status.count("duplicates"),
        "dropped_empty": status.count("empty"),
        "rows": len(rows),
        "mean_teacher_reward": float(np.mean([r["teacher_reward"] for r in rows])),
    }
    return PadData(rows, stats)
