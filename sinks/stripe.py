"""The Stripe meter sink: sends meter events through the official ``stripe`` SDK.

Stripe's exceptions end here: :func:`classify` maps every one onto a :class:`~sinks.base.Status`
(transient / permanent / duplicate), and nothing Stripe-specific leaks past this module.

Delivery guarantee: at-least-once per flush, made effectively-once by Stripe's ``identifier``
dedup (our row id; Stripe answers a repeat with 400 "An event already exists with identifier …",
which :func:`classify` turns into ``duplicate`` = delivered). A row's value never changes after it
is created, so a re-send is always the same event.

Why no deterministic ``Idempotency-Key``: Stripe stores the *first* answer under a key, 500s
included, and replays it for 24 h — a key equal to the identifier would turn one transient 500 into
a day of identical 500s. The SDK's random per-call key plus the identifier dedup is strictly better.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import stripe

from models.billing import (
    MAX_IDENTIFIER_LENGTH,
    MAX_SIGNIFICANT_DIGITS,
    STRIPE_MAX_AGE_SECONDS,
    STRIPE_MAX_FUTURE_SECONDS,
    significant_digits,
)
from sinks.base import Outcome, Status

__all__ = ["MeterEvent", "StripeMeterSink", "classify", "make_client", "validate_event"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class MeterEvent:
    identifier: str
    event_name: str
    customer: str
    value: str
    timestamp: int  # unix s


def make_client(api_key: str, base: str, *, timeout: float = 20.0) -> stripe.StripeClient:
    """An SDK client pointed at ``base`` for both the API and the meter-events host.

    SDK-level retries are off: retrying is :class:`sinks.base.RetryingSink`'s job, with our backoff.
    """
    return stripe.StripeClient(
        api_key,
        base_addresses={"api": base, "meter_events": base},
        max_network_retries=0,
        http_client=stripe.RequestsClient(timeout=timeout),
    )


def validate_event(ev: MeterEvent, now_s: int) -> str | None:
    """Every rule Stripe checks on a v1 meter event that we can check first; the reason, or None."""
    if not ev.identifier or len(ev.identifier) > MAX_IDENTIFIER_LENGTH:
        return f"identifier must be 1..{MAX_IDENTIFIER_LENGTH} characters"
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
    if ev.timestamp < now_s - STRIPE_MAX_AGE_SECONDS:
        return "timestamp is more than 35 days in the past"
    if ev.timestamp > now_s + STRIPE_MAX_FUTURE_SECONDS:
        return "timestamp is more than 5 minutes in the future"
    return None


def _header(err: stripe.StripeError, name: str) -> str | None:
    headers = err.headers or {}
    for k, v in headers.items():
        if k.lower() == name.lower():
            return str(v)
    return None


def _is_duplicate_identifier(err: stripe.StripeError) -> bool:
    code = (err.code or "").lower()
    msg = (getattr(err, "user_message", None) or str(err) or "").lower()
    if code in ("resource_already_exists", "duplicate_meter_event", "meter_event_duplicate_identifier"):
        return True
    return "identifier" in msg and ("already" in msg or "duplicate" in msg)


def classify(err: Exception) -> tuple[Status, str, str | None, float | None]:
    """(status, message, code, retry_after) for an exception raised by a Stripe call."""
    if not isinstance(err, stripe.StripeError):
        return Status.TRANSIENT, f"{type(err).__name__}: {err}", None, None
    message = getattr(err, "user_message", None) or str(err)
    code = err.code
    retry_after: float | None = None
    ra = _header(err, "Retry-After")
    if ra:
        try:
            retry_after = float(ra)
        except ValueError:
            retry_after = None
    should_retry = _header(err, "Stripe-Should-Retry")
    if isinstance(err, stripe.InvalidRequestError) and _is_duplicate_identifier(err):
        return Status.DUPLICATE, message, code, None
    if should_retry == "true":
        return Status.TRANSIENT, message, code, retry_after
    if isinstance(err, stripe.RateLimitError | stripe.APIConnectionError):
        return Status.TRANSIENT, message, code, retry_after
    if isinstance(err, stripe.AuthenticationError | stripe.PermissionError):
        # A key problem is the operator's to fix; the rows must wait for it, not be rejected.
        return Status.TRANSIENT, f"Stripe refused the API key: {message}", code, retry_after
    if should_retry == "false":
        return Status.PERMANENT, message, code, None
    if isinstance(err, stripe.IdempotencyError):
        return Status.PERMANENT, message, code, None
    if isinstance(err, stripe.InvalidRequestError):
        status = err.http_status or 400
        if status in (409, 429) or status >= 500:
            return Status.TRANSIENT, message, code, retry_after
        return Status.PERMANENT, message, code, None
    # APIError (5xx), unknown: keep the row and try again.
    return Status.TRANSIENT, message, code, retry_after


class StripeMeterSink:
    """v1 ``POST /v1/billing/meter_events`` sink with bounded concurrency.

    Events are grouped by (customer, event_name) and each group is sent by one thread, in order, so
    two calls for the same customer and meter never run at once (Stripe's live-mode limit).
    """

    def __init__(
        self,
        client: stripe.StripeClient,
        *,
        concurrency: int = 8,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._concurrency = concurrency
        self._now = now
        self._buffer: list[MeterEvent] = []

    def add(self, item: MeterEvent) -> None:
        self._buffer.append(item)

    def _send_one(self, ev: MeterEvent) -> Outcome[MeterEvent]:
        problem = validate_event(ev, int(self._now()))
        if problem:
            return Outcome(ev, Status.PERMANENT, f"not sent: {problem}", "edgebill_presend_validation")
        try:
            self._client.v1.billing.meter_events.create(
                {
                    "event_name": ev.event_name,
                    "identifier": ev.identifier,
                    "timestamp": ev.timestamp,
                    "payload": {"stripe_customer_id": ev.customer, "value": ev.value},
                }
            )
        except Exception as exc:  # every Stripe failure is classified, none escapes
            status, message, code, retry_after = classify(exc)
            return Outcome(ev, status, message, code, retry_after)
        return Outcome(ev, Status.OK)

    def _send_group(self, group: list[MeterEvent]) -> list[Outcome[MeterEvent]]:
        return [self._send_one(ev) for ev in group]

    def flush(self) -> list[Outcome[MeterEvent]]:
        """Send everything buffered; one outcome per event. The buffer is emptied first, always."""
        todo, self._buffer = self._buffer, []
        if not todo:
            return []
        groups: dict[tuple[str, str], list[MeterEvent]] = defaultdict(list)
        for ev in todo:
            groups[(ev.customer, ev.event_name)].append(ev)
        if len(groups) == 1 or self._concurrency == 1:
            return [o for g in groups.values() for o in self._send_group(g)]
        with ThreadPoolExecutor(max_workers=min(self._concurrency, len(groups))) as pool:
            return [o for outs in pool.map(self._send_group, groups.values()) for o in outs]
