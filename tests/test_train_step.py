"""The pure training step: alignment with the teacher signal, global token counts, NaN-safe steps."""

from __future__ import annotations

import copy
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from kdray.losses import Term, build_objective
from kdray.models import RewardHead, Student
from kdray.models.tiny import save_tiny_checkpoint, tiny_causal_lm
from kdray.teacher import Teacher
from kdray.train import (
    NonFiniteLossError,
    StepConfig,
    student_forward,
    teacher_signal,
    to_tensors,
    train_step,
)

V = 40


def make_batch(seed=0, b=8, length=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (b, length), generator=g)
    attn = torch.ones(b, length, dtype=torch.bool)
    lengths = torch.randint(5, length + 1, (b,), generator=g)
    for i, n in enumerate(lengths):
        attn[i, n:] = False
    resp = attn.clone()
    resp[:, :3] = False
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp}


def with_signal(batch, teacher):
    with torch.no_grad():
        logits = teacher(batch["input_ids"]).logits
    # aligned with the input tokens: row t = distribution over token t (row 0 unused)
    shifted = torch.cat([torch.zeros_like(logits[:, :1]), logits[:, :-1]], 1)
    return {**batch, "teacher_logits": shifted}


def test_identical_student_and_teacher_give_zero_divergence(tmp_path):
    path = save_tiny_checkpoint(tmp_path / "t", hidden_size=32, num_layers=2)
    teacher = Teacher(str(path), top_k=None)
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13]]
    sig = teacher.score(seqs, prompt_lengths=[2, 1])
    ids = np.zeros((2, 6), np.int64)
    ids[0], ids[1, :3] = seqs[0], seqs[1]
    attn = np.zeros((2, 6), bool)
    attn[0], attn[1, :3] = True, True
    resp = sig["mask"].copy()
    batch = to_tensors({"input_ids": ids, "attention_mask": attn, "response_mask": resp, **sig})
    model = teacher.backend.model
    logits, loss_batch = student_forward(Student(model), batch, teacher.vocab_size)
    objective = build_objective([Term("forward_kl"), Term("reverse_kl")])
    _, logs = objective(logits, loss_batch, teacher_signal(batch), num_tokens=None)
    assert logs["forward_kl"] < 1e-5 and logs["reverse_kl"] < 1e-5
    # and a different student is far from it: the alignment is what makes the zero
    other = tiny_causal_lm(len(teacher.tokenizer), hidden_size=32, num_layers=2, seed=99)
    logits, loss_batch = student_forward(Student(other), batch, teacher.vocab_size)
    assert objective(logits, loss_batch, teacher_signal(batch))[1]["forward_kl"] > 1e-3


def test_gradient_accumulation_equals_one_big_batch():
    teacher = tiny_causal_lm(V, hidden_size=32, num_layers=1, seed=1)
    full = with_signal(make_batch(0), teacher)
    halves = [{k: v[:4] for k, v in full.items()}, {k: v[4:] for k, v in full.items()}]
    objective = build_objective([Term("xkd", 1.0, {"divergence": "jsd", "beta": 0.3})])
    results = []
    for micro in ([full], halves):
        torch.manual_seed(0)
        student = Student(tiny_causal_lm(V, hidden_size=32, num_layers=1, seed=2), RewardHead(32))
        opt = torch.optim.SGD(student.parameters(), lr=0.5)
        logs = train_step(student, opt, objective, micro, StepConfig(grad_clip=None))
        results.append(([p.detach().clone() for p in student.parameters()], logs))
    for a, b in zip(results[0][0], results[1][0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert results[0][1]["loss"] == pytest.approx(results[1][1]["loss"], rel=1e-5)
    assert (
        results[0][1]["num_tokens"]
        == results[1][1]["num_tokens"]
        == float(full["response_mask"][:, 1:].sum())
    )


def test_logits_skip_the_prompt_and_change_no_loss_or_gradient():
    """The LM head runs from the first position any response needs (`predicted_from`); the loss and every
    gradient equal those of the full-length logits with the full-length masks and signal."""
    from kdray.train.step import loss_mask, predicted_from

    teacher = tiny_causal_lm(V, hidden_size=32, num_layers=1, seed=1)
    batch = with_signal(make_batch(3), teacher)
    batch["response_mask"][0, 3] = False  # the rows' responses start at different positions
    assert predicted_from(batch) == 2
    objective = build_objective([Term("xkd", 1.0, {"divergence": "jsd", "beta": 0.3})])
    grads = []
    for trimmed in (True, False):
        torch.manual_seed(0)
        student = Student(tiny_causal_lm(V, hidden_size=32, num_layers=1, seed=2), RewardHead(32))
        if trimmed:
            logits, loss_batch = student_forward(student, batch)
            assert logits.shape[1] == batch["input_ids"].shape[1] - 3
            signal = teacher_signal(batch)
        else:
            full, mu, log_sigma = student(batch["input_ids"], batch["attention_mask"])
            logits = full[:, :-1]
            loss_batch = {"target_ids": batch["input_ids"][:, 1:], "mask": loss_mask(batch)}
            loss_batch.update(reward_mu=mu[:, :-1], reward_log_sigma=log_sigma[:, :-1])
            signal = {"teacher_logits": batch["teacher_logits"][:, 1:]}
        loss, _ = objective(logits, loss_batch, signal, num_tokens=None)
        loss.backward()
        grads.append((loss.detach(), [q.grad.clone() for q in student.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=1e-7)
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, full, state, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    student = tiny_causal_lm(V, hidden_size=32, num_layers=1, seed=2)
    student.load_state_dict(state)
    torch.manual_seed(0)  # the reward head's init: the same draw as in the single-worker reference
    ddp = torch.nn.parallel.DistributedDataParallel(Student.with_reward_head(student))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5)
    # unequal shards: rank 0 gets 5 rows, rank 1 gets 3, so per-shard means would be wrong
    rows = slice(0, 5) if rank == 0 else slice(5, 8)
    shard = {k: v[rows] for k, v in full.items()}
    objective = build_objective([Term("xkd", 1.0, {"divergence": "forward_kl"})])
    train_step(ddp, opt, objective, [shard], StepConfig(grad_clip=None))
    if rank == 0:
        torch.save(ddp.module.state_dict(), out_path)
    torch.distributed.destroy_process_group()


def test_two_ddp_workers_equal_one_worker_with_the_whole_batch(tmp_path):
    teacher = tiny_causal_lm(V, hidden_size=32, num_layers=1, seed=1)
    full = with_signal(make_batch(3), teacher)
    lm = tiny_causal_lm(V, hidden_size=32, num_layers=1, seed=2)
    state = copy.deepcopy(lm.state_dict())
    torch.manual_seed(0)  # the reward head's init: the same draw as in the workers
    student = Student.with_reward_head(lm)
    opt = torch.optim.SGD(student.parameters(), lr=0.5)
    objective = build_objective([Term("xkd", 1.0, {"divergence": "forward_kl"})])
    train_step(student, opt, objective, [full], StepConfig(grad_clip=None))
    out = tmp_path / "rank0.pt"
    mp.start_processes(
        _ddp_worker, args=(2, _free_port(), full, state, str(out)), nprocs=2, start_method="spawn"
    )
    ddp_state = torch.load(out)
    for name, value in student.state_dict().items():
        torch.testing.assert_close(ddp_state[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_non_finite_step_is_skipped_then_reported():
    teacher = tiny_causal_lm(V, hidden_size=32, num_layers=1, seed=1)
    bad = with_signal(make_batch(0), teacher)
    bad["teacher_logits"][0, 4, 0] = float("nan")  # one NaN teacher logit poisons its row
    student = Student(tiny_causal_lm(V, hidden_size=32, num_layers=1, seed=2))
    before = [p.detach().clone() for p in student.parameters()]
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    cfg = StepConfig(max_bad_steps=3)
    objective = build_objective([Term("forward_kl"), Term("ce", 0.1)])
    for _ in range(2):
        logs = train_step(student, opt, objective, [bad], cfg)
        assert logs["skipped"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive steps.*forward_kl"):
        train_step(student, opt, objective, [bad], cfg)
    good = with_signal(make_batch(1), teacher)
    cfg.bad_steps = 0
    assert train_step(student, opt, objective, [good], cfg)["skipped"] == 0.0
    assert not all(torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))


@pytest.mark.gpu
def test_bf16_autocast_step_on_gpu_matches_float32():
    teacher = tiny_causal_lm(V, hidden_size=32, num_layers=1, seed=1).cuda()
    batch = {
        k: v.cuda() for k, v in with_signal({k: v.cuda() for k, v in make_batch(0).items()}, teacher).items()
    }
    objective = build_objective([Term("xkd", 1.0, {"divergence": "forward_kl"})])
    results = []
    for bf16 in (False, True):
        torch.manual_seed(0)
        student = Student.with_reward_head(tiny_causal_lm(V, hidden_size=32, num_layers=1, seed=2)).cuda()
        opt = torch.optim.SGD(student.parameters(), lr=0.1)
        results.append(train_step(student, opt, objective, [batch], StepConfig(autocast_bf16=bf16))["loss"])
    assert results[1] == pytest.approx(results[0], rel=2e-2)  # bf16 forward, float32 losses


def test_lm_term_adds_coef_times_cross_entropy_on_the_data_batches():
    """MiniLLM's LM term: the step's gradient is the objective's plus lm_coef × that of the data's CE."""
    torch.manual_seed(0)
    lm = tiny_causal_lm(vocab_size=V, hidden_size=16, num_layers=1)
    teacher = tiny_causal_lm(vocab_size=V, hidden_size=16, num_layers=1, seed=1)
    samples, data = with_signal(make_batch(1), teacher), make_batch(2)

    def grads(**lm_args):
        student = Student(copy.deepcopy(lm))
        opt = torch.optim.SGD(student.parameters(), lr=0.0)  # lr 0: read the gradients, keep the weights
        objective = build_objective([Term("reverse_kl")])
        logs = train_step(student, opt, objective, [samples], StepConfig(grad_clip=None), **lm_args)
        return [p.grad.clone() for p in student.parameters()], logs

    base, _ = grads()
    ce, _ = grads(lm_batches=[data], lm_coef=0.0)  # coef 0: nothing added
    both, logs = grads(lm_batches=[data], lm_coef=0.5)
    student = Student(copy.deepcopy(lm))
    logits, loss_batch = student_forward(student, data)
    from kdray.losses import masked_mean, token_cross_entropy

    masked_mean(token_cross_entropy(logits, loss_batch["target_ids"]), loss_batch["mask"]).backward()
    for b, c, w, p in zip(base, ce, both, student.parameters(), strict=True):
        torch.testing.assert_close(c, b)
        torch.testing.assert_close(w, b + 0.5 * p.grad, rtol=1e-4, atol=1e-6)
    assert logs["lm"] > 0
