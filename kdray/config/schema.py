"""The sweep, tracking and workflow sections, and `Config`: the whole run with its cross-section checks."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from kdray.config.checks import ConfigError, at_least, fail, non_empty
from kdray.config.sections import (
    DataConfig,
    ModelConfig,
    ObjectiveConfig,
    Step,
    TeacherConfig,
    TrainConfig,
)


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
                fail("tune.search_space.values", self.values, f"a non-empty list for type {self.type!r}")
            if self.low is not None or self.high is not None:
                fail("tune.search_space.low/high", (self.low, self.high), f"null for type {self.type!r}")
            return
        if self.values is not None:
            fail("tune.search_space.values", self.values, f"None (null) for type {self.type!r}")
        if self.low is None or self.high is None or not self.low < self.high:
            fail("tune.search_space.low/high", (self.low, self.high), f"low < high for {self.type!r}")
        if self.type == "loguniform" and not self.low > 0:
            fail("tune.search_space.low", self.low, "> 0 for type 'loguniform'")
        if self.type == "randint" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            fail("tune.search_space.low/high", (self.low, self.high), "integers for type 'randint'")


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
            at_least(self, name, 1)
        non_empty(self, "metric")
        non_empty(self, "name")
        if self.reduction_factor <= 1:
            fail("tune.reduction_factor", self.reduction_factor, "> 1")
        if self.max_iterations is not None and self.grace_period > self.max_iterations:
            fail("tune.grace_period", self.grace_period, f"<= tune.max_iterations ({self.max_iterations})")


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
    system_metrics_s: float = 10.0
    """Seconds between samples of CPU, memory, disk, network (and GPU) use on the training node, logged
    by MLflow's own monitor into the distill run as `system/...`; 0 = off."""

    def __post_init__(self) -> None:
        non_empty(self, "experiment")
        at_least(self, "log_every", 1)
        at_least(self, "system_metrics_s", 0)


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
        non_empty(self, "workdir")
        non_empty(self, "steps")
        at_least(self, "lca_samples", 0)
        at_least(self, "lca_temperature", 0, strict=True)
        if len(set(self.steps)) != len(self.steps):
            fail("workflow.steps", list(self.steps), "each step at most once")


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
        from kdray.config.loading import config_to_dict, set_path  # loading builds Config: import here

        # A sweep dimension must name a settable path of this very config (e.g. an existing term's index).
        plain = config_to_dict(self)
        for key in self.tune.search_space:
            try:
                set_path(copy.deepcopy(plain), key, None)
            except ConfigError as err:
                raise ConfigError(f"tune.search_space key {key!r} is not a config path: {err}") from None


def _check_preferences(cfg: Config) -> None:
    """Pairs across sections: the method that needs them gets them, and nothing splits or replaces them."""
    from kdray.methods import get_method

    method = get_method(cfg.objective.method)
    if method.pairs and not cfg.data.preferences:
        fail("data.preferences", False, f"true for method {method.name!r}, which trains on preference pairs")
    if not cfg.data.preferences:
        return
    if cfg.train.batch_size % 2:
        fail("train.batch_size", cfg.train.batch_size, "an even number with data.preferences (a chosen and "
              "its rejected response share a micro-batch)")  # fmt: skip
    if cfg.objective.on_policy_fraction or method.data != "off_policy":
        fail("objective.on_policy_fraction", cfg.objective.on_policy_fraction, "0 with data.preferences, and "
              "an off-policy method (student samples would replace the chosen and rejected responses)")  # fmt: skip
    if cfg.objective.teacher_generations or method.generations:
        fail("objective.teacher_generations", True, "false with data.preferences (teacher generations "
              "would replace the chosen and rejected responses)")  # fmt: skip


def _check_pad(cfg: Config) -> None:
    """PAD's groups: n responses of a prompt share a micro-batch, and nothing replaces its sampled rows."""
    if cfg.objective.method != "pad":
        return
    from kdray.losses.pad import MAX_RESPONSES

    p = cfg.objective.method_params
    n, samples = p["n"], p["samples"]
    if not (isinstance(n, int) and 2 <= n <= MAX_RESPONSES):
        fail(
            "objective.method_params.n", n, f"an integer in [2, {MAX_RESPONSES}] (n! rankings are enumerated)"
        )
    if not (isinstance(samples, int) and samples >= n):
        fail("objective.method_params.samples", samples, f"an integer >= n = {n} (n are kept of the samples)")
    if not 0.0 <= p["alpha"] <= 1.0:
        fail(
            "objective.method_params.alpha",
            p["alpha"],
            "a number in [0, 1] (0 = judge only, 1 = log-prob only)",
        )
    if not 0.0 < p["top_p"] <= 1.0 or not p["temperature"] > 0:
        fail("objective.method_params", {"top_p": p["top_p"], "temperature": p["temperature"]},
              "top_p in (0, 1] and temperature > 0 (the initial student's sampling)")  # fmt: skip
    if cfg.train.batch_size % n:
        fail("train.batch_size", cfg.train.batch_size, f"a multiple of objective.method_params.n = {n} with "
              "method 'pad' (a prompt's n responses share a micro-batch)")  # fmt: skip
    if cfg.objective.on_policy_fraction or cfg.objective.teacher_generations or cfg.data.preferences:
        fail("objective.method", "pad", "with on_policy_fraction 0, teacher_generations false and "
              "data.preferences false: PAD trains on its own sampled, teacher-scored groups")  # fmt: skip


# --- YAML -------------------------------------------------------------------------------------------

# PyYAML follows YAML 1.1, where `1e-4` (no dot) is a string; configs are full of such learning rates.
