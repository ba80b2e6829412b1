"""MiniLLM against an independent float64 numpy implementation of the reference formulas.

The numpy side is written from REFERENCES.md §2 (microsoft/LMOps minillm/minillm/losses.py), not from
kdray: explicit sums for the returns, numpy statistics for the whitening, the clipped surrogate and
the reverse KL over the vocabulary (or over the top-k + tail buckets). Values must agree to ~1e-10 and
autograd gradients to central finite differences of the numpy loss.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdray.losses.minillm import minillm_loss

B, T, V = 3, 5, 7
ALPHA = 0.2  # the paper scripts' teacher_mixed_alpha, for realistic mixture log-probs


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def take(logp: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return np.take_along_axis(logp, np.maximum(ids, 0)[..., None], -1)[..., 0]


def np_minillm(
    logits: np.ndarray,
    targets: np.ndarray,
    mask: np.ndarray,
    teacher_logits: np.ndarray,
    old: np.ndarray,
    mix: np.ndarray | None,
    *,
    topk: int | None = None,
    clip: float = 0.2,
    gamma: float = 0.95,
    reward_scaling: float = 0.5,
    reward_clip: float = 100.0,
    length_normalise: bool = True,
    whiten: bool = True,
    whiten_padding: bool = False,
    single_step: bool = True,
) -> dict[str, float]:
    """The MiniLLM loss from the formulas, float64 numpy, loops where the formula is a sum."""
    b_, t_, _ = logits.shape
    n = mask.sum()
    logq_full, logp_full = log_softmax(logits), log_softmax(teacher_logits)
    logq, logp = take(logq_full, targets), take(logp_full, targets)
    # r_t = clip((log p_t − log q_old,t) / reward_scaling, ±reward_clip); none off the mask
    r = np.where(mask, np.clip((logp - old) / reward_scaling, -reward_clip, reward_clip), 0.0)
    # R_t = Σ_{k≥t} γ^{k−t} r_k, ÷ L_t = #counted tokens in [t, end] (1 if none)
    returns = np.zeros((b_, t_))
    for b in range(b_):
        for t in range(t_):
            returns[b, t] = sum(gamma ** (k - t) * r[b, k] for k in range(t, t_))
            if length_normalise:
                returns[b, t] /= max(mask[b, t:].sum(), 1)
    adv = returns
    if whiten:
        sel = returns if whiten_padding else returns[mask]
        adv = (returns - sel.mean()) / np.sqrt(sel.var() + 1e-8)  # population variance
    w = np.ones_like(old) if mix is None else np.exp(old - mix)
    ratio = np.exp(logq - old) * w
    surrogate = np.maximum(-adv * ratio, -adv * np.clip(ratio, 1 - clip, 1 + clip))
    out = {"long_term": np.where(mask, surrogate, 0.0).sum() / n}
    if single_step:
        if topk is None:  # KL(q‖p) over the vocabulary
            kl = (np.exp(logq_full) * (logq_full - logp_full)).sum(-1)
        else:  # KL over the teacher's top-k ids + one bucket for the rest
            ids = np.argsort(-teacher_logits, -1)[..., :topk]
            q_k = np.exp(np.take_along_axis(logq_full, ids, -1))
            p_k = np.exp(np.take_along_axis(logp_full, ids, -1))
            q_c = np.concatenate([q_k, 1 - q_k.sum(-1, keepdims=True)], -1)
            p_c = np.concatenate([p_k, 1 - p_k.sum(-1, keepdims=True)], -1)
            kl = (q_c * (np.log(q_c) - np.log(p_c))).sum(-1)
        out["single_step"] = np.where(mask, kl, 0.0).sum() / n
    out["loss"] = sum(out.values())
    out["reward"] = r[mask].sum() / n
    out["clip_fraction"] = (np.abs(ratio - 1) > clip)[mask].sum() / n
    out["ratio_mean"] = ratio[mask].sum() / n
    return out


def make_inputs(seed: int, old_shift: float = 0.0, mixed: bool = True) -> dict:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, T, V))
    teacher = rng.normal(size=(B, T, V)) * 1.5
    targets = rng.integers(0, V, size=(B, T))
    mask = np.ones((B, T), dtype=bool)
    mask[0, 3:] = False  # trailing padding
    mask[1, 1] = False  # a hole inside a response
    targets[0, 3:] = -100  # padded targets carry the ignore id
    # rollout-time student log-probs: near the current policy, so some tokens clip and some do not
    old = take(log_softmax(logits), targets) + rng.normal(scale=0.3, size=(B, T)) + old_shift
    logp = take(log_softmax(teacher), targets)
    # log((1−α) q_old + α p), the probability mixture sampled from
    mix = np.log((1 - ALPHA) * np.exp(old) + ALPHA * np.exp(logp)) if mixed else None
    old = np.where(mask, old, 0.0)  # the reference stores 0 off the mask
    return dict(logits=logits, targets=targets, mask=mask, teacher=teacher, old=old, mix=mix)


def signal_of(x: dict, topk: int | None) -> dict[str, torch.Tensor]:
    teacher = torch.from_numpy(x["teacher"])
    tok = torch.log_softmax(teacher, -1).gather(-1, torch.from_numpy(x["targets"]).clamp_min(0)[..., None])
    # garbage off the mask must not leak into the loss
    tok = tok.squeeze(-1).masked_fill(~torch.from_numpy(x["mask"]), float("-inf"))
    if topk is None:
        return {"teacher_logits": teacher, "token_logprobs": tok}
    lp, ids = torch.log_softmax(teacher, -1).topk(topk, -1)
    return {"topk_ids": ids, "topk_logprobs": lp, "token_logprobs": tok}


def kdray_loss(x: dict, logits: torch.Tensor, topk: int | None, **kw):
    mix = None if x["mix"] is None else torch.from_numpy(x["mix"])
    return minillm_loss(
        logits,
        torch.from_numpy(x["targets"]),
        torch.from_numpy(x["mask"]),
        signal_of(x, topk),
        torch.from_numpy(x["old"]),
        mix_logprobs=mix,
        **kw,
    )


CASES = [
    pytest.param(0, 0.0, True, None, {}, id="defaults-mixed"),
    pytest.param(1, 0.0, False, None, {}, id="defaults-pure-student"),
    pytest.param(2, -1.0, True, None, {}, id="ratio-far-from-1-mixed"),
    pytest.param(3, 0.8, False, None, {}, id="ratio-far-below-1"),
    pytest.param(4, 0.0, True, None, {"whiten_padding": True}, id="whiten-padding"),
    pytest.param(5, 0.0, True, None, {"whiten": False, "gamma": 1.0}, id="no-whiten-gamma1"),
    pytest.param(6, 0.0, True, None, {"length_normalise": False, "clip": 0.1}, id="no-length-norm"),
    pytest.param(7, 0.0, True, None, {"reward_clip": 0.5, "reward_scaling": 1.0}, id="reward-clip-binds"),
    pytest.param(8, 0.0, True, None, {"single_step": False}, id="no-single-step"),
    pytest.param(9, -0.5, True, 3, {}, id="sparse-top3"),
]


@pytest.mark.parametrize(("seed", "shift", "mixed", "topk", "kw"), CASES)
def test_values_match_numpy_reference(seed, shift, mixed, topk, kw):
    x = make_inputs(seed, shift, mixed)
    ref = np_minillm(x["logits"], x["targets"], x["mask"], x["teacher"], x["old"], x["mix"], topk=topk, **kw)
    loss, terms = kdray_loss(x, torch.from_numpy(x["logits"]), topk, **kw)
    assert loss.dtype == torch.float64
    np.testing.assert_allclose(loss.item(), ref["loss"], rtol=1e-10, atol=1e-10)
    for key in ("long_term", "reward", "clip_fraction", "ratio_mean") + (
        ("single_step",) * ("single_step" in ref)
    ):
        np.testing.assert_allclose(terms[key].item(), ref[key], rtol=1e-10, atol=1e-10, err_msg=key)
    assert ("single_step" in terms) == kw.get("single_step", True)
    if shift != 0.0:  # the far-off-policy cases really exercise the clip
        assert ref["clip_fraction"] > 0.5


def numpy_gradient(x: dict, topk: int | None, eps: float = 1e-6, **kw) -> np.ndarray:
    grad = np.zeros_like(x["logits"])
    for idx in np.ndindex(*x["logits"].shape):
        hi, lo = x["logits"].copy(), x["logits"].copy()
        hi[idx] += eps
        lo[idx] -= eps
        args = (x["targets"], x["mask"], x["teacher"], x["old"], x["mix"])
        f_hi = np_minillm(hi, *args, topk=topk, **kw)["loss"]
        f_lo = np_minillm(lo, *args, topk=topk, **kw)["loss"]
        grad[idx] = (f_hi - f_lo) / (2 * eps)
    return grad


@pytest.mark.parametrize(("seed", "shift", "mixed", "topk", "kw"), CASES)
def test_gradient_matches_numpy_finite_differences(seed, shift, mixed, topk, kw):
    x = make_inputs(seed, shift, mixed)
    logits = torch.from_numpy(x["logits"]).requires_grad_()
    kdray_loss(x, logits, topk, **kw)[0].backward()
    expected = numpy_gradient(x, topk, **kw)
    np.testing.assert_allclose(logits.grad.numpy(), expected, rtol=1e-6, atol=1e-6)
    # padded positions get no gradient at all
    assert (logits.grad.numpy()[~x["mask"]] == 0).all()


def test_numpy_reference_is_sensitive():
    # guards the comparison itself: each knob moves the reference value, so agreement means something
    x = make_inputs(0)
    args = (x["logits"], x["targets"], x["mask"], x["teacher"], x["old"], x["mix"])
    base = np_minillm(*args)["loss"]
    for kw in (
        {"whiten_padding": True},
        {"whiten": False},
        {"gamma": 1.0},
        {"length_normalise": False},
        {"reward_scaling": 1.0, "whiten": False},  # whitening alone cancels a common scale
        {"reward_clip": 0.1},
        {"clip": 0.05},
        {"single_step": False},
    ):
        assert abs(np_minillm(*args, **kw)["loss"] - base) > 1e-6, kw
    assert abs(np_minillm(*args[:-1], None)["loss"] - base) > 1e-6
