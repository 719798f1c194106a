"""Stripe's time window for meter events, and the safety margin each stage keeps inside it.

Stripe takes a meter event stamped at most 35 days in the past and 5 minutes in the future; a row is stamped
with its bucket end. Every stage asks here, each with its own named margin. Pure: ``now`` is passed in.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "CANCEL_MARGIN_SECONDS",
    "CANCEL_WINDOW_SECONDS",
    "CLOSE_MARGIN_SECONDS",
    "PARITY_MARGIN_SECONDS",
    "PARITY_QUERY_MAX_SECONDS",
    "SEND_MARGIN_SECONDS",
    "STRIPE_MAX_AGE_SECONDS",
    "STRIPE_MAX_FUTURE_SECONDS",
    "VALIDATE_MARGIN_SECONDS",
    "cancellable",
    "expired_at_close",
    "expired_at_send",
    "oldest_accepted_ms",
    "oldest_accepted_s",
    "stripe_refuses_as_future",
    "stripe_refuses_as_old",
]

# Stripe's limits for a meter event's timestamp, relative to Stripe's clock.
STRIPE_MAX_AGE_SECONDS: Final = 35 * 86_400
STRIPE_MAX_FUTURE_SECONDS: Final = 5 * 60

# The margins each stage keeps inside Stripe's window (why each: docs/architecture.md, "Module notes").
# The closer writes a row ``expired`` instead of ``pending`` with less than this left at close time.
CLOSE_MARGIN_SECONDS: Final = 300
# The sender expires a row instead of sending it when less than this is left.
SEND_MARGIN_SECONDS: Final = 60
# The Stripe sink's last check before a request: Stripe's own rule, without margin.
VALIDATE_MARGIN_SECONDS: Final = 0
# Parity recomputes a bucket only while Stripe could still take a correction for it (the exact window).
PARITY_MARGIN_SECONDS: Final = 0
# The parity endpoint answers windows at most this long: all that Stripe can still bill.
PARITY_QUERY_MAX_SECONDS: Final = STRIPE_MAX_AGE_SECONDS

# Stripe cancels a meter event only within 24 h of receiving it; a command cancels one only with the margin left.
CANCEL_WINDOW_SECONDS: Final = 24 * 3600
CANCEL_MARGIN_SECONDS: Final = 15 * 60


def cancellable(sent_ms: int, now_ms: int) -> bool:
    """Can an event the ledger sent at ``sent_ms`` still be cancelled at Stripe at ``now_ms`` (with the margin)?"""
    return now_ms - sent_ms < (CANCEL_WINDOW_SECONDS - CANCEL_MARGIN_SECONDS) * 1000


def oldest_accepted_s(now_s: int, margin_s: int) -> int:
    """The oldest timestamp (unix s) Stripe takes at ``now_s`` with ``margin_s`` seconds to spare."""
    return now_s - STRIPE_MAX_AGE_SECONDS + margin_s


def oldest_accepted_ms(now_ms: int, margin_s: int) -> int:
    """:func:`oldest_accepted_s` in milliseconds, for a clock in milliseconds."""
    return now_ms - (STRIPE_MAX_AGE_SECONDS - margin_s) * 1000


def stripe_refuses_as_old(timestamp_s: int, now_s: int, margin_s: int) -> bool:
    """Is ``timestamp_s`` older than Stripe takes at ``now_s``, with ``margin_s`` seconds to spare?"""
    return timestamp_s < oldest_accepted_s(now_s, margin_s)


def stripe_refuses_as_future(timestamp_s: int, now_s: int) -> bool:
    """Is ``timestamp_s`` further in the future than Stripe takes at ``now_s``?"""
    return timestamp_s > now_s + STRIPE_MAX_FUTURE_SECONDS


def expired_at_close(bucket_end_s: int, now_ms: int) -> bool:
    """Is a row with this bucket end, written by the closer at ``now_ms``, past the window (with the
    closer's margin)? Such a row is written ``expired``: it can no longer reach Stripe."""
    return stripe_refuses_as_old(bucket_end_s, now_ms // 1000, CLOSE_MARGIN_SECONDS)


def expired_at_send(bucket_end_s: int, now_s: int) -> bool:
    """Is a row with this bucket end, about to be sent at ``now_s``, past the window (with the sender's
    margin)? Such a row is marked ``expired`` instead of sent."""
    return stripe_refuses_as_old(bucket_end_s, now_s, SEND_MARGIN_SECONDS)
