"""Cross-tokenizer distillation end to end: a BPE teacher, a student with another tokenizer, ULD and GOLD.

    python workflows/cross_tokenizer.py --baseline   # 34 minutes on 2 CPU cores shared with other jobs
    python workflows/cross_tokenizer.py --runs uld --student-steps 100   # fewer, shorter students
    python workflows/cross_tokenizer.py --teacher-path runs/cross_tokenizer/teacher/student  # reuse it
    python workflows/cross_tokenizer.py --report     # the table of benchmarks/cross_tokenizer.jsonl
    python workflows/cross_tokenizer.py --baseline --student-tokenizer bpe-multidigit  # a BPE student

Each finished model appends a row to `--out` (default benchmarks/cross_tokenizer.jsonl) with its seed,
commit, CPU, threads and the arguments that shape it; a re-run with the same arguments skips the rows
it finds (the teacher's row too, when its checkpoint is still in the workdir). Results and what they
say: docs/cross_tokenizer.md.

The teacher and the student tokenise the arithmetic task differently: the teacher with a byte-level BPE
trained here on the task's text (SmolLM2-style: "Ġ" spaces, digits one by one, a ChatML template), the
student with kdray's character tokenizer and its own chat template (or, `--student-tokenizer
bpe-multidigit`, a BPE trained the same way except that numbers merge into multi-digit tokens, GPT-2's
convention: the student's vocabulary then holds all of the teacher's tokens and more, and the two split
every number differently). The teacher is trained from scratch
with cross-entropy (method `sft`); then one student initialisation is distilled through
`kdray.train.trainer.distill` with `objective.cross_tokenizer: uld` and with `gold` (by default at
their reference defaults, and GOLD once more with ULD's cross-entropy weight: GOLD's reference trains
without it), and (with `--baseline`) with cross-entropy alone on the same budget. Printed per model:
held-out exact match (greedy) and the mean log-likelihood per token of the held-out reference
responses under the model's own tokenizer (higher is better).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

TEACHER = "teacher (BPE, CE from scratch)"
#: the student's tokenizer: kdray's characters, or a BPE trained here like the teacher's but whose
#: pre-tokenizer lets digits merge (GPT-2's convention; the teacher keeps SmolLM2's one digit per token)
STUDENT_TOKENIZERS = {"chars": "characters", "bpe-multidigit": "BPE, multi-digit numbers"}


def _shape(args: argparse.Namespace) -> str:
    """The arguments that shape the rows (not where they go, which students run, or a reused teacher)."""
    skip = {"out", "report", "runs", "baseline", "teacher_path", "workdir"}
    if args.student_tokenizer == "chars":  # the first setting: its rows keep the shape they were written with
        skip.add("student_tokenizer")
    return " ".join(f"--{k.replace('_', '-')} {v}" for k, v in sorted(vars(args).items()) if k not in skip)


def init_label(args: argparse.Namespace) -> str:
    return f"student at initialisation ({STUDENT_TOKENIZERS[args.student_tokenizer]})"


def report_table(path: Path, student_tokenizer: str = "chars") -> str:
    """The latest run in `path` whose student has `student_tokenizer`, as a markdown table: the rows
    sharing the arguments of that run's last row."""
    from kdray.results import latest_run, read_rows

    def tokenizer(args: str) -> str:  # the character rows were written before the flag existed
        return args.split("--student-tokenizer ")[1].split()[0] if "--student-tokenizer " in args else "chars"

    rows = [r for r in read_rows(path) if tokenizer(r.get("args", "")) == student_tokenizer]
    latest = latest_run(rows)
    if not latest:
        return f"{path}: no rows yet"
    shape = next(iter(latest.values()))["args"]
    lines = ["| model | exact match (%) | log-lik / token | minutes |", "|---|---:|---:|---:|"]
    for r in latest.values():
        lines.append(
            f"| {r['model']} | {r['exact_match']:.1f} | {r['loglik_per_token']:.3f} | {r['minutes']:.1f} |"
        )
    commits = ", ".join(sorted({str(r.get("commit")) for r in latest.values()}))
    first = next(iter(latest.values()))
    lines += [
        "",
        f"`python workflows/cross_tokenizer.py {shape}`; seed {first.get('seed')}; commit {commits}; "
        f"{first.get('cpu')}, {first.get('threads')} threads, kernels {first.get('cpu_kernels')}.",
    ]
    return "\n".join(lines)


def _config(
    args: argparse.Namespace, *, model: str, teacher: str, objective: dict[str, Any], steps: int
) -> Any:
    from kdray.config import config_from_dict

    return config_from_dict(
        {
            "model": {"name_or_path": model},
            "teacher": {"name_or_path": teacher, "top_k": args.top_k, "num_cpus": 1, "batch_size": 16},
            "data": {"max_prompt_tokens": args.max_prompt, "max_response_tokens": args.max_response},
            "objective": objective,
            "train": {
                "batch_size": args.batch_size, "max_steps": steps, "lr": args.lr,
                "warmup_steps": min(20, steps // 10), "checkpoint_every": steps,
                "eval_every": max(steps // 2, 1), "seed": args.seed,
            },
            "tracking": {"log_every": max(steps // 10, 1)},
        }
    )  # fmt: skip


def objective(spec: str) -> dict[str, Any]:
    """The objective of a `--runs` entry: `gold` or `gold:ce_weight=1;beta=0.3` (values read as YAML)."""
    import yaml

    loss, _, knobs = spec.partition(":")
    params = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in knobs.split(";") if kv)}
    return {"method": "supervised_kd", "cross_tokenizer": loss, "cross_tokenizer_params": params}


def score(path: str, held_out: list[dict[str, Any]], max_new_tokens: int) -> dict[str, float]:
    """Held-out exact match (%) of greedy answers and mean log-likelihood per reference response token."""
    import numpy as np

    from kdray.eval.evaluate import greedy_generations, task_scores
    from kdray.teacher import Teacher

    texts = greedy_generations(path, [r["prompt"] for r in held_out], max_new_tokens=max_new_tokens)
    model = Teacher(path, top_k=1, batch_size=32)
    loglik = model.reward([r["prompt"] for r in held_out], [r["response"] for r in held_out])
    return {
        "exact_match": task_scores("arithmetic", texts, held_out)["exact_match"],
        "loglik_per_token": float(np.mean(loglik)),
    }


def build_models(args: argparse.Namespace, train: list[dict[str, Any]], workdir: Path) -> tuple[str, str]:
    """(teacher init, student init) checkpoint directories: random weights, two tokenizers."""
    from kdray.models.bpe import bpe_tokenizer, save_bpe_checkpoint
    from kdray.models.tiny import save_tiny_checkpoint

    t_hidden, t_layers = map(int, args.teacher_size.split("x"))
    s_hidden, s_layers = map(int, args.student_size.split("x"))
    texts = [f"{r['prompt']}\n{r['response']}" for r in train]
    bpe = bpe_tokenizer(texts, args.bpe_vocab)
    teacher = save_bpe_checkpoint(
        workdir / "teacher-init", bpe, hidden_size=t_hidden, num_layers=t_layers,
        num_heads=max(1, t_hidden // 32), seed=args.seed + 1,
    )  # fmt: skip
    shape = {"hidden_size": s_hidden, "num_layers": s_layers, "num_heads": max(1, s_hidden // 32)}
    if args.student_tokenizer == "bpe-multidigit":  # GPT-2's convention against SmolLM2's: numbers merge
        own = bpe_tokenizer(texts, args.bpe_vocab, split_digits=False)
        student = save_bpe_checkpoint(workdir / "student-init", own, seed=args.seed + 2, **shape)
    else:
        student = save_tiny_checkpoint(workdir / "student-init", seed=args.seed + 2, **shape)
    return str(teacher), str(student)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train-examples", type=int, default=4000)
    parser.add_argument("--eval-examples", type=int, default=100)
    parser.add_argument("--difficulty", type=int, default=1)
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--student-steps", type=int, default=400)
    parser.add_argument("--teacher-size", default="128x2", help="hidden x layers of the BPE teacher")
    parser.add_argument("--student-size", default="64x2", help="hidden x layers of the character student")
    parser.add_argument("--bpe-vocab", type=int, default=512)
    parser.add_argument(
        "--student-tokenizer", choices=list(STUDENT_TOKENIZERS), default="chars",
        help="chars: kdray's character tokenizer; bpe-multidigit: a BPE of --bpe-vocab whose numbers merge",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--max-prompt", type=int, default=160)
    parser.add_argument("--max-response", type=int, default=64)
    parser.add_argument(
        "--runs",
        default="uld,gold,gold:ce_weight=1",
        help="comma-separated students: a loss at its reference defaults, or loss:knob=value[;knob=value]",
    )
    parser.add_argument("--baseline", action="store_true", help="also train the student with CE alone")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--teacher-path", default=None, help="a teacher this script trained before (same args)"
    )
    parser.add_argument("--workdir", default="runs/cross_tokenizer")
    parser.add_argument("--out", default="benchmarks/cross_tokenizer.jsonl", help="results rows (appended)")
    parser.add_argument("--report", action="store_true", help="print the table of --out and exit")
    args = parser.parse_args()
    out = Path(args.out)
    if args.report:
        print(report_table(out, args.student_tokenizer))
        return

    from kdray.run import init_ray

    init_ray(quiet=True)  # first, before torch loads: the CPU kernel pins make the result machine-independent
    from kdray.data import arithmetic_splits
    from kdray.results import ResumableResults
    from kdray.train.trainer import distill

    started = time.time()
    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    train, held_out = arithmetic_splits(args.train_examples, args.eval_examples, args.seed, args.difficulty)
    teacher_init, student_init = build_models(args, train, workdir)
    results = ResumableResults(out, shape=_shape(args), seed=args.seed)
    done = results.done

    def report(name: str, path: str, t0: float, run: Any = None) -> None:
        row = {"model": name, **score(path, held_out, args.max_response), "minutes": (time.time() - t0) / 60}
        if run is not None:
            row["final"] = {k: v for k, v in run.final.items() if "/" in k or k in ("loss", "eval_loss")}
        print(json.dumps(results.record(row)), flush=True)

    t0 = time.time()
    sft = {"method": "sft"}
    cfg = _config(args, model=teacher_init, teacher="tiny", objective=sft, steps=args.teacher_steps)
    trained = workdir / "teacher" / "student"  # where `distill` exports the teacher run's model
    if args.teacher_path:  # trained by an earlier run with the same arguments: its init goes unused
        teacher = str(Path(args.teacher_path).resolve())
    elif TEACHER in done and (trained / "config.json").is_file():
        teacher = str(trained)
    else:
        teacher = str(distill(cfg, train, held_out, workdir=workdir, name="teacher").export_path)
    for name, path in ((TEACHER, teacher), (init_label(args), student_init)):
        if name in done:
            results.reuse(name)
        else:
            report(name, path, t0 if name == TEACHER else time.time())
    runs = [(spec, objective(spec)) for spec in args.runs.split(",") if spec]
    if args.baseline:
        runs.append(("sft", sft))
    for name, student_objective in runs:
        if f"student: {name}" in done:
            results.reuse(f"student: {name}")
            continue
        t0 = time.time()
        cfg = _config(
            args, model=student_init, teacher=teacher, objective=student_objective, steps=args.student_steps
        )
        label = "student-" + "".join(c if c.isalnum() or c in "._" else "-" for c in name)
        run = distill(cfg, train, held_out, workdir=workdir, name=label, teacher_path=teacher)
        report(f"student: {name}", str(run.export_path), t0, run)

    print(f"\nheld-out: {args.eval_examples} examples; {(time.time() - started) / 60:.1f} minutes in all")
    print(report_table(out, args.student_tokenizer))


if __name__ == "__main__":
    main()
