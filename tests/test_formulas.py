"""Every objective recomputed from METHODS.md §1–§3 in float64 numpy (never by calling kdray), on tiny inputs.

Inputs: B=2, T=4, V=6; row 0 has a masked prompt token in front, row 1 is right-padded (5 counted tokens
locally) and the loss is normalised by a *global* count of 9 (another shard holds 4 more tokens).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdray.losses import build_objective, divergence, sparse_divergence, xkd_loss

B, T, V = 2, 4, 6
MASK = np.array([[0, 1, 1, 1], [1, 1, 0, 0]], dtype=bool)
LOCAL_TOKENS, GLOBAL_TOKENS = int(MASK.sum()), 9
RTOL, ATOL = 1e-10, 1e-12

# METHODS.md §1: "divide both logits by τ before softmax; multiply the KL by τ²". The KL-type rows
# (KL, reverse KL, JSD and the skews, all built from KLs) get τ²; TVD is not a KL and does not.
KL_TYPE = {"forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl"}


# ---------------------------------------------------------------- numpy reference (float64, no kdray)
def logsumexp(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    return (m + np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True)))[..., 0]


def log_softmax(x: np.ndarray) -> np.ndarray:
    return x - logsumexp(x)[..., None]


def kl(lp_a: np.ndarray, lp_b: np.ndarray) -> np.ndarray:
    return np.sum(np.exp(lp_a) * (lp_a - lp_b), axis=-1)


def log_mix(lp_a: np.ndarray, lp_b: np.ndarray, w: float) -> np.ndarray:
    """log(w·a + (1−w)·b) by logsumexp over the two components."""
    return logsumexp(np.stack([lp_a + math.log(w), lp_b + math.log1p(-w)], axis=-1))


def np_divergence(name: str, lq: np.ndarray, lp: np.ndarray, beta: float = 0.5, alpha: float = 0.1):
    """Per-position divergence between log-probs lq (student) and lp (teacher), METHODS.md §1."""
    if name == "forward_kl" or (name == "jsd" and beta == 0.0):
        return kl(lp, lq)
    if name == "reverse_kl" or (name == "jsd" and beta == 1.0):
        return kl(lq, lp)
    if name == "jsd":
        m = log_mix(lp, lq, beta)
        return beta * kl(lp, m) + (1 - beta) * kl(lq, m)
    if name == "skew_kl":
        return kl(lp, log_mix(lp, lq, alpha))
    if name == "skew_reverse_kl":
        return kl(lq, log_mix(lq, lp, alpha))
    assert name == "tvd"
    return 0.5 * np.abs(np.exp(lp) - np.exp(lq)).sum(-1)


def np_dense(name: str, zs: np.ndarray, zt: np.ndarray, tau: float = 1.0, **params: float) -> np.ndarray:
    values = np_divergence(name, log_softmax(zs / tau), log_softmax(zt / tau), **params)
    return values * tau**2 if name in KL_TYPE else values


def np_mean(values: np.ndarray, mask: np.ndarray, n: float) -> float:
    return float(np.where(mask, values, 0.0).sum() / n)


def np_ce(z: np.ndarray, targets: np.ndarray) -> np.ndarray:
    safe = np.where(targets >= 0, targets, 0)
    return -np.take_along_axis(log_softmax(z), safe[..., None], -1)[..., 0]


# ---------------------------------------------------------------- inputs
def make_inputs(seed: int = 0):
    rng = np.random.default_rng(seed)
    zs = 1.5 * rng.normal(size=(B, T, V))
    zt = 2.0 * rng.normal(size=(B, T, V))
    targets = rng.integers(0, V, size=(B, T))
    targets[~MASK] = -100  # padded labels: the mask must drop them
    return zs, zt, targets


def tt(x: np.ndarray, grad: bool = False) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64, requires_grad=grad)


def close(actual, expected, rtol: float = RTOL, atol: float = ATOL) -> None:
    actual = actual.detach().numpy() if isinstance(actual, torch.Tensor) else np.asarray(actual)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


DIVERGENCE_CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    *[("jsd", {"beta": b}) for b in (0.0, 0.1, 0.5, 0.9, 1.0)],
    ("tvd", {}),
    ("skew_kl", {"alpha": 0.1}),
    ("skew_reverse_kl", {"alpha": 0.1}),
]
CASE_IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in p.items())}" for n, p in DIVERGENCE_CASES]


# ---------------------------------------------------------------- §1 dense divergences
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize(("name", "params"), DIVERGENCE_CASES, ids=CASE_IDS)
def test_dense_divergence_per_token_and_masked_mean(name, params, tau):
    zs, zt, targets = make_inputs()
    expected = np_dense(name, zs, zt, tau, **params)
    close(divergence(name, tt(zs), tt(zt), temperature=tau, **params), expected)

    objective = build_objective([{"name": name, "params": {**params, "temperature": tau}}])
    batch = {"target_ids": torch.tensor(targets), "mask": torch.tensor(MASK)}
    signal = {"teacher_logits": tt(zt)}
    for n in (GLOBAL_TOKENS, None):
        loss, logs = objective(tt(zs), batch, signal, num_tokens=n)
        want = np_mean(expected, MASK, n or LOCAL_TOKENS)
        close(loss, want)
        close(logs[name], want)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_jsd_endpoints_are_exactly_forward_and_reverse_kl(tau):
    zs, zt, _ = make_inputs(1)
    s, t = tt(zs), tt(zt)
    assert torch.equal(
        divergence("jsd", s, t, temperature=tau, beta=0.0), divergence("forward_kl", s, t, temperature=tau)
    )
    assert torch.equal(
        divergence("jsd", s, t, temperature=tau, beta=1.0), divergence("reverse_kl", s, t, temperature=tau)
    )
    # and the numpy endpoints are the KLs, not the (vanishing) interior formula
    close(np_dense("jsd", zs, zt, tau, beta=0.0), np_dense("forward_kl", zs, zt, tau), rtol=0, atol=0)
    assert np.all(np_dense("jsd", zs, zt, tau, beta=1e-9) < 1e-6)


# ---------------------------------------------------------------- objective: weights, CE, global count
@pytest.mark.parametrize("num_tokens", [GLOBAL_TOKENS, None])
def test_objective_weighted_sum_with_ce(num_tokens):
    zs, zt, targets = make_inputs(2)
    objective = build_objective(
        [
            {"name": "ce", "weight": 0.3},
            {"name": "forward_kl", "weight": 0.5, "params": {"temperature": 2.0}},
            {"name": "jsd", "weight": 0.2, "params": {"beta": 0.3}},
        ]
    )
    batch = {"target_ids": torch.tensor(targets), "mask": torch.tensor(MASK)}
    loss, logs = objective(tt(zs), batch, {"teacher_logits": tt(zt)}, num_tokens=num_tokens)
    n = num_tokens or LOCAL_TOKENS
    terms = {
        "ce": np_mean(np_ce(zs, targets), MASK, n),
        "forward_kl": np_mean(np_dense("forward_kl", zs, zt, 2.0), MASK, n),
        "jsd": np_mean(np_dense("jsd", zs, zt, beta=0.3), MASK, n),
    }
    for label, want in terms.items():
        close(logs[label], want)
    close(loss, 0.3 * terms["ce"] + 0.5 * terms["forward_kl"] + 0.2 * terms["jsd"])
    # shards divided by the global count add up to the whole batch
    if num_tokens is not None:
        shards = [
            objective(
                tt(zs[i : i + 1]),
                {k: v[i : i + 1] for k, v in batch.items()},
                {"teacher_logits": tt(zt[i : i + 1])},
                num_tokens=n,
            )[0]
            for i in range(B)
        ]
        close(sum(shards), float(loss))


# ---------------------------------------------------------------- §2 sparse top-k teacher signal
def np_sparse(name: str, zs, zt, k: int, mode: str, **params) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(per-position value, topk_ids, topk_logprobs) of the coarsened pair, temperature 1."""
    lp_full, lq_full = log_softmax(zt), log_softmax(zs)
    ids = np.argsort(-lp_full, axis=-1, kind="stable")[..., :k]
    topk_lp = np.take_along_axis(lp_full, ids, -1)  # full-vocabulary log-probs, not renormalised
    student_lp = np.take_along_axis(lq_full, ids, -1)
    if mode == "renormalize":
        lp, lq = topk_lp - logsumexp(topk_lp)[..., None], student_lp - logsumexp(student_lp)[..., None]
    elif k == V:  # both tails are empty: the (k+1)-th category carries no mass on either side
        lp, lq = topk_lp, student_lp
    else:
        teacher_tail = np.log(-np.expm1(np.minimum(logsumexp(topk_lp), 0.0)))
        student_tail = np.log1p(-np.exp(student_lp).sum(-1))
        lp = np.concatenate([topk_lp, teacher_tail[..., None]], -1)
        lq = np.concatenate([student_lp, student_tail[..., None]], -1)
    return np_divergence(name, lq, lp, **params), ids, topk_lp


SPARSE_CASES = [c for c in DIVERGENCE_CASES if c[1].get("beta") not in (0.1, 0.9)]


@pytest.mark.parametrize("mode", ["tail", "renormalize"])
@pytest.mark.parametrize("k", [3, V])
@pytest.mark.parametrize(
    ("name", "params"), SPARSE_CASES, ids=[CASE_IDS[DIVERGENCE_CASES.index(c)] for c in SPARSE_CASES]
)
def test_sparse_topk(name, params, k, mode):
    zs, zt, targets = make_inputs(3)
    expected, ids, topk_lp = np_sparse(name, zs, zt, k, mode, **params)
    ids_t = torch.tensor(ids, dtype=torch.int32)
    close(sparse_divergence(name, tt(zs), ids_t, tt(topk_lp), mode=mode, **params), expected)
    if k == V:  # the coarsening is the identity: sparse equals dense (METHODS.md §2)
        close(expected, np_dense(name, zs, zt, **params))
    else:  # a lower bound of the full-vocabulary value (data processing), for the tail bucket
        assert mode != "tail" or np.all(expected <= np_dense(name, zs, zt, **params) + 1e-12)

    objective = build_objective([{"name": name, "params": {**params, "sparse_mode": mode}}])
    batch = {"target_ids": torch.tensor(targets), "mask": torch.tensor(MASK)}
    loss, _ = objective(
        tt(zs), batch, {"topk_ids": ids_t, "topk_logprobs": tt(topk_lp)}, num_tokens=GLOBAL_TOKENS
    )
    close(loss, np_mean(expected, MASK, GLOBAL_TOKENS))


# ---------------------------------------------------------------- §3 TAID
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("t", [0.4, 0.8])
def test_taid_value_and_gradient(t, tau):
    zs, zt, targets = make_inputs(4)
    log_pt = log_softmax(((1 - t) * zs + t * zt) / tau)  # student side is a constant here
    lq = log_softmax(zs / tau)
    per_token = tau**2 * kl(log_pt, lq)  # CE(p_t, q) − H(p_t), τ² as every KL-type loss
    # d/dz τ²·CE(p_t, softmax(z/τ)) with p_t frozen = τ·(softmax(z/τ) − p_t), per counted token / N
    grad = tau * (np.exp(lq) - np.exp(log_pt)) * MASK[..., None] / GLOBAL_TOKENS

    objective = build_objective([{"name": "taid", "params": {"temperature": tau}}])
    student = tt(zs, grad=True)
    batch = {"target_ids": torch.tensor(targets), "mask": torch.tensor(MASK)}
    loss, logs = objective(
        student, batch, {"teacher_logits": tt(zt)}, num_tokens=GLOBAL_TOKENS, runtime={"taid": {"t": t}}
    )
    close(loss, np_mean(per_token, MASK, GLOBAL_TOKENS))
    close(logs["taid/t"], t, rtol=1e-6)  # a logged scalar (float32)
    loss.backward()
    close(student.grad, grad)


# ---------------------------------------------------------------- §3 X-KD
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
LAMBDA_TD, LAMBDA_KL = 0.7, 0.3


def np_xkd(z, mu, log_sigma, zt, targets, *, variant, q_form, tau_q, gamma, terminal):
    """(total, {term: value}) of METHODS.md §3 X-KD, masked means over GLOBAL_TOKENS.

    The policy is softmax(Q) with Q = z/τ_Q throughout (imitation and TD alike); with `drop` the TD
    and prior terms count only the (s_t, a_t, s_{t+1}, a_{t+1}) pairs, as AVRIL's code forms them.
    """
    zq = z / tau_q
    imitation = np_ce(zq, targets) if variant == "sequence" else kl(log_softmax(zt), log_softmax(zq))
    q = np.take_along_axis(zq, np.where(MASK, targets, 0)[..., None], -1)[..., 0]
    if q_form == "logprobs":
        q = q - logsumexp(zq)
    has_next = np.zeros_like(MASK)
    has_next[:, :-1] = MASK[:, 1:]  # the next position is a counted response token
    q_next = np.zeros_like(q)
    q_next[:, :-1] = q[:, 1:]
    delta = q - gamma * np.where(has_next, q_next, 0.0)
    td_mask = MASK if terminal == "zero" else MASK & has_next  # drop: no pair past the last token
    sigma2 = np.exp(2 * log_sigma)
    nll = HALF_LOG_2PI + log_sigma + (delta - mu) ** 2 / (2 * sigma2)
    prior = 0.5 * (mu**2 + sigma2 - 1 - 2 * log_sigma)
    terms = {
        "imitation": np_mean(imitation, MASK, GLOBAL_TOKENS),
        "td_nll": np_mean(nll, td_mask, GLOBAL_TOKENS),
        "prior_kl": np_mean(prior, td_mask, GLOBAL_TOKENS),
    }
    return terms["imitation"] + LAMBDA_TD * terms["td_nll"] + LAMBDA_KL * terms["prior_kl"], terms


TERMINALS = ["zero", "drop"]


def kdray_xkd(zs, mu, ls, zt, targets, *, terminal=None, **kw):
    extra = {} if terminal is None else {"terminal": terminal}
    signal = {"teacher_logits": tt(zt)} if kw["variant"] == "divergence" else None
    return xkd_loss(
        zs, torch.tensor(targets), torch.tensor(MASK), mu, ls, teacher_signal=signal,
        lambda_td=LAMBDA_TD, lambda_kl=LAMBDA_KL, num_tokens=GLOBAL_TOKENS, **kw, **extra,
    )  # fmt: skip


def reward_head(seed: int):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(B, T)), 0.3 * rng.normal(size=(B, T))


@pytest.mark.parametrize("terminal", TERMINALS)
@pytest.mark.parametrize("tau_q", [1.0, 2.0])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
@pytest.mark.parametrize("q_form", ["logits", "logprobs"])
@pytest.mark.parametrize("variant", ["sequence", "divergence"])
def test_xkd_values_and_gradients(variant, q_form, gamma, tau_q, terminal):
    zs, zt, targets = make_inputs(5)
    mu, ls = reward_head(6)
    kw = {"variant": variant, "q_form": q_form, "tau_q": tau_q, "gamma": gamma}
    want, want_terms = np_xkd(zs, mu, ls, zt, targets, terminal=terminal, **kw)

    z_t, mu_t, ls_t = tt(zs, True), tt(mu, True), tt(ls, True)
    total, terms = kdray_xkd(z_t, mu_t, ls_t, zt, targets, terminal=terminal, **kw)
    for name, value in want_terms.items():
        close(terms[name], value)
    close(total, want)

    total.backward()
    flat = np.concatenate([zs.ravel(), mu.ravel(), ls.ravel()])
    sizes = np.cumsum([zs.size, mu.size])

    def f(x):
        z, m, s = np.split(x, sizes)
        return np_xkd(
            z.reshape(zs.shape),
            m.reshape(mu.shape),
            s.reshape(ls.shape),
            zt,
            targets,
            terminal=terminal,
            **kw,
        )[0]

    eps, fd = 1e-6, np.empty_like(flat)
    for i in range(flat.size):
        up, down = flat.copy(), flat.copy()
        up[i] += eps
        down[i] -= eps
        fd[i] = (f(up) - f(down)) / (2 * eps)
    g_z, g_mu, g_ls = np.split(fd, sizes)
    close(z_t.grad, g_z.reshape(zs.shape), rtol=1e-6, atol=1e-7)
    close(mu_t.grad, g_mu.reshape(mu.shape), rtol=1e-6, atol=1e-7)
    close(ls_t.grad, g_ls.reshape(ls.shape), rtol=1e-6, atol=1e-7)


def test_xkd_default_terminal_is_drop():
    zs, zt, targets = make_inputs(5)
    mu, ls = reward_head(6)
    kw = {"variant": "sequence", "q_form": "logits", "tau_q": 1.0, "gamma": 1.0}
    want, _ = np_xkd(zs, mu, ls, zt, targets, terminal="drop", **kw)
    total, _ = kdray_xkd(tt(zs), tt(mu), tt(ls), zt, targets, **kw)
    close(total, want)
