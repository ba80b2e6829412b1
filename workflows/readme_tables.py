"""Regenerate the README's results tables from the results files (JSONL) the benchmarks write.

    python workflows/readme_tables.py           # rewrite the tables in README.md in place
    python workflows/readme_tables.py --check   # exit 1, naming the table, when one differs from its file

Why: a number in the README must come from a results file written by a command the README gives. Each
table sits between `<!-- table: NAME -->` and `<!-- /table -->` and is rendered here from its file
(`TABLES`); the prose around it is the README's own. `tests/test_readme_tables.py` runs the check, so a
results file committed without its table (or a hand-edited table) fails the tests.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdray.determinism import cpu_vendor
from kdray.results import latest_run, read_rows
from kdray.workflow.evaluate import BASELINE_LABEL as BASELINE
from kdray.workflow.evaluate import lead_sentence

ROOT = Path(__file__).resolve().parents[1]


def methods_table(path: Path, metric: str) -> str:
    """The latest run of `workflows/benchmark_methods.py` in `path`: the rows that share the arguments of
    the file's last row (a later run under other arguments replaces the table), one per model."""
    latest = latest_run(read_rows(path))
    if not latest:
        raise ValueError(f"{path}: no rows; run the command its README section gives")
    shape = next(iter(latest.values()))["args"]
    lines = [f"| model | {metric} | held-out CE | minutes |", "|---|---:|---:|---:|"]
    labels = _workflow("benchmark_methods").LABELS  # row name -> what the README calls it
    for r in latest.values():
        loss = f"{r['final_eval_loss']:.3f}" if r.get("final_eval_loss") is not None else ""
        label = labels.get(r["model"].removeprefix("student: "), r["model"])
        lines.append(f"| {label} | {r['score']:.1f} | {loss} | {r['minutes']:.1f} |")
    commits = ", ".join(sorted({str(r.get("commit", "?")) for r in latest.values()}))
    machines = "; ".join(
        sorted({f"{r.get('cpu', '?')}, {r.get('threads', '?')} threads" for r in latest.values()})
    )
    seeds = ", ".join(sorted({str(r.get("seed", "?")) for r in latest.values()}))
    lines += [
        "",
        f"From `{path.name}`: `python workflows/benchmark_methods.py {shape}`; seed {seeds}; "
        f"commit {commits}; {machines}.",
    ]
    return "\n".join(lines)


def run_table(path: Path, command: str | None = None) -> str:
    """The last run recorded in a `workflow.results_file` (of `command`, when given: the README's own, not
    a variant run with overrides): the evaluation table `kdray run` printed, and where and how fast it ran."""
    runs = [run for run in _runs(read_rows(path)) if command is None or run[0]["command"] == command]
    if not runs:
        raise ValueError(
            f"{path}: no rows of {command or 'any command'}; run the command its README section gives"
        )
    run = runs[-1]
    last = run[-1]
    metric = last["metric"]
    extra = sorted({k for r in run for k in r["scores"]} - {metric})
    lines = [f"| model | {metric} | " + " | ".join(extra) + " |", "|---|" + "---:|" * (1 + len(extra))]
    for r in run:
        cells = [f"{r['scores'][metric]:.2f}"] + [f"{r['scores'].get(k, float('nan')):.3f}" for k in extra]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    # the sentence `kdray run` printed under its table: the distilled student's lead over SFT-only
    leads = [r for r in run if r.get("lead_vs_baseline")] if any(r["model"] == BASELINE for r in run) else []
    for r in leads:
        lines += ["", lead_sentence(r["model"], BASELINE, r["lead_vs_baseline"])]
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in last["steps_s"].items())
    lines += [
        "",
        f"From `{path.relative_to(ROOT)}`: `{last['command']}`; data seed {last['data_seed']}, train seed "
        f"{last['seed']}; commit {last['commit']}; {last['cpu']}, {last['threads']} threads, kernels "
        f"{last['cpu_kernels']}; {last['wall_s']:.0f} s from the command's start to the table, installation not "
        f"included ({steps}).",
    ]
    return "\n".join(lines)


def _runs(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The rows of a `workflow.results_file` grouped by run (command, commit and wall time), in order."""
    runs: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        runs.setdefault((r["command"], r["commit"], r["wall_s"]), []).append(r)
    return list(runs.values())


def seeds_table(path: Path, metrics: tuple[str, ...] = ("exact_match", "heldout_ce")) -> str:
    """The latest run of each data seed in a `workflow.results_file`: per model, each seed's scores and
    their mean ± standard deviation (a new data seed generates new problems and trains a new teacher)."""
    import statistics

    latest = {run[0]["data_seed"]: run for run in _runs(read_rows(path))}  # later runs replace earlier
    seeds = sorted(latest)
    models = list(dict.fromkeys(r["model"] for s in seeds for r in latest[s]))
    head = " | ".join(f"{m} (seed {', '.join(map(str, seeds))}; mean ± sd)" for m in metrics)
    lines = [f"| model | {head} |", "|---|" + "---:|" * len(metrics)]
    for model in models:
        cells = []
        for metric in metrics:
            values = [_score(latest, s, model, metric) for s in seeds]
            got = [v for v in values if v is not None]
            if len(got) < len(seeds):
                cells.append(" / ".join("—" if v is None else f"{v:.3g}" for v in values))
                continue
            summary = f" ({statistics.mean(got):.3g} ± {statistics.stdev(got):.2g})" if len(got) > 1 else ""
            cells.append(" / ".join(f"{v:.3g}" for v in got) + summary)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += _paired_rows(latest, seeds, models, metrics)
    commits = ", ".join(sorted({latest[s][0]["commit"] for s in seeds}))
    lines += ["", f"From `{path.relative_to(ROOT)}`: the latest run of each data seed; commit {commits}."]
    return "\n".join(lines)


#: overrides that change where a run writes or what it logs, not what it trains: left out of the table
NOT_TRAINING = ("workflow.results_file=", "workflow.workdir=", "workflow.lca_samples=", "tracking.enabled=")


def variants_table(path: Path, metrics: tuple[str, ...] = ("exact_match", "heldout_ce")) -> str:
    """One line per run of the quickstart with overrides (the same teacher, one setting changed): the
    SFT-only and the distilled student side by side, and the distilled one's lead. What moves the
    quickstart's comparison, and by how much, next to the run as committed."""
    runs = _runs(read_rows(path))
    cols = " | ".join(f"{m}: SFT only / distilled (lead)" for m in metrics)
    lines = [
        f"| overrides | machine | teacher {metrics[0]} | {cols} |",
        "|---|---|---:|" + "---:|" * len(metrics),
    ]
    for run in runs:
        by_model = {r["model"]: r["scores"] for r in run}
        student = next((m for m in by_model if m.startswith("student") and m != BASELINE), None)
        if student is None or BASELINE not in by_model:
            continue
        words = run[0]["command"].split()[4:]  # after "kdray run --config <file>"
        shown = " ".join(f"`{w}`" for w in words if not w.startswith(NOT_TRAINING)) or "(none)"
        machine = machine_of(run[0])
        cells = []
        for m in metrics:
            base, own = by_model[BASELINE][m], by_model[student][m]
            cells.append(f"{base:.3g} / {own:.3g} ({own - base:+.3g})")
        teacher = by_model.get("teacher", {}).get(metrics[0], float("nan"))
        lines.append(f"| {shown} | {machine} | {teacher:.3g} | " + " | ".join(cells) + " |")
    commits = ", ".join(sorted({run[0]["commit"] for run in runs}))
    lines += ["", f"From `{path.relative_to(ROOT)}`: one run each, data seed 0; commit {commits}."]
    return "\n".join(lines)


QUICKSTART = "workflows/configs/quickstart.yaml"


def machine_of(row: dict[str, Any]) -> str:
    """A row's CPU vendor and kernel level, e.g. `Intel AVX2`, and MKL's branch where it is not the default
    pin's (`KDRAY_CPU_KERNELS=portable`: `Intel AVX2, MKL COMPATIBLE`): what a table names a machine by."""
    branch = row.get("mkl_branch", "AVX2")
    mkl = "" if branch == "AVX2" or row["cpu_kernels"] != "AVX2" else f", MKL {branch}"
    return f"{cpu_vendor(row['cpu'])} {row['cpu_kernels']}{mkl}"


def machines_table(paths: list[Path], metric: str = "exact_match") -> str:
    """Every machine's latest run of the quickstart at its committed settings (no override but the data
    seed and where it writes), per data seed: teacher, SFT-only, the distilled student and its lead, then
    the lead's mean ± sd over those runs. The files are read in order, a later run replacing an earlier
    one of the same machine, kernels and seed; a machine is how the quickstart moved most, so this is the
    spread a user on another machine should expect."""
    import statistics

    latest: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for path in paths:
        for run in _runs(read_rows(path)):
            words = run[0]["command"].split()
            trains = [w for w in words[4:] if not w.startswith((*NOT_TRAINING, "data.seed="))]
            if words[3] == QUICKSTART and not trains:
                latest[(machine_of(run[0]), run[0]["data_seed"])] = run
    lines = [
        f"| machine | data seed | commit | teacher | SFT only | distilled | lead ({metric}) |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    leads = []
    for (machine, seed), run in sorted(latest.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        by_model = {r["model"]: r["scores"][metric] for r in run}
        student = next(m for m in by_model if m.startswith("student") and m != BASELINE)
        lead = by_model[student] - by_model[BASELINE]
        leads.append(lead)
        cells = [by_model.get("teacher", float("nan")), by_model[BASELINE], by_model[student]]
        row = " | ".join(f"{c:.1f}" for c in cells)
        lines.append(f"| {machine} | {seed} | {run[0]['commit']} | {row} | {lead:+.1f} |")
    spread = f"{statistics.mean(leads):+.1f} ± {statistics.stdev(leads):.1f}" if len(leads) > 1 else ""
    lines.append(f"| mean ± sd over {len(leads)} runs |  |  |  |  |  | {spread} |")
    files = ", ".join(f"`{p.relative_to(ROOT)}`" for p in paths)
    lines += ["", f"From {files}: the latest run per machine, kernel level and data seed."]
    return "\n".join(lines)


def _score(latest: dict[Any, list[dict[str, Any]]], seed: Any, model: str, metric: str) -> float | None:
    """`model`'s `metric` in the run of data seed `seed` (None when that run lacks it)."""
    return next((r["scores"].get(metric) for r in latest[seed] if r["model"] == model), None)


def _paired_rows(
    latest: dict[Any, list[dict[str, Any]]], seeds: list[Any], models: list[str], metrics: tuple[str, ...]
) -> list[str]:
    """Per distilled student, its lead over the SFT-only student of the same seed (same teacher, same
    problems): the paired difference is what a claim that distillation wins must beat its spread with."""
    import statistics

    rows = []
    for model in models:
        if model == BASELINE or not model.startswith("student"):
            continue
        cells = []
        for metric in metrics:
            diffs = [
                None if a is None or b is None else a - b
                for a, b in (
                    (_score(latest, s, model, metric), _score(latest, s, BASELINE, metric)) for s in seeds
                )
            ]
            got = [d for d in diffs if d is not None]
            text = " / ".join("—" if d is None else f"{d:+.3g}" for d in diffs)
            if len(got) > 1 and len(got) == len(diffs):
                text += f" ({statistics.mean(got):+.3g} ± {statistics.stdev(got):.2g})"
            cells.append(text)
        rows.append(f"| {model} − SFT only (same seed) | " + " | ".join(cells) + " |")
    return rows


def _workflow(name: str) -> Any:
    """A sibling script as a module (the workflows directory is not a package)."""
    spec = importlib.util.spec_from_file_location(f"kdray_workflow_{name}", ROOT / "workflows" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


#: table name -> how to render it from its results file
TABLES: dict[str, Callable[[], str]] = {
    "arithmetic": lambda: methods_table(ROOT / "BENCHMARKS_methods.jsonl", "exact match (%)"),
    "ava": lambda: _workflow("ava").report(ROOT / "benchmarks" / "ava.jsonl"),
    "quickstart": lambda: run_table(
        ROOT / "benchmarks" / "quickstart.jsonl", "kdray run --config workflows/configs/quickstart.yaml"
    ),
    "quickstart_seeds": lambda: seeds_table(ROOT / "benchmarks" / "quickstart.jsonl"),
    "quickstart_variants": lambda: variants_table(ROOT / "benchmarks" / "quickstart_variants.jsonl"),
    "quickstart_machines": lambda: machines_table(
        [ROOT / "benchmarks" / f"quickstart{part}.jsonl" for part in ("_machines", "_variants", "")]
    ),
    "pad": lambda: _workflow("pad").report(ROOT / "benchmarks" / "pad.jsonl"),
    "faults": lambda: _workflow("faults").report(ROOT / "benchmarks" / "faults.jsonl"),
    "cross_tokenizer": lambda: _workflow("cross_tokenizer").report_table(
        ROOT / "benchmarks" / "cross_tokenizer.jsonl"
    ),
    "cross_tokenizer_multidigit": lambda: _workflow("cross_tokenizer").report_table(
        ROOT / "benchmarks" / "cross_tokenizer.jsonl", "bpe-multidigit"
    ),
    "quality_arithmetic": lambda: _workflow("benchmark_quality").report(
        ROOT / "benchmarks" / "quality.jsonl", "arithmetic"
    ),
    "quality_multi30k": lambda: _workflow("benchmark_quality").report(
        ROOT / "benchmarks" / "quality.jsonl", "multi30k"
    ),
    "loss_memory": lambda: _workflow("benchmark_perf").report(ROOT / "benchmarks" / "perf.jsonl"),
    "throughput": lambda: _workflow("perf_throughput").report(ROOT / "benchmarks" / "perf.jsonl"),
    "throughput_full": lambda: _workflow("perf_throughput").report(
        ROOT / "benchmarks" / "perf.jsonl", quick=False
    ),
    "cache_read": lambda: _workflow("benchmark_cache").report(ROOT / "benchmarks" / "cache_read.jsonl"),
}

BLOCK = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)\n?(<!-- /table -->)", re.S)


def render(text: str) -> tuple[str, list[str]]:
    """`text` with every table block regenerated, and the names of the blocks that changed."""
    changed: list[str] = []

    def fill(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in TABLES:
            raise KeyError(f"README table {name!r} has no renderer; known: {sorted(TABLES)}")
        body = TABLES[name]().strip()
        if body != match["body"].strip():
            changed.append(name)
        return f"{match[1]}{body}\n{match[4]}"

    return BLOCK.sub(fill, text), changed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="only report tables that differ (exit 1)")
    parser.add_argument("--readme", default=str(ROOT / "README.md"))
    args = parser.parse_args()
    readme = Path(args.readme)
    text, changed = render(readme.read_text())
    if args.check:
        for name in changed:
            print(
                f"{readme}: table {name!r} differs from its results file; run python workflows/readme_tables.py"
            )
        return 1 if changed else 0
    readme.write_text(text)
    print(f"{readme}: regenerated {', '.join(changed) or 'nothing (all tables current)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
