"""``edgebill bench --only ledger_bytes``: what the ledger stores per ingested tick.

One end-to-end run of >= 1M ticks (arrays of 100, 1,000 orgs over three hours, every bucket closed) through a
real ``edgebill worker`` on SQLite, then on PostgreSQL when it answers on 127.0.0.1:5432. After the workers
have stopped:

* SQLite: the database file plus its write-ahead log after ``PRAGMA wal_checkpoint(TRUNCATE)`` (and both
  before the checkpoint), with each table's and index's share from the ``dbstat`` table;
* PostgreSQL: ``pg_total_relation_size`` (heap, indexes, TOAST) of every ledger table, summed.

Everything the ledger holds is counted (tick batches, closed rows, parity, counters, policies), divided by
the ticks ingested: the figure for ticks inside the dedup horizon. Then the same ledger is compacted as
retention would compact it once those ticks are past the horizon (``Retention.compact`` with the default
retention, at a clock ``DEFAULT_RETENTION_DAYS + 1`` days later), and the bytes still taken are measured:

* SQLite: the pages the ticks' table and its indexes still hold (``dbstat``) against before, and the pages
  in use in the whole file (the file keeps its size: freed pages are reused by later inserts);
* PostgreSQL: after two plain ``VACUUM`` passes (what autovacuum does), ``pg_total_relation_size`` of the
  ticks' table against before: the emptied heap is given back, emptied index pages stay allocated for reuse.

Quick mode ingests 100,000 ticks instead and says so (``"quick": true``): fixed costs then weigh more per tick.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from infra.devkit.bench import BenchContext, Metric, register
from infra.devkit.bench.pipeline import PgSchema, pg_base_url, run_e2e
from infra.devkit.stack import WorkerStack
from models.retention import DAY_SECONDS, DEFAULT_RETENTION_DAYS
from sinks.parity import ParityStore
from sinks.retention import Retention

SAMPLES = "tick_batches"

# Bytes per tick of the row-per-tick ledger this shape replaced (``make bench``, median of three, same
# workload), kept beside today's figure; and the goals for ticks as batches.
ROW_PER_TICK_BYTES = {"sqlite": 128.2, "postgresql": 246.8}
GOAL_BYTES = {"sqlite": 24, "postgresql": 40}

__all__ = ["sqlite_bytes", "sqlite_bytes_and_retention"]

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
    out: dict[str, Any] = {
        "db_bytes": after[0],
        "wal_bytes": after[1],
        "before_checkpoint_bytes": sum(before),
        "checkpoint_complete": not busy,
        "tables": tables,
        "ticks_ingested": run.ledger.counters().get("ticks.ingested", 0),
    }
    return out


def sqlite_bytes_and_retention(run: WorkerStack) -> dict[str, Any]:
    """:func:`sqlite_bytes`, then retention as it runs once every tick is past the horizon, and what is left."""
    out = sqlite_bytes(run)
    tables: dict[str, int] = out["tables"]
    path = Path(make_url(run.database_url).database or "")
    out["retention"] = _retire_all(run)
    with run.engine.connect() as c:
        c.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        left = {str(r[0]): int(r[1]) for r in c.exec_driver_sql("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name")}
        page = int(c.exec_driver_sql("PRAGMA page_size").scalar_one())
        in_use = (
            int(c.exec_driver_sql("PRAGMA page_count").scalar_one())
            - int(c.exec_driver_sql("PRAGMA freelist_count").scalar_one())
        ) * page
    out["retention"].update(
        samples_bytes_before=_samples_bytes(tables),
        samples_bytes_after=_samples_bytes(left),
        in_use_bytes_after=in_use,
        file_bytes_after=path.stat().st_size,
    )
    return out


def _pg_occupied(run: WorkerStack) -> int | None:
    """Bytes the ticks' table and its indexes hold in tuples (``table_len - free_space`` of the
    ``pgstattuple`` extension, created in the run's schema when it can be), or None without the extension."""
    from sqlalchemy.exc import DBAPIError

    rels = (
        "SELECT c.oid FROM pg_class c WHERE c.oid = to_regclass(%(t)s) UNION ALL "
        "SELECT i.indexrelid FROM pg_index i WHERE i.indrelid = to_regclass(%(t)s)"
    )
    try:
        with run.engine.begin() as c:
            c.exec_driver_sql("CREATE EXTENSION IF NOT EXISTS pgstattuple")
            schema = c.exec_driver_sql(
                "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
                "WHERE e.extname = 'pgstattuple'"
            ).scalar_one()
            total = 0
            for (oid,) in c.exec_driver_sql(rels, {"t": SAMPLES}).all():
                size, free = c.exec_driver_sql(
                    f'SELECT table_len, free_space FROM "{schema}".pgstattuple(%(o)s::regclass)',  # noqa: S608 - a catalog name
                    {"o": oid},
                ).one()
                total += int(size) - int(free)
            return total
    except DBAPIError as exc:
        log.info("ledger_bytes: no pgstattuple (%s): only allocated sizes are reported", exc.orig)
        return None


def _samples_bytes(tables: dict[str, int]) -> int:
    """The ticks' table and its indexes (SQLite names its indexes after the table or the constraint)."""
    return sum(v for k, v in tables.items() if SAMPLES in k)


def _retire_all(run: WorkerStack) -> dict[str, Any]:
    """Retention as it runs once every tick of the run is past the horizon: a clock that many days later."""
    size = run.ledger.stored_bucket_seconds() or 3600
    later_ms = (int(time.time()) + (DEFAULT_RETENTION_DAYS + 1) * DAY_SECONDS) * 1000
    ret = Retention(run.engine, bucket_seconds=size, pause_ratio=0)
    res = ret.compact(later_ms, DEFAULT_RETENTION_DAYS, parity=ParityStore(run.engine, bucket_seconds=size))
    return {
        "samples_deleted": res.samples,
        "buckets": res.buckets,
        "held": {k: len(v) for k, v in res.plan.held.items()},
        "seconds": round(res.seconds, 2),
        "samples_per_s": round(res.samples / res.seconds) if res.seconds else None,
        "transactions": res.transactions,
    }


def _per_tick(tables: dict[str, int], ticks: int) -> dict[str, float]:
    top = sorted(tables.items(), key=lambda kv: -kv[1])[:TOP_TABLES]
    return {name: round(size / ticks, 1) for name, size in top}


@register("ledger_bytes")
def bench_ledger_bytes(ctx: BenchContext) -> Iterator[Metric]:
    """Ledger bytes per ingested tick on SQLite (file + WAL after a checkpoint) and on PostgreSQL."""
    n = ctx.scale(1_000_000, 100_000)
    note = {"quick": True, "note": f"quick mode: {n:,} ticks, not the >= 1M this figure is defined on"}
    r = run_e2e(ctx, 100, n, inspect=sqlite_bytes_and_retention)
    s = r.extra
    ticks = s["ticks_ingested"] or n
    total = s["db_bytes"] + s["wal_bytes"]
    ret = s["retention"]
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
            "goal": f"<= {GOAL_BYTES['sqlite']}",
            "row_per_tick_ledger": ROW_PER_TICK_BYTES["sqlite"],
            **(note if ctx.quick else {}),
        },
    )
    yield Metric(
        "ledger_bytes_left_after_retention_sqlite",
        ret["samples_bytes_after"] / max(1, ret["samples_bytes_before"]),
        "share",
        None,
        {
            "goal": "<= 0.05 of the ticks' bytes",
            "ticks_bytes_before": ret["samples_bytes_before"],
            "ticks_bytes_after": ret["samples_bytes_after"],
            "in_use_bytes_per_tick_after": round(ret["in_use_bytes_after"] / ticks, 1),
            "file_bytes_after": ret["file_bytes_after"],
            **{k: v for k, v in ret.items() if not k.endswith("_after") and not k.endswith("_before")},
            **(note if ctx.quick else {}),
        },
    )
    base = pg_base_url()
    if base is None:
        yield Metric("ledger_bytes_postgresql_skipped", 0, "n/a", None, {"reason": "PostgreSQL not reachable"})
        return
    with PgSchema(base) as pg:

        def pg_bytes(run: WorkerStack) -> dict[str, Any]:
            before = pg.relation_bytes()
            held_before = _pg_occupied(run)
            ticks = run.ledger.counters().get("ticks.ingested", 0)
            retired = _retire_all(run)
            vac = Retention(run.engine, bucket_seconds=run.ledger.stored_bucket_seconds() or 3600)
            vac.vacuum()
            vac.vacuum()
            retired.update(
                samples_bytes_before=before.get(SAMPLES, 0),
                samples_bytes_after=pg.relation_bytes()[SAMPLES],
                occupied_bytes_before=held_before,
                occupied_bytes_after=_pg_occupied(run),
            )
            return {"tables": before, "ticks_ingested": ticks, "retention": retired}

        r = run_e2e(ctx, 100, n, db_url=pg.url, inspect=pg_bytes)
    tables: dict[str, int] = r.extra["tables"]
    ticks = r.extra["ticks_ingested"] or n
    pg_ret = r.extra["retention"]
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
            "goal": f"<= {GOAL_BYTES['postgresql']}",
            "row_per_tick_ledger": ROW_PER_TICK_BYTES["postgresql"],
            **(note if ctx.quick else {}),
        },
    )
    yield Metric(
        "ledger_bytes_left_after_retention_postgresql",
        pg_ret["samples_bytes_after"] / max(1, pg_ret["samples_bytes_before"]),
        "share",
        None,
        {
            "measure": "pg_total_relation_size of the ticks' table after two VACUUM passes: the heap is given "
            "back, emptied index pages stay allocated (reused by later inserts, not returned)",
            "ticks_bytes_before": pg_ret["samples_bytes_before"],
            "ticks_bytes_after": pg_ret["samples_bytes_after"],
            "occupied_share_after": None
            if not pg_ret["occupied_bytes_before"] or pg_ret["occupied_bytes_after"] is None
            else round(pg_ret["occupied_bytes_after"] / pg_ret["occupied_bytes_before"], 4),
            **{k: v for k, v in pg_ret.items() if not k.endswith("_after") and not k.endswith("_before")},
            **(note if ctx.quick else {}),
        },
    )
