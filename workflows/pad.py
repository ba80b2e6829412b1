"""PAD on generated arithmetic: a teacher trained from scratch, a briefly SFT'd student, then PAD.

    python workflows/pad.py                      # the defaults below, a few minutes on 2 cores
    python workflows/pad.py --teacher-path runs/pad/teacher/student   # reuse a trained teacher

Three stages through the real training path (`kdray.train.trainer.distill`: Ray Data, Ray Train):
1. the teacher, a tiny model trained from scratch with cross-entropy (method `sft`), as
   workflows/benchmark_methods.py trains its teacher;
2. the student, SFT'd briefly on the task: PAD samples its responses from the *initial* student, and a
   random student samples noise, so PAD starts from a student that already answers in the task's form;
3. PAD from that student, on prompts the SFT stage did not read, with α = 1 (the teacher's mean
   log-prob only: a tiny teacher cannot follow a judge instruction).
The student's held-out exact match (greedy) before and after PAD is appended as one JSON line to
`--out`, with the data preparation's counts and the run's provenance.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def _config(args: argparse.Namespace, *, model: dict[str, Any], teacher: str | None, objective: dict[str, Any],
            steps: int, batch_size: int, lr: float) -> Any:  # fmt: skip
    from kdray.config import config_from_dict

    return config_from_dict(
        {
            "model": model,
            "teacher": {"name_or_path": teacher or "tiny", "num_cpus": 1, "batch_size": 16},
            "data": {"max_prompt_tokens": args.max_prompt, "max_response_tokens": args.max_response},
            "objective": {**objective, "max_new_tokens": args.max_new_tokens},
            "train": {
                "batch_size": batch_size, "max_steps": steps, "lr": lr, "warmup_steps": min(20, steps // 10),
                "checkpoint_every": steps, "eval_every": steps, "seed": args.seed,
                "cpus_per_worker": args.threads,
            },
            "tracking": {"log_every": max(steps // 10, 1)},
        }
    )  # fmt: skip


def _size(text: str) -> dict[str, Any]:
    hidden, layers = map(int, text.split("x"))
    return {"name_or_path": "tiny", "tiny_hidden": hidden, "tiny_layers": layers}


def _exact_match(path: str, held_out: list[dict], max_new_tokens: int) -> float:
    """Greedy answers of a saved model on the held-out prompts: % whose final number is right."""
    from kdray.eval import exact_match
    from kdray.teacher import Teacher

    model = Teacher(path, top_k=1, batch_size=32)
    outs = model.generate([r["prompt"] for r in held_out], temperature=0.0, max_new_tokens=max_new_tokens)
    return 100.0 * exact_match([o[0]["text"] for o in outs], [r["answer"] for r in held_out])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--teacher-path", default=None, help="reuse a teacher checkpoint (same task and seed)"
    )
    parser.add_argument("--teacher-size", default="64x2", help="hidden x layers of the teacher")
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--student-size", default="32x2", help="hidden x layers of the student")
    parser.add_argument("--sft-steps", type=int, default=150, help="stage 2: the student's SFT start")
    parser.add_argument("--pad-steps", type=int, default=40, help="stage 3: one epoch over the PAD groups")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per step of the CE stages")
    parser.add_argument("--pad-batch-size", type=int, default=8, help="rows per PAD step (a group is n rows)")
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate of the CE stages")
    parser.add_argument("--pad-lr", type=float, default=3e-4)
    parser.add_argument("--alpha", type=float, default=1.0, help="PAD's weight of the teacher's log-prob")
    parser.add_argument("--train-examples", type=int, default=6000)
    parser.add_argument("--eval-examples", type=int, default=200)
    parser.add_argument("--difficulty", type=int, default=1)
    parser.add_argument("--max-prompt", type=int, default=160)
    parser.add_argument("--max-response", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=40, help="length of PAD's student samples")
    parser.add_argument("--threads", type=int, default=1, help="CPUs (torch threads) of the training worker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="runs/pad")
    parser.add_argument("--out", default="benchmarks/pad.jsonl", help="results file (one line per run)")
    parser.add_argument("--report", action="store_true", help="print the table of --out and exit")
    args = parser.parse_args()

    if args.report:
        print(report(Path(args.out)))
        return

    from kdray.determinism import provenance
    from kdray.results import append_rows
    from kdray.run import init_ray

    init_ray(quiet=True)  # first, before torch loads: the CPU kernel pins make the result machine-independent
    import ray

    from kdray.data import arithmetic_splits
    from kdray.train.trainer import distill

    workdir = Path(args.workdir).resolve()
    train, held_out = arithmetic_splits(args.train_examples, args.eval_examples, args.seed, args.difficulty)
    started = time.time()

    teacher = str(Path(args.teacher_path).resolve()) if args.teacher_path else None
    if teacher is None:
        cfg = _config(args, model=_size(args.teacher_size), teacher=None, objective={"method": "sft"},
                      steps=args.teacher_steps, batch_size=args.batch_size, lr=args.lr)  # fmt: skip
        run = distill(cfg, train, held_out, workdir=workdir, name="teacher", progress_bar=False)
        teacher = str(run.export_path)
    teacher_score = _exact_match(teacher, held_out, args.max_response)

    cfg = _config(args, model=_size(args.student_size), teacher=teacher, objective={"method": "sft"},
                  steps=args.sft_steps, batch_size=args.batch_size, lr=args.lr)  # fmt: skip
    sft_run = distill(cfg, train, held_out, workdir=workdir, name="student-sft", teacher_path=teacher,
                      progress_bar=False)  # fmt: skip
    before = _exact_match(str(sft_run.export_path), held_out, args.max_response)

    # PAD's prompts: those the SFT stage never read; the student starts from the SFT'd weights
    pad_prompts = train[args.sft_steps * args.batch_size :]
    cfg = _config(
        args, model={"name_or_path": str(sft_run.export_path)}, teacher=teacher,
        objective={"method": "pad", "method_params": {"alpha": args.alpha}},
        steps=args.pad_steps, batch_size=args.pad_batch_size, lr=args.pad_lr,
    )  # fmt: skip
    pad_started = time.time()
    pad_run = distill(cfg, pad_prompts, held_out, workdir=workdir, name="pad", teacher_path=teacher,
                      progress_bar=False)  # fmt: skip
    after = _exact_match(str(pad_run.export_path), held_out, args.max_response)

    final = pad_run.final
    row = {
        "method": "pad",
        "held_out_exact_match_before_pad": before,
        "held_out_exact_match_after_pad": after,
        "teacher_exact_match": teacher_score,
        "held_out_examples": len(held_out),
        "pad_data": pad_run.extra.get("pad"),
        "pad_final": {k: final.get(k) for k in ("pad", "pad/top1", "pad/student_reward", "eval_loss")},
        "sft_eval_loss": sft_run.final.get("eval_loss"),
        "pad_minutes": round((time.time() - pad_started) / 60, 2),
        "minutes": round((time.time() - started) / 60, 2),
        "args": {k: v for k, v in vars(args).items() if k not in ("workdir", "out")},
        **provenance(args.seed),
    }
    print(json.dumps({**row, "student": str(pad_run.export_path)}), flush=True)
    append_rows(args.out, [row])  # one line per run: the README's table is generated from it
    ray.shutdown()


def report(path: Path) -> str:
    """Every run in `path` as a markdown table: the teacher, the student before and after PAD."""
    from kdray.results import read_rows

    lines = [
        "| teacher | student | SFT steps | PAD steps | teacher EM | EM before → after PAD | held-out CE before → "
        "after | PAD minutes | commit |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in read_rows(path):
        a = r["args"]
        given = a.get("teacher_path")
        teacher = (
            f"given ({Path(given).parts[-3]})"
            if given
            else f"{a['teacher_size']}, {a['teacher_steps']} steps"
        )
        lines.append(
            f"| {teacher} | {a['student_size']} | {a['sft_steps']} | {a['pad_steps']} | "
            f"{r['teacher_exact_match']:.1f} | {r['held_out_exact_match_before_pad']:.1f} → "
            f"{r['held_out_exact_match_after_pad']:.1f} | {r['sft_eval_loss']:.3f} → "
            f"{r['pad_final']['eval_loss']:.3f} | {r['pad_minutes']:.1f} | {r['commit']} |"
        )
    first = read_rows(path)[0]
    lines.append(
        f"\nExact match (%) on {first['held_out_examples']} held-out problems; {first['cpu']}, "
        f"{first['threads']} threads, kernels {first['cpu_kernels']}."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
