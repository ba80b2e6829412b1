"""Train AVA on generated arithmetic preference pairs, with no teacher, and score the reward it learns.

    python workflows/ava.py                      # AVA-p, the defaults below
    python workflows/ava.py --method ava_d       # AVA-d on the chosen answers alone, for comparison

Each pair is a worked answer (chosen) and its twin with one arithmetic slip carried through the later
lines (rejected); train and held-out pairs never share a question. A tiny character-level student is
trained from scratch through the real training path (`kdray.train.trainer.distill`: Ray Data, Ray
Train, the exported student with its reward head) and the exported reward model r(x, y) = Σ_t μ_t is
scored on the held-out pairs: the share whose chosen answer gets the higher reward. AVA-d never sees
a rejected answer, so its accuracy says how much of the ranking the demonstrations alone teach.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any


def _config(args: argparse.Namespace) -> Any:
    from kdray.config import config_from_dict

    hidden, layers = map(int, args.size.split("x"))
    return config_from_dict(
        {
            "model": {"name_or_path": "tiny", "tiny_layers": layers, "tiny_hidden": hidden},
            "data": {
                "preferences": args.method == "ava_p",
                "difficulty": args.difficulty,
                "max_prompt_tokens": args.max_prompt,
                "max_response_tokens": args.max_response,
            },
            "objective": {"method": args.method},
            "train": {
                "batch_size": args.batch_size, "max_steps": args.steps, "lr": args.lr,
                "warmup_steps": 20, "seed": args.seed, "checkpoint_every": args.steps,
                "eval_every": max(args.steps // 4, 1), "cpus_per_worker": args.threads,
            },
            "tracking": {"log_every": max(args.steps // 20, 1)},
        }
    )  # fmt: skip


def report(path: Path) -> str:
    """Mean ± std of held-out preference accuracy over seeds, per method (first row of each seed)."""
    import statistics

    from kdray.results import read_rows

    rows: dict[tuple[str, int], dict[str, Any]] = {}
    for r in read_rows(path):
        rows.setdefault((r["method"], r["seed"]), r)  # a repeated seed re-runs the same arithmetic
    lines = [
        "| method | seeds | held-out preference accuracy | per seed | commits |",
        "|---|---:|---:|---|---|",
    ]
    for method in sorted({m for m, _ in rows}):
        runs = [r for (m, _), r in sorted(rows.items()) if m == method]
        acc = [r["held_out_preference_accuracy"] for r in runs]
        spread = statistics.stdev(acc) if len(acc) > 1 else 0.0
        per_seed = ", ".join(f"{r['seed']}: {r['held_out_preference_accuracy']:.3f}" for r in runs)
        commits = ", ".join(sorted({r["commit"] for r in runs}))
        lines.append(
            f"| {method} | {len(acc)} | {statistics.mean(acc):.3f} ± {spread:.3f} | {per_seed} | {commits} |"
        )
    first = next(iter(rows.values()))
    lines.append(
        f"\n{first['held_out_pairs']} held-out pairs per seed; {first['cpu']}, kernels {first['cpu_kernels']}."
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--method", choices=["ava_p", "ava_d"], default="ava_p")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=16, help="rows per step (a pair is two rows)")
    parser.add_argument("--size", default="64x2", help="hidden x layers of the student")
    parser.add_argument("--train-pairs", type=int, default=4000)
    parser.add_argument("--eval-pairs", type=int, default=200)
    parser.add_argument("--difficulty", type=int, default=1, help="operations per problem (1..4)")
    parser.add_argument("--max-prompt", type=int, default=160)
    parser.add_argument("--max-response", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1, help="CPUs (torch threads) of the training worker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="runs/ava")
    parser.add_argument("--out", default="benchmarks/ava.jsonl", help="results file (one line per run)")
    parser.add_argument("--report", action="store_true", help="print the table of the results file and exit")
    args = parser.parse_args()
    if args.report:
        print(report(Path(args.out)))
        return

    from kdray.determinism import provenance
    from kdray.run import init_ray

    init_ray(quiet=True)  # first, before torch loads: the CPU kernel pins make the result machine-independent
    import ray

    from kdray.data.preferences import arithmetic_pair_splits
    from kdray.results import append_rows
    from kdray.reward import preference_accuracy
    from kdray.train.trainer import distill

    cfg = _config(args)
    train, held_out = arithmetic_pair_splits(args.train_pairs, args.eval_pairs, args.seed, args.difficulty)
    started = time.time()
    run = distill(
        cfg, train, held_out, workdir=Path(args.workdir).resolve(), teacher_path=None,
        name=f"{args.method}-seed{args.seed}",  # its own directory: a finished run of another seed resumes
        progress_desc=args.method, progress_bar=False,
    )  # fmt: skip
    minutes = (time.time() - started) / 60
    accuracy = preference_accuracy(
        run.export_path, held_out, max_prompt_tokens=args.max_prompt, max_response_tokens=args.max_response
    )
    final = run.final
    row = {
        "method": args.method,
        "held_out_preference_accuracy": accuracy,
        "held_out_pairs": len(held_out),
        "eval_loss": final.get("eval_loss"),
        "train_bt_accuracy": final.get("ava_pref/accuracy"),
        "minutes": round(minutes, 2),
        "args": {k: v for k, v in vars(args).items() if k not in ("workdir", "out")},
        **provenance(args.seed),
    }
    print(json.dumps({**row, "student": str(run.export_path)}), flush=True)
    append_rows(args.out, [row])  # one line per run: the README's figure is read from here
    ray.shutdown()


if __name__ == "__main__":
    main()
