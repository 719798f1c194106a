"""``edgebill replay --apply``, the other way: repair (org, bucket, meter) keys the ledger bills more or less
than the topic's ticks say, for a reason other than missing ticks.

Under-billed: a correction row. Over-billed and billed by the edge: cancel at Stripe what is inside its
24 h window and resend under a new identifier, else a negative correction (past 35 days: listed for a
manual credit). Over-billed, not billed by the edge: a negative row in that state. Keys with missing ticks
or pending close are left alone; a second ``--apply`` finds nothing. Why: docs/architecture.md, "Module notes".
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from infra.replay.report import OVER, UNDER, KeyDiff, ReplayResult, _iso
from models.billing import LEGACY_TIER_METERS, BillingMode, RowState, bucket_end
from models.cutover import Decision
from models.stripe_window import CANCEL_MARGIN_SECONDS, cancellable, expired_at_close
from sinks.ledger import Correction, Ledger
from sinks.stripe.v1 import Cancellation

__all__ = ["CANCEL_MARGIN_SECONDS", "RepairResult", "apply_repairs", "repair_problems", "repairable"]

log = logging.getLogger(__name__)

_TIER_METERS: Final = frozenset(LEGACY_TIER_METERS.values())


@dataclass
class RepairResult:
    """What a repair did: rows cancelled at Stripe, correction rows written, what it could not do."""

    cancelled: list[str] = field(default_factory=list)
    corrections: list[dict[str, Any]] = field(default_factory=list)
    credit_needed: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def to_wire(self) -> dict[str, Any]:
        return {
            "cancelled": self.cancelled,
            "corrections": self.corrections,
            "credit_needed": self.credit_needed,
            "errors": self.errors,
            "skipped": self.skipped,
        }


def repairable(result: ReplayResult) -> list[KeyDiff]:
    """The under- and over-billed keys this module repairs (compared, no missing ticks, none pending close:
    a key pending close is labelled so, never under- or over-billed)."""
    return [k for k in result.report.keys if k.compared and k.label in (UNDER, OVER) and not k.missing_units]


def repair_problems(result: ReplayResult, *, now_ms: int) -> list[str]:
    """Why the repairs should not be written (``--force`` overrides): a correction of an hour past Stripe's
    35-day window could only be an ``expired`` row."""
    size = result.report.bucket_seconds
    old = [k for k in repairable(result) if expired_at_close(bucket_end(k.bucket_start, size), now_ms)]
    if not old:
        return []
    k = old[0]
    return [
        f"{len(old)} (org, bucket, meter) to correct are older than Stripe's 35-day window (e.g. {k.org_id} "
        f"{_iso(k.bucket_start)} {k.meter}): a correction could only be an 'expired' row, a credit is needed"
    ]


def _mode(meter: str) -> BillingMode:
    return BillingMode.LEGACY if meter in _TIER_METERS else BillingMode.UNIFIED


def apply_repairs(
    ledger: Ledger,
    result: ReplayResult,
    *,
    cancel: Callable[[str, str], Cancellation] | None,
    now_ms: int,
) -> RepairResult:
    """Repair the under- and over-billed keys of ``result`` (see the module doc).

    Order of side effects, per over-billed key of a bucket billed by the edge: (1) Stripe cancels the key's
    rows received less than 24 h ago (one adjustment each); (2) those rows become ``cancelled`` in the
    ledger (one transaction). Then, for every key: (3) one correction row (the corrected value after a
    cancellation, else the difference), all in one ledger transaction. A crash after (1) leaves rows the
    ledger still holds ``sent``: the next repair asks Stripe again, which answers "already cancelled"
    (taken as done). A crash after (2) leaves the key under-billed: the next repair writes the difference.
    Nothing is ever sent twice under one identifier: a corrected value always gets a new revision.
    """
    out = RepairResult()
    size = result.report.bucket_seconds
    keys = repairable(result)
    if not keys:
        return out
    decisions = ledger.bucket_decisions(k.bucket_start for k in keys)
    corrections: list[Correction] = []
    for k in keys:
        where = {"org_id": k.org_id, "bucket_start": k.bucket_start, "meter": k.meter}
        decision = decisions.get(k.bucket_start)
        if decision is None or k.open_units:
            out.skipped.append({**where, "why": "the bucket is not closed yet: the closer prices it"})
            continue
        units = k.diff_units  # what the ledger must add: negative when it bills too much
        if k.label == OVER and decision is Decision.BILLED:
            freed = _cancel_recent(ledger, k, cancel, now_ms, out)
            units += freed  # the cancelled rows no longer count: the new row carries the corrected value
        if units < 0 and expired_at_close(bucket_end(k.bucket_start, size), now_ms):
            out.credit_needed.append({**where, "units": units, "why": "past Stripe's 35-day window"})
        if units:
            corrections.append(Correction(k.org_id, k.bucket_start, k.meter, units, _mode(k.meter)))
    if corrections:
        for w in ledger.write_corrections(corrections, bucket_seconds=size, now_ms=now_ms):
            out.corrections.append(
                {"id": w.id, "org_id": w.org_id, "bucket_start": w.bucket_start, "meter": w.meter,
                 "units": w.units, "value": w.value, "state": w.state}
            )  # fmt: skip
    log.info(
        "replay repaired %d key(s): %d row(s) cancelled at Stripe, %d correction row(s), %d credit(s) to make",
        len(keys) - len(out.skipped),
        len(out.cancelled),
        len(out.corrections),
        len(out.credit_needed),
    )
    return out


def _cancel_recent(
    ledger: Ledger,
    k: KeyDiff,
    cancel: Callable[[str, str], Cancellation] | None,
    now_ms: int,
    out: RepairResult,
) -> int:
    """Cancel the key's rows Stripe received less than 24 h ago; record them; return their units."""
    recent = [
        r
        for r in ledger.key_rows(k.org_id, k.bucket_start, k.meter)
        if r["state"] == RowState.SENT.value and r["sent_ms"] is not None and cancellable(r["sent_ms"], now_ms)
    ]
    if not recent or cancel is None:
        return 0
    done: list[str] = []
    for r in recent:
        res = cancel(r["meter"], r["id"])
        if res.cancelled:
            done.append(r["id"])
        elif not res.too_late:  # too late: the negative correction takes it back instead
            out.errors.append({"id": r["id"], "error": res.error, "transient": res.transient})
    if not done:
        return 0
    moved = set(ledger.record_cancelled(done, "cancelled at Stripe by a replay: replaced by a corrected row"))
    out.cancelled.extend(sorted(moved))
    return sum(int(r["units"]) for r in recent if r["id"] in moved)
