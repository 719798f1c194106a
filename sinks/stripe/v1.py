"""The Stripe meter sink (v1): sends meter events through the official ``stripe`` SDK.

At-least-once per flush, effectively once by Stripe's ``identifier`` dedup (a repeat is ``duplicate`` =
delivered); no deterministic Idempotency-Key. Calls for one (customer, meter) are serialised
(:class:`KeyedLocks`), all share one concurrency bound, and :class:`RateLimiter` may pace them; Stripe's
exceptions end here (:func:`~sinks.stripe.errors.classify`). Why: docs/architecture.md, "Module notes".
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Generic, TypeVar
from urllib.request import getproxies

import requests
import stripe
from requests.adapters import HTTPAdapter

from models.billing import (
    MAX_IDENTIFIER_LENGTH,
    MAX_SIGNIFICANT_DIGITS,
    significant_digits,
)
from models.catalog import METER_CUSTOMER_KEY, METER_VALUE_KEY
from models.stripe_window import (
    CANCEL_WINDOW_SECONDS,
    VALIDATE_MARGIN_SECONDS,
    stripe_refuses_as_future,
    stripe_refuses_as_old,
)
from sinks.base import KeptThreads, Outcome, Status
from sinks.stripe.errors import classify, observed

__all__ = [
    "CANCEL_WINDOW_SECONDS",
    "PROCESS_KEY_LOCKS",
    "STRIPE_METER_EVENTS_HOST",
    "Cancellation",
    "KeyedLocks",
    "MeterEvent",
    "RateLimiter",
    "StripeMeterSink",
    "cancel_meter_event",
    "make_client",
    "make_http_session",
    "meter_events_base_for",
    "validate_event",
]

log = logging.getLogger(__name__)

#: Where Stripe serves the v2 meter-event stream (the SDK's ``meter_events`` base address).
STRIPE_METER_EVENTS_HOST = "https://meter-events.stripe.com"
#: Longest ``event_name`` Stripe accepts.
MAX_EVENT_NAME_LENGTH = 100

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class MeterEvent:
    identifier: str
    event_name: str
    customer: str
    value: str
    timestamp: int  # unix s


def meter_events_base_for(base: str) -> str:
    """The meter-events base address that goes with API base ``base``.

    Stripe serves the v2 stream on its own host; any other base (the local server, a proxy) serves
    both from one address.
    """
    if base.rstrip("/") == "https://api.stripe.com":
        return STRIPE_METER_EVENTS_HOST
    return base


def make_http_session(pool_size: int = 16) -> requests.Session:
    """A ``requests`` session whose connection pool holds ``pool_size`` keep-alive connections.

    Give it to :func:`make_client` when several threads send at once: they share its pool (without
    one, the SDK opens a session per thread). The caller owns it and closes it.
    """
    session = requests.Session()
    adapter = HTTPAdapter(pool_connections=4, pool_maxsize=max(1, pool_size))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    if not getproxies():
        # No proxy in the environment: skip requests' per-request environment scan (proxies, netrc,
        # CA bundle variables), about 1 ms a request. The SDK passes its own CA bundle explicitly.
        session.trust_env = False
    return session


def make_client(
    api_key: str,
    base: str,
    *,
    timeout: float = 20.0,
    meter_events_base: str | None = None,
    session: requests.Session | None = None,
) -> stripe.StripeClient:
    """An SDK client pointed at ``base`` (and ``meter_events_base`` for the v2 stream).

    ``meter_events_base`` defaults to :func:`meter_events_base_for` ``(base)``. SDK-level retries are
    off (why: :class:`sinks.base.RetryPolicy`). ``session``: see :func:`make_http_session`.
    """
    return stripe.StripeClient(
        api_key,
        base_addresses={"api": base, "meter_events": meter_events_base or meter_events_base_for(base)},
        max_network_retries=0,
        http_client=stripe.RequestsClient(timeout=timeout, session=session),
    )


def validate_event(ev: MeterEvent, now_s: int) -> str | None:
    """Every rule Stripe checks on a meter event that we can check first; the reason, or None.

    The same rules hold for v1 (where Stripe answers 400) and the v2 stream (where Stripe answers 202
    and reports the error later), so nothing that fails here is ever sent.
    """
    if not ev.identifier or len(ev.identifier) > MAX_IDENTIFIER_LENGTH:
        return f"identifier must be 1..{MAX_IDENTIFIER_LENGTH} characters"
    if not ev.event_name or len(ev.event_name) > MAX_EVENT_NAME_LENGTH:
        return f"event_name must be 1..{MAX_EVENT_NAME_LENGTH} characters"
    if not ev.customer:
        return "no Stripe customer"
    try:
        v = Decimal(ev.value)
    except InvalidOperation:
        return f"value {ev.value!r} is not a number"
    if not v.is_finite():
        return f"value {ev.value!r} is not finite"
    if significant_digits(v) > MAX_SIGNIFICANT_DIGITS:
        return f"value {ev.value} has more than {MAX_SIGNIFICANT_DIGITS} significant digits"
    if stripe_refuses_as_old(ev.timestamp, now_s, VALIDATE_MARGIN_SECONDS):
        return "timestamp is more than 35 days in the past"
    if stripe_refuses_as_future(ev.timestamp, now_s):
        return "timestamp is more than 5 minutes in the future"
    return None


class _KeyEntry:
    __slots__ = ("lock", "users")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


class KeyedLocks(Generic[K]):
    """One mutex per key, created on demand and dropped when nobody holds or waits for it.

    Shared by every flush and every thread of a sink, so "one call at a time per key" holds across
    consecutive flushes and concurrent callers, not only inside one flush.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._entries: dict[K, _KeyEntry] = {}

    @contextmanager
    def hold(self, key: K) -> Iterator[None]:
        with self._guard:
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _KeyEntry()
            entry.users += 1
        entry.lock.acquire()
        try:
            yield
        finally:
            entry.lock.release()
            with self._guard:
                entry.users -= 1
                if entry.users == 0:
                    del self._entries[key]

    def __len__(self) -> int:
        with self._guard:
            return len(self._entries)


#: (customer, event_name) locks shared by every v1 sink of the process (several senders, one process).
PROCESS_KEY_LOCKS: KeyedLocks[tuple[str, str]] = KeyedLocks()


class RateLimiter:
    """Paces calls to at most ``per_s`` a second across threads (one slot every ``1/per_s`` s).

    ``acquire`` reserves the next free slot and sleeps until it; ``per_s <= 0`` disables pacing.
    Clock and sleep are injected for tests.
    """

    def __init__(
        self,
        per_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._interval = 1.0 / per_s if per_s > 0 else 0.0
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next = 0.0

    def acquire(self) -> None:
        if not self._interval:
            return
        with self._lock:
            now = self._clock()
            slot = max(now, self._next)
            self._next = slot + self._interval
        if slot > now:
            self._sleep(slot - now)


class StripeMeterSink:
    """v1 ``POST /v1/billing/meter_events`` sink with bounded concurrency.

    Events are grouped by (customer, event_name); each group is sent in order by one thread holding
    that key's lock (:data:`PROCESS_KEY_LOCKS` by default: shared by every flush, thread and v1 sink of
    the process), so two calls for the same customer and meter never run at once — Stripe's live-mode
    limit. Across processes only Stripe's 429 (retried) enforces it. At most ``concurrency`` calls are in flight across
    every flush of this sink, and ``max_calls_per_s`` (0 = off) paces them under Stripe's 1,000/s.
    """

    def __init__(
        self,
        client: stripe.StripeClient,
        *,
        concurrency: int = 8,
        max_calls_per_s: float = 0.0,
        now: Callable[[], float] = time.time,
        limiter: RateLimiter | None = None,
        key_locks: KeyedLocks[tuple[str, str]] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self._client = client
        self._concurrency = concurrency
        self._now = now
        self._buffer: list[MeterEvent] = []
        self._keys = key_locks if key_locks is not None else PROCESS_KEY_LOCKS
        self._slots = threading.BoundedSemaphore(concurrency)
        self._limiter = limiter or RateLimiter(max_calls_per_s)
        self._threads = KeptThreads(self._concurrency, "stripe-v1")

    def add(self, item: MeterEvent) -> None:
        self._buffer.append(item)

    def _send_one(self, ev: MeterEvent) -> Outcome[MeterEvent]:
        problem = validate_event(ev, int(self._now()))
        if problem:
            return Outcome(ev, Status.PERMANENT, f"not sent: {problem}", "edgebill_presend_validation")
        try:
            self._limiter.acquire()
            with self._slots, observed():
                self._client.v1.billing.meter_events.create(
                    {
                        "event_name": ev.event_name,
                        "identifier": ev.identifier,
                        "timestamp": ev.timestamp,
                        "payload": {METER_CUSTOMER_KEY: ev.customer, METER_VALUE_KEY: ev.value},
                    }
                )
        except Exception as exc:  # every Stripe failure is classified, none escapes
            return classify(exc, ev, new_request_per_attempt=True)
        return Outcome(ev, Status.OK)

    def _send_group(self, key: tuple[str, str], group: list[MeterEvent]) -> list[Outcome[MeterEvent]]:
        with self._keys.hold(key):
            return [self._send_one(ev) for ev in group]

    def flush(self) -> list[Outcome[MeterEvent]]:
        """Send everything buffered; one outcome per event, in no particular order.

        Order of side effects: the buffer is emptied first (always); then each (customer, meter) group
        is sent by one worker, one call at a time. A crash part-way leaves the unsent events' rows
        ``pending`` in the caller's ledger (they are sent next cycle); events Stripe already recorded
        come back as identifier duplicates then, which count as delivered.
        """
        todo, self._buffer = self._buffer, []
        if not todo:
            return []
        groups: dict[tuple[str, str], list[MeterEvent]] = defaultdict(list)
        for ev in todo:
            groups[(ev.customer, ev.event_name)].append(ev)
        if len(groups) == 1 or self._concurrency == 1:
            return [o for key, g in groups.items() for o in self._send_group(key, g)]
        pool = self._threads.get()
        futures = [pool.submit(self._send_group, key, g) for key, g in groups.items()]
        return [o for f in futures for o in f.result()]

    def close(self) -> None:
        """Stop the worker threads (waiting for calls in flight). Idempotent."""
        self._threads.close()


@dataclass(frozen=True, slots=True)
class Cancellation:
    """What Stripe said to one cancellation: ``cancelled`` (now, or already before: ``already``), else why
    not: ``too_late`` (outside the 24 h window; a credit is the only way left) or another ``error``, with
    ``transient`` telling whether trying again may help."""

    identifier: str
    cancelled: bool
    already: bool = False
    too_late: bool = False
    transient: bool = False
    error: str | None = None


def cancel_meter_event(client: stripe.StripeClient, event_name: str, identifier: str) -> Cancellation:
    """Cancel one meter event through a v1 meter-event adjustment (``type=cancel``, ``cancel.identifier``).

    Idempotent in effect: an event Stripe reports as already cancelled counts as cancelled, so a repair
    that crashed after Stripe's answer and before recording it can simply ask again.
    """
    try:
        with observed():
            client.v1.billing.meter_event_adjustments.create(
                {"event_name": event_name, "type": "cancel", "cancel": {"identifier": identifier}}
            )
    except Exception as exc:  # every Stripe failure is classified, none escapes
        o = classify(exc, identifier, new_request_per_attempt=True)
        message = o.error or ""
        low = message.lower()
        if o.status is Status.PERMANENT and "already" in low and "cancel" in low:
            return Cancellation(identifier, cancelled=True, already=True)
        if o.status is Status.PERMANENT and ("24 hours" in low or "no longer" in low):
            return Cancellation(identifier, cancelled=False, too_late=True, error=message)
        return Cancellation(identifier, cancelled=False, transient=o.status is Status.TRANSIENT, error=message)
    return Cancellation(identifier, cancelled=True)
