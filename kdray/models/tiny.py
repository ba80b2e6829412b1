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
