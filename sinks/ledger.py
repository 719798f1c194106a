"""The SQL ledger: usage samples (dedup by tick id), org policy history, the meter-row outbox.

Every write here is one database transaction; each function's docstring gives the order of its
side effects and what a crash between two of them does. The tables are in :mod:`sinks.schema`.

Concurrency: SQLite serialises writers; on PostgreSQL the closer takes a transaction-scoped
advisory lock so that two workers can never close at once, plus a short SHARE lock on
``usage_samples`` so that no sample below the insertion ``seq`` it reads can still be uncommitted.
Ingest only inserts; samples are never updated (see :meth:`Ledger.close`).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final, NamedTuple

from sqlalchemy import Connection, Engine, and_, case, func, insert, literal, select, text, update
from sqlalchemy.dialects import postgresql, sqlite

from models.billing import (
    STRIPE_MAX_AGE_SECONDS,
    BillingMode,
    RowState,
    carry_rounded_delta,
    format_value,
    meter_amounts,
    meter_row_id,
    meter_unit_divisor,
    round_value,
)
from models.errors import LedgerError
from models.policy import OrgPolicy, PolicyHistory
from models.ticks import Tick
from models.watermark import PartitionState
from sinks.schema import (
    close_runs,
    closed_buckets,
    counters,
    meter_events,
    meter_totals,
    org_policies,
    partition_progress,
    unbilled_usage,
    usage_samples,
)

__all__ = [
    "CloseConfig",
    "CloseResult",
    "IngestResult",
    "Ledger",
    "MeterRow",
    "SourcedTick",
    "SqlStore",
    "not_aggregated",
    "policy_from_row",
    "read_partition_states",
]

log = logging.getLogger(__name__)

Clock = Callable[[], int]  # unix milliseconds


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class SourcedTick(NamedTuple):
    """A tick and where it was read (one per tick on the ingest hot path: a NamedTuple, cheap to build)."""

    tick: Tick
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class IngestResult:
    inserted: int
    duplicates: int


@dataclass(frozen=True, slots=True)
class CloseConfig:
    bucket_seconds: int
    grace_seconds: int
    shadow: bool
    bill_from: int


@dataclass(slots=True)
class CloseResult:
    close_id: int | None = None
    last_bucket: int | None = None
    samples: int = 0
    rows: int = 0
    corrections: int = 0
    buckets: list[int] = field(default_factory=list)
    unbilled: dict[str, int] = field(default_factory=dict)


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


_ADVISORY_LOCK_CLOSER = 0x6564676562696C  # "edgebil"


def not_aggregated() -> Any:
    """SQL condition: the sample is not yet in any meter row (its bucket's cursor is below its ``seq``)."""
    cb = closed_buckets.c
    us = usage_samples.c
    cursor = select(cb.seq).where(cb.bucket_start == us.bucket_start).scalar_subquery()
    return us.seq > func.coalesce(cursor, 0)


ZOMBIE_SLACK_MS = 5_000  # beyond the tick's own interval: clock jitter between worker and cell


def _zombie_expr() -> Any:
    """1 when a sample is a zombie tick (seed #365, in event time), else 0. Used inside the close claim.

    A tick of sandbox S from worker W at time t is a zombie when the cell side knows S had started by t
    (some interval of S starts at or before t) and yet no interval of S owned by W covers t — either
    another worker owned S then, or every interval of S had ended before t (a terminal sandbox). A tick
    covers ``(t - interval_s, t]``, so an interval counts as covering when ``started - (interval_s + slack)
    <= t <= ended + interval_s + slack``. Unknown ownership (no interval of S yet, or a tick without a
    worker id) is allowed, as in the seed.
    """
    from sinks.schema import cell_intervals

    us = usage_samples.c
    ci = cell_intervals.c
    slack = us.interval_s * 1000 + ZOMBIE_SLACK_MS
    known = select(literal(1)).where(ci.sandbox_id == us.sandbox_id, ci.started_ms <= us.ts_ms + slack).exists()
    owned = (
        select(literal(1))
        .where(
            ci.sandbox_id == us.sandbox_id,
            ci.worker_id == us.worker_id,
            ci.started_ms - slack <= us.ts_ms,
            (ci.ended_ms.is_(None)) | (us.ts_ms <= ci.ended_ms + slack),
        )
        .exists()
    )
    return case((and_(us.worker_id != "", known, ~owned), 1), else_=0)


_SAMPLE_COLUMNS: Final = (
    "id, org_id, sandbox_id, worker_id, cell_id, memory_mb, cpu_count, interval_s, ts_ms, bucket_start, "
    "src_partition, src_offset"
)
_SAMPLE_WIDTH: Final = 12


def _sqlite_insert_rows(dbapi: Any, cur: Any, rows: Sequence[tuple[Any, ...]]) -> int:
    """``INSERT OR IGNORE`` sample tuples into SQLite, up to 1,000 rows per statement; returns rows inserted.

    Why not ``executemany``: pysqlite releases the GIL around every row's ``sqlite3_step`` and must take it
    back before binding the next row. While the event loop is parsing the next batch (it holds the GIL
    for milliseconds at a time), each of those re-acquisitions waits for the interpreter's switch
    interval, so a batch written one row per step crawls (measured: 5.9 µs/row alone, hundreds of µs/row
    next to a busy thread). One statement per 1,000 rows binds in one go and releases the GIL once for
    the whole step: 3.1 µs/row alone, and it stays in the same range next to the parser.
    """
    per = max(1, min(1000, dbapi.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // _SAMPLE_WIDTH))
    one = "(" + ", ".join("?" * _SAMPLE_WIDTH) + ")"
    inserted = 0
    for i in range(0, len(rows), per):
        chunk = rows[i : i + per]
        values = ", ".join([one] * len(chunk))
        sql = f"INSERT OR IGNORE INTO usage_samples ({_SAMPLE_COLUMNS}) VALUES {values}"  # noqa: S608 - constants
        cur.execute(sql, [v for row in chunk for v in row])
        inserted += int(cur.rowcount)
    return inserted


def policy_from_row(r: Any) -> OrgPolicy:
    """An ``org_policies`` row as the :class:`OrgPolicy` it was stored from: the closer, replay and the parity
    refresher read policies through this one conversion (columns a query did not select read as None)."""
    m = r._mapping
    return OrgPolicy.model_validate(
        {
            "org_id": m["org_id"],
            "plan": m["plan"],
            "billing_mode": m["billing_mode"],
            "stripe_customer_id": m.get("stripe_customer_id"),
            "stripe_subscription_id": m.get("stripe_subscription_id"),
            "billing_provider": m["billing_provider"],
            "effective_at": m["effective_ms"] / 1000,
        }
    )


def read_partition_states(conn: Connection) -> list[PartitionState]:
    """Every row of ``partition_progress``, as the watermark functions take them."""
    return [
        PartitionState(
            topic=r.topic,
            partition=r.partition,
            committed_offset=r.committed_offset,
            max_event_ms=r.max_event_ms,
            highwater=r.highwater,
            reported_ms=r.reported_ms,
        )
        for r in conn.execute(select(partition_progress))
    ]


class SqlStore:
    """What every store over the ledger database shares: the engine, the write view, dialect-aware
    upserts, durable counters and partition progress. :class:`Ledger` and ``sinks.parity.ParityStore``."""

    def __init__(self, engine: Engine, *, clock: Clock = wall_clock_ms) -> None:
        self.engine = engine
        self._clock = clock
        self._dialect = engine.dialect.name
        if self._dialect not in ("sqlite", "postgresql"):
            raise LedgerError(f"unsupported database dialect {self._dialect!r}")
        # Writes go through this engine view: on SQLite it begins with BEGIN IMMEDIATE (sinks.schema).
        self._w = engine.execution_options(sqlite_write=True)

    # ------------------------------------------------------------------ helpers

    def _insert(self, table: Any) -> Any:
        return (sqlite.insert if self._dialect == "sqlite" else postgresql.insert)(table)

    def _bump_counters(self, conn: Connection, deltas: Mapping[str, int]) -> None:
        rows = [{"name": k, "value": v} for k, v in deltas.items() if v]
        if not rows:
            return
        stmt = self._insert(counters)
        conn.execute(
            stmt.on_conflict_do_update(index_elements=["name"], set_={"value": counters.c.value + stmt.excluded.value}),
            rows,
        )

    def _upsert_progress(self, conn: Connection, topic: str, progress: Mapping[int, tuple[int, int | None]]) -> None:
        """progress: partition -> (last offset written, newest event ms or None). Never moves backwards."""
        if not progress:
            return
        stmt = self._insert(partition_progress)
        ex = stmt.excluded
        pp = partition_progress.c
        stmt = stmt.on_conflict_do_update(
            index_elements=["topic", "partition"],
            set_={
                "committed_offset": case(
                    (ex.committed_offset > pp.committed_offset, ex.committed_offset),
                    else_=pp.committed_offset,
                ),
                "max_event_ms": case(
                    (pp.max_event_ms.is_(None), ex.max_event_ms),
                    (ex.max_event_ms > pp.max_event_ms, ex.max_event_ms),
                    else_=pp.max_event_ms,
                ),
            },
        )
        conn.execute(
            stmt,
            [
                {"topic": topic, "partition": p, "committed_offset": off, "max_event_ms": ev}
                for p, (off, ev) in progress.items()
            ],
        )


class Ledger(SqlStore):
    """All ledger reads and writes. One instance per process; thread-safe through the engine pool."""

    # ------------------------------------------------------------------ ingest

    def check_bucket_seconds(self, bucket_seconds: int) -> None:
        """Refuse to run with a bucket size other than the one this ledger was started with."""
        with self._w.begin() as conn:
            # Insert-if-absent first: two workers starting at once must not both try to create it.
            conn.execute(
                self._insert(counters)
                .values(name="config.bucket_seconds", value=bucket_seconds)
                .on_conflict_do_nothing(index_elements=["name"])
            )
            got = conn.execute(select(counters.c.value).where(counters.c.name == "config.bucket_seconds")).scalar_one()
            if got != bucket_seconds:
                raise LedgerError(
                    f"this ledger was built with EDGEBILL_BUCKET_SECONDS={got}; refusing to run with "
                    f"{bucket_seconds} (stored bucket starts would no longer line up)"
                )

    def write_ticks(
        self,
        topic: str,
        ticks: Sequence[SourcedTick],
        *,
        bucket_seconds: int,
        progress: Mapping[int, tuple[int, int | None]],
        counts: Mapping[str, int] | None = None,
    ) -> IngestResult:
        """Insert ticks (ignoring ids already present) and advance partition progress, atomically.

        One transaction, in this order: (1) INSERT samples ON CONFLICT(id) DO NOTHING; (2) upsert
        ``partition_progress`` (offset and newest event time, monotonic); (3) bump counters; commit.
        A crash before the commit writes nothing: the records are redelivered (their offsets were not
        committed to Kafka, which happens only after this returns) and inserted then. A crash after
        the commit but before the Kafka offset commit redelivers them too: their ids already exist,
        so they count as duplicates, not twice. The dedup and the aggregate input are the same row,
        so there is no window in which one is written without the other.
        """
        # The same id twice inside one batch: keep the first (the insert would ignore it anyway).
        unique: dict[str, tuple[Any, ...]] = {}
        for st in ticks:
            t = st.tick
            if t.id not in unique:
                unique[t.id] = (
                    t.id,
                    t.org_id,
                    t.sandbox_id,
                    t.worker_id,
                    t.cell_id,
                    t.memory_mb,
                    t.cpu_count,
                    t.interval_s,
                    t.ts_ms,
                    (t.ts_ms // 1000) // bucket_seconds * bucket_seconds,
                    st.partition,
                    st.offset,
                )
        inserted = 0
        with self._w.begin() as conn:
            if unique:
                inserted = self._insert_samples(conn, list(unique.values()))
            self._upsert_progress(conn, topic, progress)
            dup = len(ticks) - inserted
            all_counts = dict(counts or {})
            all_counts["ticks.ingested"] = all_counts.get("ticks.ingested", 0) + inserted
            all_counts["ticks.duplicate"] = all_counts.get("ticks.duplicate", 0) + dup
            self._bump_counters(conn, all_counts)
        return IngestResult(inserted=inserted, duplicates=len(ticks) - inserted)

    def _insert_samples(self, conn: Connection, rows: list[tuple[Any, ...]]) -> int:
        """Insert sample tuples, skipping ids already present; returns how many were new.

        The ingest hot path, on the DBAPI connection of ``conn`` (same transaction), without SQL
        compilation per batch: SQLite multi-row ``INSERT OR IGNORE … VALUES (…), (…), …`` (see
        :func:`_sqlite_insert_rows`; rowcount = rows inserted); PostgreSQL ``COPY`` into a
        transaction-local staging table, then one ``INSERT … SELECT … ON CONFLICT (id) DO NOTHING``
        (rowcount = rows inserted).
        """
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        cols = _SAMPLE_COLUMNS
        cur = dbapi.cursor()
        try:
            if self._dialect == "sqlite":
                return _sqlite_insert_rows(dbapi, cur, rows)
            cur.execute(
                "CREATE TEMP TABLE IF NOT EXISTS usage_samples_stage (id text, org_id text, sandbox_id text, "
                "worker_id text, cell_id text, memory_mb bigint, cpu_count int, interval_s int, ts_ms bigint, "
                "bucket_start bigint, src_partition int, src_offset bigint) ON COMMIT DELETE ROWS"
            )
            with cur.copy(f"COPY usage_samples_stage ({cols}) FROM STDIN") as copy:
                for r in rows:
                    copy.write_row(r)
            cur.execute(
                f"INSERT INTO usage_samples ({cols}) SELECT {cols} FROM usage_samples_stage "  # noqa: S608 - constants
                "ON CONFLICT (id) DO NOTHING"
            )
            inserted = int(cur.rowcount)
            cur.execute("DELETE FROM usage_samples_stage")
            return inserted
        finally:
            cur.close()

    def record_progress(
        self, topic: str, progress: Mapping[int, tuple[int, int | None]], counts: Mapping[str, int]
    ) -> None:
        """Advance progress for records that produced no sample (all rejected / ignored), with counters."""
        with self._w.begin() as conn:
            self._upsert_progress(conn, topic, progress)
            self._bump_counters(conn, counts)

    def write_policies(
        self,
        topic: str,
        policies: Sequence[tuple[OrgPolicy, int, int]],
        progress: Mapping[int, tuple[int, int | None]],
        counts: Mapping[str, int],
    ) -> None:
        """Upsert policy records ((org, effective_at) -> the later record wins) and advance progress.

        One transaction: (1) upsert ``org_policies``; (2) upsert progress; (3) counters. A crash before
        the commit redelivers the records; applying one again is a no-op (same key, same values).
        """
        now = self._clock()
        with self._w.begin() as conn:
            for pol, part, off in policies:
                values = {
                    "org_id": pol.org_id,
                    "effective_ms": pol.effective_at_ms,
                    "plan": pol.plan.value,
                    "billing_mode": pol.billing_mode.value,
                    "stripe_customer_id": pol.stripe_customer_id,
                    "stripe_subscription_id": pol.stripe_subscription_id,
                    "billing_provider": pol.billing_provider,
                    "src_partition": part,
                    "src_offset": off,
                    "received_ms": now,
                }
                upd = {k: v for k, v in values.items() if k not in ("org_id", "effective_ms")}
                conn.execute(
                    self._insert(org_policies)
                    .values(**values)
                    .on_conflict_do_update(index_elements=["org_id", "effective_ms"], set_=upd)
                )
            self._upsert_progress(conn, topic, progress)
            self._bump_counters(conn, counts)

    def report_highwaters(self, topic: str, highwaters: Mapping[int, int], owner: str) -> None:
        """Record the log end of the partitions this worker owns (drives the caught-up test)."""
        if not highwaters:
            return
        now = self._clock()
        stmt = self._insert(partition_progress)
        stmt = stmt.on_conflict_do_update(
            index_elements=["topic", "partition"],
            set_={
                "highwater": stmt.excluded.highwater,
                "reported_ms": stmt.excluded.reported_ms,
                "owner": stmt.excluded.owner,
            },
        )
        with self._w.begin() as conn:
            conn.execute(
                stmt,
                [
                    {
                        "topic": topic,
                        "partition": p,
                        "committed_offset": -1,
                        "max_event_ms": None,
                        "highwater": hw,
                        "reported_ms": now,
                        "owner": owner,
                    }
                    for p, hw in highwaters.items()
                ],
            )

    def partition_states(self) -> list[PartitionState]:
        with self.engine.connect() as conn:
            return read_partition_states(conn)

    # ------------------------------------------------------------------ closing

    def _policy_histories(self, conn: Connection, orgs: Iterable[str]) -> dict[str, PolicyHistory]:
        wanted = set(orgs)
        found: dict[str, list[OrgPolicy]] = defaultdict(list)
        chunk: list[str] = []
        ordered = sorted(wanted)
        for i in range(0, len(ordered), 500):
            chunk = ordered[i : i + 500]
            for r in conn.execute(select(org_policies).where(org_policies.c.org_id.in_(chunk))):
                found[r.org_id].append(policy_from_row(r))
        return {org: PolicyHistory(pols) for org, pols in found.items()}

    def close(self, watermark_ms: int, cfg: CloseConfig) -> CloseResult:
        """Close every bucket the watermark allows, and turn late samples into corrections.

        Samples are never rewritten: a bucket's cursor (``closed_buckets.seq``) says up to which insertion
        ``seq`` its samples are aggregated, and the last close run (``upto_seq``, ``last_bucket``) says that
        every sample with ``seq <= upto_seq`` in a bucket ``<= last_bucket`` is. One transaction, in order:
          1. take the closer lock and stop ingest for the moment (SQLite: BEGIN IMMEDIATE, the only writer;
             PostgreSQL: an advisory lock, then ``LOCK TABLE usage_samples IN SHARE MODE``, which waits for
             in-flight ingest transactions, so no sample below the ``seq`` read next can still appear);
          2. read ``S = max(seq)``; the buckets to work on: those ``<= last closable`` holding samples
             with ``seq`` above the previous run's ``upto_seq``, and those newly closable;
          3. insert the ``close_runs`` row (``upto_seq = S``, ``last_bucket``) -> ``close_id``;
          4. per bucket, aggregate exactly its samples with ``cursor < seq <= S`` per (org, memory size), set
             zombie ticks aside (:func:`_zombie_expr`), price the rest with the policy in effect at each
             tick's time (buckets with a policy change are priced per tick);
          5. per (org, bucket, meter): the next revision (0, or r{n} when the bucket already has rows),
             the value through the rounding carry in ``meter_totals``, the state (pending / shadow /
             skipped_before_bill_from / expired), insert the row; non-billable usage (unknown org, free
             plan, legacy size outside the tiers, zombie) into ``unbilled_usage`` with its reason;
          6. move each bucket's cursor to ``S``; counters; commit.
        A crash anywhere before the commit changes nothing: the next run does the same work again. After
        the commit every sample up to ``S`` of those buckets is in exactly one row set — aggregated once,
        never skipped — and rows are never rewritten, so an identifier can never reach Stripe with two values.
        """
        from models.watermark import last_closable_bucket

        result = CloseResult()
        last = last_closable_bucket(watermark_ms, cfg.bucket_seconds, cfg.grace_seconds)
        result.last_bucket = last
        if last is None:
            return result
        with self.engine.connect() as probe:
            if not self._close_work(probe, last):
                return result
        now = self._clock()
        with self._w.begin() as conn:
            if self._dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_LOCK_CLOSER})
                conn.execute(text("LOCK TABLE usage_samples IN SHARE MODE"))
            self._close_in_tx(conn, now, watermark_ms, last, cfg, result)
        if result.rows or result.samples:
            log.info(
                "close run %s: buckets<=%s aggregated %d samples -> %d rows (%d corrections); unbilled %s",
                result.close_id,
                last,
                result.samples,
                result.rows,
                result.corrections,
                result.unbilled or "{}",
            )
        return result

    @staticmethod
    def _close_position(conn: Connection) -> tuple[int, int | None]:
        """(upto_seq, last_bucket) of the last close run: every sample at or below it, in a bucket at or
        before it, is aggregated."""
        row = conn.execute(
            select(close_runs.c.upto_seq, close_runs.c.last_bucket).order_by(close_runs.c.id.desc()).limit(1)
        ).first()
        return (int(row.upto_seq), row.last_bucket) if row else (0, None)

    def _close_buckets(self, conn: Connection, last: int, upto: int | None = None) -> list[int]:
        """Buckets ``<= last`` with samples not yet aggregated (below ``upto`` when given)."""
        us = usage_samples.c
        done_seq, done_bucket = self._close_position(conn)
        fresh = select(us.bucket_start).where(us.seq > done_seq, us.bucket_start <= last)
        if upto is not None:
            fresh = fresh.where(us.seq <= upto)
        found = {int(b) for b in conn.execute(fresh.distinct()).scalars()}
        newly = select(us.bucket_start).where(us.bucket_start <= last, us.seq <= done_seq)
        if done_bucket is not None:
            newly = newly.where(us.bucket_start > done_bucket)
        found.update(int(b) for b in conn.execute(newly.distinct()).scalars())
        return sorted(found)

    def _close_work(self, conn: Connection, last: int) -> bool:
        return bool(self._close_buckets(conn, last))

    def _close_in_tx(
        self, conn: Connection, now: int, watermark_ms: int, last: int, cfg: CloseConfig, result: CloseResult
    ) -> None:
        us = usage_samples.c
        top = conn.execute(select(func.max(us.seq))).scalar_one_or_none() or 0
        buckets = self._close_buckets(conn, last, upto=top)
        done_seq, done_bucket = self._close_position(conn)
        cid = conn.execute(
            insert(close_runs)
            .values(
                started_ms=now,
                watermark_ms=watermark_ms,
                samples=0,
                rows=0,
                upto_seq=max(top, done_seq),
                last_bucket=last if done_bucket is None else max(last, done_bucket),
            )
            .returning(close_runs.c.id)
        ).scalar_one()
        result.close_id = cid
        if not buckets:
            return
        cb = closed_buckets.c
        cursors = {
            int(r.bucket_start): int(r.seq)
            for r in conn.execute(select(cb.bucket_start, cb.seq).where(cb.bucket_start.in_(buckets)))
        }

        def pending(b: int) -> Any:
            return and_(us.bucket_start == b, us.seq > cursors.get(b, 0), us.seq <= top)

        zombie = _zombie_expr().label("zombie")
        groups: list[Any] = []
        for b in buckets:
            groups.extend(
                conn.execute(
                    select(
                        us.org_id,
                        us.bucket_start,
                        us.memory_mb,
                        zombie,
                        func.count().label("n"),
                        func.sum(us.interval_s).label("secs"),
                        func.sum(us.memory_mb * us.interval_s).label("mbs"),
                    )
                    .where(pending(b))
                    .group_by(us.org_id, us.bucket_start, us.memory_mb, zombie)
                ).all()
            )
        claimed: int = sum((int(g.n) for g in groups), 0)
        result.samples = claimed
        histories = self._policy_histories(conn, {g.org_id for g in groups})
        size = cfg.bucket_seconds
        # (org, bucket, meter) -> [units, samples, mode];  (org, bucket, reason) -> [samples, mb_s]
        billable: dict[tuple[str, int, str], list[Any]] = {}
        unbilled: dict[tuple[str, int, str], list[int]] = defaultdict(lambda: [0, 0])
        split: set[tuple[str, int]] = set()
        for g in groups:
            if g.zombie:
                u = unbilled[(g.org_id, g.bucket_start, "zombie")]
                u[0] += int(g.n)
                u[1] += int(g.mbs or 0)
                continue
            hist = histories.get(g.org_id)
            if hist is not None and hist.change_points(g.bucket_start * 1000, (g.bucket_start + size) * 1000):
                split.add((g.org_id, g.bucket_start))
                continue
            pol = hist.as_of(g.bucket_start * 1000) if hist else None
            self._price(pol, g.org_id, g.bucket_start, g.memory_mb, g.n, g.secs, g.mbs, billable, unbilled)
        for org, bstart in sorted(split):
            hist = histories[org]
            for r in conn.execute(
                select(us.ts_ms, us.memory_mb, us.interval_s).where(
                    pending(bstart), us.org_id == org, _zombie_expr() == 0
                )
            ):
                pol = hist.as_of(r.ts_ms)
                self._price(
                    pol,
                    org,
                    bstart,
                    r.memory_mb,
                    1,
                    r.interval_s,
                    r.memory_mb * r.interval_s,
                    billable,
                    unbilled,
                )
        self._write_rows(
            conn,
            cid,
            now,
            [(org, b, m, u, n, mode) for (org, b, m), (u, n, mode) in sorted(billable.items())],
            cfg,
            result,
        )
        if unbilled:
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
                    for (o, b, reason), v in unbilled.items()
                ],
            )
            for (_, _, reason), v in unbilled.items():
                result.unbilled[reason] = result.unbilled.get(reason, 0) + v[0]
        result.buckets = buckets
        stmt = self._insert(closed_buckets)
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["bucket_start"], set_={"close_id": stmt.excluded.close_id, "seq": stmt.excluded.seq}
            ),
            [{"bucket_start": b, "closed_ms": now, "close_id": cid, "seq": top} for b in buckets],
        )
        conn.execute(update(close_runs).where(close_runs.c.id == cid).values(samples=claimed, rows=result.rows))
        self._bump_counters(
            conn,
            {
                "close.runs": 1,
                "close.samples": claimed,
                "close.rows": result.rows,
                "close.corrections": result.corrections,
                **{f"unbilled.{k}": v for k, v in result.unbilled.items()},
            },
        )

    @staticmethod
    def _price(
        pol: OrgPolicy | None,
        org: str,
        bstart: int,
        memory_mb: int,
        n: int,
        secs: int,
        mbs: int,
        billable: dict[tuple[str, int, str], list[Any]],
        unbilled: dict[tuple[str, int, str], list[int]],
    ) -> None:
        reason: str | None = None
        if pol is None:
            reason = "unknown_org"
        elif not pol.billable:
            reason = "free_plan" if pol.billing_provider == "stripe" else f"provider_{pol.billing_provider}"
        else:
            amount = meter_amounts(pol.billing_mode, int(memory_mb), int(secs), int(mbs))
            if amount is None:
                reason = "legacy_unknown_tier"
            else:
                key = (org, bstart, amount.meter)
                slot = billable.setdefault(key, [0, 0, pol.billing_mode])
                slot[0] += amount.units
                slot[1] += n
                return
        u = unbilled[(org, bstart, reason)]
        u[0] += int(n)
        u[1] += int(mbs)

    def _write_rows(
        self,
        conn: Connection,
        cid: int,
        now: int,
        items: list[tuple[str, int, str, int, int, BillingMode]],
        cfg: CloseConfig,
        result: CloseResult,
    ) -> None:
        """Write the meter rows of one close run: (org, bucket, meter, units, samples, mode), sorted.

        Set-based: the previous revisions of the buckets involved and the rounding carries of the orgs
        involved are read in a few queries, the rows are computed in order (per (org, meter) in bucket
        order, so the carry runs forwards), then inserted and the carries upserted with one executemany
        each. Part of the close transaction (see :meth:`close`).
        """
        if not items:
            return
        me = meter_events.c
        mt = meter_totals.c
        prev_rev: dict[tuple[str, int, str], int] = {}
        buckets = sorted({b for _, b, _, _, _, _ in items})
        for i in range(0, len(buckets), 500):
            for r in conn.execute(
                select(me.org_id, me.bucket_start, me.meter, func.max(me.revision).label("rev"))
                .where(me.bucket_start.in_(buckets[i : i + 500]))
                .group_by(me.org_id, me.bucket_start, me.meter)
            ):
                prev_rev[(r.org_id, r.bucket_start, r.meter)] = r.rev
        totals: dict[tuple[str, str, str], tuple[int, Decimal]] = {}
        orgs = sorted({o for o, _, _, _, _, _ in items})
        for i in range(0, len(orgs), 500):
            for r in conn.execute(select(meter_totals).where(mt.org_id.in_(orgs[i : i + 500]))):
                totals[(r.org_id, r.meter, r.stream)] = (r.units, Decimal(r.assigned))
        changed: set[tuple[str, str, str]] = set()
        rows: list[dict[str, Any]] = []
        horizon = now // 1000 - STRIPE_MAX_AGE_SECONDS + 300
        for org, bstart, meter, units, samples, mode in items:
            bend = bstart + cfg.bucket_seconds
            divisor = meter_unit_divisor(meter)
            if bstart < cfg.bill_from:
                state, stream = RowState.SKIPPED_BEFORE_BILL_FROM, None
            elif bend < horizon:
                state, stream = RowState.EXPIRED, None
            elif cfg.shadow:
                state, stream = RowState.SHADOW, "shadow"
            else:
                state, stream = RowState.PENDING, "billed"
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
            result.rows += 1
            if revision:
                result.corrections += 1
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
                        "org_id": o,
                        "meter": m,
                        "stream": st,
                        "units": totals[(o, m, st)][0],
                        "assigned": str(totals[(o, m, st)][1]),
                    }
                    for (o, m, st) in sorted(changed)
                ],
            )

    # ------------------------------------------------------------------ sending

    def sendable(self, limit: int, *, now_ms: int | None = None) -> list[MeterRow]:
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

    # ------------------------------------------------------------------ reading

    def counters(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {r.name: r.value for r in conn.execute(select(counters))}

    def rows(
        self, *, org: str | None = None, state: str | None = None, bucket: int | None = None
    ) -> list[dict[str, Any]]:
        q = select(meter_events).order_by(meter_events.c.org_id, meter_events.c.bucket_start, meter_events.c.id)
        if org:
            q = q.where(meter_events.c.org_id == org)
        if state:
            q = q.where(meter_events.c.state == state)
        if bucket is not None:
            q = q.where(meter_events.c.bucket_start == bucket)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def state_counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {
                r.state: r.n
                for r in conn.execute(
                    select(meter_events.c.state, func.count().label("n")).group_by(meter_events.c.state)
                )
            }

    def open_samples(self) -> int:
        """Samples not aggregated into meter rows yet (open buckets, and late samples of closed ones)."""
        us = usage_samples.c
        with self.engine.connect() as conn:
            done_seq, done_bucket = self._close_position(conn)
            fresh = conn.execute(select(func.count()).select_from(usage_samples).where(us.seq > done_seq)).scalar_one()
            older = select(func.count()).select_from(usage_samples).where(us.seq <= done_seq)
            if done_bucket is not None:
                older = older.where(us.bucket_start > done_bucket)
            return int(fresh) + int(conn.execute(older).scalar_one())

    def sample_totals(self) -> dict[str, tuple[int, int]]:
        """org -> (samples, MB-s) over every sample in the ledger."""
        us = usage_samples.c
        with self.engine.connect() as conn:
            return {
                r.org_id: (int(r.n), int(r.mbs or 0))
                for r in conn.execute(
                    select(
                        us.org_id,
                        func.count().label("n"),
                        func.sum(us.memory_mb * us.interval_s).label("mbs"),
                    ).group_by(us.org_id)
                )
            }

    def unbilled(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [
                dict(r._mapping)
                for r in conn.execute(
                    select(unbilled_usage).order_by(unbilled_usage.c.org_id, unbilled_usage.c.bucket_start)
                )
            ]

    def policies(self, org: str | None = None) -> list[dict[str, Any]]:
        q = select(org_policies).order_by(org_policies.c.org_id, org_policies.c.effective_ms)
        if org:
            q = q.where(org_policies.c.org_id == org)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    # ---- Stripe reconciliation (issue C)

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
        """
        import re

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
        with self._w.begin() as conn:
            conn.exec_driver_sql(sql, params)
            self._bump_counters(conn, counts)
