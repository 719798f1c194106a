"""On the running pipeline: the worker's group skips part of the topic, ``edgebill replay --apply`` backfills it,
no tick arrives after that, and Stripe ends exact for every hour, the newest closed hour included.

Six hours are ingested, closed and sent. With the worker stopped, more ticks of those same hours are published
and the group's offsets are moved past them (a skipped range, as a reset or a lost offset commit leaves it).
The restarted worker reads nothing new, and the partition it skipped never reports progress up to its log end,
so the watermark stays where it was (it holds nothing). The replay finds the gap and writes it; the running
closer closes every one of those hours again without a watermark and the sender ships the corrections.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from infra.catalog import ensure_customers, ensure_meters
from infra.kafka_io import publish_sync
from models.billing import UNIFIED_METER
from models.policy import OrgPolicy

pytestmark = pytest.mark.integration

HOUR = 3600
MB = 1024  # whole GB-s per tick: every hour's Stripe sum is an exact integer


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _tick(ts: int, interval: int, n: int) -> dict[str, Any]:
    return {
        "id": f"b{ts}:{n}",
        "type": "usage_tick",
        "org_id": "org_b",
        "sandbox_id": "sb_b",
        "worker_id": "",
        "cell_id": "eu-1",
        "payload": {"interval_s": interval, "memory_mb": MB, "cpu_count": 1},
        "timestamp": _iso(ts),
    }


async def _skip_to(bootstrap: str, group: str, topic: str, offsets: dict[int, int]) -> None:
    """Commit the group's offsets at ``offsets`` (partition -> next offset): a skipped range, as a reset or a
    lost offset commit leaves it. Explicit offsets: this broker's log end can lag a moment behind a publish."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = {TopicPartition(topic, p): off for p, off in offsets.items()}
        consumer.assign(list(parts))
        await consumer.commit(parts)
    finally:
        await consumer.stop()


def _replay(stack: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "infra.devkit.cli", "replay", *args],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def test_a_skipped_range_backfilled_by_replay_bills_every_hour_exactly_at_stripe(make_stack: Any) -> None:
    now = int(time.time())
    # The hour the watermark tick goes in. The watermark never passes the clock, so the hour before it closes
    # only 600 s (the grace) after it ends: in an hour's first 11 minutes the test works one hour further back.
    cur = (now - 660) // HOUR * HOUR
    hours = [cur - k * HOUR for k in range(6, 0, -1)]  # the newest is the hour just ended
    stack = make_stack(EDGEBILL_BILL_FROM=str(cur - 40 * HOUR), EDGEBILL_STRIPE_AUDIT_INTERVAL="0")
    meter = ensure_meters(stack.client)[UNIFIED_METER]
    cust = ensure_customers(stack.client, {"org_b": "b@x.test"})["org_b"]
    policy = {"org_id": "org_b", "plan": "pro", "billing_mode": "unified", "stripe_customer_id": cust}
    publish_sync(
        stack.bootstrap,
        stack.topic("org-policy"),
        [(b"org_b", OrgPolicy.model_validate({**policy, "effective_at": 0}).to_json())],
    )
    ticks_topic = stack.topic("usage-ticks")
    first = [_tick(h + 60 + 10 * j, 20 + j, j) for h in hours for j in range(4)]
    # A tick of the current hour takes the watermark past the newest hour's end and its 600 s grace.
    first.append(_tick(max(cur + (now - cur) // 2, cur + 660), 1, 99))
    publish_sync(stack.bootstrap, ticks_topic, [(b"org_b", orjson.dumps(t), 0) for t in first])
    worker = stack.start_worker()
    stack.wait(lambda: stack.ledger.state_counts() == {"sent": 6}, 120, "every closed hour sent")
    stack.stop(worker)

    skipped = [_tick(h + 1800 + 10 * j, 30 + j, 50 + j) for h in hours for j in range(3)]
    publish_sync(stack.bootstrap, ticks_topic, [(b"org_b", orjson.dumps(t), 1) for t in skipped])
    group = f"{stack.env['EDGEBILL_KAFKA_GROUP_ID']}.ticks"  # the ingest service's own group
    asyncio.run(_skip_to(stack.bootstrap, group, ticks_topic, {0: len(first), 1: len(skipped)}))
    ingested = stack.ledger.counters()["ticks.ingested"]
    stack.start_worker()
    time.sleep(3)
    assert stack.ledger.counters()["ticks.ingested"] == ingested  # the group read nothing: the range is skipped

    dry = _replay(stack, "--json")
    assert dry.returncode == 1, (dry.stdout, dry.stderr)
    found = orjson.loads(dry.stdout)
    assert found["counts"]["missing_from_ledger"] == len(skipped), found["counts"]
    applied = _replay(stack, "--apply")
    assert applied.returncode in (0, 4), (applied.stdout, applied.stderr)

    # Hour -> GB-s of every tick, skipped ones included, keyed as Stripe sums them: a meter event carries its
    # hour's end as its timestamp, so Stripe's hourly window starting at an hour's end holds that hour.
    truth: dict[int, int] = defaultdict(int)
    for t in first[:-1] + skipped:
        ts = int(datetime.fromisoformat(t["timestamp"]).timestamp())
        truth[ts // HOUR * HOUR + HOUR] += t["payload"]["interval_s"] * MB // 1024

    def stripe_hours() -> dict[int, float]:
        got = stack.client.v1.billing.meters.event_summaries.list(
            meter,
            {
                "customer": cust,
                "start_time": hours[0] + HOUR,
                "end_time": cur + HOUR,
                "value_grouping_window": "hour",
            },
        )
        return {int(s.start_time): float(s.aggregated_value) for s in got.data}

    def exact() -> bool:
        return stripe_hours() == {h: float(v) for h, v in truth.items()}

    stack.wait(exact, 120, "Stripe exact for every hour after the backfill", step=1.0)
    assert stack.ledger.open_samples() == 1  # only the current hour's tick waits
    assert all(r["state"] == "sent" for r in stack.ledger.rows())
    assert {r["bucket_start"] for r in stack.ledger.rows() if r["revision"]} == set(hours)  # all re-closed
    again = _replay(stack, "--json", "--bucket-to", str(hours[-1]))
    assert again.returncode == 0, (again.stdout, again.stderr)
