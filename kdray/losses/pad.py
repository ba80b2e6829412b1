"""PAD, preference-aligned distillation (METHODS.md §3; reference EganGu/PAD, REFERENCES.md Part 2 §2).

The student learns the teacher's *preference distribution* over its own sampled responses, not the
teacher's tokens. Each of n responses gets a scalar reward from each side (student: β · mean token
log-prob; teacher: β · (α · mean teacher log-prob + (1−α) · pairwise-MCQ score)); each reward vector
induces a Plackett–Luce distribution over all n! rankings; the loss is a divergence between the two.

Everything here is pure math (torch + stdlib), so it can be checked against brute force: ranking
distributions, the "jsd" (probabilistic) and "vanilla" (ranking likelihood) losses, the reward
formulas, the MCQ scoring rules, and the edit-distance diversity selection of the data pipeline.
Where the reference code has a quirk, the textbook form is the default and the quirk is a flag.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Mapping, Sequence

import torch

from kdray.losses.divergences import jsd_from_logprobs, loss_dtype

Tensor = torch.Tensor

#: n! rankings are enumerated: 8! = 40320 is the most that stays cheap (9! = 362880 per example).
MAX_RESPONSES = 8
#: "jsd" = JSD(0.5) between ranking distributions (reference `loss_type="pd"`, the paper's
#: probabilistic loss); "vanilla" = −log PL likelihood of the teacher's ranking (reference `"rd"`).
PAD_LOSSES = ("jsd", "vanilla")
#: "textbook" = ½[KL(P_T‖M) + KL(P_S‖M)] per example; "reference" = the reference code's form.
JSD_FORMS = ("textbook", "reference")
#: The reference's additive floor on every MCQ probability (per letter and per score).
MCQ_EPSILON = 1e-8

_JUDGE_INSTRUCTION = (
    "You will judge two responses to the same query and decide which one is better, weighing their "
    "relevance, accuracy, completeness, coherence and clarity.\n"
    "Reply with the identifier of the better response only: A or B. If neither response meets these "
    'criteria, or the two are too alike to tell apart, reply "None".'
)


# --------------------------------------------------------------------------- Plackett–Luce rankings


@functools.cache
def _permutation_table(n: int, device: torch.device) -> Tensor:
    """All n! rankings as a (n!, n) index tensor, in `itertools.permutations` order, built once per n."""
    return torch.tensor(list(itertools.permutations(range(n))), dtype=torch.long, device=device)


def _check_rewards(who: str, rewards: Tensor) -> None:
    if rewards.dim() != 2:
        raise ValueError(f"{who}: rewards must have shape (batch, n_responses), got {tuple(rewards.shape)}")
    if rewards.shape[-1] < 2:
        raise ValueError(f"{who}: a ranking needs at least 2 responses per example, got {rewards.shape[-1]}")
    if not rewards.is_floating_point():
        raise ValueError(f"{who}: rewards must be a floating-point tensor, got {rewards.dtype}")


def _ranking_logprob(rewards: Tensor, rankings: Tensor) -> Tensor:
    """log PL(τ) for rankings (B or 1, m, n) of rewards (B, n) -> (B, m).

    log P(τ) = Σ_k [r_{τ_k} − logsumexp_{l ≥ k} r_{τ_l}]: the items not yet placed at step k are exactly
    the tail of the ranking, so every denominator comes from one reversed logcumsumexp (no masking).
    """
    b, n = rewards.shape
    m = rankings.shape[1]
    ordered = rewards.unsqueeze(1).expand(b, m, n).gather(-1, rankings.expand(b, m, n))
    tails = torch.logcumsumexp(ordered.flip(-1), dim=-1).flip(-1)
    return (ordered - tails).sum(-1)


def ranking_distribution(rewards: Tensor) -> Tensor:
    """Plackett–Luce log-probabilities of all n! rankings, (B, n) -> (B, n!), float32 or wider.

    A ranking lists the responses from first to last place; column c is the c-th tuple of
    `itertools.permutations(range(n))`. Differentiable in `rewards`. The full enumeration is what PAD
    uses (not a sampled subset), so n is capped at `MAX_RESPONSES`.
    """
    _check_rewards("ranking_distribution", rewards)
    n = rewards.shape[-1]
    if n > MAX_RESPONSES:
        raise ValueError(
            f"ranking_distribution: n_responses={n} would enumerate {math.factorial(n)} rankings per "
            f"example; use at most {MAX_RESPONSES} responses per prompt, or loss='vanilla' "
            "(one ranking, no enumeration)"
        )
    table = _permutation_table(n, rewards.device)
    return _ranking_logprob(rewards.to(loss_dtype(rewards)), table.unsqueeze(0))


# --------------------------------------------------------------------------- losses


def _reference_jsd(log_ps: Tensor, log_pt: Tensor) -> Tensor:
    """The reference code's "JSD", per example (B,), reproduced on purpose.

    The reference forms log M = logsumexp(cat((logP_S, logP_T), dim 0), dim 0) + log ½: one (1, n!) row
    summed over *every row of both batches*, so M = ½ Σ_b (P_S[b] + P_T[b]) is shared by the batch and
    has total mass B (a distribution only when B = 1). It then calls
    `F.kl_div(logP, logM, reduction="none", log_target=True).sum(-1)` for each side; `F.kl_div(input,
    target)` is KL(target‖input), so each term is Σ_τ M(τ)(log M(τ) − log P[b](τ)), i.e. the reverse of
    the textbook direction. The value returned is ½[that for P_S + that for P_T] per example; `pad_loss`
    then takes the batch mean, as the reference's `.mean()` does. `F.kl_div`'s default reduction
    ("mean", over all B·n! elements) is *not* what the reference uses, so it is not reproduced.
    """
    log_m = torch.logsumexp(torch.cat((log_ps, log_pt), dim=0), dim=0, keepdim=True) + math.log(0.5)
    m = log_m.exp()
    return 0.5 * ((m * (log_m - log_ps)).sum(-1) + (m * (log_m - log_pt)).sum(-1))


def pad_loss(
    student_rewards: Tensor,
    teacher_rewards: Tensor,
    loss: str = "jsd",
    *,
    jsd_form: str = "textbook",
) -> Tensor:
    """PAD loss between (B, n) student and teacher rewards, a scalar mean over the batch.

    "jsd": JSD(0.5) between the two ranking distributions, ½[KL(P_T‖M) + KL(P_S‖M)] with
    M = ½(P_T + P_S) per example (log space, bounded by log 2). `jsd_form="reference"` reproduces the
    reference code instead (see `_reference_jsd`): reversed KL direction and a mixture shared across the
    batch, kept so runs can be compared with the paper's numbers. "vanilla": −log P_S(τ_T), the
    student's Plackett–Luce log-likelihood of the teacher's ranking (rewards high to low; ties go to the
    lower index, which the reference's unstable argsort leaves unspecified).

    The teacher's rewards are targets: they are detached here, so no gradient ever reaches them.
    """
    if loss not in PAD_LOSSES:
        raise ValueError(f"pad_loss: unknown loss {loss!r}; choose one of {list(PAD_LOSSES)}")
    if jsd_form not in JSD_FORMS:
        raise ValueError(f"pad_loss: unknown jsd_form {jsd_form!r}; choose one of {list(JSD_FORMS)}")
    _check_rewards("pad_loss (student_rewards)", student_rewards)
    _check_rewards("pad_loss (teacher_rewards)", teacher_rewards)
    if student_rewards.shape != teacher_rewards.shape:
        raise ValueError(
            f"pad_loss: student_rewards {tuple(student_rewards.shape)} and teacher_rewards "
            f"{tuple(teacher_rewards.shape)} differ; both must score the same (batch, n_responses)"
        )
    dtype = torch.promote_types(loss_dtype(student_rewards), loss_dtype(teacher_rewards))
    student = student_rewards.to(dtype)
    teacher = teacher_rewards.detach().to(dtype)

    if loss == "vanilla":
        order = torch.sort(teacher, dim=-1, descending=True, stable=True).indices
        return -_ranking_logprob(student, order.unsqueeze(1)).squeeze(1).mean()

    log_ps, log_pt = ranking_distribution(student), ranking_distribution(teacher)
    if jsd_form == "reference":
        return _reference_jsd(log_ps, log_pt).mean()
    return jsd_from_logprobs(log_ps, log_pt, beta=0.5).mean()


# --------------------------------------------------------------------------- rewards


def _check_beta(who: str, beta: float) -> None:
    # β ≤ 0 would flip (or erase) every ranking; β is a sharpness, not a sign
    if not (beta > 0 and math.isfinite(beta)):
        raise ValueError(f"{who}: beta={beta!r} must be a positive finite number (PAD uses 10)")


def student_rewards(logprobs: Tensor, mask: Tensor, beta: float = 10.0) -> Tensor:
    """β · per-token mean log-prob of each response, (B, n, T) -> (B, n), with gradient.

    Length-normalised like the reference (`average_log_prob=True`): a sum would rank short answers
    first. Positions outside `mask` never contribute, whatever they hold (even -inf or NaN).
    """
    _check_beta("student_rewards", beta)
    if logprobs.dim() != 3 or mask.shape != logprobs.shape:
        raise ValueError(
            f"student_rewards: logprobs {tuple(logprobs.shape)} and mask {tuple(mask.shape)} must both be "
            "(batch, n_responses, tokens)"
        )
    keep = mask.bool()
    counts = keep.sum(-1)
    empty = (counts == 0).nonzero()
    if empty.numel():
        b, i = empty[0].tolist()
        raise ValueError(
            f"student_rewards: example {b}, response {i} has no counted tokens in mask; a mean log-prob "
            "needs at least one response token (drop empty responses when building the batch)"
        )
    dtype = loss_dtype(logprobs)
    total = torch.where(keep, logprobs.to(dtype), torch.zeros((), dtype=dtype, device=logprobs.device))
    return beta * total.sum(-1) / counts.to(dtype)


def teacher_rewards(
    teacher_mean_logprob: Tensor, mcq: Tensor | None, *, alpha: float, beta: float = 10.0
) -> Tensor:
    """β · (α · mean teacher log-prob + (1−α) · MCQ score), (B, n) -> (B, n).

    β scales both parts, so the MCQ log-probability is sharpened by β too, as in the reference. Terms
    with a zero weight are left out rather than multiplied by 0, so an unused input may hold -inf.
    """
    _check_beta("teacher_rewards", beta)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"teacher_rewards: alpha={alpha!r} is outside [0, 1] (0 = MCQ only, 1 = likelihood)")
    if mcq is None:
        if alpha != 1.0:
            raise ValueError(
                f"teacher_rewards: mcq is None but alpha={alpha!r} gives it weight {1.0 - alpha!r}; pass "
                "mcq_scores(...) or set alpha=1 (teacher likelihood only)"
            )
        return beta * teacher_mean_logprob.to(loss_dtype(teacher_mean_logprob))
    if mcq.shape != teacher_mean_logprob.shape:
        raise ValueError(
            f"teacher_rewards: mcq {tuple(mcq.shape)} and teacher_mean_logprob "
            f"{tuple(teacher_mean_logprob.shape)} must both be (batch, n_responses)"
        )
    dtype = torch.promote_types(loss_dtype(teacher_mean_logprob), loss_dtype(mcq))
    if alpha == 0.0:
        return beta * mcq.to(dtype)
    if alpha == 1.0:
        return beta * teacher_mean_logprob.to(dtype)
    return beta * (alpha * teacher_mean_logprob.to(dtype) + (1.0 - alpha) * mcq.to(dtype))


# --------------------------------------------------------------------------- teacher MCQ judging


def mcq_scores(p_first: Tensor) -> Tensor:
    """MCQ score of each response, (B, n, n) -> (B, n): log((1e-8 + Σ_{j≠i} p_first[b, i, j]) / (n−1)).

    `p_first[b, i, j]` is the teacher's probability that response i beats response j. In the reference
    only pairs i < j are asked, with i always shown as A: there p_first[i, j] = P("A") and
    p_first[j, i] = P("B") of the same question. The diagonal is ignored. The scores are log mean
    win-probabilities, not normalised across responses (neither is the reference's).
    """
    if p_first.dim() != 3 or p_first.shape[-1] != p_first.shape[-2] or p_first.shape[-1] < 2:
        raise ValueError(
            f"mcq_scores: p_first must have shape (batch, n, n) with n >= 2, got {tuple(p_first.shape)}"
        )
    n = p_first.shape[-1]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=p_first.device)
    if bool((p_first[:, off_diagonal] < 0).any()):
        raise ValueError(
            "mcq_scores: p_first holds negative values; pass win probabilities (letter_probability), "
            "not log-probabilities"
        )
    p = p_first.to(loss_dtype(p_first))
    wins = torch.where(off_diagonal, p, torch.zeros((), dtype=p.dtype, device=p.device)).sum(-1)
    return torch.log((MCQ_EPSILON + wins) / (n - 1))


def letter_probability(top_logprobs: Mapping[str, float], letter: str) -> float:
    """The reference's probability that the judge's one generated token names `letter`.

    1e-8 + Σ exp(lp) over the top tokens whose decoded text contains `letter` and is shorter than 3
    characters. Reading of the reference (`prob.py`, `stat_prob`): the text is the raw decoded token,
    *not stripped*, so "A", " A" and "A)" count but " A)" does not; a text such as "AB" counts for both
    letters; the sum is not renormalised over the letters. Keys are decoded texts: where several token
    ids decode to the same text the reference counts each, so merge them (log-add) before calling.
    """
    if not letter:
        raise ValueError("letter_probability: letter is empty; pass the identifier, e.g. 'A' or 'B'")
    total = sum(math.exp(lp) for text, lp in top_logprobs.items() if letter in text and len(text) < 3)
    return MCQ_EPSILON + total


def mcq_prompt(question: str, first: str, second: str) -> str:
    """The pairwise judge's single user message: which of two responses to `question` is better.

    The judging instruction is part of the user turn, as the reference does for chat templates without
    a system role, so one message works with every template. `first` is shown as A, `second` as B;
    the caller chooses the order (and cuts over-long responses to its token budget, the reference's
    2500 teacher tokens + "...").
    """
    return (
        f"{_JUDGE_INSTRUCTION}\n\n"
        f"### Query\n{question}\n\n"
        "### Candidate responses\n"
        f'A) """\n{first}\n"""\n'
        f'B) """\n{second}\n"""\n\n'
        "### Verdict\n"
        "Identifier of the best response:"
    )


# --------------------------------------------------------------------------- diverse response selection


def levenshtein(a: str, b: str) -> int:
    """Character edit distance (insertions, deletions, substitutions each cost 1).

    Plain two-row dynamic programme, O(len(a)·len(b)) time; a shared prefix and suffix are stripped
    first since they never change the distance (cheap, and near-duplicate samples are common).
    """
    start = 0
    while start < len(a) and start < len(b) and a[start] == b[start]:
        start += 1
    end_a, end_b = len(a), len(b)
    while end_a > start and end_b > start and a[end_a - 1] == b[end_b - 1]:
        end_a -= 1
        end_b -= 1
    a, b = a[start:end_a], b[start:end_b]
    if len(a) < len(b):
        a, b = b, a  # the row runs over the shorter string
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def select_diverse(texts: Sequence[str], n: int) -> list[int] | None:
    """Pick n mutually different responses by greedy farthest-point selection, as the reference does.

    Start at index 0, then repeatedly add the candidate whose smallest edit distance to the selected
    set is largest (ties: lowest index). Returns indices in selection order, or None when the selected
    texts are not all distinct (the reference drops such prompts). When n == len(texts) the reference
    skips selection and keeps the original order, so this does too; the order matters downstream
    because the first response of a pair is shown to the judge as A.
    """
    if not 1 <= n <= len(texts):
        raise ValueError(f"select_diverse: n={n} must be between 1 and the number of texts ({len(texts)})")
    if n == len(texts):
        selected = list(range(n))
    else:
        selected = [0]
        nearest = {i: levenshtein(texts[i], texts[0]) for i in range(1, len(texts))}
        while len(selected) < n:
            best = max(sorted(nearest), key=lambda i: nearest[i])  # max keeps the first: lowest index
            selected.append(best)
            del nearest[best]
            for i in nearest:
                nearest[i] = min(nearest[i], levenshtein(texts[i], texts[best]))
    if len({texts[i] for i in selected}) != n:
        return None
    return selected
