"""Continuous batching: one background thread runs the engine's ``DecodeBatch`` for many clients.

Clients ``submit`` requests from any thread and get their ``StreamEvent``s through a callback.
Between decode steps the scheduler admits waiting requests into free slots (they are prefilled
and join the running batch at the next step), drops cancelled ones (a client that went away
frees its slot at once) and routes each step's tokens to their requests.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import threading
import time
import traceback
from collections.abc import Callable

from afmkit.errors import UserError
from afmkit.infer.engine import DecodeBatch, Engine, KVSettings, Request, StreamEvent

EventSink = Callable[[StreamEvent | BaseException], None]


@dataclasses.dataclass(eq=False)
class Job:
    """A submitted request and where its events go; ``cancel()`` may be called from any thread."""

    request: Request
    sink: EventSink
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    cancelled: bool = False
    done: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclasses.dataclass
class SchedulerStats:
    submitted: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    generated_tokens: int = 0
    steps: int = 0
    recent: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=4096))

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last ``window`` seconds."""
        now = time.perf_counter()
        count = sum(n for t, n in self.recent if now - t <= window)
        return count / window


class SchedulerClosed(RuntimeError):
    """The scheduler stopped (the server is shutting down) before the request finished."""


class Scheduler:
    """Runs ``engine`` over a slotted batch in a daemon thread; thread-safe ``submit``.

    One request's failure never ends the others: a request that fails to start gets the error
    alone (requests that were admitted with it are retried one by one), and if a decode step
    fails, only the rows in that step fail; the loop starts a fresh batch and keeps serving.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_batch: int = 32,
        capacity: int = 2049,
        adapter_slots: int = 16,
        kv: KVSettings | None = None,
    ) -> None:
        if max_batch < 1:
            raise UserError(f"max_batch must be at least 1, got {max_batch}")
        self.engine = engine
        self.batch: DecodeBatch = engine.new_batch(
            slots=max_batch, capacity=capacity, adapter_slots=adapter_slots, kv=kv
        )
        self.stats = SchedulerStats()
        self._waiting: collections.deque[Job] = collections.deque()  # until admitted
        self._running: dict[int, Job] = {}
        self._wake = threading.Condition()
        self._stop = False
        self._isolate: set[int] = set()  # ids of jobs to admit alone: they failed in a group
        self._thread = threading.Thread(target=self._loop, name="afmkit-scheduler", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop

    def submit(self, request: Request, sink: EventSink) -> Job:
        """Queue ``request``; ``sink`` receives its events, then (on failure) an exception."""
        self.batch.check(request)  # requests that can never fit fail now, in the caller's thread
        if request.adapter is not None and self.batch.adapter_slots < 2:
            raise UserError("this server has no adapter slots; start it with --adapter-slots 2 or more")
        job = Job(request, sink)
        with self._wake:
            if self._stop:
                raise SchedulerClosed("the server is shutting down; retry on another replica or later")
            self._waiting.append(job)
            self.stats.submitted += 1
            self._wake.notify()
        return job

    def close(self, *, timeout: float = 5.0) -> None:
        """Stop the loop; every job still waiting or running gets ``SchedulerClosed`` at once,
        so nobody waits on a scheduler that is gone (even one stuck in a device call)."""
        with self._wake:
            self._stop = True
            jobs = list(self._waiting) + list(self._running.values())
            self._waiting.clear()
            self._running.clear()
            self._wake.notify()
        error = SchedulerClosed("the server is shutting down; the request did not finish")
        for job in jobs:
            self._send(job, error)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=timeout)

    # -- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self._waiting and not self.batch.busy:
                    self._wake.wait()
                if self._stop:
                    return
                cancelled = [j for j in self._waiting if j.cancelled]
                for job in cancelled:
                    self._waiting.remove(job)
                self.stats.cancelled += len(cancelled)
                waiting = list(self._waiting)
            try:
                self._drop_cancelled()
                admitted = self._admit(waiting)
                if self.batch.busy:
                    self._step()
                elif waiting and not admitted:
                    time.sleep(0.001)  # waiting for adapter-bank room that no running row will free
            except Exception as exc:  # a bug outside any one request: fail the rows in flight
                traceback.print_exc()
                self._restart(exc)

    def _admit(self, waiting: list[Job]) -> list[Job]:
        """Admit what fits of ``waiting`` (in order); jobs that failed to start get their error."""
        admitted: list[Job] = []
        alone = [j for j in waiting if id(j) in self._isolate]
        groups = [[j] for j in alone] + ([[j for j in waiting if id(j) not in self._isolate]] if waiting else [])
        for group in groups:
            if not group or not self.batch.free_slots:
                continue
            try:
                started, events = self.batch.admit([j.request for j in group])
            except Exception as exc:
                if not self.batch.healthy:
                    raise  # the device state is gone: _restart fails the running rows
                if len(group) > 1:  # which one? admit them one at a time from now on
                    self._isolate.update(id(j) for j in group)
                else:
                    traceback.print_exc()
                    self._finish_waiting(group[0])
                    self._isolate.discard(id(group[0]))
                    self._send(group[0], _request_error(exc))
                    self.stats.failed += 1
                continue
            by_request = {id(j.request): j for j in group}
            for request in started:
                job = by_request[id(request)]
                self._finish_waiting(job)
                self._isolate.discard(id(job))
                self._running[id(request)] = job
                admitted.append(job)
            self._route(events)
        return admitted

    def _finish_waiting(self, job: Job) -> None:
        with self._wake, contextlib.suppress(ValueError):
            self._waiting.remove(job)

    def _step(self) -> None:
        try:
            events = self.batch.step()
        except Exception as exc:
            traceback.print_exc()
            self._restart(exc)
            return
        self._route(events)
        self.stats.steps += 1

    def _drop_cancelled(self) -> None:
        for key, job in list(self._running.items()):
            if job.cancelled:
                self.batch.cancel(job.request)
                del self._running[key]
                self.stats.cancelled += 1

    def _send(self, job: Job, event: StreamEvent | BaseException) -> None:
        try:
            job.sink(event)
        except Exception:  # a broken sink must not stop the loop
            job.cancel()

    def _route(self, events: list) -> None:
        now = time.perf_counter()
        if events:
            self.stats.recent.append((now, len(events)))
            self.stats.generated_tokens += len(events)
        for request, event in events:
            job = self._running.get(id(request))
            if job is None:
                continue
            self._send(job, event)
            if event.finish_reason:
                job.done = True
                self._running.pop(id(request), None)
                self.stats.completed += 1

    def _restart(self, exc: Exception) -> None:
        """Fail the running rows (their state went with the step) and start a fresh batch;
        waiting requests stay queued for it."""
        error = _request_error(exc)
        with self._wake:
            running = list(self._running.values())
            self._running.clear()
        for job in running:
            self._send(job, error)
        self.stats.failed += len(running)
        old = self.batch
        try:
            self.batch = self.engine.new_batch(
                slots=old.n_slots, capacity=old.capacity, adapter_slots=old.adapter_slots, kv=old.kv
            )
        except Exception:  # e.g. out of memory: try again shortly rather than spin
            traceback.print_exc()
            time.sleep(1.0)


def _request_error(exc: Exception) -> Exception:
    return exc if isinstance(exc, UserError) else RuntimeError(f"generation failed: {type(exc).__name__}: {exc}")
