"""Meter rows written or moved after a bucket's close run, by operator commands: a replay's correction rows,
rows cancelled at Stripe, and rows moved between states by a rollback or a release.

Each keeps its stream's rounding carry exact (``meter_totals``, :func:`models.billing.carry_rounded_delta`);
a row ever sent never changes its value; rows written here carry ``close_id`` 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Final

from sqlalchemy import Connection, func, insert, select, update

from models.billing import (
    BillingMode,
    RowState,
    bucket_end,
    carry_rounded_delta,
    format_value,
    meter_row_id,
    meter_unit_divisor,
    round_value,
)
from models.cutover import Decision
from models.pricing import BILLED_STREAM, SHADOW_STREAM, row_placement
from sinks.ledger.store import SqlStore
from sinks.schema import closed_buckets, meter_events, meter_totals

__all__ = ["OPERATOR_CLOSE_ID", "Correction", "LedgerCorrections", "WrittenRow", "stream_of_state"]

#: ``close_id`` of rows written by an operator command rather than by a close run.
OPERATOR_CLOSE_ID: Final = 0

# States whose rows are in a rounding-carry stream for sure (rows written expired never were).
_STREAM_OF_STATE: Final = {
    RowState.PENDING.value: BILLED_STREAM,
    RowState.DEFERRED_NO_CUSTOMER.value: BILLED_STREAM,
    RowState.SENT.value: BILLED_STREAM,
    RowState.SHADOW.value: SHADOW_STREAM,
}


def stream_of_state(state: str) -> str | None:
    """The carry stream a row in ``state`` counts in (None: in none that can still change)."""
    return _STREAM_OF_STATE.get(state)


@dataclass(frozen=True, slots=True)
class Correction:
    """A correction row to write for one (org, bucket, meter): ``units`` (negative: a credit) in ``mode``."""

    org_id: str
    bucket_start: int
    meter: str
    units: int
    mode: BillingMode
    samples: int = 0


@dataclass(frozen=True, slots=True)
class WrittenRow:
    """A row an operator command wrote: its identifier, state and value."""

    id: str
    org_id: str
    bucket_start: int
    meter: str
    revision: int
    units: int
    value: str
    state: str


class LedgerCorrections(SqlStore):
    """The corrections side of the :class:`sinks.ledger.Ledger`."""

    # ------------------------------------------------------------------ reads

    def bucket_decisions(self, buckets: Iterable[int]) -> dict[int, Decision | None]:
        """The stored decision of each closed bucket among ``buckets`` (None: closed, not decided yet);
        buckets that never closed are absent."""
        wanted = sorted(set(buckets))
        out: dict[int, Decision | None] = {}
        cb = closed_buckets.c
        with self.engine.connect() as conn:
            for i in range(0, len(wanted), 500):
                for r in conn.execute(
                    select(cb.bucket_start, cb.decision).where(cb.bucket_start.in_(wanted[i : i + 500]))
                ):
                    out[int(r.bucket_start)] = None if r.decision is None else Decision(r.decision)
        return out

    def key_rows(self, org: str, bucket: int, meter: str) -> list[dict[str, Any]]:
        """Every row of one (org, bucket, meter), oldest revision first."""
        me = meter_events.c
        with self.engine.connect() as conn:
            return [
                dict(r._mapping)
                for r in conn.execute(
                    select(meter_events)
                    .where(me.org_id == org, me.bucket_start == bucket, me.meter == meter)
                    .order_by(me.revision)
                )
            ]

    # ------------------------------------------------------------------ carry bookkeeping (inside a transaction)

    def _carry_totals(self, conn: Connection, org: str, meter: str, stream: str) -> tuple[int, Decimal]:
        mt = meter_totals.c
        r = conn.execute(
            select(mt.units, mt.assigned).where(mt.org_id == org, mt.meter == meter, mt.stream == stream)
        ).first()
        return (0, Decimal(0)) if r is None else (int(r.units), Decimal(r.assigned))

    def _set_carry(self, conn: Connection, org: str, meter: str, stream: str, units: int, assigned: Decimal) -> None:
        stmt = self._insert(meter_totals).values(
            org_id=org, meter=meter, stream=stream, units=units, assigned=str(assigned)
        )
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["org_id", "meter", "stream"],
                set_={"units": stmt.excluded.units, "assigned": stmt.excluded.assigned},
            )
        )

    def _leave_stream(self, conn: Connection, rows: Iterable[Any]) -> None:
        """Take rows (with ``org_id, meter, state, units, value``) out of the carry stream of their state."""
        for r in rows:
            stream = stream_of_state(r.state)
            if stream is None:
                continue
            units, assigned = self._carry_totals(conn, r.org_id, r.meter, stream)
            self._set_carry(conn, r.org_id, r.meter, stream, units - int(r.units), assigned - Decimal(r.value))

    def _assign(self, conn: Connection, org: str, meter: str, stream: str | None, units: int) -> Decimal:
        """The value of a new row of ``units`` in ``stream`` (None: rounded on its own), carry updated."""
        divisor = meter_unit_divisor(meter)
        if stream is None:
            return round_value(units, divisor)
        before_units, before_assigned = self._carry_totals(conn, org, meter, stream)
        value, assigned = carry_rounded_delta(before_units, before_assigned, units, divisor)
        self._set_carry(conn, org, meter, stream, before_units + units, assigned)
        return value

    @staticmethod
    def _next_revision(conn: Connection, org: str, bucket: int, meter: str) -> int:
        me = meter_events.c
        prev = conn.execute(
            select(func.max(me.revision)).where(me.org_id == org, me.bucket_start == bucket, me.meter == meter)
        ).scalar_one_or_none()
        return 0 if prev is None else int(prev) + 1

    # ------------------------------------------------------------------ writes

    def write_corrections(
        self, corrections: Sequence[Correction], *, bucket_seconds: int, now_ms: int | None = None
    ) -> list[WrittenRow]:
        """Write one correction row per item, in its bucket's decided state (:func:`row_placement`).

        One transaction, under the closer's lock, in order per item: read the bucket's stored decision
        (an item whose bucket has none is skipped: it is not closed, and the closer will price its
        samples), the next revision, the value through the carry of the row's stream, insert the row.
        A crash before the commit writes nothing. A zero value makes no row (the carry keeps the units).
        """
        now = self._clock() if now_ms is None else now_ms
        written: list[WrittenRow] = []
        cb = closed_buckets.c
        with self._w.begin() as conn:
            self._lock_closer(conn)
            for c in corrections:
                if c.units == 0:
                    continue
                decision = conn.execute(
                    select(cb.decision).where(cb.bucket_start == c.bucket_start)
                ).scalar_one_or_none()
                if decision is None:
                    continue
                end = bucket_end(c.bucket_start, bucket_seconds)
                state, stream = row_placement(Decision(decision), end, now)
                value = self._assign(conn, c.org_id, c.meter, stream, c.units)
                if value == 0:
                    continue
                revision = self._next_revision(conn, c.org_id, c.bucket_start, c.meter)
                row_id = meter_row_id(c.org_id, c.bucket_start, c.meter, revision)
                text = format_value(value)
                conn.execute(
                    insert(meter_events).values(
                        id=row_id,
                        org_id=c.org_id,
                        bucket_start=c.bucket_start,
                        bucket_end=end,
                        meter=c.meter,
                        revision=revision,
                        billing_mode=c.mode.value,
                        value=text,
                        units=c.units,
                        samples=c.samples,
                        state=state.value,
                        stripe_customer_id=None,
                        close_id=OPERATOR_CLOSE_ID,
                        created_ms=now,
                        updated_ms=now,
                        sent_ms=None,
                        attempts=0,
                        last_error=None,
                    )
                )
                written.append(
                    WrittenRow(row_id, c.org_id, c.bucket_start, c.meter, revision, c.units, text, state.value)
                )
            self._bump_counters(conn, {"rows.corrections_written": len(written)})
        return written

    def record_cancelled(self, row_ids: Sequence[str], note: str) -> list[str]:
        """Rows Stripe has cancelled (meter-event adjustments) become ``cancelled``, with ``note``.

        One transaction: each named row still ``sent`` becomes ``cancelled`` and leaves the billed carry
        stream (its units and value no longer count at Stripe); counter ``rows.cancelled``. Rows in other
        states are left alone. Call it only after Stripe confirmed the cancellation: a crash before the
        commit leaves the rows ``sent`` while Stripe has cancelled them, and the next repair asks Stripe to
        cancel again, which it answers "already cancelled" (taken as confirmation). Returns the ids moved.
        """
        now = self._clock()
        me = meter_events.c
        moved: list[str] = []
        with self._w.begin() as conn:
            self._lock_closer(conn)
            rows = conn.execute(
                select(me.id, me.org_id, me.meter, me.state, me.units, me.value).where(
                    me.id.in_(list(row_ids)), me.state == RowState.SENT.value
                )
            ).all()
            self._leave_stream(conn, rows)
            for r in rows:
                conn.execute(
                    update(meter_events)
                    .where(me.id == r.id)
                    .values(state=RowState.CANCELLED.value, updated_ms=now, last_error=note)
                )
                moved.append(r.id)
            self._bump_counters(conn, {"rows.cancelled": len(moved)})
        return moved

    def _move_rows(self, conn: Connection, rows: Sequence[Any], to: RowState, now: int, note: str | None) -> None:
        """Move rows (``id, org_id, meter, state, units, value``) to state ``to`` (a state in no stream),
        taking them out of their carry streams. Inside the caller's transaction."""
        self._leave_stream(conn, rows)
        me = meter_events.c
        for r in rows:
            conn.execute(
                update(meter_events).where(me.id == r.id).values(state=to.value, updated_ms=now, last_error=note)
            )
