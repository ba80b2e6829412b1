"""A teacher pool's replicas as Ray actors, apart from request routing (`kdray.teacher.pool`): their
state, asking each for its `info()` while Ray may be restarting it, and stopping them."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any

__all__ = ["REPROBE_S", "Replica", "ask_info", "is_replica_failure", "ray_module", "stop_replicas"]

REPROBE_S = 0.25  # a call to an actor that is restarting fails at once: ask again after this pause


@dataclass
class Replica:
    """One teacher actor as the pool sees it; changed only under the pool's lock."""

    index: int
    handle: Any
    state: str = "up"  # up | down (dead or restarting: probed with info()) | dead (restarts spent)
    in_flight: int = 0
    served: int = 0  # requests sent to it; breaks ties between equally loaded replicas
    failures: int = 0  # requests lost with it
    down_since: float = 0.0
    pid: int | None = None


def ray_module() -> Any:
    """Ray, imported when a pool is used, never when kdray.teacher is imported."""
    import ray

    return ray


def is_replica_failure(error: BaseException) -> bool:
    """The replica (or the node holding its result) died: the request itself may be fine elsewhere."""
    exc = ray_module().exceptions
    return isinstance(error, (exc.RayActorError, exc.ObjectLostError))


def ask_info(
    replicas: list[Replica], timeout_s: float
) -> list[tuple[dict[str, Any] | None, BaseException | None]]:
    """(info, error) of every replica within `timeout_s` in all, asking again while one is mid-restart; a
    replica with no answer in time gets a TimeoutError."""
    ray = ray_module()
    deadline = time.monotonic() + timeout_s
    asked = {r.handle.info.remote(): r for r in replicas}
    answers: dict[int, tuple[dict[str, Any] | None, BaseException | None]] = {}
    while asked and (remaining := deadline - time.monotonic()) > 0:
        for ref in ray.wait(list(asked), num_returns=1, timeout=remaining)[0]:
            replica = asked.pop(ref)
            try:
                answers[replica.index] = (ray.get(ref), None)
            except ray.exceptions.ActorUnavailableError:
                time.sleep(min(REPROBE_S, max(0.0, deadline - time.monotonic())))
                asked[replica.handle.info.remote()] = replica
            except Exception as error:
                answers[replica.index] = (None, error)
    return [answers.get(r.index, (None, TimeoutError(f"no answer within {timeout_s} s"))) for r in replicas]


def stop_replicas(replicas: list[Replica]) -> None:
    """Let each running teacher shut its engine down, then kill the actors: a killed actor's vLLM worker
    processes would otherwise keep burning CPU (or holding GPU memory) for a minute. Only replicas known
    to be running are asked (one that was never scheduled would never answer)."""
    ray = ray_module()
    closing = []
    for replica in replicas:
        if replica.state == "up" and (replica.pid is not None or replica.served > 0):
            with contextlib.suppress(Exception):
                closing.append(replica.handle.close.remote())
    if closing:
        with contextlib.suppress(Exception):
            ray.wait(closing, num_returns=len(closing), timeout=15.0)
    for replica in replicas:
        with contextlib.suppress(Exception):  # already gone: nothing to kill
            ray.kill(replica.handle, no_restart=True)
