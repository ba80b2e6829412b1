"""A teacher signal carries its temperature; the loss reads it at that temperature or refuses it.

Through a real Teacher (transformers backend, a tiny checkpoint): with k = V the sparse path equals the
dense path at every temperature, a true top-k served at another temperature than the loss is refused,
and a config whose loss and teacher temperatures disagree is refused before any work.
"""

from __future__ import annotations

import pytest
import torch

from kdray.config import ConfigError, load_config
from kdray.losses import build_objective, divergence, sparse_divergence, teacher_divergence
from kdray.losses.signal import SignalTemperatureError
from kdray.models.loading import load_causal_lm
from kdray.models.tiny import save_tiny_checkpoint
from kdray.teacher import Teacher
from kdray.train.step import teacher_signal, to_tensors
from kdray.validate import teacher_temperature, validate_config

SEQS = [[5, 17, 9, 30, 44, 12, 3], [8, 2, 40, 41, 7, 19, 23]]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("m") / "t", hidden_size=32, num_layers=2, seed=5)


@pytest.fixture(scope="module")
def raw_teacher_logits(tiny_dir):
    model, _ = load_causal_lm(str(tiny_dir), device="cpu")
    with torch.no_grad():
        return model(torch.tensor(SEQS)).logits.float()[:, :-1]  # row t predicts token t+1


def served(tiny_dir, k, temperature):
    """The teacher's signal for SEQS, shifted to pair with the student's logits[:, :-1] as in training."""
    sig = Teacher(str(tiny_dir), top_k=k, temperature=temperature, batch_size=2).logprobs({"input_ids": SEQS})
    batch = to_tensors({"input_ids": torch.tensor(SEQS), **sig})
    return teacher_signal(batch)


def student_logits(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd", "skew_kl", "tvd"])
def test_temperature_full_vocab_signal_equals_dense_path(tiny_dir, raw_teacher_logits, tau, name):
    V = raw_teacher_logits.shape[-1]
    signal = served(tiny_dir, None, tau)  # k = V, served at the loss temperature
    assert signal["topk_ids"].shape[-1] == V and float(signal["temperature"][0]) == tau
    s = student_logits(raw_teacher_logits.shape)
    dense = divergence(name, s, raw_teacher_logits, temperature=tau)
    torch.testing.assert_close(
        teacher_divergence(name, s, signal, temperature=tau), dense, rtol=1e-5, atol=1e-6
    )
    # the tail-bucket code itself, fed the same k = V signal, agrees too
    tail = sparse_divergence(name, s, signal["topk_ids"], signal["topk_logprobs"], temperature=tau)
    torch.testing.assert_close(tail, dense, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_temperature_full_vocab_signal_can_be_read_at_any_temperature(tiny_dir, raw_teacher_logits, tau):
    signal = served(tiny_dir, None, 1.0)  # served at 1, read at tau: re-tempered exactly
    s = student_logits(raw_teacher_logits.shape, seed=1)
    dense = divergence("forward_kl", s, raw_teacher_logits, temperature=tau)
    torch.testing.assert_close(
        teacher_divergence("forward_kl", s, signal, temperature=tau), dense, rtol=1e-5, atol=1e-6
    )


def test_temperature_mismatch_of_a_top_k_signal_is_refused(tiny_dir, raw_teacher_logits):
    signal = served(tiny_dir, 8, 1.0)
    s = student_logits(raw_teacher_logits.shape, seed=2)
    mask = torch.ones(s.shape[:2], dtype=torch.bool)
    objective = build_objective([{"name": "forward_kl", "params": {"temperature": 2.0}}])
    with pytest.raises(SignalTemperatureError, match=r"served at temperature 1.*teacher.temperature to 2"):
        objective(s, {"target_ids": torch.zeros_like(mask, dtype=torch.long), "mask": mask}, signal)
    # served at the loss temperature, the same top-k is read
    at_two = served(tiny_dir, 8, 2.0)
    value, _ = objective(s, {"target_ids": torch.zeros_like(mask, dtype=torch.long), "mask": mask}, at_two)
    assert torch.isfinite(value) and value > 0


def test_temperature_the_teacher_follows_the_loss_and_a_mismatch_is_refused_up_front():
    quick = load_config("workflows/configs/quickstart.yaml")
    assert quick.teacher.temperature is None and teacher_temperature(quick) == 2.0
    validate_config(quick)
    bad = load_config("workflows/configs/quickstart.yaml", ["teacher.temperature=1.0"])
    with pytest.raises(
        ConfigError, match=r"teacher.temperature = 1 but the loss reads the teacher at temperature 2"
    ):
        validate_config(bad)
    # a full-vocabulary signal can be re-tempered: no refusal
    validate_config(
        load_config("workflows/configs/quickstart.yaml", ["teacher.temperature=1.0", "teacher.top_k=null"])
    )
    # terms that disagree on the temperature cannot share one teacher signal
    two = load_config(
        None,
        [
            "objective.terms=[{name: forward_kl, params: {temperature: 2.0}}, {name: jsd, params: {temperature: 1.0}}]"
        ],
    )
    with pytest.raises(ConfigError, match="different temperatures"):
        validate_config(two)
