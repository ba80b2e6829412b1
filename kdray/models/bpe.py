"""A byte-level BPE tokenizer trained in code on a task's own text: a second, real tokenizer family.

Cross-tokenizer distillation needs a teacher and a student that tokenise text differently. kdray's
character tokenizer is one family; this is the other, built the way SmolLM2's and GPT-2's are
(byte-level pre-tokenisation, "Ġ" for a leading space, digits split one by one, a ChatML template),
but trained in seconds on the examples at hand, so tests and demos need no download.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def bpe_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, *, min_frequency: int = 2, split_digits: bool = True
) -> Any:
    """A `PreTrainedTokenizerFast` with a byte-level BPE of about `vocab_size` tokens trained on `texts`.

    The 256 byte symbols and the special tokens come first, so `vocab_size` must exceed 256 + 3; what is
    left becomes merges of the most frequent pairs. `<|endoftext|>` is the EOS and padding token.
    `split_digits=False` lets numbers merge into multi-digit tokens, as GPT-2's BPE does (SmolLM2's, the
    default here, keeps one digit per token): the same text then splits differently on every number.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    floor = 256 + len(SPECIAL_TOKENS)
    if vocab_size <= floor:
        raise ValueError(f"vocab_size={vocab_size} leaves no merges: the bytes and specials take {floor}")
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    digits = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    tok.pre_tokenizer = pre_tokenizers.Sequence([*digits, byte_level])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast


def save_bpe_checkpoint(path: Any, tokenizer: Any, *, seed: int = 0, **model_kwargs: Any) -> Any:
    """Save a tiny causal LM (random weights, `kdray.models.tiny`) with `tokenizer` as an HF checkpoint."""
    from pathlib import Path

    from kdray.models.tiny import tiny_causal_lm

    model = tiny_causal_lm(len(tokenizer), seed=seed, **model_kwargs)
    for config in (model.config, model.generation_config):
        config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = tokenizer.eos_token_id
        config.bos_token_id = None
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
