"""Top-k teacher signal (METHODS.md §2), masked reduction with a global token count, chunking."""

from __future__ import annotations

import pytest
import torch

from kdray.losses import divergences as D
from kdray.losses.reduce import chunked_per_token, masked_mean
from kdray.losses.signal import teacher_divergence, token_cross_entropy
from kdray.losses.sparse import sparse_divergence, sparse_logprobs, teacher_tail_logprob

NAMES = ["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"]


def signal(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0):
    """What a served teacher sends: top-k of the full log-softmax (at its temperature)."""
    logp = torch.log_softmax(teacher_logits / temperature, -1)
    vals, ids = logp.topk(k, dim=-1)
    return ids.to(torch.int32), vals


def pair(shape=(2, 5, 40), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 2, torch.randn(shape, generator=g) * 2


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_full_k_equals_dense(name, tau):
    s, t = pair()
    ids, lp = signal(t, k=t.shape[-1], temperature=tau)
    got = sparse_divergence(name, s, ids, lp, temperature=tau)
    torch.testing.assert_close(got, getattr(D, name)(s, t, temperature=tau), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [1, 4, 16])
def test_tail_bucket_is_a_lower_bound(name, k):
    s, t = pair(seed=1)
    ids, lp = signal(t, k)
    sparse = sparse_divergence(name, s, ids, lp)
    dense = getattr(D, name)(s, t)
    assert (sparse <= dense + 1e-5).all()
    assert (sparse >= -1e-6).all()


def test_renormalised_differs_from_tail_bucket():
    s, t = pair(seed=2)
    ids, lp = signal(t, 4)
    tail = sparse_divergence("forward_kl", s, ids, lp, mode="tail")
    renorm = sparse_divergence("forward_kl", s, ids, lp, mode="renormalize")
    assert (tail - renorm).abs().max() > 1e-3


def test_tail_logprob_value_and_overfull_topk():
    lp = torch.log(torch.tensor([[0.5, 0.3]]))
    torch.testing.assert_close(teacher_tail_logprob(lp), torch.log(torch.tensor([[0.2]])))
    # served top-k summing to 1 + eps must not give NaN: the tail is empty (-inf)
    over = torch.log(torch.tensor([[0.6, 0.4 + 1e-6]]))
    assert teacher_tail_logprob(over).item() == float("-inf")


def test_padded_topk_slots_give_finite_loss_and_match_smaller_k():
    s, t = pair(seed=3)
    ids, lp = signal(t, 3)
    # pad to k=5 with -inf log-probs and a repeated real id, as a short vLLM answer would be padded
    pad_ids = torch.cat([ids, ids[..., :1], ids[..., :1]], -1)
    pad_lp = torch.cat([lp, torch.full_like(lp[..., :2], float("-inf"))], -1)
    s = s.requires_grad_()
    for name in NAMES:
        padded = sparse_divergence(name, s, pad_ids, pad_lp)
        padded.sum().backward()
        assert torch.isfinite(s.grad).all(), name
        s.grad = None
        torch.testing.assert_close(padded, sparse_divergence(name, s, ids, lp), rtol=1e-5, atol=1e-6)


def test_sparse_shape_mismatch_is_explained():
    s, t = pair()
    ids, lp = signal(t, 4)
    with pytest.raises(ValueError, match="align the signal"):
        sparse_divergence("forward_kl", s[:, :3], ids, lp)


@pytest.mark.parametrize("name", ["forward_kl", "jsd", "tvd"])
def test_sparse_gradcheck_float64(name):
    s, t = pair((1, 3, 7), seed=4)
    ids, lp = signal(t.double(), 3)
    s = s.double().requires_grad_()
    lp = lp.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: sparse_divergence(name, a, ids, b, temperature=1.3), (s, lp))


# ---- reduction -------------------------------------------------------------------------------


def test_masked_mean_by_hand_and_nan_at_masked_positions():
    v = torch.tensor([[1.0, 2.0, float("nan")], [4.0, float("inf"), 6.0]])
    m = torch.tensor([[True, True, False], [True, False, True]])
    assert masked_mean(v, m).item() == pytest.approx((1 + 2 + 4 + 6) / 4)
    assert masked_mean(v, m, num_tokens=8).item() == pytest.approx(13 / 8)


def test_all_masked_is_zero_not_nan_and_keeps_grad():
    v = torch.randn(2, 3, requires_grad=True)
    out = masked_mean(v, torch.zeros(2, 3, dtype=torch.bool))
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(v.grad, torch.zeros(2, 3))


def test_shard_losses_add_up_to_unsharded_with_global_count():
    s, t = pair((6, 9, 30), seed=5)
    mask = torch.rand(6, 9, generator=torch.Generator().manual_seed(1)) > 0.3
    full = masked_mean(D.forward_kl(s, t), mask)
    n = int(mask.sum())
    shards = [masked_mean(D.forward_kl(s[i : i + 2], t[i : i + 2]), mask[i : i + 2], n) for i in (0, 2, 4)]
    torch.testing.assert_close(sum(shards), full)
    # a per-shard mean would not: this is what the global count is for
    local = [masked_mean(D.forward_kl(s[i : i + 2], t[i : i + 2]), mask[i : i + 2]) for i in (0, 2, 4)]
    assert abs(sum(local) / 3 - full) > 1e-4


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
@pytest.mark.parametrize("sparse", [False, True])
def test_chunked_equals_unchunked_values_and_gradients(chunk, sparse):
    s, t = pair((2, 10, 50), seed=6)
    sig = (
        dict(zip(("topk_ids", "topk_logprobs"), signal(t, 8), strict=True))
        if sparse
        else {"teacher_logits": t}
    )
    mask = torch.ones(2, 10, dtype=torch.bool)
    grads = []
    for c in (None, chunk):
        x = s.clone().requires_grad_()
        v = teacher_divergence("jsd", x, sig, chunk_size=c, beta=0.3)
        masked_mean(v, mask).backward()
        grads.append((v.detach(), x.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_chunked_per_token_passes_non_positional_args_whole():
    x = torch.randn(2, 6, 4)
    bias = torch.randn(4)
    out = chunked_per_token(lambda a, b: (a + b).sum(-1), x, bias, chunk_size=4)
    torch.testing.assert_close(out, (x + bias).sum(-1))
    with pytest.raises(ValueError, match="chunk_size=0"):
        chunked_per_token(lambda a: a.sum(-1), x, chunk_size=0)


def test_chunked_gradient_passes_gradcheck_and_accumulates_over_calls():
    """The chunked path writes each chunk's gradient into one buffer in backward: exact in float64, and
    correct when the same logits feed two losses (the buffers add up in autograd)."""
    x = torch.randn(2, 7, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 7, 5, dtype=torch.float64)
    sig, targets = {"teacher_logits": t}, torch.randint(0, 5, (2, 7))

    def both(z: torch.Tensor) -> torch.Tensor:
        jsd = teacher_divergence("jsd", z, sig, chunk_size=3, beta=0.3)
        return jsd + 2 * token_cross_entropy(z, targets, chunk_size=2)

    assert torch.autograd.gradcheck(both, (x,))


def test_a_chunked_argument_that_needs_its_own_gradient_still_gets_it():
    """Only the logits' gradient is written chunk by chunk; another input that requires a gradient (a
    reward head's output, say) takes the checkpointed path, which differentiates every input."""
    x = torch.randn(2, 6, 4, requires_grad=True)
    w = torch.randn(2, 6, 4, requires_grad=True)
    out = chunked_per_token(lambda a, b: (a * b).sum(-1), x, w, chunk_size=4)
    out.sum().backward()
    torch.testing.assert_close(x.grad, w.detach())
    torch.testing.assert_close(w.grad, x.detach())


def test_padding_slots_remove_nothing_from_the_student_tail():
    """Fewer than k teacher tokens: the padding slots' ids (anything, even a token outside the top-k)
    must not take mass out of the tail, wherever they sit; a position with no token keeps it all."""
    logits = torch.randn(1, 3, 6)
    ids = torch.tensor([[[2, 5, 0], [4, 1, 3], [0, 0, 0]]])
    logprobs = torch.tensor([[[-0.5, -1.5, float("-inf")], [float("-inf"), -0.3, -2.0], [float("-inf")] * 3]])
    student, _ = sparse_logprobs(logits, ids, logprobs)
    full = torch.log_softmax(logits, -1)[0]
    expected_tail = [
        torch.logsumexp(full[0, [0, 1, 3, 4]], 0),  # only 2 and 5 are the teacher's
        torch.logsumexp(full[1, [0, 2, 4, 5]], 0),  # 1 and 3; the padding slot in front names 4
        torch.tensor(0.0),  # no token: the tail is everything
    ]
    torch.testing.assert_close(student[0, :, -1], torch.stack(expected_tail))


def test_an_empty_student_tail_does_not_erase_the_teachers():
    """A student with no mass outside the teacher's top-k (its other logits at -inf) must not make the
    teacher's leftover mass vanish: only ids that cover the whole vocabulary empty the teacher's tail."""
    logits = torch.tensor([[[2.0, 1.0, float("-inf"), float("-inf"), float("-inf")]]])
    ids = torch.tensor([[[0, 1]]])
    logprobs = torch.log(torch.tensor([[[0.5, 0.3]]]))  # 0.2 left for the other three tokens
    student, teacher = sparse_logprobs(logits, ids, logprobs)
    assert torch.isneginf(student[0, 0, -1])
    torch.testing.assert_close(teacher[0, 0, -1].exp(), torch.tensor(0.2))
