"""The measuring side of `workflows/faults.py`: the shared config and clean run, the comparison of a
faulted run's metrics with the clean run's, a watcher that injects a fault at a logged step, and a real
`mlflow server`. Kept apart so the fault scenarios read as scenarios (module doc of faults.py: how rows
are counted)."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

STEPS, EVERY, ROWS = 20, 4, 8  # steps, checkpoint interval, rows per step (one worker)
RTOL, ATOL = 2e-3, 1e-4
NAN_FROM = 7  # nan_loss: the teacher's signal is NaN from this step's rows on
OUTAGE_S = 60.0


def train_cfg(teacher: str, **train: Any) -> Any:
    """The config every in-process fault and its clean run share."""
    from kdray.config import config_from_dict

    return config_from_dict(
        {
            "model": {"name_or_path": "tiny", "tiny_layers": 1, "tiny_hidden": 32},
            "teacher": {"name_or_path": teacher, "top_k": 16, "num_cpus": 1, "batch_size": ROWS},
            "data": {"max_prompt_tokens": 96, "max_response_tokens": 96},
            "objective": {"method": "xkd", "terms": [{"name": "xkd", "params": {"divergence": "forward_kl"}}]},
            "train": {"batch_size": ROWS, "max_steps": STEPS, "checkpoint_every": EVERY, "eval_every": STEPS,
                      "lr": 3e-3, "seed": 0, "max_failures": 1, **train},
            "tracking": {"log_every": 1},
        }
    )  # fmt: skip


def metric_lines(path: Path) -> list[dict[str, Any]]:
    """Every line rank 0 logged, replays included (`read_history` keeps the last line per step)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def restarts(path: Path) -> list[int]:
    """The steps a run restarted at: a logged step not after the one before it (a restore replays)."""
    lines = metric_lines(path)
    return [b["step"] for a, b in itertools.pairwise(lines) if b["step"] <= a["step"]]


def compare(run: Path, clean: Path, upto: int | None = None) -> dict[str, Any]:
    """Rows lost and duplicated, and steps redone, of a faulted run against the clean one (module doc)."""
    from kdray.train.trainer import read_history

    got = {h["step"]: h for h in read_history(run)}
    ref = {h["step"]: h for h in read_history(clean)}
    last = min(max(got, default=0), upto or STEPS)
    want = [s for s in ref if s <= last]
    missing = [s for s in want if s not in got]
    diverged = [
        s for s in want
        if s in got and not math.isclose(got[s]["loss"], ref[s]["loss"], rel_tol=RTOL, abs_tol=ATOL)
    ]  # fmt: skip
    delta = got[last]["consumed_rows"] - ref[last]["consumed_rows"] if last in got and last in ref else 0
    lines = metric_lines(run)
    return {
        "steps": max(got, default=0),
        "rows_lost": max(len(missing) * ROWS, -delta, 0),
        "rows_duplicated": max(len(diverged) * ROWS, delta, 0),
        "steps_redone": len(lines) - len({r["step"] for r in lines}),
        "compared_steps": last,
    }


def watch(metrics: Path, step: int, action: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """Call `action(last logged metrics)` once step `step` is logged, from a thread; the dict it returns
    gets `at_step` and `result` (or `error`) filled in. `done["stop"].set()` ends the watch."""
    from kdray.train.trainer import read_history

    done: dict[str, Any] = {"stop": threading.Event()}

    def poll() -> None:
        while not done["stop"].is_set():
            history = read_history(metrics) if metrics.exists() else []
            if history and history[-1]["step"] >= step:
                done["at_step"] = history[-1]["step"]
                try:
                    done["result"] = action(history[-1])
                except Exception as err:  # reported in the row, not swallowed
                    done["error"] = f"{type(err).__name__}: {err}"
                return
            time.sleep(0.05)

    done["thread"] = threading.Thread(target=poll, daemon=True)
    done["thread"].start()
    return done


def own_process(title: str, exclude: str | None = None) -> int:
    """The pid of the one process under this one whose command line holds `title` but not `exclude` (Ray
    names an actor's worker process `ray::<class>...`). Other Ray instances on the machine are never
    touched."""
    me, found = os.getpid(), []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_text()
                if (
                    title in cmdline
                    and not (exclude and exclude in cmdline)
                    and me in _ancestors(int(entry.name))
                ):
                    found.append(int(entry.name))
            except OSError:  # the process ended while being read
                continue
    if len(found) != 1:
        raise LookupError(f"expected one process {title!r} under pid {me}, found {found}")
    return found[0]


def _ancestors(pid: int) -> list[int]:
    out = []
    while pid > 1:
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        out.append(pid)
    return out


def cause(err: BaseException) -> str:
    """The innermost error's first line: a Ray Train failure wraps the worker's or the controller's error
    (as an exception chain, or as traceback text inside its message)."""
    text = "\n".join(f"{type(e).__name__}: {e}" for e in _chain(err))
    found = list(re.finditer(r"^\s*(?:[\w.]+\.)?(\w+(?:Error|Exception)): (\S.*)$", text, flags=re.M))
    if not found:
        return f"{type(err).__name__}: {str(err).splitlines()[0]}"[:300]
    last = found[-1]
    message = last[2].strip()
    if message.endswith(":"):  # "Training failed due to controller error:" and the cause on the next line
        message += " " + next((line.strip() for line in text[last.end() :].splitlines() if line.strip()), "")
    return f"{last[1]}: {message}"[:300]


def _chain(err: BaseException | None) -> list[BaseException]:
    out = []
    while err is not None and err not in out:
        out.append(err)
        err = err.__cause__ or err.__context__
    return out


class Bench:
    """The shared inputs: a saved teacher, the records, and the clean run (trained once, on first use)."""

    def __init__(self, root: Path) -> None:
        from kdray.data import generate_arithmetic
        from kdray.models.tiny import save_tiny_checkpoint

        self.root = root
        self.teacher = str(save_tiny_checkpoint(root / "teacher", hidden_size=64, num_layers=2, seed=1))
        self.train = generate_arithmetic(STEPS * ROWS, seed=0, difficulty=1)
        self.eval = generate_arithmetic(16, seed=1, difficulty=1, split="test")
        self._clean: Path | None = None

    def distill(self, name: str, *, workdir: Path | None = None, train: Any = None, **kw: Any) -> Any:
        """One run of the shared config; returns the DistillRun, or the exception that ended it."""
        from kdray.train.trainer import distill

        cfg = kw.pop("cfg", None) or train_cfg(self.teacher)
        try:
            return distill(
                cfg, train or self.train, self.eval, workdir=workdir or self.root / name,
                teacher_path=self.teacher, export=False, **kw,
            )  # fmt: skip
        except Exception as err:
            import traceback

            log = self.root / f"{name}.errors.log"
            with log.open("a") as f:
                f.write("".join(traceback.format_exception(err)) + "\n")
            return err

    def clean(self) -> Path:
        """The clean run's metrics; a complete one from an earlier invocation is reused (deterministic)."""
        done = self.metrics("clean")
        if self._clean is None and len({r["step"] for r in metric_lines(done)}) == STEPS:
            self._clean = done
        if self._clean is None:
            shutil.rmtree(self.root / "clean", ignore_errors=True)
            run = self.distill("clean")
            if isinstance(run, BaseException):
                raise run
            self._clean = run.metrics_path
        return self._clean

    def metrics(self, name: str) -> Path:
        return self.root / name / "distill" / "metrics.jsonl"


def finished(run: Any, metrics: Path, resumed_if_restarted: bool = True) -> str:
    if isinstance(run, BaseException):
        return "refused"
    pids = {r.get("worker_pid") for r in metric_lines(metrics)}
    return "resumed" if resumed_if_restarted and len(pids) > 1 else "finished"


class MlflowServer:
    """`mlflow server` on a fixed free loopback port and a sqlite store, in its own process group."""

    def __init__(self, root: Path) -> None:
        import socket

        root.mkdir(parents=True, exist_ok=True)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.root, self.uri, self.proc = root, f"http://127.0.0.1:{self.port}", None

    def start(self, timeout_s: float = 300.0) -> None:
        import urllib.request

        cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--default-artifact-root", str(self.root / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
               "--workers", "1"]  # fmt: skip
        env = {
            **os.environ,
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        with (self.root / "server.log").open("ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
            )
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"mlflow server not answering on {self.uri} after {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
            self.proc = None


def detail(run: Any, fault: dict[str, Any], note: str) -> str:
    parts = [f"injection failed: {fault['error']}"] if fault.get("error") else []
    if fault and "at_step" not in fault:
        parts.append("the fault was never injected")
    if isinstance(run, BaseException):
        parts.append(f"error: {cause(run)}")
    return "; ".join([*parts, note])


def ranges(steps: list[int]) -> str:
    return f"{steps[0]}-{steps[-1]}" if len(steps) > 1 else ", ".join(map(str, steps))


def fill(path: Path, leave: int) -> int:
    """Write `path` until the disk is full, then give back `leave` bytes; the bytes written."""
    chunk = b"\0" * (1 << 20)
    with path.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError:
            pass
    size = path.stat().st_size
    os.truncate(path, max(size - leave, 0))
    return size - leave
