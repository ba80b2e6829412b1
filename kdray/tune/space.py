"""The `tune.search_space` of a config as a Ray Tune param space, and the checks a sweep makes first.

Keys are dotted config paths (`train.lr`, `objective.terms.0.params.lambda_td`); a trial's config is
the base config with its sampled values set at those paths, so anything a config can say a sweep can
search, and every trial's config is validated by the same loader as a hand-written one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kdray.config import Config, ConfigError, SearchDim, with_overrides


def tune_domain(dim: SearchDim) -> Any:
    """One dimension as a Tune sampler (or a grid)."""
    from ray import tune

    if dim.type == "choice":
        return tune.choice(list(dim.values or ()))
    if dim.type == "grid":
        return tune.grid_search(list(dim.values or ()))
    assert dim.low is not None and dim.high is not None  # checked by SearchDim
    if dim.type == "uniform":
        return tune.uniform(dim.low, dim.high)
    if dim.type == "loguniform":
        return tune.loguniform(dim.low, dim.high)
    if dim.type == "randint":
        return tune.randint(int(dim.low), int(dim.high))
    raise ConfigError(f"tune.search_space: unknown type {dim.type!r}")


def param_space(search_space: Mapping[str, SearchDim]) -> dict[str, Any]:
    """{dotted path: Tune domain}: what `Tuner(param_space=...)` samples each trial's overrides from."""
    return {path: tune_domain(dim) for path, dim in search_space.items()}


def candidates(dim: SearchDim) -> list[Any]:
    """Values that stand for a dimension in up-front checks: every listed value, or both bounds."""
    if dim.values is not None:
        return list(dim.values)
    assert dim.low is not None and dim.high is not None
    if dim.type == "randint":
        return [int(dim.low), int(dim.high) - 1]
    return [dim.low, dim.high]


def trial_config(base: Config, overrides: Mapping[str, Any]) -> Config:
    """The config a trial trains with: the base, its sampled values, and a checkpoint at every
    evaluation (each evaluation is a Tune report, and ASHA may stop the trial at any of them)."""
    cfg = with_overrides(base, dict(overrides))
    return with_overrides(cfg, {"train.checkpoint_every": cfg.train.eval_every})


def _only_temperature_differs(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return a["temperature"] != b["temperature"] and {**a, "temperature": None} == {**b, "temperature": None}


def check_shared_teacher_pass(base: Config) -> list[str]:
    """Refuse a search space that would change the teacher's outputs: every trial reads a teacher pass
    the sweep makes up front, so a dimension may not touch the data, the teacher or what it produces.

    One exception: a dimension that changes only the temperature the teacher is served at (a loss
    temperature, with a top-k signal that cannot be re-tempered) is allowed over listed values, and
    costs one teacher pass per value. Returns the paths of such dimensions.
    """
    from kdray.workflow import prefix_keys, teacher_outputs_wanted

    if base.objective.cross_tokenizer is not None:
        raise ConfigError(
            f"objective.cross_tokenizer = {base.objective.cross_tokenizer!r}: a sweep's trials read one teacher "
            "pass cached in the student's tokens, which holds no teacher tokenization; run each setting with "
            "`kdray run` (its distill step scores the teacher live), or sweep a same-tokenizer student"
        )
    want = prefix_keys(base)
    base_needs = teacher_outputs_wanted(base)
    per_pass: list[str] = []
    for path, dim in base.tune.search_space.items():
        for value in candidates(dim):
            try:
                cfg = with_overrides(base, {path: value})
                keys = prefix_keys(cfg)  # builds the objective: a bad loss parameter is caught here
                needs = teacher_outputs_wanted(cfg)
            except (ConfigError, ValueError) as err:
                raise ConfigError(
                    f"tune.search_space[{path!r}]: the value {value!r} is invalid: {err}"
                ) from None
            # a trial that reads no teacher output (every batch sampled on-policy) only needs the data
            steps = want if needs["signal"] or needs["generations"] else ("data", "teacher")
            changed = [step for step in steps if keys[step] != want[step]]
            if changed == ["teacher_outputs"] and _only_temperature_differs(needs, base_needs):
                if dim.values is None:
                    raise ConfigError(
                        f"tune.search_space[{path!r}] changes the temperature the teacher is served at "
                        "(a top-k signal cannot be re-tempered), so each value costs one teacher pass: "
                        f"list the values (type: choice or grid), not a {dim.type!r} range"
                    )
                if path not in per_pass:
                    per_pass.append(path)
            elif changed:
                raise ConfigError(
                    f"tune.search_space[{path!r}] = {value!r} changes the {changed[0]} step's output "
                    f"(the config sections it reads: see kdray.workflow.STEP_SECTIONS), but every trial "
                    "of a sweep reads one shared teacher pass. Sweep the student side only (objective "
                    "weights and parameters, train.*, model.*), or run one sweep per value of this field."
                )
    return per_pass


def teacher_pass_variants(base: Config, paths: list[str]) -> list[dict[str, Any]]:
    """Every combination of the listed values of `paths`: one teacher pass each."""
    import itertools

    values = [list(base.tune.search_space[p].values or ()) for p in paths]
    return [dict(zip(paths, combo, strict=True)) for combo in itertools.product(*values)]


def check_trials_fit(base: Config) -> None:
    """What the trial runner supports, said before any trial starts."""
    if base.train.num_workers != 1:
        raise ConfigError(
            f"train.num_workers = {base.train.num_workers}: a sweep trial trains its student in one worker "
            "(the trial's own actor). Set train.num_workers=1 for the sweep and scale the winning config "
            "with `workflows/xkd.py`, or sweep with more trials side by side instead."
        )
    if not base.tune.search_space:
        raise ConfigError(
            "tune.search_space is empty: name at least one dotted config path to search, e.g.\n"
            "  tune:\n    search_space:\n      train.lr: {type: loguniform, low: 1e-4, high: 1e-2}"
        )
