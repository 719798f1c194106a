"""The zombie rule has two forms: Python (``models.zombie.is_zombie``, replay's) and SQL (the closer's
``zombie_expr``). One table of cases runs through both, the SQL form on SQLite and on PostgreSQL against
the same rows; each must give the expected answer for every case."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from zombie_cases import CASES, INTERVALS

from models.ticks import Tick
from models.zombie import is_zombie, ownership_by_sandbox
from sinks.ledger import Ledger, SourcedTick, zombie_expr
from sinks.schema import cell_intervals, make_engine, migrate, usage_samples

pytestmark = pytest.mark.integration


def test_python_and_sql_forms_agree_on_one_table_of_cases(db_url: str) -> None:
    expected = {name: case[4] for name, case in CASES.items()}
    owners = ownership_by_sandbox(INTERVALS)
    python = {name: is_zombie(owners.get(sb), w, ts, secs) for name, (sb, w, ts, secs, _) in CASES.items()}
    assert python == expected

    engine = make_engine(db_url)
    try:
        migrate(engine)
        ledger = Ledger(engine)
        ticks = [
            SourcedTick(Tick(name, "o", sb, w, "c", 1024, 1, secs, ts), 0, i)
            for i, (name, (sb, w, ts, secs, _)) in enumerate(CASES.items())
        ]
        ledger.write_ticks("usage-ticks", ticks, bucket_seconds=3600, progress={})
        with engine.begin() as conn:
            conn.execute(
                cell_intervals.insert(),
                [
                    {
                        "id": f"i{i}",
                        "sandbox_id": sb,
                        "org_id": "o",
                        "cell_id": "c",
                        "worker_id": w,
                        "memory_mb": 1024,
                        "cpu_percent": 100,
                        "disk_mb": 0,
                        "started_ms": started,
                        "ended_ms": ended,
                        "src_partition": 0,
                        "src_offset": i,
                        "updated_ms": 0,
                    }
                    for i, (sb, w, started, ended) in enumerate(INTERVALS)
                ],
            )
        with engine.connect() as conn:
            rows = conn.execute(select(usage_samples.c.id, zombie_expr().label("zombie"))).all()
        sql = {r.id: bool(r.zombie) for r in rows}
    finally:
        engine.dispose()
    assert sql == expected
