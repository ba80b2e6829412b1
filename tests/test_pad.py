"""PAD math against brute-force references: Plackett–Luce, the JSD and vanilla losses, rewards, MCQ, diversity."""

from __future__ import annotations

import functools
import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F

from kdray.losses import pad as P


def rand_rewards(b: int, n: int, seed: int, scale: float = 2.0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, n, generator=g) * scale).to(dtype)


def pl_logprob(rewards: list[float], ranking: tuple[int, ...]) -> float:
    """Plackett–Luce by its definition: pick the next item with probability exp(r) / Σ_remaining exp(r)."""
    remaining = list(range(len(rewards)))
    total = 0.0
    for item in ranking:
        total += math.log(math.exp(rewards[item]) / sum(math.exp(rewards[j]) for j in remaining))
        remaining.remove(item)
    return total


def pl_table(rewards: torch.Tensor) -> list[list[float]]:
    """Brute-force ranking log-probabilities for every row, permutations in itertools order."""
    n = rewards.shape[-1]
    return [[pl_logprob(row, perm) for perm in itertools.permutations(range(n))] for row in rewards.tolist()]


def kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)


# --------------------------------------------------------------------------- 1. ranking_distribution


@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_ranking_distribution_is_normalised(n):
    logp = P.ranking_distribution(rand_rewards(3, n, seed=n, scale=4.0))
    assert logp.shape == (3, math.factorial(n))
    torch.testing.assert_close(torch.logsumexp(logp, -1), torch.zeros(3, dtype=logp.dtype))
    assert bool((logp <= 0).all())


@pytest.mark.parametrize("n", [2, 3, 4])
def test_ranking_distribution_matches_brute_force(n):
    rewards = rand_rewards(4, n, seed=10 + n)
    expected = torch.tensor(pl_table(rewards), dtype=torch.float64)
    torch.testing.assert_close(P.ranking_distribution(rewards), expected, rtol=1e-10, atol=1e-10)


def test_ranking_distribution_two_items_is_log_sigmoid():
    r = rand_rewards(5, 2, seed=1)
    expected = torch.stack([F.logsigmoid(r[:, 0] - r[:, 1]), F.logsigmoid(r[:, 1] - r[:, 0])], dim=-1)
    torch.testing.assert_close(P.ranking_distribution(r), expected)


def test_ranking_distribution_column_order_is_itertools_order():
    # a clear reward order makes one ranking the most likely; its column must be where itertools puts it
    rewards = torch.tensor([[0.0, 30.0, 10.0, 20.0]])
    best = P.ranking_distribution(rewards).argmax(-1).item()
    assert list(itertools.permutations(range(4)))[best] == (1, 3, 2, 0)


def test_ranking_distribution_refuses_bad_sizes():
    with pytest.raises(ValueError, match="n_responses=9"):
        P.ranking_distribution(torch.zeros(1, 9))
    with pytest.raises(ValueError, match="at least 2 responses"):
        P.ranking_distribution(torch.zeros(1, 1))
    with pytest.raises(ValueError, match=r"\(batch, n_responses\)"):
        P.ranking_distribution(torch.zeros(4))


def test_ranking_distribution_upcasts_half_precision():
    assert P.ranking_distribution(torch.zeros(1, 3, dtype=torch.bfloat16)).dtype == torch.float32


# --------------------------------------------------------------------------- 2. the JSD loss


def brute_jsd(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """½[KL(P_T‖M) + KL(P_S‖M)] per example with explicit probabilities, then the batch mean."""
    values = []
    for ls, lt in zip(pl_table(student), pl_table(teacher), strict=True):
        ps, pt = [math.exp(x) for x in ls], [math.exp(x) for x in lt]
        m = [(a + b) / 2 for a, b in zip(ps, pt, strict=True)]
        values.append(0.5 * (kl(pt, m) + kl(ps, m)))
    return sum(values) / len(values)


@pytest.mark.parametrize(("b", "n"), [(1, 2), (3, 3), (2, 4)])
def test_jsd_matches_brute_force(b, n):
    s, t = rand_rewards(b, n, seed=20 + n), rand_rewards(b, n, seed=40 + n)
    assert P.pad_loss(s, t).item() == pytest.approx(brute_jsd(s, t), rel=1e-9, abs=1e-12)


def test_jsd_zero_symmetric_and_bounded():
    s, t = rand_rewards(3, 4, seed=5, scale=3.0), rand_rewards(3, 4, seed=6, scale=3.0)
    assert P.pad_loss(s, s.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert P.pad_loss(s, t).item() == pytest.approx(P.pad_loss(t, s).item(), rel=1e-12)
    assert 0 < P.pad_loss(s, t).item() < math.log(2)
    # opposite, very sharp preferences put the two distributions on disjoint rankings: JSD -> log 2
    sharp = torch.tensor([[0.0, 100.0, 200.0, 300.0]], dtype=torch.float64)
    extreme = P.pad_loss(sharp, -sharp).item()
    assert extreme <= math.log(2) + 1e-12
    assert extreme == pytest.approx(math.log(2), rel=1e-6)


def test_jsd_gradient_matches_finite_differences_and_spares_teacher():
    s = rand_rewards(2, 3, seed=7).requires_grad_(True)
    t = rand_rewards(2, 3, seed=8).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: P.pad_loss(x, t), (s,))
    for loss, form in [("jsd", "textbook"), ("jsd", "reference"), ("vanilla", "textbook")]:
        s.grad = None
        P.pad_loss(s, t, loss, jsd_form=form).backward()
        assert s.grad is not None and bool(s.grad.abs().sum() > 0)
        assert t.grad is None


def test_unknown_choices_name_the_valid_ones():
    r = torch.zeros(1, 3)
    with pytest.raises(ValueError, match=r"'jsd', 'vanilla'"):
        P.pad_loss(r, r, "kl")
    with pytest.raises(ValueError, match=r"'textbook', 'reference'"):
        P.pad_loss(r, r, jsd_form="paper")
    with pytest.raises(ValueError, match="differ"):
        P.pad_loss(r, torch.zeros(1, 4))


# --------------------------------------------------------------------------- 3. the reference's JSD form


def reference_code_jsd(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Written the way EganGu/PAD writes it: cat over dim 0, logsumexp over dim 0, F.kl_div, mean."""
    n1 = torch.tensor(pl_table(student), dtype=torch.float64)
    n2 = torch.tensor(pl_table(teacher), dtype=torch.float64)
    m = torch.cat((n1, n2), 0).logsumexp(0).unsqueeze(0) + n1.new_tensor(0.5).log()
    loss = F.kl_div(n1, m, reduction="none", log_target=True).sum(-1)
    loss += F.kl_div(n2, m, reduction="none", log_target=True).sum(-1)
    return (0.5 * loss).mean()


@pytest.mark.parametrize(("b", "n"), [(1, 3), (2, 3), (4, 4)])
def test_reference_form_matches_reference_code(b, n):
    s, t = rand_rewards(b, n, seed=60 + b), rand_rewards(b, n, seed=70 + b)
    got = P.pad_loss(s, t, jsd_form="reference")
    torch.testing.assert_close(got, reference_code_jsd(s, t), rtol=1e-10, atol=1e-12)
    if b > 1:
        assert abs(got.item() - P.pad_loss(s, t).item()) > 1e-3


def test_reference_form_single_example_is_reversed_kl_to_the_mixture():
    s, t = rand_rewards(1, 3, seed=80), rand_rewards(1, 3, seed=81)
    ps, pt = ([math.exp(x) for x in row] for row in (pl_table(s)[0], pl_table(t)[0]))
    m = [(a + b) / 2 for a, b in zip(ps, pt, strict=True)]
    expected = 0.5 * (kl(m, ps) + kl(m, pt))
    assert P.pad_loss(s, t, jsd_form="reference").item() == pytest.approx(expected, rel=1e-9)


def test_reference_form_mixes_rows_across_the_batch():
    # the shared mixture makes example 0's term depend on example 1; the textbook form does not
    s, t = rand_rewards(2, 3, seed=90), rand_rewards(2, 3, seed=91)
    t2 = t.clone()
    t2[1] += torch.tensor([3.0, -2.0, 0.5], dtype=torch.float64)
    for form, coupled in [("reference", True), ("textbook", False)]:
        delta_row1 = P.pad_loss(s[1:], t2[1:], jsd_form="textbook") - P.pad_loss(
            s[1:], t[1:], jsd_form="textbook"
        )
        delta = P.pad_loss(s, t2, jsd_form=form) - P.pad_loss(s, t, jsd_form=form)
        if coupled:
            assert abs(delta.item() - delta_row1.item() / 2) > 1e-4
        else:
            assert delta.item() == pytest.approx(delta_row1.item() / 2, rel=1e-9)


# --------------------------------------------------------------------------- 4. the vanilla loss


@pytest.mark.parametrize("n", [2, 3, 5, 9])
def test_vanilla_is_negative_log_likelihood_of_teacher_ranking(n):
    s, t = rand_rewards(3, n, seed=100 + n), rand_rewards(3, n, seed=200 + n)
    expected = 0.0
    for srow, trow in zip(s.tolist(), t.tolist(), strict=True):
        ranking = tuple(sorted(range(n), key=lambda i: -trow[i]))
        expected -= pl_logprob(srow, ranking) / 3
    assert P.pad_loss(s, t, "vanilla").item() == pytest.approx(expected, rel=1e-9)


def test_vanilla_breaks_ties_by_lower_index():
    s = rand_rewards(1, 4, seed=3)
    t = torch.tensor([[1.0, 3.0, 1.0, 3.0]], dtype=torch.float64)
    column = list(itertools.permutations(range(4))).index((1, 3, 0, 2))
    expected = -P.ranking_distribution(s)[0, column]
    torch.testing.assert_close(P.pad_loss(s, t, "vanilla"), expected)
    assert P.pad_loss(s, t, "vanilla").item() == pytest.approx(-pl_logprob(s[0].tolist(), (1, 3, 0, 2)))


def test_vanilla_tie_break_holds_for_long_tied_vectors():
    # unstable sorts reorder ties once vectors are long; the rule must hold at any n (no n! here)
    n = 256
    s = rand_rewards(1, n, seed=4, scale=0.5)
    t = torch.tensor([[float(i % 3 == 0) for i in range(n)]], dtype=torch.float64)
    ranking = [i for i in range(n) if i % 3 == 0] + [i for i in range(n) if i % 3 != 0]
    srow = s[0].tolist()
    expected, tail = 0.0, [math.exp(srow[i]) for i in ranking]
    for k, item in enumerate(ranking):
        expected -= srow[item] - math.log(math.fsum(tail[k:]))
    assert P.pad_loss(s, t, "vanilla").item() == pytest.approx(expected, rel=1e-9)


# --------------------------------------------------------------------------- 5. rewards


def test_student_rewards_mean_over_mask_only():
    g = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(2, 3, 6, generator=g, dtype=torch.float64) * 4
    mask = torch.rand(2, 3, 6, generator=g) > 0.4
    mask[..., 0] = True
    got = P.student_rewards(logprobs, mask, beta=10.0)
    for b, i in itertools.product(range(2), range(3)):
        kept = [lp for lp, m in zip(logprobs[b, i].tolist(), mask[b, i].tolist(), strict=True) if m]
        assert got[b, i].item() == pytest.approx(10.0 * sum(kept) / len(kept), rel=1e-12)
    poisoned = logprobs.clone().requires_grad_(True)
    with torch.no_grad():
        poisoned[~mask] = float("-inf")
    out = P.student_rewards(poisoned, mask)
    torch.testing.assert_close(out, got)
    out.sum().backward()
    assert bool(torch.isfinite(poisoned.grad).all()) and bool((poisoned.grad[~mask] == 0).all())


def test_student_rewards_refuses_empty_response():
    mask = torch.ones(2, 3, 4, dtype=torch.bool)
    mask[1, 2] = False
    with pytest.raises(ValueError, match="example 1, response 2"):
        P.student_rewards(torch.zeros(2, 3, 4), mask)


def test_teacher_rewards_formula_and_guards():
    mean, mcq = rand_rewards(2, 4, seed=1), rand_rewards(2, 4, seed=2)
    got = P.teacher_rewards(mean, mcq, alpha=0.3, beta=10.0)
    for b, i in itertools.product(range(2), range(4)):
        assert got[b, i].item() == pytest.approx(10.0 * (0.3 * mean[b, i].item() + 0.7 * mcq[b, i].item()))
    # a zero-weight input is ignored entirely, even if it is -inf
    torch.testing.assert_close(P.teacher_rewards(torch.full_like(mean, -math.inf), mcq, alpha=0.0), 10 * mcq)
    torch.testing.assert_close(P.teacher_rewards(mean, None, alpha=1.0, beta=2.0), 2 * mean)
    with pytest.raises(ValueError, match="mcq is None"):
        P.teacher_rewards(mean, None, alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        P.teacher_rewards(mean, mcq, alpha=1.5)
    with pytest.raises(ValueError, match="beta"):
        P.teacher_rewards(mean, mcq, alpha=0.5, beta=0.0)


# --------------------------------------------------------------------------- 6. MCQ scoring


def test_mcq_scores_follow_the_reference_accumulation():
    # reference loop: each pair (i<j) asked once with i as A; cands_prob[i] += P(A), cands_prob[j] += P(B)
    rng = random.Random(0)
    n = 4
    pairs = {(i, j): (rng.random(), rng.random()) for i, j in itertools.combinations(range(n), 2)}
    cands = [1e-8] * n
    for (i, j), (pa, pb) in pairs.items():
        cands[i] += pa
        cands[j] += pb
    expected = [math.log(c / (n - 1)) for c in cands]
    p_first = torch.full((1, n, n), 123.0, dtype=torch.float64)  # the diagonal must be ignored
    for (i, j), (pa, pb) in pairs.items():
        p_first[0, i, j], p_first[0, j, i] = pa, pb
    got = P.mcq_scores(p_first)
    assert got[0].tolist() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="negative"):
        P.mcq_scores(torch.log(p_first.clamp_max(0.9)))


def test_letter_probability_counts_short_tokens_containing_the_letter():
    lp = {"A": -0.5, " A": -1.5, "A)": -2.0, " A)": -1.0, "AB": -3.0, "B": -0.7, "a": -2.5, "None": -4.0}
    # by hand: "A", " A", "A)", "AB" contain "A" and are under 3 characters; " A)" is 3 long; "a" is lower case
    expected_a = 1e-8 + math.exp(-0.5) + math.exp(-1.5) + math.exp(-2.0) + math.exp(-3.0)
    expected_b = 1e-8 + math.exp(-0.7) + math.exp(-3.0)
    assert P.letter_probability(lp, "A") == pytest.approx(expected_a, rel=1e-12)
    assert P.letter_probability(lp, "B") == pytest.approx(expected_b, rel=1e-12)
    assert P.letter_probability({"None": -0.1}, "A") == 1e-8
    with pytest.raises(ValueError, match="letter"):
        P.letter_probability(lp, "")


def test_mcq_prompt_structure():
    text = P.mcq_prompt("What is 2+2?", "It is 4.", "Five.")
    for needle in ("What is 2+2?", 'A) """\nIt is 4.\n"""', 'B) """\nFive.\n"""', "None", "relevance"):
        assert needle in text
    assert text.index("What is 2+2?") < text.index("A) ") < text.index("B) ")
    assert text.rstrip().endswith("best response:")


# --------------------------------------------------------------------------- 7. diverse selection


@functools.cache
def edit_distance_recursive(a: str, b: str) -> int:
    if not a or not b:
        return len(a) + len(b)
    return min(
        edit_distance_recursive(a[1:], b) + 1,
        edit_distance_recursive(a, b[1:]) + 1,
        edit_distance_recursive(a[1:], b[1:]) + (a[0] != b[0]),
    )


def test_levenshtein_known_pairs_and_brute_force():
    assert P.levenshtein("kitten", "sitting") == 3
    assert P.levenshtein("", "abc") == 3 and P.levenshtein("abc", "") == 3 and P.levenshtein("", "") == 0
    assert P.levenshtein("flaw", "lawn") == 2
    rng = random.Random(1)
    for _ in range(300):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        b = "".join(rng.choice("abc") for _ in range(rng.randint(0, 7)))
        assert P.levenshtein(a, b) == edit_distance_recursive(a, b), (a, b)
        assert P.levenshtein(b, a) == P.levenshtein(a, b)


def test_select_diverse_picks_the_farthest():
    texts = ["aaaaaa", "aaaaab", "zzzzzz", "aaazzz", "aaaabb"]
    # from "aaaaaa": "zzzzzz" is 6 away (farthest); then min distances: "aaaaab" 1, "aaazzz" 3, "aaaabb" 2
    assert P.select_diverse(texts, 3) == [0, 2, 3]
    assert P.select_diverse(["ab", "cd", "ef"], 2) == [0, 1]  # a tie goes to the lower index


def test_select_diverse_greedy_invariant_on_random_texts():
    # each step adds the unselected text farthest (min edit distance) from those already chosen
    rng = random.Random(2)
    checked = 0
    for _ in range(20):
        texts = ["".join(rng.choice("abcd") for _ in range(rng.randint(3, 8))) for _ in range(6)]
        chosen = P.select_diverse(texts, 4)
        if chosen is None:
            continue
        checked += 1
        assert chosen[0] == 0 and len(set(chosen)) == 4
        for step in range(1, 4):
            gaps = {
                i: min(edit_distance_recursive(texts[i], texts[j]) for j in chosen[:step])
                for i in range(6)
                if i not in chosen[:step]
            }
            best = max(gaps.values())
            assert chosen[step] == min(i for i, gap in gaps.items() if gap == best)
    assert checked >= 15


def test_select_diverse_drops_duplicates_and_keeps_order_when_nothing_to_drop():
    assert P.select_diverse(["same", "same", "same"], 2) is None
    assert P.select_diverse(["x", "yy", "x"], 3) is None
    # nothing to drop: the reference skips selection, so the original order stays (greedy would give 0, 2, 1)
    assert P.select_diverse(["aaaa", "aaab", "zzzz"], 3) == [0, 1, 2]
    assert P.select_diverse(["aaaa", "aaab", "zzzz", "aaaa"], 3) == [0, 2, 1]
    with pytest.raises(ValueError, match="n=4"):
        P.select_diverse(["a", "b"], 4)
