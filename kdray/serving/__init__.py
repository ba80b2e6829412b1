"""What kdray registers in MLflow, as models-from-code: each module here is logged as its model's code.

Why: a pickled Python object ties a registered model to the exact class that pickled it and makes MLflow
warn on every log; a code file is read and run at load time, with kdray itself shipped beside it
(`code_paths`). `model_file(name)` is the path `Tracker` logs.
"""

from __future__ import annotations

from pathlib import Path


def model_file(name: str) -> str:
    """The models-from-code file of `name` (`student` or `reward`)."""
    path = Path(__file__).resolve().parent / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"no models-from-code file {path}: expected 'student' or 'reward'")
    return str(path)
