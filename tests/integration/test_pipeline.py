"""The whole pipeline in real processes: broker, `edgebill worker`, the local Stripe server, SQLite.

Truth comes from the simulator's unique ticks, computed independently of the billing code.
"""

from __future__ import annotations

import os
import signal
import time
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import orjson
import pytest

from infra.catalog import ensure_customers, ensure_meters, meter_totals
from infra.devkit.simulator import FleetSpec, build_fleet
from infra.kafka_io import publish_sync, read_topic_sync
from models.policy import OrgPolicy

pytestmark = pytest.mark.integration

H = 3600


def _frac_to_dec(f: Fraction) -> Decimal:
    return Decimal(f.numerator) / Decimal(f.denominator)


def test_exact_totals_with_duplicates_reordering_and_sigkill(stack: Any) -> None:
    now = int(time.time())
    start = (now // H - 4) * H
    fleet = build_fleet(FleetSpec(orgs=8, hours=3, start=start, seed=21, free_orgs=1, duplicate_rate=0.15))
    meters = ensure_meters(stack.client)
    customers = ensure_customers(stack.client, {o.org_id: o.customer_email for o in fleet.orgs if o.plan == "pro"})
    policies = [
        (
            o.org_id.encode(),
            OrgPolicy.model_validate(
                {
                    "org_id": o.org_id,
                    "plan": o.plan,
                    "billing_mode": o.billing_mode,
                    "stripe_customer_id": customers.get(o.org_id),
                    "effective_at": start - 86400,
                }
            ).to_json(),
        )
        for o in fleet.orgs
    ]
    publish_sync(stack.bootstrap, stack.topic("org-policy"), policies)
    messages = fleet.messages()
    publish_sync(stack.bootstrap, stack.topic("usage-ticks"), messages)
    worker = stack.start_worker()
    stack.wait(lambda: stack.ledger.counters().get("ticks.ingested", 0) > len(fleet.ticks) // 3, 60, "ingest")
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    stack.start_worker()

    def done() -> bool:
        c = stack.ledger.counters()
        st = stack.ledger.state_counts()
        return (
            c.get("ticks.ingested", 0) == len(fleet.ticks)
            and stack.ledger.open_samples() == 0
            and (st.get("pending", 0) == 0 and st.get("sent", 0) > 0)
        )

    stack.wait(done, 90, "all ticks billed and sent")
    time.sleep(1.5)  # one more closer/sender cycle: nothing may change any more
    assert stack.ledger.counters()["ticks.ingested"] == len(fleet.ticks)
    assert set(stack.ledger.state_counts()) == {"sent"}
    for o in fleet.orgs:
        if o.plan != "pro":
            continue
        for m in fleet.meters_of(o):
            truth = _frac_to_dec(fleet.truth.rounded(o.org_id, m))
            ours = sum((Decimal(r["value"]) for r in stack.ledger.rows(org=o.org_id) if r["meter"] == m), Decimal(0))
            theirs = meter_totals(stack.client, meters[m], customers[o.org_id], start, start + 5 * H)
            assert truth == ours == theirs, (o.org_id, m)
    assert stack.stripe.state.conflicting_identifiers() == []


def test_malformed_records_are_dead_lettered_and_the_worker_keeps_going(stack: Any) -> None:
    ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 7200))
    good = {"id": "sb:0:1", "org_id": "o1", "payload": {"interval_s": 20, "memory_mb": 1024}, "timestamp": ts}
    bad_elem = {"id": "sb:0:2", "org_id": "o1", "payload": {"interval_s": -5}, "timestamp": ts}
    records = [
        (b"o1", b"{this is not json"),
        (b"o1", orjson.dumps([good, bad_elem])),
        (b"o1", orjson.dumps({"id": "sb:0:3", "payload": {}, "timestamp": ts})),  # no org_id
        (None, orjson.dumps({**good, "id": "sb:0:4", "timestamp": "not a time"})),
    ]
    stack.start_worker()
    publish_sync(stack.bootstrap, stack.topic("usage-ticks"), records)
    stack.wait(lambda: stack.ledger.counters().get("records.read", 0) >= 4, 60, "the records to be read")
    dlq = read_topic_sync(stack.bootstrap, stack.topic("usage-ticks-dlq"), idle_timeout=1.5)
    got = sorted((r.headers["edgebill-reason"].decode(), r.value) for r in dlq)
    assert got == sorted(
        [
            ("not_json", b"{this is not json"),
            ("negative_interval_s", orjson.dumps(bad_elem)),
            ("missing_org_id", records[2][1]),
            ("bad_timestamp", records[3][1]),
        ]
    )
    assert all(r.headers["edgebill-source"].startswith(stack.topic("usage-ticks").encode()) for r in dlq)
    assert stack.ledger.counters()["records.rejected"] == 4
    assert stack.ledger.sample_totals() == {"o1": (1, 20480)}
    # Still alive and ingesting after the bad input.
    publish_sync(stack.bootstrap, stack.topic("usage-ticks"), [(b"o1", orjson.dumps({**good, "id": "sb:0:5"}))])
    stack.wait(lambda: stack.ledger.sample_totals().get("o1", (0, 0))[0] == 2, 30, "a good tick after bad ones")
    assert all(p.poll() is None for p in stack.procs)


def _listeners(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) listening on ``port``."""
    found: set[str] = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            addr, st = parts[1], parts[3]
            ip, hexport = addr.rsplit(":", 1)
            if st == "0A" and int(hexport, 16) == port:
                found.add(ip)
    return found


def test_worker_web_server_binds_loopback_only(stack: Any) -> None:
    import urllib.request

    stack.start_worker()

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{stack.web_port}/healthz", timeout=1) as r:
                return bool(orjson.loads(r.read())["ok"])
        except OSError:
            return False

    stack.wait(healthy, 60, "the worker's web server")
    assert _listeners(stack.web_port) == {"0100007F"}  # 127.0.0.1, nothing else
    stripe_port = int(stack.stripe.base_url.rsplit(":", 1)[1])
    assert _listeners(stripe_port) == {"0100007F"}
