"""MiniLLM's teacher-mixed sampling draws from α·p_τ + (1−α)·q_τ, both sides at the sampling temperature.

A chi-square goodness-of-fit test on the first sampled token of one prompt repeated across a batch, with
controls that the same counts reject the pure student and the mixture with an untempered teacher (the
bug this guards against).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdray.models.tiny import tiny_causal_lm
from kdray.train.onpolicy import sample_student

VOCAB, ALPHA, DRAWS = 12, 0.2, 4000
PROMPT = [3, 5, 7]

# Upper 0.1% points of the chi-square distribution, chi2.ppf(0.999, df) for df = 1..11, computed with
# scipy.stats 1.17.1 and hard-coded so the test needs no scipy (it is not a kdray dependency).
CHI2_999 = {
    1: 10.83,
    2: 13.82,
    3: 16.27,
    4: 18.47,
    5: 20.52,
    6: 22.46,
    7: 24.32,
    8: 26.12,
    9: 27.88,
    10: 29.59,
    11: 31.26,
}


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic and its degrees of freedom; cells expecting fewer than 5 draws are pooled."""
    expected = probs * counts.sum()
    small = expected < 5.0
    obs, exp = list(counts[~small]), list(expected[~small])
    if small.any():
        obs.append(counts[small].sum())
        exp.append(expected[small].sum())
    obs_a, exp_a = np.asarray(obs, float), np.asarray(exp, float)
    return float(((obs_a - exp_a) ** 2 / exp_a).sum()), len(obs_a) - 1


@pytest.fixture(scope="module")
def models():
    student = tiny_causal_lm(VOCAB, hidden_size=16, num_layers=1, num_heads=2, seed=1)
    teacher = tiny_causal_lm(VOCAB, hidden_size=16, num_layers=1, num_heads=2, seed=2)
    with torch.no_grad():  # sharpen both so that p and q, and p at τ=1 and τ=0.5, clearly differ
        student.lm_head.weight.mul_(10.0)
        teacher.lm_head.weight.mul_(10.0)
        zs = student(torch.tensor([PROMPT])).logits[0, -1].double()
        zt = teacher(torch.tensor([PROMPT])).logits[0, -1].double()
    return student, teacher, zs, zt


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_first_token_follows_the_tempered_probability_mixture(models, temperature):
    student, teacher, zs, zt = models
    out = sample_student(
        student, [PROMPT] * DRAWS, max_new_tokens=1, eos_id=None, pad_id=0, temperature=temperature,
        seed=11, teacher_model=teacher, mix_alpha=ALPHA,
    )  # fmt: skip
    tokens = np.array([s["response_ids"][0] for s in out])
    counts = np.bincount(tokens, minlength=VOCAB)
    q = torch.softmax(zs / temperature, -1).numpy()
    p = torch.softmax(zt / temperature, -1).numpy()
    mix = ALPHA * p + (1 - ALPHA) * q

    stat, df = chi_square(counts, mix)
    assert stat < CHI2_999[df], f"mixture rejected: chi2={stat:.1f}, df={df}, counts={counts}"
    # controls: the same draws are far from the pure student and from a mixture with an untempered teacher
    stat_q, df_q = chi_square(counts, q)
    assert stat_q > 3 * CHI2_999[df_q], f"pure student not rejected: chi2={stat_q:.1f}"
    if temperature != 1.0:
        untempered = ALPHA * torch.softmax(zt, -1).numpy() + (1 - ALPHA) * q
        stat_u, df_u = chi_square(counts, untempered)
        assert stat_u > 3 * CHI2_999[df_u], f"untempered teacher not rejected: chi2={stat_u:.1f}"

    # recorded log-probs: the tempered student's (PPO's log q_old) and the mixture's (the sampling policy)
    old = np.array([s["old_logprobs"][0] for s in out])
    mixed = np.array([s["mix_logprobs"][0] for s in out])
    np.testing.assert_allclose(old, np.log(q[tokens]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(mixed, np.log(mix[tokens]), rtol=1e-4, atol=1e-5)


def test_the_goodness_of_fit_check_rejects_a_wrong_distribution(models):
    """The test above has power: pure student draws fit q and are rejected against the mixture."""
    student, _, zs, zt = models
    out = sample_student(student, [PROMPT] * DRAWS, max_new_tokens=1, eos_id=None, pad_id=0, seed=5)
    counts = np.bincount([s["response_ids"][0] for s in out], minlength=VOCAB)
    q = torch.softmax(zs, -1).numpy()
    stat, df = chi_square(counts, q)
    assert stat < CHI2_999[df]
    mix = ALPHA * torch.softmax(zt, -1).numpy() + (1 - ALPHA) * q
    stat_mix, df_mix = chi_square(counts, mix)
    assert stat_mix > CHI2_999[df_mix]


def test_mix_alpha_and_temperature_are_checked(models):
    student, teacher, _, _ = models
    with pytest.raises(ValueError, match="mix_alpha"):
        sample_student(
            student, [PROMPT], max_new_tokens=1, eos_id=None, pad_id=0, teacher_model=teacher, mix_alpha=1.5
        )
    with pytest.raises(ValueError, match="temperature"):
        sample_student(student, [PROMPT], max_new_tokens=1, eos_id=None, pad_id=0, temperature=0.0)
