"""Run configuration: frozen dataclasses, one per section, loaded from YAML plus `section.key=value` overrides.

Defaults live only here, so an empty YAML file is a complete config. The loader converts YAML values
by the fields' type hints and every message names the field (`train.lr`), the bad value and what is
allowed, because a typo found at submit time costs seconds and one found on the cluster costs a job.
Only the stdlib and PyYAML are imported: the CLI and job entry points load configs without torch or Ray.
`None` means "off" throughout, never -1. Relative paths are kept as written (they resolve against the
working directory of the job, the repository root under `ray job submit`); `~` is expanded by the
components that open the paths.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import os
import re
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, NoReturn, Union, get_args, get_origin, get_type_hints

import yaml

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "LossTerm",
    "ModelConfig",
    "ObjectiveConfig",
    "SearchDim",
    "TeacherConfig",
    "TrackingConfig",
    "TrainConfig",
    "TuneConfig",
    "WorkflowConfig",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "with_overrides",
]

Dtype = Literal["auto", "float32", "bfloat16"]
Step = Literal["data", "teacher", "teacher_outputs", "distill", "evaluate", "register"]


class ConfigError(ValueError):
    """A config file, key or value is invalid; the message says where, what was given and what is allowed."""


# --- checks shared by the __post_init__ methods -----------------------------------------------------


def _fail(where: str, value: Any, allowed: str) -> NoReturn:
    raise ConfigError(f"{where} = {value!r} is invalid; allowed: {allowed}")


def _at_least(obj: Any, name: str, low: float, *, strict: bool = False) -> None:
    """Checks `obj.name >= low` (`> low` when strict); None passes because it means "off"."""
    value = getattr(obj, name)
    # `not (x >= low)` also rejects NaN, which passes every plain comparison.
    if value is not None and not (value > low if strict else value >= low):
        _fail(f"{obj._section}.{name}", value, f"{'>' if strict else '>='} {low}")


def _between(obj: Any, name: str, low: float, high: float) -> None:
    value = getattr(obj, name)
    if not low <= value <= high:
        _fail(f"{obj._section}.{name}", value, f"a number in [{low}, {high}]")


def _non_empty(obj: Any, name: str) -> None:
    if not getattr(obj, name):
        _fail(f"{obj._section}.{name}", getattr(obj, name), "a non-empty value")


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
        _non_empty(self, "name_or_path")
        if self.init == "layer_pruned" and self.keep_every is None:
            _fail("model.keep_every", None, "an integer >= 2 when model.init = 'layer_pruned'")
        _at_least(self, "keep_every", 2)
        for name in ("tiny_layers", "tiny_hidden", "tiny_vocab"):
            _at_least(self, name, 1)


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
        _non_empty(self, "name_or_path")
        _at_least(self, "top_k", 1)
        _at_least(self, "temperature", 0, strict=True)
        _at_least(self, "replicas", 1)
        _at_least(self, "num_gpus", 0)
        _at_least(self, "num_cpus", 0, strict=True)
        for key, amount in self.resources.items():
            if not key or not amount > 0:
                _fail(f"teacher.resources[{key!r}]", amount, "a non-empty resource name with an amount > 0")
        _at_least(self, "max_restarts", 0)
        _at_least(self, "batch_size", 1)
        _at_least(self, "train_steps", 1)
        _at_least(self, "train_lr", 0, strict=True)
        _at_least(self, "tiny_layers", 1)
        _at_least(self, "tiny_hidden", 8)


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
            _fail("data.source", self.source, "None (null) when data.format = 'generated'")
        if self.format in ("jsonl", "parquet", "hf") and self.source is None:
            _fail("data.source", None, f"a path or dataset name when data.format = {self.format!r}")
        for name in ("num_examples", "eval_examples", "max_prompt_tokens", "max_response_tokens"):
            _at_least(self, name, 1)
        _at_least(self, "difficulty", 1)
        if not 0.0 < self.holdout_fraction < 1.0:
            _fail("data.holdout_fraction", self.holdout_fraction, "a fraction between 0 and 1 (exclusive)")


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
        _non_empty(self, "name")
        if not math.isfinite(self.weight):
            _fail("objective.terms.weight", self.weight, "a finite number >= 0")
        _at_least(self, "weight", 0)
        for key, value in self.params.items():
            if not str(key).isidentifier():
                _fail("objective.terms.params", key, "keys that are Python identifiers (keyword arguments)")
            if value is not None and not isinstance(value, (bool, int, float, str)):
                _fail(f"objective.terms.params.{key}", value, "a scalar: int, float, str, bool or null")


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
        _non_empty(self, "terms")
        _check_cross_tokenizer_terms(self, reference)
        if self.on_policy_fraction is None:
            object.__setattr__(self, "on_policy_fraction", method.on_policy_fraction)
        _between(self, "on_policy_fraction", 0.0, 1.0)
        if method.data == "on_policy" and method.on_policy_fraction == 1.0 and self.on_policy_fraction != 1.0:
            _fail("objective.on_policy_fraction", self.on_policy_fraction, f"1.0 for method {self.method!r}, "
                  "which trains on student samples only")  # fmt: skip
        try:
            object.__setattr__(self, "method_params", method_params(method, dict(self.method_params)))
        except ValueError as err:
            raise ConfigError(f"objective.method_params: {err}") from None
        _at_least(self, "sampling_temperature", 0, strict=True)
        _at_least(self, "max_new_tokens", 1)
        _at_least(self, "generation_temperature", 0)


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
            _at_least(self, name, 1)
        for name in ("checkpoint_every", "eval_every", "loss_chunk_size"):
            _at_least(self, name, 1)
        _at_least(self, "lr", 0, strict=True)
        _at_least(self, "weight_decay", 0)
        _at_least(self, "warmup_steps", 0)
        _at_least(self, "grad_clip", 0, strict=True)
        _at_least(self, "max_failures", 0)
        for key, amount in self.resources.items():
            if not key or not amount > 0:
                _fail(f"train.resources[{key!r}]", amount, "a non-empty resource name with an amount > 0")


@dataclass(frozen=True)
class SearchDim:
    """One dimension of a Ray Tune search space."""

    _section: ClassVar[str] = "tune.search_space"
    type: Literal["choice", "uniform", "loguniform", "grid", "randint"]
    """Distribution: `choice`/`grid` over `values`, `uniform`/`loguniform`/`randint` over [low, high)."""
    values: tuple[Any, ...] | None = None
    """Candidates of `choice` and `grid`; None for the other types."""
    low: float | None = None
    """Lower bound of `uniform`, `loguniform` (> 0) and `randint`."""
    high: float | None = None
    """Upper bound (exclusive for `randint`) of `uniform`, `loguniform` and `randint`."""

    def __post_init__(self) -> None:
        if self.values is not None:
            object.__setattr__(self, "values", tuple(self.values))
        if self.type in ("choice", "grid"):
            if not self.values:
                _fail("tune.search_space.values", self.values, f"a non-empty list for type {self.type!r}")
            if self.low is not None or self.high is not None:
                _fail("tune.search_space.low/high", (self.low, self.high), f"null for type {self.type!r}")
            return
        if self.values is not None:
            _fail("tune.search_space.values", self.values, f"None (null) for type {self.type!r}")
        if self.low is None or self.high is None or not self.low < self.high:
            _fail("tune.search_space.low/high", (self.low, self.high), f"low < high for {self.type!r}")
        if self.type == "loguniform" and not self.low > 0:
            _fail("tune.search_space.low", self.low, "> 0 for type 'loguniform'")
        if self.type == "randint" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            _fail("tune.search_space.low/high", (self.low, self.high), "integers for type 'randint'")


@dataclass(frozen=True)
class TuneConfig:
    """The Ray Tune sweep over the loss mixture and training knobs (`kdray sweep`)."""

    _section: ClassVar[str] = "tune"
    name: str = "sweep"
    """The sweep's directory under `<workflow.workdir>/sweeps/`; re-running a name resumes that sweep."""
    num_samples: int = 8
    """Trials to run (each grid point is repeated this many times)."""
    max_concurrent: int | None = None
    """Trials running at once; None = as many as the cluster fits (one CPU, or one GPU, per trial)."""
    metric: str = "eval_loss"
    """Reported metric the sweep optimises (held-out, reported at every `train.eval_every` step)."""
    mode: Literal["min", "max"] = "min"
    """Whether `metric` is minimised or maximised."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """Trial scheduler: ASHA stops bad trials early, FIFO runs every trial to the end."""
    grace_period: int = 1
    """ASHA: evaluations a trial runs before it can be stopped."""
    reduction_factor: float = 2.0
    """ASHA: at each rung only the best 1/reduction_factor of the trials go on."""
    max_iterations: int | None = None
    """ASHA's horizon: evaluations after which trials are no longer compared (they still run to
    `train.max_steps`); None = every evaluation of `train.max_steps`."""
    seed: int = 0
    """Seed of the random search (the same seed samples the same trials)."""
    search_space: Mapping[str, SearchDim] = field(default_factory=dict)
    """Dimensions keyed by the dotted config path they set, e.g. `train.lr` or `objective.terms.0.weight`."""

    def __post_init__(self) -> None:
        for name in ("num_samples", "max_concurrent", "grace_period", "max_iterations"):
            _at_least(self, name, 1)
        _non_empty(self, "metric")
        _non_empty(self, "name")
        if self.reduction_factor <= 1:
            _fail("tune.reduction_factor", self.reduction_factor, "> 1")
        if self.max_iterations is not None and self.grace_period > self.max_iterations:
            _fail("tune.grace_period", self.grace_period, f"<= tune.max_iterations ({self.max_iterations})")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow tracking."""

    _section: ClassVar[str] = "tracking"
    enabled: bool = True
    """Log params, metrics and artifacts to MLflow (rank 0 only)."""
    tracking_uri: str | None = None
    """MLflow URI; None = $MLFLOW_TRACKING_URI if set, else sqlite:///<workdir>/mlflow.db."""
    experiment: str = "kdray"
    """MLflow experiment name."""
    run_name: str | None = None
    """MLflow run name; None = generated from the method and the models."""
    log_every: int = 10
    """Steps between metric logs."""
    registered_model: str | None = None
    """Register the distilled student under this name in the MLflow model registry; None = do not."""

    def __post_init__(self) -> None:
        _non_empty(self, "experiment")
        _at_least(self, "log_every", 1)


@dataclass(frozen=True)
class WorkflowConfig:
    """The steps of a run and where their outputs live."""

    _section: ClassVar[str] = "workflow"
    workdir: str = "runs/default"
    """Directory of the run's artifacts, checkpoints and (by default) the MLflow store."""
    cache_dir: str | None = None
    """Directory of cached step outputs (e.g. teacher signals); None = <workdir>/steps."""
    steps: tuple[Step, ...] = ("data", "teacher", "teacher_outputs", "distill", "evaluate", "register")
    """Steps to run; the workflow orders them by their dependencies."""
    resume: bool = True
    """Reuse the cached outputs of steps whose inputs did not change."""
    baseline: bool = True
    """Also train an SFT-only student (cross-entropy on the data, same budget) for the evaluation table."""
    eval_max_new_tokens: int | None = None
    """Greedy tokens generated per held-out prompt in the evaluate step; None = data.max_response_tokens."""
    samples: int = 8
    """Held-out generations and reward heat-map rows logged as artifacts."""
    lca_samples: int = 8
    """Samples per held-out prompt for the LCA uncertainty AUROC (exact-match tasks only); 0 = off."""
    lca_temperature: float = 1.0
    """Sampling temperature of those samples."""
    results_file: str | None = None
    """Append one JSON line per evaluated model (its scores, seeds, config hash, commit, CPU, threads and the
    run's wall time) to this file after a run of `kdray run`; None = no file. Tables are generated from it."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))
        _non_empty(self, "workdir")
        _non_empty(self, "steps")
        _at_least(self, "lca_samples", 0)
        _at_least(self, "lca_temperature", 0, strict=True)
        if len(set(self.steps)) != len(self.steps):
            _fail("workflow.steps", list(self.steps), "each step at most once")


@dataclass(frozen=True)
class Config:
    """A whole run: one field per section; every section has defaults, so `Config()` is a valid run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The student model."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """The teacher model and its actors."""
    data: DataConfig = field(default_factory=DataConfig)
    """The examples."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """The method and loss mixture."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """The student's optimisation."""
    tune: TuneConfig = field(default_factory=TuneConfig)
    """The hyper-parameter sweep."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """MLflow tracking."""
    workflow: WorkflowConfig = field(default_factory=WorkflowConfig)
    """Steps and directories."""

    def __post_init__(self) -> None:
        _check_preferences(self)
        _check_pad(self)
        # A sweep dimension must name a settable path of this very config (e.g. an existing term's index).
        plain = config_to_dict(self)
        for key in self.tune.search_space:
            try:
                _set_path(copy.deepcopy(plain), key, None)
            except ConfigError as err:
                raise ConfigError(f"tune.search_space key {key!r} is not a config path: {err}") from None


def _check_preferences(cfg: Config) -> None:
    """Pairs across sections: the method that needs them gets them, and nothing splits or replaces them."""
    from kdray.methods import get_method

    method = get_method(cfg.objective.method)
    if method.pairs and not cfg.data.preferences:
        _fail("data.preferences", False, f"true for method {method.name!r}, which trains on preference pairs")
    if not cfg.data.preferences:
        return
    if cfg.train.batch_size % 2:
        _fail("train.batch_size", cfg.train.batch_size, "an even number with data.preferences (a chosen and "
              "its rejected response share a micro-batch)")  # fmt: skip
    if cfg.objective.on_policy_fraction or method.data != "off_policy":
        _fail("objective.on_policy_fraction", cfg.objective.on_policy_fraction, "0 with data.preferences, and "
              "an off-policy method (student samples would replace the chosen and rejected responses)")  # fmt: skip
    if cfg.objective.teacher_generations or method.generations:
        _fail("objective.teacher_generations", True, "false with data.preferences (teacher generations "
              "would replace the chosen and rejected responses)")  # fmt: skip


def _check_pad(cfg: Config) -> None:
    """PAD's groups: n responses of a prompt share a micro-batch, and nothing replaces its sampled rows."""
    if cfg.objective.method != "pad":
        return
    from kdray.losses.pad import MAX_RESPONSES

    p = cfg.objective.method_params
    n, samples = p["n"], p["samples"]
    if not (isinstance(n, int) and 2 <= n <= MAX_RESPONSES):
        _fail(
            "objective.method_params.n", n, f"an integer in [2, {MAX_RESPONSES}] (n! rankings are enumerated)"
        )
    if not (isinstance(samples, int) and samples >= n):
        _fail(
            "objective.method_params.samples", samples, f"an integer >= n = {n} (n are kept of the samples)"
        )
    if not 0.0 <= p["alpha"] <= 1.0:
        _fail(
            "objective.method_params.alpha",
            p["alpha"],
            "a number in [0, 1] (0 = judge only, 1 = log-prob only)",
        )
    if not 0.0 < p["top_p"] <= 1.0 or not p["temperature"] > 0:
        _fail("objective.method_params", {"top_p": p["top_p"], "temperature": p["temperature"]},
              "top_p in (0, 1] and temperature > 0 (the initial student's sampling)")  # fmt: skip
    if cfg.train.batch_size % n:
        _fail("train.batch_size", cfg.train.batch_size, f"a multiple of objective.method_params.n = {n} with "
              "method 'pad' (a prompt's n responses share a micro-batch)")  # fmt: skip
    if cfg.objective.on_policy_fraction or cfg.objective.teacher_generations or cfg.data.preferences:
        _fail("objective.method", "pad", "with on_policy_fraction 0, teacher_generations false and "
              "data.preferences false: PAD trains on its own sampled, teacher-scored groups")  # fmt: skip


# --- YAML -------------------------------------------------------------------------------------------

# PyYAML follows YAML 1.1, where `1e-4` (no dot) is a string; configs are full of such learning rates.
_EXP_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$")


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-4` as a float and rejects duplicate keys (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key.value!r}", key.start_mark
                    )
                seen.add(key.value)
        return super().construct_mapping(node, deep=deep)


class _Dumper(yaml.SafeDumper):
    """SafeDumper that quotes strings such as `1e5`, which `_Loader` would read back as floats."""


for _cls in (_Loader, _Dumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXP_FLOAT, list("-+0123456789"))


def _read_yaml(path: str | os.PathLike[str]) -> Any:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot read config file {os.fspath(path)}: {err.strerror}") from None
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{os.fspath(path)}: invalid YAML{at}: {getattr(err, 'problem', err)}") from None
    return {} if data is None else data


# --- conversion driven by the type hints ------------------------------------------------------------

_NAMES = {bool: "a boolean (true/false)", int: "an integer", float: "a finite number", str: "a string"}


def _type_name(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(arg) for arg in get_args(hint))
    return _NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def _is_instance(value: Any, hint: Any) -> bool:
    """isinstance for the scalar hints, strict where YAML is loose: bools are not numbers, 2.5 is no int."""
    if get_origin(hint) is Literal:
        return any(value == arg and type(value) is type(arg) for arg in get_args(hint))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return hint in (bool, str) and isinstance(value, hint)


def _join(where: str, key: Any) -> str:
    return f"{where}.{key}" if where else str(key)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """Resolved type hints of a config dataclass's fields (annotations are strings in this module)."""
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown(where: str, key: Any, valid: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f"did you mean `{_join(where, close[0])}`?" if close else f"valid keys: {', '.join(valid)}"
    return f"unknown key `{_join(where, key)}`; {hint}"


def _convert(value: Any, hint: Any, where: str, nullable: bool = False) -> Any:
    """Checks a YAML value against a field's type hint and returns it in the field's type.

    Recurses through the shapes the config uses (X | None, tuple[X, ...], Mapping[str, X], dataclasses)
    so that every error names the full path of the offending value, e.g. `objective.terms.0.weight`.
    """
    origin, args = get_origin(hint), get_args(hint)
    if hint is Any:
        return value
    if origin in (Union, types.UnionType):  # only `X | None` occurs
        if value is None:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _convert(value, inner, where, nullable=True)
    if dataclasses.is_dataclass(hint):
        return _build(hint, {} if value is None else value, where)  # `train:` with nothing under it
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(_convert(item, args[0], f"{where}.{i}") for i, item in enumerate(value))
    if origin is Mapping and isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {key: _convert(item, args[1], f"{where}[{key!r}]") for key, item in value.items()}
    if _is_instance(value, hint):
        return float(value) if hint is float else value
    if origin is tuple:
        expected = f"a list of {_type_name(args[0])}"
    elif origin is Mapping:
        expected = f"a mapping from strings to {_type_name(args[1])}"
    else:
        expected = _type_name(hint)
    expected += " or null" if nullable else ""
    raise ConfigError(f"{where}: expected {expected}, got {value!r} ({type(value).__name__})")


def _build(cls: type, data: Any, where: str) -> Any:
    """Builds the config dataclass `cls` from a mapping; unknown and missing keys fail by their full path."""
    hints = _hints(cls)
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{where or 'the config'} must be a mapping with keys among {', '.join(hints)}; "
            f"got {data!r} ({type(data).__name__})"
        )
    for key in data:
        if key not in hints:
            raise ConfigError(_unknown(where, key, list(hints)))
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in data:
            raise ConfigError(f"{where}: missing required key `{f.name}`")
    kwargs = {key: _convert(value, hints[key], _join(where, key)) for key, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as err:
        section = getattr(cls, "_section", where)
        if where == section:
            raise
        # An item of a list or mapping names its fields under the generic `_section`; say which item.
        raise ConfigError(str(err).replace(section, where, 1)) from None


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_to_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _to_plain(item) for key, item in value.items()}
    return value


def _optional_inner(hint: Any) -> Any:
    """X for `X | None`, the hint itself otherwise."""
    if get_origin(hint) in (Union, types.UnionType):
        (inner,) = [arg for arg in get_args(hint) if arg is not type(None)]
        return inner
    return hint


def _is_nested(hint: Any) -> bool:
    hint = _optional_inner(hint)
    return dataclasses.is_dataclass(hint) or get_origin(hint) in (tuple, Mapping)


def _set_path(data: dict[str, Any], path: str, value: Any) -> None:
    """Sets `value` at a dotted path of a plain config dict, checking every part against the fields.

    Paths: `section.key`, `objective.terms.N.field`, `objective.terms.N.params.name`, and mapping entries
    such as `teacher.resources.teacher` or `tune.search_space.train.lr` (a mapping key takes the rest).
    """
    parts = path.split(".")
    node: Any = data
    hint: Any = Config
    where = ""
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        hint = _optional_inner(hint)
        if dataclasses.is_dataclass(hint):
            if part not in _hints(hint):
                raise ConfigError(_unknown(where, part, list(_hints(hint))))
            if not last and node.get(part) is None:
                # a missing section starts empty (its defaults resolve when it is built); a field left
                # unset takes what its section resolves it to (e.g. `objective.terms`: the method's terms)
                inner = _optional_inner(_hints(hint)[part])
                if dataclasses.is_dataclass(inner):
                    node[part] = {}
                else:
                    node[part] = _to_plain(getattr(_build(hint, node, where), part))
            key: Any = part
            hint = _hints(hint)[part]
        elif get_origin(hint) is tuple:
            if not (part.isdigit() and int(part) < len(node)):
                raise ConfigError(f"`{where}` has {len(node)} item(s), so `{part}` is not one of its indices")
            key, hint = int(part), get_args(hint)[0]
        elif get_origin(hint) is Mapping:
            key, last = ".".join(parts[i:]), True
        else:
            raise ConfigError(f"`{where}` holds {_type_name(hint)}, so it has no key `{part}`")
        if last:
            node[key] = value
            return
        where, node = _join(where, part), node[key]
        kind = (
            list if get_origin(_optional_inner(hint)) is tuple else dict
        )  # a scalar hint fails at the next part
        if _is_nested(hint) and not isinstance(node, kind):
            raise ConfigError(f"cannot set `{path}`: `{where}` is {node!r}, not a {kind.__name__}")


def _apply_override(data: dict[str, Any], text: str) -> None:
    path, sep, raw = text.partition("=")
    path = path.strip()
    if not sep or "." not in path or "" in path.split("."):
        raise ConfigError(
            f"<overrides>: malformed override {text!r}; expected the form section.key=value, e.g. train.lr=1e-4"
        )
    try:
        value = yaml.load(raw, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"<overrides>: the value in {text!r} is not valid YAML: {err}") from None
    try:
        _set_path(data, path, value)
    except ConfigError as err:
        raise ConfigError(f"<overrides>: {text!r}: {err}") from None


# --- public API -------------------------------------------------------------------------------------


def config_from_dict(data: Mapping[str, Any], source: str = "<dict>") -> Config:
    """Builds a Config from plain data (e.g. parsed YAML); `source` prefixes the error messages."""
    try:
        return _build(Config, data, "")
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def load_config(path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = ()) -> Config:
    """Loads a YAML config (None = all defaults) and applies `section.key=value` overrides in order.

    Override values are YAML (`train.lr=1e-4`, `teacher.top_k=null`, `objective.terms=[{name: sft}]`).
    They are applied before the dataclasses are built, so one override may depend on another
    (`model.init=layer_pruned model.keep_every=2`), and an error is blamed on the file only if the file
    alone is invalid.
    """
    if isinstance(overrides, str):
        raise TypeError("overrides must be a sequence of 'section.key=value' strings, not one string")
    source = "<defaults>" if path is None else os.fspath(path)
    data = {} if path is None else _read_yaml(path)
    if not overrides:
        return config_from_dict(data, source)
    merged = copy.deepcopy(data)
    if not isinstance(merged, dict):
        return config_from_dict(merged, source)  # raises: the top level must be a mapping
    for text in overrides:
        _apply_override(merged, text)
    try:
        return config_from_dict(merged, f"<overrides> ({' '.join(overrides)})")
    except ConfigError as err:
        override_error = err
    config_from_dict(data, source)  # raises if the file alone is invalid, so the message names the file
    raise override_error


def with_overrides(cfg: Config, values: Mapping[str, Any]) -> Config:
    """A copy of `cfg` with values set by dotted path, e.g. a Tune trial's {"train.lr": 1e-4}."""
    data = config_to_dict(cfg)
    if "objective.method" in values and values["objective.method"] != cfg.objective.method:
        # a built config holds its method's resolved defaults: another method resolves its own
        for key, unset in (("terms", None), ("on_policy_fraction", None), ("method_params", {})):
            if f"objective.{key}" not in values:
                data["objective"][key] = unset
    if any(k.startswith("objective.cross_tokenizer") for k in values) and "objective.terms" not in values:
        data["objective"]["terms"] = None  # the cross-tokenizer term is resolved from these two fields
        loss = cfg.objective.cross_tokenizer
        changed = values.get("objective.cross_tokenizer", loss) != loss
        if changed and "objective.cross_tokenizer_params" not in values:  # another loss: its own defaults
            data["objective"]["cross_tokenizer_params"] = {}
    for path, value in values.items():
        try:
            _set_path(data, path, _to_plain(value))
        except ConfigError as err:
            raise ConfigError(f"<overrides>: {path!r}: {err}") from None
    return config_from_dict(data, "<overrides>")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A Config (or one section) as plain YAML/JSON-safe data: dicts, lists and scalars.

    Suitable as a cache key's input (json.dumps(..., sort_keys=True)) and as MLflow params.
    """
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"expected a config dataclass instance, got {type(cfg).__name__}")
    return _to_plain(cfg)


def dump_config(cfg: Config) -> str:
    """The config as YAML that `load_config` reads back to an equal Config."""
    return yaml.dump(config_to_dict(cfg), Dumper=_Dumper, sort_keys=False, default_flow_style=False)
