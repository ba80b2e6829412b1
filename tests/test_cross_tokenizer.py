"""Cross-tokenizer distillation math: alignment by text, group merging, ULD and GOLD's hybrid loss.

References are brute force from the definitions (numpy, explicit loops), real tokenizers throughout:
SmolLM2-135M's byte-level BPE against kdray's character tokenizer.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from kdray.losses.alignment import align_tokens, normalise_offsets, response_groups, response_offsets
from kdray.losses.cross_tokenizer import (
    gold_loss,
    merge_groups,
    topk_to_dense,
    uld_batch,
    uld_loss,
    vocab_map,
)
from kdray.losses.divergences import jsd_from_logprobs
from kdray.models.prompts import encode_response
from kdray.models.tokenizer import char_tokenizer

# real lines of ../shared/data: Multi30k (German) and GSM8K (digits, typographic apostrophe, newlines)
SENTENCES = [
    "Eine Gruppe von Männern lädt Baumwolle auf einen Lastwagen",
    "Ein Mann schläft in einem grünen Raum auf einem Sofa.",
    "Ein Mann mit beginnender Glatze, der eine rote Rettungsweste trägt, sitzt in einem kleinen Boot.",
    "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day "
    "at the farmer’s market.\n#### 18",
    "A robe takes 2 bolts of blue fiber and half that much white fiber.  How many bolts in total does it take?",
    "  Über 3 Äpfel für 1,50 € kaufen ",
]


@pytest.fixture(scope="module")
def smol(smollm2_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def chars():
    return char_tokenizer()


def logprobs(*shape: int, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(scale * torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


# ---- alignment -----------------------------------------------------------------------------------


def spans_from_cuts(cuts: list[int]) -> list[tuple[int, int]]:
    return list(zip([0, *cuts[:-1]], cuts, strict=True))


def group_span(offsets: list[tuple[int, int]], group: list[int]) -> tuple[int, int]:
    return offsets[group[0]][0], offsets[group[-1]][1]


def test_align_tokens_cuts_exactly_where_both_sides_cut():
    """Random partitions of a text: groups partition both token lists and the text, each covers the same
    span on both sides, and the group boundaries are exactly the common cut points (the finest possible)."""
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 40)
        s_cuts = sorted({*rng.sample(range(1, n + 1), rng.randint(1, n)), n})
        t_cuts = sorted({*rng.sample(range(1, n + 1), rng.randint(1, n)), n})
        s_off, t_off = spans_from_cuts(s_cuts), spans_from_cuts(t_cuts)
        groups = align_tokens(s_off, t_off)
        assert [k for s, _ in groups for k in s] == list(range(len(s_off)))
        assert [k for _, t in groups for k in t] == list(range(len(t_off)))
        spans = [group_span(s_off, s) for s, _ in groups]
        assert spans == [group_span(t_off, t) for _, t in groups]
        assert spans[0][0] == 0 and spans[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
        assert [end for _, end in spans] == sorted(set(s_cuts) & set(t_cuts))


def test_identical_tokenisations_align_one_to_one(smol, chars):
    for tok in (smol, chars):
        offsets = response_offsets(tok, SENTENCES[1])
        assert align_tokens(offsets, offsets) == [([i], [i]) for i in range(len(offsets))]


def test_a_word_split_in_two_on_one_side():
    # "unhappy day": student "un" + "happy" + " day", teacher "unhappy" + " day"
    student, teacher = [(0, 2), (2, 7), (7, 11)], [(0, 7), (7, 11)]
    assert align_tokens(student, teacher) == [([0, 1], [0]), ([2], [1])]
    assert align_tokens(teacher, student) == [([0], [0, 1]), ([1], [2])]


def test_leftovers_form_a_last_group_and_one_sided_ones_are_dropped():
    # the teacher stops at 5, the student at 6: the ends never meet again, the rest is one group
    assert align_tokens([(0, 3), (3, 6)], [(0, 3), (3, 4), (4, 5)]) == [([0], [0]), ([1], [1, 2])]
    # the student has a token past everything the teacher covers: that group would be one-sided
    assert align_tokens([(0, 3), (3, 5)], [(0, 3)]) == [([0], [0])]


def test_normalised_offsets_do_not_depend_on_trimmed_whitespace(smollm2_dir: Path):
    """A real GPT-2-style tokenizer with `trim_offsets` leaves spaces out of its spans (even reports
    empty spans for runs of spaces); normalising gives back the same partition as the untrimmed one."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(smollm2_dir)
    trimmed = AutoTokenizer.from_pretrained(smollm2_dir)
    trimmed.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    text = " Hello   world, 2024 items. "
    raw_plain = plain(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    raw_trim = trimmed(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert [tuple(o) for o in raw_plain] != [tuple(o) for o in raw_trim]  # the case really arises
    offsets = response_offsets(trimmed, text)
    assert offsets == response_offsets(plain, text)
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(offsets))


def test_normalise_offsets_rules():
    # gap before a token -> that token; overlap -> taken off the later token; trailing text -> last token
    assert normalise_offsets([(1, 3), (4, 6), (5, 6), (6, 7)], 9) == [(0, 3), (3, 6), (6, 6), (6, 9)]
    with pytest.raises(ValueError, match="past the text's length"):
        normalise_offsets([(0, 5)], 3)


@pytest.mark.parametrize("student_is_char", [True, False])
def test_real_tokenizers_groups_spell_the_same_text(smol, chars, student_is_char):
    """SmolLM2's byte-level BPE vs the character tokenizer: every group decodes to the same text on both
    sides, that text is the group's span, and the groups spell the whole response in order."""
    student, teacher = (chars, smol) if student_is_char else (smol, chars)
    split_character_seen = False
    for text in SENTENCES:
        s_ids = student(text, add_special_tokens=False)["input_ids"]
        t_ids = teacher(text, add_special_tokens=False)["input_ids"]
        s_off, t_off = response_offsets(student, text), response_offsets(teacher, text)
        assert len(s_off) == len(s_ids) and len(t_off) == len(t_ids)
        groups = align_tokens(s_off, t_off)
        pieces = []
        for s_group, t_group in groups:
            s_text = student.decode([s_ids[k] for k in s_group], clean_up_tokenization_spaces=False)
            t_text = teacher.decode([t_ids[k] for k in t_group], clean_up_tokenization_spaces=False)
            start, end = group_span(s_off, s_group)
            assert s_text == t_text == text[start:end], (text, s_group, t_group)
            pieces.append(s_text)
            smol_group = t_group if student_is_char else s_group
            split_character_seen |= len(smol_group) > 1
        assert "".join(pieces) == text
    assert split_character_seen  # "ü", "€" are split over byte-level tokens: the absorbing rule is exercised


def test_response_groups_index_the_tokens_encode_response_makes(smol, chars):
    text = SENTENCES[3]
    groups = response_groups(chars, smol, text)
    s_ids, t_ids = encode_response(chars, text), encode_response(smol, text)
    assert groups[-1] == ([len(s_ids) - 1], [len(t_ids) - 1])  # EOS paired with EOS
    assert s_ids[-1] == chars.eos_token_id and t_ids[-1] == smol.eos_token_id
    assert [k for s, _ in groups for k in s] == list(range(len(s_ids)))
    assert [k for _, t in groups for k in t] == list(range(len(t_ids)))
    assert response_groups(chars, smol, text, eos=False) == groups[:-1]


def test_a_multidigit_bpe_splits_every_number_otherwise_and_the_groups_join_the_digits():
    """GPT-2's convention against SmolLM2's, both trained here on the same text: the words tokenise
    alike, a number is one token on one side and a space plus one token per digit on the other."""
    from kdray.data import generate_arithmetic
    from kdray.models.bpe import bpe_tokenizer

    texts = [f"{r['prompt']}\n{r['response']}" for r in generate_arithmetic(300, seed=0, difficulty=1)]
    digits, merged = bpe_tokenizer(texts, 512), bpe_tokenizer(texts, 512, split_digits=False)
    text = "He buys 4 * 8 = 32 shells.\n#### 32"
    assert "Ġ32" in merged.tokenize(text) and "Ġ32" not in digits.tokenize(text)
    assert digits.tokenize(" 32") == ["Ġ", "3", "2"]
    assert set(digits.get_vocab()) < set(merged.get_vocab())  # the student's holds the teacher's and more
    groups = response_groups(merged, digits, text)
    joined = [(s, t) for s, t in groups if len(t) > 1]
    assert joined and all(len(s) == 1 for s, _ in joined)  # each number: one token against its digits
    assert [k for s, _ in groups for k in s] == list(range(len(encode_response(merged, text))))


# ---- merging -------------------------------------------------------------------------------------


def test_merge_one_token_group_is_its_row():
    lp = logprobs(5, 7)
    merged = merge_groups(lp, torch.tensor([1, 2, 3, 4, 5]), [[0], [3], [4]])
    assert torch.equal(merged, lp[[0, 3, 4]])


def test_merge_two_tokens_is_the_product_rule():
    lp = logprobs(4, 6, seed=1)
    ids = torch.tensor([2, 5, 0, 3])
    p = lp.exp()
    merged = merge_groups(lp, ids, [[0], [1, 2], [3]]).exp()
    # observed: P(first token = v) x P(second token observed), from the definition in probability space
    assert torch.allclose(merged[1], p[1] * p[2, ids[2]])
    assert torch.allclose(merged[0], p[0]) and torch.allclose(merged[2], p[3])
    bayes = merge_groups(lp, ids, [[0], [1, 2], [3]], "bayesian").exp()
    assert torch.allclose(bayes[1], p[2] * p[1, ids[1]])


def test_merge_floors_each_scalar_and_reads_served_token_logprobs():
    lp = logprobs(3, 5, seed=2)
    lp[1] = torch.log_softmax(torch.tensor([0.0, -1e4, 0.0, 0.0, 0.0], dtype=torch.float64), dim=-1)
    merged = merge_groups(lp, torch.tensor([0, 1, 4]), [[0, 1, 2]])
    # in log space: the floored product is ~1e-9, below allclose's absolute tolerance
    assert torch.allclose(merged[0], torch.log(lp[0].exp() * 1e-8 * lp[2, 4].exp()))
    # a top-k teacher: rows know only a few tokens, the observed token's log-prob comes separately
    dense = topk_to_dense(torch.tensor([[3, 1], [0, 2]]), torch.tensor([[-0.5, -1.5], [-0.2, -2.0]]), 5)
    observed = torch.tensor([-0.7, -3.0])
    merged = merge_groups(dense, None, [[0, 1]], observed_logprobs=observed)
    assert torch.allclose(merged[0], dense[0] - 3.0)
    with pytest.raises(ValueError, match="token_ids"):
        merge_groups(dense, None, [[0, 1]])


def test_topk_to_dense_keeps_real_entries_over_padded_slots():
    ids = torch.tensor([[4, 1, 4]])  # slot 2 is padding repeating id 4
    dense = topk_to_dense(ids, torch.tensor([[-0.3, -1.2, float("-inf")]]), 6)
    expected = torch.full((1, 6), float("-inf"))
    expected[0, 4], expected[0, 1] = -0.3, -1.2
    assert torch.equal(dense, expected)


# ---- ULD -----------------------------------------------------------------------------------------


def uld_reference(student_lp: torch.Tensor, teacher_lp: torch.Tensor) -> float:
    """Sort each row's probabilities descending, zero-pad the shorter, L1 summed, mean over rows."""
    q, p = student_lp.detach().exp().numpy(), teacher_lp.detach().exp().numpy()
    width = max(q.shape[1], p.shape[1])
    total = 0.0
    for q_row, p_row in zip(q, p, strict=True):
        qs = np.zeros(width)
        ps = np.zeros(width)
        qs[: len(q_row)] = sorted(q_row, reverse=True)
        ps[: len(p_row)] = sorted(p_row, reverse=True)
        total += np.abs(qs - ps).sum()
    return total / len(q)


@pytest.mark.parametrize(("v_s", "v_t"), [(7, 11), (11, 7), (9, 9)])
def test_uld_matches_brute_force(v_s, v_t):
    s, t = logprobs(6, v_s, seed=3), logprobs(6, v_t, seed=4)
    assert uld_loss(s, t).item() == pytest.approx(uld_reference(s, t), rel=1e-12)


def test_uld_zero_for_identical_and_blind_to_vocabulary_order():
    s, t = logprobs(5, 13, seed=5), logprobs(5, 17, seed=6)
    assert uld_loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-12)
    base = uld_loss(s, t)
    assert base > 0.01
    g = torch.Generator().manual_seed(7)
    assert torch.allclose(uld_loss(s[:, torch.randperm(13, generator=g)], t), base)
    assert torch.allclose(uld_loss(s, t[:, torch.randperm(17, generator=g)]), base)


def test_uld_gradient_reaches_the_student_only():
    s_logits = torch.randn(4, 9, dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    uld_loss(torch.log_softmax(s_logits, -1), torch.log_softmax(t_logits, -1)).backward()
    assert t_logits.grad is None
    assert s_logits.grad is not None and s_logits.grad.abs().sum() > 0


def test_uld_batch_position_and_text_alignment_against_brute_force():
    s = [logprobs(5, 8, seed=8), logprobs(3, 8, seed=9)]
    t = [logprobs(4, 10, seed=10), logprobs(6, 10, seed=11)]
    by_position = np.mean([uld_reference(s[0][:4], t[0]), uld_reference(s[1], t[1][:3])])
    assert uld_batch(s, t, align="position").item() == pytest.approx(by_position, rel=1e-12)

    groups = [[([0, 1], [0]), ([2], [1, 2]), ([3, 4], [3])], [([0], [0, 1, 2]), ([1, 2], [3, 4, 5])]]
    s_ids = [torch.tensor([1, 2, 3, 4, 5]), torch.tensor([6, 7, 0])]
    t_ids = [torch.tensor([9, 8, 7, 6]), torch.tensor([0, 1, 2, 3, 4, 5])]

    def merged(lp: torch.Tensor, ids: torch.Tensor, side: list[list[int]]) -> torch.Tensor:
        rows = []
        for group in side:  # first row + floored log-probs of the later observed tokens, by loop
            row = lp[group[0]].clone()
            for k in group[1:]:
                row += max(lp[k, ids[k]].item(), np.log(1e-8))
            rows.append(row)
        return torch.stack(rows)

    by_text = np.mean(
        [
            uld_reference(
                merged(s[b], s_ids[b], [g[0] for g in groups[b]]),
                merged(t[b], t_ids[b], [g[1] for g in groups[b]]),
            )
            for b in range(2)
        ]
    )
    got = uld_batch(s, t, groups=groups, student_token_ids=s_ids, teacher_token_ids=t_ids)
    assert got.item() == pytest.approx(by_text, rel=1e-12)


# ---- GOLD hybrid ---------------------------------------------------------------------------------


def jsd_reference(q: np.ndarray, p: np.ndarray, beta: float) -> float:
    """Generalised JSD on (possibly unnormalised) probabilities, summed over columns, mean over rows."""
    if beta == 0.0:
        return float((p * np.log(p / q)).sum(-1).mean())
    if beta == 1.0:
        return float((q * np.log(q / p)).sum(-1).mean())
    m = beta * p + (1 - beta) * q
    return float((beta * (p * np.log(p / m)) + (1 - beta) * (q * np.log(q / m))).sum(-1).mean())


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_gold_full_match_is_kdray_jsd(beta):
    """Same vocabulary listed in another order: every column matched, w_m = 1, and the loss is kdray's
    JSD(β) once the student's columns are put in the teacher's order."""
    s, t = logprobs(5, 9, seed=12), logprobs(5, 9, seed=13)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(14))
    total, parts = gold_loss(s, t, perm, torch.arange(9), beta=beta)
    expected = jsd_from_logprobs(s[:, perm], t, beta=beta).mean()
    assert torch.allclose(total, expected)
    assert parts["unmatched"].item() == pytest.approx(0.0, abs=1e-12)


def test_gold_disjoint_vocabularies_is_uld():
    s, t = logprobs(5, 7, seed=15), logprobs(5, 11, seed=16)
    empty = torch.zeros(0, dtype=torch.long)
    total, parts = gold_loss(s, t, empty, empty)
    assert torch.allclose(total, uld_loss(s, t))
    assert parts["matched"].item() == 0.0


def test_gold_partial_match_against_brute_force_and_weights():
    s, t = logprobs(6, 8, seed=17), logprobs(6, 12, seed=18)
    s[0, 5] = -50.0  # a matched probability below the 1e-8 floor
    s_ids, t_ids = torch.tensor([5, 0, 3]), torch.tensor([1, 7, 10])
    q, p = s.exp().numpy(), t.exp().numpy()
    matched = jsd_reference(np.maximum(q[:, [5, 0, 3]], 1e-8), np.maximum(p[:, [1, 7, 10]], 1e-8), 0.5)
    s_rest = [v for v in range(8) if v not in (5, 0, 3)]
    t_rest = [v for v in range(12) if v not in (1, 7, 10)]
    unmatched = uld_reference(s[:, s_rest], t[:, t_rest])
    total, parts = gold_loss(s, t, s_ids, t_ids)
    assert parts["matched"].item() == pytest.approx(matched, rel=1e-10)
    assert parts["unmatched"].item() == pytest.approx(unmatched, rel=1e-10)
    w_m = 3 / 12  # default: matched share of the teacher's vocabulary
    assert total.item() == pytest.approx(w_m * matched + (1 - w_m) * unmatched, rel=1e-10)
    fixed, _ = gold_loss(s, t, s_ids, t_ids, matched_weight=0.2)
    assert fixed.item() == pytest.approx(0.2 * matched + 0.8 * unmatched, rel=1e-10)
    both, _ = gold_loss(s, t, s_ids, t_ids, matched_weight=1.0, unmatched_weight=2.0)
    assert both.item() == pytest.approx(matched + 2.0 * unmatched, rel=1e-10)


def test_gold_gradient_reaches_the_student_only():
    s_logits = torch.randn(3, 8, dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    total, _ = gold_loss(
        torch.log_softmax(s_logits, -1),
        torch.log_softmax(t_logits, -1),
        torch.tensor([5, 0, 3]),
        torch.tensor([1, 7, 10]),
    )
    total.backward()
    assert t_logits.grad is None
    assert s_logits.grad is not None and torch.isfinite(s_logits.grad).all() and s_logits.grad.abs().sum() > 0


def test_vocab_map_pairs_equal_strings_only(smol, chars):
    s_ids, t_ids = vocab_map(chars, smol)
    s_tokens = chars.convert_ids_to_tokens(s_ids.tolist())
    assert s_tokens == smol.convert_ids_to_tokens(t_ids.tolist())
    assert len(s_ids) == len(set(chars.get_vocab()) & set(smol.get_vocab()))
    assert len(set(s_ids.tolist())) == len(s_ids) and len(set(t_ids.tolist())) == len(t_ids)
    assert "a" in s_tokens and "7" in s_tokens
    assert " " not in s_tokens  # SmolLM2 spells a space "Ġ"
    # raw strings, not text: SmolLM2's "ä" is the glyph of the byte 0xE4 (the letter is "Ã¤"), yet it
    # matches the character tokenizer's letter "ä"; exact matching, as TRL, takes it at its word
    assert "ä" in s_tokens and smol.decode([smol.get_vocab()["ä"]]) != "ä"


def test_gold_and_uld_on_real_tokenisations(smol, chars):
    """End to end on one real response: groups from the text, merged rows, both losses finite and
    differentiable in the student."""
    text = SENTENCES[2]
    groups = response_groups(chars, smol, text)
    s_ids = torch.tensor(encode_response(chars, text))
    t_ids = torch.tensor(encode_response(smol, text))
    s_logits = torch.randn(len(s_ids), len(chars), requires_grad=True)
    t_lp = logprobs(len(t_ids), len(smol), seed=19)
    s_lp = torch.log_softmax(s_logits, -1)
    uld = uld_batch([s_lp], [t_lp], groups=[groups], student_token_ids=[s_ids], teacher_token_ids=[t_ids])
    student_map, teacher_map = vocab_map(chars, smol)
    pairs = [
        merge_groups(s_lp, s_ids, [g[0] for g in groups]),
        merge_groups(t_lp, t_ids, [g[1] for g in groups]),
    ]
    gold, _ = gold_loss(*pairs, student_map, teacher_map)
    (uld + gold).backward()
    assert torch.isfinite(uld) and torch.isfinite(gold) and s_logits.grad.abs().sum() > 0
