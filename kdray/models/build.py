"""Build the student named by the config: a tiny model, a pretrained checkpoint, a layer-pruned copy
of the teacher, or random weights in a named architecture. Flat arguments, no config objects."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdray.models.loading import (
    layer_pruned_student,
    load_causal_lm,
    load_model_config,
    load_tokenizer,
    torch_dtype,
)


def build_student(
    name_or_path: str,
    *,
    init: str = "pretrained",
    teacher_path: str | None = None,
    keep_every: int | None = None,
    tiny_layers: int = 2,
    tiny_hidden: int = 64,
    tiny_vocab: int | None = None,
    revision: str | None = None,
    gguf_file: str | None = None,
    dtype: str = "auto",
    device: str = "cpu",
    seed: int = 0,
) -> tuple[Any, Any]:
    """(model, tokenizer) of the student, in train mode on `device`.

    `tiny` builds a small Llama in code with the teacher's tokenizer (or the char tokenizer when there is
    no teacher), so it shares the teacher's vocabulary by construction.
    """
    if name_or_path == "tiny":
        from kdray.models.tiny import tiny_causal_lm
        from kdray.models.tokenizer import char_tokenizer

        tokenizer = (
            load_tokenizer(teacher_path) if teacher_path and teacher_path != "tiny" else char_tokenizer()
        )
        heads = max(1, tiny_hidden // 32)
        model = tiny_causal_lm(
            tiny_vocab or len(tokenizer),
            hidden_size=tiny_hidden,
            num_layers=tiny_layers,
            num_heads=heads,
            seed=seed,
        )
        _set_special_ids(model, tokenizer)
    elif init == "layer_pruned":
        if not teacher_path or keep_every is None:
            raise ValueError("model.init=layer_pruned needs the teacher's path and model.keep_every")
        teacher, tokenizer = load_causal_lm(teacher_path, dtype=dtype, device=device)
        model = layer_pruned_student(teacher, keep_every)
        del teacher
    elif init == "scratch":
        import torch
        from transformers import AutoModelForCausalLM

        config = load_model_config(name_or_path, revision=revision, gguf_file=gguf_file)
        tokenizer = load_tokenizer(name_or_path, revision=revision, gguf_file=gguf_file)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype, device))
    else:
        model, tokenizer = load_causal_lm(
            name_or_path, revision=revision, gguf_file=gguf_file, dtype=dtype, device=device
        )
    return model.to(device).train(), tokenizer


def _set_special_ids(model: Any, tokenizer: Any) -> None:
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, attr, None)
        setattr(model.config, attr, value)
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, attr, value)


def export_student(model: Any, tokenizer: Any, path: str | Path) -> Path:
    """Save the student's LM (never the reward head) as a normal HF checkpoint directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lm = getattr(model, "lm", model)  # a kdray Student: export only its language model
    lm.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
