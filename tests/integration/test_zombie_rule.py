"""The zombie rule has one form (``models.zombie.is_zombie``), which replay and the closer both apply. One
table of cases runs through the rule itself and through the closer on SQLite and on PostgreSQL (each case a
tick of its own org, so the closer's unbilled usage names the cases it found zombie)."""

from __future__ import annotations

import pytest
from zombie_cases import CASES, INTERVALS

from models.pricing import ZOMBIE
from models.ticks import Tick
from models.zombie import is_zombie, ownership_by_sandbox
from sinks.ledger import CloseConfig, Ledger, SourcedTick
from sinks.schema import cell_intervals, make_engine, migrate

pytestmark = pytest.mark.integration


def test_the_rule_and_the_closer_agree_on_one_table_of_cases(db_url: str) -> None:
    expected = {name: case[4] for name, case in CASES.items()}
    owners = ownership_by_sandbox(INTERVALS)
    python = {name: is_zombie(owners.get(sb), w, ts, secs) for name, (sb, w, ts, secs, _) in CASES.items()}
    assert python == expected

    engine = make_engine(db_url)
    try:
        migrate(engine)
        ledger = Ledger(engine)
        ticks = [
            SourcedTick(Tick(name, name, sb, w, "c", 1024, 1, secs, ts), 0, i)
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
        far = max(ts for _, _, ts, _, _ in CASES.values()) + 10 * 86_400_000
        ledger.close(far, CloseConfig(bucket_seconds=3600, grace_seconds=0, shadow=True, bill_from=0))
        zombies = {u["org_id"] for u in ledger.unbilled() if u["reason"] == ZOMBIE}
        assert ledger.open_samples() == 0
    finally:
        engine.dispose()
    assert {name: name in zombies for name in CASES} == expected
