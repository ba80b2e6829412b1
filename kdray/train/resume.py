"""Resume a run whose Ray Train snapshot file a full disk damaged or removed, from its own last intact
checkpoint.

Why: Ray Train (v2) rewrites `checkpoint_manager_snapshot.json` after every checkpoint, in place. A disk
that fills up at that moment leaves the file empty (every later run of the same name then refuses to
start: CheckpointManagerInitializationError "Expecting value: line 1 column 1 (char 0)") or no file at
all (the next run silently starts over from step 1), although the checkpoint directories beside it are
intact (`workflows/faults.py`, fault `disk_full`). A kdray checkpoint is one `state.pt` holding model,
optimizer, RNG and the data position, so the latest one that loads is a correct place to resume: a
damaged snapshot is moved aside (Ray starts a fresh one) and the training loop restores that directory
itself (`LoopSpec.run_dir`).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)

SNAPSHOT = "checkpoint_manager_snapshot.json"  # ray.train.v2._internal.constants, not a public name


def recover_damaged_snapshot(run_dir: str | Path) -> Path | None:
    """The checkpoint directory to resume from when Ray Train cannot say: its snapshot in `run_dir` is
    not valid JSON (moved aside as `*.damaged-<time>`) or missing beside `checkpoint_*` directories.
    None when the snapshot is valid (Ray resumes by itself; nothing is touched) or no checkpoint is
    intact (the run starts over, with a warning if there were any)."""
    run_dir = Path(run_dir)
    snapshot = run_dir / SNAPSHOT
    if snapshot.is_file():
        try:
            json.loads(snapshot.read_bytes().decode("utf-8"))
            return None
        except ValueError:  # JSONDecodeError and UnicodeDecodeError both are
            aside = snapshot.with_name(f"{SNAPSHOT}.damaged-{int(time.time())}")
            snapshot.rename(aside)
            what = f"damaged (a full disk while it was written?); moved to {aside.name}"
    elif any(run_dir.glob("checkpoint_*")):
        what = "missing beside its checkpoints (a full disk while it was written?)"
    else:
        return None
    latest = latest_intact_checkpoint(run_dir)
    logger.warning(
        "Ray Train's run snapshot %s is %s. %s", snapshot, what,
        f"Resuming from {latest}." if latest else "No intact checkpoint is left: the run starts over.",
    )  # fmt: skip
    return latest


def latest_intact_checkpoint(run_dir: str | Path) -> Path | None:
    """The `checkpoint_*` directory whose `state.pt` loads and is furthest along (its loop step); one cut
    short by a full disk does not load and is passed over."""
    import torch

    best, best_step = None, -1
    for state in sorted(Path(run_dir).glob("checkpoint_*/state.pt")):
        try:
            step = int(torch.load(state, map_location="cpu", weights_only=True)["loop"]["step"])
        except Exception as err:  # a truncated zip, a missing key: not a checkpoint to resume from
            logger.warning("checkpoint %s does not load (%s); passed over", state.parent, err)
            continue
        if step > best_step:
            best, best_step = state.parent, step
    return best
