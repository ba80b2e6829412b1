"""The `evaluate` step: the teacher, the SFT baseline and the student on the held-out split.

It also renders the evaluation table (`format_table`, which `kdray eval` prints too) and turns the
step's scores into the parent MLflow run's metrics (`summary_metrics`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kdray.workflow.base import StepContext, StepResult, read_jsonl, write_jsonl

#: the SFT-only student's row in the evaluation table (and in the results files the README reads)
BASELINE_LABEL = "student (SFT only)"


def evaluate_step(
    ctx: StepContext,
    data: StepResult,
    teacher: StepResult,
    student: StepResult,
    baseline: StepResult | None = None,
) -> dict[str, Any]:
    """Greedy held-out generations of the teacher, the SFT baseline and the student, scored for the
    task; sample generations and (X-KD) the reward heat-map go to MLflow. On exact-match tasks the two
    students also get the LCA uncertainty AUROCs (a second table; `workflow.lca_samples: 0` skips it)."""
    from kdray.eval.evaluate import TASK_METRIC, reference_answers, reward_rows, score_model
    from kdray.eval.metrics import exact_match_hits, paired_lead
    from kdray.eval.uncertainty import evaluate_models_lca, format_lca_table, lca_applies, not_applicable

    cfg = ctx.cfg
    records = read_jsonl(data.outputs["eval"])
    new_tokens = cfg.workflow.eval_max_new_tokens or cfg.data.max_response_tokens
    models = {"teacher": ("teacher", teacher.outputs["path"])} if teacher.outputs.get("path") else {}
    if baseline is not None:
        models["baseline"] = (BASELINE_LABEL, baseline.outputs["student"])
    models["student"] = (f"student ({cfg.objective.method})", student.outputs["student"])
    metric = TASK_METRIC[cfg.data.task]
    scores: dict[str, dict[str, float]] = {}
    texts_of: dict[str, list[str]] = {}
    samples: list[dict[str, Any]] = []
    for short, (label, path) in models.items():
        texts, scores[label] = score_model(
            path, records, task=cfg.data.task, max_new_tokens=new_tokens, chat_template=cfg.data.chat_template,
            max_prompt_tokens=cfg.data.max_prompt_tokens, max_response_tokens=cfg.data.max_response_tokens,
            desc=f"evaluating {label}",
        )  # fmt: skip
        texts_of[short] = texts
        if ctx.tracker is not None:
            ctx.tracker.log_metrics({f"{short}/{k}": v for k, v in scores[label].items()}, step=0)
        for r, text in list(zip(records, texts, strict=True))[: cfg.workflow.samples]:
            samples.append(
                {"model": label, "prompt": r["prompt"], "reference": r["response"], "output": text}
            )
    table = format_table(scores, metric, cfg.data.task, len(records))
    lead = None
    if metric == "exact_match" and "baseline" in texts_of:
        answers = reference_answers(records)
        base, own = (exact_match_hits(texts_of[k], answers) for k in ("baseline", "student"))
        lead = paired_lead(base, own, seed=cfg.data.seed)
        table += "\n\n" + lead_sentence(models["student"][0], models["baseline"][0], lead)
        if ctx.tracker is not None:
            ctx.tracker.log_metrics({f"student/{k}": v for k, v in lead.items()}, step=0)
    students = {short: models[short] for short in ("baseline", "student") if short in models}
    lca = evaluate_models_lca(
        students, records, task=cfg.data.task, samples=cfg.workflow.lca_samples,
        temperature=cfg.workflow.lca_temperature, max_new_tokens=new_tokens,
        chat_template=cfg.data.chat_template, seed=cfg.data.seed, directory=ctx.directory,
    )  # fmt: skip
    if lca:
        lca_scores = {students[short][0]: values for short, values in lca.items()}
        table += "\n\n" + format_lca_table(lca_scores, cfg.data.task, len(records), cfg.workflow.lca_samples)
    elif cfg.workflow.lca_samples and not lca_applies(cfg.data.task):
        table += "\n\n" + not_applicable(cfg.data.task)
    for short, values in lca.items():
        if ctx.tracker is not None:
            ctx.tracker.log_metrics({f"{short}/{k}": v for k, v in values.items() if k != "prompts"}, step=0)
            ctx.tracker.log_artifact(str(ctx.directory / f"lca_{short}.jsonl"))
    (ctx.directory / "table.md").write_text(table + "\n")
    write_jsonl(ctx.directory / "samples.jsonl", samples)
    rows = reward_rows(
        student.outputs["student"], records[: cfg.workflow.samples],
        max_prompt_tokens=cfg.data.max_prompt_tokens, max_response_tokens=cfg.data.max_response_tokens,
        chat_template=cfg.data.chat_template,
    )  # fmt: skip
    if ctx.tracker is not None:
        ctx.tracker.log_text(table, "table.md")
        ctx.tracker.log_artifact(str(ctx.directory / "samples.jsonl"))
        if rows:
            from kdray.plots import reward_heatmap

            ctx.tracker.log_figure(reward_heatmap(rows), "reward_heatmap.png")
    out = {"metric": metric, "scores": scores, "table": table, "reward_rows": len(rows), "lca": lca}
    return {**out, "lead": {"model": models["student"][0], **lead}} if lead else out


def format_table(scores: Mapping[str, Mapping[str, float]], metric: str, task: str, n: int) -> str:
    """The evaluation table as markdown, headline metric first."""
    extra = sorted({k for v in scores.values() for k in v} - {metric})
    head = f"| model ({task}, {n} held-out) | {metric} | " + " | ".join(extra) + " |"
    lines = [head, "|---|" + "---:|" * (1 + len(extra))]
    for label, values in scores.items():
        cells = [f"{values[metric]:.2f}"] + [f"{values.get(k, float('nan')):.3f}" for k in extra]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def lead_sentence(student: str, baseline: str, lead: Mapping[str, float]) -> str:
    """The evaluation's verdict in words: the paired lead of `student` over `baseline` (`paired_lead`),
    and whether its interval clears zero."""
    d, lo, hi, n = lead["lead"], lead["lead_lo"], lead["lead_hi"], int(lead["prompts"])
    verb = "leads" if d > 0 else "trails" if d < 0 else "ties"
    if lo > 0 or hi < 0:
        verdict = "beyond this evaluation's noise (the interval excludes 0)"
    else:
        verdict = "within this evaluation's noise (the interval includes 0)"
    return (
        f"{student} {verb} {baseline} by {d:+.1f} exact-match points on the same {n} problems (paired "
        f"bootstrap 95% interval {lo:+.1f} to {hi:+.1f}): {verdict}. That is one training run; the spread "
        "between seeds is measured by rerunning with other `data.seed` / `train.seed` values."
    )


def summary_metrics(evaluation: Mapping[str, Any]) -> dict[str, float]:
    """The evaluate step's scores as the parent run's metrics (`<model>/<metric>`, e.g.
    `student xkd/exact_match`), so the runs table of the experiment shows each run's result."""
    out = {
        f"{label}/{name}": value
        for label, values in evaluation.get("scores", {}).items()
        for name, value in values.items()
    }
    for short, values in (evaluation.get("lca") or {}).items():
        out.update({f"{short}/{k}": v for k, v in values.items() if isinstance(v, (int, float))})
    return out
