"""The ledger's outbox store: the meter rows the sender ships, their send outcomes, and the cursor of
Stripe's asynchronous error reports."""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sqlalchemy import and_, case, func, select, update

from models.billing import RowState
from models.pricing import BILLED_STREAM
from sinks.ledger.store import SqlStore
from sinks.schema import counters, meter_events, meter_totals, org_policies

__all__ = ["LedgerOutbox", "MeterRow"]


@dataclass(frozen=True, slots=True)
class MeterRow:
    """An outbox row as the sender sees it."""

    id: str
    org_id: str
    bucket_start: int
    bucket_end: int
    meter: str
    value: str
    state: str
    stripe_customer_id: str | None
    attempts: int


class LedgerOutbox(SqlStore):
    """The outbox side of the :class:`sinks.ledger.Ledger`."""

    def sendable(self, limit: int) -> list[MeterRow]:
        """Rows to send now: ``pending`` first (oldest bucket first), then ``deferred_no_customer`` rows
        whose org has a customer by now, each with its own share of ``limit`` so a deferred backlog
        never starves new rows. The customer is read fresh (latest policy of the org with one)."""
        me = meter_events.c
        cust = self._customer_subquery()
        with self.engine.connect() as conn:
            pending = conn.execute(
                select(meter_events, cust.c.customer)
                .join(cust, cust.c.org_id == me.org_id, isouter=True)
                .where(me.state == RowState.PENDING.value)
                .order_by(me.bucket_start, me.id)
                .limit(limit)
            ).all()
            deferred = conn.execute(
                select(meter_events, cust.c.customer)
                .join(cust, cust.c.org_id == me.org_id)
                .where(me.state == RowState.DEFERRED_NO_CUSTOMER.value, cust.c.customer.is_not(None))
                .order_by(me.bucket_start, me.id)
                .limit(max(1, limit // 4))
            ).all()
        return [
            MeterRow(
                id=r.id,
                org_id=r.org_id,
                bucket_start=r.bucket_start,
                bucket_end=r.bucket_end,
                meter=r.meter,
                value=r.value,
                state=r.state,
                stripe_customer_id=r.customer,
                attempts=r.attempts,
            )
            for r in [*pending, *deferred]
        ]

    @staticmethod
    def _customer_subquery() -> Any:
        op = org_policies.c
        latest = (
            select(op.org_id, func.max(op.effective_ms).label("eff"))
            .where(op.stripe_customer_id.is_not(None))
            .group_by(op.org_id)
            .subquery()
        )
        return (
            select(op.org_id, op.stripe_customer_id.label("customer"))
            .join(latest, and_(latest.c.org_id == op.org_id, latest.c.eff == op.effective_ms))
            .subquery()
        )

    def stripe_cursor(self, name: str) -> int | None:
        """A reconciliation cursor kept in ``counters`` (e.g. the newest Stripe error report read, in ms)."""
        with self.engine.connect() as conn:
            value = conn.execute(select(counters.c.value).where(counters.c.name == name)).scalar_one_or_none()
        return None if value is None else int(value)

    def reject_after_send(
        self,
        rejections: Sequence[tuple[str, str]],
        *,
        cursor: tuple[str, int] | None = None,
    ) -> list[str]:
        """Move rows Stripe refused *after* accepting the request (v2 stream error reports) to ``rejected``.

        rejections: (row id, error). One transaction, in this order: (1) each named row that is ``sent``
        or ``pending`` becomes ``rejected`` with the error (other states are left alone: a row already
        rejected, or never sent, is not touched); (2) the cursor ``(name, value)`` is stored, never moving
        backwards; (3) counters ``rows.rejected_async`` += rows moved. A crash before the commit changes
        nothing: the caller re-reads the same reports from the unchanged cursor, and applying a report a
        second time is a no-op. Returns the ids of the rows moved.
        """
        now = self._clock()
        me = meter_events.c
        moved: list[str] = []
        with self._w.begin() as conn:
            for row_id, error in rejections:
                hit = conn.execute(
                    update(meter_events)
                    .where(me.id == row_id, me.state.in_([RowState.SENT.value, RowState.PENDING.value]))
                    .values(state=RowState.REJECTED.value, updated_ms=now, last_error=error)
                    .returning(me.id)
                ).first()
                if hit is not None:
                    moved.append(row_id)
            if cursor is not None:
                name, value = cursor
                stmt = self._insert(counters).values(name=name, value=value)
                conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=["name"],
                        set_={
                            "value": case(
                                (stmt.excluded.value > counters.c.value, stmt.excluded.value),
                                else_=counters.c.value,
                            )
                        },
                    )
                )
            self._bump_counters(conn, {"rows.rejected_async": len(moved)})
        return moved

    def set_states(self, updates: Sequence[tuple[str, RowState, str | None, str | None]], *, attempts: int = 0) -> None:
        """Apply send outcomes: (row id, new state, customer, error), as one driver-level executemany.

        One transaction; only rows still ``pending`` or ``deferred_no_customer`` change (a late outcome never
        moves a row out of ``sent``); ``sent`` rows get ``sent_ms``; the customer is kept when None is given;
        counters ``rows.<state>`` are bumped. A crash before the commit changes nothing (the sender sends
        those rows again; see OutboxSender). The sender's hot path: thousands of rows/s.

        One exception, so the ledger never hides a delivery: a rollback may have moved a row to
        ``skipped_rolled_back`` while the sender was already sending it. When Stripe took it, the row becomes
        ``sent`` all the same (in the same transaction, re-entering the billed carry stream it had left), and
        the cutover status lists it among the rows sent for buckets at or after R.
        """
        if not updates:
            return
        now = self._clock()
        # Plain SQL through the driver: SQLAlchemy's per-row parameter processing costs more than the
        # UPDATE itself at this rate. Named parameters, in the driver's style (``:x`` / ``%(x)s``); the
        # two states are RowState.PENDING and RowState.DEFERRED_NO_CUSTOMER.
        sql = (
            "UPDATE meter_events SET state = :state, updated_ms = :now, attempts = attempts + :attempts, "
            "last_error = :error, stripe_customer_id = COALESCE(:customer, stripe_customer_id), "
            "sent_ms = CASE WHEN :sent = 1 THEN :now ELSE sent_ms END "
            "WHERE id = :id AND state IN ('pending', 'deferred_no_customer')"
        )
        if self._dialect != "sqlite":
            sql = re.sub(r":(\w+)", r"%(\1)s", sql)
        params = [
            {
                "id": row_id,
                "state": state.value,
                "now": now,
                "attempts": attempts,
                "error": error,
                "customer": customer,
                "sent": 1 if state is RowState.SENT else 0,
            }
            for row_id, state, customer, error in updates
        ]
        counts: dict[str, int] = defaultdict(int)
        for _, state, _, _ in updates:
            counts[f"rows.{state.value}"] += 1
        sent_ids = [row_id for row_id, state, _, _ in updates if state is RowState.SENT]
        with self._w.begin() as conn:
            raced = self._rolled_back_among(conn, sent_ids) if sent_ids else []
            conn.exec_driver_sql(sql, params)
            if raced:
                self._sent_despite_rollback(conn, raced, {u[0]: u[2] for u in updates}, now)
                counts["rows.sent_after_rollback"] += len(raced)
            self._bump_counters(conn, counts)

    @staticmethod
    def _rolled_back_among(conn: Any, ids: Sequence[str]) -> list[Any]:
        me = meter_events.c
        found: list[Any] = []
        for i in range(0, len(ids), 500):
            found.extend(
                conn.execute(
                    select(me.id, me.org_id, me.meter, me.units, me.value).where(
                        me.id.in_(list(ids[i : i + 500])), me.state == RowState.SKIPPED_ROLLED_BACK.value
                    )
                ).all()
            )
        return found

    def _sent_despite_rollback(
        self, conn: Any, rows: Sequence[Any], customers: dict[str, str | None], now: int
    ) -> None:
        """Rows a rollback had skipped while they were on their way: Stripe has them, so they are ``sent``
        and count in the billed carry stream again."""
        me = meter_events.c
        mt = meter_totals.c
        for r in rows:
            conn.execute(
                update(meter_events)
                .where(me.id == r.id)
                .values(
                    state=RowState.SENT.value,
                    sent_ms=now,
                    updated_ms=now,
                    stripe_customer_id=func.coalesce(customers.get(r.id), me.stripe_customer_id),
                    last_error="sent while a rollback skipped it: Stripe has it (cancel it or credit it)",
                )
            )
            conn.execute(
                update(meter_totals)
                .where(mt.org_id == r.org_id, mt.meter == r.meter, mt.stream == BILLED_STREAM)
                .values(units=mt.units + int(r.units))
            )
            cur = conn.execute(
                select(mt.assigned).where(mt.org_id == r.org_id, mt.meter == r.meter, mt.stream == BILLED_STREAM)
            ).scalar_one_or_none()
            if cur is not None:
                conn.execute(
                    update(meter_totals)
                    .where(mt.org_id == r.org_id, mt.meter == r.meter, mt.stream == BILLED_STREAM)
                    .values(assigned=str(Decimal(cur) + Decimal(r.value)))
                )
