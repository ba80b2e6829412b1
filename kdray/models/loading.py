"""Load students and teachers: hub names, local checkpoints, GGUF files, tiny models built in code.

The hub path is real code (transformers `from_pretrained`), tested here on local directories because
these machines cannot reach a hub. Errors say what was looked for and where.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

Dtype = str  # "auto" | "float32" | "bfloat16"


class ModelNotFoundError(FileNotFoundError):
    """A model name or path could not be resolved; the message lists every place that was searched."""


def _looks_local(name: str) -> bool:
    # hub ids are "org/name"; anything anchored like a filesystem path is meant to be local
    return name.startswith(("/", "./", "../", "~"))


def hub_cache_dir() -> Path:
    """Where transformers caches hub downloads (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def resolve_model_path(name_or_path: str, gguf_file: str | None = None) -> str:
    """A local directory as an absolute path, a hub id unchanged; a missing local path is an error now.

    Catching a typo here costs a second; catching it after the Ray actors were scheduled costs minutes.
    """
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if gguf_file and not (path / gguf_file).is_file():
            found = sorted(p.name for p in path.glob("*.gguf"))
            raise ModelNotFoundError(
                f"GGUF file {gguf_file!r} not found in {path.resolve()}; .gguf files there: {found or 'none'}"
            )
        return str(path.resolve())
    if _looks_local(name_or_path) or path.exists():
        raise ModelNotFoundError(
            f"model path {name_or_path!r} does not exist (looked at {path.resolve()}); pass a directory "
            "holding config.json and the weights, or a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'"
        )
    return name_or_path


def torch_dtype(dtype: Dtype, device: str) -> Any:
    """`auto`: bfloat16 on CUDA, float32 on CPU (bf16 matmuls run ~100x slower on these CPUs)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def default_device() -> str:
    """The first CUDA device when there is one, else the CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_tokenizer(name_or_path: str, *, revision: str | None = None, gguf_file: str | None = None) -> Any:
    """The tokenizer (with its chat template) of a model, without loading any weights."""
    from transformers import AutoTokenizer

    source = resolve_model_path(name_or_path, gguf_file)
    try:
        return AutoTokenizer.from_pretrained(source, revision=revision, gguf_file=gguf_file)
    except OSError as err:
        raise _not_found(name_or_path, err) from err


def load_model_config(name_or_path: str, *, revision: str | None = None, gguf_file: str | None = None) -> Any:
    """The model's transformers config (vocab size, layers, context), without loading any weights."""
    from transformers import AutoConfig

    source = resolve_model_path(name_or_path, gguf_file)
    try:
        return AutoConfig.from_pretrained(source, revision=revision, gguf_file=gguf_file)
    except OSError as err:
        raise _not_found(name_or_path, err) from err


def _not_found(name: str, err: OSError) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"could not load model {name!r}: not a local directory ({Path(name).expanduser().resolve()} does not "
        f"exist) and not in the hub cache ({hub_cache_dir()}) or reachable on the hub: {err}"
    )


def load_causal_lm(
    name_or_path: str,
    *,
    revision: str | None = None,
    gguf_file: str | None = None,
    dtype: Dtype = "auto",
    device: str | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode on `device`; GGUF weights are dequantised by transformers."""
    from transformers import AutoModelForCausalLM

    device = device or default_device()
    source = resolve_model_path(name_or_path, gguf_file)
    tokenizer = load_tokenizer(name_or_path, revision=revision, gguf_file=gguf_file)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source, revision=revision, gguf_file=gguf_file, dtype=torch_dtype(dtype, device)
        )
    except OSError as err:
        raise _not_found(name_or_path, err) from err
    return model.to(device).eval(), tokenizer


def layer_pruned_student(teacher: Any, keep_every: int) -> Any:
    """A student initialised from the teacher keeping every `keep_every`-th decoder layer (0, m, 2m, ...).

    Embeddings, final norm and LM head are copied; the layers kept are deep copies, so training the
    student never touches the teacher. Works for the Llama/Qwen/Mistral layout (`model.model.layers`).
    """
    if keep_every < 1:
        raise ValueError(f"keep_every={keep_every!r} must be >= 1")
    layers = getattr(getattr(teacher, "model", None), "layers", None)
    if layers is None:
        raise ValueError(
            f"{type(teacher).__name__} has no `model.layers`; layer pruning needs a decoder stack"
        )
    keep = list(range(0, len(layers), keep_every))
    student = copy.deepcopy(teacher)
    from torch import nn

    student.model.layers = nn.ModuleList(student.model.layers[i] for i in keep)
    for new_index, layer in enumerate(student.model.layers):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_index  # the KV cache indexes layers by this
    student.config.num_hidden_layers = len(keep)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    return student
