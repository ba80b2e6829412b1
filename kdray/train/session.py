"""How the training loop talks to whatever runs it (`kdray.train.loop.TrainingLoop`'s `session`).

Why a seam: the loop needs a rank, its data shards, the latest checkpoint and a `report`; Ray Train
provides them in a worker (`RayTrainSession`), and `kdray.tune.trial.TuneSession` provides the same
shape inside a Tune trial, so a sweep's trial trains exactly as the workflow's distill step does.
"""

from __future__ import annotations

from typing import Any

import torch

from kdray.models import Student


class RayTrainSession:
    """How the loop talks to its runner inside a Ray Train worker: the worker's rank, its dataset shards,
    the latest checkpoint, and `report` (a barrier through Ray Train's controller).

    `kdray.tune` runs the same loop inside a Tune trial through a session of the same shape, so a sweep's
    trial trains exactly as the workflow's distill step does.
    """

    flush_before_report = False

    def __init__(self) -> None:
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()

    def dataset(self, name: str) -> Any:
        import ray.train

        return ray.train.get_dataset_shard(name)

    def checkpoint(self) -> Any:
        import ray.train

        return ray.train.get_checkpoint()

    def make_checkpoint(self, directory: str) -> Any:
        from ray.train import Checkpoint

        return Checkpoint.from_directory(directory)

    def report(self, metrics: dict[str, Any], checkpoint: Any) -> None:
        import ray.train

        ray.train.report(metrics, checkpoint=checkpoint)

    def device(self, use_gpu: bool) -> torch.device:
        if use_gpu and torch.cuda.is_available():
            import ray.train.torch

            return ray.train.torch.get_device()
        return torch.device("cpu")

    def prepare(self, student: Student) -> Any:
        """DDP across the workers (gloo on CPU, nccl on GPU); one worker trains the bare module."""
        if self.world_size == 1:
            return student
        import ray.train.torch

        return ray.train.torch.prepare_model(student, parallel_strategy="ddp")
