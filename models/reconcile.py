"""Reconciliation with Stripe: what the ledger sent against what Stripe holds, per (org, meter) and window.

Pure rules; the ledger side and the Stripe side are read by ``sinks`` and handed in. A row belongs to the
window (UTC day or hour) holding its bucket end. Labels, in precedence: ``meter_misconfigured``,
``unknown_customer``, ``ok`` / ``short`` / ``over``; causes per difference (:func:`compare_window`); repairs
of short windows (:func:`plan_repair`). Exact decimals, never floats. The rules at length:
docs/architecture.md, "Module notes".
"""

from __future__ import annotations

import hashlib
import itertools
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Any, Final

from models.catalog import METER_AGGREGATION, METER_CUSTOMER_KEY, METER_VALUE_KEY
from models.stripe_window import expired_at_send

__all__ = [
    "DAY",
    "HOUR",
    "MAX_SUBSET_ROWS",
    "Cause",
    "CauseNote",
    "Grouping",
    "Label",
    "MeterConfig",
    "RepairAction",
    "RepairStep",
    "RowFact",
    "RowKind",
    "WindowKey",
    "WindowResult",
    "alert_id",
    "aligned_range",
    "choose_meter",
    "compare_window",
    "dec",
    "grouping_for",
    "meter_problems",
    "plan_repair",
    "window_buckets",
    "window_of",
    "window_ready",
    "window_starts",
]

DAY: Final = 86_400
HOUR: Final = 3_600
#: An hour with more candidate rows than this is not searched for the missing ones (2^n subsets).
MAX_SUBSET_ROWS: Final = 12
_ZERO: Final = Decimal(0)


def dec(value: Decimal) -> str:
    """An exact decimal as plain text without trailing zeros: ``12.5``, ``0``, ``-3``."""
    if not value:
        return "0"
    text = format(value.normalize(), "f")
    return text


# ----------------------------------------------------------------------------------------------- windows


class Grouping(StrEnum):
    """Stripe's ``value_grouping_window``."""

    DAY = "day"
    HOUR = "hour"

    @property
    def seconds(self) -> int:
        return DAY if self is Grouping.DAY else HOUR


def grouping_for(lo_s: int, hi_s: int) -> Grouping:
    """Days when both ends are UTC midnights (and the range is at least a day), else hours."""
    if lo_s % DAY == 0 and hi_s % DAY == 0 and hi_s - lo_s >= DAY:
        return Grouping.DAY
    return Grouping.HOUR


def window_of(ts_s: int, grouping: Grouping) -> int:
    """Start of the window holding timestamp ``ts_s``."""
    return ts_s // grouping.seconds * grouping.seconds


def aligned_range(lo_s: int, hi_s: int, grouping: Grouping) -> tuple[int, int]:
    """``[lo, hi)`` rounded outwards to whole windows (Stripe refuses unaligned summary bounds)."""
    g = grouping.seconds
    return lo_s // g * g, -(-hi_s // g) * g


def window_starts(lo_s: int, hi_s: int, grouping: Grouping) -> list[int]:
    lo, hi = aligned_range(lo_s, hi_s, grouping)
    return list(range(lo, hi, grouping.seconds))


def window_buckets(start_s: int, grouping: Grouping, bucket_seconds: int) -> tuple[int, int]:
    """The bucket starts ``[first, last]`` whose rows fall in the window: their bucket *end* is in it."""
    return start_s - bucket_seconds, start_s + grouping.seconds - 2 * bucket_seconds


def window_ready(
    start_s: int,
    grouping: Grouping,
    *,
    now_s: int,
    grace_s: int,
    settle_s: int,
    open_samples: bool,
    pending_rows: bool,
    newest_sent_s: int | None,
    bucket_seconds: int = 0,
) -> str | None:
    """Why the window cannot be compared yet (None: it can).

    A window is compared once it is closed and sent: its last bucket is past the closing grace and holds no
    sample still to aggregate, none of its rows waits to be sent, and its newest send is at least
    ``settle_s`` old (Stripe aggregates meter events asynchronously: its summaries lag the sends).

    A row's timestamp is its bucket end, so the last bucket of a window is the last one *ending* inside it
    (for hourly buckets and an hour window ``[14:00, 15:00)``: the bucket ``[13:00, 14:00)``): the window is
    closed ``grace_s`` after that bucket's end. ``bucket_seconds`` 0: at the window's end.
    """
    end = start_s + grouping.seconds
    last_end = (end - 1) // bucket_seconds * bucket_seconds if bucket_seconds else end
    if max(last_end, start_s) + grace_s > now_s:
        return "not closed yet"
    if open_samples:
        return "samples not aggregated yet"
    if pending_rows:
        return "rows waiting to be sent"
    if newest_sent_s is not None and newest_sent_s + settle_s > now_s:
        return f"sent less than {settle_s} s ago"
    return None


# ------------------------------------------------------------------------------------------------ meters


@dataclass(frozen=True, slots=True)
class MeterConfig:
    """A billing meter as Stripe describes it (only what the comparison needs)."""

    id: str
    event_name: str
    status: str
    customer_key: str
    customer_type: str
    value_key: str
    formula: str
    event_time_window: str | None = None
    deactivated_at: int | None = None


def choose_meter(event_name: str, meters: Iterable[MeterConfig]) -> MeterConfig | None:
    """The meter Stripe routes ``event_name`` to: the active one; else the most recently deactivated."""
    named = [m for m in meters if m.event_name == event_name]
    active = [m for m in named if m.status == "active"]
    if active:
        return active[0]
    return max(named, key=lambda m: m.deactivated_at or 0, default=None)


def meter_problems(event_name: str, meter: MeterConfig | None) -> list[str]:
    """Why Stripe would not bill what edgebill sends to ``event_name`` (empty: the meter is right)."""
    if meter is None:
        return [f"no meter at Stripe has the event name {event_name}"]
    problems = []
    if meter.status != "active":
        since = f" (deactivated at {meter.deactivated_at})" if meter.deactivated_at else ""
        problems.append(f"meter {meter.id} is {meter.status}{since}: Stripe refuses its new events")
    if meter.customer_key != METER_CUSTOMER_KEY or meter.customer_type != "by_id":
        problems.append(
            f"meter {meter.id} maps customers by {meter.customer_type} {meter.customer_key!r}; "
            f"edgebill sends the customer id as {METER_CUSTOMER_KEY!r}"
        )
    if meter.value_key != METER_VALUE_KEY:
        problems.append(
            f"meter {meter.id} reads the value from {meter.value_key!r}; edgebill sends {METER_VALUE_KEY!r}"
        )
    if meter.formula != METER_AGGREGATION:
        problems.append(
            f"meter {meter.id} aggregates by {meter.formula}; edgebill's rows (corrections are deltas) need "
            f"{METER_AGGREGATION}"
        )
    if meter.event_time_window:
        problems.append(
            f"meter {meter.id} takes pre-aggregated events per {meter.event_time_window}: a correction row would "
            "replace its bucket's row instead of adding to it"
        )
    return problems


# -------------------------------------------------------------------------------------------------- rows


class RowKind(StrEnum):
    """A meter row as the comparison sees it."""

    SENT = "sent"  # Stripe accepted it: it should hold it
    REJECTED_AFTER_SEND = "rejected_after_send"  # accepted, then refused (a v2 error report)
    PENDING = "pending"  # not sent yet (a new row, or one a repair queued again)
    REPLACED = "replaced"  # lost, and billed again by a repair's new row
    NOT_SENT = "not_sent"  # never meant to be at Stripe (expired, refused before the send, no customer, ...)
    CREDIT = "credit"  # takes back what Stripe held beyond what edgebill sent: with that excess, it adds to 0

    @property
    def expected(self) -> bool:
        """Counted in what Stripe should hold."""
        return self in (RowKind.SENT, RowKind.REJECTED_AFTER_SEND)


@dataclass(frozen=True, slots=True)
class RowFact:
    """One meter row of a window, with what is known about it at Stripe."""

    id: str
    value: Decimal
    kind: RowKind
    bucket_end: int
    sent_ms: int | None = None
    error_code: str | None = None  # Stripe's code, for a row refused after the send
    reported: str | None = None  # the code of an error report naming it that the ledger has not applied
    held: bool = False  # Stripe said its identifier already exists (a duplicate answer to a re-send)
    resent: bool = False  # a repair already queued it again under its own identifier
    repair_of: str | None = None  # the lost row this one bills again


class Label(StrEnum):
    OK = "ok"
    SHORT = "short"
    OVER = "over"
    UNKNOWN_CUSTOMER = "unknown_customer"
    METER_MISCONFIGURED = "meter_misconfigured"

    @property
    def difference(self) -> bool:
        return self is not Label.OK


class Cause(StrEnum):
    REJECTED_AFTER_SEND = "rejected_after_send"
    REPORT_NOT_APPLIED = "error_report_not_applied"
    MISSING = "missing_at_stripe"
    CANCELLED = "cancelled_at_stripe"
    OUTSIDE_WINDOW = "outside_stripe_window"
    UNEXPLAINED = "unexplained"
    STRIPE_HOLDS_MORE = "stripe_holds_more"
    METER = "meter_misconfigured"
    CUSTOMER = "unknown_customer"


_CAUSE_TEXT: Final = {
    Cause.REJECTED_AFTER_SEND: "accepted by the v2 stream, then refused by Stripe (its error report arrived)",
    Cause.REPORT_NOT_APPLIED: "refused by Stripe after the send: an error report names it, not yet applied",
    Cause.MISSING: "sent, but Stripe does not hold it and reported no error (dropped, or cancelled)",
    Cause.CANCELLED: "its identifier is held by Stripe without being counted (cancelled, or lost after a re-send)",
    Cause.OUTSIDE_WINDOW: "its timestamp is outside Stripe's 35-day window: Stripe refuses it",
    Cause.UNEXPLAINED: "the rows Stripe does not hold cannot be told apart",
    Cause.STRIPE_HOLDS_MORE: "Stripe holds more than edgebill sent (another sender, a re-send after Stripe's "
    "identifier window, or rows lost from the ledger): `edgebill reconcile --repair` takes it back",
    Cause.METER: "the meter is not the one edgebill sends to",
    Cause.CUSTOMER: "Stripe has no such customer (deleted, or of another account or mode)",
}


@dataclass(frozen=True, slots=True)
class CauseNote:
    """One likely cause of a window's difference: the rows it names and the value it explains."""

    cause: Cause
    value: Decimal = _ZERO
    rows: tuple[str, ...] = ()
    detail: str = ""

    def to_wire(self) -> dict[str, Any]:
        return {
            "cause": self.cause.value,
            "value": dec(self.value),
            "rows": list(self.rows),
            "explains": _CAUSE_TEXT[self.cause],
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True, order=True)
class WindowKey:
    """One comparison: an org's rows for one Stripe customer and meter in one window."""

    org_id: str
    customer: str
    meter: str
    start: int
    grouping: Grouping

    @property
    def end(self) -> int:
        return self.start + self.grouping.seconds


@dataclass(frozen=True, slots=True)
class WindowResult:
    key: WindowKey
    ledger: Decimal  # what Stripe should hold (docs/architecture.md, "Module notes")
    stripe: Decimal | None  # what Stripe holds; None when it could not say (no meter, no customer)
    label: Label
    causes: tuple[CauseNote, ...] = ()
    rows: tuple[RowFact, ...] = ()
    lost: Decimal = _ZERO  # of ``ledger``: rows refused after the send (not held by Stripe by its own account)
    hours: tuple[tuple[int, Decimal, Decimal], ...] = ()  # (hour, ledger, stripe) of the hours that differ
    excess: tuple[tuple[int, Decimal], ...] = ()  # (hour, value) Stripe holds beyond what edgebill sent, per hour

    @property
    def difference(self) -> Decimal | None:
        """Stripe minus the ledger (negative: short)."""
        return None if self.stripe is None else self.stripe - self.ledger

    def to_wire(self) -> dict[str, Any]:
        k = self.key
        diff = self.difference
        return {
            "org_id": k.org_id,
            "customer": k.customer,
            "meter": k.meter,
            "window": {"start": k.start, "end": k.end, "grouping": k.grouping.value},
            "label": self.label.value,
            "ledger": dec(self.ledger),
            "stripe": None if self.stripe is None else dec(self.stripe),
            "difference": None if diff is None else dec(diff),
            "lost": dec(self.lost),
            "causes": [c.to_wire() for c in self.causes],
            "hours": [{"start": h, "ledger": dec(a), "stripe": dec(b)} for h, a, b in self.hours],
            "excess": [{"hour": h, "value": dec(v)} for h, v in self.excess],
            "rows": len(self.rows),
        }


def _sum(rows: Iterable[RowFact]) -> Decimal:
    return sum((r.value for r in rows), _ZERO)


def _missing_subset(candidates: Sequence[RowFact], shortfall: Decimal) -> tuple[RowFact, ...] | None:
    """The only set of ``candidates`` whose values add up to ``shortfall`` (None: none, or several)."""
    if len(candidates) > MAX_SUBSET_ROWS:
        return None
    found: tuple[RowFact, ...] | None = None
    for n in range(1, len(candidates) + 1):
        for combo in itertools.combinations(candidates, n):
            if _sum(combo) == shortfall:
                if found is not None:
                    return None
                found = combo
    return found


def _lost_cause(r: RowFact) -> Cause:
    """Cause of a row Stripe refused after the send (by Stripe's code)."""
    code = (r.error_code or r.reported or "").lower()
    return Cause.OUTSIDE_WINDOW if code.startswith("timestamp") else Cause.REJECTED_AFTER_SEND


def compare_window(
    key: WindowKey,
    rows: Sequence[RowFact],
    stripe: Decimal | None,
    *,
    meter_issues: Sequence[str] = (),
    customer_known: bool = True,
    hours: Mapping[int, Decimal] | None = None,
) -> WindowResult:
    """Compare one window and name the likely causes of a difference.

    ``rows``: every row of the key's window; ``stripe``: Stripe's summary for it (None when Stripe cannot
    give one); ``hours``: Stripe's hourly values inside the window (every hour with events), to tell which
    rows are missing; without them a shortfall not explained by refused rows stays ``unexplained``.
    """
    expected = [r for r in rows if r.kind.expected]
    ledger = _sum(expected)
    lost_rows = [r for r in expected if r.kind is RowKind.REJECTED_AFTER_SEND]
    lost = _sum(lost_rows)
    causes: list[CauseNote] = []
    if meter_issues:
        causes.append(CauseNote(Cause.METER, detail="; ".join(meter_issues)))
    if not customer_known:
        causes.append(CauseNote(Cause.CUSTOMER, detail=f"customer {key.customer}"))
    if meter_issues:
        label = Label.METER_MISCONFIGURED
    elif not customer_known:
        label = Label.UNKNOWN_CUSTOMER
    elif stripe is None:
        label = Label.METER_MISCONFIGURED  # no summary without a meter
    elif stripe == ledger:
        label = Label.OK
    else:
        label = Label.SHORT if stripe < ledger else Label.OVER
    differing: list[tuple[int, Decimal, Decimal]] = []
    excess: list[tuple[int, Decimal]] = []
    if stripe is not None and stripe != ledger:
        causes.extend(_attribute(key, expected, stripe - ledger, hours, differing, excess))
    return WindowResult(key, ledger, stripe, label, tuple(causes), tuple(rows), lost, tuple(differing), tuple(excess))


def _attribute(
    key: WindowKey,
    expected: Sequence[RowFact],
    diff: Decimal,
    hours: Mapping[int, Decimal] | None,
    differing: list[tuple[int, Decimal, Decimal]],
    excess: list[tuple[int, Decimal]],
) -> list[CauseNote]:
    """Causes for ``diff`` = Stripe − ledger over the window's expected rows."""
    notes: list[CauseNote] = []
    by_cause: dict[Cause, list[RowFact]] = defaultdict(list)
    for r in expected:
        if r.kind is RowKind.REJECTED_AFTER_SEND:
            by_cause[_lost_cause(r)].append(r)
        elif r.reported:
            cause = _lost_cause(r)
            by_cause[Cause.REPORT_NOT_APPLIED if cause is Cause.REJECTED_AFTER_SEND else cause].append(r)
    explained_ids = {r.id for rs in by_cause.values() for r in rs}
    unexplained_rows: list[RowFact] = []
    over = _ZERO
    missing: list[RowFact] = []
    if hours is not None:
        by_hour: dict[int, list[RowFact]] = defaultdict(list)
        for r in expected:
            by_hour[window_of(r.bucket_end, Grouping.HOUR)].append(r)
        for h in sorted(set(by_hour) | set(hours)):
            rs = by_hour.get(h, [])
            ours = _sum(rs)
            theirs = hours.get(h, _ZERO)
            if ours == theirs:
                continue
            differing.append((h, ours, theirs))
            gap = ours - theirs - _sum(r for r in rs if r.id in explained_ids)
            if gap < 0:
                over -= gap
                excess.append((h, -gap))
                continue
            if gap == 0:
                continue
            candidates = [r for r in rs if r.id not in explained_ids]
            subset = _missing_subset(candidates, gap)
            if subset is None:
                unexplained_rows.extend(candidates)
                notes.append(
                    CauseNote(
                        Cause.UNEXPLAINED,
                        gap,
                        tuple(r.id for r in candidates),
                        f"hour {h}: no single set of its rows adds up to the {dec(gap)} Stripe lacks",
                    )
                )
            else:
                missing.extend(subset)
    else:
        rest = -diff - _sum(r for r in expected if r.id in explained_ids)
        if rest > 0:
            candidates = [r for r in expected if r.id not in explained_ids]
            notes.append(
                CauseNote(
                    Cause.UNEXPLAINED,
                    rest,
                    tuple(r.id for r in candidates),
                    "Stripe's hourly values were not read: the missing rows are not known",
                )
            )
        elif rest < 0:
            over = -rest
    for r in missing:
        if r.held or r.resent:
            by_cause[Cause.CANCELLED].append(r)
        else:
            by_cause[Cause.MISSING].append(r)
    for cause in (
        Cause.REJECTED_AFTER_SEND,
        Cause.REPORT_NOT_APPLIED,
        Cause.MISSING,
        Cause.CANCELLED,
        Cause.OUTSIDE_WINDOW,
    ):
        rs = by_cause.get(cause, [])
        if rs:
            detail = ""
            if cause is Cause.CANCELLED:
                detail = "; ".join(
                    f"{r.id}: " + ("Stripe answered that it exists" if r.held else "re-sent once, still not counted")
                    for r in rs
                )
            elif cause in (Cause.REJECTED_AFTER_SEND, Cause.OUTSIDE_WINDOW, Cause.REPORT_NOT_APPLIED):
                codes = sorted({c for r in rs if (c := r.error_code or r.reported)})
                detail = f"Stripe's code: {', '.join(codes)}" if codes else ""
            notes.append(CauseNote(cause, _sum(rs), tuple(r.id for r in rs), detail))
    if over > 0:
        notes.append(CauseNote(Cause.STRIPE_HOLDS_MORE, over))
    order = {c: i for i, c in enumerate(Cause)}
    return sorted(notes, key=lambda n: order[n.cause])


# ------------------------------------------------------------------------------------------------ repair


class RepairAction(StrEnum):
    RESEND = "resend"  # queue the row again, same identifier and value
    REPLACE = "replace"  # a new row (next revision of its bucket) with the lost row's value


@dataclass(frozen=True, slots=True)
class RepairStep:
    row_id: str
    action: RepairAction
    value: Decimal
    cause: Cause


def plan_repair(result: WindowResult, now_s: int) -> tuple[list[RepairStep], list[str]]:
    """What a repair does for one compared window, and what it refuses (with the reason).

    The rows Stripe lacks are repaired row by row from the window's causes (a ``short`` window, or the short
    hours of an ``over`` one). Rows outside Stripe's window cannot be sent any more (under any identifier);
    rows that cannot be told apart are not guessed at. What Stripe holds beyond what edgebill sent is planned
    by :func:`models.reconcile_over.plan_over_repair`.
    """
    label = result.label
    if label is Label.OK:
        return [], []
    if label is Label.METER_MISCONFIGURED:
        return [], ["the meter is misconfigured at Stripe: fix it first (nothing sent now would be billed)"]
    if label is Label.UNKNOWN_CUSTOMER:
        return [], ["Stripe has no such customer: fix the org's customer first"]
    by_id = {r.id: r for r in result.rows}
    steps: list[RepairStep] = []
    refused: list[str] = []
    for note in result.causes:
        for row_id in note.rows:
            row = by_id.get(row_id)
            if row is None:
                continue
            if note.cause in (Cause.UNEXPLAINED, Cause.STRIPE_HOLDS_MORE):
                continue
            if note.cause is Cause.OUTSIDE_WINDOW or expired_at_send(row.bucket_end, now_s):
                refused.append(f"{row_id}: outside Stripe's 35-day window, it cannot be sent again")
                continue
            if note.cause is Cause.MISSING:
                steps.append(RepairStep(row_id, RepairAction.RESEND, row.value, note.cause))
            elif note.cause in (Cause.REJECTED_AFTER_SEND, Cause.REPORT_NOT_APPLIED, Cause.CANCELLED):
                steps.append(RepairStep(row_id, RepairAction.REPLACE, row.value, note.cause))
        if note.cause is Cause.UNEXPLAINED:
            refused.append(f"{dec(note.value)} missing in rows that cannot be told apart ({note.detail})")
    return steps, refused


# ----------------------------------------------------------------------------------------------- alerts


def alert_id(key: WindowKey, first_run: int) -> str:
    """The alert's dedup key: one alert per (window key, episode), episode = the run it was first seen in."""
    digest = hashlib.sha256(f"{key.org_id}\x00{key.customer}".encode()).hexdigest()[:16]
    return f"stripe_reconcile:{key.grouping.value}:{key.start}:{key.meter}:{digest}:{first_run}"
