"""What every consumer of the worker shares: the record it reads, the dead letter it writes, the retry loop.

A leaf module (the pipeline, the ingest service and the cell agent import it). A dead letter carries the
rejected bytes (key + value under :data:`DEAD_LETTER_MAX_BYTES`) and the headers ``edgebill-reason``,
``-source`` (``topic/partition/offset``), ``-array-index``, ``-truncated``, ``-key-truncated`` and
``-detail``: docs/architecture.md, "Module notes".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

import orjson

from sinks.base import LEDGER_RETRY, PendingAlert, RetryPolicy
from streams.health import Health, RateLimitedLog, dead_letters_truncated_total

__all__ = [
    "DEAD_LETTER_KEY_MAX_BYTES",
    "DEAD_LETTER_MAX_BYTES",
    "RAW_BYTES",
    "DeadLetter",
    "Publish",
    "RawRecord",
    "Record",
    "Stopped",
    "alert_publisher",
    "bound_dead_letter",
    "dead_letter",
    "first_line",
    "log_failure",
    "publish_alerts",
    "retry_forever",
    "retry_until_done",
    "run_logged",
    "sleep_unless",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")
Failed = Callable[[Exception], None]

#: Key + value of a dead letter at most (headers are small): half of Kafka's default 1,000,000-byte
#: producer request, so it fits with room to spare for headers and batch overhead.
DEAD_LETTER_MAX_BYTES: Final = 512 * 1024
DEAD_LETTER_KEY_MAX_BYTES: Final = 1024
_DETAIL_MAX_CHARS: Final = 1000

# Every topic of the worker carries bytes both ways: records are parsed (and dead-lettered) by this code.
RAW_BYTES: Final[dict[str, Any]] = {
    "key_type": bytes,
    "value_type": bytes,
    "key_serializer": "raw",
    "value_serializer": "raw",
}


class Record(Protocol):
    """What the ingest step needs of a Kafka record."""

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...

    @property
    def key(self) -> bytes | None: ...

    @property
    def value(self) -> bytes | None: ...


@dataclass(frozen=True, slots=True)
class RawRecord:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]


def dead_letter(
    rec: Record, topic: str, reason: str, raw: bytes, index: int | None = None, *, detail: str | None = None
) -> DeadLetter:
    """The dead letter of a rejected record: its bytes (bounded), reason and source in headers."""
    headers = {
        "edgebill-reason": reason.encode(),
        "edgebill-source": f"{topic}/{rec.partition}/{rec.offset}".encode(),
    }
    if index is not None:
        headers["edgebill-array-index"] = str(index).encode()
    if detail:
        headers["edgebill-detail"] = detail[:_DETAIL_MAX_CHARS].encode("utf-8", "replace")
    return bound_dead_letter(DeadLetter(key=rec.key, value=raw, headers=headers), DEAD_LETTER_MAX_BYTES)


def bound_dead_letter(d: DeadLetter, max_bytes: int) -> DeadLetter:
    """``d`` with its key cut to :data:`DEAD_LETTER_KEY_MAX_BYTES` and key + value to ``max_bytes``.

    A cut keeps a prefix and records the original size in a header (``edgebill-key-truncated``,
    ``edgebill-truncated``); cutting an already cut letter keeps the first original size.
    """
    key, value, headers = d.key, d.value, d.headers
    key_cap = min(DEAD_LETTER_KEY_MAX_BYTES, max_bytes // 2)
    if key is not None and len(key) > key_cap:
        headers = {"edgebill-key-truncated": str(len(key)).encode(), **headers}
        key = key[:key_cap]
    room = max(0, max_bytes - len(key or b""))
    if len(value) > room:
        headers = {"edgebill-truncated": str(len(value)).encode(), **headers}
        value = value[:room]
        dead_letters_truncated_total.inc()
    if key is d.key and value is d.value:
        return d
    return DeadLetter(key=key, value=value, headers=headers)


class Stopped(Exception):
    """The worker is stopping: a retry loop gave up without finishing (nothing was acknowledged)."""


async def sleep_unless(stopping: asyncio.Event | None, seconds: float) -> None:
    """Sleep ``seconds``, or less when ``stopping`` gets set."""
    if stopping is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), timeout=seconds)


async def retry_until_done(
    what: str,
    attempt: Callable[[], Awaitable[_T]],
    policy: RetryPolicy,
    failed: Failed,
    *,
    stopping: asyncio.Event | None = None,
    sleep: Callable[[asyncio.Event | None, float], Awaitable[None]] = sleep_unless,
) -> _T:
    """Await ``attempt()`` until it returns, and return its value; the worker's one retry loop.

    After a failure of a type ``policy`` retries: ``failed(exc)`` (log it, hold a condition), ``policy``'s
    wait (``sleep``, cut short when ``stopping`` is set), the next attempt. Raises any other exception at
    once, and :class:`Stopped` (from the failure) when ``stopping`` is set by the end of the wait: once
    the worker stops nothing more is attempted, and the caller acknowledges nothing of the failed step.
    """
    n = 0
    while True:
        n += 1
        try:
            return await attempt()
        except Stopped:
            raise
        except policy.retryable as exc:
            if not policy.again(n):
                raise
            failed(exc)
            if stopping is None or not stopping.is_set():
                await sleep(stopping, policy.wait(n))
            if stopping is not None and stopping.is_set():
                raise Stopped(what) from exc


async def retry_forever(
    what: str,
    fn: Callable[[], Any],
    *,
    log_throttle: RateLimitedLog | None = None,
    health: Health | None = None,
    condition: str | None = None,
    stopping: asyncio.Event | None = None,
    policy: RetryPolicy = LEDGER_RETRY,
) -> None:
    """Run a ledger write (in a thread) until it succeeds (:func:`retry_until_done`). Never ack a batch whose
    write failed.

    Failures are logged through ``log_throttle`` (once per interval, with a count) and, with ``health``, hold
    ``condition`` until the write succeeds. With ``stopping``: once it is set, a failed attempt is not
    retried but raises :class:`Stopped` (the caller acknowledges nothing).
    """
    rl = log_throttle or _default_log_throttle
    report = log_failure(rl, what, "%s failed (%s: %s); retrying, offsets are not committed meanwhile", what)

    def failed(exc: Exception) -> None:
        report(exc)
        if health is not None and condition is not None:
            health.fail(condition, f"{what}: {type(exc).__name__}: {first_line(exc)}", source=what)

    await retry_until_done(what, lambda: asyncio.to_thread(fn), policy, failed, stopping=stopping)
    rl.recovered(what)
    if health is not None and condition is not None:
        health.ok(condition, source=what)


_default_log_throttle = RateLimitedLog(log)


def log_failure(log_throttle: RateLimitedLog, key: str, msg: str, *args: Any, level: int = logging.WARNING) -> Failed:
    """Logs a failure through ``log_throttle`` as ``msg % (*args, its type, its first line)``, with the traceback
    when a streak of failures of ``key`` starts (a ``failed`` for :func:`retry_until_done`)."""

    def failed(exc: Exception) -> None:
        exc_info = None if log_throttle.failing(key) else exc
        log_throttle.failure(key, msg, *args, type(exc).__name__, first_line(exc), level=level, exc_info=exc_info)

    return failed


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), for one-line logs."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else ""


async def run_logged(log_throttle: RateLimitedLog, what: str, fn: Callable[[], _T]) -> _T | None:
    """Run one periodic job (a close, a send, a refresh) in a thread; returns its result, or None when it
    failed. A failure is logged, not raised: the timer runs the job again. While it repeats it is logged
    once per interval with a count, with the traceback the first time only."""
    try:
        result = await asyncio.to_thread(fn)
    except Exception as exc:
        log_failure(log_throttle, what, "%s failed (%s: %s); it will run again", what, level=logging.ERROR)(exc)
        return None
    log_throttle.recovered(what)
    return result


Publish = Callable[[PendingAlert], Awaitable[None]]


def alert_publisher(topic: Any) -> Publish:
    """Publishes an alert to ``topic`` (a Faust topic of raw bytes): key and header ``edgebill-alert-id`` are
    the alert's id, the value its JSON body; returns once the broker has acknowledged it."""

    async def publish(alert: PendingAlert) -> None:
        fut = await topic.send(
            key=alert.id.encode(),
            value=orjson.dumps(alert.body),
            headers={"edgebill-alert-id": alert.id.encode()},
        )
        await fut

    return publish


async def publish_alerts(
    alerts: Sequence[PendingAlert],
    publish: Publish,
    mark_published: Callable[[list[str]], object],
    announce: Callable[[PendingAlert], None],
) -> None:
    """Publish the due alerts in order, then mark the published ones in the ledger.

    Order of side effects: ``announce`` (a log line) for each alert recorded by this run, then its publication;
    after the loop, one ``mark_published`` (in a thread) for those the broker acknowledged. A publication that
    fails stops the loop (the rest wait for the next run, in order). A crash, or a failed mark, after a
    publication publishes that alert again on the next run: alerts are delivered at least once, keyed by id.
    """
    done: list[str] = []
    for alert in alerts:
        if alert.new:
            announce(alert)
        try:
            await publish(alert)
        except Exception:
            log.exception("could not publish alert %s; will retry", alert.id)
            break
        done.append(alert.id)
    if done:
        try:
            await asyncio.to_thread(mark_published, done)
        except Exception:
            log.exception("could not mark alerts published; they will be published again")
