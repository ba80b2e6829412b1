"""The `data` step: read (or generate) the train and held-out splits once, as jsonl files.

Every later step reads the splits from this step's directory, so the data source is read, filtered and
counted once per change of the `data` section or of the source file's contents.
"""

from __future__ import annotations

from typing import Any

from kdray.workflow.base import StepContext, write_jsonl


def data_step(ctx: StepContext) -> dict[str, Any]:
    """Read (or generate) the train and held-out splits once; later steps read these jsonl files."""
    from kdray.data import read_config_split

    out: dict[str, Any] = {}
    for which in ("train", "eval"):
        result = read_config_split(ctx.cfg.data, which)  # type: ignore[arg-type]
        path = ctx.directory / f"{which}.jsonl"
        write_jsonl(path, result.records)
        print(f"[data] {which}: {result.summary()}", flush=True)
        out[which] = str(path)
        out[f"{which}_rows"] = len(result.records)
        out[f"{which}_malformed"] = len(result.malformed)
    if ctx.tracker is not None:
        ctx.tracker.log_metrics({k: v for k, v in out.items() if isinstance(v, int)}, step=0)
    return out
