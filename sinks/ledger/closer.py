"""The closer: turns ticks into meter rows once the watermark allows, and late ticks into corrections.

Pricing, the zombie rule, the row states and the rounding carry are the rules of ``models`` (``usage``,
``pricing``, ``zombie``, ``stripe_window``, ``billing``); this module applies them to the stored tick
batches in one transaction. A bucket that is closed already and gains ticks (late data, a replay's
backfill) is closed again by the next run, whatever the watermark says then.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from itertools import compress
from typing import Any

from sqlalchemy import Connection, func, insert, select, text, update

from models.billing import (
    Authority,
    BillingMode,
    bucket_end,
    carry_rounded_delta,
    format_value,
    meter_row_id,
    meter_unit_divisor,
    round_value,
)
from models.cutover import CutoverState, Decision, decide
from models.policy import OrgPolicy
from models.pricing import row_placement
from models.ticks import TickColumns
from models.usage import Aggregates, Groups, Pricer
from models.watermark import last_closable_bucket
from models.zombie import Interval
from sinks.ledger.batches import decode_columns
from sinks.ledger.cutover import read_effective_state
from sinks.ledger.store import SqlStore, policy_from_row
from sinks.schema import (
    cell_intervals,
    close_runs,
    closed_buckets,
    meter_events,
    meter_totals,
    org_policies,
    tick_batches,
    unbilled_usage,
)

__all__ = ["CloseConfig", "CloseResult", "LedgerCloser", "close_position", "not_aggregated"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CloseConfig:
    """Bucketing and closing; ``shadow``, ``bill_from`` and ``authority`` are the environment's bootstrap
    cutover state, in force until the ledger records the first cutover change."""

    bucket_seconds: int
    grace_seconds: int
    shadow: bool
    bill_from: int
    authority: Authority = Authority.CELL

    @property
    def bootstrap(self) -> CutoverState:
        return CutoverState(shadow=self.shadow, bill_from=self.bill_from, authority=self.authority)


@dataclass(slots=True)
class CloseResult:
    close_id: int | None = None
    last_bucket: int | None = None
    samples: int = 0
    rows: int = 0
    corrections: int = 0
    buckets: list[int] = field(default_factory=list)
    unbilled: dict[str, int] = field(default_factory=dict)
    decided: dict[int, Decision] = field(default_factory=dict)  # buckets decided by this run, first close


def not_aggregated() -> Any:
    """SQL condition: the batch is not yet in any meter row (its bucket's cursor is below its ``seq``)."""
    cb = closed_buckets.c
    tb = tick_batches.c
    cursor = select(cb.seq).where(cb.bucket_start == tb.bucket_start).scalar_subquery()
    return tb.seq > func.coalesce(cursor, 0)


def close_position(conn: Connection) -> tuple[int, int | None]:
    """(upto_seq, last_bucket) of the last close run: every batch at or below it, in a bucket at or
    before it or closed already, is aggregated."""
    row = conn.execute(
        select(close_runs.c.upto_seq, close_runs.c.last_bucket).order_by(close_runs.c.id.desc()).limit(1)
    ).first()
    return (int(row.upto_seq), row.last_bucket) if row else (0, None)


class LedgerCloser(SqlStore):
    """The closer side of the :class:`sinks.ledger.Ledger`."""

    def _policies(self, conn: Connection, orgs: Iterable[str]) -> dict[str, list[OrgPolicy]]:
        found: dict[str, list[OrgPolicy]] = defaultdict(list)
        ordered = sorted(set(orgs))
        for i in range(0, len(ordered), 500):
            chunk = ordered[i : i + 500]
            for r in conn.execute(select(org_policies).where(org_policies.c.org_id.in_(chunk))):
                found[r.org_id].append(policy_from_row(r))
        return dict(found)

    def _intervals(self, conn: Connection, batches: Sequence[TickColumns]) -> list[Interval]:
        """The ownership intervals of the sandboxes ``batches`` hold ticks of (all the zombie rule needs to
        decide their ticks; a tick without a worker is never a zombie, so its sandbox is not looked up).

        When the table holds fewer intervals than the batches hold ticks, it is read whole (one bounded scan)
        and filtered here; otherwise by sandbox, 500 at a time, through the driver (a closer run may ask for
        tens of thousands: SQL compiled per chunk would cost more than the lookups).
        """
        ci = cell_intervals.c
        ticks = sum(len(c.org) for c in batches)
        if not ticks:
            return []
        cols = select(ci.sandbox_id, ci.worker_id, ci.started_ms, ci.ended_ms)
        held = conn.execute(select(func.count()).select_from(cols.limit(ticks).subquery())).scalar_one()
        if not held:
            return []
        wanted: set[str] = set()
        for c in batches:
            wanted.update(compress(c.sandbox_id, c.worker_id))
        if held < ticks:
            rows: Iterable[Any] = [r for r in conn.execute(cols) if r[0] in wanted]
        else:
            rows = self._intervals_of(conn, sorted(wanted))
        return [(r[0], r[1], int(r[2]), None if r[3] is None else int(r[3])) for r in rows]

    def _intervals_of(self, conn: Connection, ordered: list[str]) -> Iterator[Any]:
        for i in range(0, len(ordered), 500):
            chunk = ordered[i : i + 500]
            sql = (
                "SELECT sandbox_id, worker_id, started_ms, ended_ms FROM cell_intervals "  # noqa: S608 - placeholders
                f"WHERE sandbox_id IN ({', '.join([self._param] * len(chunk))})"
            )
            yield from conn.exec_driver_sql(sql, tuple(chunk))

    def close(self, watermark_ms: int | None, cfg: CloseConfig) -> CloseResult:
        """Close every bucket the watermark allows, re-close closed buckets that gained ticks, and turn those
        late ticks into corrections.

        Batches are never rewritten: a bucket's cursor (``closed_buckets.seq``) says up to which insertion
        ``seq`` its batches are aggregated, and the last close run (``upto_seq``, ``last_bucket``) covers every
        batch with ``seq <= upto_seq`` in a bucket ``<= last_bucket`` (or closed already). One transaction:
          1. take the closer lock and stop ingest for the moment (SQLite: BEGIN IMMEDIATE; PostgreSQL: an
             advisory lock, then ``LOCK TABLE tick_batches IN SHARE MODE``, which waits for in-flight ingest
             transactions, so no batch below the ``seq`` read next can still appear);
          2. read ``S = max(seq)`` and the buckets to work on (:meth:`_open_run`: closable ones with batches
             above the previous ``upto_seq``, newly closable ones, and closed ones that gained batches);
          3. insert the ``close_runs`` row; decide the buckets closing for the first time from the cutover
             state in force, read inside the transaction (:meth:`_decide`);
          4. decode each bucket's batches with ``cursor < seq <= S`` and price them (:meth:`_price`);
          5. insert the meter rows (next revision, value through the rounding carry, state by
             :func:`models.pricing.row_placement`: :meth:`_write_rows`) and the unbilled usage with its reason;
          6. move each bucket's cursor to ``S``, store the new decisions, counters (:meth:`_finish_run`); commit.
        A crash anywhere before the commit changes nothing: the next run does the same work again. After
        the commit every tick up to ``S`` of those buckets is in exactly one row set — aggregated once,
        never skipped — and rows are never rewritten, so an identifier can never reach Stripe with two values.
        """
        last = (
            None if watermark_ms is None else last_closable_bucket(watermark_ms, cfg.bucket_seconds, cfg.grace_seconds)
        )
        with self.engine.connect() as probe:
            if not self._close_buckets(probe, last):
                return CloseResult(last_bucket=last)
        now = self._clock()
        with self._w.begin() as conn:
            self._lock_closer(conn)
            if self._dialect == "postgresql":
                conn.execute(text("LOCK TABLE tick_batches IN SHARE MODE"))
            result = self._close_in_tx(conn, now, watermark_ms or 0, last, cfg)
        if result.rows or result.samples:
            log.info(
                "close run %s: buckets<=%s aggregated %d ticks -> %d rows (%d corrections); unbilled %s",
                result.close_id,
                last,
                result.samples,
                result.rows,
                result.corrections,
                result.unbilled or "{}",
            )
        return result

    def _close_buckets(self, conn: Connection, last: int | None, upto: int | None = None) -> list[int]:
        """Buckets to close: ``<= last`` with batches not yet aggregated, and closed buckets with batches
        above the last run's ``upto_seq`` (below ``upto`` when given)."""
        tb = tick_batches.c
        cb = closed_buckets.c
        done_seq, done_bucket = close_position(conn)
        fresh = select(tb.bucket_start).where(tb.seq > done_seq)
        if upto is not None:
            fresh = fresh.where(tb.seq <= upto)
        closed = select(cb.bucket_start).where(cb.bucket_start == tb.bucket_start).exists()
        fresh = fresh.where(closed if last is None else (tb.bucket_start <= last) | closed)
        found = {int(b) for b in conn.execute(fresh.distinct()).scalars()}
        if last is not None:
            newly = select(tb.bucket_start).where(tb.bucket_start <= last, tb.seq <= done_seq)
            if done_bucket is not None:
                newly = newly.where(tb.bucket_start > done_bucket)
            found.update(int(b) for b in conn.execute(newly.distinct()).scalars())
        return sorted(found)

    def _close_in_tx(
        self, conn: Connection, now: int, watermark_ms: int, last: int | None, cfg: CloseConfig
    ) -> CloseResult:
        """Steps 2-6 of :meth:`close`, inside its transaction (a crash between any two leaves nothing).

        Read state (:meth:`_open_run`, :meth:`_decide`, :meth:`_price`), then write (:meth:`_write_rows`,
        :meth:`_write_unbilled`, :meth:`_finish_run`); each step returns what the next needs.
        """
        run = self._open_run(conn, now, watermark_ms, last)
        result = CloseResult(close_id=run.close_id, last_bucket=last)
        if not run.buckets:
            return result
        decisions, result.decided = self._decide(conn, run.buckets, cfg)
        result.samples, priced = self._price(conn, run, cfg)
        items = [(o, b, m, u, n, priced.modes[(o, b, m)]) for (o, b, m), (u, n) in sorted(priced.billable.items())]
        result.rows, result.corrections = self._write_rows(conn, run.close_id, now, items, cfg, decisions)
        result.unbilled = self._write_unbilled(conn, priced.unbilled)
        result.buckets = run.buckets
        self._finish_run(conn, run, now, decisions, result)
        return result

    def _open_run(self, conn: Connection, now: int, watermark_ms: int, last: int | None) -> _Run:
        """Read ``S = max(seq)`` and the buckets to work on; insert the ``close_runs`` row (step 2-3)."""
        top = conn.execute(select(func.max(tick_batches.c.seq))).scalar_one_or_none() or 0
        buckets = self._close_buckets(conn, last, upto=top)
        done_seq, done_bucket = close_position(conn)
        reach = [b for b in (last, done_bucket) if b is not None]
        cid = conn.execute(
            insert(close_runs)
            .values(
                started_ms=now,
                watermark_ms=watermark_ms,
                samples=0,
                rows=0,
                upto_seq=max(top, done_seq),
                last_bucket=max(reach) if reach else None,
            )
            .returning(close_runs.c.id)
        ).scalar_one()
        cb = closed_buckets.c
        cursors = {
            int(r.bucket_start): int(r.seq)
            for r in conn.execute(select(cb.bucket_start, cb.seq).where(cb.bucket_start.in_(buckets)))
        }
        return _Run(cid, top, buckets, cursors)

    def _decide(
        self, conn: Connection, buckets: list[int], cfg: CloseConfig
    ) -> tuple[dict[int, Decision], dict[int, Decision]]:
        """Every bucket's decision (the stored one, else made now), and the ones made now (step 3).

        A bucket's decision is made once, at its first close, from the cutover state in force now (read in
        this transaction: a change commits before or after this run, never during it).
        """
        cb = closed_buckets.c
        decisions = {
            int(r.bucket_start): Decision(r.decision)
            for r in conn.execute(select(cb.bucket_start, cb.decision).where(cb.bucket_start.in_(buckets)))
            if r.decision is not None
        }
        got = read_effective_state(conn)
        state = cfg.bootstrap if got is None else got[1]
        decided = {b: decide(state, b) for b in buckets if b not in decisions}
        return decisions | decided, decided

    def _price(self, conn: Connection, run: _Run, cfg: CloseConfig) -> tuple[int, Aggregates]:
        """Decode each bucket's batches with ``cursor < seq <= S`` and price them (step 4); (ticks, priced)."""
        tb = tick_batches.c
        batches: list[tuple[int, TickColumns]] = []
        for b in run.buckets:
            rows = conn.execute(
                select(tb.data)
                .where(tb.bucket_start == b, tb.seq > run.cursors.get(b, 0), tb.seq <= run.top)
                .order_by(tb.seq)
            )
            # Aggregated, never compared by id: decoded as columns, without ids or a tick object per tick.
            batches.extend((b, decode_columns(data)) for data in rows.scalars())
        orgs: set[str] = set()
        for _, c in batches:
            orgs.update(c.org_names)
        intervals = self._intervals(conn, [c for _, c in batches])
        pricer = Pricer(self._policies(conn, orgs), intervals, cfg.bucket_seconds)
        groups = Groups()
        for b, c in batches:
            pricer.collect_columns(b, c, groups)
        return sum(len(c.org) for _, c in batches), pricer.finish(groups)

    def _write_unbilled(self, conn: Connection, unbilled: dict[tuple[str, int, str], list[int]]) -> dict[str, int]:
        """Add non-billable usage to ``unbilled_usage`` with its reason (step 5); ticks per reason."""
        by_reason: dict[str, int] = {}
        if not unbilled:
            return by_reason
        stmt = self._insert(unbilled_usage)
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["org_id", "bucket_start", "reason"],
                set_={
                    "samples": unbilled_usage.c.samples + stmt.excluded.samples,
                    "mb_seconds": unbilled_usage.c.mb_seconds + stmt.excluded.mb_seconds,
                },
            ),
            [
                {"org_id": o, "bucket_start": b, "reason": reason, "samples": v[0], "mb_seconds": v[1]}
                for (o, b, reason), v in sorted(unbilled.items())
            ],
        )
        for (_, _, reason), v in unbilled.items():
            by_reason[reason] = by_reason.get(reason, 0) + v[0]
        return by_reason

    def _finish_run(
        self, conn: Connection, run: _Run, now: int, decisions: dict[int, Decision], result: CloseResult
    ) -> None:
        """Move each bucket's cursor to ``S``, store new decisions (a stored one is kept), counters (step 6)."""
        stmt = self._insert(closed_buckets)
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["bucket_start"],
                set_={
                    "close_id": stmt.excluded.close_id,
                    "seq": stmt.excluded.seq,
                    "decision": func.coalesce(closed_buckets.c.decision, stmt.excluded.decision),
                },
            ),
            [
                {"bucket_start": b, "closed_ms": now, "close_id": run.close_id, "seq": run.top, "decision": d.value}
                for b, d in ((b, decisions[b]) for b in run.buckets)
            ],
        )
        conn.execute(
            update(close_runs).where(close_runs.c.id == run.close_id).values(samples=result.samples, rows=result.rows)
        )
        self._bump_counters(
            conn,
            {
                "close.runs": 1,
                "close.samples": result.samples,
                "close.rows": result.rows,
                "close.corrections": result.corrections,
                **{f"unbilled.{k}": v for k, v in result.unbilled.items()},
            },
        )

    def _write_rows(
        self,
        conn: Connection,
        cid: int,
        now: int,
        items: list[tuple[str, int, str, int, int, BillingMode]],
        cfg: CloseConfig,
        decisions: dict[int, Decision],
    ) -> tuple[int, int]:
        """Write the meter rows of one close run from (org, bucket, meter, units, samples, mode), sorted, and
        upsert the rounding carries (step 5); returns (rows, corrections).

        The previous revisions and the carries involved are read in a few queries (:meth:`_revisions`,
        :meth:`_carries`), the rows computed in order (per (org, meter) in bucket order, so the carry runs
        forwards), then inserted and the carries upserted with one executemany each.
        """
        if not items:
            return 0, 0
        prev_rev = self._revisions(conn, sorted({b for _, b, _, _, _, _ in items}))
        totals = self._carries(conn, sorted({o for o, _, _, _, _, _ in items}))
        rows, changed = _meter_rows(items, cid, now, cfg.bucket_seconds, decisions, prev_rev, totals)
        if rows:
            conn.execute(insert(meter_events), rows)
        if changed:
            stmt = self._insert(meter_totals)
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["org_id", "meter", "stream"],
                    set_={"units": stmt.excluded.units, "assigned": stmt.excluded.assigned},
                ),
                [
                    {
                        "org_id": k[0],
                        "meter": k[1],
                        "stream": k[2],
                        "units": totals[k][0],
                        "assigned": str(totals[k][1]),
                    }
                    for k in sorted(changed)
                ],
            )
        return len(rows), sum(1 for r in rows if r["revision"])

    def _revisions(self, conn: Connection, buckets: list[int]) -> dict[tuple[str, int, str], int]:
        """The newest revision of each (org, bucket, meter) of ``buckets`` that has rows."""
        me = meter_events.c
        out: dict[tuple[str, int, str], int] = {}
        for i in range(0, len(buckets), 500):
            for r in conn.execute(
                select(me.org_id, me.bucket_start, me.meter, func.max(me.revision).label("rev"))
                .where(me.bucket_start.in_(buckets[i : i + 500]))
                .group_by(me.org_id, me.bucket_start, me.meter)
            ):
                out[(r.org_id, r.bucket_start, r.meter)] = r.rev
        return out

    def _carries(self, conn: Connection, orgs: list[str]) -> dict[tuple[str, str, str], tuple[int, Decimal]]:
        """The rounding carry (units, assigned value) of each (org, meter, stream) of ``orgs``."""
        out: dict[tuple[str, str, str], tuple[int, Decimal]] = {}
        for i in range(0, len(orgs), 500):
            for r in conn.execute(select(meter_totals).where(meter_totals.c.org_id.in_(orgs[i : i + 500]))):
                out[(r.org_id, r.meter, r.stream)] = (r.units, Decimal(r.assigned))
        return out


def _meter_rows(
    items: list[tuple[str, int, str, int, int, BillingMode]],
    cid: int,
    now: int,
    bucket_seconds: int,
    decisions: dict[int, Decision],
    prev_rev: dict[tuple[str, int, str], int],
    totals: dict[tuple[str, str, str], tuple[int, Decimal]],
) -> tuple[list[dict[str, Any]], set[tuple[str, str, str]]]:
    """The meter rows of ``items``, in order; advances ``prev_rev`` and the carries ``totals`` (and returns
    the carries changed). Pure but for those two."""
    changed: set[tuple[str, str, str]] = set()
    rows: list[dict[str, Any]] = []
    for org, bstart, meter, units, samples, mode in items:
        bend = bucket_end(bstart, bucket_seconds)
        divisor = meter_unit_divisor(meter)
        state, stream = row_placement(decisions[bstart], bend, now)
        if stream is None:
            value = round_value(units, divisor)
        else:
            key = (org, meter, stream)
            before_units, before_assigned = totals.get(key, (0, Decimal(0)))
            value, assigned = carry_rounded_delta(before_units, before_assigned, units, divisor)
            totals[key] = (before_units + units, assigned)
            changed.add(key)
        if value <= 0:
            continue  # nothing to send (the rounding carry keeps the units for the next row)
        prev = prev_rev.get((org, bstart, meter))
        revision = 0 if prev is None else prev + 1
        prev_rev[(org, bstart, meter)] = revision
        rows.append(
            {
                "id": meter_row_id(org, bstart, meter, revision),
                "org_id": org,
                "bucket_start": bstart,
                "bucket_end": bend,
                "meter": meter,
                "revision": revision,
                "billing_mode": mode.value,
                "value": format_value(value),
                "units": units,
                "samples": samples,
                "state": state.value,
                "stripe_customer_id": None,
                "close_id": cid,
                "created_ms": now,
                "updated_ms": now,
                "sent_ms": None,
                "attempts": 0,
                "last_error": None,
            }
        )
    return rows, changed


@dataclass(frozen=True, slots=True)
class _Run:
    """A close run as opened: its id, ``S`` (``top``), the buckets it works on and their cursors."""

    close_id: int
    top: int
    buckets: list[int]
    cursors: dict[int, int]
