"""The learned reward model of X-KD/AVA: r(x, y) = Σ_t μ_t, scored, evaluated and used from the CLI.

A student trained with a reward head is exported with the head beside it (`reward_head.pt`, see
`kdray.models.build.export_student`). The head's posterior mean μ_t at position t is the reward of the
action taken in state t (the token at t + 1), so a response's reward is the sum of μ over the positions
that predict its tokens, EOS included: exactly what AVA-p's Bradley–Terry term ranks during training
(`kdray.losses.ava.sequence_rewards`). Held-out preference accuracy is the share of pairs whose chosen
response gets the higher reward (a tie counts as wrong).

    kdray reward --model runs/ava/ava_p/student --data pairs.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "RewardModel",
    "preference_accuracy",
    "resolve_model_dir",
    "reward_command",
    "reward_scores",
    "score_pairs",
]


def resolve_model_dir(path: str | Path) -> Path:
    """The exported model with a reward head at `path`: the directory itself, or the one export with a
    head under it (a run directory such as `runs/ava/ava_p`, or a workflow's work directory)."""
    from kdray.models.build import REWARD_HEAD_FILE

    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"no model or run directory at {root.resolve()}")
    if (root / "config.json").is_file():
        if not (root / REWARD_HEAD_FILE).is_file():
            raise FileNotFoundError(
                f"{root.resolve()} is a model without a reward head ({REWARD_HEAD_FILE}): only a student "
                "trained with one (methods xkd, ava_d, ava_p) scores rewards"
            )
        return root
    found = sorted(p.parent for p in root.rglob(REWARD_HEAD_FILE) if (p.parent / "config.json").is_file())
    if len(found) != 1:
        what = "none" if not found else ", ".join(str(p) for p in found[:5])
        raise FileNotFoundError(
            f"{root.resolve()} should hold exactly one exported student with a reward head "
            f"({REWARD_HEAD_FILE} beside config.json); found {what}. Pass the model directory itself"
        )
    return found[0]


class RewardModel:
    """An exported student and its reward head, loaded once, scoring prompt/response pairs in batches.

    Tokenization is the training's (`kdray.data.tokenize.tokenize_example`): give the same
    `max_prompt_tokens`, `max_response_tokens` and `chat_template` as the run's `data` section.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        max_prompt_tokens: int = 256,
        max_response_tokens: int = 256,
        chat_template: bool = True,
        batch_size: int = 16,
        device: str = "cpu",
    ) -> None:
        from kdray.models import Student
        from kdray.models.build import load_reward_head
        from kdray.models.loading import load_causal_lm

        self.path = resolve_model_dir(path)
        lm, self.tokenizer = load_causal_lm(str(self.path), device=device)
        head = load_reward_head(self.path)
        self.student = Student(lm.eval(), head.to(device)).eval()
        self.tok_kwargs = {
            "max_prompt_tokens": max_prompt_tokens,
            "max_response_tokens": max_response_tokens,
            "chat_template": chat_template,
        }
        self.batch_size, self.device = max(1, batch_size), device

    def scores(self, records: Sequence[Mapping[str, Any]]) -> list[float]:
        """r(x, y) of each `{prompt, response}` record, in order."""
        import torch

        from kdray.data.tokenize import collate, pad_id_of, tokenize_example
        from kdray.losses.ava import sequence_rewards
        from kdray.train.step import student_forward, to_tensors

        out: list[float] = []
        pad = pad_id_of(self.tokenizer)
        with torch.no_grad():
            for start in range(0, len(records), self.batch_size):
                chunk = records[start : start + self.batch_size]
                examples = [
                    tokenize_example(self.tokenizer, str(r["prompt"]), str(r["response"]), **self.tok_kwargs)
                    for r in chunk
                ]
                batch = to_tensors(collate(examples, pad), self.device)
                _, loss_batch = student_forward(self.student, batch, len(self.tokenizer))
                rewards = sequence_rewards(loss_batch["reward_mu"], loss_batch["mask"])
                out += [float(r) for r in rewards]
        return out

    def score_pairs(self, pairs: Sequence[Mapping[str, Any]]) -> list[tuple[float, float]]:
        """(r(x, chosen), r(x, rejected)) of each `{prompt, chosen, rejected}` pair."""
        rows = [{"prompt": p["prompt"], "response": p[key]} for p in pairs for key in ("chosen", "rejected")]
        flat = self.scores(rows)
        return list(zip(flat[0::2], flat[1::2], strict=True))


def reward_scores(model_path: str | Path, records: Sequence[Mapping[str, Any]], **kwargs: Any) -> list[float]:
    """r(x, y) = Σ_t μ_t over the response tokens of each `{prompt, response}` record."""
    return RewardModel(model_path, **kwargs).scores(records)


def score_pairs(
    model_path: str | Path, pairs: Sequence[Mapping[str, Any]], **kwargs: Any
) -> list[tuple[float, float]]:
    """(r(chosen), r(rejected)) of each `{prompt, chosen, rejected}` pair."""
    return RewardModel(model_path, **kwargs).score_pairs(pairs)


def accuracy_of(scored: Sequence[tuple[float, float]]) -> float:
    """Share of pairs whose chosen response scores strictly higher."""
    if not scored:
        raise ValueError("preference accuracy of no pairs is undefined: give at least one pair")
    return sum(c > r for c, r in scored) / len(scored)


def preference_accuracy(model_path: str | Path, pairs: Sequence[Mapping[str, Any]], **kwargs: Any) -> float:
    """Share of held-out pairs whose chosen response gets the higher reward (ties count as wrong)."""
    return accuracy_of(score_pairs(model_path, pairs, **kwargs))


# --- `kdray reward` -----------------------------------------------------------------------------------


def read_scoring_rows(path: str | Path, limit: int | None = None) -> tuple[str, list[dict[str, Any]]]:
    """("pairs" | "responses", rows) of a jsonl/json/parquet file or dataset directory.

    The first row decides the kind: `chosen`/`rejected` (strings or chat messages, see
    `kdray.data.preferences`) are pairs; otherwise each row needs string `prompt` and `response`.
    A row of the other kind, or one missing a field, is an error naming the file, row and field.
    """
    from kdray.data.preferences import pair_record
    from kdray.data.readers import raw_rows, resolve_files
    from kdray.data.records import MalformedRow, text_field

    source = str(path)
    fmt, files = resolve_files(source, "auto", "train")
    kind, rows = "", []
    for label, line_no, row in raw_rows(fmt, source, files, "train", None):
        if isinstance(row, MalformedRow):
            raise row
        if not isinstance(row, Mapping):
            raise MalformedRow(label, line_no, None, "is not an object", "write one JSON object a row")
        kind = kind or ("pairs" if "chosen" in row or "rejected" in row else "responses")
        if kind == "pairs":
            rows.append(pair_record(row, task="", source=label, line_no=line_no))
        else:
            prompt = text_field(row, ("prompt",), label, line_no)
            response = text_field(row, ("response",), label, line_no)
            rows.append({"prompt": prompt, "response": response})
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise ValueError(f"no rows to score in {source}")
    return kind, rows


def reward_command(args: argparse.Namespace) -> int:
    """Print one JSON line per row (its reward, or both rewards of a pair), then the accuracy of pairs."""
    try:
        kind, rows = read_scoring_rows(args.data, args.limit)
        model = RewardModel(
            args.model,
            max_prompt_tokens=args.max_prompt_tokens,
            max_response_tokens=args.max_response_tokens,
            chat_template=not args.no_chat_template,
            batch_size=args.batch_size,
        )
    except (FileNotFoundError, ValueError) as err:  # MalformedRow is a ValueError
        print(f"error: {err}", file=sys.stderr)
        return 2
    if kind == "responses":
        for i, (row, score) in enumerate(zip(rows, model.scores(rows), strict=True), start=1):
            print(json.dumps({"row": i, "id": row.get("id"), "reward": score}))
        return 0
    scored = model.score_pairs(rows)
    for i, (row, (c, r)) in enumerate(zip(rows, scored, strict=True), start=1):
        print(json.dumps({"row": i, "id": row.get("id"), "chosen": c, "rejected": r, "correct": c > r}))
    print(f"preference accuracy: {accuracy_of(scored):.4f} over {len(scored)} pairs ({model.path})")
    return 0
