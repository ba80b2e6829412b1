"""Teachers: a plain `Teacher` class (transformers or vLLM backend) and the Ray `TeacherPool` serving it."""

from kdray.teacher.preflight import VocabPlan, VocabularyMismatchError, check_vocabularies, preflight
from kdray.teacher.teacher import Teacher

__all__ = ["Teacher", "VocabPlan", "VocabularyMismatchError", "check_vocabularies", "preflight"]
