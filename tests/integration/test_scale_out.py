"""Scale-out: two workers in one group on a 4-partition topic, one PostgreSQL ledger."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from infra.devkit.bench import tick_messages
from infra.kafka_io import publish_sync
from models.policy import OrgPolicy

pytestmark = pytest.mark.integration


def test_two_workers_share_the_partitions_and_the_totals_stay_exact(make_stack: Callable[..., Any]) -> None:
    stack = make_stack(
        database="postgresql", EDGEBILL_SHADOW="true", EDGEBILL_PRO_BILLING_AUTHORITY="cell", EDGEBILL_BILL_FROM="0"
    )
    n = 40_000
    msgs = tick_messages(n, 1, orgs=50)
    expected_mb_s = 0
    import orjson

    for _, v in msgs:
        p = orjson.loads(v)["payload"]
        expected_mb_s += p["memory_mb"] * p["interval_s"]
    pols = [
        (
            f"org_{i:04d}".encode(),
            OrgPolicy.model_validate({"org_id": f"org_{i:04d}", "plan": "pro", "effective_at": 0}).to_json(),
        )
        for i in range(50)
    ]
    publish_sync(stack.bootstrap, stack.topic("org-policy"), pols)
    w1 = stack.start_worker()
    w2 = stack.start_worker()

    def owners() -> set[str]:
        return {
            s.topic + "/" + str(s.partition) + "@" + str(row_owner)
            for s, row_owner in _owners(stack)
            if s.topic == stack.topic("usage-ticks")
        }

    # Both workers hold partitions of usage-ticks before any data arrives.
    stack.wait(lambda: len({o.rsplit("@", 1)[1] for o in owners()}) == 2, 60, "both workers to own partitions")
    publish_sync(stack.bootstrap, stack.topic("usage-ticks"), msgs)
    stack.wait(
        lambda: stack.ledger.counters().get("ticks.ingested", 0) == n and stack.ledger.open_samples() == 0,
        120,
        "every tick ingested and closed",
    )
    assert sum(mb for _, mb in stack.ledger.sample_totals().values()) == expected_mb_s
    rows = stack.ledger.rows()
    assert sum(r["units"] for r in rows) == expected_mb_s
    assert {r["state"] for r in rows} == {"shadow"}
    assert w1.poll() is None and w2.poll() is None


def _owners(stack: Any) -> list[tuple[Any, str | None]]:
    from sqlalchemy import select

    from sinks.schema import partition_progress

    with stack.ledger.engine.connect() as conn:
        rows = conn.execute(select(partition_progress)).all()
    now = time.time() * 1000
    return [(r, r.owner) for r in rows if r.reported_ms and now - r.reported_ms < 5000]
