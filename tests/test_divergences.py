"""§1 divergences against direct reference formulas, and the invariants METHODS.md requires."""

from __future__ import annotations

import pytest
import torch

from kdray.losses import divergences as D

NAMES = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]
SHAPES = [(1, 1, 5), (2, 3, 17), (3, 4, 50)]


def reference(name: str, s: torch.Tensor, t: torch.Tensor, tau: float, **kw: float) -> torch.Tensor:
    """Textbook formulas on explicit probability vectors, in float64."""
    q = torch.softmax(s.double() / tau, -1)
    p = torch.softmax(t.double() / tau, -1)

    def kl(a, b):
        return (a * (a.log() - b.log())).sum(-1)

    if name == "forward_kl":
        v = kl(p, q)
    elif name == "reverse_kl":
        v = kl(q, p)
    elif name == "jsd":
        beta = kw.get("beta", 0.5)
        m = beta * p + (1 - beta) * q
        v = beta * kl(p, m) + (1 - beta) * kl(q, m)
    elif name == "skew_kl":
        a = kw.get("alpha", 0.1)
        v = kl(p, a * p + (1 - a) * q)
    elif name == "skew_reverse_kl":
        a = kw.get("alpha", 0.1)
        v = kl(q, a * q + (1 - a) * p)
    else:
        return 0.5 * (p - q).abs().sum(-1)
    return v * tau**2


def logits_pair(shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale, torch.randn(shape, generator=g) * scale


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.5])
def test_matches_reference_formula(name, shape, tau):
    s, t = logits_pair(shape, seed=hash((name, shape, tau)) % 1000)
    got = getattr(D, name)(s, t, temperature=tau)
    assert got.shape == shape[:2]
    torch.testing.assert_close(got.double(), reference(name, s, t, tau), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_interior_beta_matches_reference(beta):
    s, t = logits_pair((2, 5, 30), seed=3)
    torch.testing.assert_close(
        D.jsd(s, t, beta=beta).double(), reference("jsd", s, t, 1.0, beta=beta), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("alpha", [0.05, 0.3])
@pytest.mark.parametrize("name", ["skew_kl", "skew_reverse_kl"])
def test_skew_alpha_matches_reference(name, alpha):
    s, t = logits_pair((2, 5, 30), seed=4)
    got = getattr(D, name)(s, t, alpha=alpha).double()
    torch.testing.assert_close(got, reference(name, s, t, 1.0, alpha=alpha), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_identical_inputs_give_zero(name):
    s, _ = logits_pair((3, 7, 40), seed=5)
    assert getattr(D, name)(s, s.clone()).abs().max() < 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_non_negative_in_float32(name):
    for seed in range(5):
        s, t = logits_pair((4, 8, 64), seed=seed, scale=8.0)
        assert getattr(D, name)(s, t).min() >= -1e-6


def test_jsd_endpoints_are_exactly_forward_and_reverse_kl():
    s, t = logits_pair((2, 6, 33), seed=6)
    assert torch.equal(D.jsd(s, t, beta=0.0), D.forward_kl(s, t))
    assert torch.equal(D.jsd(s, t, beta=1.0), D.reverse_kl(s, t))
    # and the interior is *not* the endpoint: the special case is what makes them equal
    assert not torch.allclose(D.jsd(s, t, beta=1e-3), D.forward_kl(s, t), atol=1e-3)


@pytest.mark.parametrize("beta", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_jsd_symmetric_under_swap_with_complementary_beta(beta):
    s, t = logits_pair((2, 6, 33), seed=7)
    torch.testing.assert_close(D.jsd(s, t, beta=beta), D.jsd(t, s, beta=1.0 - beta), rtol=1e-5, atol=1e-6)


def test_skew_with_alpha_zero_is_plain_kl():
    s, t = logits_pair((2, 3, 11), seed=8)
    assert torch.equal(D.skew_kl(s, t, alpha=0.0), D.forward_kl(s, t))
    assert torch.equal(D.skew_reverse_kl(s, t, alpha=0.0), D.reverse_kl(s, t))


def test_low_precision_inputs_are_computed_in_float32():
    s, t = logits_pair((2, 3, 40), seed=9)
    got = D.forward_kl(s.bfloat16(), t.bfloat16())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, D.forward_kl(s.bfloat16().float(), t.bfloat16().float()))


def test_padded_vocab_with_minus_inf_gives_finite_values_and_gradients():
    s, t = logits_pair((2, 3, 10), seed=10)
    s = torch.cat([s, torch.full((2, 3, 2), float("-inf"))], -1).requires_grad_()
    t = torch.cat([t, torch.full((2, 3, 2), float("-inf"))], -1)
    for name in NAMES:
        v = getattr(D, name)(s, t)
        v.sum().backward()
        assert torch.isfinite(v).all(), name
        assert torch.isfinite(s.grad).all(), name
        s.grad = None


def test_align_vocab_slices_padded_heads():
    s, t = torch.randn(1, 2, 12), torch.randn(1, 2, 16)
    a, b = D.align_vocab(s, t, 10)
    assert a.shape[-1] == b.shape[-1] == 10
    torch.testing.assert_close(
        D.forward_kl(a, b), reference("forward_kl", s[..., :10], t[..., :10], 1.0).float()
    )
    with pytest.raises(ValueError, match="fewer than the tokenizer's 14"):
        D.align_vocab(s, t, 14)


def test_bad_arguments_are_named():
    s, t = logits_pair((1, 2, 5))
    with pytest.raises(ValueError, match=r"beta=1\.5"):
        D.jsd(s, t, beta=1.5)
    with pytest.raises(ValueError, match="temperature=0"):
        D.forward_kl(s, t, temperature=0)
    with pytest.raises(ValueError, match="unknown divergence 'kl'"):
        D.divergence("kl", s, t)
    with pytest.raises(ValueError, match="differ"):
        D.forward_kl(s, t[..., :4])


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_float64(name):
    s, t = logits_pair((2, 3, 6), seed=11, scale=1.0)
    s, t = s.double().requires_grad_(), t.double().requires_grad_()
    kw = {"temperature": 1.7}
    assert torch.autograd.gradcheck(lambda a, b: getattr(D, name)(a, b, **kw), (s, t))
