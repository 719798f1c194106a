"""The cutover rehearsed on running workers, as an operator runs it: shadow soak with clean parity -> ``plan
--at T`` -> ``arm`` -> buckets before T skipped, from T sent, Stripe's totals exact -> late ticks for T-1 and T
(T-1's correction never sent, T's sent) -> ``rollback --at R`` -> buckets from R not sent by the edge. The
workers are never restarted: they apply each change from the ledger at their next run, log it and
acknowledge it. Every command's audit entry is in ``cutover status``.

How time is handled. Closing is driven by an event-time watermark that never runs ahead of the wall clock,
and ``plan`` refuses a T that is not in the future, so the rehearsal runs in real time on one-minute buckets
(``EDGEBILL_BUCKET_SECONDS=60``, grace 2 s): the soak is four buckets just behind now (their ticks and the
cell's scale event are published at once), T is the next minute boundary at least 15 s away, so ``plan`` and
``arm`` happen while T is still ahead, exactly as in production, without ``--force``. Ticks of T-1, T and T+1
are published right after ``arm`` (ingest accepts ticks up to an hour ahead; their buckets close only when
the wall clock passes their end + grace). The gate asks for 0.05 clean hours (three one-minute buckets).
R = T+1 is rolled back after T has closed and before T+1 closes (a margin of about 50 s).
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import orjson
import pytest
from click.testing import CliRunner, Result

from infra.catalog import ensure_customers, ensure_meters, meter_totals
from infra.cli import cli
from infra.kafka_io import publish_sync
from models.billing import UNIFIED_METER
from models.policy import OrgPolicy
from sinks.parity import ParityStore

pytestmark = pytest.mark.integration

B = 60  # bucket seconds
GRACE = 2


def _iso(ts_s: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts_s))


def _tick(tid: str, org: str, sandbox: str, ts_s: int, mb: int = 1536, secs: int = 20) -> tuple[bytes, bytes]:
    env = {
        "id": tid,
        "type": "usage_tick",
        "org_id": org,
        "sandbox_id": sandbox,
        "worker_id": "w1",
        "cell_id": "c1",
        "payload": {"memory_mb": mb, "interval_s": secs, "cpu_count": 1},
        "timestamp": _iso(ts_s),
    }
    return org.encode(), orjson.dumps(env)


def test_rehearsal_plan_arm_late_ticks_rollback_on_running_workers(
    make_stack: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    stack = make_stack(
        EDGEBILL_SHADOW="true",
        EDGEBILL_PRO_BILLING_AUTHORITY="cell",
        EDGEBILL_BILL_FROM="0",
        EDGEBILL_BUCKET_SECONDS=str(B),
        EDGEBILL_GRACE_SECONDS=str(GRACE),
        EDGEBILL_CUTOVER_CLEAN_HOURS="0.05",
        EDGEBILL_PARITY_REFRESH_INTERVAL="1",
    )
    for k in [k for k in stack.env if k.startswith("EDGEBILL_")]:
        monkeypatch.setenv(k, stack.env[k])

    def cutover(*args: str) -> Result:
        res = CliRunner().invoke(cli, ["cutover", *args, "--json"], catch_exceptions=False)
        assert res.exit_code == 0, (args, res.output)
        return res

    meters = ensure_meters(stack.client)
    customers = ensure_customers(stack.client, {"o1": "o1@example.test", "o2": "o2@example.test"})
    pols = [
        OrgPolicy.model_validate(
            {"org_id": "o1", "plan": "pro", "stripe_customer_id": customers["o1"], "effective_at": 0}
        ),
        OrgPolicy.model_validate(  # the original system's name for billing through Stripe
            {
                "org_id": "o2",
                "plan": "pro",
                "billing_provider": "legacy",
                "stripe_customer_id": customers["o2"],
                "effective_at": 0,
            }
        ),
        OrgPolicy.model_validate({"org_id": "o3", "plan": "pro", "billing_provider": "autumn", "effective_at": 0}),
    ]
    publish_sync(stack.bootstrap, stack.topic("org-policy"), [(p.org_id.encode(), p.to_json()) for p in pols])

    # ---- the shadow soak: four buckets just behind now, the same usage on both sides
    now0 = int(time.time())
    s = now0 // B * B
    soak = [s - k * B for k in (4, 3, 2, 1)]
    scale = {
        "id": "sc-1", "sandbox_id": "sb-soak", "org_id": "o1", "cell_id": "c1", "worker_id": "w1",
        "memory_mb": 1536, "cpu_percent": 100, "disk_mb": 0, "started_at": soak[0], "ended_at": s,
    }  # fmt: skip
    publish_sync(stack.bootstrap, stack.topic("sandbox-scale-events"), [(b"sb-soak", orjson.dumps(scale))])
    publish_sync(
        stack.bootstrap,
        stack.topic("usage-ticks"),
        [_tick(f"soak:{b}:{k}", "o1", "sb-soak", b + 20 * k) for b in soak for k in range(3)],
    )
    workers = [stack.start_worker(), stack.start_worker()]
    parity = ParityStore(stack.engine, bucket_seconds=B)
    stack.wait(lambda: len(stack.ledger.rows(state="shadow")) == 4, 90, "the soak buckets to close in shadow")
    stack.wait(lambda: parity.gate(GRACE).clean_buckets >= 3, 60, "three clean parity buckets")

    # ---- plan and arm while T is ahead (no --force)
    now = int(time.time())
    t = (now + 15 + B - 1) // B * B
    planned = json.loads(cutover("plan", "--at", str(t), "--by", "ana", "--reason", "soak clean").stdout)
    armed = json.loads(cutover("arm", "--by", "ana", "--reason", "go").stdout)
    assert time.time() < t and planned["planned"]["forced"] == [] and armed["armed"]["T"] == t
    assert armed["error"] is None  # published on billing-control

    def acked(seq: int) -> bool:
        return {(o.rsplit(":", 1)[1], q) for o, q, _ in stack.ledger.cutover_acks()} >= {
            (str(w.pid), seq) for w in workers
        }

    stack.wait(lambda: acked(armed["armed"]["seq"]), 30, "both workers to apply the armed state")
    for w in workers:  # each worker's /healthz shows the state in force and where it comes from
        with urllib.request.urlopen(f"http://127.0.0.1:{w.port}/healthz", timeout=5) as resp:
            health = json.loads(resp.read())
        assert (health["authority"], health["shadow"], health["bill_from"]) == ("edge", False, t)
        assert health["cutover"] == {"source": "ledger", "seq": armed["armed"]["seq"]}

    # ---- T-1, T and T+1 (= R), published at once; each closes when the clock passes its end + grace
    r = t + B
    main = [
        _tick(f"m:{b}:{k}:{o}", o, "sb-main", b + 20 * k)
        for b in (t - B, t, r)
        for k in range(3)
        for o in ("o1", "o2", "o3")
    ]
    publish_sync(stack.bootstrap, stack.topic("usage-ticks"), main)

    def states_of(bucket: int) -> dict[str, str]:
        return {x["id"]: x["state"] for x in stack.ledger.rows(bucket=bucket)}

    stack.wait(lambda: states_of(t - B) and set(states_of(t - B).values()) == {"skipped_before_bill_from"}, 120, "T-1")
    stack.wait(lambda: len(states_of(t)) == 2 and set(states_of(t).values()) == {"sent"}, 120, "T sent")
    assert stack.ledger.unbilled() and {u["reason"] for u in stack.ledger.unbilled()} == {"provider_autumn"}

    # ---- late ticks for T-1 and T: T-1's correction is never sent, T's is
    late = [_tick(f"late:{b}:{o}", o, "sb-main", b + 50, mb=1000, secs=7) for b in (t - B, t) for o in ("o1", "o2")]
    publish_sync(stack.bootstrap, stack.topic("usage-ticks"), late)
    stack.wait(lambda: len(states_of(t)) == 4 and set(states_of(t).values()) == {"sent"}, 60, "T's corrections sent")
    stack.wait(lambda: len(states_of(t - B)) == 4, 30, "T-1's corrections")
    assert set(states_of(t - B).values()) == {"skipped_before_bill_from"}
    truth = Decimal(3 * 1536 * 20 + 1000 * 7) / 1024  # per org, bucket T
    for org in ("o1", "o2"):
        ours = sum(Decimal(x["value"]) for x in stack.ledger.rows(org=org, bucket=t))
        theirs = meter_totals(stack.client, meters[UNIFIED_METER], customers[org], t - 10 * B, t + 10 * B)
        assert ours == theirs == truth.quantize(Decimal("0.000001")), org

    # ---- rollback at R = T+1, before R closes: the edge never sends R
    assert time.time() < r + B + GRACE, "the machine was too slow: R closed before the rollback"
    rolled = json.loads(cutover("rollback", "--at", str(r), "--by", "ana", "--reason", "rehearsal over").stdout)
    assert rolled["sent_from_R"] == [] and rolled["error"] is None
    stack.wait(lambda: len(states_of(r)) == 2, 120, "R to close")
    assert set(states_of(r).values()) == {"skipped_rolled_back"}
    sent_buckets = {e["timestamp"] - B for e in stack.stripe.state.accepted_meter_events()}
    assert sent_buckets == {t}  # nothing before T, nothing from R: only T reached Stripe
    assert stack.stripe.state.conflicting_identifiers() == []

    # ---- the audit, the acknowledgements, no restart
    stack.wait(lambda: acked(rolled["rolled_back"]["seq"]), 30, "both workers to apply the rollback")
    st = json.loads(cutover("status").stdout)
    assert [(e["kind"], e["by"], e["reason"]) for e in st["log"]] == [
        ("plan", "ana", "soak clean"),
        ("state", "ana", "go"),
        ("state", "ana", "rehearsal over"),
    ]
    assert [e["command"].split()[2] for e in st["log"]] == ["plan", "arm", "rollback"]
    assert st["state"]["source"] == "ledger" and st["state"]["authority"] == "cell" and st["state"]["bill_until"] == r
    assert all(w["current"] for w in st["workers"] if int(w["owner"].rsplit(":", 1)[1]) in {x.pid for x in workers})
    decided = {b["bucket"]: b["decision"] for b in st["seam"]["buckets"]}
    assert (
        decided[t - B] == "skipped_before_bill_from" and decided[t] == "billed" and decided[r] == "skipped_rolled_back"
    )
    assert st["seam"]["gaps"] == [] and st["unpublished"] == []
    assert all(w.alive for w in workers) and len(stack.procs) == 2
    assert stack.log_text().count("cutover state in force: seq") == 4  # each worker logged each change once
