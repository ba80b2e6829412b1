"""The `kdray` command line. Subcommands grow with the package; each imports its heavy parts lazily."""

from __future__ import annotations

import argparse
import os
import sys

from kdray import __version__


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, separate from `main` so tests and docs can inspect it."""
    parser = argparse.ArgumentParser(
        prog="kdray",
        description="Distil large language models on Ray (X-KD, GKD, MiniLLM, TAID, ...).",
    )
    parser.add_argument("--version", action="version", version=f"kdray {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="compute every loss on a tiny model and print the values")
    demo.add_argument("--seed", type=int, default=0, help="random seed of the tiny models")
    check = sub.add_parser(
        "config",
        help="load and check a YAML config (with overrides), tokenizers included; print it with the method's "
        "terms resolved",
    )
    _config_args(check, "`kdray config PATH` works too")
    check.add_argument(
        "--resolved", action="store_true", help="also say what the method needs and the teacher's temperature"
    )
    check.add_argument(
        "--no-preflight",
        action="store_true",
        help="skip the tokenizer check (it reads the teacher's and student's tokenizer and config files)",
    )
    methods = sub.add_parser("methods", help="the distillation methods kdray trains, from their declarations")
    methods.add_argument("--json", action="store_true", help="a JSON list, one object per method")
    run = sub.add_parser("run", help="run (or resume) the workflow of a config: data → ... → register")
    _config_args(run, "see workflows/configs/")
    run.add_argument(
        "--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else a local instance)"
    )
    run.add_argument("--run-name", default=None, help="MLflow name of the workflow's parent run")
    run.add_argument("--fresh", action="store_true", help="ignore finished steps and run everything again")
    run.add_argument(
        "--verbose", action="store_true",
        help="also print Ray's own log lines (Ray Data plans, Ray Train reports); they are always in Ray's logs",
    )  # fmt: skip
    run.add_argument(
        "--explain",
        action="store_true",
        help="say which steps would be reused and why the others would run (changed config section, "
        "file contents, code or input step); run nothing",
    )
    sweep = sub.add_parser(
        "sweep", help="Ray Tune search over the config's tune.search_space (resumes an interrupted sweep)"
    )
    _config_args(sweep, "with a tune: section")
    sweep.add_argument(
        "--address", default=None, help="Ray cluster to join (default: $RAY_ADDRESS, else a local instance)"
    )
    sweep.add_argument("--run-name", default=None, help="MLflow name of the sweep's parent run")
    ev = sub.add_parser("eval", help="score saved models on the held-out split of a config (or on --data)")
    ev.add_argument(
        "models", nargs="+",
        help="model directories (HF checkpoints, e.g. an exported student); section.key=value among them are "
        "overrides",
    )  # fmt: skip
    _config_args(ev, "naming the task and its data", positional=None)
    ev.add_argument("--limit", type=int, default=None, help="score only the first N held-out examples")
    ev.add_argument(
        "--data",
        default=None,
        metavar="PATH",
        help="score on this jsonl/json/parquet file in the task's own fields (arithmetic/gsm8k: question, "
        "answer; translation: source, target; summarization: document, summary) instead of the held-out split",
    )
    ev.add_argument(
        "--lca-samples",
        type=int,
        default=None,
        metavar="K",
        help="samples per prompt for the LCA uncertainty AUROCs on exact-match tasks; 0 = off "
        "(default: the config's workflow.lca_samples)",
    )
    doc = sub.add_parser(
        "doctor", help="check Ray, devices, vLLM, MLflow and versions; exit 1 if something fails"
    )
    _config_args(doc, "optional: check the MLflow store its runs will use", positional=None)
    rw = sub.add_parser(
        "reward",
        help="score responses with a trained reward head (X-KD/AVA); for chosen/rejected pairs also the accuracy",
    )
    rw.add_argument("--model", required=True, help="exported student with reward_head.pt, or a run directory")
    rw.add_argument(
        "--data",
        required=True,
        help="jsonl/json/parquet of prompt+response rows, or of prompt/chosen/rejected pairs (strings or chat "
        "messages)",
    )
    rw.add_argument("--limit", type=int, default=None, help="score only the first N rows")
    rw.add_argument("--max-prompt-tokens", type=int, default=256, help="as the run's data.max_prompt_tokens")
    rw.add_argument(
        "--max-response-tokens", type=int, default=256, help="as the run's data.max_response_tokens"
    )
    rw.add_argument("--no-chat-template", action="store_true", help="as the run's data.chat_template: false")
    rw.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    sub.add_parser(
        "bench",
        help="the performance benchmarks of a source checkout: kdray bench --throughput --quick, "
        "--loss-memory, --report (= python workflows/benchmark_perf.py ...)",
        add_help=False,
    )
    return parser


_SHAPE = (
    "every command that reads a config takes --config PATH and overrides as section.key=value, either "
    "positional or with --set (repeatable)"
)


def _config_args(parser: argparse.ArgumentParser, what: str, positional: str | None = "overrides") -> None:
    """The one way every config-reading command takes its config and overrides."""
    parser.add_argument("--config", metavar="PATH", help=f"YAML config file ({what})")
    if positional:
        parser.add_argument(
            positional, nargs="*", help="section.key=value overrides, e.g. train.max_steps=50"
        )
    parser.add_argument(
        "--set", dest="set_overrides", action="append", default=[], metavar="KEY=VALUE",
        help="a section.key=value override (repeatable; the same as a positional one)",
    )  # fmt: skip


def _is_override(arg: str) -> bool:
    head = arg.split("=", 1)[0]
    return "=" in arg and "." in head and "/" not in head


def _resolve_config_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fold the accepted shapes into `args.config` and `args.overrides`: positional overrides and --set
    alike; `kdray config PATH` (the path positional) as well as `--config PATH`; for `eval`, positional
    section.key=value arguments are overrides and the rest are model directories."""
    loose = list(getattr(args, "overrides", None) or [])
    if args.command == "eval":
        loose = [a for a in args.models if _is_override(a)]
        args.models = [a for a in args.models if not _is_override(a)]
        if not args.models:
            parser.error("eval: give at least one model directory")
    if args.command == "config" and args.config is None:
        paths = [a for a in loose if not _is_override(a)]
        if paths:
            args.config = paths[0]
            loose.remove(paths[0])
    bad = [a for a in loose if not _is_override(a)]
    if bad:
        parser.error(f"{args.command}: {bad[0]!r} is not a section.key=value override ({_SHAPE})")
    if args.config is None:
        parser.error(f"{args.command}: the config is missing: add --config PATH ({_SHAPE})")
    args.overrides = loose + list(args.set_overrides)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `kdray` console script; returns the process exit code."""
    parser = build_parser()
    # positional arguments after options (`eval DIR --config C train.lr=1`) arrive as extras
    args, extra = parser.parse_known_args(argv)
    if args.command == "bench":
        return bench_command(extra)
    if args.command in ("config", "run", "sweep", "eval"):
        if any(a.startswith("-") for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.command == "eval":
            args.models = [*args.models, *extra]
        else:
            args.overrides = [*args.overrides, *extra]
        _resolve_config_args(parser, args)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from kdray.determinism import pin_cpu_kernels

    pin_cpu_kernels()  # before anything imports torch: the same numbers on any x86 machine
    if args.command == "demo":
        from kdray.demo import run_demo

        run_demo(seed=args.seed)
        return 0
    if args.command == "config":
        from kdray.config import ConfigError, dump_config, load_config
        from kdray.teacher.preflight import preflight_summary
        from kdray.validate import describe_resolved, validate_config

        try:
            cfg = load_config(args.config, args.overrides)
            validate_config(cfg)
            if not args.no_preflight:  # what `kdray run` checks before any step, from small files only
                print(preflight_summary(cfg), file=sys.stderr)
        except (ConfigError, ValueError, OSError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if args.resolved:
            print(describe_resolved(cfg), end="")
        print(dump_config(cfg), end="")
        return 0
    if args.command == "methods":
        from kdray.methods.table import methods_json, methods_table

        print(methods_json() if args.json else methods_table())
        return 0
    if args.command == "run":
        from kdray.run import run_command

        if args.verbose:
            os.environ["KDRAY_VERBOSE"] = "1"  # before Ray starts: its workers inherit it

        return run_command(args)
    if args.command == "sweep":
        from kdray.run import sweep_command

        return sweep_command(args)
    if args.command == "eval":
        from kdray.run import eval_command

        return eval_command(args)
    if args.command == "doctor":
        from kdray.doctor import doctor

        if args.config is None:
            return doctor()
        from kdray.run import load_checked_config

        cfg = load_checked_config(args.config, args.set_overrides)
        return 2 if cfg is None else doctor(config=cfg)
    if args.command == "reward":
        from kdray.reward import reward_command

        return reward_command(args)
    parser.print_help()
    return 0


def bench_command(argv: list[str]) -> int:
    """Run `workflows/benchmark_perf.py` of the checkout kdray is installed from, with `argv`: the
    benchmarks are scripts beside the package (they write results files and README tables), so they
    exist in a source checkout, not in an installed wheel."""
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "workflows" / "benchmark_perf.py"
    if not script.is_file():
        print(
            f"error: {script} not found: `kdray bench` runs the benchmarks of a source checkout; clone the "
            "repository and install it with `pip install -e '.[bench]'`",
            file=sys.stderr,
        )
        return 2
    return subprocess.call([sys.executable, str(script), *argv])


if __name__ == "__main__":
    sys.exit(main())
