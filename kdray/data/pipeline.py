"""The Ray Data side of a run: records -> (teacher generations) -> tokens -> streaming teacher signal.

Nothing here materialises the dataset: the teacher scores blocks as the training workers pull them, so
the students start as soon as the first blocks are scored. The teacher is the run's TeacherPool, on its
own resources (GPUs, or a custom `teacher` resource that cluster configs give to teacher nodes); the
`map_batches` stages are its clients.
Preference pairs enter as two consecutive rows with a `pair_sign` column (`paired_rows`), which every
stage passes through untouched.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from kdray.data.tokenize import unpadded


def ray_data() -> Any:
    """`ray.data`, imported when a pipeline is built (this module imports without Ray)."""
    import ray.data

    return ray.data


def deterministic_order() -> None:
    """Keep block order through the pipeline and the streaming split, so every worker's k-th batch
    holds the same rows in every run: a 2-worker run then sees the global batches of a 1-worker run."""
    ctx = ray_data().DataContext.get_current()
    ctx.execution_options.preserve_order = True


def records_dataset(records: Sequence[Mapping[str, Any]], *, block_rows: int) -> Any:
    """A dataset of example records, cut into blocks of `block_rows` rows (one micro-batch each)."""
    n_blocks = max(1, -(-len(records) // block_rows))
    return ray_data().from_items(list(records), override_num_blocks=n_blocks)


def paired_rows(
    records: Sequence[Mapping[str, Any]], *, block_rows: int, splits: int = 1
) -> list[dict[str, Any]]:
    """Preference pairs as training rows (`preferences.pair_rows`), cut so no pair is ever split.

    Pairs are consecutive rows, chosen then rejected, and the loss pairs row 2i with row 2i + 1 of a
    micro-batch. That holds if every block `records_dataset` cuts, every worker's shard and every
    micro-batch starts at an even row: with an even `block_rows` (one micro-batch) and a row count that
    is a multiple of `block_rows x splits`, `from_items` cuts equal blocks and Ray Data's equal
    `streaming_split` over `splits` workers hands out whole blocks (its balancing cuts fall on block
    boundaries). The rows past the last such multiple are dropped (fewer than one global batch).
    """
    from kdray.data.preferences import pair_rows

    if block_rows < 2 or block_rows % 2:
        raise ValueError(
            f"preference pairs need an even batch size of at least 2 (chosen and rejected rows share a "
            f"micro-batch); train.batch_size = {block_rows}"
        )
    rows = pair_rows(records)
    return whole_global_batches(
        rows, block_rows=block_rows, splits=splits, what=f"{len(records)} preference records", add="pairs"
    )


def grouped_rows(
    rows: Sequence[Mapping[str, Any]], *, group_size: int, block_rows: int, splits: int = 1
) -> list[Mapping[str, Any]]:
    """PAD's rows (a prompt's n responses as n consecutive rows), cut so no group is ever split.

    The same guarantee as `paired_rows`, for groups of n: with `block_rows` a multiple of n and a row
    count that is a multiple of `block_rows x splits`, every block, worker shard and micro-batch starts
    at a group's first row. The rows past the last such multiple are dropped (fewer than one global
    batch). `rows` must already hold whole groups in order (`kdray.train.pad_data.pad_rows`).
    """
    if group_size < 2 or block_rows % group_size:
        raise ValueError(
            f"PAD trains on groups of method_params.n = {group_size} responses per prompt in one micro-batch: "
            f"train.batch_size = {block_rows} must be a multiple of it"
        )
    if len(rows) % group_size:
        raise ValueError(f"{len(rows)} rows are not whole groups of {group_size}")
    return whole_global_batches(
        rows,
        block_rows=block_rows,
        splits=splits,
        what=f"{len(rows) // group_size} prompt groups",
        add="prompts",
    )


def whole_global_batches(
    rows: Sequence[Any], *, block_rows: int, splits: int, what: str, add: str
) -> list[Any]:
    """The leading rows that fill whole global batches (`block_rows x splits`); the rest are dropped.

    Why: equal blocks and whole micro-batches are what keep a pair or a group inside one micro-batch
    (see `paired_rows`). Refuses data smaller than one global batch, naming `what` was given and what
    to `add`.
    """
    unit = block_rows * splits
    keep = len(rows) // unit * unit
    if keep == 0:
        raise ValueError(
            f"{what} give {len(rows)} rows, fewer than one global batch of {unit} rows "
            f"(train.batch_size x train.num_workers): add {add} or lower the batch size"
        )
    return list(rows[:keep])


class TeacherProgress:
    """A tiny actor counting scored rows over time: how a run measures that training overlapped the
    teacher pass (rows scored before the first optimisation step, out of all rows). It also numbers the
    teacher stages' clients (`ticket`), so that each sends to its own replica first (`TeacherClient`)."""

    def __init__(self) -> None:
        self.events: list[tuple[float, int]] = []
        self.tickets = 0

    def add(self, rows: int, at: float) -> None:
        self.events.append((at, rows))

    def rows_before(self, at: float) -> int:
        return sum(n for t, n in self.events if t <= at)

    def total(self) -> int:
        return sum(n for _, n in self.events)

    def ticket(self) -> int:
        self.tickets += 1
        return self.tickets - 1


def progress_actor() -> Any:
    """A TeacherProgress actor (no CPU reserved: it only appends to a list)."""
    import ray

    return ray.remote(num_cpus=0)(TeacherProgress).remote()


def teacher_client(teacher_handles: Sequence[Any], progress: Any, name: str) -> Any:
    """A `TeacherClient` of the run's TeacherPool, preferring the replica its ticket names."""
    from kdray.teacher.client import TeacherClient

    prefer = 0
    if progress is not None and len(teacher_handles) > 1:
        import ray

        prefer = ray.get(progress.ticket.remote())
    return TeacherClient(teacher_handles, prefer=prefer, name=name)


class TeacherScorer:
    """`map_batches` callable: the teacher signal of each batch, from the run's TeacherPool (its forward
    passes run in the pool's replicas; this actor only sends and cuts), reporting progress to `progress`.

    With `cross` ({student_tokenizer, max_prompt_tokens, max_response_tokens}) the teacher scores its
    own tokenization of each row's prompt and response instead of the student's token ids
    (`kdray.teacher.cross_signal`): the teacher's and the student's tokenizers differ.
    """

    def __init__(
        self, teacher_handles: Sequence[Any], progress: Any = None, cross: Mapping[str, Any] | None = None
    ) -> None:
        self.teacher, self.progress = teacher_client(teacher_handles, progress, "teacher-signal"), progress
        self.cross = None
        if cross is not None:
            from kdray.teacher.cross_signal import CrossTokenizerSignal, load_student_tokenizer

            options = dict(cross)
            student = load_student_tokenizer(options.pop("student_tokenizer"))
            self.cross = CrossTokenizerSignal(self.teacher, student, **options)

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        out = self.cross(batch) if self.cross is not None else self.teacher(batch)
        out.pop("mask", None)  # the batch's own response_mask already says which tokens count
        out = unpadded(out)  # the signal, padded to the batch's longest row, cut back to each row
        if self.progress is not None:
            self.progress.add.remote(len(batch["input_ids"]), time.time())
        return out


class TeacherGenerator:
    """`map_batches` callable for SeqKD data: replaces each row's response with the teacher's output
    (generated by the run's TeacherPool)."""

    def __init__(
        self,
        teacher_handles: Sequence[Any],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        seed: int = 0,
        progress: Any = None,
    ) -> None:
        self.teacher = teacher_client(teacher_handles, progress, "teacher-generations")
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        prompts = [str(p) for p in batch["prompt"]]
        outs = self.teacher.generate(
            prompts, n=1, temperature=self.temperature, max_new_tokens=self.max_new_tokens, seed=self.seed
        )
        return {**batch, "response": np.array([o[0]["text"] for o in outs], dtype=object)}


#: CPUs of each teacher client actor (the Ray Data stages that send batches to the TeacherPool): the
#: teacher's compute is the pool's, on its own resources; a client only sends, waits and cuts
CLIENT_CPUS = 0.25


def client_stage(ds: Any, fn: type, *, batch_size: int, replicas: int, **kwargs: Any) -> Any:
    """`ds.map_batches(fn(**kwargs))` on `replicas` client actors of `CLIENT_CPUS` each: one per replica
    keeps every replica busy (each client has one batch in flight)."""
    return ds.map_batches(
        fn,
        fn_constructor_kwargs=kwargs,
        batch_size=batch_size,
        compute=ray_data().ActorPoolStrategy(size=replicas),
        num_cpus=CLIENT_CPUS,
    )


#: CPUs of each tokenizing actor (one per tokenized dataset): light work beside the teacher and students,
#: but Ray still has to place it, so a run's capacity check counts it (`kdray.train.trainer`)
TOKENIZE_CPUS = 0.25


def tokenized(
    ds: Any,
    tokenizer: str,
    *,
    max_prompt_tokens: int,
    max_response_tokens: int,
    chat_template: bool,
    batch_size: int,
) -> Any:
    """Tokenize prompt/response columns with the model's chat template and a response mask."""
    from kdray.data.tokenize import Tokenize

    return ds.map_batches(
        Tokenize,
        fn_constructor_args=(tokenizer,),
        fn_constructor_kwargs={
            "max_prompt_tokens": max_prompt_tokens,
            "max_response_tokens": max_response_tokens,
            "chat_template": chat_template,
        },
        batch_size=batch_size,
        compute=ray_data().ActorPoolStrategy(size=1),
        num_cpus=TOKENIZE_CPUS,
    )


def tokenized_here(
    records: Sequence[Mapping[str, Any]], tokenizer: str, *, batch_size: int, **options: Any
) -> Any:
    """`tokenized` for a small split (the held-out one), done in this process: one unpadded row per record,
    in blocks of `batch_size`, already in the object store. A tokenizing actor would cost a process start
    (seconds on a small machine) before the first step, for rows read at every evaluation anyway.
    `options` are `Tokenize`'s (max_prompt_tokens, max_response_tokens, chat_template)."""
    from kdray.data.tokenize import Tokenize

    tokenize = Tokenize(tokenizer, **options)
    rows = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        batch = tokenize({key: [r.get(key) for r in chunk] for key in chunk[0]})
        for i, record in enumerate(chunk):
            rows.append(
                {**record, "input_ids": batch["input_ids"][i], "response_mask": batch["response_mask"][i]}
            )
    n_blocks = max(1, -(-len(rows) // batch_size))
    return ray_data().from_items(rows, override_num_blocks=n_blocks)


def with_teacher_signal(
    ds: Any,
    teacher_handles: Sequence[Any],
    *,
    batch_size: int,
    progress: Any = None,
    cross: Mapping[str, Any] | None = None,
) -> Any:
    """Attach the teacher signal, streaming, from the TeacherPool behind `teacher_handles` (one client per
    replica); `cross` makes it the signal over the teacher's own tokenization (see `TeacherScorer`)."""
    return client_stage(
        ds, TeacherScorer, batch_size=batch_size, replicas=len(teacher_handles),
        teacher_handles=list(teacher_handles), progress=progress, cross=cross,
    )  # fmt: skip


def with_teacher_generations(
    ds: Any,
    teacher_handles: Sequence[Any],
    *,
    batch_size: int,
    max_new_tokens: int,
    temperature: float = 0.0,
    progress: Any = None,
) -> Any:
    """Replace responses by teacher generations (SeqKD, sequence-level X-KD on teacher outputs)."""
    return client_stage(
        ds, TeacherGenerator, batch_size=batch_size, replicas=len(teacher_handles),
        teacher_handles=list(teacher_handles), max_new_tokens=max_new_tokens, temperature=temperature,
        progress=progress,
    )  # fmt: skip
