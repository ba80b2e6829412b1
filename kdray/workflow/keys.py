"""What a step's cache key hashes, and where its directory lives.

Kept apart from the steps so that `kdray run --explain`, a sweep's search space and the tests can compute
keys without importing anything a step runs: the config sections and file fields each step reads, the
key's components and hash, and the `_DONE.json` / `_KEY.json` records of a step directory.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdray import __version__
from kdray.config import Config, config_to_dict
from kdray.workflow.base import StepResult

#: the config sections each step reads: its cache key hashes exactly these (and its inputs' keys)
STEP_SECTIONS: dict[str, tuple[str, ...]] = {
    "data": ("data",),
    "teacher": ("teacher", "data.max_prompt_tokens", "data.max_response_tokens", "data.chat_template"),
    "teacher_outputs": ("teacher", "data", "train.batch_size", "train.max_examples"),
    "distill": ("model", "objective", "train", "data", "teacher"),
    "baseline": ("model", "train", "data"),
    "evaluate": (
        "data",
        "workflow.eval_max_new_tokens",
        "workflow.samples",
        "workflow.lca_samples",
        "workflow.lca_temperature",
    ),
    "register": ("tracking.registered_model", "tracking.experiment"),
}
#: the config fields naming local files a step reads: its key hashes their contents (hub ids: nothing)
STEP_FILES: dict[str, tuple[str, ...]] = {
    "data": ("data.source",),  # every later step reads the data through the data step's key
    "teacher": ("teacher.name_or_path",),
    "distill": ("model.name_or_path",),
    "baseline": ("model.name_or_path",),
}
#: values of `*.name_or_path` that name no file: models built in code, the teacher's resolved model
_NOT_FILES = ("tiny", "teacher")
DONE = "_DONE.json"
KEY = "_KEY.json"


def _section(cfg_dict: Mapping[str, Any], dotted: str) -> Any:
    node: Any = cfg_dict
    for part in dotted.split("."):
        node = node[part]
    return node


def key_components(step: str, cfg: Config, inputs: Sequence[StepResult]) -> dict[str, Any]:
    """What a step's cache key hashes, by name: a hash per config section it reads (STEP_SECTIONS), the
    content fingerprint per file field it reads (STEP_FILES; None for a hub id or a model built in code),
    the package's code fingerprint and version, and its inputs' (step, key) pairs. Recorded in the step
    directory's `_KEY.json`, where `explain_steps` finds what changed since."""
    from kdray.data.cache import code_fingerprint, content_fingerprint, fingerprint

    d = config_to_dict(cfg)
    sections = {name: fingerprint([_section(d, name)])[:16] for name in STEP_SECTIONS[step]}
    if step == "teacher_outputs":  # of the objective, only what changes the teacher's outputs: a sweep
        wanted = teacher_outputs_wanted(cfg)  # over loss weights reuses one teacher pass
        sections["objective.teacher_outputs"] = fingerprint([wanted])[:16]
    files: dict[str, str | None] = {}
    for name in STEP_FILES.get(step, ()):
        value = _section(d, name)
        model_in_code = name.endswith(".name_or_path") and value in _NOT_FILES
        files[name] = None if model_in_code else content_fingerprint(value)
    return {
        "step": step,
        "sections": sections,
        "files": files,
        "code": code_fingerprint(),
        "version": __version__,
        "inputs": [[i.step, i.key] for i in inputs],
    }


def key_of(components: Mapping[str, Any]) -> str:
    """The cache key of a step from its `key_components`."""
    from kdray.data.cache import fingerprint

    return fingerprint([components])[:16]


def step_key(step: str, cfg: Config, inputs: Sequence[StepResult]) -> str:
    """Hash of the step name, the config sections and file contents it reads, its inputs' keys and the
    package's code (see `key_components`)."""
    return key_of(key_components(step, cfg, inputs))


def teacher_outputs_wanted(cfg: Config) -> dict[str, Any]:
    """What the teacher pass must produce for `cfg`: a signal (at which temperature), generations (how
    long, how sampled). Two configs that want the same share one teacher pass (a sweep's trials)."""
    from kdray.train.trainer import needs_generations, needs_signal
    from kdray.validate import teacher_temperature

    o = cfg.objective
    generations = needs_generations(cfg)
    signal = needs_signal(cfg)
    return {
        "signal": signal,
        "temperature": teacher_temperature(cfg) if signal else None,
        "generations": generations,
        "max_new_tokens": o.max_new_tokens if generations else None,
        "generation_temperature": o.generation_temperature if generations else None,
    }


def finished(directory: Path) -> dict[str, Any] | None:
    """The recorded outputs of a finished step directory, None when it is absent or unfinished."""
    done = directory / DONE
    return json.loads(done.read_text()) if done.is_file() else None


def cache_root(cfg: Config) -> Path:
    """Where step directories live: `workflow.cache_dir`, or `<workdir>/steps`."""
    return Path(cfg.workflow.cache_dir or Path(cfg.workflow.workdir) / "steps").expanduser().resolve()
