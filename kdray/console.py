"""What the console shows: kdray's own progress by default, Ray's chatter only when asked.

Why: a workflow run on a laptop printed more of Ray's lines (Ray Data execution plans, Ray Train's
worker-group reports, deprecation warnings) than of kdray's, and the lines a user needs (the step, its
progress, the table) were hard to find. Ray's lines still go to its session logs
(`/tmp/ray/session_latest/logs`); `kdray run --verbose` (or `KDRAY_VERBOSE=1`, which Ray workers inherit
through `kdray.run.init_ray`) prints them as before.
"""

from __future__ import annotations

import os

#: set to 1 for Ray's own console output (what `--verbose` sets)
VERBOSE_VARIABLE = "KDRAY_VERBOSE"


def verbose() -> bool:
    """Whether Ray's own log lines go to the console (`KDRAY_VERBOSE` set to anything but empty or 0)."""
    return os.environ.get(VERBOSE_VARIABLE, "") not in ("", "0")


#: when quiet, in every process of a run: progress bars that are not kdray's, and Ray Data's INFO lines
#: ("Dataset ... execution finished"; its warnings still show, and everything stays in the session logs'
#: files only when verbose)
QUIET_ENV = {
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",  # Ray's modules, in every actor
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" / "Writing model shards" bars
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # "Downloading artifacts" when a model is logged
    "RAY_DATA_LOG_LEVEL": "WARNING",
    "MLFLOW_LOGGING_LEVEL": "WARNING",  # "Created version 2 of model ..." (kdray prints the version itself)
}


def quiet_worker_env() -> dict[str, str]:
    """Environment for every Ray worker of a run: the verbosity, and when quiet `QUIET_ENV`."""
    if verbose():
        return {VERBOSE_VARIABLE: "1"}
    return dict(QUIET_ENV)


def quiet_this_process() -> None:
    """`QUIET_ENV` in this process too (the driver), before transformers or Ray Data read it; a value
    the user set is kept."""
    if not verbose():
        for key, value in QUIET_ENV.items():
            os.environ.setdefault(key, value)


def quiet_ray_data() -> None:
    """In the process that builds datasets: no execution plan printed when a dataset starts (quiet)."""
    from ray.data import DataContext

    DataContext.get_current().print_on_execution_start = verbose()


def ray_train_log_level() -> str:
    """Ray Train's console level: its worker-group reports only when verbose."""
    return "INFO" if verbose() else "WARNING"


def quiet_driver_loggers() -> None:
    """In the driver: MLflow's store set-up lines ("Creating initial MLflow database tables...") only
    when verbose."""
    import logging

    if not verbose():
        for name in ("mlflow.store.db.utils", "alembic"):
            logging.getLogger(name).setLevel(logging.WARNING)
