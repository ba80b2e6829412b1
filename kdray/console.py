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


def quiet_worker_env() -> dict[str, str]:
    """Environment for every Ray worker of a run: the verbosity, and (when quiet) Python's deprecation
    warnings off, which Ray's own modules raise in every Ray Data and Ray Train actor."""
    if verbose():
        return {VERBOSE_VARIABLE: "1"}
    return {"PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning"}


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
