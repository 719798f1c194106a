"""Repairs through the outbox, recorded in ``reconcile_repairs`` with their evidence; the rules are pure
(:func:`models.reconcile.plan_repair`, :mod:`models.reconcile_over`), this module writes them.

Short windows: **resend** a ``sent`` row (back to ``pending``, unchanged) or **replace** a row whose
identifier is lost (the next revision, ``repair_of`` naming it). Excess at Stripe, once per key: **credit**
(a negative row, 0 units) or **cancel_replace**. None touches the rounding carry. In detail:
docs/architecture.md, "Module notes".
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

from sqlalchemy import Connection, func, insert, select, update

from models.billing import LEGACY_TIER_METERS, BillingMode, RowState, format_value, meter_row_id
from models.cutover import Decision
from models.reconcile import Cause, RepairAction, RepairStep, dec
from models.reconcile_over import CREDIT_PREFIX, OverAction, OverStep
from sinks.ledger.store import SqlStore
from sinks.schema import closed_buckets, meter_events, reconcile_repairs

__all__ = ["RESEND_NOTE", "OverDone", "OverWrite", "ReconcileRepairs", "RepairDone", "RepairRequest"]

#: ``last_error`` of a row a repair queued again.
RESEND_NOTE = "queued again by a reconciliation repair: Stripe does not hold it"


@dataclass(frozen=True, slots=True)
class RepairRequest:
    step: RepairStep
    customer: str  # the customer the lost row was sent to (a repair never changes it)
    evidence: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RepairDone:
    row_id: str
    action: RepairAction
    value: Decimal
    new_row_id: str | None = None
    skipped: str | None = None  # why nothing was written (the row changed since it was compared)


@dataclass(frozen=True, slots=True)
class OverWrite:
    """One planned over-billing repair to record (for ``cancel_replace``: after Stripe confirmed the cancel)."""

    step: OverStep
    evidence: dict[str, Any]


@dataclass(frozen=True, slots=True)
class OverDone:
    step: OverStep
    row_id: str | None = None  # the row written (the credit, or the replacement)
    skipped: str | None = None  # why nothing was written (done already, the row changed since, ...)


_TIER_METERS = frozenset(LEGACY_TIER_METERS.values())


class ReconcileRepairs(SqlStore):
    def apply_repairs(self, requests: Sequence[RepairRequest], *, by: str, reason: str = "") -> list[RepairDone]:
        """Write the repairs, each only if its row is still as it was compared.

        One transaction, in order: (1) PostgreSQL: the closer's advisory lock, so no close run picks a revision
        at the same moment (SQLite: the write lock); (2) per request: resend -> the row goes from ``sent`` back
        to ``pending`` if its value and customer are unchanged; replace -> unless the row already has a
        replacement, insert the next revision of its bucket with the same value, units, meter and mode,
        ``repair_of`` = the row; (3) one ``reconcile_repairs`` row per write with its evidence; (4) counters
        ``reconcile.resent`` / ``reconcile.replaced``. A crash before the commit writes nothing; running the same
        repair again finds the rows already queued or replaced and skips them, so nothing is billed twice.
        """
        now = self._clock()
        me = meter_events.c
        done: list[RepairDone] = []
        resent = replaced = 0
        with self._w.begin() as conn:
            self._lock_closer(conn)
            for req in requests:
                st = req.step
                row = conn.execute(select(meter_events).where(me.id == st.row_id)).first()
                if row is None or Decimal(row.value) != st.value or row.stripe_customer_id != req.customer:
                    done.append(RepairDone(st.row_id, st.action, st.value, skipped="the row changed since"))
                    continue
                if st.action is RepairAction.RESEND:
                    hit = conn.execute(
                        update(meter_events)
                        .where(me.id == st.row_id, me.state == RowState.SENT.value)
                        .values(state=RowState.PENDING.value, updated_ms=now, last_error=RESEND_NOTE)
                        .returning(me.id)
                    ).first()
                    if hit is None:
                        done.append(RepairDone(st.row_id, st.action, st.value, skipped=f"the row is {row.state}"))
                        continue
                    self._record(conn, st, st.row_id, None, st.cause, req.evidence, (by, reason, now))
                    done.append(RepairDone(st.row_id, st.action, st.value))
                    resent += 1
                    continue
                new_id = self._replace(conn, row, now)
                if new_id is None:
                    done.append(RepairDone(st.row_id, st.action, st.value, skipped="already replaced"))
                    continue
                self._record(conn, st, st.row_id, new_id, st.cause, req.evidence, (by, reason, now))
                done.append(RepairDone(st.row_id, st.action, st.value, new_row_id=new_id))
                replaced += 1
            self._bump_counters(conn, {"reconcile.resent": resent, "reconcile.replaced": replaced})
        return done

    def apply_over_repairs(self, writes: Sequence[OverWrite], *, by: str, reason: str) -> list[OverDone]:
        """Record the over-billing repairs, each in its own transaction, each once per key.

        Per write, one transaction, in order: (1) the closer's lock (PostgreSQL; SQLite: the write lock); (2) a
        ``reconcile_repairs`` row with the write's key already there: skipped, nothing written; (3) credit: the
        bucket must be decided ``billed`` (the edge sends its rows), then the credit row (next revision, pending,
        0 units, the negative excess); cancel_replace: the row must still be ``sent`` with its value, then its
        replacement (as :meth:`apply_repairs`) and a note on the row that Stripe cancelled it; (4) the
        ``reconcile_repairs`` row with the key, ``by`` and ``reason``; (5) counter ``reconcile.credits`` or
        ``reconcile.cancelled``; commit. A crash before a commit writes nothing of that write (the next run plans
        it again: for cancel_replace the row then reads as cancelled at Stripe, and the short repair bills it
        again); after it, the key is recorded and a second run writes nothing, so nothing is corrected twice.
        """
        out: list[OverDone] = []
        me = meter_events.c
        rr = reconcile_repairs.c
        for w in writes:
            st = w.step
            now = self._clock()
            with self._w.begin() as conn:
                self._lock_closer(conn)
                prior = conn.execute(select(rr.row_id, rr.new_row_id).where(rr.repair_key == st.key)).first()
                if prior is not None:
                    out.append(OverDone(st, prior.new_row_id or prior.row_id, skipped="done already"))
                    continue
                if st.action is OverAction.CREDIT:
                    decision = conn.execute(
                        select(closed_buckets.c.decision).where(closed_buckets.c.bucket_start == st.bucket_start)
                    ).scalar_one_or_none()
                    if decision != Decision.BILLED.value:
                        out.append(
                            OverDone(st, skipped=f"the bucket is {decision or 'not closed'}: the edge does not bill it")
                        )
                        continue
                    row_id = self._credit(conn, st, now)
                    written: str | None = None
                    target = row_id
                    counter = "reconcile.credits"
                else:
                    row = conn.execute(select(meter_events).where(me.id == st.row_id)).first()
                    if row is None or row.state != RowState.SENT.value or Decimal(row.value) != st.value:
                        out.append(OverDone(st, skipped="the row changed since it was compared"))
                        continue
                    written = self._replace(conn, row, now)
                    if written is None:
                        out.append(OverDone(st, skipped="already billed again"))
                        continue
                    conn.execute(
                        update(meter_events)
                        .where(me.id == row.id)
                        .values(
                            updated_ms=now,
                            last_error=f"cancelled at Stripe by a reconciliation repair (Stripe held this identifier "
                            f"beyond the ledger's value); billed again as {written}",
                        )
                    )
                    target, row_id = str(st.row_id), written
                    counter = "reconcile.cancelled"
                who = (by, reason, now)
                self._record(conn, st, target, written, Cause.STRIPE_HOLDS_MORE, w.evidence, who, key=st.key)
                self._bump_counters(conn, {counter: 1})
            out.append(OverDone(st, row_id))
        return out

    @staticmethod
    def _credit(conn: Connection, st: OverStep, now: int) -> str:
        mode = BillingMode.LEGACY if st.meter in _TIER_METERS else BillingMode.UNIFIED
        return _insert_next_revision(
            conn,
            now,
            org_id=st.org_id,
            bucket_start=st.bucket_start,
            bucket_end=st.bucket_end,
            meter=st.meter,
            billing_mode=mode.value,
            value=format_value(st.value),
            units=0,
            samples=0,
            close_id=0,
            last_error=f"takes back {dec(st.excess)} Stripe held beyond what edgebill sent in this hour "
            "(reconciliation repair)",
            repair_of=CREDIT_PREFIX + st.key,
        )

    @staticmethod
    def _replace(conn: Connection, row: Any, now: int) -> str | None:
        me = meter_events.c
        if conn.execute(select(me.id).where(me.repair_of == row.id).limit(1)).first() is not None:
            return None
        return _insert_next_revision(
            conn,
            now,
            last_error=f"bills again {row.id}, which Stripe does not hold (reconciliation repair)",
            repair_of=row.id,
            **{c: getattr(row, c) for c in _COPIED},
        )

    @staticmethod
    def _record(
        conn: Connection,
        st: RepairStep | OverStep,
        row_id: str,
        new_id: str | None,
        cause: Cause,
        evidence: Any,
        who: tuple[str, str, int],
        key: str | None = None,
    ) -> None:
        """Record one repair of ``row_id`` (``new_id``: the row written for it) in ``reconcile_repairs``;
        ``who``: (by, reason, now); ``key``: an over-billing repair's once-per-difference key."""
        by, reason, now = who
        conn.execute(
            insert(reconcile_repairs).values(
                row_id=row_id,
                action=st.action.value,
                new_row_id=new_id,
                value=dec(st.value),
                cause=cause.value,
                evidence=json.dumps(evidence, sort_keys=True),
                by=by,
                reason=reason,
                created_ms=now,
                **({} if key is None else {"repair_key": key}),
            )
        )

    def repairs(self, limit: int = 100) -> list[dict[str, Any]]:
        """The latest repairs, newest first."""
        with self.engine.connect() as conn:
            return [
                dict(r._mapping)
                for r in conn.execute(select(reconcile_repairs).order_by(reconcile_repairs.c.id.desc()).limit(limit))
            ]


#: What a row billing again a lost one copies from it.
_COPIED: Final = (
    "org_id",
    "bucket_start",
    "bucket_end",
    "meter",
    "billing_mode",
    "value",
    "units",
    "samples",
    "close_id",
)
#: What every row a repair writes starts as.
_NEW_ROW: Final = {"state": RowState.PENDING.value, "stripe_customer_id": None, "sent_ms": None, "attempts": 0}


def _insert_next_revision(conn: Connection, now: int, **row: Any) -> str:
    """Insert ``row`` as a new ``pending`` row, the next revision of its (org, bucket, meter); returns its id."""
    org, start, meter = row["org_id"], row["bucket_start"], row["meter"]
    me = meter_events.c
    top = conn.execute(
        select(func.max(me.revision)).where(me.org_id == org, me.bucket_start == start, me.meter == meter)
    ).scalar_one()
    revision = 0 if top is None else int(top) + 1
    row_id = meter_row_id(org, start, meter, revision)
    values = {"id": row_id, "revision": revision, "created_ms": now, "updated_ms": now, **_NEW_ROW, **row}
    conn.execute(insert(meter_events).values(**values))
    return row_id
