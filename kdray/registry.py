"""The student (and its reward model) as MLflow models: logged into the run, registered by name.

Why apart from `kdray.tracking`: tracking sends a run's metrics, params and files without ever blocking
training; registering a model is the workflow's last step, synchronous (it needs the server), and
packages code (`kdray/serving/`) with the weights. Both go through the run's `Tracker` (its store, run
and experiment), so a registered model lands in the run's own experiment and store.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from kdray.runs import retry
from kdray.tracking import Tracker

__all__ = ["log_reward_model", "log_student"]

_FLUENT_LOCK = threading.Lock()


def log_student(
    tracker: Tracker,
    export_dir: str | Path,
    *,
    registered_model: str | None = None,
    artifact_path: str = "student",
    max_new_tokens: int = 64,
    chat_template: bool = True,
    reward_tokenization: Mapping[str, Any] | None = None,
) -> str | None:
    """Log an exported student (HF `save_pretrained` dir) as a pyfunc model; register it if named.
    It answers prompts as the evaluate step does: greedy, `max_new_tokens`, the chat template on or
    off as in training. kdray's own code travels with the model (`code_paths`), so loading it needs
    only its pip requirements.

    Synchronous (registration needs the server) and retried 3 times. Returns the registered version,
    None when not registered or on a non-zero rank. The model's code is `kdray/serving/student.py`.
    An export that carries a reward head (X-KD, AVA) is also registered as `<registered_model>-reward`
    (`log_reward_model`, with `reward_tokenization`), beside the policy in the same run.
    """
    if not tracker.active:
        return None
    export_dir = Path(export_dir)
    if not (export_dir / "config.json").is_file():
        raise FileNotFoundError(f"{export_dir} is not a save_pretrained directory (no config.json)")
    tracker.flush(timeout_s=30)  # the logged model copies the run's metrics: send them first
    version = _log_pyfunc(
        tracker, export_dir, artifact_path, "student",
        {"max_new_tokens": max_new_tokens, "chat_template": chat_template}, registered_model, "the student",
    )  # fmt: skip
    from kdray.models.build import REWARD_HEAD_FILE

    if registered_model is not None and (export_dir / REWARD_HEAD_FILE).is_file():
        log_reward_model(
            tracker,
            export_dir,
            registered_model=f"{registered_model}-reward",
            tokenization=reward_tokenization,
        )
    return version


def log_reward_model(
    tracker: Tracker,
    export_dir: str | Path,
    *,
    registered_model: str | None = None,
    artifact_path: str = "reward",
    tokenization: Mapping[str, Any] | None = None,
) -> str | None:
    """Log the reward model of an export with a reward head as a pyfunc, r(x, y) = Σ_t μ_t per
    `{prompt, response}` row (`kdray/serving/reward.py`); register it if named.

    The logged artifact is the whole export (the head reads the student's hidden states).
    `tokenization` holds the training's `max_prompt_tokens`, `max_response_tokens`, `chat_template`
    (default: the `data` section's defaults), fixed in the logged model's config.
    """
    if not tracker.active:
        return None
    from kdray.reward import resolve_model_dir

    export_dir = resolve_model_dir(export_dir)  # a model with a head, or a clear error
    return _log_pyfunc(
        tracker, export_dir, artifact_path, "reward", dict(tokenization or {}), registered_model,
        "the reward model",
    )  # fmt: skip


def _log_pyfunc(
    tracker: Tracker,
    export_dir: Path,
    artifact_path: str,
    model: str,
    model_config: Mapping[str, Any],
    registered_model: str | None,
    what: str,
) -> str | None:
    import mlflow

    from kdray.serving import model_file

    def log() -> Any:
        with _fluent_tracking_uri(tracker.tracking_uri, tracker.experiment_id):
            return mlflow.models.Model.log(
                artifact_path=None,  # deprecated in MLflow 3 (but still positional): `name` replaces it
                name=artifact_path,
                flavor=mlflow.pyfunc,
                run_id=tracker.run_id,  # no mlflow.start_run: ending it would mark our run FINISHED
                python_model=model_file(model),  # models-from-code: no pickled object
                artifacts={"student": str(export_dir)},
                model_config=dict(model_config),
                pip_requirements=_student_requirements(),  # skips inference (a subprocess load)
                code_paths=[str(Path(__file__).resolve().parent)],  # the kdray package, as it ran
            )

    info = retry(log, attempts=3, what=f"logging {what} to {tracker.tracking_uri}")
    if registered_model is None:
        return None

    def register() -> str:
        with _fluent_tracking_uri(tracker.tracking_uri):
            return str(mlflow.register_model(info.model_uri, registered_model).version)

    return retry(register, attempts=3, what=f"registering {registered_model!r} at {tracker.tracking_uri}")


@contextmanager
def _fluent_tracking_uri(uri: str, experiment_id: str | None = None) -> Iterator[None]:
    """Model logging reads mlflow's process-global tracking URI and experiment: point them at ours for
    this call only (else MLflow 3 files the logged model under the Default experiment, and a local
    store's artifacts under ./mlruns of the current directory)."""
    import mlflow

    wanted = {"MLFLOW_TRACKING_URI": uri}
    if experiment_id is not None:
        wanted["MLFLOW_EXPERIMENT_ID"] = experiment_id
    with _FLUENT_LOCK:
        saved_env = {key: os.environ.get(key) for key in wanted}
        previous = mlflow.get_tracking_uri()
        os.environ.update(wanted)
        pinned = mlflow.get_tracking_uri() != uri  # an explicit mlflow.set_tracking_uri() beats the env var
        if pinned:
            mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            if pinned:
                mlflow.set_tracking_uri(previous)
            for key, value in saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _student_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in ("mlflow", "torch", "transformers", "tokenizers", "numpy", "safetensors"):
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            out.append(name)
    return out
