"""The sections of a run that describe the models, the data and the objective, and the optimisation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from kdray.config.checks import ConfigError, at_least, between, fail, non_empty

Dtype = Literal["auto", "float32", "bfloat16"]
Step = Literal["data", "teacher", "teacher_outputs", "distill", "evaluate", "register"]


# --- sections ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """The student model."""

    _section: ClassVar[str] = "model"
    name_or_path: str = "tiny"
    """HF hub id, local directory, `tiny` for a small model built in code, or `teacher` with
    `init: layer_pruned` (the student is cut from whatever model the teacher step resolved)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); None = the default branch."""
    gguf_file: str | None = None
    """GGUF file name inside `name_or_path` to load (dequantized); None = regular weights."""
    dtype: Dtype = "auto"
    """Weight dtype; `auto` = bfloat16 on GPUs that support it, float32 otherwise."""
    init: Literal["pretrained", "layer_pruned", "scratch"] = "pretrained"
    """`pretrained`: the weights at `name_or_path`; `layer_pruned`: a copy of the teacher keeping every
    `keep_every`-th layer; `scratch`: random weights in the architecture of `name_or_path`."""
    keep_every: int | None = None
    """Layer pruning: keep every m-th teacher layer; required when `init` is `layer_pruned`, ignored otherwise."""
    tiny_layers: int = 2
    """Number of transformer layers of the `tiny` model."""
    tiny_hidden: int = 64
    """Hidden size of the `tiny` model."""
    tiny_vocab: int | None = None
    """Vocabulary size of the `tiny` model; None = the tokenizer's size."""

    def __post_init__(self) -> None:
        non_empty(self, "name_or_path")
        if self.init == "layer_pruned" and self.keep_every is None:
            fail("model.keep_every", None, "an integer >= 2 when model.init = 'layer_pruned'")
        at_least(self, "keep_every", 2)
        for name in ("tiny_layers", "tiny_hidden", "tiny_vocab"):
            at_least(self, name, 1)


@dataclass(frozen=True)
class TeacherConfig:
    """The teacher model and the Ray actors that serve it."""

    _section: ClassVar[str] = "teacher"
    name_or_path: str = "tiny"
    """HF hub id, local directory, or `tiny` for a small model built in code."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); None = the default branch."""
    gguf_file: str | None = None
    """GGUF file name inside `name_or_path` to load; None = regular weights."""
    backend: Literal["hf", "vllm"] = "hf"
    """Inference engine: plain transformers or vLLM."""
    top_k: int | None = 64
    """Teacher log-probs kept per position; None = the full vocabulary."""
    temperature: float | None = None
    """Temperature the teacher's log-probs are served at; None = the loss terms' temperature (a top-k
    signal cannot be re-tempered, so the two must agree; see `kdray.losses.signal_temperature`)."""
    replicas: int = 1
    """Number of teacher actors."""
    num_gpus: float = 0.0
    """GPUs per teacher actor (fractions share a GPU)."""
    num_cpus: float = 1.0
    """CPU cores per teacher actor."""
    resources: Mapping[str, float] = field(default_factory=dict)
    """Custom Ray resources per actor, e.g. {teacher: 1} to pin actors to the teacher node type."""
    max_restarts: int = 3
    """Times Ray restarts a dead teacher actor before the run fails."""
    batch_size: int = 8
    """Sequences per teacher forward pass."""
    dtype: Dtype = "auto"
    """Weight dtype; `auto` = bfloat16 on GPUs that support it, float32 otherwise."""
    train_steps: int = 1500
    """For `name_or_path: tiny`: steps of plain cross-entropy training of the teacher from scratch (the
    workflow's teacher step) on the run's own training data; self-contained tasks need no download."""
    train_lr: float = 3e-3
    """Peak learning rate of that teacher training."""
    tiny_layers: int = 4
    """Layers of the tiny teacher built in code."""
    tiny_hidden: int = 128
    """Hidden size of the tiny teacher built in code."""
    truncate: bool = False
    """Truncate sequences longer than the teacher's context instead of failing."""

    def __post_init__(self) -> None:
        non_empty(self, "name_or_path")
        at_least(self, "top_k", 1)
        at_least(self, "temperature", 0, strict=True)
        at_least(self, "replicas", 1)
        at_least(self, "num_gpus", 0)
        at_least(self, "num_cpus", 0, strict=True)
        for key, amount in self.resources.items():
            if not key or not amount > 0:
                fail(f"teacher.resources[{key!r}]", amount, "a non-empty resource name with an amount > 0")
        at_least(self, "max_restarts", 0)
        at_least(self, "batch_size", 1)
        at_least(self, "train_steps", 1)
        at_least(self, "train_lr", 0, strict=True)
        at_least(self, "tiny_layers", 1)
        at_least(self, "tiny_hidden", 8)


@dataclass(frozen=True)
class DataConfig:
    """Where the examples come from and how they are cut."""

    _section: ClassVar[str] = "data"
    task: Literal["arithmetic", "gsm8k", "translation", "summarization"] = "arithmetic"
    """Task: decides the prompt template, the reader's column mapping and the eval metrics."""
    source: str | None = None
    """Path, glob or HF dataset name; None = examples generated in code for the task."""
    subset: str | None = None
    """HF dataset configuration name (e.g. `main` for openai/gsm8k); None = the dataset's default."""
    format: Literal["auto", "jsonl", "parquet", "hf", "generated"] = "auto"
    """Reader; `auto` guesses from `source` (file suffix, directory contents, else an HF name)."""
    split: str = "train"
    """Split used for distillation."""
    eval_split: str = "test"
    """Split used for evaluation."""
    num_examples: int | None = None
    """Training examples to use; None = all of the split."""
    eval_examples: int | None = 200
    """Evaluation examples to use; None = all of the split."""
    holdout_fraction: float = 0.1
    """When training and evaluation read the same rows (one file, or split == eval_split): the share of
    rows held out for evaluation, chosen by a seeded hash of each prompt so no prompt is on both sides."""
    max_prompt_tokens: int = 256
    """Prompts longer than this are truncated from the left."""
    max_response_tokens: int = 256
    """Responses longer than this are truncated from the right."""
    on_malformed: Literal["skip", "fail"] = "skip"
    """What to do with a row that lacks the task's fields: drop it (counted and logged) or stop."""
    seed: int = 0
    """Seed of the shuffle and of generated tasks."""
    chat_template: bool = True
    """Wrap prompts in the tokenizer's chat template when it has one."""
    difficulty: int = 2
    """Generated tasks only: how hard the examples are (e.g. number of operands)."""
    preferences: bool = False
    """Read preference pairs (prompt, chosen, rejected; strings or chat messages) instead of prompt/response
    demonstrations; generated: arithmetic answers paired with a twin carrying one slip. `ava_p` needs it."""

    def __post_init__(self) -> None:
        if self.format == "generated" and self.source is not None:
            fail("data.source", self.source, "None (null) when data.format = 'generated'")
        if self.format in ("jsonl", "parquet", "hf") and self.source is None:
            fail("data.source", None, f"a path or dataset name when data.format = {self.format!r}")
        for name in ("num_examples", "eval_examples", "max_prompt_tokens", "max_response_tokens"):
            at_least(self, name, 1)
        at_least(self, "difficulty", 1)
        if not 0.0 < self.holdout_fraction < 1.0:
            fail("data.holdout_fraction", self.holdout_fraction, "a fraction between 0 and 1 (exclusive)")


@dataclass(frozen=True)
class LossTerm:
    """One weighted term of the objective; `name` is a key of the loss registry."""

    _section: ClassVar[str] = "objective.terms"
    name: str
    """Loss registry key, e.g. `forward_kl` or `xkd` (checked by the loss builder, not here)."""
    weight: float = 1.0
    """Weight of the term in the sum."""
    params: Mapping[str, Any] = field(default_factory=dict)
    """Flat keyword arguments of the term; values are scalars (int, float, str, bool or null)."""

    def __post_init__(self) -> None:
        non_empty(self, "name")
        if not math.isfinite(self.weight):
            fail("objective.terms.weight", self.weight, "a finite number >= 0")
        at_least(self, "weight", 0)
        for key, value in self.params.items():
            if not str(key).isidentifier():
                fail("objective.terms.params", key, "keys that are Python identifiers (keyword arguments)")
            if value is not None and not isinstance(value, (bool, int, float, str)):
                fail(f"objective.terms.params.{key}", value, "a scalar: int, float, str, bool or null")


@dataclass(frozen=True)
class ObjectiveConfig:
    """The distillation method and its loss mixture; what a method is lives in `kdray.methods`."""

    _section: ClassVar[str] = "objective"
    method: str = "xkd"
    """Method, one of `kdray methods`: decides the default terms and where the training sequences come
    from (the data, the teacher's generations or student samples)."""
    terms: tuple[LossTerm, ...] | None = None
    """Weighted loss terms summed into the objective, each logged by name; None = the method's
    reference terms (`kdray methods` lists them, `kdray config` prints them resolved)."""
    on_policy_fraction: float | None = None
    """Probability that a step trains on student samples (GKD's λ); None = the method's default."""
    method_params: Mapping[str, Any] = field(default_factory=dict)
    """Method-level knobs (schedules, sampling: TAID's t_start, MiniLLM's ppo_epochs, ...); unset keys
    take the method's reference defaults."""
    sampling_temperature: float = 1.0
    """Temperature of student sampling for on-policy batches."""
    max_new_tokens: int = 64
    """Maximum length of student samples and of teacher generations."""
    teacher_generations: bool = False
    """Train on teacher-generated responses instead of the data's (always on for `seqkd`)."""
    generation_temperature: float = 0.0
    """Temperature of teacher generations for `teacher_generations`; 0 = greedy."""
    cross_tokenizer: Literal["uld", "gold"] | None = None
    """Loss for a teacher whose tokenizer differs from the student's: `uld` or `gold` replaces the
    method's id-by-id divergence, the teacher scores its own tokenization of each response, and the two
    are paired by the text they cover (docs/cross_tokenizer.md); None = off (tokenizers must match)."""
    cross_tokenizer_params: Mapping[str, Any] = field(default_factory=dict)
    """Knobs of the cross-tokenizer loss (ce_weight, distil_weight, beta, align, ...); unset keys take
    the reference defaults of `cross_tokenizer`."""

    def __post_init__(self) -> None:
        from kdray.methods import UnknownMethodError, get_method, method_params

        try:
            method = get_method(self.method)
        except UnknownMethodError as err:
            raise ConfigError(f"objective.method: {err}") from None
        reference = _cross_tokenizer_terms(self, method) or method.terms
        if self.terms is None:  # the method's reference terms (or the cross-tokenizer loss replacing them)
            terms = tuple(LossTerm(t["name"], t["weight"], dict(t["params"])) for t in reference)
            object.__setattr__(self, "terms", terms)
        object.__setattr__(self, "terms", tuple(self.terms))  # a list from Python code would break ==
        non_empty(self, "terms")
        _check_cross_tokenizer_terms(self, reference)
        if self.on_policy_fraction is None:
            object.__setattr__(self, "on_policy_fraction", method.on_policy_fraction)
        between(self, "on_policy_fraction", 0.0, 1.0)
        if method.data == "on_policy" and method.on_policy_fraction == 1.0 and self.on_policy_fraction != 1.0:
            fail("objective.on_policy_fraction", self.on_policy_fraction, f"1.0 for method {self.method!r}, "
                  "which trains on student samples only")  # fmt: skip
        try:
            object.__setattr__(self, "method_params", method_params(method, dict(self.method_params)))
        except ValueError as err:
            raise ConfigError(f"objective.method_params: {err}") from None
        at_least(self, "sampling_temperature", 0, strict=True)
        at_least(self, "max_new_tokens", 1)
        at_least(self, "generation_temperature", 0)


def _cross_tokenizer_terms(objective: ObjectiveConfig, method: Any) -> tuple[dict[str, Any], ...]:
    """Resolve `cross_tokenizer_params` and return the terms `cross_tokenizer` trains (() when off);
    the rules live with the losses' declaration (`kdray.methods.cross_tokenizer`)."""
    from kdray.methods.cross_tokenizer import resolve_cross_tokenizer

    fraction = objective.on_policy_fraction
    fraction = method.on_policy_fraction if fraction is None else fraction
    try:
        params, terms = resolve_cross_tokenizer(
            objective.cross_tokenizer, dict(objective.cross_tokenizer_params), method, fraction
        )
    except ValueError as err:
        raise ConfigError(str(err)) from None
    object.__setattr__(objective, "cross_tokenizer_params", params)
    return terms


def _check_cross_tokenizer_terms(objective: ObjectiveConfig, reference: Any) -> None:
    from kdray.methods.cross_tokenizer import check_cross_tokenizer_terms

    terms = [{"name": t.name, "weight": t.weight, "params": dict(t.params)} for t in objective.terms or ()]
    try:
        check_cross_tokenizer_terms(objective.cross_tokenizer, terms, reference)
    except ValueError as err:
        raise ConfigError(str(err)) from None


@dataclass(frozen=True)
class TrainConfig:
    """The student's optimisation, run by Ray Train."""

    _section: ClassVar[str] = "train"
    num_workers: int = 1
    """Ray Train workers (data-parallel ranks)."""
    use_gpu: bool = False
    """Give each worker one GPU."""
    resources: Mapping[str, float] = field(default_factory=dict)
    """Custom Ray resources per worker, e.g. {student: 1} to pin workers to the student node type."""
    cpus_per_worker: int = 1
    """CPUs each worker holds and trains with (torch threads): more than 1 pays off for CPU training."""
    batch_size: int = 8
    """Sequences per worker per micro-step."""
    grad_accum: int = 1
    """Micro-steps accumulated per optimizer step."""
    lr: float = 3e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Steps of linear warmup from 0 to `lr`."""
    max_steps: int = 200
    """Optimizer steps of the run."""
    max_examples: int | None = None
    """Train the student on the first N training rows only, repeated as epochs (data-efficiency studies);
    None = all. The teacher still trains on, and the teacher step still reads, the whole split."""
    lr_schedule: Literal["constant", "linear", "cosine"] = "cosine"
    """Decay of the learning rate after warmup (to 0 at `max_steps`)."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this value; None = no clipping."""
    checkpoint_every: int = 50
    """Steps between checkpoints reported to Ray Train."""
    eval_every: int = 50
    """Steps between evaluations."""
    max_failures: int = 1
    """Worker-group failures Ray Train recovers from (restoring the last checkpoint)."""
    precision: Literal["auto", "float32", "bf16"] = "auto"
    """Compute precision; `auto` = bf16 autocast on GPUs that support it, float32 otherwise."""
    loss_chunk_size: int | None = None
    """Positions per chunk when evaluating the loss, to bound memory at large vocabularies; None = no chunks."""
    seed: int = 0
    """Seed of the student's initialisation and of sampling."""

    def __post_init__(self) -> None:
        for name in ("num_workers", "cpus_per_worker", "batch_size", "grad_accum", "max_steps"):
            at_least(self, name, 1)
        for name in ("checkpoint_every", "eval_every", "loss_chunk_size", "max_examples"):
            at_least(self, name, 1)
        at_least(self, "lr", 0, strict=True)
        at_least(self, "weight_decay", 0)
        at_least(self, "warmup_steps", 0)
        at_least(self, "grad_clip", 0, strict=True)
        at_least(self, "max_failures", 0)
        for key, amount in self.resources.items():
            if not key or not amount > 0:
                fail(f"train.resources[{key!r}]", amount, "a non-empty resource name with an amount > 0")
