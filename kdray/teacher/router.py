"""Route requests to named teachers: one pool per dataset or task, with a default."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kdray.teacher.pool import TeacherPool


class UnknownRouteError(KeyError):
    """A route key has no teacher; the message lists the known routes."""

    def __str__(self) -> str:  # KeyError would print the message's repr
        return str(self.args[0])


class TeacherRouter:
    """Routes keys (dataset or task names) to teacher pools, e.g. a math teacher for `gsm8k` and a
    translation teacher for `multi30k`; one pool may serve several keys."""

    def __init__(self, pools: Mapping[str, TeacherPool], default: str | None = None) -> None:
        if not pools:
            raise ValueError("TeacherRouter needs at least one route")
        self._pools = dict(pools)
        if default is not None and default not in self._pools:
            raise UnknownRouteError(
                f"default route {default!r}: not a known route; known routes: {self.routes}"
            )
        self.default = default

    @property
    def routes(self) -> list[str]:
        return sorted(self._pools)

    def pool(self, route: str | None = None) -> TeacherPool:
        """The pool for `route` (None = the default route)."""
        key = self.default if route is None else route
        if key not in self._pools:
            raise UnknownRouteError(
                f"no teacher for route {route!r}; known routes: {self.routes} (default: {self.default!r})"
            )
        return self._pools[key]

    __getitem__ = pool

    def call(self, route: str | None, method: str, *args: Any, **kwargs: Any) -> Any:
        """`method(*args, **kwargs)` on the pool serving `route`."""
        return self.pool(route).call(method, *args, **kwargs)

    def close(self) -> None:
        """Close every distinct pool once."""
        for pool in {id(p): p for p in self._pools.values()}.values():
            pool.close()

    def __enter__(self) -> TeacherRouter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
