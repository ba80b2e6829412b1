"""Sweep a config's `tune.search_space` with Ray Tune, sharing one teacher pass across the trials.

    python workflows/sweep.py --config workflows/configs/sweep_quickstart.yaml
    python workflows/sweep.py --config workflows/configs/sweep_quickstart.yaml tune.num_samples=16
    ray job submit --working-dir . -- python workflows/sweep.py --config workflows/configs/sweep_quickstart.yaml

The workflow's data, teacher and teacher_outputs steps run once (or are reused); every trial reads their
signal cache. Run the same command again after an interruption and the sweep resumes: finished trials
are kept, unfinished ones continue from their checkpoints. The best config is written beside the sweep,
ready for `workflows/xkd.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python workflows/sweep.py` from a checkout without `pip install -e .` (e.g. a job's working dir)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdray.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", *sys.argv[1:]]))
