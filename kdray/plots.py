"""Figures logged with a run or committed with a benchmark: learning curves, sweeps, the reward head's
per-token heat-map, and quality against diversity.

Built on `matplotlib.figure.Figure` directly (no pyplot): no global figure registry, no GUI backend, safe
in Ray workers and threads; `Tracker.log_figure` renders them to PNG with Agg.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from kdray.runs import finite_number

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["learning_curves", "quality_diversity", "reward_heatmap", "search_plot"]

# whitespace tokens are invisible in a cell: show them as symbols
_VISIBLE = {" ": "␣", "\n": "⏎", "\t": "⇥", "": "∅"}


def learning_curves(history: Sequence[Mapping[str, Any]], keys: Sequence[str] | None = None) -> Figure:
    """One subplot per metric family against "step": `loss`, `loss/xkd` and `eval_loss` share the "loss" axes.

    `history` holds one dict per logged step; a key missing (or not finite) at a step is simply not drawn
    there, so eval metrics logged every N steps appear as points only where they were measured.
    """
    from matplotlib.figure import Figure

    if keys is None:
        keys = list(dict.fromkeys(k for row in history for k in row if k != "step"))
    families: dict[str, list[tuple[str, list[float], list[float]]]] = {}
    for key in keys:
        points = [
            (row.get("step", i), v)
            for i, row in enumerate(history)
            if (v := finite_number(row.get(key))) is not None
        ]
        if points:
            steps, values = zip(*points, strict=True)
            families.setdefault(_family(key), []).append((key, list(steps), list(values)))
    rows = max(1, len(families))
    fig = Figure(figsize=(8, 2.4 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    for ax, (family, series) in zip(
        axes, families.items(), strict=False
    ):  # one empty axes when nothing was logged
        for key, steps, values in series:
            is_eval = key.startswith("eval_")
            marker = "o" if is_eval or len(steps) == 1 else None
            ax.plot(steps, values, marker=marker, linestyle="--" if is_eval else "-", label=key)
        ax.set_ylabel(family)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    if not families:
        axes[0].text(0.5, 0.5, "no metrics logged", ha="center", va="center", transform=axes[0].transAxes)
    axes[-1].set_xlabel("step")
    return fig


_STATUS_STYLE = {"completed": ("o", "tab:blue"), "stopped early": ("x", "tab:orange")}


def search_plot(trials: Sequence[Mapping[str, Any]], metric: str, types: Mapping[str, str]) -> Figure:
    """A sweep at a glance: the metric (last reported) against each searched value, one subplot per
    dimension; trials that ran to the end and trials ASHA stopped early drawn differently, failed ones
    counted in the title. Log-uniform dimensions get a log axis; choices are spread as categories."""
    from matplotlib.figure import Figure

    dims = list(types)
    n = max(1, len(dims))
    fig = Figure(figsize=(4.2 * n, 3.6), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    failed = sum(1 for t in trials if t.get("status") == "failed")
    for ax, dim in zip(axes, dims, strict=False):
        categorical = types[dim] in ("choice", "grid")
        levels = sorted({str(t["config"].get(dim)) for t in trials}) if categorical else []
        for status, (marker, color) in _STATUS_STYLE.items():
            xs, ys = [], []
            for t in trials:
                y = finite_number(t.get("metric"))
                if t.get("status") != status or y is None:
                    continue
                value = t["config"].get(dim)
                xs.append(levels.index(str(value)) if categorical else value)
                ys.append(y)
            if xs:
                ax.scatter(xs, ys, marker=marker, color=color, label=status)
        if categorical:
            ax.set_xticks(range(len(levels)), levels, rotation=20)
        elif types[dim] == "loguniform":
            from matplotlib.ticker import NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap
        ax.set_xlabel(dim)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small", loc="best")
    title = f"{len(trials)} trials, {metric} at each trial's last evaluation"
    fig.suptitle(title + (f" ({failed} failed, not drawn)" if failed else ""))
    return fig


def reward_heatmap(
    rows: Sequence[tuple[Sequence[str], Sequence[float]]],
    title: str = "Reward head: per-token posterior mean",
    *,
    max_tokens: int = 48,
) -> Figure:
    """Rows = examples, cells = response tokens coloured by the reward head's mean μ and labelled with the token.

    The colormap is diverging and symmetric around 0, so the sign of μ reads off the hue. Rows longer than
    `max_tokens` are cut (the title says so) to keep the labels legible; padding cells stay blank.
    """
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    for i, (tokens, mus) in enumerate(rows):
        if len(tokens) != len(mus):
            raise ValueError(f"row {i}: {len(tokens)} tokens but {len(mus)} reward means; need one per token")
    longest = max((len(tokens) for tokens, _ in rows), default=0)
    width = max(1, min(max_tokens, longest))
    grid = np.full((max(1, len(rows)), width), np.nan)
    for i, (_, mus) in enumerate(rows):
        values = np.asarray(list(mus)[:width], dtype=float)
        grid[i, : len(values)] = values
    finite = grid[np.isfinite(grid)]
    bound = float(np.abs(finite).max()) if finite.size else 1.0
    bound = bound or 1.0  # all zeros: any symmetric range centres 0

    fig = Figure(figsize=(max(6.0, 0.45 * width + 2.0), 0.55 * grid.shape[0] + 1.8), layout="constrained")
    ax = fig.subplots()
    cmap = colormaps["RdYlGn"].with_extremes(bad="white")
    image = ax.imshow(grid, cmap=cmap, norm=Normalize(-bound, bound), aspect="auto", interpolation="nearest")
    for i, (tokens, _) in enumerate(rows):
        for j, token in enumerate(list(tokens)[:width]):
            ax.text(j, i, _label(token), ha="center", va="center", fontsize=7, clip_on=True)
    ax.set_yticks(range(grid.shape[0]), [f"ex {i}" for i in range(grid.shape[0])])
    ax.set_xlabel("response token")
    ax.set_title(title + (f" (first {width} tokens)" if longest > width else ""))
    fig.colorbar(image, ax=ax, label="reward posterior mean μ")
    return fig


def quality_diversity(
    curves: Mapping[str, Sequence[Mapping[str, float]]], *, quality: str = "quality (%)", title: str = ""
) -> Figure:
    """One curve per model: sample quality against distinct-2 over sampling temperatures
    (`kdray.eval.diversity.diversity_curve` rows), each point labelled with its temperature. Up and to the
    right is better: good samples that still differ from each other."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 5.5), layout="constrained")
    ax = fig.subplots()
    colors = colormaps["tab20"].colors  # more curves than the default cycle's 10 colours
    for i, (label, rows) in enumerate(curves.items()):
        rows = sorted(rows, key=lambda r: r["temperature"])
        xs, ys = [r["distinct_2"] for r in rows], [r["quality"] for r in rows]
        style = {"color": colors[(2 * i) % 20 + (2 * i) // 20 % 2], "linestyle": "-" if i < 10 else "--"}
        (line,) = ax.plot(xs, ys, marker="o", label=label, **style)
        for r, x, y in zip(rows, xs, ys, strict=True):
            ax.annotate(f"{r['temperature']:g}", (x, y), textcoords="offset points", xytext=(3, 3),
                        fontsize="x-small", color=line.get_color())  # fmt: skip
    ax.set_xlabel("distinct-2 of a prompt's samples (higher = more diverse)")
    ax.set_ylabel(quality)
    ax.set_title(title or "quality against diversity (points: sampling temperature)", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def _family(key: str) -> str:
    base = key.removeprefix("eval_")
    return base.split("/", 1)[0]


def _label(token: str) -> str:
    text = "".join(_VISIBLE.get(ch, ch) for ch in token) if token.strip() == "" else token
    text = text or _VISIBLE[""]
    return text if len(text) <= 6 else text[:5] + "…"
