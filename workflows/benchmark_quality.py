"""Does distilling beat training the small model alone? Every method over seeds and two student starts.

    python workflows/benchmark_quality.py --task arithmetic --seeds 0,1,2     # rows -> benchmarks/quality.jsonl
    python workflows/benchmark_quality.py --task arithmetic --report          # the table, from the rows

One teacher per task, trained once with cross-entropy and reused by the hash of its configuration (a
missing checkpoint is retrained: training is deterministic, `kdray.determinism`). Each row trains a
student of at most a quarter of the teacher's parameters for the same total number of steps:

- `scratch`: the student starts from random weights and trains with the method for `--student-steps`;
- `two_stage` (the X-KD and GKD papers' recipe): SFT on the data for `--sft-share` of the steps (one
  checkpoint per seed, shared by every method), then the method for the rest, reading the data where
  the SFT stage stopped. Its SFT-only row is the same two stages with cross-entropy in both.

A row is identified by the hash of everything that shapes it (task, method, start, data fraction, seed
and the benchmark's arguments); a row already in the results file is skipped, so a run spread over
several sittings completes. The seed is the student's (initial weights, data order, samples); the data
and the teacher are the task's. `benchmark_methods.py` holds the method rows, configs and scoring.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark_methods as bm

from kdray.eval.metrics import bootstrap_ci

#: the rows of the quality table (METHODS.md's baselines and both X-KD variants); AVA-d reads no teacher
DEFAULT_METHODS = "sft,supervised_kd,seqkd,gkd,minillm,distillm,taid,xkd-divergence,xkd-divergence-logprobs,xkd-sequence,pad"
STARTS = ("scratch", "two_stage")
#: the arguments that shape a task's rows (what is run, where, and how many seeds are not among them)
SHAPE = (
    "task",
    "train_examples",
    "eval_examples",
    "difficulty",
    "teacher_steps",
    "student_steps",
    "teacher_size",
    "student_size",
    "batch_size",
    "lr",
    "top_k",
    "max_prompt",
    "max_response",
    "max_new_tokens",
    "sft_share",
    "data_seed",
)


def config_hash(obj: Any) -> str:
    """A short, stable hash of a JSON-able configuration."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


#: arguments added after rows were recorded: in a hash only when set, so the older rows keep their keys
OPTIONAL = ("vocab", "teacher_lr")


def _optional(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in OPTIONAL if getattr(args, k)}


def shape_of(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in SHAPE} | _optional(args)


def teacher_key(args: argparse.Namespace) -> str:
    """The teacher's identity: the task, its data and the teacher's own training (not the students')."""
    keys = (
        "task",
        "train_examples",
        "eval_examples",
        "difficulty",
        "teacher_steps",
        "teacher_size",
        "batch_size",
        "lr",
        "max_prompt",
        "max_response",
        "data_seed",
    )
    return "teacher-" + config_hash({k: getattr(args, k) for k in keys} | _optional(args))


def row_key(args: argparse.Namespace, method: str, start: str, fraction: float, seed: int) -> str:
    objective = bm.method_rows()[method]
    return config_hash(
        {
            **shape_of(args),
            "method": method,
            "objective": objective,
            "start": start,
            "fraction": fraction,
            "seed": seed,
        }
    )


def rotate(records: Sequence[dict[str, Any]], offset: int) -> list[dict[str, Any]]:
    """The records starting at `offset` (mod their count): the second stage reads on where the first stopped."""
    offset %= max(len(records), 1)
    return list(records[offset:]) + list(records[:offset])


# ---- running rows ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    bm.add_task_arguments(parser)
    parser.add_argument(
        "--methods", default=DEFAULT_METHODS, help="comma-separated rows of " + ",".join(bm.method_rows())
    )
    parser.add_argument("--starts", default=",".join(STARTS), help="comma-separated: scratch, two_stage")
    parser.add_argument("--seeds", default="0,1,2", help="student seeds, comma-separated")
    parser.add_argument("--fractions", default="1.0", help="shares of the training data, comma-separated")
    parser.add_argument(
        "--sft-share", type=float, default=0.5, help="two_stage: share of the steps spent on SFT"
    )
    parser.add_argument("--data-seed", type=int, default=0, help="the task's problems and its teacher")
    parser.add_argument("--workdir", default="runs/benchmark_quality")
    parser.add_argument("--out", default="benchmarks/quality.jsonl")
    parser.add_argument("--report", action="store_true", help="print the table of --out for --task and exit")
    parser.add_argument(
        "--no-extras", dest="extras", action="store_false",
        help="skip each row's diversity curve and LCA AUROCs (about a minute per row)",
    )  # fmt: skip
    parser.add_argument(
        "--fill-extras", action="store_true",
        help="add the diversity curve and LCA AUROCs to finished rows whose student is still on disk, and exit",
    )  # fmt: skip
    parser.add_argument("--plot", help="with --report: write the quality-diversity plot (PNG) there")
    args = parser.parse_args()
    if args.report:
        print(report(Path(args.out), args.task))
        if args.plot:
            plot(Path(args.out), args.task, Path(args.plot))
        return
    unknown = sorted(set(args.methods.split(",")) - set(bm.method_rows()))
    if unknown or not set(args.starts.split(",")) <= set(STARTS):
        parser.error(
            f"unknown --methods {unknown} or --starts {args.starts}; known: {list(bm.method_rows())}, {STARTS}"
        )
    fill_extras(args) if args.fill_extras else run(args)


def row_extras(
    path: str, held_out: list[dict[str, Any]], args: argparse.Namespace, seed: int
) -> dict[str, Any]:
    """A student's samples: the quality-diversity curve (8 samples per prompt at each temperature), its
    point at temperature 1 (distinct-2, self-BLEU, sample quality) and, on exact-match tasks, the LCA
    AUROCs (greedy + 8 samples at temperature 1; `kdray.eval.uncertainty`)."""
    from kdray.eval.diversity import diversity_curve
    from kdray.eval.uncertainty import lca_applies, lca_evaluation

    task = "arithmetic" if args.task == "arithmetic" else "translation"
    curve = diversity_curve(path, held_out, task=task, samples=8, max_new_tokens=args.max_response, seed=seed)
    at_1 = next(r for r in curve if r["temperature"] == 1.0)
    out = {"curve": curve, "distinct_2": at_1["distinct_2"], "self_bleu": at_1["self_bleu"],
           "sample_quality": at_1["quality"]}  # fmt: skip
    if lca_applies(args.task):
        lca = lca_evaluation(path, held_out, samples=8, max_new_tokens=args.max_response, seed=seed)
        out.update({k: lca[k] for k in ("lca_auroc", "entropy_auroc", "loglik_auroc")})
    return out


def fill_extras(args: argparse.Namespace) -> None:
    """`row_extras` for the finished rows of this setting that lack them and whose student is on disk."""
    from kdray.results import read_rows, update_rows

    out, workdir = Path(args.out), Path(args.workdir).resolve() / args.task
    data_args = argparse.Namespace(**{**vars(args), "seed": args.data_seed})
    _, held_out = bm.task_records(data_args)
    todo = [r for r in read_rows(out) if r.get("task") == args.task and r.get("shape") == shape_of(args)
            and "start" in r and "curve" not in r]  # fmt: skip
    for row in todo:
        student = workdir / row["key"] / row["method"] / "student"
        if not (student / "config.json").exists():
            print(
                f"[extras] {row['key']} ({row['method']}, {row['start']}, seed {row['seed']}): no student",
                flush=True,
            )
            continue
        extras = row_extras(str(student), held_out, args, row["seed"])
        update_rows(out, {row["key"]: extras})
        print(f"[extras] {row['key']} ({row['method']}, {row['start']}, seed {row['seed']}) done", flush=True)


def run(args: argparse.Namespace) -> None:
    from kdray.determinism import provenance
    from kdray.results import append_rows, read_rows
    from kdray.run import init_ray

    init_ray(quiet=True)  # before torch loads: the kernel pins (see benchmark_methods)
    from kdray.train.trainer import distill

    out = Path(args.out)
    done = {r["key"]: r for r in read_rows(out) if "key" in r}
    workdir = Path(args.workdir).resolve() / args.task
    data_args = argparse.Namespace(**{**vars(args), "seed": args.data_seed})
    train, held_out = bm.task_records(data_args)
    t_hidden, t_layers = map(int, args.teacher_size.split("x"))
    s_hidden, s_layers = map(int, args.student_size.split("x"))
    shape = shape_of(args)

    def record(row: dict[str, Any], seed: int) -> dict[str, Any]:
        row = {**row, "task": args.task, "shape": shape, **provenance(seed)}
        append_rows(out, [row])
        done[row["key"]] = row
        print(
            json.dumps({k: row[k] for k in ("model", "start", "fraction", "seed", "score") if k in row}),
            flush=True,
        )
        return row

    # the teacher: once per task configuration, its checkpoint reused while it exists
    tkey = teacher_key(args)
    teacher = workdir / tkey / "teacher" / "student"
    t0 = time.time()
    retrained = not (teacher / "config.json").exists()
    if retrained:
        print(f"[teacher] {args.teacher_size} from scratch, {args.teacher_steps} steps ({tkey})", flush=True)
        cfg = bm.student_config(
            argparse.Namespace(**{**vars(data_args), "lr": args.teacher_lr or args.lr}),
            teacher=None,
            method=bm.method_rows()["sft"],
            hidden=t_hidden,
            layers=t_layers,
            steps=args.teacher_steps,
            student=bpe_start(train, workdir / tkey / "init", t_hidden, t_layers, args)
            if args.vocab
            else None,
        )
        teacher = distill(cfg, train, held_out, workdir=workdir / tkey, name="teacher").export_path
    if tkey not in done:
        row = {
            "key": tkey,
            "model": "teacher (CE from scratch)",
            "params": bm.count_params(str(teacher)),
            "score": bm.score_model(str(teacher), held_out, args),
            "minutes": (time.time() - t0) / 60,
        }
        record(row, args.data_seed)
    elif retrained:  # the rows already recorded were distilled from the first training of this teacher
        score = bm.score_model(str(teacher), held_out, args)
        if score != done[tkey]["score"]:
            raise RuntimeError(
                f"{tkey}: the retrained teacher scores {score}, the recorded one {done[tkey]['score']}; "
                f"the rows in {out} came from another teacher. Run on the machine that recorded them "
                f"(cpu {done[tkey].get('cpu')}, {done[tkey].get('threads')} threads) or with a new --out"
            )
        print(f"[teacher] retrained: {score}, as recorded", flush=True)

    sft_steps = round(args.student_steps * args.sft_share)
    grid = [
        (fraction, seed, start, method)
        for fraction in map(float, args.fractions.split(","))
        for seed in map(int, args.seeds.split(","))
        for start in args.starts.split(",")
        for method in args.methods.split(",")
    ]
    for fraction, seed, start, method in grid:
        key = row_key(args, method, start, fraction, seed)
        if key in done:
            continue
        t0 = time.time()
        seeded = argparse.Namespace(**{**vars(args), "seed": seed})
        rows = train[: max(int(len(train) * fraction), args.batch_size)]
        student, steps = None, args.student_steps
        if (
            start == "two_stage"
        ):  # SFT first (shared by the methods), then the method on the data that follows
            stage = "sft-stage-" + config_hash({**shape, "seed": seed, "fraction": fraction})
            student = workdir / stage / "sft" / "student"
            if not (student / "config.json").exists():
                cfg = bm.student_config(
                    seeded,
                    teacher=str(teacher),
                    method=bm.method_rows()["sft"],
                    hidden=s_hidden,
                    layers=s_layers,
                    steps=sft_steps,
                )
                # the teacher's path gives the student its tokenizer (a BPE teacher's, on Multi30k)
                student = distill(
                    cfg, rows, held_out, workdir=workdir / stage, name="sft", teacher_path=str(teacher)
                ).export_path
            steps, rows = args.student_steps - sft_steps, rotate(rows, sft_steps * args.batch_size)
        print(f"[{start} {method} seed {seed} data {fraction:g}] {steps} steps", flush=True)
        cfg = bm.student_config(
            seeded,
            teacher=str(teacher),
            method=bm.method_rows()[method],
            hidden=s_hidden,
            layers=s_layers,
            steps=steps,
            student=str(student) if student else None,
        )
        result = distill(cfg, rows, held_out, workdir=workdir / key, name=method, teacher_path=str(teacher))
        path = str(result.export_path)
        row = {
            **(row_extras(path, held_out, args, seed) if args.extras else {}),
            "key": key,
            "model": f"student: {method}",
            "method": method,
            "start": start,
            "fraction": fraction,
            "teacher": tkey,
            "params": bm.count_params(path),
            "score": bm.score_model(path, held_out, args),
            "final_eval_loss": result.final.get("eval_loss"),
            "minutes": (time.time() - t0) / 60,
        }
        record(row, seed)
    print(report(out, args.task))


def bpe_start(
    train: Sequence[dict[str, Any]], path: Path, hidden: int, layers: int, args: argparse.Namespace
) -> str:
    """The teacher's random start with a byte-level BPE of `--vocab` tokens trained on the training split's
    prompts and responses (a subword vocabulary: a character-level teacher cannot learn translation in
    the budget). The students are built with the teacher's tokenizer (`kdray.models.build`)."""
    from kdray.models.bpe import bpe_tokenizer, save_bpe_checkpoint

    texts = [text for r in train for text in (r["prompt"], r["response"])]
    tokenizer = bpe_tokenizer(texts, vocab_size=args.vocab)
    heads = max(1, hidden // 32)  # as `kdray.models.build` sizes the students
    save_bpe_checkpoint(
        path, tokenizer, seed=args.data_seed, hidden_size=hidden, num_layers=layers, num_heads=heads
    )
    return str(path)


# ---- the table ------------------------------------------------------------------------------------------


def report(path: Path, task: str) -> str:
    """Per (method, start, data fraction): the mean over seeds ± sd with a bootstrap 95% interval, the
    lead over SFT-only of the same start, fraction and seed, and the teacher's recovery (student / teacher)."""
    from kdray.results import read_rows

    rows = [r for r in read_rows(path) if r.get("task") == task]
    if not rows:
        raise ValueError(f"{path}: no {task} rows; run python workflows/benchmark_quality.py --task {task}")
    shape = rows[-1]["shape"]  # the latest setting: a run under other arguments replaces the table
    rows = [r for r in rows if r.get("shape") == shape]
    teachers = [r for r in rows if r["model"].startswith("teacher")]
    teacher = teachers[-1]["score"] if teachers else None
    students = [r for r in rows if "start" in r]
    cells: dict[tuple[str, str, float], dict[int, dict[str, Any]]] = {}
    for r in students:
        cells.setdefault((r["method"], r["start"], r["fraction"]), {})[r["seed"]] = r
    metric = "exact match (%)" if task == "arithmetic" else "sacreBLEU"
    lines = [
        f"| method | start | data | seeds | {metric}: mean ± sd [95% CI] | − SFT only (paired) | recovery "
        "| distinct-2 | self-BLEU | LCA AUROC | min |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = {m: i for i, m in enumerate(bm.method_rows())}
    for (method, start, fraction), by_seed in sorted(
        cells.items(), key=lambda kv: (kv[0][2], kv[0][1], order.get(kv[0][0], 99))
    ):
        scores = [by_seed[s]["score"] for s in sorted(by_seed)]
        mean = statistics.fmean(scores)
        sd = f" ± {statistics.stdev(scores):.1f}" if len(scores) > 1 else ""
        lo, hi = bootstrap_ci(scores)
        base = cells.get(("sft", start, fraction), {})
        diffs = [by_seed[s]["score"] - base[s]["score"] for s in sorted(by_seed) if s in base]
        lead = (
            ""
            if method == "sft" or not diffs
            else f"{statistics.fmean(diffs):+.1f}"
            + (f" ± {statistics.stdev(diffs):.1f}" if len(diffs) > 1 else "")
        )
        recovery = f"{mean / teacher:.2f}" if teacher else ""
        minutes = statistics.fmean(r["minutes"] for r in by_seed.values())
        lines.append(
            f"| {bm.LABELS.get(method, method)} | {start} | {fraction:g} | {len(scores)} | "
            f"{mean:.1f}{sd} [{lo:.1f}, {hi:.1f}] | {lead} | {recovery} | "
            + " | ".join(_seed_mean(by_seed, k, len(scores), d) for k, d in EXTRA_COLUMNS)
            + f" | {minutes:.1f} |"
        )
    commits = ", ".join(sorted({str(r.get("commit")) for r in rows}))
    machines = "; ".join(sorted({f"{r.get('cpu')}, {r.get('threads')} threads" for r in rows}))
    args = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in shape.items())
    starts = sorted({r["start"] for r in students}, key=STARTS.index)
    args += f" --starts {','.join(starts)}" if starts and len(starts) < len(STARTS) else ""
    methods = [m for m in DEFAULT_METHODS.split(",") if any(r["method"] == m for r in students)]
    args += f" --methods {','.join(methods)}" if len(methods) < len(DEFAULT_METHODS.split(",")) else ""
    lines += [
        "",
        f"Teacher: {teacher:.1f} ({teachers[-1]['params']:,} parameters); students "
        f"{students[0]['params']:,} parameters. From `{path.name}`: `python workflows/benchmark_quality.py {args}`; "
        f"seeds are the students' (the data and the teacher are the task's); commit {commits}; {machines}."
        if teachers and students
        else f"From `{path.name}`; commit {commits}; {machines}.",
    ]
    return "\n".join(lines)


#: the sample measurements of the table (`row_extras`), with their decimals
EXTRA_COLUMNS = (("distinct_2", 3), ("self_bleu", 1), ("lca_auroc", 3))


def _seed_mean(by_seed: dict[int, dict[str, Any]], key: str, seeds: int, decimals: int) -> str:
    """The mean over the seeds that have `key` ("" if none), with their count when not every seed has it."""
    values = [r[key] for r in by_seed.values() if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
    if not values:
        return ""
    return f"{statistics.fmean(values):.{decimals}f}" + (f" ({len(values)})" if len(values) < seeds else "")


def plot(path: Path, task: str, target: Path) -> None:
    """The quality-diversity plot of `task`'s latest setting: per method and start, each temperature's
    point averaged over the seeds that have a curve."""
    from kdray.plots import quality_diversity
    from kdray.results import read_rows

    rows = [r for r in read_rows(path) if r.get("task") == task and "curve" in r]
    if not rows:
        raise ValueError(
            f"{path}: no {task} rows with a diversity curve; run --fill-extras or a new row first"
        )
    shape = rows[-1]["shape"]
    points: dict[str, dict[float, list[dict[str, float]]]] = {}
    for r in (r for r in rows if r["shape"] == shape and r.get("fraction") == 1.0):
        label = f"{bm.LABELS.get(r['method'], r['method'])} ({r['start'].replace('_', '-')})"
        for p in r["curve"]:
            points.setdefault(label, {}).setdefault(p["temperature"], []).append(p)
    curves = {
        label: [{k: statistics.fmean(p[k] for p in ps) for k in ps[0]} for ps in by_t.values()]
        for label, by_t in sorted(points.items())
    }
    metric = "exact match of samples (%)" if task == "arithmetic" else "BLEU of samples"
    fig = quality_diversity(
        curves, quality=metric, title=f"{task}: quality against diversity, mean over seeds"
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
