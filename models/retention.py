"""Retention: how long the ledger keeps per-tick data, and the ticks it can then no longer deduplicate.

A bucket is *retired* (its samples dropped) once closed with every sample aggregated, every meter row final
(:data:`UNSETTLED_STATES`) and ended at least the retention period ago (:func:`retire_before_s`). The dedup
horizon (the end of the newest retired bucket, never moving back) refuses every tick before it
(:data:`OLDER_THAN_RETENTION`). Pure: ``now`` is passed in. Why: docs/architecture.md, "Module notes".
"""

from __future__ import annotations

from typing import Final

from models.billing import RowState
from models.stripe_window import STRIPE_MAX_AGE_SECONDS

__all__ = [
    "DAY_SECONDS",
    "DEFAULT_RETENTION_DAYS",
    "MIN_RETENTION_DAYS",
    "NO_HORIZON_MS",
    "OLDER_THAN_RETENTION",
    "RETENTION_MARGIN_DAYS",
    "UNSETTLED_STATES",
    "before_horizon",
    "horizon_ms",
    "retention_problem",
    "retire_before_s",
]

DAY_SECONDS: Final = 86_400

#: The shortest retention: Stripe's window. A bucket that ended more recently could still get a billable
#: correction row from a late tick, so its ticks must still be deduplicated.
MIN_RETENTION_DAYS: Final = -(-STRIPE_MAX_AGE_SECONDS // DAY_SECONDS)

#: Beyond Stripe's window, the default keeps one more day (why: docs/architecture.md, "Module notes").
RETENTION_MARGIN_DAYS: Final = 1
DEFAULT_RETENTION_DAYS: Final = MIN_RETENTION_DAYS + RETENTION_MARGIN_DAYS

#: Dead-letter reason (and counter ``ticks.older_than_retention``) of a tick before the dedup horizon.
OLDER_THAN_RETENTION: Final = "older_than_retention"

#: Meter-row states that keep a bucket's per-tick data: the row may still be sent, and an operator looking
#: into it may want the ticks behind it. Every other state is final for retention.
UNSETTLED_STATES: Final = frozenset({RowState.PENDING.value, RowState.DEFERRED_NO_CUSTOMER.value})


def retention_problem(days: int) -> str | None:
    """Why ``days`` is not a valid retention (None: valid). 0 turns retention off; anything else must cover
    Stripe's window."""
    if days == 0 or days >= MIN_RETENTION_DAYS:
        return None
    return (
        f"must be 0 (keep every tick) or at least {MIN_RETENTION_DAYS} days (Stripe's window): a shorter "
        "retention would drop ticks whose corrections Stripe could still bill"
    )


def retire_before_s(now_ms: int, days: int) -> int:
    """Buckets that ended at or before this time (unix s) are old enough to retire at ``now_ms``."""
    return now_ms // 1000 - days * DAY_SECONDS


#: What :func:`horizon_ms` gives for "no horizon": below every timestamp a tick can carry.
NO_HORIZON_MS: Final = -(2**63)


def horizon_ms(horizon_s: int) -> int:
    """The dedup horizon in milliseconds, for comparing with tick timestamps: a tick is refused when its
    timestamp is below it. A horizon of 0 means nothing was dropped yet: no tick is refused."""
    return horizon_s * 1000 if horizon_s else NO_HORIZON_MS


def before_horizon(ts_ms: int, horizon_s: int) -> bool:
    """Is a tick at ``ts_ms`` before the dedup horizon (refused as :data:`OLDER_THAN_RETENTION`)?"""
    return ts_ms < horizon_ms(horizon_s)
