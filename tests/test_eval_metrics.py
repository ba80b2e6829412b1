"""Evaluation metrics against hand-computed values and their defining properties."""

from __future__ import annotations

import numpy as np
import pytest

from kdray.eval import metrics as M


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
        ("#### 1,000", "1000"),
        ("so the answer is 12.50 dollars", "12.5"),
        ("first 3 then 5", "5"),
        ("#### -4", "-4"),
        ("no number here", None),
    ],
)
def test_extract_answer(text, want):
    assert M.extract_answer(text) == want


def test_exact_match_on_real_gsm8k_answers(data_dir):
    import json

    rows = [json.loads(line) for line in (data_dir / "gsm8k" / "test.jsonl").read_text().splitlines()[:50]]
    answers = [r["answer"].split("####")[-1].strip() for r in rows]
    assert M.exact_match([r["answer"] for r in rows], answers) == 1.0
    wrong = [r["answer"].rsplit("####", 1)[0] + "#### 999999" for r in rows]
    assert M.exact_match(wrong, answers) == 0.0
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        M.exact_match(["1", "2"], ["1"])


def test_bleu_and_rouge_bounds():
    refs = ["a man rides a horse on the beach", "two dogs play in the snow"]
    assert M.bleu(refs, refs) == pytest.approx(100.0)
    assert M.bleu(["zebra"] * 2, refs) < 5
    r = M.rouge(refs, refs)
    assert all(v == pytest.approx(1.0) for v in r.values())
    r2 = M.rouge(["a man rides a horse", "dogs in snow"], refs)
    assert 0 < r2["rouge2"] < r2["rouge1"] < 1


def test_diversity_metrics():
    assert M.distinct_n(["a b c", "a b c"], 2) == pytest.approx(2 / 4)
    assert M.distinct_n(["a b c", "d e f"], 2) == 1.0
    assert M.self_bleu(["the cat sat", "the cat sat"]) > M.self_bleu(["the cat sat", "dogs run fast"])


def test_agreement_and_coverage():
    mask = np.array([[True, True, False]])
    assert M.top1_agreement(np.array([[1, 2, 3]]), np.array([[1, 5, 3]]), mask) == 0.5
    probs = np.array([[[0.5, 0.2], [0.1, 0.1], [0.9, 0.1]]])
    assert M.topk_mass_coverage(probs, mask) == pytest.approx((0.7 + 0.2) / 2)


def test_lca_uncertainty_properties():
    # samples all agree with the greedy answer: no uncertainty
    assert M.lca_uncertainty(["4", "4", "4"], [-1.0, -1.2, -0.9], "4", -0.5) == pytest.approx(0.0, abs=1e-5)
    # samples disagree with greedy: positive, and larger when more mass sits away from greedy
    some = M.lca_uncertainty(["4", "5", "4"], [-1.0, -1.0, -1.0], "4", -1.0)
    most = M.lca_uncertainty(["5", "5", "6"], [-1.0, -1.0, -1.0], "4", -1.0)
    assert 0 < some < most
    # by hand for the second case: p = (4:0, 5:2/3, 6:1/3), q = (4:1/4, 5:1/2, 6:1/4) with eps smoothing
    p, q = np.array([0, 2 / 3, 1 / 3]) + 1e-6, np.array([0.25, 0.5, 0.25]) + 1e-6
    p, q = p / p.sum(), q / q.sum()
    assert most == pytest.approx(float(np.sum(p * np.log(p / q))), rel=1e-6)


def test_auroc_and_entropy():
    assert M.auroc([0.9, 0.8, 0.1, 0.2], [True, True, False, False]) == 1.0
    assert M.auroc([0.1, 0.2, 0.9, 0.8], [True, True, False, False]) == 0.0
    assert M.auroc([0.5, 0.5], [True, False]) == 0.5
    assert np.isnan(M.auroc([0.1], [True]))
    assert M.answer_entropy(["1", "1"]) == 0.0
    assert M.answer_entropy(["1", "2"]) == pytest.approx(np.log(2))


def test_paired_lead_counts_only_the_prompts_where_the_two_models_differ():
    base = [True] * 50 + [False] * 50
    better = [True] * 50 + [True] * 10 + [False] * 40  # right on 10 more of the same prompts
    lead = M.paired_lead(base, better)
    assert lead["lead"] == pytest.approx(10.0) and lead["prompts"] == 100
    assert 0 < lead["lead_lo"] < 10 < lead["lead_hi"]  # 10 discordant prompts of 100: clears zero
    # two accuracies 10 points apart whose errors do not overlap: the same mean, a far wider interval
    crossed = M.paired_lead([True] * 40 + [False] * 60, [False] * 40 + [True] * 50 + [False] * 10)
    assert crossed["lead"] == pytest.approx(10.0)
    assert crossed["lead_hi"] - crossed["lead_lo"] > 2 * (lead["lead_hi"] - lead["lead_lo"])
    assert crossed["lead_lo"] < 0  # within the noise of 100 prompts
    worse = M.paired_lead(better, base)
    assert worse["lead"] == -10.0 and worse["lead_hi"] < 0
    with pytest.raises(ValueError, match="3 baseline answers but 2"):
        M.paired_lead([True, False, True], [True, False])


def test_bootstrap_interval_brackets_the_mean_and_widens_with_spread():
    assert M.bootstrap_ci([5.0, 5.0, 5.0]) == (5.0, 5.0)
    narrow, wide = M.bootstrap_ci([9.0, 10.0, 11.0]), M.bootstrap_ci([0.0, 10.0, 20.0])
    assert narrow[0] <= 10.0 <= narrow[1] and wide[0] <= 10.0 <= wide[1]
    assert wide[1] - wide[0] > narrow[1] - narrow[0]
    assert wide[0] >= 0.0 and wide[1] <= 20.0  # a mean of resampled seeds stays inside their range
    assert M.bootstrap_ci([0.0, 10.0, 20.0]) == wide  # seeded: the README table does not move
    with pytest.raises(ValueError, match="no values"):
        M.bootstrap_ci([])
