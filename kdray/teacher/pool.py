"""TeacherPool: replicas of the Teacher as Ray actors, with least-loaded routing, back-pressure and retry.

Ray restarts a killed actor (`max_restarts`), but a request in flight on it fails, and waiting for the
restart means waiting for a model load. The pool instead re-sends that request at once to a live replica
and keeps using the restarted one when it answers again, so every request is answered exactly once from
the caller's side. Teacher calls are pure functions of their inputs, so a request that ran twice is
harmless. Ray is imported when a pool is built, never when this module is imported.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kdray.teacher.replicas import REPROBE_S, Replica, ask_info, is_replica_failure, ray_module, stop_replicas
from kdray.teacher.stream import stream

if TYPE_CHECKING:
    from kdray.config import TeacherConfig

__all__ = ["TeacherPool", "TeacherPoolError"]

# A request dispatched while the collector already sits in ray.wait is seen at the next poll: this bounds
# the latency it adds, and the pipelining of max_in_flight > 1 hides it.
_POLL_S = 0.02


# TeacherConfig fields that are Teacher arguments, and those that are pool arguments.
_CONFIG_TEACHER_FIELDS = (
    "name_or_path", "revision", "gguf_file", "backend", "top_k", "temperature", "batch_size", "dtype", "truncate",
)  # fmt: skip
_CONFIG_POOL_FIELDS = ("replicas", "num_cpus", "num_gpus", "resources", "max_restarts")


class TeacherPoolError(RuntimeError):
    """No replica of a pool can serve a request: all dead (restarts spent), none back in time, or closed."""


@dataclass
class _Request:
    id: int
    method: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    future: Future
    attempts: int = 0  # replica failures seen so far; each one re-sends the request


def _resolve(future: Future, value: Any = None, error: BaseException | None = None) -> None:
    if future.done():  # cancelled by a caller that no longer waits: nothing to deliver
        return
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)


class TeacherPool:
    """N teacher replicas (`ray.remote(teacher_cls)`) placed on nodes holding `resources`.

    Requests go to the replica with the fewest in flight; at most `max_in_flight` per replica (one
    running, the rest queued in the actor so it never idles between calls), and `submit` blocks while
    every replica is full. Use as a context manager or call `close()` to kill the actors.
    """

    def __init__(
        self,
        teacher_kwargs: Mapping[str, Any],
        *,
        replicas: int = 1,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        resources: Mapping[str, float] | None = None,
        max_restarts: int = 3,
        max_task_retries: int = 0,
        max_in_flight: int = 2,
        max_request_retries: int = 3,
        name: str = "teacher",
        teacher_cls: type | None = None,
        ready_timeout_s: float = 600.0,
    ) -> None:
        if replicas < 1 or max_in_flight < 1 or max_request_retries < 0:
            raise ValueError(
                f"teacher pool {name!r}: need replicas >= 1, max_in_flight >= 1, max_request_retries >= 0; "
                f"got {replicas}, {max_in_flight}, {max_request_retries}"
            )
        if teacher_cls is None:
            from kdray.teacher import Teacher as teacher_cls
        # max_task_retries=0: a failed call comes back to the pool, which re-sends it to a live replica
        # now instead of letting Ray hold it until this one has restarted and reloaded the model.
        actor = ray_module().remote(teacher_cls).options(
            num_cpus=num_cpus, num_gpus=num_gpus, resources=dict(resources or {}), max_restarts=max_restarts,
            max_task_retries=max_task_retries, max_concurrency=1,
        )  # fmt: skip
        handles = [actor.remote(**teacher_kwargs) for _ in range(replicas)]
        self._start(handles, name=name, owns=True, resources=resources, max_restarts=max_restarts,
                    max_in_flight=max_in_flight, max_request_retries=max_request_retries,
                    ready_timeout_s=ready_timeout_s)  # fmt: skip

    @classmethod
    def attach(cls, handles: Iterable[Any], *, name: str = "teacher", max_restarts: int = 3,
               max_in_flight: int = 2, max_request_retries: int = 3) -> TeacherPool:  # fmt: skip
        """A pool over replicas another pool started (`pool.handles`), e.g. inside a training worker that
        scores its on-policy samples: the same routing and failover; `close()` leaves the actors alone."""
        pool = cls.__new__(cls)
        pool._start(list(handles), name=name, owns=False, resources=None, max_restarts=max_restarts,
                    max_in_flight=max_in_flight, max_request_retries=max_request_retries,
                    ready_timeout_s=600.0)  # fmt: skip
        return pool

    def _start(self, handles: list[Any], *, name: str, owns: bool, resources: Mapping[str, float] | None,
               max_restarts: int, max_in_flight: int, max_request_retries: int,
               ready_timeout_s: float) -> None:  # fmt: skip
        if not handles:
            raise ValueError(f"teacher pool {name!r}: no replicas to route to")
        self.name, self.max_in_flight, self.max_restarts = name, max_in_flight, max_restarts
        self.max_request_retries, self.ready_timeout_s = max_request_retries, ready_timeout_s
        self.resources, self._owns = dict(resources or {}), owns
        self._replicas = [Replica(i, handle) for i, handle in enumerate(handles)]
        self._cond = threading.Condition()
        self._queue: deque[_Request] = deque()  # admitted, waiting for a replica; retries go first
        self._in_flight: dict[Any, tuple[_Request, Replica]] = {}  # ObjectRef -> request
        self._probes: dict[Any, Replica] = {}  # ObjectRef of info() -> replica that went down
        self._reprobe: dict[int, float] = {}  # replica index -> when to probe it again
        self._admitted = 0  # queued + in flight: what back-pressure bounds
        self._ids = itertools.count()
        self._closed = False
        self.last_error: BaseException | None = None
        self.max_in_flight_seen = 0
        self.retries = 0
        self.completed = 0
        self._collector = threading.Thread(target=self._collect_loop, name=f"{name}-pool", daemon=True)
        self._collector.start()

    @classmethod
    def from_config(
        cls, config: TeacherConfig, *, name: str = "teacher", teacher_overrides: Mapping[str, Any] | None = None,
        **pool_options: Any,
    ) -> TeacherPool:  # fmt: skip
        """A pool from the `teacher` config section. `teacher_overrides` are Teacher arguments set in other
        sections (e.g. `chat_template` from `data`); `pool_options` are the other pool arguments."""
        teacher_kwargs = {f: getattr(config, f) for f in _CONFIG_TEACHER_FIELDS}
        if teacher_kwargs.get("temperature", 0) is None:
            # "follow the loss": the trainer passes the loss temperature in `teacher_overrides`; a pool
            # built from the teacher section alone serves plain log-probs
            teacher_kwargs["temperature"] = 1.0
        pool_kwargs = {f: getattr(config, f) for f in _CONFIG_POOL_FIELDS}
        return cls(
            {**teacher_kwargs, **(teacher_overrides or {})}, name=name, **{**pool_kwargs, **pool_options}
        )

    # ---- requests ----------------------------------------------------------------------------

    def submit(self, method: str, *args: Any, **kwargs: Any) -> Future:
        """Send `method(*args, **kwargs)` to the least-loaded replica; blocks while all are full.

        The returned `concurrent.futures.Future` is resolved exactly once, after any retries.
        """
        if method.startswith("_") or not hasattr(self._replicas[0].handle, method):
            raise AttributeError(f"teacher pool {self.name!r}: the teacher has no public method {method!r}")
        future: Future = Future()
        with self._cond:
            while True:
                self._check_usable_locked()
                if self._admitted < self.max_in_flight * sum(r.state != "dead" for r in self._replicas):
                    break
                if threading.current_thread() is self._collector:
                    break  # from a future's done-callback: waiting here would wait on ourselves
                self._cond.wait(timeout=1.0)
            self._admitted += 1
            self._queue.append(_Request(next(self._ids), method, args, kwargs, future))
            self._dispatch_locked()
        return future

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """`submit(...).result()`: the answer, or the teacher's own exception, or TeacherPoolError."""
        return self.submit(method, *args, **kwargs).result()

    def map(
        self, method: str, args_list: Iterable[Any], *, ordered: bool = True, **kwargs: Any
    ) -> Iterator[Any]:
        """Stream many requests with bounded in-flight work; `args_list` may be a lazy iterable.

        Each item is one request's positional arguments: a tuple is unpacked, anything else is the single
        argument; `kwargs` go to every request. Yields results in input order, or `(index, result)` in
        completion order when `ordered=False`. The first failed request stops the stream with its error.
        """

        def send(args: Any) -> Future:
            return self.submit(method, *(args if isinstance(args, tuple) else (args,)), **kwargs)

        # the window bounds the results held back for ordering
        return stream(send, args_list, window=2 * self.max_in_flight * len(self._replicas), ordered=ordered)

    def logprobs(self, batch: Mapping[str, Any], k: int | None = None) -> dict[str, Any]:
        """Teacher signal of a tokenized batch (see `Teacher.logprobs`)."""
        return self.call("logprobs", batch, k)

    def score(self, sequences: Any, k: int | None = None, prompt_lengths: Any = None) -> dict[str, Any]:
        """Teacher signal of token sequences (see `Teacher.score`)."""
        return self.call("score", sequences, k, prompt_lengths)

    def generate(self, prompts: Any, **kwargs: Any) -> list[list[dict[str, Any]]]:
        """Samples per prompt (see `Teacher.generate`)."""
        return self.call("generate", prompts, **kwargs)

    def reward(self, prompts: Any, responses: Any) -> Any:
        """Per-response rewards (see `Teacher.reward`)."""
        return self.call("reward", prompts, responses)

    # ---- dispatch and collection (state changes only under self._cond) --------------------------

    def _check_usable_locked(self) -> None:
        if self._closed:
            raise TeacherPoolError(f"teacher pool {self.name!r} is closed")
        if all(r.state == "dead" for r in self._replicas):
            raise self._error(
                f"all {len(self._replicas)} replicas are dead (max_restarts={self.max_restarts} spent)"
            )
        if all(r.state != "up" for r in self._replicas):
            since = max(r.down_since for r in self._replicas if r.state == "down")
            if time.monotonic() - since > self.ready_timeout_s:
                raise self._error(f"no replica came back within ready_timeout_s={self.ready_timeout_s}")

    def _error(self, what: str) -> TeacherPoolError:
        states = ", ".join(f"{self.name}[{r.index}] {r.state} (pid {r.pid})" for r in self._replicas)
        last = f"{type(self.last_error).__name__}: {self.last_error}" if self.last_error else "none"
        return TeacherPoolError(f"teacher pool {self.name!r}: {what}; replicas: {states}; last error: {last}")

    def _dispatch_locked(self) -> None:
        """Send queued requests to the least-loaded live replicas while any has a free slot."""
        while self._queue:
            free = [r for r in self._replicas if r.state == "up" and r.in_flight < self.max_in_flight]
            if not free:
                break
            replica = min(free, key=lambda r: (r.in_flight, r.served))
            request = self._queue.popleft()
            if request.attempts == 0 and not request.future.set_running_or_notify_cancel():
                self._admitted -= 1  # cancelled before it was sent
                continue
            try:
                ref = getattr(replica.handle, request.method).remote(*request.args, **request.kwargs)
            except Exception as error:  # e.g. arguments that do not bind to the method's signature
                self._admitted -= 1
                _resolve(request.future, error=error)
                continue
            replica.in_flight += 1
            replica.served += 1
            self._in_flight[ref] = (request, replica)
            self.max_in_flight_seen = max(self.max_in_flight_seen, len(self._in_flight))
        self._cond.notify_all()

    def _collect_loop(self) -> None:
        """Background thread: settle finished requests and probes, so slots free up even if nobody waits."""
        ray = ray_module()
        while True:
            with self._cond:
                if self._closed:
                    return
                self._send_due_probes()
                refs = [*self._in_flight, *self._probes]
                if not refs:
                    self._cond.wait(timeout=REPROBE_S if self._reprobe else 0.5)
                    continue
            try:
                ready, _ = ray.wait(refs, num_returns=1, timeout=_POLL_S)
                if ready:
                    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            except Exception as error:  # Ray itself went away (e.g. shut down before close())
                self.last_error = error
                return self.close()
            for ref in ready:
                try:
                    value, error = ray.get(ref), None
                except Exception as exc:
                    value, error = None, exc
                self._settle(ref, value, error)
            if not ready:
                self._settle(None, None, None)  # only checks the ready timeout of queued requests

    def _settle(self, ref: Any, value: Any, error: BaseException | None) -> None:
        """Deliver a finished request, or re-queue it when its replica died; then refill the slots."""
        deliver: list[tuple[Future, Any, BaseException | None]] = []
        with self._cond:
            if ref in self._probes:
                self._settle_probe(self._probes.pop(ref), value, error)
            elif ref in self._in_flight:
                request, replica = self._in_flight.pop(ref)
                replica.in_flight -= 1
                if error is not None and is_replica_failure(error):
                    self._replica_failed(replica, error)
                    request.attempts += 1
                    if request.attempts > self.max_request_retries:
                        what = f"request {request.id} ({request.method}) lost {request.attempts} replicas"
                        deliver.append((request.future, None, self._error(what)))
                    else:
                        self.retries += 1
                        self._queue.appendleft(request)
                else:
                    self.completed += 1
                    deliver.append((request.future, value, error))
            deliver += self._fail_queue_if_unservable()
            self._admitted -= len(deliver)
            self._dispatch_locked()  # also wakes submitters waiting for a slot
        for future, result, exc in deliver:  # outside the lock: callbacks may submit again
            _resolve(future, result, exc)

    def _replica_failed(self, replica: Replica, error: BaseException) -> None:
        """Mark the replica down and probe it with info(): the probe answers once Ray has restarted it."""
        self.last_error = error
        replica.failures += 1
        if replica.state == "up":
            replica.state, replica.down_since = "down", time.monotonic()
            self._probes[replica.handle.info.remote()] = replica

    def _settle_probe(self, replica: Replica, value: Any, error: BaseException | None) -> None:
        if error is None or not is_replica_failure(error):
            if replica.state == "down":  # answered (even with an exception): the process is alive again
                replica.state = "up"
            replica.pid = value.get("pid") if isinstance(value, dict) else replica.pid
        elif isinstance(error, ray_module().exceptions.ActorUnavailableError):
            self._reprobe[replica.index] = time.monotonic() + REPROBE_S  # mid-restart: Ray refuses calls
        else:
            replica.state, self.last_error = "dead", error  # ActorDiedError: restarts spent

    def _send_due_probes(self) -> None:
        now = time.monotonic()
        for index, due in list(self._reprobe.items()):
            if due <= now:
                del self._reprobe[index]
                self._probes[self._replicas[index].handle.info.remote()] = self._replicas[index]

    def _fail_queue_if_unservable(self) -> list[tuple[Future, Any, BaseException | None]]:
        try:
            self._check_usable_locked()
        except TeacherPoolError as error:
            failed, self._queue = list(self._queue), deque()
            return [(request.future, None, error) for request in failed]
        return []

    # ---- lifecycle ---------------------------------------------------------------------------

    def _ask_info(self, timeout_s: float) -> list[tuple[dict[str, Any] | None, str | None]]:
        """(info, error text) of every replica; those that answered are up again."""
        answers = ask_info(self._replicas, timeout_s)
        with self._cond:
            for replica, (info, error) in zip(self._replicas, answers, strict=True):
                if info is not None:
                    replica.pid = info.get("pid")
                    replica.state = "up" if replica.state == "down" else replica.state
                elif not isinstance(error, TimeoutError):
                    self.last_error = error
        text = [str(e) if isinstance(e, TimeoutError) else f"{type(e).__name__}: {e}" for _, e in answers]
        return [(info, text[i] if error else None) for i, (info, error) in enumerate(answers)]

    def wait_ready(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Block until every replica has loaded its model; returns their `info()`.

        Fails clearly when a replica cannot be placed (no node offers `resources`) or fails to load.
        """
        answers = self._ask_info(self.ready_timeout_s if timeout_s is None else timeout_s)
        problems = [f"{self.name}[{i}]: {error}" for i, (_, error) in enumerate(answers) if error]
        if problems:
            raise self._error(
                f"replicas not ready ({'; '.join(problems)}); a replica that never starts usually means no "
                f"node offers resources={self.resources} with enough CPUs/GPUs free (`ray status`)"
            )
        return [info for info, _ in answers]

    def health_check(self, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """`info()` of every replica plus `replica`, `alive` and `error`; waits up to `timeout_s` in all
        (a replica being restarted by Ray counts as alive once it answers)."""
        return [
            {"replica": i, "alive": info is not None, "error": error, **(info or {})}
            for i, (info, error) in enumerate(self._ask_info(timeout_s))
        ]

    def stats(self) -> dict[str, Any]:
        """Counters for tests and monitoring: throughput, retries, peak concurrency, replica states."""
        with self._cond:
            replicas = [{k: v for k, v in vars(r).items() if k != "handle"} for r in self._replicas]
            counters = {"completed": self.completed, "retries": self.retries, "queued": len(self._queue)}
            return {**counters, "max_in_flight_seen": self.max_in_flight_seen, "replicas": replicas}

    @property
    def handles(self) -> list[Any]:
        """The replicas' actor handles (e.g. for a Ray Data actor pool sharing the loaded teachers)."""
        return [r.handle for r in self._replicas]

    def close(self) -> None:
        """Kill the replicas and fail whatever is still waiting; safe to call twice."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            waiting = [req.future for req in [*self._queue, *(r for r, _ in self._in_flight.values())]]
            self._queue.clear()
            self._in_flight.clear()
            self._cond.notify_all()
        if threading.current_thread() is not self._collector:
            self._collector.join(timeout=5.0)
        for future in waiting:
            _resolve(future, error=TeacherPoolError(f"teacher pool {self.name!r} was closed"))
        if not self._owns:  # attached: the pool that started the actors stops them
            return
        stop_replicas(self._replicas)

    def __reduce__(self) -> Any:
        raise TypeError(
            f"teacher pool {self.name!r} lives in the process that built it (threads, locks); pass "
            "`pool.handles` (actor handles) to other Ray tasks, or build the pool inside them"
        )

    def __enter__(self) -> TeacherPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
