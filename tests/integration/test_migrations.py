"""The Alembic migrations build exactly the schema the code queries, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from sinks.schema import make_engine, metadata, migrate

pytestmark = pytest.mark.integration


def test_migrated_schema_matches_the_models(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        migrate(engine)
        migrate(engine)  # idempotent: a second start changes nothing
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diff == []
    finally:
        engine.dispose()


def test_0004_carries_samples_over_without_billing_anything_twice(db_url: str) -> None:
    """Samples claimed before the upgrade stay billed once; unclaimed ones are closed after it."""
    from sqlalchemy import text

    from models.policy import OrgPolicy
    from sinks.ledger import CloseConfig, Ledger

    h, b0 = 3600, 1_790_000_000 // 3600 * 3600
    engine = make_engine(db_url)
    try:
        migrate(engine, "0003")
        cols = (
            "id, org_id, sandbox_id, worker_id, cell_id, memory_mb, cpu_count, interval_s, ts_ms, bucket_start, "
            "src_partition, src_offset, close_id"
        )
        with engine.begin() as conn:
            for i, (bucket, close_id) in enumerate([(b0, 1), (b0, 1), (b0, None), (b0 + h, None)]):
                conn.execute(
                    text(
                        f"INSERT INTO usage_samples ({cols}) VALUES (:id, 'o', 'sb', 'w', 'c', 1024, 0, 20, :ts, "
                        ":b, 0, :i, :cid)"
                    ),
                    {"id": f"t{i}", "ts": (bucket + 10 + i) * 1000, "b": bucket, "i": i, "cid": close_id},
                )
            conn.execute(text("INSERT INTO close_runs (started_ms, watermark_ms, samples, rows) VALUES (0, 0, 2, 1)"))
            conn.execute(
                text("INSERT INTO closed_buckets (bucket_start, closed_ms, close_id) VALUES (:b, 0, 1)"), {"b": b0}
            )
        migrate(engine)
        led = Ledger(engine, clock=lambda: (b0 + 5 * h) * 1000)
        assert led.open_samples() == 2  # the two unclaimed samples
        pol = OrgPolicy.model_validate({"org_id": "o", "plan": "pro", "effective_at": 0})
        led.write_policies("org-policy", [(pol, 0, 0)], {0: (0, None)}, {})
        res = led.close((b0 + 5 * h) * 1000, CloseConfig(h, 600, shadow=True, bill_from=0))
        assert res.samples == 2 and led.open_samples() == 0
        assert sorted((r["bucket_start"], r["units"]) for r in led.rows()) == [(b0, 20480), (b0 + h, 20480)]
    finally:
        engine.dispose()
