"""What every store over the ledger database shares: the engine, the write view, dialect-aware upserts,
durable counters and partition progress, and the row conversions other stores read through."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import Connection, Engine, case, select, text
from sqlalchemy.dialects import postgresql, sqlite

from models.errors import LedgerError
from models.policy import OrgPolicy
from models.watermark import PartitionState
from sinks.schema import counters, partition_progress

__all__ = [
    "ADVISORY_LOCK_CLOSER",
    "ADVISORY_LOCK_RETENTION",
    "DEDUP_HORIZON",
    "Clock",
    "SqlStore",
    "policy_from_row",
    "read_dedup_horizon",
    "read_partition_states",
    "wall_clock_ms",
]

Clock = Callable[[], int]  # unix milliseconds

#: Transaction-scoped PostgreSQL advisory lock taken by the closer, and by every write that changes a
#: bucket's decision or its rows (a rollback, a release), so none of them interleaves with a close run.
ADVISORY_LOCK_CLOSER = 0x6564676562696C  # "edgebil"

#: PostgreSQL advisory lock over the dedup horizon: every ingest transaction holds it shared while it reads the
#: horizon and inserts; retention takes it exclusively to move the horizon, so once that commits no
#: transaction that read the old horizon is still writing.
ADVISORY_LOCK_RETENTION = 0x6564677265746E  # "edgretn"

#: ``counters`` row holding the dedup horizon (unix s; absent = 0, nothing dropped): see models.retention.
DEDUP_HORIZON = "retention.horizon_s"


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


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


def read_dedup_horizon(conn: Connection, *, shared_lock: bool = False) -> int:
    """The dedup horizon (unix s, 0 = none): ticks before it are refused (:mod:`models.retention`).

    ``shared_lock`` (inside a write transaction that will insert samples): on PostgreSQL, first take
    :data:`ADVISORY_LOCK_RETENTION` shared until commit, so that the horizon cannot move while this
    transaction writes below it. Read through the driver: this runs once per ingest batch.
    """
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None
    cur = dbapi.cursor()
    try:
        if conn.dialect.name == "postgresql":
            if shared_lock:
                cur.execute("SELECT pg_advisory_xact_lock_shared(%s)", (ADVISORY_LOCK_RETENTION,))
            cur.execute("SELECT value FROM counters WHERE name = %s", (DEDUP_HORIZON,))
        else:
            cur.execute("SELECT value FROM counters WHERE name = ?", (DEDUP_HORIZON,))
        row = cur.fetchone()
    finally:
        cur.close()
    return int(row[0]) if row else 0


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
    upserts, durable counters and partition progress. The parts of :class:`sinks.ledger.Ledger` and
    ``sinks.parity.ParityStore``."""

    def __init__(self, engine: Engine, *, clock: Clock = wall_clock_ms) -> None:
        self.engine = engine
        self._clock = clock
        self._dialect = engine.dialect.name
        if self._dialect not in ("sqlite", "postgresql"):
            raise LedgerError(f"unsupported database dialect {self._dialect!r}")
        # Writes go through this engine view: on SQLite it begins with BEGIN IMMEDIATE (sinks.schema).
        self._w = engine.execution_options(sqlite_write=True)
        # The driver's positional placeholder, for SQL sent past SQLAlchemy's compiler on hot paths.
        self._param = "%s" if self._dialect == "postgresql" else "?"

    def dispose(self) -> None:
        """Close the pooled connections (before a fork, or when done); the store stays usable."""
        self.engine.dispose()

    # ------------------------------------------------------------------ helpers

    def _insert(self, table: Any) -> Any:
        return (sqlite.insert if self._dialect == "sqlite" else postgresql.insert)(table)

    def _lock_closer(self, conn: Connection) -> None:
        """Inside a write transaction: wait for, then hold until commit, the closer's lock (PostgreSQL; on
        SQLite the write transaction itself is exclusive)."""
        if self._dialect == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": ADVISORY_LOCK_CLOSER})

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
