"""Taking back what Stripe holds beyond what edgebill sent (:attr:`models.reconcile.WindowResult.excess`).

Pure; the ledger and Stripe sides are :mod:`sinks.reconcile.repair` and :mod:`sinks.reconcile.run`. Per
(org, meter, hour) and excess: :attr:`OverAction.CANCEL_REPLACE` (a held identifier inside Stripe's 24 h
cancel window: cancel, bill again under a new identifier) or :attr:`OverAction.CREDIT` (a negative meter
event in the hour); each step once, by :func:`over_key`. Why these two: docs/architecture.md, "Module notes".
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Final

from models.reconcile import HOUR, Grouping, RowKind, WindowResult, dec, window_of
from models.stripe_window import cancellable, expired_at_send

__all__ = [
    "CREDIT_PREFIX",
    "OverAction",
    "OverStep",
    "credit_of",
    "over_key",
    "plan_over_repair",
]

#: ``repair_of`` of a credit row: this prefix, then the repair's key (never a row id: no row id has it).
CREDIT_PREFIX: Final = "stripe_excess:"


class OverAction(StrEnum):
    CREDIT = "credit"  # a meter event of the negative excess, in the hour
    CANCEL_REPLACE = "cancel_replace"  # cancel an own identifier Stripe holds; its value again under a new one


@dataclass(frozen=True, slots=True)
class OverStep:
    """One repair of one (org, customer, meter, hour) that Stripe holds ``excess`` more of than edgebill sent."""

    key: str
    action: OverAction
    org_id: str
    customer: str
    meter: str
    hour: int
    excess: Decimal
    bucket_start: int  # the bucket the written row belongs to
    bucket_end: int  # ... and its timestamp at Stripe, inside the hour
    row_id: str | None = None  # CANCEL_REPLACE: the identifier cancelled at Stripe
    value: Decimal = Decimal(0)  # the written row's value: -excess (credit), the row's own value (replace)

    def to_wire(self) -> dict[str, object]:
        return {
            "key": self.key,
            "action": self.action.value,
            "org_id": self.org_id,
            "customer": self.customer,
            "meter": self.meter,
            "hour": self.hour,
            "excess": dec(self.excess),
            "bucket_start": self.bucket_start,
            "timestamp": self.bucket_end,
            "row": self.row_id,
            "value": dec(self.value),
        }


def over_key(org_id: str, meter: str, hour: int, excess: Decimal, action: OverAction) -> str:
    """The idempotency key of one repair: one per (org, meter, hour, excess, action), at most 100 characters.

    The action is part of it so that a cancellation that turns out not to explain the excess (Stripe held the
    identifier with the ledger's value after all) leaves the credit still possible, once.
    """
    digest = hashlib.sha256(f"{org_id}\x00{meter}\x00{hour}\x00{dec(excess)}\x00{action.value}".encode()).hexdigest()
    return f"over:{action.value}:{hour}:{digest[:40]}"


def credit_of(repair_of: str | None) -> str | None:
    """The repair key a credit row carries (None: not a credit row)."""
    if repair_of and repair_of.startswith(CREDIT_PREFIX):
        return repair_of[len(CREDIT_PREFIX) :]
    return None


def _last_bucket_end(hour: int, bucket_seconds: int) -> int | None:
    """The end of the newest bucket ending inside ``[hour, hour + 1 h)`` (None: no bucket ends in it)."""
    end = (hour + HOUR - 1) // bucket_seconds * bucket_seconds
    return end if end >= hour else None


def plan_over_repair(
    result: WindowResult, now_s: int, bucket_seconds: int
) -> tuple[list[OverStep], list[tuple[int, str]]]:
    """The repairs of the hours of one compared window that Stripe holds more of, and what is refused, per
    hour with the reason (docs/architecture.md, "Module notes").

    A window without hourly values (the hours could not be read) has no excess per hour and plans nothing:
    the next run reads them again.
    """
    steps: list[OverStep] = []
    refused: list[tuple[int, str]] = []
    k = result.key
    for hour, excess in result.excess:
        rows = [r for r in result.rows if window_of(r.bucket_end, Grouping.HOUR) == hour]
        held = [
            r
            for r in rows
            if r.kind is RowKind.SENT and r.held and r.sent_ms is not None and cancellable(r.sent_ms, now_s * 1000)
        ]
        if len(held) == 1:
            r = held[0]
            steps.append(
                OverStep(
                    over_key(k.org_id, k.meter, hour, excess, OverAction.CANCEL_REPLACE),
                    OverAction.CANCEL_REPLACE,
                    k.org_id,
                    k.customer,
                    k.meter,
                    hour,
                    excess,
                    r.bucket_end - bucket_seconds,
                    r.bucket_end,
                    r.id,
                    r.value,
                )
            )
            continue
        end = max((r.bucket_end for r in rows), default=None) or _last_bucket_end(hour, bucket_seconds)
        if end is None:
            refused.append((hour, f"{dec(excess)} more at Stripe, but no bucket of edgebill's ends in this hour"))
            continue
        if expired_at_send(end, now_s):
            refused.append(
                (
                    hour,
                    f"{dec(excess)} more at Stripe in an hour past Stripe's 35-day window: a meter event can no "
                    "longer take it back; issue a credit note for it",
                )
            )
            continue
        steps.append(
            OverStep(
                over_key(k.org_id, k.meter, hour, excess, OverAction.CREDIT),
                OverAction.CREDIT,
                k.org_id,
                k.customer,
                k.meter,
                hour,
                excess,
                end - bucket_seconds,
                end,
                None,
                -excess,
            )
        )
    return steps, refused
