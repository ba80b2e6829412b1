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


REWARD_HEAD_FILE = "reward_head.pt"


def export_student(model: Any, tokenizer: Any, path: str | Path, *, chat_template: bool = True) -> Path:
    """Save the student's LM as a normal HF checkpoint directory that any transformers user can load.

    A student trained on raw prompts (`chat_template=False`, the run's `data.chat_template`) is saved
    without its tokenizer's chat template: whoever loads it (`kdray eval`, vLLM, a transformers
    pipeline) renders a prompt through the template when there is one, and must then render it as the
    student learned it. A kdray Student's reward head (X-KD) goes beside it as `reward_head.pt`, which
    transformers ignores: the head is what the reward heat-map and AVA-style analyses read, not part of
    the served model.
    """
    import torch

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    lm = getattr(model, "lm", model)  # a kdray Student: the language model is the checkpoint
    lm.save_pretrained(path)
    template = tokenizer.chat_template
    tokenizer.chat_template = template if chat_template else None
    try:
        tokenizer.save_pretrained(path)
    finally:
        tokenizer.chat_template = template  # the training tokenizer is left as it was
    head = getattr(model, "head", None)
    if head is not None:
        state = {k: v.detach().cpu() for k, v in head.state_dict().items()}
        torch.save({"hidden_size": lm.config.hidden_size, "state_dict": state}, path / REWARD_HEAD_FILE)
    return path


def load_reward_head(path: str | Path) -> Any | None:
    """The RewardHead exported beside a student checkpoint, or None when the student has none."""
    import torch

    from kdray.models.reward_head import RewardHead

    file = Path(path) / REWARD_HEAD_FILE
    if not file.is_file():
        return None
    saved = torch.load(file, map_location="cpu", weights_only=True)
    head = RewardHead(int(saved["hidden_size"]))
    head.load_state_dict(saved["state_dict"])
    return head.eval()
