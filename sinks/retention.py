"""Retention: drops the per-tick data of retired buckets, moves the dedup horizon, and reports the ledger's size.

The policy is :mod:`models.retention`. :meth:`Retention.compact` runs in a few short transactions (see it
for their order and what a crash between them does); :meth:`Retention.plan` says what it would do;
:meth:`Retention.sizes` measures every table. Meter rows, unbilled usage, parity, audit logs and counters stay.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Final

from sqlalchemy import Connection, Engine, func, select, text
from sqlalchemy.exc import DBAPIError

from models.billing import bucket_end
from models.retention import UNSETTLED_STATES, retire_before_s
from models.zombie import MAX_ZOMBIE_SLACK_MS
from sinks.ledger.store import ADVISORY_LOCK_RETENTION, DEDUP_HORIZON, SqlStore, read_dedup_horizon
from sinks.parity import EDGE_UPTO, ParityStore
from sinks.schema import cell_intervals, closed_buckets, counters, metadata, meter_events, parity_state, tick_batches

__all__ = ["CHUNK_ROWS", "CompactResult", "Retention", "RetentionPlan", "TableSize"]

log = logging.getLogger(__name__)

#: Rows deleted per transaction: about 50 ms of the SQLite write lock on the build machine.
CHUNK_ROWS: Final = 20_000

# Why a bucket past the retention period keeps its samples for now (RetentionPlan.held).
NOT_CLOSED: Final = "not_closed"  # the closer has not closed it yet
NOT_AGGREGATED: Final = "not_aggregated"  # late samples above its cursor: the next close run aggregates them
UNSETTLED_ROWS: Final = "unsettled_rows"  # a meter row still pending or deferred_no_customer
PARITY_BEHIND: Final = "parity_edge_behind"  # samples not yet added to the parity edge sums


@dataclass(frozen=True, slots=True)
class TableSize:
    """One ledger table: its rows (an estimate on PostgreSQL: ``estimated``) and bytes with its indexes."""

    name: str
    rows: int
    bytes: int
    estimated: bool = False


@dataclass
class RetentionPlan:
    """What a compaction at ``now_ms`` with a retention of ``days`` would do (``days`` 0: nothing)."""

    now_ms: int
    days: int
    bucket_seconds: int
    retire_before_s: int  # buckets that ended at or before this may retire (unix s)
    horizon_s: int  # the dedup horizon now (0: none)
    retire: dict[int, int] = field(default_factory=dict)  # bucket start -> samples to drop
    held: dict[str, list[int]] = field(default_factory=dict)  # reason -> buckets past the period kept for now
    samples_bytes_per_row: float = 0.0  # the samples table's bytes per row (with its indexes), for estimates

    @property
    def samples(self) -> int:
        return sum(self.retire.values())

    @property
    def new_horizon_s(self) -> int:
        """The dedup horizon after the compaction (if every planned bucket still passes then)."""
        return max([self.horizon_s, *(bucket_end(b, self.bucket_seconds) for b in self.retire)])

    @property
    def frees_bytes(self) -> int:
        """About how many bytes dropping the samples frees (their share of the table and its indexes)."""
        return int(self.samples * self.samples_bytes_per_row)

    def to_wire(self) -> dict[str, Any]:
        return {
            "days": self.days,
            "retire_before_s": self.retire_before_s,
            "horizon_s": self.horizon_s,
            "new_horizon_s": self.new_horizon_s,
            "buckets": len(self.retire),
            "samples": self.samples,
            "frees_bytes_estimate": self.frees_bytes,
            "held": {k: len(v) for k, v in sorted(self.held.items())},
            "held_buckets": {k: sorted(v)[:20] for k, v in sorted(self.held.items())},
        }


@dataclass
class CompactResult:
    """What one compaction did."""

    plan: RetentionPlan
    horizon_s: int = 0  # the dedup horizon after it
    buckets: int = 0  # buckets whose samples are all gone
    samples: int = 0  # samples deleted
    intervals: int = 0  # cell intervals deleted
    transactions: int = 0
    seconds: float = 0.0
    complete: bool = True  # False: stopped early (the next run continues)

    def to_wire(self) -> dict[str, Any]:
        return {
            "horizon_s": self.horizon_s,
            "buckets": self.buckets,
            "samples": self.samples,
            "intervals": self.intervals,
            "transactions": self.transactions,
            "seconds": round(self.seconds, 3),
            "complete": self.complete,
            "plan": self.plan.to_wire(),
        }


class Retention(SqlStore):
    """Compaction, its plan and the ledger's sizes, over the ledger's database."""

    def __init__(
        self,
        engine: Engine,
        *,
        bucket_seconds: int,
        chunk_rows: int = CHUNK_ROWS,
        pause_ratio: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """``pause_ratio``: after each chunk, wait this many times as long as the chunk took, so that other
        writers get the (SQLite) write lock in between: 1.0 leaves the ledger at least half of the time."""
        super().__init__(engine)
        self.bucket_seconds = bucket_seconds
        self.chunk_rows = chunk_rows
        self.pause_ratio = pause_ratio
        self._sleep = sleep

    # ------------------------------------------------------------------ reads

    def horizon(self) -> int:
        """The dedup horizon (unix s; 0 = nothing dropped yet)."""
        with self.engine.connect() as conn:
            return read_dedup_horizon(conn)

    def plan(self, now_ms: int, days: int, *, estimate_bytes: bool = False) -> RetentionPlan:
        """Which buckets a compaction at ``now_ms`` would retire, and why the others past the period stay.

        Read-only (no lock): it counts the samples of every bucket that ended at least ``days`` ago and still
        holds samples, through the bucket index. :meth:`compact` checks each bucket again under the lock.
        ``estimate_bytes``: also measure the samples table for :attr:`RetentionPlan.frees_bytes` (on SQLite
        that reads every page of the table and its indexes: for reports, not for every run).
        """
        cutoff = retire_before_s(now_ms, days)
        size = self.bucket_seconds
        plan = RetentionPlan(now_ms, days, size, cutoff, self.horizon())
        if days <= 0:
            return plan
        tb = tick_batches.c
        with self.engine.connect() as conn:
            old = [
                (int(r.b), int(r.n), int(r.top))
                for r in conn.execute(
                    select(tb.bucket_start.label("b"), func.sum(tb.ticks).label("n"), func.max(tb.seq).label("top"))
                    .where(tb.bucket_start <= cutoff - size)
                    .group_by(tb.bucket_start)
                )
            ]
            if not old:
                return plan
            verdicts = self._verdicts(conn, {b: top for b, _, top in old})
            if estimate_bytes:
                plan.samples_bytes_per_row = self._samples_bytes_per_row(conn)
        for b, n, _ in old:
            why = verdicts[b]
            if why is None:
                plan.retire[b] = n
            else:
                plan.held.setdefault(why, []).append(b)
        return plan

    def _verdicts(self, conn: Connection, tops: dict[int, int]) -> dict[int, str | None]:
        """Per bucket (with the highest ``seq`` of its samples): None if it may retire, else why not."""
        cb = closed_buckets.c
        me = meter_events.c
        buckets = sorted(tops)
        cursors: dict[int, int] = {}
        unsettled: set[int] = set()
        for i in range(0, len(buckets), 500):
            part = buckets[i : i + 500]
            cursors.update(
                (int(r[0]), int(r[1]))
                for r in conn.execute(select(cb.bucket_start, cb.seq).where(cb.bucket_start.in_(part)))
            )
            unsettled.update(
                int(b)
                for b in conn.execute(
                    select(me.bucket_start)
                    .where(me.state.in_(sorted(UNSETTLED_STATES)), me.bucket_start.in_(part))
                    .distinct()
                ).scalars()
            )
        edge = int(
            conn.execute(select(parity_state.c.value).where(parity_state.c.name == EDGE_UPTO)).scalar_one_or_none() or 0
        )
        out: dict[int, str | None] = {}
        for b, top in tops.items():
            if b not in cursors:
                out[b] = NOT_CLOSED
            elif top > cursors[b]:
                out[b] = NOT_AGGREGATED
            elif b in unsettled:
                out[b] = UNSETTLED_ROWS
            elif top > edge:
                out[b] = PARITY_BEHIND
            else:
                out[b] = None
        return out

    def _samples_bytes_per_row(self, conn: Connection) -> float:
        """Bytes of the tick table (with its index) per stored tick."""
        size = next((t for t in self._sizes(conn, [tick_batches.name]) if t.name == tick_batches.name), None)
        ticks = conn.execute(select(func.coalesce(func.sum(tick_batches.c.ticks), 0))).scalar_one()
        return size.bytes / int(ticks) if size and ticks else 0.0

    def sizes(self) -> list[TableSize]:
        """Rows and bytes (with indexes) of every ledger table, largest first.

        SQLite: exact row counts and each table's and index's pages (the ``dbstat`` table; it reads every
        page, so it takes a while on a large file); pages retention freed are reused by later inserts, the file
        keeps its size. PostgreSQL: ``pg_total_relation_size`` (heap, indexes, TOAST) and the planner's row
        estimate; space retention freed is reused once (auto)vacuum has passed.
        """
        with self.engine.connect() as conn:
            return sorted(self._sizes(conn, sorted(metadata.tables)), key=lambda t: (-t.bytes, t.name))

    def _sizes(self, conn: Connection, names: Iterable[str]) -> list[TableSize]:
        wanted = list(names)
        out: list[TableSize] = []
        if self._dialect == "sqlite":
            owner = {
                str(r[0]): str(r[1])
                for r in conn.exec_driver_sql(
                    "SELECT name, tbl_name FROM sqlite_master WHERE type IN ('table', 'index')"
                )
            }
            pages: dict[str, int] = {}
            btrees = [n for n, t in owner.items() if t in wanted]
            marks = ", ".join("?" * len(btrees))
            try:
                for name, size in conn.exec_driver_sql(
                    f"SELECT name, SUM(pgsize) FROM dbstat WHERE name IN ({marks}) GROUP BY name",  # noqa: S608
                    tuple(btrees),
                ):
                    table = owner.get(str(name), str(name))
                    pages[table] = pages.get(table, 0) + int(size)
            except DBAPIError as exc:  # an SQLite built without the dbstat table: rows only
                log.warning("ledger sizes: SQLite has no dbstat table (%s); bytes are not shown", exc.orig)
            for t in wanted:
                if t not in owner:
                    continue
                rows = int(conn.execute(text(f'SELECT count(*) FROM "{t}"')).scalar_one())  # noqa: S608 - metadata names
                out.append(TableSize(t, rows, pages.get(t, 0)))
            return out
        for t in wanted:
            r = conn.execute(
                text("SELECT pg_total_relation_size(c.oid), c.reltuples FROM pg_class c WHERE c.oid = to_regclass(:t)"),
                {"t": t},
            ).first()
            if r is None:
                continue
            out.append(TableSize(t, max(0, int(r[1])), int(r[0]), estimated=True))
        return out

    # ------------------------------------------------------------------ the compaction

    def compact(
        self,
        now_ms: int,
        days: int,
        *,
        parity: ParityStore | None = None,
        stop: Callable[[], bool] | None = None,
    ) -> CompactResult:
        """Retire every bucket :meth:`plan` finds, in bounded transactions. ``days`` 0 does nothing.

        In order:
          0. (``parity`` given) add every sample to the parity edge sums first (``advance_edge``), so that no
             sample is dropped before it is summed there; a bucket holding unsummed samples is kept;
          1. plan without a lock (:meth:`plan`);
          2. one short transaction: take the horizon lock exclusively (PostgreSQL advisory lock, which waits
             for every ingest transaction that read the old horizon; SQLite: the write lock), check each
             planned bucket again (closed, highest ``seq`` at or below its cursor and below the parity edge
             cursor, no unsettled row), move the dedup horizon to the end of the newest bucket that passed
             (never backwards), commit. From then on no tick of those buckets can be written again;
          3. per bucket, delete its tick batches (whole ones, about ``chunk_rows`` ticks at a time), each
             chunk one transaction with its counters (``retention.samples_deleted``,
             ``retention.buckets_dropped``), pausing between chunks;
          4. delete the cell intervals that ended before every kept and every future sample could need them
             (ended more than the largest zombie slack before the older of the horizon and the oldest bucket
             still holding samples; the earliest interval of each sandbox stays: it says the sandbox had
             started), in chunks.
        A crash after 2 leaves the horizon moved and some samples of its buckets in place: they can no longer
        be written again nor read by a replay (it compares from the horizon on), and the next run deletes
        them. A crash inside 3 or 4 loses nothing: each chunk commits with its counters. ``stop`` is asked
        between chunks: when it says so, the run ends early (``complete`` False) and the next one goes on.
        """
        t0 = time.perf_counter()
        if parity is not None and days > 0:
            parity.advance_edge()
        plan = self.plan(now_ms, days)
        result = CompactResult(plan=plan, horizon_s=plan.horizon_s)
        if plan.retire:
            caps = self._move_horizon(plan, result)
            result.transactions += 1
            for b, cap in sorted(caps.items()):
                if not self._drop_bucket(b, cap, result, stop):
                    result.complete = False
                    break
        if days > 0 and result.complete:
            result.complete = self._drop_intervals(result, stop)
        result.seconds = time.perf_counter() - t0
        if result.samples or result.intervals:
            log.info(
                "retention: dropped %d sample(s) of %d bucket(s) and %d cell interval(s) in %d transaction(s), "
                "%.1f s; dedup horizon %d%s",
                result.samples,
                result.buckets,
                result.intervals,
                result.transactions,
                result.seconds,
                result.horizon_s,
                "" if result.complete else " (stopped early; the next run goes on)",
            )
        return result

    def _lock_horizon(self, conn: Connection) -> None:
        if self._dialect == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADVISORY_LOCK_RETENTION})

    def _move_horizon(self, plan: RetentionPlan, result: CompactResult) -> dict[int, int]:
        """Step 2 of :meth:`compact`: the buckets that still pass, each with its highest ``seq``."""
        tb = tick_batches.c
        with self._w.begin() as conn:
            self._lock_horizon(conn)
            tops: dict[int, int] = {}
            for b in sorted(plan.retire):
                top = conn.execute(select(func.max(tb.seq)).where(tb.bucket_start == b)).scalar_one_or_none()
                if top is not None:
                    tops[b] = int(top)
            verdicts = self._verdicts(conn, tops)
            caps = {b: tops[b] for b, why in verdicts.items() if why is None}
            old = read_dedup_horizon(conn)
            new = max([old, *(bucket_end(b, self.bucket_seconds) for b in caps)])
            if new > old:
                stmt = self._insert(counters).values(name=DEDUP_HORIZON, value=new)
                conn.execute(stmt.on_conflict_do_update(index_elements=["name"], set_={"value": new}))
            result.horizon_s = new
        return caps

    def _drop_bucket(self, b: int, cap: int, result: CompactResult, stop: Callable[[], bool] | None) -> bool:
        """Step 3 of :meth:`compact` for one bucket; False if stopped before it was done."""
        tb = tick_batches.c
        chunk = select(tb.seq, tb.ticks).where(tb.bucket_start == b, tb.seq <= cap).order_by(tb.seq)
        while True:
            if stop is not None and stop():
                return False
            t = time.perf_counter()
            with self._w.begin() as conn:
                # Whole batches, up to about chunk_rows ticks a transaction (at least one batch).
                seqs: list[int] = []
                n = 0
                for seq, ticks in conn.execute(chunk.limit(self.chunk_rows)):
                    if seqs and n + int(ticks) > self.chunk_rows:
                        break
                    seqs.append(int(seq))
                    n += int(ticks)
                if seqs:
                    conn.execute(tick_batches.delete().where(tb.seq.in_(seqs)))
                left = conn.execute(select(func.count()).select_from(chunk.subquery())).scalar_one()
                done = not left
                self._bump_counters(
                    conn, {"retention.samples_deleted": n, "retention.buckets_dropped": 1 if done else 0}
                )
            result.samples += n
            result.transactions += 1
            self._pause(time.perf_counter() - t)
            if done:
                result.buckets += 1
                return True

    def _drop_intervals(self, result: CompactResult, stop: Callable[[], bool] | None) -> bool:
        """Step 4 of :meth:`compact`; False if stopped before it was done."""
        ci = cell_intervals.c
        tb = tick_batches.c
        while True:
            if stop is not None and stop():
                return False
            t = time.perf_counter()
            with self._w.begin() as conn:
                # No lock needed: the horizon only moves forwards, and nothing before it can be written.
                horizon = read_dedup_horizon(conn)
                if not horizon:
                    return True
                oldest = conn.execute(select(func.min(tb.bucket_start))).scalar_one_or_none()
                keep_from = (horizon if oldest is None else min(horizon, int(oldest))) * 1000
                a, b = cell_intervals.alias("a"), cell_intervals.alias("b")
                first = select(func.min(b.c.started_ms)).where(b.c.sandbox_id == a.c.sandbox_id).scalar_subquery()
                ids = (
                    select(a.c.id)
                    .where(
                        a.c.ended_ms.is_not(None),
                        a.c.ended_ms < keep_from - MAX_ZOMBIE_SLACK_MS,
                        a.c.started_ms > first,
                    )
                    .limit(self.chunk_rows)
                )
                n = conn.execute(cell_intervals.delete().where(ci.id.in_(ids))).rowcount
                self._bump_counters(conn, {"retention.intervals_deleted": n})
            result.intervals += n
            result.transactions += 1
            self._pause(time.perf_counter() - t)
            if n < self.chunk_rows:
                return True

    def vacuum(self) -> None:
        """PostgreSQL: a plain ``VACUUM (ANALYZE)`` of the tables compaction deletes from, so that their space is
        reused now rather than when autovacuum next passes (online: it takes no lock that stops ingest, but it
        reads every index of the table). SQLite: nothing; freed pages are reused by later inserts, and only an
        offline ``VACUUM`` would give them back to the file system."""
        if self._dialect != "postgresql":
            return
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.exec_driver_sql(f"VACUUM (ANALYZE) {tick_batches.name}, {cell_intervals.name}")

    def _pause(self, took: float) -> None:
        if self.pause_ratio > 0:
            self._sleep(took * self.pause_ratio)
