"""The sink contract, and the retrying wrapper.

A sink buffers with :meth:`Sink.add` and writes with :meth:`Sink.flush`:

* ``add`` never does I/O;
* ``flush`` writes what was buffered and empties the buffer *whatever happens* (in a ``finally``),
  returning one :class:`Outcome` per item; a second ``flush`` with nothing added writes nothing;
* a duplicate reported by the destination (the item was already written, e.g. after a crash
  between "write" and "record that we wrote") is a success, with status ``duplicate``.

Retrying is a wrapper (:class:`RetryingSink`), not a flag inside a driver: it re-adds only items
whose outcome is ``transient``. When and how long it waits is :class:`RetryPolicy`, the one retry policy
of the sinks and the worker, with its named settings below. Sleep and randomness are injected so tests
run in milliseconds.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Final, Generic, Protocol, TypeVar

__all__ = [
    "BATCH_RETRY",
    "DEAD_LETTER_RETRY",
    "LEDGER_RETRY",
    "READ_RETRY",
    "SEND_RETRY",
    "Backoff",
    "KeptThreads",
    "Outcome",
    "PendingAlert",
    "RetryPolicy",
    "RetryingSink",
    "Sink",
    "Status",
]

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
    """The wait after failed attempt ``n``: ``base·2ⁿ⁻¹`` capped at ``cap``; with ``jitter`` ("full jitter",
    halved) a random point of [top/2, top] instead of the top itself."""

    base: float = 0.25
    cap: float = 8.0
    jitter: bool = True

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        top = min(self.cap, self.base * float(2 ** max(0, attempt - 1)))
        return top / 2 + (rng or _RNG).random() * top / 2 if self.jitter else top


_RNG = random.Random()


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When to try again and how long to wait first.

    ``retryable``: the exception types another attempt may cure (a sink's ``transient`` outcome says the same,
    decided by exception type where its errors are classified). ``max_attempts``: attempts in all (None: until
    done or stopped). The wait after attempt n is the backoff's, or the destination's ``retry_after`` when
    longer (at most ``max_retry_after``). Stripe's SDK retries stay off: docs/architecture.md, "Module notes".
    """

    backoff: Backoff = Backoff()
    max_attempts: int | None = None
    max_retry_after: float = 60.0
    retryable: tuple[type[Exception], ...] = (Exception,)

    def again(self, attempt: int) -> bool:
        """May another attempt follow a retryable failure of attempt ``attempt`` (1 = the first)?"""
        return self.max_attempts is None or attempt < self.max_attempts

    def wait(self, attempt: int, rng: random.Random | None = None, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt ``attempt`` (draws from ``rng`` when the backoff jitters)."""
        delay = self.backoff.delay(attempt, rng)
        return delay if retry_after is None else max(delay, min(retry_after, self.max_retry_after))


#: Meter events to Stripe (:class:`RetryingSink`): what is still transient after these waits for the next cycle.
SEND_ATTEMPTS: Final = 6
SEND_RETRY: Final = RetryPolicy(Backoff(0.25, 8.0), max_attempts=SEND_ATTEMPTS)
#: Reads of what Stripe holds (the reconciliation); an unreachable Stripe gets fewer attempts (the reader's).
READ_RETRY: Final = RetryPolicy(Backoff(0.5, 30.0), max_attempts=6)
#: The worker's ledger writes: until done, since a batch whose write failed is never acknowledged.
LEDGER_RETRY: Final = RetryPolicy(Backoff(0.2, 5.0, jitter=False))
#: A whole ingest batch again after an unexpected error (a bug stalls ingestion loudly, it does not kill it).
BATCH_RETRY: Final = RetryPolicy(Backoff(1.0, 10.0, jitter=False))
#: Dead letters: until written, since no offset is committed past a record that is not dead-lettered.
DEAD_LETTER_RETRY: Final = RetryPolicy(Backoff(0.5, 5.0, jitter=False))


class RetryingSink(Generic[T]):
    """Wraps a sink; retries transient outcomes by ``policy`` (``overrides``: ``max_attempts=``, ``backoff=``,
    ...) until delivered, permanent, or out of attempts."""

    def __init__(
        self,
        inner: Sink[T],
        *,
        policy: RetryPolicy = SEND_RETRY,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        **overrides: Any,
    ) -> None:
        self._inner = inner
        self._policy = replace(policy, **overrides)
        self._sleep = sleep
        self._rng = rng or random.Random()
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
            todo = []
            asked: list[float] = []
            for o in self._inner.flush():
                if o.status is Status.TRANSIENT and self._policy.again(attempt):
                    todo.append(o.item)
                    if o.retry_after is not None:
                        asked.append(o.retry_after)
                else:
                    final.append(replace(o, attempts=attempt))
            if todo:
                delay = self._policy.wait(attempt, self._rng, max(asked, default=None))
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
