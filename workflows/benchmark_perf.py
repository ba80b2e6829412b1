"""Performance of kdray's loss step, measured side by side in one run: peak memory of the divergence.

    python workflows/benchmark_perf.py --loss-memory          # rows -> benchmarks/perf.jsonl
    python workflows/benchmark_perf.py --report               # the table, from the rows

Loss memory: the peak resident memory of one loss step, forward and backward, with the student's logits
included (they are computed from hidden states inside the measured window, as the LM head does), at a
SmolLM2-sized vocabulary (V = 49,152) and a 1,024-token response. Every setting runs in a fresh process,
so one setting's freed memory cannot hide another's peak, and every setting runs twice: with the stock
glibc allocator, and with a fixed mmap threshold (`MALLOC_MMAP_THRESHOLD_=65536`), under which freed
vocabulary-sized buffers go back to the system at once instead of staying in the heap. The second
column is the memory the step holds alive; the first is what a user sees without tuning.

Settings: the dense teacher (full logits) and the sparse one (top-64 log-probs and the tail bucket),
each unchunked and chunked over positions (`train.loss_chunk_size`). The loss is JSD(β = 0.5) at
temperature 1, the loss of GKD and of TRL's GKDTrainer.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
#: (teacher, chunk size): the loss-memory settings, dense unchunked first (the reference of the ratios)
SETTINGS = (("dense", None), ("dense", 128), ("dense", 64), ("top-64", None), ("top-64", 128))
ALLOCATORS = {"stock": {}, "mmap_threshold=64k": {"MALLOC_MMAP_THRESHOLD_": "65536"}}


def _status_mib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(text.split(f"{field}:")[1].split()[0]) // 1024


def measure_loss_step(
    teacher: str, chunk: int | None, vocab: int, length: int, hidden: int
) -> dict[str, Any]:
    """One JSD(0.5) step in this process: peak resident memory (MiB) above the inputs', loss, grad norm."""
    import torch

    from kdray.losses.signal import teacher_divergence

    torch.manual_seed(0)
    states = torch.randn(1, length, hidden, requires_grad=True)
    head = torch.randn(vocab, hidden) * 0.02
    teacher_logits = torch.randn(1, length, vocab)
    if teacher == "dense":
        signal = {"teacher_logits": teacher_logits}
    else:
        k = int(teacher.removeprefix("top-"))
        values, ids = torch.log_softmax(teacher_logits, -1).topk(k, -1)
        signal = {"topk_ids": ids.int(), "topk_logprobs": values}
        del teacher_logits
    base = _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts here
    started = time.perf_counter()
    logits = states @ head.T  # the LM head: the logits are part of the step's memory
    loss = teacher_divergence("jsd", logits, signal, chunk_size=chunk, beta=0.5).mean()
    loss.backward()
    return {
        "loss_peak_mib": _status_mib("VmHWM") - base,
        "loss": float(loss.detach()),
        "grad_norm": float(states.grad.norm()),
        "seconds": time.perf_counter() - started,
    }


def loss_memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every setting under every allocator, each in a fresh process; rows with the ratio to dense."""
    from kdray.determinism import provenance

    rows = []
    for allocator, env in ALLOCATORS.items():
        dense_peak = None
        for teacher, chunk in SETTINGS:
            cmd = [sys.executable, __file__, "--child", teacher, str(chunk), str(args.vocab), str(args.length),
                   str(args.hidden)]  # fmt: skip
            done = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{teacher} chunk {chunk} ({allocator}) failed:\n{done.stderr[-2000:]}")
            measured = json.loads(done.stdout.strip().splitlines()[-1])
            dense_peak = dense_peak or measured["loss_peak_mib"]
            row = {"bench": "loss_memory", "system": "kdray", "teacher": teacher, "chunk": chunk,
                   "allocator": allocator, **measured, "ratio_to_dense": measured["loss_peak_mib"] / dense_peak,
                   "vocab": args.vocab, "length": args.length, "hidden": args.hidden,
                   **provenance(0)}  # fmt: skip
            print(
                json.dumps({k: row[k] for k in ("teacher", "chunk", "allocator", "loss_peak_mib")}),
                flush=True,
            )
            rows.append(row)
    return rows


def report(path: Path) -> str:
    """The loss-memory table of the latest run in `path`."""
    from kdray.results import read_rows

    rows = [r for r in read_rows(path) if r.get("bench") == "loss_memory"]
    if not rows:
        raise ValueError(f"{path}: no loss_memory rows; run python workflows/benchmark_perf.py --loss-memory")
    last = rows[-1]
    rows = [r for r in rows if r["commit"] == last["commit"] and r["vocab"] == last["vocab"]][
        -2 * len(SETTINGS) :
    ]
    by = {(r["teacher"], r["chunk"], r["allocator"]): r for r in rows}
    lines = [
        "| teacher signal | chunk (positions) | peak MiB, stock allocator | ratio | peak MiB, mmap threshold 64k | ratio |"
        " loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for teacher, chunk in SETTINGS:
        cells = []
        for allocator in ALLOCATORS:
            r = by.get((teacher, chunk, allocator))
            cells += [f"{r['loss_peak_mib']:,}", f"{r['ratio_to_dense']:.2f}"] if r else ["", ""]
        loss = next((by[k]["loss"] for k in by if k[:2] == (teacher, chunk)), float("nan"))
        lines.append(f"| {teacher} | {chunk or 'none'} | " + " | ".join(cells) + f" | {loss:.6f} |")
    lines += [
        "",
        f"JSD(β = 0.5), V = {last['vocab']:,}, T = {last['length']:,}, hidden {last['hidden']}, float32, logits "
        f"included. From `{path.name}`: "
        f"`python workflows/benchmark_perf.py --loss-memory`; commit {last['commit']}; {last['cpu']}, "
        f"{last['threads']} threads.",
    ]
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        teacher, chunk, vocab, length, hidden = sys.argv[2:7]
        chunk_size = None if chunk == "None" else int(chunk)
        print(json.dumps(measure_loss_step(teacher, chunk_size, int(vocab), int(length), int(hidden))))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--loss-memory", action="store_true", help="measure the loss step's peak memory")
    parser.add_argument(
        "--throughput", action="store_true", help="TRL GKDTrainer vs kdray (cached, live), side by side"
    )
    parser.add_argument("--quick", action="store_true", help="--throughput in under 10 minutes on 2 cores")
    parser.add_argument(
        "--ray-running", action="store_true",
        help="--throughput: only the kdray rows that join a running Ray (the full run ends with them)",
    )  # fmt: skip
    parser.add_argument(
        "--workdir", default=str(ROOT / "runs" / "perf"), help="checkpoints and runs of --throughput"
    )
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "perf.jsonl"))
    parser.add_argument("--report", action="store_true", help="print the tables of --out and exit")
    args = parser.parse_args()
    if args.report:  # every table the file has rows for
        import perf_throughput

        tables = []
        for render in (report, perf_throughput.report):
            try:
                tables.append(render(Path(args.out)))
            except ValueError as err:
                tables.append(f"({err})")
        print("\n\n".join(tables))
        return
    if not (args.loss_memory or args.throughput):
        parser.error("say what to measure: --loss-memory and/or --throughput [--quick]")
    from kdray.results import append_rows

    if args.throughput:
        import perf_throughput

        rows = perf_throughput.throughput(
            args.quick, Path(args.workdir), ALLOCATORS, running_only=args.ray_running
        )
        append_rows(args.out, rows)
        print(perf_throughput.report(Path(args.out)))
    if args.loss_memory:
        append_rows(args.out, loss_memory(args))
        print(report(Path(args.out)))


if __name__ == "__main__":
    main()
