"""Student training: pure step functions here; Ray Train glue in `trainer.py` (imported lazily)."""

from kdray.train.step import (
    NonFiniteLossError,
    StepConfig,
    student_forward,
    teacher_signal,
    to_tensors,
    train_step,
)

__all__ = [
    "NonFiniteLossError",
    "StepConfig",
    "student_forward",
    "teacher_signal",
    "to_tensors",
    "train_step",
]
