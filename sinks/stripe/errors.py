"""Stripe's errors, classified: :func:`classify` maps every exception a Stripe call raises onto a
:class:`~sinks.base.Status` (transient / permanent / duplicate), so nothing Stripe-specific leaks past the
modules that call Stripe; :func:`observed` times a call and counts its failure by kind."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from email.utils import parsedate_to_datetime
from typing import TypeVar

import stripe

from sinks.base import Outcome, Status

__all__ = ["classify", "error_kind", "observed"]


T = TypeVar("T")


def _header(err: stripe.StripeError, name: str) -> str | None:
    headers = err.headers or {}
    for k, v in headers.items():
        if k.lower() == name.lower():
            return str(v)
    return None


def _retry_after(raw: str | None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _is_duplicate_identifier(err: stripe.StripeError) -> bool:
    code = (err.code or "").lower()
    msg = (getattr(err, "user_message", None) or str(err) or "").lower()
    if code in ("resource_already_exists", "duplicate_meter_event", "meter_event_duplicate_identifier"):
        return True
    return "identifier" in msg and ("already" in msg or "duplicate" in msg)


def error_kind(err: BaseException) -> str:
    """A short label for metrics: rate_limited, connection, server, duplicate, auth, permanent, other."""
    if isinstance(err, stripe.RateLimitError):
        return "rate_limited"
    if isinstance(err, stripe.APIConnectionError):
        return "connection"
    if isinstance(err, stripe.AuthenticationError | stripe.PermissionError):
        return "auth"
    if isinstance(err, stripe.InvalidRequestError):
        return "duplicate" if _is_duplicate_identifier(err) else "permanent"
    if isinstance(err, stripe.StripeError) and (err.http_status or 500) >= 500:
        return "server"
    return "other"


@contextmanager
def observed() -> Iterator[None]:
    """Time one Stripe call into ``edgebill_stripe_request_seconds``; count a failure by kind."""
    from sinks.observe import stripe_errors_total, stripe_request_seconds

    start = time.perf_counter()
    try:
        yield
    except BaseException as exc:
        stripe_errors_total.labels(kind=error_kind(exc)).inc()
        raise
    finally:
        stripe_request_seconds.observe(time.perf_counter() - start)


def classify(err: Exception, item: T, *, new_request_per_attempt: bool = False) -> Outcome[T]:
    """The outcome of ``item`` whose Stripe call raised ``err``: status, message, code and retry_after.

    ``new_request_per_attempt``: the caller's next attempt is a new request (new Idempotency-Key, same
    identifier), so a 5xx is transient even with ``Stripe-Should-Retry: false`` (which speaks about
    replaying the same key). Without it the header is taken literally.
    """
    if not isinstance(err, stripe.StripeError):
        return Outcome(item, Status.TRANSIENT, f"{type(err).__name__}: {err}")
    message = getattr(err, "user_message", None) or str(err)
    retry_after = _retry_after(_header(err, "Retry-After"))
    should_retry = _header(err, "Stripe-Should-Retry")
    http_status = err.http_status or 0

    def transient(why: str = message) -> Outcome[T]:
        return Outcome(item, Status.TRANSIENT, why, err.code, retry_after)

    def final(status: Status) -> Outcome[T]:
        return Outcome(item, status, message, err.code)

    if isinstance(err, stripe.InvalidRequestError) and _is_duplicate_identifier(err):
        return final(Status.DUPLICATE)
    if should_retry == "true" or isinstance(err, stripe.RateLimitError | stripe.APIConnectionError):
        return transient()
    if isinstance(err, stripe.AuthenticationError | stripe.PermissionError):
        # A key problem is the operator's to fix; the rows must wait for it, not be rejected.
        return transient(f"Stripe refused the API key: {message}")
    if new_request_per_attempt and http_status >= 500:
        return transient()
    if should_retry == "false" or isinstance(err, stripe.IdempotencyError):
        return final(Status.PERMANENT)
    if isinstance(err, stripe.InvalidRequestError):
        status = http_status or 400
        return transient() if status in (409, 429) or status >= 500 else final(Status.PERMANENT)
    # APIError (5xx), unknown: keep the row and try again.
    return transient()
