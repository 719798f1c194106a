"""``edgebill bench --only ledger_bytes``: what the ledger stores per ingested tick.

One end-to-end run of >= 1M ticks (arrays of 100, 1,000 orgs over three hours, every bucket closed) through a
real ``edgebill worker`` on SQLite, then on PostgreSQL when it answers on 127.0.0.1:5432. After the workers
have stopped:

* SQLite: the database file plus its write-ahead log after ``PRAGMA wal_checkpoint(TRUNCATE)`` (and both
  before the checkpoint), with each table's and index's share from the ``dbstat`` table;
* PostgreSQL: ``pg_total_relation_size`` (heap, indexes, TOAST) of every ledger table, summed.

Everything the ledger holds is counted (samples, dedup, closed rows, parity, counters, policies), divided by
the ticks ingested. Today the ledger keeps every tick for ever, so the figure holds at any age. Quick mode
ingests 100,000 ticks instead and says so (``"quick": true``): fixed costs then weigh more per tick.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from infra.devkit.bench import BenchContext, Metric, register
from infra.devkit.bench.pipeline import PgSchema, pg_base_url, run_e2e
from infra.devkit.stack import WorkerStack

__all__ = ["sqlite_bytes"]

log = logging.getLogger(__name__)

TOP_TABLES = 12  # tables and indexes listed by their share, largest first


def sqlite_bytes(run: WorkerStack) -> dict[str, Any]:
    """Sizes of a stopped stack's SQLite ledger: file + WAL before and after a truncating checkpoint, and the
    bytes of each table and index (``dbstat``), largest first."""
    path = Path(make_url(run.database_url).database or "")
    wal = path.with_name(path.name + "-wal")

    def sizes() -> tuple[int, int]:
        return path.stat().st_size, wal.stat().st_size if wal.exists() else 0

    before = sizes()
    with run.engine.connect() as c:
        busy, _, _ = c.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)").one()
        tables = {str(r[0]): int(r[1]) for r in c.exec_driver_sql("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name")}
    after = sizes()
    return {
        "db_bytes": after[0],
        "wal_bytes": after[1],
        "before_checkpoint_bytes": sum(before),
        "checkpoint_complete": not busy,
        "tables": tables,
        "ticks_ingested": run.ledger.counters().get("ticks.ingested", 0),
    }


def _per_tick(tables: dict[str, int], ticks: int) -> dict[str, float]:
    top = sorted(tables.items(), key=lambda kv: -kv[1])[:TOP_TABLES]
    return {name: round(size / ticks, 1) for name, size in top}


@register("ledger_bytes")
def bench_ledger_bytes(ctx: BenchContext) -> Iterator[Metric]:
    """Ledger bytes per ingested tick on SQLite (file + WAL after a checkpoint) and on PostgreSQL."""
    n = ctx.scale(1_000_000, 100_000)
    note = {"quick": True, "note": f"quick mode: {n:,} ticks, not the >= 1M this figure is defined on"}
    r = run_e2e(ctx, 100, n, inspect=sqlite_bytes)
    s = r.extra
    ticks = s["ticks_ingested"] or n
    total = s["db_bytes"] + s["wal_bytes"]
    yield Metric(
        "ledger_bytes_per_tick_sqlite",
        total / ticks,
        "bytes/tick",
        None,
        {
            "ticks": ticks,
            "per_message": 100,
            "db_bytes": s["db_bytes"],
            "wal_bytes": s["wal_bytes"],
            "before_checkpoint_bytes_per_tick": round(s["before_checkpoint_bytes"] / ticks, 1),
            "checkpoint_complete": s["checkpoint_complete"],
            "bytes_per_tick_by_table": _per_tick(s["tables"], ticks),
            **(note if ctx.quick else {}),
        },
    )
    base = pg_base_url()
    if base is None:
        yield Metric("ledger_bytes_postgresql_skipped", 0, "n/a", None, {"reason": "PostgreSQL not reachable"})
        return
    with PgSchema(base) as pg:

        def pg_bytes(run: WorkerStack) -> dict[str, Any]:
            return {"tables": pg.relation_bytes(), "ticks_ingested": run.ledger.counters().get("ticks.ingested", 0)}

        r = run_e2e(ctx, 100, n, db_url=pg.url, inspect=pg_bytes)
    tables: dict[str, int] = r.extra["tables"]
    ticks = r.extra["ticks_ingested"] or n
    yield Metric(
        "ledger_bytes_per_tick_postgresql",
        sum(tables.values()) / ticks,
        "bytes/tick",
        None,
        {
            "ticks": ticks,
            "per_message": 100,
            "total_bytes": sum(tables.values()),
            "bytes_per_tick_by_table": _per_tick(tables, ticks),
            **(note if ctx.quick else {}),
        },
    )
