"""Retention: how long the ledger keeps per-tick data, and the ticks it can then no longer deduplicate.

The ledger keeps one sample per tick: the tick id deduplicates redelivered ticks, and the sample is what
the closer aggregates, what a replay compares tick by tick and what an arbitrary parity window sums. Once
a bucket is settled, none of that can change a bill any more after Stripe's window has passed: Stripe
takes no meter event older than 35 days (:mod:`models.stripe_window`). So the per-tick data of a bucket
is dropped once the bucket is *retired*:

* it is closed and every sample of it is aggregated into its meter rows (none above its cursor);
* every meter row of it is final (none ``pending`` or ``deferred_no_customer``: see :data:`UNSETTLED_STATES`);
* it ended at least the retention period ago (:func:`retire_before_s`).

What stays: meter rows, unbilled usage, the parity table and its kept edge sums, the audit logs, counters.

**The dedup horizon.** Dropping a bucket's samples drops its tick ids, so a copy of one of those ticks could
no longer be recognised. The ledger therefore keeps a *dedup horizon*: the end of the newest bucket whose
per-tick data was dropped (it never moves back). Ingest refuses every tick before it (dead letter
:data:`OLDER_THAN_RETENTION`) rather than count it a second time; such a tick could not be billed anyway, its
bucket having ended more than Stripe's 35 days ago. Ticks at or after the horizon are deduplicated exactly
as before, and a replay compares ticks only from the horizon on.

Pure: times are integers, ``now`` is passed in.
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

#: Beyond Stripe's window, the default keeps one more day: a replay of everything Stripe can still bill,
#: started a little late, still compares every tick; clocks that disagree by minutes, a close that ran late
#: and the sender's and closer's margins (:mod:`models.stripe_window`) all fit inside it.
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
