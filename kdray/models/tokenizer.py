"""A character-level tokenizer built in code, for the tiny models of tests, demos and the generated tasks.

It is a real `PreTrainedTokenizerFast` with special tokens and a chat template, so every code path that
serves a hub model (chat templating, padding, decoding, save/load) runs on it unchanged.
"""

from __future__ import annotations

import string
from typing import Any

#: printable ASCII, newline (GSM8K answers are multi-line), the letters of the German side of
#: Multi30k, and the typographic quotes and dashes real GSM8K text uses.
DEFAULT_ALPHABET = string.printable[:95] + "\n" + "äöüÄÖÜßéèàç" + "’‘“”–—€°"
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def char_tokenizer(alphabet: str = DEFAULT_ALPHABET) -> Any:
    """One token per character of `alphabet` after the special tokens; unknown characters map to <unk>.

    Roles other than user/assistant (e.g. system) are spelled out character by character by the template.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(alphabet))  # de-duplicate, keep order
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *chars])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # [\s\S], not ".": a dot does not match newlines, and "\n\n" would become one unknown piece
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=list(SPECIAL_TOKENS[4:]),
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "right"
    return fast
