"""Teachers: a plain `Teacher` class (transformers or vLLM backend), the Ray `TeacherPool` serving it, and
the `TeacherClient` through which a run's stages call that pool."""

from kdray.teacher.client import TeacherClient
from kdray.teacher.pool import TeacherPool, TeacherPoolError
from kdray.teacher.preflight import VocabPlan, VocabularyMismatchError, check_vocabularies, preflight
from kdray.teacher.router import TeacherRouter, UnknownRouteError
from kdray.teacher.teacher import Teacher

__all__ = [
    "Teacher",
    "TeacherClient",
    "TeacherPool",
    "TeacherPoolError",
    "TeacherRouter",
    "UnknownRouteError",
    "VocabPlan",
    "VocabularyMismatchError",
    "check_vocabularies",
    "preflight",
]
