"""TAID under data parallelism: workers with different local losses hold the same t at every step.

Two real processes joined by torch.distributed (gloo) advance TAID's state through the training loop's
own `advance_method_state`, each with its own local loss; a control advanced on the local losses
drifts apart, which is what the reference code does (REFERENCES.md §4).
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kdray.methods import get_method
from kdray.train.loop import advance_method_state
from kdray.train.state import method_state

STEPS = 40
TOTAL = 100_000  # a long run: the adaptive part, driven by the loss, moves t more than the linear floor


def local_losses(rank: int) -> list[float]:
    g = torch.Generator().manual_seed(100 + rank)
    base = 3.0 if rank == 0 else 1.0  # very different shards
    return [base * (0.97**s) + 0.3 * float(torch.rand((), generator=g)) for s in range(STEPS)]


def worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    params = dict(get_method("taid").params)
    synced = method_state("taid", TOTAL, params, seed=0)
    local = method_state("taid", TOTAL, params, seed=0)
    ts, drift = [], []
    for step, loss in enumerate(local_losses(rank), start=1):
        advance_method_state(synced, step, loss / 2)  # each worker's share of the global mean
        local.after_step(step, loss)  # the reference: each rank its own loss
        ts.append(synced.runtime()["taid"]["t"])
        drift.append(local.runtime()["taid"]["t"])
    out[rank] = (ts, drift)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ddp_workers_with_different_local_losses_hold_the_same_taid_t():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(port, out), nprocs=2, join=True)
        (t0, drift0), (t1, drift1) = out[0], out[1]
    assert t0 == t1  # bit-identical at every step
    assert t0[-1] > t0[0] and all(b >= a for a, b in itertools.pairwise(t0))
    assert max(abs(a - b) for a, b in zip(drift0, drift1, strict=True)) > 1e-6  # local losses drift apart
