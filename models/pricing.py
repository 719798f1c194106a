"""Pricing of usage under a policy, and the state of the meter row it goes into.

:func:`price_usage` prices an aggregate of one org, bucket and memory size by the policy in effect at the
usage's time; it is additive. Unbilled usage keeps a reason, never dropped. :func:`row_placement` decides a
row's state and carry stream from its bucket's decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, NamedTuple

from models.billing import BillingMode, RowState, meter_amounts
from models.cutover import Decision
from models.policy import OrgPolicy
from models.stripe_window import expired_at_close

__all__ = [
    "BILLED_STREAM",
    "FREE_PLAN",
    "LEGACY_UNKNOWN_TIER",
    "SHADOW_STREAM",
    "UNKNOWN_ORG",
    "ZOMBIE",
    "Priced",
    "RowPlacement",
    "Unbilled",
    "price_usage",
    "provider_reason",
    "row_placement",
]

# Why usage is not billed (``unbilled_usage.reason``, counters ``unbilled.<reason>``).
UNKNOWN_ORG: Final = "unknown_org"  # no policy of the org in effect at the usage's time
FREE_PLAN: Final = "free_plan"  # the policy in effect is not a pro plan
LEGACY_UNKNOWN_TIER: Final = "legacy_unknown_tier"  # legacy billing, memory size outside the six tier meters
ZOMBIE: Final = "zombie"  # the worker did not own the sandbox at the tick's time (models.zombie)


def provider_reason(provider: str) -> str:
    """The reason for usage of an org billed through another provider than Stripe."""
    return f"provider_{provider}"


@dataclass(frozen=True, slots=True)
class Priced:
    """Billable: ``units`` exact integer units of ``meter`` (see ``meter_unit_divisor``), under ``mode``."""

    meter: str
    units: int
    mode: BillingMode


@dataclass(frozen=True, slots=True)
class Unbilled:
    """Not billed, and why."""

    reason: str


_UNKNOWN_ORG: Final = Unbilled(UNKNOWN_ORG)
_FREE_PLAN: Final = Unbilled(FREE_PLAN)
_LEGACY_UNKNOWN_TIER: Final = Unbilled(LEGACY_UNKNOWN_TIER)


def price_usage(policy: OrgPolicy | None, memory_mb: int, seconds: int, mb_seconds: int) -> Priced | Unbilled:
    """Price an aggregate of ticks of one org at one memory size under ``policy`` (the policy in effect at
    the ticks' time, None when the org had none): its meter and units, or why it is not billed.

    ``seconds``: the ticks' summed intervals; ``mb_seconds``: their summed memory × interval.
    """
    if policy is None:
        return _UNKNOWN_ORG
    if not policy.billable:
        return _FREE_PLAN if policy.billed_through_stripe else Unbilled(provider_reason(policy.billing_provider))
    amount = meter_amounts(policy.billing_mode, memory_mb, seconds, mb_seconds)
    if amount is None:
        return _LEGACY_UNKNOWN_TIER
    return Priced(amount.meter, amount.units, policy.billing_mode)


# Rounding-carry streams (``meter_totals.stream``): shadow rows carry apart from billed ones, so that a
# shadow period never shifts the values later billed.
BILLED_STREAM: Final = "billed"
SHADOW_STREAM: Final = "shadow"


class RowPlacement(NamedTuple):
    """The state a new meter row is written in, and the carry stream its value is assigned in (None: the
    value is its own units rounded once; such a row is never sent)."""

    state: RowState
    stream: str | None


_SKIPPED: Final = RowPlacement(RowState.SKIPPED_BEFORE_BILL_FROM, None)
_ROLLED_BACK: Final = RowPlacement(RowState.SKIPPED_ROLLED_BACK, None)
_EXPIRED: Final = RowPlacement(RowState.EXPIRED, None)
_SHADOW: Final = RowPlacement(RowState.SHADOW, SHADOW_STREAM)
_PENDING: Final = RowPlacement(RowState.PENDING, BILLED_STREAM)


def row_placement(decision: Decision, bucket_end: int, now_ms: int) -> RowPlacement:
    """Where a row of a bucket goes when it is written at ``now_ms``, from the bucket's billing decision
    (made once, at the bucket's first close: :func:`models.cutover.decide`), in this order of precedence:
    a bucket the cell bills is ``skipped_before_bill_from`` or ``skipped_rolled_back``; a bucket whose end
    Stripe would no longer take is ``expired``; a bucket decided in shadow is ``shadow`` (computed, not
    sent); otherwise ``pending`` (the sender ships it).

    Every row of a bucket, its first and each later correction, is placed from the same decision, so a
    bucket is billed by the edge in full or not at all.
    """
    if decision is Decision.SKIPPED_BEFORE_BILL_FROM:
        return _SKIPPED
    if decision is Decision.SKIPPED_ROLLED_BACK:
        return _ROLLED_BACK
    if expired_at_close(bucket_end, now_ms):
        return _EXPIRED
    return _SHADOW if decision is Decision.SHADOW else _PENDING
