"""Every results table in the README is what `workflows/readme_tables.py` renders from its results file."""

from __future__ import annotations

from pathlib import Path

import pytest
from servers import load_workflow

ROOT = Path(__file__).resolve().parents[1]


def _tables():
    return load_workflow("readme_tables")


def test_readme_tables_match_their_results_files():
    tables = _tables()
    readme = (ROOT / "README.md").read_text()
    changed = tables.render(readme)[1]
    assert changed == [], f"README tables {changed} differ: run python workflows/readme_tables.py"
    blocks = {match["name"] for match in tables.BLOCK.finditer(readme)}
    assert blocks == set(tables.TABLES), "every renderer has its block in the README"


def test_a_hand_edited_number_is_caught_and_an_unknown_block_named():
    tables = _tables()
    readme = (ROOT / "README.md").read_text()
    edited = readme.replace("| teacher (CE from scratch) | ", "| teacher (CE from scratch) | 9", 1)
    assert tables.render(edited)[1] != []
    with pytest.raises(KeyError, match="no renderer"):
        tables.render("<!-- table: nonsense -->\nx\n<!-- /table -->")


def test_a_run_appends_its_table_rows_and_the_table_says_where_they_came_from(tmp_path, monkeypatch):
    import argparse
    import json
    from types import SimpleNamespace

    from kdray.config import Config, with_overrides
    from kdray.run import append_results
    from kdray.workflow import StepResult

    results = tmp_path / "quick.jsonl"
    cfg = with_overrides(Config(), {"workflow.results_file": str(results)})
    scores = {"teacher": {"exact_match": 75.5, "distinct_2": 0.232}, "student (xkd)": {"exact_match": 33.5}}
    lead = {"model": "student (xkd)", "lead": 3.0, "lead_lo": -1.5, "lead_hi": 7.5, "prompts": 200.0}
    evaluation = {"metric": "exact_match", "scores": scores, "lead": lead}
    steps = [
        StepResult("teacher", "k1", "d1", {}, True, 0.0),
        StepResult("evaluate", "k2", "d2", evaluation, False, 41.2),
    ]
    args = argparse.Namespace(config="q.yaml", overrides=["train.seed=1"])
    assert append_results(cfg, SimpleNamespace(steps=steps), args, wall_s=512.3) == 2
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["model"] for r in rows] == ["teacher", "student (xkd)"]
    assert "lead_vs_baseline" not in rows[0]  # the lead is the distilled student's, on its own row
    assert rows[1]["lead_vs_baseline"] == {"lead": 3.0, "lead_lo": -1.5, "lead_hi": 7.5, "prompts": 200.0}
    assert rows[0]["command"] == "kdray run --config q.yaml train.seed=1" and rows[0]["wall_s"] == 512.3
    assert rows[0]["steps_s"] == {"teacher": 0.0, "evaluate": 41.2} and {"commit", "cpu", "threads"} <= set(
        rows[0]
    )
    tables = _tables()
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    table = tables.run_table(results)
    assert "| teacher | 75.50 | 0.232 |" in table and "| student (xkd) | 33.50 | nan |" in table
    assert "`kdray run --config q.yaml train.seed=1`" in table and "512 s" in table
    assert "lead" not in table  # no SFT-only row in this run: no sentence about a lead over it
    sft = {"model": "student (SFT only)", "scores": {"exact_match": 30.5}}
    rows.insert(1, {**rows[0], **sft})
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = tables.run_table(results)
    assert (
        "student (xkd) leads student (SFT only) by +3.0 exact-match points on the same 200 problems (paired "
        "bootstrap 95% interval -1.5 to +7.5): within this evaluation's noise" in table
    )


def test_the_seeds_table_takes_each_data_seeds_latest_run_and_its_spread(tmp_path, monkeypatch):
    import json

    tables = _tables()
    monkeypatch.setattr(tables, "ROOT", tmp_path)

    def run(seed, wall, em, ce):
        common = {
            "command": f"kdray run data.seed={seed}",
            "commit": "abc",
            "wall_s": wall,
            "data_seed": seed,
        }
        return [{"model": m, "scores": {"exact_match": e, "heldout_ce": c}, **common}
                for m, e, c in zip(("teacher", "student"), em, ce, strict=True)]  # fmt: skip

    rows = run(0, 1.0, (10.0, 1.0), (0.5, 0.9)) + run(0, 2.0, (70.0, 30.0), (0.1, 0.3))
    rows += run(1, 3.0, (80.0, 40.0), (0.2, 0.5))
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = tables.seeds_table(path).splitlines()
    assert lines[0] == "| model | exact_match (seed 0, 1; mean ± sd) | heldout_ce (seed 0, 1; mean ± sd) |"
    # seed 0's earlier run (10.0, 1.0) is replaced by its later one
    assert lines[2] == "| teacher | 70 / 80 (75 ± 7.1) | 0.1 / 0.2 (0.15 ± 0.071) |"
    assert lines[3] == "| student | 30 / 40 (35 ± 7.1) | 0.3 / 0.5 (0.4 ± 0.14) |"


def test_the_seeds_table_gives_each_students_lead_over_sft_paired_by_seed(tmp_path, monkeypatch):
    import json

    tables = _tables()
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    scores = {
        0: {"student (SFT only)": 30.0, "student (xkd)": 33.0},
        1: {"student (SFT only)": 40.0, "student (xkd)": 41.0},
    }
    rows = [
        {
            "model": m,
            "scores": {"exact_match": v},
            "commit": "abc",
            "data_seed": seed,
            "command": f"kdray run data.seed={seed}",
            "wall_s": 1.0 + seed,
        }
        for seed, by_model in scores.items()
        for m, v in by_model.items()
    ]
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = tables.seeds_table(path, metrics=("exact_match",)).splitlines()
    # +3 and +1: mean +2, sd 1.4; the unpaired spreads (7.1 each) would hide a lead every seed shows
    assert lines[4] == "| student (xkd) − SFT only (same seed) | +3 / +1 (+2 ± 1.4) |"
    assert not any(line.startswith("| student (SFT only) −") for line in lines)


def test_the_variants_table_puts_each_overridden_run_beside_its_sft_twin(tmp_path, monkeypatch):
    import json

    tables = _tables()
    monkeypatch.setattr(tables, "ROOT", tmp_path)
    base = {"commit": "abc1234", "cpu": "Intel(R) Xeon(R)", "cpu_kernels": "AVX2", "threads": 2}
    base["metric"] = "exact_match"

    def run(command: str, wall: float, scores: dict[str, tuple[float, float]]) -> list[dict]:
        return [
            {
                **base,
                "command": command,
                "wall_s": wall,
                "model": m,
                "scores": {"exact_match": e, "heldout_ce": c},
            }
            for m, (e, c) in scores.items()
        ]

    q = "kdray run --config workflows/configs/quickstart.yaml"
    rows = run(f"{q} train.lr=3e-3 workflow.results_file=/tmp/a.jsonl", 1.0,
               {"teacher": (75.5, 0.02), "student (SFT only)": (33.5, 0.072), "student (xkd)": (35.5, 0.068)})  # fmt: skip
    rows += run(f"{q} workflow.baseline=false", 2.0, {"student (xkd)": (30.0, 0.08)})  # no twin: left out
    path = tmp_path / "variants.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = tables.variants_table(path).splitlines()
    assert lines[2] == "| `train.lr=3e-3` | Intel AVX2 | 75.5 | 33.5 / 35.5 (+2) | 0.072 / 0.068 (-0.004) |"
    assert len([line for line in lines if line.startswith("| `")]) == 1 and "results_file" not in "\n".join(
        lines
    )


def test_the_machines_table_keeps_each_machines_latest_plain_run_and_the_leads_spread(tmp_path, monkeypatch):
    import json

    tables = _tables()
    monkeypatch.setattr(tables, "ROOT", tmp_path)

    def run(
        command: str, cpu: str, kernels: str, seed: int, commit: str, scores: tuple[float, ...]
    ) -> list[dict]:
        common = {"command": command, "cpu": cpu, "cpu_kernels": kernels, "data_seed": seed, "commit": commit}
        common.update(wall_s=1.0, threads=2, metric="exact_match")
        models = ("teacher", "student (SFT only)", "student (xkd)")
        return [
            {**common, "model": m, "scores": {"exact_match": v}} for m, v in zip(models, scores, strict=True)
        ]

    q = "kdray run --config workflows/configs/quickstart.yaml"
    old = run(q, "AMD EPYC 9B14", "AVX2", 0, "aaa0001", (70.0, 20.0, 30.0))  # replaced by the later run
    rows = old + run(q, "AMD EPYC 9B14", "AVX2", 0, "aaa0002", (71.5, 24.5, 31.5))
    rows += run(
        f"{q} data.seed=1 workflow.workdir=w", "Intel(R) Xeon(R)", "AVX2", 1, "bbb0001", (82.5, 70.0, 66.0)
    )
    rows += run(
        f"{q} train.max_steps=600", "Intel(R) Xeon(R)", "AVX2", 0, "bbb0002", (82.5, 87.5, 75.0)
    )  # trains other
    rows += run(
        "kdray run --config other.yaml", "Intel(R) Xeon(R)", "AVX2", 0, "bbb0003", (1.0, 2.0, 3.0)
    )  # other
    portable = run(q, "Intel(R) Xeon(R)", "AVX2", 1, "bbb0004", (80.0, 60.0, 61.0))  # its own machine row
    rows += [{**r, "mkl_branch": "COMPATIBLE"} for r in portable]
    path = tmp_path / "runs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = tables.machines_table([path]).splitlines()
    assert lines[2:6] == [
        "| AMD AVX2 | 0 | aaa0002 | 71.5 | 24.5 | 31.5 | +7.0 |",
        "| Intel AVX2 | 1 | bbb0001 | 82.5 | 70.0 | 66.0 | -4.0 |",
        "| Intel AVX2, MKL COMPATIBLE | 1 | bbb0004 | 80.0 | 60.0 | 61.0 | +1.0 |",
        "| mean ± sd over 3 runs |  |  |  |  |  | +1.3 ± 5.5 |",
    ]
