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
from afmkit.infer.engine import DecodeBatch, Engine, Request, StreamEvent

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


class Scheduler:
    """Runs ``engine`` over a slotted batch in a daemon thread; thread-safe ``submit``."""

    def __init__(self, engine: Engine, *, max_batch: int = 32, capacity: int = 2049, adapter_slots: int = 16) -> None:
        self.engine = engine
        self.batch: DecodeBatch = engine.new_batch(slots=max_batch, capacity=capacity, adapter_slots=adapter_slots)
        self.stats = SchedulerStats()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: dict[int, Job] = {}
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="afmkit-scheduler", daemon=True)
        self._thread.start()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, request: Request, sink: EventSink) -> Job:
        """Queue ``request``; ``sink`` receives its events, then (on failure) an exception."""
        self.batch.check(request)  # requests that can never fit fail now, in the caller's thread
        job = Job(request, sink)
        with self._wake:
            self._waiting.append(job)
            self.stats.submitted += 1
            self._wake.notify()
        return job

    def close(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=10)

    # -- the loop ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stop and not self._waiting and not self.batch.busy:
                    self._wake.wait()
                if self._stop:
                    return
                waiting = [j for j in self._waiting if not j.cancelled]
                self.stats.cancelled += len(self._waiting) - len(waiting)
                self._waiting.clear()
            try:
                self._drop_cancelled()
                leftover = self._admit(waiting)
                with self._wake:
                    self._waiting.extendleft(reversed(leftover))
                if self.batch.busy:
                    self._route(self.batch.step())
                    self.stats.steps += 1
                elif leftover:
                    time.sleep(0.001)  # waiting for adapter-bank room that no running row will free
            except Exception as exc:  # keep serving: fail the rows in flight, start a fresh batch
                traceback.print_exc()
                self._fail_all(exc)

    def _admit(self, waiting: list[Job]) -> list[Job]:
        if not waiting or not self.batch.free_slots:
            return waiting
        by_request = {id(j.request): j for j in waiting}
        admitted, events = self.batch.admit([j.request for j in waiting])
        for request in admitted:
            self._running[id(request)] = by_request.pop(id(request))
        self._route(events)
        return [j for j in waiting if id(j.request) in by_request]

    def _drop_cancelled(self) -> None:
        for key, job in list(self._running.items()):
            if job.cancelled:
                self.batch.cancel(job.request)
                del self._running[key]
                self.stats.cancelled += 1

    def _route(self, events: list) -> None:
        now = time.perf_counter()
        if events:
            self.stats.recent.append((now, len(events)))
            self.stats.generated_tokens += len(events)
        for request, event in events:
            job = self._running.get(id(request))
            if job is None:
                continue
            try:
                job.sink(event)
            except Exception:  # a broken sink must not stop the loop
                job.cancel()
            if event.finish_reason:
                job.done = True
                self._running.pop(id(request), None)
                self.stats.completed += 1

    def _fail_all(self, exc: Exception) -> None:
        error = exc if isinstance(exc, UserError) else RuntimeError(f"generation failed: {exc}")
        for job in list(self._running.values()):
            with contextlib.suppress(Exception):
                job.sink(error)
            self.stats.failed += 1
        self._running.clear()
        old = self.batch
        self.batch = self.engine.new_batch(slots=old.n_slots, capacity=old.capacity, adapter_slots=old.adapter_slots)
