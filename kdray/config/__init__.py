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

from kdray.config.checks import ConfigError
from kdray.config.loading import config_from_dict, config_to_dict, dump_config, load_config, with_overrides
from kdray.config.schema import Config, SearchDim, TrackingConfig, TuneConfig, WorkflowConfig
from kdray.config.sections import (
    DataConfig,
    LossTerm,
    ModelConfig,
    ObjectiveConfig,
    TeacherConfig,
    TrainConfig,
)

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
