"""The console of a run: kdray's lines by default, the libraries' chatter only with KDRAY_VERBOSE."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kdray.models.tiny import save_tiny_checkpoint
from tests.servers import subprocess_env

pytest.importorskip("ray")

# a Ray worker loads a checkpoint with transformers and logs a Ray Data dataset, as the workflow's do
SCRIPT = """
import sys
import time
from kdray.run import init_ray
init_ray(quiet=False)
import ray

@ray.remote
def load(path):
    import ray.data
    from kdray.models.loading import load_causal_lm
    ray.data.DataContext.get_current().enable_progress_bars = False  # as the workflow's steps run
    load_causal_lm(path, device="cpu")
    ray.data.range(4).materialize()
    return "loaded"

print("[kdray]", ray.get(load.remote(sys.argv[1])), flush=True)
time.sleep(2)  # worker logs reach the driver through Ray's log monitor, which polls
ray.shutdown()
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("m") / "tiny", hidden_size=32, num_layers=1)


@pytest.mark.parametrize("verbose", [False, True])
def test_library_progress_and_info_lines_only_when_verbose(checkpoint, verbose):
    env = {
        k: v
        for k, v in subprocess_env().items()
        if k not in ("KDRAY_VERBOSE", "HF_HUB_DISABLE_PROGRESS_BARS")
    }
    if verbose:
        env["KDRAY_VERBOSE"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(checkpoint)], env=env, capture_output=True, text=True, timeout=300
    )
    console = out.stdout + out.stderr
    assert out.returncode == 0, console[-3000:]
    assert "[kdray] loaded" in console
    # lines logged before the dataset's last block: Ray Data's closing line can race the shutdown
    noisy = ("Loading weights", "Started a local Ray instance", "Execution plan of Dataset")
    shown = [line for line in noisy if line in console]
    assert shown == (list(noisy) if verbose else []), console[-3000:]
