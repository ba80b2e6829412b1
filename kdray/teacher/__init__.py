"""Teachers: a plain `Teacher` class (transformers or vLLM backend) and the Ray `TeacherPool` serving it."""

from kdray.teacher.pool import TeacherPool, TeacherPoolError
from kdray.teacher.preflight import VocabPlan, VocabularyMismatchError, check_vocabularies, preflight
from kdray.teacher.router import TeacherRouter, UnknownRouteError
from kdray.teacher.teacher import Teacher

__all__ = [
    "Teacher",
    "TeacherPool",
    "TeacherPoolError",
    "TeacherRouter",
    "UnknownRouteError",
    "VocabPlan",
    "VocabularyMismatchError",
    "check_vocabularies",
    "preflight",
]
