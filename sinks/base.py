"""The sink contract, and the retrying wrapper.

A sink buffers with :meth:`Sink.add` and writes with :meth:`Sink.flush`:

* ``add`` never does I/O;
* ``flush`` writes what was buffered and empties the buffer *whatever happens* (in a ``finally``),
  returning one :class:`Outcome` per item; a second ``flush`` with nothing added writes nothing;
* a duplicate reported by the destination (the item was already written, e.g. after a crash
  between "write" and "record that we wrote") is a success, with status ``duplicate``.

Retrying is a wrapper (:class:`RetryingSink`), not a flag inside a driver: it re-adds only items
whose outcome is ``transient``, sleeps a jittered exponential backoff (or what the destination
asked for with ``retry_after``), and gives up after ``max_attempts``. Clock, sleep and randomness are
injected so tests run in milliseconds.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Generic, Protocol, TypeVar

__all__ = ["Backoff", "KeptThreads", "Outcome", "PendingAlert", "RetryingSink", "Sink", "Status"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class Status(StrEnum):
    OK = "ok"
    DUPLICATE = "duplicate"  # already at the destination: success
    TRANSIENT = "transient"  # may succeed later
    PERMANENT = "permanent"  # will never succeed as it is

    @property
    def delivered(self) -> bool:
        return self in (Status.OK, Status.DUPLICATE)


@dataclass(frozen=True, slots=True)
class Outcome(Generic[T]):
    item: T
    status: Status
    error: str | None = None
    code: str | None = None
    retry_after: float | None = None
    attempts: int = 1


class Sink(Protocol[T]):
    def add(self, item: T) -> None: ...

    def flush(self) -> list[Outcome[T]]: ...


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with "full jitter": sleep ∈ [base·2ⁿ/2, base·2ⁿ], capped."""

    base: float = 0.25
    cap: float = 8.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        top = min(self.cap, self.base * float(2 ** max(0, attempt - 1)))
        return top / 2 + rng.random() * top / 2


class RetryingSink(Generic[T]):
    """Wraps a sink; retries transient outcomes until delivered, permanent, or out of attempts."""

    def __init__(
        self,
        inner: Sink[T],
        *,
        max_attempts: int = 6,
        backoff: Backoff | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        max_retry_after: float = 60.0,
    ) -> None:
        self._inner = inner
        self._max_attempts = max_attempts
        self._backoff = backoff or Backoff()
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._max_retry_after = max_retry_after
        self._buffer: list[T] = []

    def add(self, item: T) -> None:
        self._buffer.append(item)

    def flush(self) -> list[Outcome[T]]:
        """Flush the inner sink, re-adding transient failures between attempts.

        Order: inner.flush(); for each transient outcome, wait and add it again; repeat. The buffer is
        emptied first, so a crash here loses nothing the caller cannot see: items whose outcome was
        never returned are still un-marked in the caller's ledger and are sent again next cycle.
        """
        todo, self._buffer = self._buffer, []
        final: list[Outcome[T]] = []
        attempt = 0
        while todo:
            attempt += 1
            for item in todo:
                self._inner.add(item)
            outcomes = self._inner.flush()
            todo = []
            wait = 0.0
            for o in outcomes:
                if o.status is Status.TRANSIENT and attempt < self._max_attempts:
                    todo.append(o.item)
                    if o.retry_after is not None:
                        wait = max(wait, min(o.retry_after, self._max_retry_after))
                else:
                    final.append(Outcome(o.item, o.status, o.error, o.code, o.retry_after, attempts=attempt))
            if todo:
                delay = max(wait, self._backoff.delay(attempt, self._rng))
                log.info("retrying %d item(s) in %.2fs (attempt %d)", len(todo), delay, attempt + 1)
                self._sleep(delay)
        return final


class KeptThreads:
    """A sink's worker threads: started on first use and kept (starting threads on every flush costs more
    than a Stripe request); :meth:`close` stops them, waiting for the calls in flight, and is idempotent.
    Asking for the threads after :meth:`close` raises."""

    def __init__(self, workers: int, name: str) -> None:
        self._workers = workers
        self._name = name
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    def get(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name}: the sink is closed")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix=self._name)
            return self._pool

    def close(self) -> None:
        with self._lock:
            pool, self._pool, self._closed = self._pool, None, True
        if pool is not None:
            pool.shutdown(wait=True)


@dataclass(frozen=True, slots=True)
class PendingAlert:
    """An alert recorded in the ledger and not yet published (parity and the reconciliation with Stripe both
    raise them; the worker publishes them to the alerts topic and then marks them published)."""

    id: str
    body: dict[str, Any]
    new: bool  # recorded by this run (log it once); False: an earlier alert whose publication is retried
