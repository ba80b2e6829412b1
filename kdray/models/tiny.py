"""Tiny causal LMs built in code: real transformers models with no download, for tests and demos."""

from __future__ import annotations

from typing import Any

import torch


def tiny_causal_lm(
    vocab_size: int = 256,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_positions: int = 512,
    seed: int = 0,
    **config_overrides: Any,
) -> Any:
    """A Llama-architecture `LlamaForCausalLM` in float32 with seeded random weights.

    Llama because it is what the real students and teachers (SmolLM2, Qwen-style) look like: RMSNorm,
    rotary positions, gated MLP, a separate LM head. The seed is local (the global RNG is untouched).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **config_overrides,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.float()


def save_tiny_checkpoint(
    path: Any, *, vocab_size: int | None = None, seed: int = 0, **model_kwargs: Any
) -> Any:
    """Save a tiny model with the char tokenizer as a normal HF checkpoint directory; returns the path.

    Tests and demos load it back through the same `from_pretrained` path a hub model takes.
    """
    from pathlib import Path

    from kdray.models.tokenizer import char_tokenizer

    tokenizer = char_tokenizer()
    model = tiny_causal_lm(vocab_size or len(tokenizer), seed=seed, **model_kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
