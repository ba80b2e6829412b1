"""Run the kdray workflow: data → teacher → teacher outputs → distill (+ SFT baseline) → evaluate → register.

    python workflows/xkd.py --config workflows/configs/quickstart.yaml
    python workflows/xkd.py --config workflows/configs/quickstart.yaml train.max_steps=50
    ray job submit --working-dir . -- python workflows/xkd.py --config workflows/configs/quickstart.yaml

Run directly, it starts a Ray instance of its own on this machine (or joins `--address` / $RAY_ADDRESS);
submitted as a Ray job, it joins the job's cluster. Finished steps are reused: run the same command again
after a crash and it resumes at the step that died.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python workflows/xkd.py` from a checkout without `pip install -e .` (e.g. a job's working dir)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
