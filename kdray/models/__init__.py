"""Students and teachers: tiny models built in code, the X-KD reward head, loaders for real checkpoints.

`RewardHead` and `Student` are imported on first use: the light modules of this package (prompt
encoding, `kdray.models.prompts`, which the data layer reads) must not pull in torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kdray.models.reward_head import RewardHead
    from kdray.models.student import Student

__all__ = ["RewardHead", "Student"]


def __getattr__(name: str) -> Any:
    if name == "RewardHead":
        from kdray.models.reward_head import RewardHead

        return RewardHead
    if name == "Student":
        from kdray.models.student import Student

        return Student
    raise AttributeError(f"module 'kdray.models' has no attribute {name!r}")
