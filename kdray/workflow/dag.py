"""The steps wired into a Ray DAG, and `run_step`, the Ray task that runs (or reuses) one step.

`run_step` is what Ray pickles by reference and runs on the driver's node: it computes the step's key,
reuses a finished directory or runs the step function from `STEPS` in it, and records `_KEY.json` and
then `_DONE.json`. `dag_steps` says which step receives which results; `build_dag` binds that wiring
(plus ordering-only edges) into a DAG, and `run_teacher_steps` runs only the prefix a sweep shares.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdray.config import Config, config_from_dict, config_to_dict
from kdray.workflow.base import StepContext, StepResult
from kdray.workflow.data import data_step
from kdray.workflow.distill import baseline_step, distill_step
from kdray.workflow.evaluate import evaluate_step
from kdray.workflow.keys import DONE, KEY, cache_root, finished, key_components, key_of, step_key
from kdray.workflow.register import register_step
from kdray.workflow.teacher import preflight, teacher_step
from kdray.workflow.teacher_outputs import teacher_outputs_step

STEPS: dict[str, Callable[..., dict[str, Any]]] = {
    "data": data_step,
    "teacher": teacher_step,
    "teacher_outputs": teacher_outputs_step,
    "distill": distill_step,
    "baseline": baseline_step,
    "evaluate": evaluate_step,
    "register": register_step,
}


def run_step(
    step: str, cfg_dict: dict[str, Any], options: dict[str, Any], *inputs: StepResult | None
) -> StepResult:
    """Run one step, or return its recorded outputs when its directory already finished.

    Runs inside a Ray task. `options["tracking"]` names the workflow's parent MLflow run, under which the
    step opens a nested run (tagged `kdray.cached` when it only reports a finished directory);
    `options["progress"]` says whether the driver's console shows progress bars (a terminal) or only
    log lines (a Ray job's log, CI).
    """
    from ray.data import DataContext

    from kdray.console import quiet_ray_data

    # per-operator Ray Data bars (one per map/split stage) drown the step's own progress in the log
    DataContext.get_current().enable_operator_progress_bars = False
    DataContext.get_current().enable_progress_bars = bool(options.get("progress"))
    quiet_ray_data()  # no execution plan per dataset on the console (kdray run --verbose shows them)
    tracking = options.get("tracking")
    cfg = config_from_dict(cfg_dict)
    present = [i for i in inputs if i is not None]
    components = key_components(step, cfg, present)
    key = key_of(components)
    directory = cache_root(cfg) / f"{step}-{key}"
    started = time.time()
    recorded = finished(directory) if cfg.workflow.resume else None
    tracker = _step_tracker(tracking, step, key, cached=recorded is not None)
    try:
        if recorded is not None:
            print(f"[{step}] finished earlier, reusing {directory}", flush=True)
            result = StepResult(step, key, str(directory), recorded, True, 0.0)
        else:
            print(f"[{step}] running -> {directory}", flush=True)
            if not cfg.workflow.resume:  # from scratch: no checkpoint of an earlier attempt is resumed
                shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True, exist_ok=True)
            (directory / DONE).unlink(missing_ok=True)
            _atomic_write(directory / KEY, json.dumps(components, indent=1))
            ctx = StepContext(step, key, directory, cfg, tracker, bool(options.get("progress")))
            outputs = STEPS[step](ctx, *inputs)
            _atomic_write(directory / DONE, json.dumps(outputs, indent=1, default=str))
            result = StepResult(step, key, str(directory), outputs, False, time.time() - started)
            print(f"[{step}] done in {result.seconds:.0f} s", flush=True)
        if tracker is not None:
            tracker.log_params({f"output.{k}": v for k, v in result.outputs.items() if k != "table"})
            tracker.close()
    except BaseException:
        if tracker is not None:
            tracker.close(status="FAILED")
        raise
    return result


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _step_tracker(tracking: dict[str, Any] | None, step: str, key: str, *, cached: bool) -> Any:
    if not tracking:
        return None
    from kdray.tracking import Tracker

    return Tracker(
        tracking["tracking_uri"], tracking["experiment"], run_name=step,
        parent_run_id=tracking["parent_run_id"],
        tags={"kdray.step": step, "kdray.step_key": key, "kdray.cached": str(cached).lower()},
    )  # fmt: skip


def _step_task() -> tuple[Any, Any]:
    """`run_step` as a Ray task with no CPU of its own, pinned to this node (its directories are local
    paths), and that scheduling strategy."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return here, ray.remote(num_cpus=0, max_retries=0, scheduling_strategy=here)(run_step)


def dag_steps(cfg: Config) -> list[tuple[str, tuple[str, ...]]]:
    """The steps of the workflow for `cfg`, in order, each with the steps whose results it receives: the
    one wiring `build_dag` runs and `kdray run --explain` keys (ordering-only edges are `build_dag`'s,
    and stay out of the keys, as in `run_step`)."""
    wanted = set(cfg.workflow.steps)
    steps: list[tuple[str, tuple[str, ...]]] = [
        ("data", ()),
        ("teacher", ("data",)),
        ("teacher_outputs", ("data", "teacher")),
        ("distill", ("data", "teacher", "teacher_outputs")),
    ]
    baseline = cfg.workflow.baseline and "evaluate" in wanted
    last = "distill"
    if baseline:
        steps.append(("baseline", ("data", "teacher")))
        last = "baseline"
    if "evaluate" in wanted:
        steps.append(("evaluate", ("data", "teacher", "distill", *(("baseline",) if baseline else ()))))
        last = "evaluate"
    if "register" in wanted:
        steps.append(("register", ("distill", last)))
    return steps


def build_dag(cfg: Config, tracking: dict[str, Any] | None = None, *, progress: bool = False) -> Any:
    """The workflow as a Ray DAG (`.bind()`); `.execute()` returns the ObjectRef of every step's result.

    Steps are Ray tasks with no CPU of their own (the actors and workers they start hold the resources)
    pinned to this node. The baseline trains beside the student when the cluster has the CPUs for both
    trainings and a core to spare for their data pipelines (their start-up costs then overlap too);
    otherwise after it, since two trainings short of cores would only wait for each other's data. Either
    way it starts after the teacher pass, which holds the teacher's cores.
    """
    import ray

    here, task = _step_task()
    d = config_to_dict(cfg)
    options = {"tracking": tracking, "progress": progress}

    def node(step: str, *inputs: Any) -> Any:
        return task.options(name=f"kdray:{step}").bind(step, d, options, *inputs)

    nodes: dict[str, Any] = {}
    for step, inputs in dag_steps(cfg):
        args = [nodes[i] for i in inputs]
        if step == "baseline":
            train_cpus = cfg.train.num_workers * cfg.train.cpus_per_worker
            side_by_side = ray.cluster_resources().get("CPU", 0.0) >= 2 * train_cpus + 1
            # beside the student, not beside the teacher pass: that one holds the teacher's cores
            args.append(_after(nodes["teacher_outputs" if side_by_side else "distill"]))
        if step == "evaluate" and "baseline" not in inputs:
            args.append(None)  # the evaluate step's baseline argument
        nodes[step] = node(step, *args)
    return ray.remote(num_cpus=0, scheduling_strategy=here)(_gather).bind(*nodes.values())


def run_teacher_steps(cfg: Config, tracking: dict[str, Any] | None = None) -> list[StepResult]:
    """Run (or reuse) data → teacher → teacher_outputs: what every trial of a sweep shares. The teacher
    is trained or checked once and scores the data once; the trials only read the cache it writes."""
    import ray

    preflight(cfg)
    _, task = _step_task()
    d = config_to_dict(cfg)
    options = {"tracking": tracking, "progress": sys.stderr.isatty()}
    data = ray.get(task.options(name="kdray:data").remote("data", d, options))
    teacher = ray.get(task.options(name="kdray:teacher").remote("teacher", d, options, data))
    outputs = ray.get(
        task.options(name="kdray:teacher_outputs").remote("teacher_outputs", d, options, data, teacher)
    )
    return [data, teacher, outputs]


def prefix_keys(cfg: Config) -> dict[str, str]:
    """The cache keys of data, teacher and teacher_outputs for `cfg`, computed without running them."""
    keys: dict[str, str] = {}
    inputs: list[StepResult] = []
    for step in ("data", "teacher", "teacher_outputs"):
        keys[step] = step_key(step, cfg, inputs)
        inputs = [*inputs, StepResult(step, keys[step], "", {}, True, 0.0)]
    return keys


def _after(node: Any) -> Any:
    """An ordering-only edge: the downstream step waits for `node` but does not receive its result."""
    import ray

    return ray.remote(num_cpus=0)(_none).bind(node)


def _none(_: Any) -> None:
    return None


def _gather(*results: StepResult) -> list[StepResult]:
    """The DAG's sink: every step's result, in order, for the summary."""
    return list(results)


def clear_step(cfg: Config, step: str) -> int:
    """Delete the finished directories of `step` (forcing it and the steps after it to run again)."""
    removed = 0
    for directory in cache_root(cfg).glob(f"{step}-*"):
        shutil.rmtree(directory)
        removed += 1
    return removed
