"""`kdray run` and `kdray eval`: the workflow and held-out scoring from the command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any


def load_checked_config(path: str, overrides: list[str]) -> Any:
    """The config at `path` with `overrides`, checked whole (`validate_config`); None after printing the
    error, for exit code 2."""
    from kdray.config import ConfigError, load_config
    from kdray.validate import validate_config

    try:
        cfg = load_config(path, overrides)
        validate_config(cfg)  # every check that needs the loss registry, before any work
        return cfg
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return None


def init_ray(address: str | None = None, quiet: bool = False) -> None:
    """Join `address` (or $RAY_ADDRESS, set inside a Ray job), else start a private local instance: a
    plain `python workflows/xkd.py` never attaches to some other Ray cluster on the same machine.

    Every worker and actor starts with the driver's CPU kernel pins (`kdray.determinism`), so the
    benchmarks and workflows that call this compute the same on any x86 machine. `quiet` (the
    benchmarks) keeps workers' logs, Ray Data's progress bars and the dashboard out of the console.
    """
    from kdray.determinism import pin_cpu_kernels

    pins = pin_cpu_kernels()  # before anything imports torch, so this process computes like its workers
    from kdray.console import quiet_this_process, quiet_worker_env, verbose

    quiet_this_process()  # before transformers or Ray Data are imported: they read it once
    import ray

    if ray.is_initialized():
        return
    env = {**pins, **quiet_worker_env()}
    options: dict = {"runtime_env": {"env_vars": env}, "log_to_driver": not quiet}
    if not verbose():
        options["logging_level"] = logging.WARNING  # no "Started a local Ray instance" line
    if quiet:
        options["include_dashboard"] = False
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    if target == "local":
        options["num_cpus"] = local_cpus()
    ray.init(address=target, **options)
    if quiet:
        ray.data.DataContext.get_current().enable_progress_bars = False


def terminate_as_interrupt() -> None:
    """SIGTERM (`kill`, a scheduler's stop, `ray job stop`) raises KeyboardInterrupt, as Ctrl-C does, so
    the workflow marks its MLflow runs KILLED and leaves its checkpoints for a resume instead of dying
    mid-write. Only from the main thread (Python delivers signals there)."""
    import signal
    import threading

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


def local_cpus() -> int:
    """Logical CPUs of a private local Ray: the cores, and at least 4. Training workers and teacher
    actors each hold whole CPUs while Ray Data's readers and tokenizers need slivers beside them; on a
    2-core laptop the SFT baseline and the student train side by side (one core each) and their data
    pipelines still get scheduled. `$KDRAY_LOCAL_CPUS` sets the number."""
    if os.environ.get("KDRAY_LOCAL_CPUS"):
        return int(os.environ["KDRAY_LOCAL_CPUS"])
    return max(os.cpu_count() or 1, 4)


def run_command(args: argparse.Namespace) -> int:
    """Run the workflow of `args.config`; print the evaluation table and where the MLflow run lives.
    With `--explain`, only print which steps would be reused and why the others would run."""
    cfg = load_checked_config(args.config, list(args.overrides))
    if cfg is None:
        return 2
    if args.fresh:
        from kdray.config import with_overrides

        cfg = with_overrides(cfg, {"workflow.resume": False})
    if getattr(args, "explain", False):  # keys only: no Ray, no step runs
        from kdray.workflow import explain_steps

        for line in explain_steps(cfg):
            print(line)
        return 0
    started = time.time()
    init_ray(args.address)
    from kdray.console import quiet_driver_loggers
    from kdray.workflow import run_workflow

    terminate_as_interrupt()
    quiet_driver_loggers()
    try:
        result = run_workflow(cfg, run_name=args.run_name)
    except KeyboardInterrupt as stop:
        reason = f" ({stop})" if str(stop) else ""
        print(
            f"\n[kdray] interrupted{reason}: finished steps and the last checkpoint of the running one are kept "
            "(its MLflow run is marked KILLED); run the same command again to resume.",
            file=sys.stderr,
        )
        return 130
    if cfg.workflow.results_file:
        rows = append_results(cfg, result, args, time.time() - started)
        print(f"\n{rows} result rows appended to {cfg.workflow.results_file}")
    print()
    for step in result.steps:
        state = "reused" if step.cached else f"{step.seconds:.0f} s"
        print(f"  {step.step:<16} {state:>8}  {step.directory}")
    evaluation = next((s for s in result.steps if s.step == "evaluate"), None)
    if evaluation is not None:
        print("\n" + evaluation.outputs["table"])
    register = next((s for s in result.steps if s.step == "register"), None)
    if register is not None and register.outputs.get("registered"):
        print(f"\nregistered model: {register.outputs['registered']} v{register.outputs['version']}")
    if result.tracking_uri:
        print("\n" + mlflow_hint(result.tracking_uri, result.parent_run_id))
    return 0


def append_results(cfg: Any, result: Any, args: argparse.Namespace, wall_s: float) -> int:
    """One JSON line per model of the evaluation table in `workflow.results_file`: what a generated table
    needs to say where each number came from (the command, seeds, config hash, commit, CPU, threads, the
    run's wall time and each step's seconds, 0 for a reused step). Returns the number of rows."""
    from kdray.config import config_to_dict
    from kdray.data.cache import fingerprint
    from kdray.determinism import provenance
    from kdray.results import append_rows

    evaluation = next((s for s in result.steps if s.step == "evaluate"), None)
    if evaluation is None:
        return 0
    common = {
        "command": " ".join(["kdray run --config", args.config, *args.overrides]),
        "config_hash": fingerprint([config_to_dict(cfg)])[:16],
        **provenance(cfg.train.seed),
        "data_seed": cfg.data.seed,
        "wall_s": round(wall_s, 1),
        "steps_s": {s.step: 0.0 if s.cached else round(s.seconds, 1) for s in result.steps},
        "metric": evaluation.outputs["metric"],
    }
    lead = evaluation.outputs.get("lead") or {}
    rows = (
        {"model": label, "scores": scores, **common}
        | (
            {"lead_vs_baseline": {k: v for k, v in lead.items() if k != "model"}}
            if label == lead.get("model")
            else {}
        )
        for label, scores in evaluation.outputs["scores"].items()
    )
    return append_rows(cfg.workflow.results_file, rows)


def sweep_command(args: argparse.Namespace) -> int:
    """Run (or resume) the sweep of `args.config`; print the trials, the best config and the MLflow run."""
    from kdray.config import ConfigError

    cfg = load_checked_config(args.config, list(args.overrides))
    if cfg is None:
        return 2
    from kdray.tune.space import check_shared_teacher_pass, check_trials_fit

    try:  # said before Ray starts
        check_trials_fit(cfg)
        check_shared_teacher_pass(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    init_ray(args.address)
    from kdray.tune import run_sweep

    result = run_sweep(cfg, run_name=args.run_name)
    print("\n" + result.table(cfg.tune.metric))
    failed = [t for t in result.trials if t["status"] == "failed"]
    for t in failed:
        print(f"\ntrial {t['trial_id']} failed: {t['error']}")
    if result.best_config_path is not None:
        print(
            f"\nbest: trial {result.best['trial_id']}, {cfg.tune.metric} = {result.best['metric']:.4f}"
            f"\nbest config: {result.best_config_path}"
            f"\n  python workflows/xkd.py --config {result.best_config_path}"
        )
    print(f"search plot: {result.directory / 'search.png'}")
    if result.tracking_uri:
        print("\n" + mlflow_hint(result.tracking_uri, result.parent_run_id))
    return 0 if result.best is not None else 1


def mlflow_hint(tracking_uri: str, run_id: str | None) -> str:
    """How to look at the run in the MLflow UI."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"MLflow run {run_id}: open {tracking_uri} in a browser"
    return (
        f"MLflow run {run_id}. To browse it:\n"
        f"  mlflow ui --backend-store-uri {tracking_uri} --port 5000\n"
        f"  then open http://127.0.0.1:5000"
    )


def eval_command(args: argparse.Namespace) -> int:
    """Greedy generations of each model on the config's held-out split (or on `--data`), scored for the
    config's task; on exact-match tasks also the LCA uncertainty AUROCs (`--lca-samples`, 0 = off)."""
    cfg = load_checked_config(args.config, list(args.overrides))
    if cfg is None:
        return 2
    from kdray.eval.evaluate import TASK_METRIC, score_model
    from kdray.eval.uncertainty import evaluate_models_lca, format_lca_table, lca_applies, not_applicable
    from kdray.workflow import format_table

    lca_samples = cfg.workflow.lca_samples if args.lca_samples is None else args.lca_samples
    if lca_samples < 0:
        print(f"error: --lca-samples {lca_samples} must be >= 0 (0 turns LCA off)", file=sys.stderr)
        return 2
    missing = [path for path in args.models if not Path(path).is_dir()]
    if missing:
        print(f"error: {missing[0]}: not a model directory (expected a saved HF checkpoint)", file=sys.stderr)
        return 2
    records = eval_records(cfg, args.data, args.limit)
    if records is None:
        return 2
    new_tokens = cfg.workflow.eval_max_new_tokens or cfg.data.max_response_tokens
    if not cfg.data.chat_template:
        _note_unused_templates(args.models)
    scores = {}
    for path in args.models:
        _, scores[path] = score_model(
            path, records, task=cfg.data.task, max_new_tokens=new_tokens, chat_template=cfg.data.chat_template,
            max_prompt_tokens=cfg.data.max_prompt_tokens, max_response_tokens=cfg.data.max_response_tokens,
        )  # fmt: skip
    if args.data:
        print(f"scored on {args.data} ({len(records)} records)")
    print(format_table(scores, TASK_METRIC[cfg.data.task], cfg.data.task, len(records)))
    if lca_samples and not lca_applies(cfg.data.task):
        print("\n" + not_applicable(cfg.data.task))
    elif lca_samples:
        lca = evaluate_models_lca(
            {path: (path, path) for path in args.models}, records, task=cfg.data.task, samples=lca_samples,
            temperature=cfg.workflow.lca_temperature, max_new_tokens=new_tokens,
            chat_template=cfg.data.chat_template, seed=cfg.data.seed,
        )  # fmt: skip
        print("\n" + format_lca_table(lca, cfg.data.task, len(records), lca_samples))
    return 0


def _note_unused_templates(models: list[str]) -> None:
    """A model with a chat template scored with `data.chat_template: false` sees raw prompts. A kdray
    student keeps its template only when it was trained through it (`export_student`), so say so: a
    config written for another model would otherwise score it on prompts it never saw, silently."""
    from transformers import AutoTokenizer

    for path in models:
        if AutoTokenizer.from_pretrained(path).chat_template:
            print(
                f"note: {path} has a chat template but data.chat_template is false, so its prompts are scored "
                "raw. A kdray student keeps its template only when it was trained through it: to score it as "
                "trained, add data.chat_template=true",
                file=sys.stderr,
            )


def eval_records(cfg: Any, data: str | None, limit: int | None) -> list[dict[str, Any]] | None:
    """The records `kdray eval` scores: the config's held-out split, or the file `data` read in the task's
    own fields (every row must be good). None after printing the error (a missing file, or a malformed row
    named by file, row and field), for exit code 2."""
    from kdray.data import read_config_split, read_records

    if data is None:
        return read_config_split(cfg.data, "eval").records[:limit]
    try:
        return read_records(
            cfg.data.task, data, split=cfg.data.eval_split, limit=limit, on_malformed="fail"
        ).records
    except (OSError, ValueError) as err:  # MalformedRow is a ValueError naming file, row and field
        print(f"error: --data {data}: {err}", file=sys.stderr)
        return None
