"""The ledger's read methods that replay, the benchmarks and the commands use instead of its tables."""

from __future__ import annotations

from decimal import Decimal

import pytest

from models.billing import UNIFIED_METER
from models.policy import OrgPolicy
from models.ticks import Tick
from sinks.ledger import CloseConfig, Ledger, SourcedTick
from sinks.schema import cell_intervals, make_engine, migrate

pytestmark = pytest.mark.integration

H = 3600
B0 = 1_790_000_000 // H * H
NOW_MS = (B0 + 5 * H) * 1000
LIVE = CloseConfig(bucket_seconds=H, grace_seconds=600, shadow=False, bill_from=0)


def _tick(tid: str, ts_s: int, partition: int = 0, offset: int = 0, mb: int = 1024) -> SourcedTick:
    return SourcedTick(Tick(tid, "o", "sb", "w", "c1", mb, 2, 20, ts_s * 1000), partition, offset)


def test_reads_for_replay_and_commands(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        assert not Ledger(engine).has_schema()
        migrate(engine)
        led = Ledger(engine, clock=lambda: NOW_MS)
        assert led.has_schema()
        assert led.stored_bucket_seconds() is None
        led.check_bucket_seconds(H)
        assert led.stored_bucket_seconds() == H

        pols = [
            OrgPolicy.model_validate({"org_id": "o", "plan": "pro", "effective_at": 0}),
            OrgPolicy.model_validate({"org_id": "o", "plan": "free", "effective_at": B0 + 7200}),
            OrgPolicy.model_validate({"org_id": "p", "plan": "pro", "stripe_customer_id": "cus_p", "effective_at": 5}),
        ]
        led.write_policies("org-policy", [(p, 0, i) for i, p in enumerate(pols)], {}, {})
        assert led.policies_by_org() == {"o": pols[:2], "p": pols[2:]}

        with engine.begin() as conn:
            spans = [("sb", B0 * 1000, None), ("sb2", (B0 + H) * 1000, (B0 + 2 * H) * 1000)]
            for i, (sb, started, ended) in enumerate(spans):
                conn.execute(
                    cell_intervals.insert().values(
                        id=f"i{i}",
                        sandbox_id=sb,
                        org_id="o",
                        cell_id="c",
                        worker_id="w",
                        memory_mb=1024,
                        cpu_percent=100,
                        disk_mb=0,
                        started_ms=started,
                        ended_ms=ended,
                        src_partition=0,
                        src_offset=i,
                        updated_ms=0,
                    )
                )
        assert sorted(led.ownership_intervals()) == [
            ("sb", "w", B0 * 1000, None),
            ("sb2", "w", (B0 + H) * 1000, (B0 + 2 * H) * 1000),
        ]
        assert led.ownership_intervals(started_by_ms=(B0 + H) * 1000 - 1) == [("sb", "w", B0 * 1000, None)]

        # An id holding a control character comes back from its batch as it went in.
        odd = "odd\x01id"
        led.write_ticks(
            "usage-ticks",
            [_tick("a", B0 + 10, 0, 1), _tick(odd, B0 + 20, 1, 7), _tick("b", B0 + H + 5, 2, 3)],
            bucket_seconds=H,
            progress={},
        )
        assert led.sample_ids(B0, B0 + H) == {"a", odd, "b"}
        assert led.sample_ids(B0, B0) == {"a", odd}
        assert led.sample_ids(B0, B0 + H, lo_ms=(B0 + 15) * 1000, hi_ms=(B0 + H + 5) * 1000) == {odd}
        assert sorted(led.sample_sources(B0, B0 + H)) == sorted([("a", 0, 1), (odd, 1, 7), ("b", 2, 3)])

        assert led.close(NOW_MS, LIVE).samples == 3
        billed = led.billed_by_key(B0, B0 + H)
        assert billed == {
            ("o", B0, UNIFIED_METER): (2 * 20 * 1024, Decimal(40)),
            ("o", B0 + H, UNIFIED_METER): (20 * 1024, Decimal(20)),
        }
        assert led.open_ticks(B0, B0 + H) == []
        led.write_ticks("usage-ticks", [_tick("late", B0 + 30, 3, 9)], bucket_seconds=H, progress={})
        assert led.open_ticks(B0, B0 + H) == [Tick("late", "o", "sb", "w", "c1", 1024, 2, 20, (B0 + 30) * 1000)]
        assert led.open_ticks(B0 + H, B0 + H) == []
        assert led.billed_by_key(B0, B0 + H) == billed
    finally:
        engine.dispose()


def test_dispose_keeps_the_store_usable(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    migrate(engine)
    led = Ledger(engine)
    led.dispose()
    assert led.counters() == {}
    led.dispose()
