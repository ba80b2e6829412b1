"""Students and teachers: tiny models built in code, the X-KD reward head, loaders for real checkpoints."""

from kdray.models.reward_head import RewardHead
from kdray.models.student import Student

__all__ = ["RewardHead", "Student"]
