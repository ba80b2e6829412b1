"""Tokenization: chat-template prompts, response masks, truncation directions, padding, the Ray callable."""

from __future__ import annotations

import numpy as np
import pytest

from kdray.data import Tokenize, collate, tokenize_example
from kdray.data.tokenize import ragged, unpadded
from kdray.models.tokenizer import char_tokenizer
from kdray.train.batches import regularize_batch

PROMPT = "Tom has 5 apples. He buys 3 more. How many apples does Tom have now?"
RESPONSE = "He has 5 + 3 = 8 apples. #### 8"  # one line: see test_char_tokenizer_keeps_newlines


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def split_parts(example):
    ids, mask = np.array(example["input_ids"]), np.array(example["response_mask"])
    return ids[~mask].tolist(), ids[mask].tolist()


def test_mask_covers_exactly_the_response_and_eos(tok):
    ex = tokenize_example(tok, PROMPT, RESPONSE, max_prompt_tokens=512, max_response_tokens=512)
    prompt_ids, response_ids = split_parts(ex)
    n_prompt = len(prompt_ids)
    assert ex["response_mask"] == [False] * n_prompt + [True] * (len(RESPONSE) + 1)  # one token a character
    assert response_ids[-1] == tok.eos_token_id
    assert tok.decode(response_ids[:-1]) == RESPONSE
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
    )
    assert tok.decode(prompt_ids) == rendered == f"<|user|>{PROMPT}<|end|><|assistant|>"


def test_without_chat_template_the_prompt_is_plain_text(tok):
    ex = tokenize_example(
        tok, PROMPT, RESPONSE, max_prompt_tokens=512, max_response_tokens=512, chat_template=False
    )
    assert tok.decode(split_parts(ex)[0]) == PROMPT


def test_prompt_is_cut_from_the_left_and_response_from_the_right(tok):
    full = tokenize_example(tok, PROMPT, RESPONSE, max_prompt_tokens=512, max_response_tokens=512)
    cut = tokenize_example(tok, PROMPT, RESPONSE, max_prompt_tokens=20, max_response_tokens=6)
    full_prompt, _ = split_parts(full)
    prompt_ids, response_ids = split_parts(cut)
    assert prompt_ids == full_prompt[-20:]  # the question's end and the assistant cue survive
    assert tok.decode(prompt_ids).endswith("have now?<|end|><|assistant|>")
    assert tok.decode(response_ids) == RESPONSE[:6] and tok.eos_token_id not in response_ids
    assert len(cut["input_ids"]) == 26 and sum(cut["response_mask"]) == 6


def test_collate_pads_right_with_masks(tok):
    a = tokenize_example(tok, "Hi?", "Yes.", max_prompt_tokens=64, max_response_tokens=64)
    b = tokenize_example(tok, "A longer question?", "No.", max_prompt_tokens=64, max_response_tokens=64)
    batch = collate([a, b], pad_id=tok.pad_token_id)
    width = max(len(a["input_ids"]), len(b["input_ids"]))
    assert (
        batch["input_ids"].shape
        == batch["attention_mask"].shape
        == batch["response_mask"].shape
        == (2, width)
    )
    assert batch["input_ids"].dtype == np.int64 and batch["attention_mask"].dtype == bool
    n = len(a["input_ids"])
    assert batch["input_ids"][0, :n].tolist() == a["input_ids"]
    assert (batch["input_ids"][0, n:] == tok.pad_token_id).all()
    assert batch["attention_mask"].sum(1).tolist() == [n, len(b["input_ids"])]
    assert not (batch["response_mask"] & ~batch["attention_mask"]).any()  # padding never counts
    assert collate([a, b], tok.pad_token_id, width=100)["input_ids"].shape == (2, 100)
    with pytest.raises(ValueError, match="no examples"):
        collate([], 0)


def test_tokenize_gives_unpadded_rows_that_the_worker_pads_once(tok):
    prompts = np.array([PROMPT, "Hi?", "Sam has 2 pens. How many?"], dtype=object)
    responses = np.array([RESPONSE, "Yes.", "#### 2"], dtype=object)
    out = Tokenize(tok, max_prompt_tokens=64, max_response_tokens=64)(
        {"prompt": prompts, "response": responses, "id": np.array(["a", "b", "c"], dtype=object)}
    )
    assert out["id"].tolist() == ["a", "b", "c"]  # other columns pass through
    assert "attention_mask" not in out, "an unpadded row is all real tokens"
    expected = [
        tokenize_example(tok, p, r, max_prompt_tokens=64, max_response_tokens=64)
        for p, r in zip(prompts, responses, strict=True)
    ]
    assert [row.tolist() for row in out["input_ids"]] == [e["input_ids"] for e in expected]
    assert [row.tolist() for row in out["response_mask"]] == [e["response_mask"] for e in expected]
    assert [int(m.sum()) for m in out["response_mask"]] == [len(r) + 1 for r in responses]

    padded = regularize_batch(out, tok.pad_token_id)  # the worker's one padding
    assert np.array_equal(padded["input_ids"], collate(expected, tok.pad_token_id)["input_ids"])
    assert padded["attention_mask"].sum(1).tolist() == [len(e["input_ids"]) for e in expected]
    # a padded batch (a teacher's signal is padded to its batch) comes back as the same rows
    back = unpadded({**padded, "topk_ids": np.ones((3, padded["input_ids"].shape[1], 2), np.int32)})
    assert [r.tolist() for r in back["input_ids"]] == [e["input_ids"] for e in expected]
    assert [r.shape for r in back["topk_ids"]] == [(len(e["input_ids"]), 2) for e in expected]
    assert "attention_mask" not in back
    # rows of one length stay rows (not merged into a 2-D array), as Ray Data expects of a ragged column
    same = ragged([np.arange(3), np.arange(3)])
    assert same.dtype == object and same.shape == (2,)


def test_char_tokenizer_keeps_newlines_of_gsm8k_answers(tok):
    from kdray.data import generate_arithmetic

    response = generate_arithmetic(1, difficulty=2)[0]["response"]
    ex = tokenize_example(tok, "q", response, max_prompt_tokens=64, max_response_tokens=256)
    assert tok.decode(split_parts(ex)[1][:-1]) == response


def test_tokenize_loads_a_tokenizer_by_name():
    assert Tokenize("tiny").tokenizer.get_vocab() == char_tokenizer().get_vocab()


def test_smollm2_renders_its_own_chat_template_and_masks_the_response(smollm2_dir):
    from transformers import AutoTokenizer

    smol = AutoTokenizer.from_pretrained(smollm2_dir)
    ex = tokenize_example(smol, PROMPT, RESPONSE, max_prompt_tokens=256, max_response_tokens=256)
    prompt_ids, response_ids = split_parts(ex)
    rendered = smol.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=False
    )
    assert smol.decode(prompt_ids) == rendered
    assert rendered.endswith(f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n")
    assert response_ids[-1] == smol.eos_token_id and smol.decode(response_ids) == RESPONSE + smol.eos_token
    assert ex["response_mask"] == [False] * len(prompt_ids) + [True] * len(response_ids)
