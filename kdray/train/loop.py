"""`train_loop_per_worker`: the student's training loop inside a Ray Train worker.

It reads its data shard, runs `train_step` (pure), swaps in on-policy batches when the method asks for
them (scored by the TeacherPool's actors), evaluates, checkpoints every N steps with the data position
and every piece of method state, and resumes from the latest checkpoint after a failure.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdray.losses import build_objective
from kdray.losses.cross_tokenizer_term import cross_runtime
from kdray.models import Student
from kdray.models.build import build_student, export_student
from kdray.train.batches import micro_batches, regularize_batch
from kdray.train.sampler import OnPolicySource
from kdray.train.schedule import lr_lambda
from kdray.train.session import RayTrainSession
from kdray.train.state import method_state
from kdray.train.step import NonFiniteLossError, StepConfig, to_tensors, train_step

#: bookkeeping fields of metrics.jsonl (a pid, wall-clock stamps): not curves for MLflow or Tune
BOOKKEEPING = frozenset({"worker_pid", "first_step_at", "step_done_at"})


@dataclass
class LoopSpec:
    """Everything a worker needs, flat and picklable, built from the config by `trainer.loop_spec`.

    No field repeats a config default: the values come from `kdray.config` (one home per default)."""

    student: dict[str, Any]
    terms: list[dict[str, Any]]
    method: str
    method_params: dict[str, Any]
    """The method's knobs, resolved from its declaration (`kdray.methods`) and the config."""
    on_policy_fraction: float
    sampling_temperature: float
    max_new_tokens: int
    batch_size: int
    grad_accum: int
    lr: float
    weight_decay: float
    warmup_steps: int
    max_steps: int
    lr_schedule: str
    grad_clip: float | None
    checkpoint_every: int
    eval_every: int
    log_every: int
    seed: int
    num_threads: int
    """torch threads of the worker: the CPUs it holds (Ray sets no thread count a worker can rely on)."""
    loss_chunk_size: int | None
    use_gpu: bool
    precision: str
    metrics_path: str | None
    export_path: str | None
    teacher_handles: list[Any] = field(default_factory=list)
    teacher_progress: Any = None
    run_dir: str | None = None
    """Where Ray Train stores this run's checkpoints. When Ray hands a worker none, the loop resumes from
    the newest intact one there: Ray registers a reported checkpoint asynchronously (a worker killed a
    moment after reporting is restarted with none), and a snapshot a full disk damaged is moved aside
    by the driver (`kdray.train.resume`), leaving Ray nothing to hand out."""
    tracking: dict[str, Any] | None = None
    """MLflow run rank 0 logs into: {tracking_uri, experiment, run_id, spool_dir, system_metrics_s}."""
    chat_template: bool = True
    """`data.chat_template`: whether the prompts were rendered through the tokenizer's chat template,
    which the export keeps only if so (`export_student`)."""
    progress_desc: str | None = None
    """Label of rank 0's progress report; None = silent."""
    progress_bar: bool = True
    """A bar on the driver's console (Ray's tqdm relay) or, for logs, one line per logged step."""


class _State:
    """Loop position and the method's own state (`kdray.train.state`), checkpointed together.

    `bad_steps` (consecutive non-finite steps) is part of it: a restart after NonFiniteLossError would
    otherwise count from zero and let a persistently NaN run finish with its steps silently skipped.
    """

    def __init__(self, spec: LoopSpec) -> None:
        self.step, self.consumed, self.bad_steps = 0, 0, 0
        self.method = method_state(spec.method, spec.max_steps, spec.method_params, spec.seed)

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "consumed": self.consumed,
            "bad_steps": self.bad_steps,
            "method": self.method.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.consumed = state["step"], state["consumed"]
        self.bad_steps = state.get("bad_steps", 0)
        self.method.load_state_dict(state.get("method") or {})


def _build(spec: LoopSpec, device: torch.device) -> tuple[Student, Any, Any, Any]:
    lm, tokenizer = build_student(**spec.student, device=str(device), seed=spec.seed)
    torch.manual_seed(spec.seed)  # the reward head's init, identical on every worker
    head = build_objective(spec.terms).reward_head
    student = Student(lm) if head is None else Student.with_reward_head(lm, **head)
    student.to(device)
    decay = [p for n, p in student.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in student.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(spec.lr_schedule, spec.warmup_steps, spec.max_steps)
    )
    return student, tokenizer, optimizer, scheduler


def _restore(
    student: Student, optimizer: Any, scheduler: Any, state: _State, session: Any, run_dir: str | None
) -> None:
    """From the runner's latest checkpoint, else from the newest intact one in `run_dir`, else nothing."""
    from kdray.train.resume import latest_intact_checkpoint

    checkpoint = session.checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            saved = torch.load(Path(directory) / "state.pt", map_location="cpu", weights_only=True)
    elif run_dir and (latest := latest_intact_checkpoint(run_dir)):
        saved = torch.load(latest / "state.pt", map_location="cpu", weights_only=True)
    else:
        return
    student.load_state_dict(saved["student"])
    if "optimizer" in saved:  # a final checkpoint has none: the run it restores has no step left
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    state.load_state_dict(saved["loop"])
    torch.set_rng_state(saved["torch_rng"])


def _checkpoint(
    student: Student, optimizer: Any, scheduler: Any, state: _State, session: Any, *, final: bool = False
) -> Any:
    """Rank 0 writes the checkpoint; the other ranks report none (Ray merges them into one).

    The `final` one (after the last step) leaves out the optimizer and scheduler: a run restored from it
    has no step left to take, only its export, and AdamW's two moments are twice the model's size, written
    here and copied again into Ray Train's storage while the user waits for `fit()` to return."""
    if session.rank != 0:
        return None
    directory = tempfile.mkdtemp(prefix="kdray-ckpt-")
    saved = {"student": student.state_dict(), "loop": state.state_dict(), "torch_rng": torch.get_rng_state()}
    if not final:
        saved |= {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    torch.save(saved, Path(directory) / "state.pt")
    return session.make_checkpoint(directory)


def _all_reduce_sum(values: dict[str, float], keys: list[str]) -> dict[str, float]:
    """Each worker's loss terms are its share of the global mean: their sum is the global value."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor([values.get(k, 0.0) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {**values, **dict(zip(keys, t.tolist(), strict=True))}


def advance_method_state(method_state: Any, step: int, local_loss: float) -> float:
    """Advance a method's state after optimizer step `step` with the *global* loss: each worker's loss is
    its share of the global mean, so their sum is the same number on every worker, and so is the state
    it drives (TAID's t). Returns that global loss."""
    loss = _all_reduce_sum({"loss": float(local_loss)}, ["loss"])["loss"]
    method_state.after_step(step, loss)
    return loss


def _eval_loss(student: Student, shard: Any, pad_id: int, batch_size: int, device: torch.device) -> float:
    """Held-out token cross-entropy, summed over workers then divided by the global token count."""
    from kdray.losses.signal import token_cross_entropy
    from kdray.train.step import student_forward

    total, count = 0.0, 0
    student.eval()
    with torch.no_grad():
        # every held-out row once, the last partial batch too: a held-out split smaller than the batch
        # size (or than one row per worker) is scored as it is instead of failing as "no batch"
        for rows in shard.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=False):
            tensors = to_tensors(regularize_batch(rows, pad_id), device)
            logits, lb = student_forward(student, tensors)
            ce, mask = token_cross_entropy(logits, lb["target_ids"]), lb["mask"]
            total += float(ce[mask].sum())
            count += int(mask.sum())
    student.train()
    summed = _all_reduce_sum({"s": total, "n": float(count)}, ["s", "n"])
    return summed["s"] / max(summed["n"], 1.0)


def _log(spec: LoopSpec, rank: int, metrics: dict[str, float], tracker: Any = None) -> None:
    """Rank 0 appends one JSON line per logged step; steps replayed after a failure are logged again with
    the same step number, and readers keep the last line per step. The MLflow tracker buffers on disk
    and sends in the background, so a slow or dead tracking server never stalls a step."""
    if rank == 0 and spec.metrics_path:
        Path(spec.metrics_path).parent.mkdir(parents=True, exist_ok=True)
        with open(spec.metrics_path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
    if rank == 0 and spec.progress_desc and not spec.progress_bar:
        extra = f" eval_loss {metrics['eval_loss']:.4f}" if "eval_loss" in metrics else ""
        # sys.stdout.write, not print: Ray Train patches print in workers and tees it, printing twice
        sys.stdout.write(
            f"[{spec.progress_desc}] step {metrics['step']}/{spec.max_steps} loss {metrics['loss']:.4f}{extra}\n"
        )
        sys.stdout.flush()
    if tracker is not None:
        # bookkeeping (a pid, a wall-clock stamp) stays in metrics.jsonl; MLflow gets the curves
        skip = {"step", *BOOKKEEPING}
        numeric = {k: v for k, v in metrics.items() if k not in skip and isinstance(v, (int, float))}
        tracker.log_metrics(numeric, step=int(metrics["step"]))


def _tracker(spec: LoopSpec, rank: int) -> Any:
    """Rank 0 attaches to the step's MLflow run; other ranks log nothing."""
    if rank != 0 or not spec.tracking:
        return None
    from kdray.tracking import Tracker

    t = spec.tracking
    return Tracker(
        t["tracking_uri"], t["experiment"], run_id=t["run_id"], spool_dir=t.get("spool_dir"), rank=rank
    )


def _system_metrics(spec: LoopSpec, rank: int) -> Any:
    """MLflow's own monitor of the node's CPU, memory, disk, network and GPU use, sampled into the step's
    run every `system_metrics_s` from rank 0. Best effort: it stops at a failed request."""
    t = spec.tracking or {}
    if rank != 0 or not t.get("system_metrics_s"):
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(t["run_id"], t["system_metrics_s"], tracking_uri=t["tracking_uri"])
    monitor.start()
    return monitor


def _progress_bar(spec: LoopSpec, rank: int, start: int) -> Any:
    """A bar over optimizer steps on the driver's console (Ray relays tqdm_ray bars from workers)."""
    if rank != 0 or not spec.progress_desc or not spec.progress_bar:
        return None
    from ray.experimental import tqdm_ray

    bar = tqdm_ray.tqdm(total=spec.max_steps, desc=spec.progress_desc)
    if start:
        bar.update(start)
    return bar


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point; `config` is `spec_to_config(LoopSpec(...))`."""
    # Ray Train logs every report (the whole metrics dict) at INFO; kdray prints its own progress
    logging.getLogger("ray.train.v2._internal.execution.context").setLevel(logging.WARNING)
    TrainingLoop(LoopSpec(**config), RayTrainSession()).run()


def _unwrap(student: Any) -> Student:
    return getattr(student, "module", student)


class TrainingLoop:
    """One worker's training run: built once, then `run()` steps until `max_steps`.

    `session` is where it runs: a `RayTrainSession` in a Ray Train worker, or `kdray.tune`'s session in
    a Tune trial (one worker, data read in-process, reports to Tune).
    """

    def __init__(self, spec: LoopSpec, session: Any) -> None:
        self.spec, self.session = spec, session
        self.rank, self.world_size = session.rank, session.world_size
        torch.set_num_threads(max(1, spec.num_threads))
        self.device = session.device(spec.use_gpu)
        self.student, self.tokenizer, self.optimizer, self.scheduler = _build(spec, self.device)
        self.state = _State(spec)
        _restore(self.student, self.optimizer, self.scheduler, self.state, session, spec.run_dir)
        self.student = session.prepare(self.student)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.objective = build_objective(spec.terms)
        # cross-tokenizer terms read the two tokenizers' vocabulary map at every call: built once here
        self.cross_runtime = cross_runtime(self.objective.terms, tok, spec.student.get("teacher_path"))
        bf16 = self.device.type == "cuda" and spec.precision in ("auto", "bf16")
        self.step_cfg = StepConfig(
            grad_clip=spec.grad_clip, chunk_size=spec.loss_chunk_size, vocab_size=len(tok), autocast_bf16=bf16
        )
        self.step_cfg.bad_steps = self.state.bad_steps  # the count goes on across a restore
        self.stream = micro_batches(
            session.dataset("train"), spec.batch_size, self.pad_id, skip=self.state.consumed * spec.grad_accum
        )
        self.eval_shard = session.dataset("eval")
        self.source = OnPolicySource(spec, self.state, _unwrap(self.student), tok, self.rank)
        self.rollout: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None  # reused for PPO epochs
        self.rollout_left = 0
        # a method may add cross-entropy on the data its student samples replaced (MiniLLM's LM term)
        self.lm_coef = float(spec.method_params.get("lm_coef", 0.0))
        self.first_step_at: float | None = None

    def run(self) -> None:
        spec, state = self.spec, self.state
        owned = getattr(self.session, "tracker", None)  # a Tune trial's own run, which the trial ends
        self.tracker = owned or _tracker(spec, self.rank)
        bar, monitor = _progress_bar(spec, self.rank, state.step), _system_metrics(spec, self.rank)
        try:
            self._steps(bar)
        finally:
            if bar is not None:
                bar.close()
            if monitor is not None:
                monitor.finish()
            if self.tracker is not None and owned is None:
                self.tracker.close(status=None, timeout_s=30)  # the step that owns the run ends it

    def _next_micro(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The step's micro-batches and the data batches for an LM term: the rollout again while PPO
        epochs remain, else fresh data (or the student samples that replace it)."""
        if self.rollout is not None and self.rollout_left > 0:
            self.rollout_left -= 1
            return self.rollout
        data = [next(self.stream) for _ in range(self.spec.grad_accum)]
        self.state.consumed += 1
        micro = self.source.maybe_replace(self.state.step + 1, data)
        lm = data if self.source.last_on_policy and self.lm_coef > 0 else []
        epochs = self.source.rollout_epochs
        if self.source.last_on_policy and epochs > 1:
            self.rollout, self.rollout_left = (micro, lm), epochs - 1
        return micro, lm

    def _initial_eval(self) -> None:
        """A held-out loss before the first step, for methods that compare against it (DistiLLM)."""
        if self.state.step == 0 and self.state.method.initial_eval and self.eval_shard is not None:
            loss = _eval_loss(
                _unwrap(self.student), self.eval_shard, self.pad_id, self.spec.batch_size, self.device
            )
            self.state.method.after_eval(loss)

    def _steps(self, bar: Any) -> None:
        spec, state = self.spec, self.state
        self._initial_eval()
        # tokens/s over wall time: each step's interval runs from the end of the previous one, so data
        # waits, sampling and the previous report count (a stall shows as a drop, not as nothing)
        wall_mark = time.perf_counter()
        while state.step < spec.max_steps:
            fetching = time.perf_counter()
            micro, lm = self._next_micro()  # data from the shard, or the student's samples scored
            self.first_step_at = self.first_step_at or time.time()
            started = time.perf_counter()
            tensors = [to_tensors(m, self.device) for m in micro]
            try:
                logs = train_step(
                    self.student, self.optimizer, self.objective, tensors, self.step_cfg,
                    runtime={**state.method.runtime(), **self.cross_runtime},
                    lm_batches=[to_tensors(m, self.device) for m in lm], lm_coef=self.lm_coef,
                )  # fmt: skip
            except NonFiniteLossError as err:
                kept = state.step - state.step % spec.checkpoint_every
                where = f"the checkpoint of step {kept} is kept" if kept else "no checkpoint was written yet"
                raise NonFiniteLossError(f"step {state.step + 1}: {err}; {where}") from err
            state.bad_steps = self.step_cfg.bad_steps
            self.scheduler.step()
            state.step += 1
            advance_method_state(state.method, state.step, logs["loss"])
            tokens = sum(int(np.asarray(m["attention_mask"]).sum()) for m in micro)
            now = time.perf_counter()
            rates = {"tokens_per_s": tokens / max(now - wall_mark, 1e-9), "data_wait_s": started - fetching,
                     "step_tokens": tokens, "step_done_at": time.time()}  # fmt: skip
            wall_mark = now
            self._report(logs, rates)
            if bar is not None:
                bar.update(1)
        if self.rank == 0 and spec.export_path:
            export_student(
                _unwrap(self.student), self.tokenizer, spec.export_path, chat_template=spec.chat_template
            )

    def _report(self, logs: dict[str, float], rates: dict[str, float]) -> None:
        """Metrics every `log_every` steps and at eval/checkpoint steps; every decision here depends on
        the step only, because `ray.train.report` is a barrier that every rank must reach together."""
        spec, state = self.spec, self.state
        step, last = state.step, state.step == spec.max_steps
        eval_now = self.eval_shard is not None and (step % spec.eval_every == 0 or last)
        ckpt_now = step % spec.checkpoint_every == 0 or last
        term_keys = sorted(k for k in logs if k not in ("grad_norm", "num_tokens", "skipped"))
        metrics = {**_all_reduce_sum(logs, term_keys), "step": step, "lr": self.scheduler.get_last_lr()[0]}
        metrics.update(
            **rates,
            consumed_rows=state.consumed * spec.grad_accum * spec.batch_size * self.world_size,
            first_step_at=self.first_step_at,
            worker_pid=os.getpid(),  # rank 0's process: where to look when a run misbehaves
            **self.source.metrics(),
            **state.method.metrics(),
        )
        if last and self.rank == 0 and spec.teacher_progress is not None:
            import ray

            progress = spec.teacher_progress
            metrics["teacher_rows_before_first_step"] = ray.get(
                progress.rows_before.remote(self.first_step_at)
            )
            metrics["teacher_rows_scored"] = ray.get(progress.total.remote())
        if eval_now:
            metrics["eval_loss"] = _eval_loss(
                _unwrap(self.student), self.eval_shard, self.pad_id, spec.batch_size, self.device
            )
            metrics.update(state.method.after_eval(metrics["eval_loss"]))
        if not (ckpt_now or eval_now or step % spec.log_every == 0):
            return
        checkpoint = (
            _checkpoint(
                _unwrap(self.student), self.optimizer, self.scheduler, state, self.session, final=last
            )
            if ckpt_now
            else None
        )
        _log(spec, self.rank, metrics, self.tracker)
        if ckpt_now or eval_now:
            # a report is a barrier through Ray Train's controller (about a second each on 2 cores): only
            # checkpoints and evaluations need it; plain log steps go to the metrics file and MLflow only
            if self.tracker is not None and self.session.flush_before_report:
                # a Tune trial stopped early never returns from this report: its curves must be sent
                self.tracker.flush(timeout_s=15)
            self.session.report(metrics, checkpoint)
        if checkpoint is not None:
            shutil.rmtree(checkpoint.path, ignore_errors=True)


def spec_to_config(spec: LoopSpec) -> dict[str, Any]:
    """The dict handed to TorchTrainer: the spec's fields, actor handles passed through as they are."""
    return {f.name: getattr(spec, f.name) for f in fields(spec)}
