"""Distil a teacher into a small student with every method, on a real task, and tabulate held-out scores.

    python workflows/benchmark_methods.py --task arithmetic --out BENCHMARKS_methods.md
    python workflows/benchmark_methods.py --task multi30k --data ../shared/data/multi30k

The teacher is trained from scratch by the same trainer with plain cross-entropy (method `sft`), then
each method trains a student of at most a quarter of its size for the same number of steps. Scores
are on a held-out split that no training step saw: exact match of the final number (arithmetic) or
sacreBLEU (translation), with greedy decoding.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any

#: row name -> what the tables call it (a row not listed keeps its own name)
LABELS = {
    "sft": "student, SFT only",
    "supervised_kd": "supervised KD (forward KL)",
    "seqkd": "SeqKD",
    "taid": "TAID",
    "gkd": "GKD (JSD β=0.5, λ=0.5)",
    "distillm": "DistiLLM (skew KL α=0.1, adaptive off-policy)",
    "minillm": "MiniLLM (teacher-mixed sampling, 4 PPO epochs)",
    "pad": "PAD (ranked by the teacher's log-prob)",
    "ava_d": "AVA-d (AVRIL on the data, no teacher)",
    "xkd-divergence": "X-KD, divergence variant, `q_form: logits` (default)",
    "xkd-divergence-logprobs": "X-KD, divergence variant, `q_form: logprobs`",
    "xkd-sequence": "X-KD, sequence variant (teacher generations)",
}


def method_rows() -> dict[str, dict[str, Any]]:
    """Row name -> objective section: every declared method at its reference defaults (`kdray methods`),
    plus the X-KD variants the benchmark compares."""
    from kdray.methods import METHODS

    # methods trained on preference pairs rank answers instead (workflows/ava.py measures them)
    rows: dict[str, dict[str, Any]] = {
        name: {"method": name} for name, m in METHODS.items() if name != "xkd" and not m.pairs
    }
    # PAD's judge prompt does not fit a tiny teacher's context (and a tiny teacher cannot follow it):
    # rank by the teacher's log-prob alone (workflows/pad.py adds the SFT start PAD assumes)
    rows["pad"] = {"method": "pad", "method_params": {"alpha": 1.0}}
    rows["xkd-divergence"] = {"method": "xkd"}
    rows["xkd-divergence-logprobs"] = {
        "method": "xkd",
        "terms": [{"name": "xkd", "params": {"variant": "divergence", "q_form": "logprobs"}}],
    }
    rows["xkd-sequence"] = {
        "method": "xkd",
        "terms": [{"name": "xkd", "params": {"variant": "sequence"}}],
        "teacher_generations": True,
    }
    return rows


def task_records(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    from kdray.data import arithmetic_splits, read_records

    if args.task == "arithmetic":
        return arithmetic_splits(args.train_examples, args.eval_examples, args.seed, args.difficulty)
    train = read_records("translation", args.data, split="train", limit=args.train_examples).records
    held_out = read_records("translation", args.data, split="val", limit=args.eval_examples).records
    return train, held_out


def student_config(
    args: argparse.Namespace,
    *,
    teacher: str | None,
    method: dict[str, Any],
    hidden: int,
    layers: int,
    steps: int,
    student: str | None = None,
) -> Any:
    """A run's config: a tiny model of `hidden` x `layers` from scratch, or the checkpoint `student`."""
    from kdray.config import config_from_dict

    top_k = None if method["method"] == "taid" else args.top_k  # TAID interpolates full logits
    return config_from_dict(
        {
            "model": {"name_or_path": student}
            if student
            else {"name_or_path": "tiny", "tiny_layers": layers, "tiny_hidden": hidden},
            "teacher": {"name_or_path": teacher or "tiny", "top_k": top_k, "num_cpus": 1, "batch_size": 16},
            "data": {"max_prompt_tokens": args.max_prompt, "max_response_tokens": args.max_response},
            # on-policy samples and teacher generations: long enough for an answer, no longer (sampling is
            # token by token, the slow part of on-policy steps on a CPU)
            "objective": {**method, "max_new_tokens": args.max_new_tokens},
            "train": {
                "batch_size": args.batch_size, "max_steps": steps, "lr": args.lr, "warmup_steps": 20,
                # a quarter at most is lost when Ray Train restarts a worker (a failed health check on a
                # loaded machine restarts the worker group from the latest checkpoint)
                "checkpoint_every": max(steps // 4, 1), "eval_every": max(steps // 4, 1), "seed": args.seed,
            },
            "tracking": {"log_every": max(steps // 20, 1)},
        }
    )  # fmt: skip


def score_model(path: str, held_out: list[dict], args: argparse.Namespace) -> float:
    """Greedy generations of a saved model on the held-out prompts, scored for the task."""
    from kdray.eval import bleu, exact_match
    from kdray.teacher import Teacher

    model = Teacher(path, top_k=1, batch_size=32)
    outs = model.generate([r["prompt"] for r in held_out], temperature=0.0, max_new_tokens=args.max_response)
    texts = [o[0]["text"] for o in outs]
    if args.task == "arithmetic":
        return 100.0 * exact_match(texts, [r["answer"] for r in held_out])
    return bleu(texts, [r["response"] for r in held_out])


def count_params(path: str) -> int:
    from kdray.models.loading import load_causal_lm

    model, _ = load_causal_lm(path, device="cpu")
    return sum(p.numel() for p in model.parameters())


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments that shape a task's rows: its data, the teacher, the students and their training
    (shared with `benchmark_quality.py`, whose row keys hash them)."""
    parser.add_argument("--task", choices=["arithmetic", "multi30k"], default="arithmetic")
    parser.add_argument(
        "--data", default="../shared/data/multi30k", help="Multi30k directory (task multi30k)"
    )
    parser.add_argument("--train-examples", type=int, default=20000)
    parser.add_argument("--eval-examples", type=int, default=200)
    parser.add_argument("--difficulty", type=int, default=1)
    parser.add_argument("--teacher-steps", type=int, default=1500)
    parser.add_argument("--student-steps", type=int, default=500)
    parser.add_argument("--teacher-size", default="128x4", help="hidden x layers of the teacher")
    parser.add_argument("--student-size", default="64x2", help="hidden x layers of the students")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--teacher-lr", type=float, default=None, help="the teacher's learning rate (default: --lr)"
    )
    parser.add_argument(
        "--vocab", type=int, default=0,
        help="0: the character tokenizer; N: a byte-level BPE of N tokens trained on the training split",
    )  # fmt: skip
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=160)
    parser.add_argument("--max-response", type=int, default=64)
    parser.add_argument(
        "--max-new-tokens", type=int, default=40, help="length of student samples / teacher generations"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_task_arguments(parser)
    parser.add_argument(
        "--methods",
        default=",".join(method_rows()),
        help="comma-separated subset of " + ",".join(method_rows()),
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="runs/benchmark_methods")
    parser.add_argument("--out", default="BENCHMARKS_methods.md")
    parser.add_argument(
        "--report-only", action="store_true", help="write the table from the finished rows (.jsonl) and exit"
    )
    parser.add_argument(
        "--teacher-path",
        default=None,
        help="reuse a teacher checkpoint instead of training one (same task/seed)",
    )
    args = parser.parse_args()

    if args.report_only:
        from kdray.results import read_rows

        shape = " ".join(_argv())
        rows = [r for r in read_rows(Path(args.out).with_suffix(".jsonl")) if r.get("args") == shape]
        _write(args, list({r["model"]: r for r in rows}.values()))
        return

    from kdray.run import init_ray

    # first, before torch loads: the CPU kernel pins give the same rows on any x86 machine. A run holds
    # its TeacherPool (1 CPU), its Ray Data clients and tokenizer (slivers) beside the training worker,
    # which a 2-core machine runs oversubscribed (init_ray's local Ray has >= 4 CPUs)
    init_ray(quiet=True)
    from kdray.results import ResumableResults
    from kdray.train.trainer import distill

    workdir = Path(args.workdir).resolve() / args.task
    train, held_out = task_records(args)
    t_hidden, t_layers = map(int, args.teacher_size.split("x"))
    s_hidden, s_layers = map(int, args.student_size.split("x"))
    # one line per finished model: resumable; a row counts as done only under the same arguments
    results = ResumableResults(Path(args.out).with_suffix(".jsonl"), shape=" ".join(_argv()), seed=args.seed)
    done = results.done

    def record(row: dict[str, Any]) -> None:
        print(results.record(row), flush=True)

    started = time.time()
    # absolute: Ray workers do not run in this directory
    teacher = str(Path(args.teacher_path).resolve()) if args.teacher_path else None
    if teacher is None:
        print(
            f"[teacher] training {args.teacher_size} from scratch for {args.teacher_steps} steps", flush=True
        )
        cfg = student_config(
            args,
            teacher=None,
            method=method_rows()["sft"],
            hidden=t_hidden,
            layers=t_layers,
            steps=args.teacher_steps,
        )
        teacher = str(distill(cfg, train, held_out, workdir=workdir, name="teacher").export_path)
    name = "teacher (CE from scratch)"
    record(
        done.get(name)
        or {
            "model": name,
            "params": count_params(teacher),
            "score": score_model(teacher, held_out, args),
            "minutes": (time.time() - started) / 60,
        }
    )

    name = "student at initialisation"
    if name in done:
        record(done[name])
    else:
        init_cfg = student_config(
            args, teacher=teacher, method=method_rows()["sft"], hidden=s_hidden, layers=s_layers, steps=1
        )
        init_run = distill(
            init_cfg,
            train[: args.batch_size],
            held_out,
            workdir=workdir,
            name="student-init",
            teacher_path=teacher,
        )
        record(
            {
                "model": name,
                "params": count_params(str(init_run.export_path)),
                "score": score_model(str(init_run.export_path), held_out, args),
                "minutes": 0.0,
            }
        )

    for method in args.methods.split(","):
        name = f"student: {method}"
        if name in done:
            record(done[name])
            continue
        t0 = time.time()
        print(f"[{method}] distilling for {args.student_steps} steps", flush=True)
        cfg = student_config(
            args,
            teacher=teacher,
            method=method_rows()[method],
            hidden=s_hidden,
            layers=s_layers,
            steps=args.student_steps,
        )
        run = distill(cfg, train, held_out, workdir=workdir, name=method, teacher_path=teacher)
        path = str(run.export_path)
        record(
            {
                "model": name,
                "params": count_params(path),
                "score": score_model(path, held_out, args),
                "minutes": (time.time() - t0) / 60,
                "final_eval_loss": run.final.get("eval_loss"),
            }
        )
    _write(args, results.rows)


def _write(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    metric = "exact match (%)" if args.task == "arithmetic" else "sacreBLEU"
    lines = [
        f"## Methods on {args.task} ({metric}, held-out, greedy)",
        "",
        f"Command: `python workflows/benchmark_methods.py {' '.join(_argv())}`",
        f"Seed {args.seed}; {args.train_examples} training examples, {args.eval_examples} held-out; teacher {args.teacher_size} "
        f"(hidden x layers) for {args.teacher_steps} steps, students {args.student_size} for {args.student_steps} steps, batch {args.batch_size}.",
        f"Machine: {platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores, CPU only.",
        "Rows accumulate in the .jsonl beside this file across invocations with these arguments (each may"
        " run a `--methods` subset; `--teacher-path` reuses the teacher, which is deterministic).",
        "",
        f"| model | parameters | {metric} | eval loss | minutes |",
        "|---|---:|---:|---:|---:|",
    ]
    commits = sorted({r.get("commit", "?") for r in rows})
    cpus = sorted({f"{r.get('cpu', '?')}, {r.get('threads', '?')} threads" for r in rows})
    lines[5:5] = [f"Commit(s): {', '.join(commits)}; CPU: {'; '.join(cpus)}."]
    for r in rows:
        loss = f"{r['final_eval_loss']:.3f}" if r.get("final_eval_loss") is not None else ""
        lines.append(f"| {r['model']} | {r['params']:,} | {r['score']:.1f} | {loss} | {r['minutes']:.1f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _argv() -> list[str]:
    """The arguments that shape the rows (not which rows this invocation ran or reused)."""
    import sys

    out, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg in ("--methods", "--teacher-path", "--out"):
            skip = True
        elif arg != "--report-only" and not arg.startswith(("--methods=", "--teacher-path=", "--out=")):
            out.append(arg)
    return out


if __name__ == "__main__":
    main()
