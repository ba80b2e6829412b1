"""How a prompt and a response become token ids, for every model kdray trains or serves.

One home below both the data layer (which tokenizes training examples) and the teacher (which scores and
generates from the same prompts): the student is trained on exactly the token sequences its teacher
sees. The prompt is rendered with the model's own chat template and its assistant cue; the response is
its plain tokenization plus EOS.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["encode_prompt", "encode_response"]


def encode_prompt(tokenizer: Any, prompt: str, *, chat_template: bool = True) -> list[int]:
    """Prompt ids: the chat template with the assistant cue, or plain tokenization without a template."""
    if chat_template and getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        # transformers 5 returns a BatchEncoding, 4.x a plain list
        return [int(t) for t in (enc["input_ids"] if isinstance(enc, Mapping) else enc)]
    return [int(t) for t in tokenizer(prompt)["input_ids"]]


def encode_response(tokenizer: Any, response: str) -> list[int]:
    """Response ids without BOS or other added specials, followed by EOS."""
    if tokenizer.eos_token_id is None:
        raise ValueError(
            f"tokenizer {type(tokenizer).__name__} has no eos_token: responses must end with one"
        )
    return [int(t) for t in tokenizer(response, add_special_tokens=False)["input_ids"]] + [
        int(tokenizer.eos_token_id)
    ]
