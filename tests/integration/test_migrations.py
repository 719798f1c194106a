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


def test_0010_turns_samples_into_batches_and_keeps_every_cursor(db_url: str) -> None:
    """A row-per-tick ledger with a retired bucket (retention ran: horizon moved, its samples gone), a closed
    bucket with late samples above its cursor (to become a correction) and a parity edge cursor between them,
    and an open bucket: after 0010 every tick is stored once, exactly the unaggregated ones close, dedup and
    the horizon hold, and the reads replay compares against give every carried tick."""
    from sqlalchemy import text

    from models.billing import bucket_end, meter_row_id
    from models.policy import OrgPolicy
    from models.pricing import Priced, price_usage
    from models.ticks import SourcedTick, Tick
    from sinks.ledger import CloseConfig, Ledger
    from sinks.parity import ParityStore

    h, b0 = 3600, 1_790_000_000 // 3600 * 3600
    b1, b2 = b0 + h, b0 + 2 * h  # b0 retired, b1 closed (with late samples), b2 open
    pol = OrgPolicy.model_validate({"org_id": "o", "plan": "pro", "effective_at": 0})
    price = price_usage(pol, 1024, 20, 1024 * 20)
    assert isinstance(price, Priced)
    engine = make_engine(db_url)
    try:
        migrate(engine, "0009")
        cols = (
            "seq, id, org_id, sandbox_id, worker_id, cell_id, memory_mb, cpu_count, interval_s, ts_ms, "
            "bucket_start, src_partition, src_offset"
        )
        # seq 1-3: b1, closed at cursor 3 (one row of 3 samples); 4-5: b2 (open); 6-7: b1 again (late);
        # 8: b2. The parity edge summed up to seq 5.
        layout = [(1, b1), (2, b1), (3, b1), (4, b2), (5, b2), (6, b1), (7, b1), (8, b2)]
        with engine.begin() as conn:
            for seq, b in layout:
                conn.execute(
                    text(
                        f"INSERT INTO usage_samples ({cols}) VALUES (:seq, :id, 'o', 'sb', 'w', 'c', 1024, 1, 20, "
                        ":ts, :b, :p, :off)"
                    ),
                    {"seq": seq, "id": f"t{seq}", "ts": (b + 60 * seq) * 1000, "b": b, "p": seq % 2, "off": seq},
                )
            conn.execute(
                text(
                    "INSERT INTO close_runs (started_ms, watermark_ms, samples, rows, upto_seq, last_bucket) "
                    "VALUES (0, 0, 3, 1, 3, :b)"
                ),
                {"b": b1},
            )
            for b, seq in ((b0, 0), (b1, 3)):
                conn.execute(
                    text(
                        "INSERT INTO closed_buckets (bucket_start, closed_ms, close_id, seq, decision) "
                        "VALUES (:b, 0, 1, :seq, 'shadow')"
                    ),
                    {"b": b, "seq": seq},
                )
            conn.execute(
                text(
                    "INSERT INTO meter_events (id, org_id, bucket_start, bucket_end, meter, revision, billing_mode, "
                    "value, units, samples, state, close_id, created_ms, updated_ms, attempts) VALUES "
                    "(:id, 'o', :b, :e, :m, 0, :mode, '1', :u, 3, 'shadow', 1, 0, 0, 0)"
                ),
                {
                    "id": meter_row_id("o", b1, price.meter, 0),
                    "b": b1,
                    "e": bucket_end(b1, h),
                    "m": price.meter,
                    "mode": price.mode.value,
                    "u": 3 * price.units,
                },
            )
            conn.execute(text("INSERT INTO counters (name, value) VALUES ('retention.horizon_s', :v)"), {"v": b1})
            conn.execute(text("INSERT INTO counters (name, value) VALUES ('config.bucket_seconds', :v)"), {"v": h})
            conn.execute(text("INSERT INTO parity_state (name, value) VALUES ('edge_upto_seq', 5)"))
        migrate(engine)
        led = Ledger(engine, clock=lambda: (b0 + 6 * h) * 1000)
        assert led.stored_ticks() == 8
        assert led.open_samples() == 5  # the two late samples of b1 and the three of b2
        assert led.sample_ids(b0, b2) == {f"t{seq}" for seq, _ in layout}
        assert sorted(led.sample_sources(b1, b1)) == [(f"t{s}", s % 2, s) for s in (1, 2, 3, 6, 7)]
        # the parity edge cursor still covers exactly seq 1-5: advancing adds the other three once
        parity = ParityStore(engine, bucket_seconds=h)
        parity.advance_edge()
        with engine.connect() as conn:
            edge = dict(conn.execute(text("SELECT bucket_start, samples FROM parity_edge")).all())
        assert edge == {b1: 2, b2: 1}  # the fixture's kept sums are empty: only seq 6-8 are added, once
        led.write_policies("org-policy", [(pol, 0, 0)], {0: (0, None)}, {})
        # dedup across the upgrade: a redelivered carried tick is a duplicate; a tick before the horizon too old
        again = SourcedTick(Tick("t7", "o", "sb", "w", "c", 1024, 1, 20, (b1 + 420) * 1000), 1, 7)
        old = SourcedTick(Tick("x", "o", "sb", "w", "c", 1024, 1, 20, (b0 + 1) * 1000), 0, 9)
        res = led.write_ticks("usage-ticks", [again, old], bucket_seconds=h, progress={})
        assert (res.inserted, res.duplicates, len(res.too_old)) == (0, 1, 1)
        run = led.close((b0 + 6 * h) * 1000, CloseConfig(h, 600, shadow=True, bill_from=0))
        assert run.samples == 5 and led.open_samples() == 0
        got = sorted((r["bucket_start"], r["revision"], r["units"]) for r in led.rows())
        assert got == [(b1, 0, 3 * price.units), (b1, 1, 2 * price.units), (b2, 0, 3 * price.units)]
    finally:
        engine.dispose()
