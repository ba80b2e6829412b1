"""kdray's GKD loss against TRL's own code: `GKDTrainer.generalized_jsd_loss` (trl.experimental.gkd) on the
same logits and labels gives the same value and the same gradient, on every path kdray computes it
(dense, chunked over positions, and a sparse signal that holds the whole vocabulary). TRL is the `bench`
extra (`pip install -e ".[bench]"`), pinned: the side-by-side throughput benchmark runs its trainer."""

from __future__ import annotations

import pytest
import torch

from kdray.losses.divergences import jsd
from kdray.losses.reduce import masked_mean
from kdray.losses.signal import teacher_divergence

gkd = pytest.importorskip("trl.experimental.gkd", reason="TRL is the bench extra: pip install -e '.[bench]'")


def _batch(seed: int = 0, vocab: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(3, 9, vocab, generator=g, dtype=torch.float64) * 2.0
    teacher = torch.randn(3, 9, vocab, generator=g, dtype=torch.float64) * 2.0
    labels = torch.randint(0, vocab, (3, 9), generator=g)
    labels[0, :4] = -100  # a prompt
    labels[1, 6:] = -100  # padding
    labels[2, :2] = -100
    return student, teacher, labels


def _trl(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    return gkd.GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta)


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_and_its_gradient_equal_trl_at_every_beta(beta):
    student, teacher, labels = _batch()
    ours_logits = student.clone().requires_grad_(True)
    trl_logits = student.clone().requires_grad_(True)
    ours = masked_mean(jsd(ours_logits, teacher, beta=beta), labels != -100)
    reference = _trl(trl_logits, teacher, labels, beta)
    assert ours.item() == pytest.approx(reference.item(), rel=1e-10, abs=1e-12)
    ours.backward()
    reference.backward()
    assert torch.allclose(ours_logits.grad, trl_logits.grad, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 2, 4])
def test_chunked_and_full_vocabulary_sparse_paths_equal_trl(chunk_size):
    student, teacher, labels = _batch(seed=1)
    reference = _trl(student, teacher, labels, 0.5).item()
    mask = labels != -100
    dense = teacher_divergence("jsd", student, {"teacher_logits": teacher}, chunk_size=chunk_size, beta=0.5)
    logprobs, ids = torch.log_softmax(teacher, -1).topk(teacher.shape[-1], -1)  # k = V
    sparse = teacher_divergence(
        "jsd", student, {"topk_ids": ids, "topk_logprobs": logprobs}, chunk_size=chunk_size, beta=0.5
    )
    assert masked_mean(dense, mask).item() == pytest.approx(reference, rel=1e-10)
    assert masked_mean(sparse, mask).item() == pytest.approx(reference, rel=1e-8)
