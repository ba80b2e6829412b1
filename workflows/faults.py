"""Fault figures: real faults against small real runs, and what each one cost in training rows.

    python workflows/faults.py                        # every fault; rows go to benchmarks/faults.jsonl
    python workflows/faults.py --only worker_killed   # one fault (a re-run skips finished rows)
    python workflows/faults.py --report               # print the table of the results file

Why: "it resumes" is a claim; this measures it. Each fault hits a tiny distillation (a 2-layer teacher
streaming its top-k signal, a 1-layer student, 20 steps of 8 rows, a checkpoint every 4 steps) on a real
local Ray, a real `mlflow server`, real SIGKILLs and a really full disk (a tmpfs mount), and the run is
compared with a clean run of the same config.

How rows are counted. Training is deterministic for a config and seed (CPU kernels pinned,
`kdray.determinism`), and a resumed run restores model, optimizer, RNG and data position from its last
checkpoint, so a run that lost nothing logs the clean run's loss at every step. Both runs log every step
to metrics.jsonl (`log_every: 1`); a step replayed after a restore is logged again and its last line
counts (`read_history`). Up to the faulted run's last step (the step before the fault for `nan_loss`,
whose later steps differ on purpose):
- rows lost: clean steps absent from the faulted history x rows per step, or the clean run's
  `consumed_rows` minus the faulted run's at that step if larger;
- rows duplicated: steps whose loss differs from the clean run's (rtol 2e-3) x rows per step (a batch
  read at the wrong data position; counted as re-read, the conservative reading), or the faulted run's
  `consumed_rows` minus the clean run's if larger;
- steps redone: metric lines beyond one per step: steps after the last checkpoint done again after a
  restore. The restore discarded their first results, so their rows are not trained twice.
Outcome: `finished` (the run went on through the fault), `resumed` (a restart from the last checkpoint
completed it), `refused` (it stopped with the error in the detail column; what a rerun did follows).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# `python workflows/faults.py` from a checkout without `pip install -e .`; fault_runs sits beside this file
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from fault_runs import (  # noqa: E402
    EVERY,
    NAN_FROM,
    OUTAGE_S,
    ROWS,
    STEPS,
    Bench,
    MlflowServer,
    cause,
    compare,
    detail,
    fill,
    finished,
    metric_lines,
    own_process,
    ranges,
    restarts,
    train_cfg,
    watch,
)  # fmt: skip

# ---------------------------------------------------------------------------------------------- faults


def teacher_killed(bench: Bench) -> dict[str, Any]:
    """SIGKILL the run's teacher replica (its TeacherPool's one actor) while it streams the signal, after
    step 1."""

    def kill(_: dict[str, Any]) -> int:
        # the replica: the Ray Data client is a `ray::MapWorker(...)`, the run's ticket/progress actor a
        # `ray::TeacherProgress`
        pid = own_process("ray::Teacher", exclude="ray::TeacherProgress")
        os.kill(pid, signal.SIGKILL)
        return pid

    fault = watch(bench.metrics("teacher_killed"), 1, kill)
    run = bench.distill("teacher_killed")
    fault["stop"].set()
    final = {} if isinstance(run, BaseException) else run.final
    return {
        "outcome": "refused" if isinstance(run, BaseException) else "finished",
        "injected_at_step": fault.get("at_step"),
        "detail": detail(run, fault, f"teacher actor SIGKILLed after step {fault.get('at_step')}, while "
                          f"{STEPS * ROWS - final.get('teacher_rows_before_first_step', 0)} of {STEPS * ROWS} rows were "
                          f"still to score at step 1; Ray restarted it and the pool re-sent the request it held "
                          f"({final.get('teacher_rows_scored')} rows scored in all, counted on completion)"),
        **compare(bench.metrics("teacher_killed"), bench.clean()),
    }  # fmt: skip


def worker_killed(bench: Bench) -> dict[str, Any]:
    """SIGKILL rank 0's training worker after step 6 (last checkpoint: step 4); `max_failures: 1`."""
    fault = watch(bench.metrics("worker_killed"), 6, lambda h: os.kill(h["worker_pid"], signal.SIGKILL))
    run = bench.distill("worker_killed")
    fault["stop"].set()
    return {
        "outcome": finished(run, bench.metrics("worker_killed")),
        "injected_at_step": fault.get("at_step"),
        "detail": detail(run, fault, "Ray Train restarted the worker from its last checkpoint"),
        **compare(bench.metrics("worker_killed"), bench.clean()),
    }


def nan_loss(bench: Bench) -> dict[str, Any]:
    """The teacher's signal turns NaN for every row from step NAN_FROM on (a Ray Data map over the live
    signal): each step's loss is NaN, skipped, and the tenth in a row stops the run."""
    from kdray.train.trainer import teacher_pool, train_dataset

    cfg = train_cfg(bench.teacher)
    bad = [r["id"] for r in bench.train[(NAN_FROM - 1) * ROWS :]]
    with teacher_pool(cfg, bench.teacher) as pool:
        live = train_dataset(cfg, bench.train, teacher=pool, tokenizer_path=bench.teacher)
        poisoned = live.map_batches(_poison, fn_kwargs={"bad": bad}, batch_format="numpy", batch_size=ROWS)
        run = bench.distill("nan_loss", cfg=cfg, signal_dataset=poisoned)
    lines = metric_lines(bench.metrics("nan_loss"))
    skipped = sorted({r["step"] for r in lines if r.get("skipped")})
    note = f"steps skipped as non-finite: {ranges(skipped) or 'none'}"
    return {
        "outcome": finished(run, bench.metrics("nan_loss")),
        "injected_at_step": NAN_FROM,
        "detail": detail(run, {}, note),
        **compare(bench.metrics("nan_loss"), bench.clean(), upto=NAN_FROM - 1),
    }


def _poison(batch: dict[str, Any], bad: list[str]) -> dict[str, Any]:
    """The rows named in `bad` get NaN teacher log-probs (a teacher that went non-finite)."""
    import numpy as np

    hit = np.isin(batch["id"], bad)
    for key in ("topk_logprobs", "token_logprobs"):
        values = list(batch[key])
        batch[key] = _like(
            batch[key], [np.full_like(v, np.nan) if h else v for v, h in zip(values, hit, strict=True)]
        )
    return batch


def _like(original: Any, values: list[Any]) -> Any:
    import numpy as np

    if original.dtype == object:
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out
    return np.stack(values)


def malformed_rows(bench: Bench) -> dict[str, Any]:
    """A JSONL data file with the clean rows and four malformed lines among them, read by
    `kdray.data.read_records` (skip and count), then trained on."""
    from kdray.data import read_records

    path = bench.root / "malformed" / "train.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    good = [
        json.dumps({"question": r["prompt"], "answer": r["response"], "id": r["id"]}) for r in bench.train
    ]
    broken = ['{"question": "Ann has 3 pens', "[1, 2, 3]", '{"question": "How many?", "answer": "five"}',
              '{"answer": "It is 4.\\n#### 4"}']  # fmt: skip
    lines = good[:30] + broken[:2] + good[30:90] + broken[2:] + good[90:]
    path.write_text("\n".join(lines) + "\n")
    result = read_records("arithmetic", path, format="jsonl", prefix="")
    same = [(r["prompt"], r["response"]) for r in result.records] == [
        (r["prompt"], r["response"]) for r in bench.train
    ]
    run = bench.distill("malformed", train=result.records)
    where = ", ".join(f"line {m.line_no}" for m in result.malformed)
    return {
        "outcome": finished(run, bench.metrics("malformed")),
        "injected_at_step": 0,
        "detail": detail(run, {}, f"{len(result.malformed)} malformed rows counted and skipped ({where}); "
                          f"the {len(result.records)} good rows read {'equal' if same else 'DIFFER FROM'} the clean rows"),
        **compare(bench.metrics("malformed"), bench.clean()),
    }  # fmt: skip


def disk_full(bench: Bench) -> dict[str, Any]:
    """The run's workdir on a 64 MiB tmpfs that another writer fills after step 6, leaving 32 KiB: the
    step-8 checkpoint cannot be written. Then the filler is removed and the same run started again."""
    disk = bench.root / "disk"
    disk.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mount.returncode != 0:
        return {"outcome": "not run", "detail": f"tmpfs mount refused: {mount.stderr.strip()}", "steps": 0}
    try:
        metrics, filler = disk / "distill" / "metrics.jsonl", disk / "filler"
        fault = watch(metrics, 6, lambda _: fill(filler, leave=32 * 1024))
        first = bench.distill("disk", workdir=disk)
        fault["stop"].set()
        free_kib = shutil.disk_usage(disk).free // 1024
        filler.unlink(missing_ok=True)
        note = f"{free_kib} KiB free after the run; "
        if not isinstance(first, BaseException):
            return {"outcome": finished(first, metrics), "injected_at_step": fault.get("at_step"),
                    "detail": detail(first, fault, note + "the full disk did not stop the run"),
                    **compare(metrics, bench.clean())}  # fmt: skip
        second = bench.distill("disk", workdir=disk)  # the same run again, the space freed
        again = "failed: " + cause(second) if isinstance(second, BaseException) else "finished"
        at = ", ".join(map(str, restarts(metrics))) or "-"
        return {
            "outcome": "refused" + ("" if isinstance(second, BaseException) else ", rerun resumed"),
            "injected_at_step": fault.get("at_step"),
            "detail": detail(first, fault, f"{note}the same run started again after freeing the space: {again} "
                             f"(restarted at step {at})"),
            **compare(metrics, bench.clean()),
        }  # fmt: skip
    finally:  # what the run left on the disk is kept for a look (the filler is gone already)
        shutil.copytree(
            disk, bench.root / "disk-contents", dirs_exist_ok=True, ignore=shutil.ignore_patterns("filler")
        )
        subprocess.run(["umount", "-l", str(disk)], check=False)


def driver_killed(bench: Bench) -> dict[str, Any]:
    """SIGKILL the process group of `python workflows/xkd.py` (the driver and the Ray it started) after
    distill step 10 of 20 (last checkpoint: step 8), then run the same command again. The clean run is
    the same command once more with the distill step's directory moved aside (data, teacher and teacher
    signal reused, so both distill runs read the same inputs)."""
    import yaml

    work = bench.root / "driver"
    work.mkdir(parents=True, exist_ok=True)
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(workflow_config(work / "run", bench.teacher)))
    cmd = [sys.executable, str(ROOT / "workflows" / "xkd.py"), "--config", str(config)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    steps = work / "run" / "steps"
    at = 0
    for _ in range(3):  # a start that failed because Ray missed its start-up wait is started again
        with (work / "killed.log").open("w") as log:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            deadline = time.time() + 900
            while time.time() < deadline and proc.poll() is None and at < 10:
                logged = [
                    r["step"]
                    for d in steps.glob("distill-*")
                    for r in metric_lines(d / "student" / "metrics.jsonl")
                ]
                at = max(logged, default=0)
                time.sleep(0.2)
        finally:
            with contextlib.suppress(ProcessLookupError):  # a driver that finished first is reported as such
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if RAY_START_FAILED not in (work / "killed.log").read_text():
            break
    rerun = run_again(cmd, env, work / "rerun.log")
    (distill_dir,) = steps.glob("distill-*")
    faulted = work / "faulted-distill"
    shutil.rmtree(faulted, ignore_errors=True)
    distill_dir.rename(faulted)
    clean = run_again(cmd, env, work / "clean.log")
    restart = next(iter(restarts(faulted / "student" / "metrics.jsonl")), None)
    ok = rerun.returncode == 0 and clean.returncode == 0
    reused = [
        n
        for n in ("data", "teacher", "teacher_outputs")
        if f"[{n}] finished earlier" in rerun.stdout + rerun.stderr
    ]
    return {
        "outcome": ("resumed" if restart and restart > 1 else "finished") if ok else "refused",
        "injected_at_step": at,
        "detail": (f"the rerun reused {', '.join(reused) or 'no step'} and restarted distill at step {restart} "
                   f"(the last checkpoint Ray Train had recorded)"
                   if ok else f"rerun exited {rerun.returncode}, clean {clean.returncode}: {(rerun.stderr or '')[-200:]}"),
        **compare(faulted / "student" / "metrics.jsonl", distill_dir / "student" / "metrics.jsonl"),
    }  # fmt: skip


RAY_START_FAILED = "timed out during startup"  # Ray gives its raylet 30 s, which a loaded machine can miss


def run_again(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.CompletedProcess:
    """Run the workflow command to its end; once more if Ray itself failed to start."""
    for _ in range(3):
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        log.write_text(done.stdout + done.stderr)
        if done.returncode == 0 or RAY_START_FAILED not in done.stdout + done.stderr:
            return done
    return done


def workflow_config(workdir: Path, teacher: str) -> dict[str, Any]:
    """The whole workflow at the size of the in-process runs: a saved teacher, 20 student steps."""
    return {
        "model": {"name_or_path": "tiny", "init": "scratch", "tiny_layers": 1, "tiny_hidden": 32},
        "teacher": {"name_or_path": teacher, "batch_size": ROWS, "top_k": 16},
        "data": {"task": "arithmetic", "format": "generated", "num_examples": STEPS * ROWS, "eval_examples": 8,
                 "max_prompt_tokens": 96, "max_response_tokens": 48, "difficulty": 1},
        "objective": {"method": "xkd", "terms": [{"name": "xkd", "params": {"divergence": "forward_kl"}}]},
        "train": {"batch_size": ROWS, "max_steps": STEPS, "checkpoint_every": EVERY, "eval_every": STEPS, "lr": 3e-3},
        "tracking": {"enabled": False, "log_every": 1},
        "workflow": {"workdir": str(workdir), "baseline": False, "eval_max_new_tokens": 8, "samples": 2,
                     "lca_samples": 2},
    }  # fmt: skip


def mlflow_down(bench: Bench) -> dict[str, Any]:
    """A real `mlflow server` on loopback, SIGKILLed after step 4 and started again (same port and store)
    OUTAGE_S later; rank 0 logs every step into it. Afterwards MLflow's loss series is compared with
    metrics.jsonl: every step present, every value equal."""
    from mlflow import MlflowClient

    from kdray.tracking import Tracker

    server = MlflowServer(bench.root / "mlflow")
    server.start()
    try:
        owner = Tracker(
            server.uri,
            "kdray-faults",
            run_name="mlflow_down",
            spool_dir=bench.root / "mlflow" / "owner-spool",
        )
        spool = bench.root / "mlflow" / "worker-spool"
        tracking = {
            "tracking_uri": server.uri,
            "experiment": "kdray-faults",
            "run_id": owner.run_id,
            "spool_dir": str(spool),
        }
        fault = watch(bench.metrics("mlflow"), 4, lambda _: (server.stop(), time.time())[1])
        started = time.time()
        run = bench.distill("mlflow", tracking=tracking)
        train_s = time.time() - started
        fault["stop"].set()
        time.sleep(max(0.0, fault.get("result", 0.0) + OUTAGE_S - time.time()))
        server.start()
        up = time.time()
        Tracker(server.uri, "kdray-faults", run_id=owner.run_id, spool_dir=spool).close(
            status=None, timeout_s=180
        )
        owner.close("FINISHED", timeout_s=180)
        logged = {h["step"]: h["loss"] for h in metric_lines(bench.metrics("mlflow"))}
        series = {m.step: m.value for m in MlflowClient(server.uri).get_metric_history(owner.run_id, "loss")}
        lost = sorted(set(logged) - set(series))
        wrong = [s for s in logged if s in series and not math.isclose(series[s], logged[s], rel_tol=1e-6)]
        note = (
            f"server SIGKILLed after step {fault.get('at_step')}, started again {OUTAGE_S:.0f} s later and "
            f"answering {up - fault.get('result', up):.0f} s after the kill; training went on ({train_s:.0f} s, "
            f"with rank 0's 30 s wait for the dead server at the end); MLflow holds {len(series)} of {len(logged)} loss points after the restart"
            + (f", missing {ranges(lost)}" if lost else "")
            + (f", {len(wrong)} differ" if wrong else "")
        )
        return {
            "outcome": finished(run, bench.metrics("mlflow")),
            "injected_at_step": fault.get("at_step"),
            "detail": detail(run, fault, note),
            "mlflow_points_lost": len(lost) + len(wrong),
            **compare(bench.metrics("mlflow"), bench.clean()),
        }  # fmt: skip
    finally:
        server.stop()


FAULTS: dict[str, Callable[[Bench], dict[str, Any]]] = {
    "worker_killed": worker_killed,
    "teacher_killed": teacher_killed,
    "mlflow_down": mlflow_down,
    "nan_loss": nan_loss,
    "malformed_rows": malformed_rows,
    "disk_full": disk_full,
    "driver_killed": driver_killed,  # last: it starts Ray instances of its own, three times
}


def report(path: Path) -> str:
    """The table of the results file: the latest row of each fault."""
    from kdray.results import read_rows

    rows = {r["model"]: r for r in read_rows(path)}
    lines = ["| fault | outcome | steps | rows lost | rows duplicated | steps redone | wall s | what happened |",
             "|---|---|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for name in [n for n in FAULTS if n in rows]:
        r = rows[name]
        lines.append(f"| {name} | {r['outcome']} | {r.get('steps', 0)}/{STEPS} | {r.get('rows_lost', '')} | {r.get('rows_duplicated', '')} | "
                     f"{r.get('steps_redone', '')} | {r['wall_s']:.0f} | {r['detail'].replace('|', '/')} |")  # fmt: skip
    if rows:
        commits = ", ".join(sorted({str(r.get("commit")) for r in rows.values()}))
        machines = "; ".join(sorted({f"{r.get('cpu')}, {r.get('threads')} threads" for r in rows.values()}))
        shapes = "; ".join(sorted({str(r.get("args")) for r in rows.values()}))
        lines.append(
            f"\nFrom `{path.name}`: `python workflows/faults.py` ({shapes}); commit {commits}; {machines}."
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=sorted(FAULTS), action="append", help="run this fault (repeatable)")
    parser.add_argument("--workdir", default="runs/faults")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "faults.jsonl"))
    parser.add_argument("--report", action="store_true", help="print the table of the results file and exit")
    args = parser.parse_args()
    if args.report:
        print(report(Path(args.out)))
        return 0
    from kdray.results import ResumableResults
    from kdray.run import init_ray

    for attempt in range(10):  # first, before torch loads: the CPU kernel pins make runs machine-independent
        try:
            init_ray(quiet=True)
            break
        except Exception as err:  # Ray gives its raylet 30 s to register, which a loaded machine can miss
            if RAY_START_FAILED not in str(err) or attempt == 9:
                raise
            print(f"Ray did not start ({err}); trying again", flush=True)
            time.sleep(20)
    results = ResumableResults(args.out, shape=f"steps={STEPS} rows={ROWS} checkpoint_every={EVERY}", seed=0)
    workdir = Path(args.workdir).resolve()
    bench = Bench(workdir)
    for name in args.only or list(FAULTS):
        if name in results:
            print(f"[{name}] finished earlier: {results.reuse(name)['outcome']}")
            continue
        shutil.rmtree(workdir / name, ignore_errors=True)
        started = time.time()
        row = {"model": name, **FAULTS[name](bench), "wall_s": round(time.time() - started, 1)}
        results.record(row)
        print(f"[{name}] {row['outcome']}: lost {row.get('rows_lost')}, duplicated {row.get('rows_duplicated')}, "
              f"redone {row.get('steps_redone')}; {row['detail']}", flush=True)  # fmt: skip
    print(report(Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
