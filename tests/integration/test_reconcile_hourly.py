"""The reconciliation catches a loss within the hour, on the real pipeline: ticks on the broker -> `edgebill worker`
-> the local Stripe over HTTP; `edgebill reconcile` as an operator runs it, never waiting for midnight UTC.

A scenario ends in the current hour. Everything is sent and settled: `edgebill reconcile` (no range) compares
today's closed hours one by one and exits 0, naming them. Then another sender bills one org's customer in one of
today's closed hours and one of the other org's events is cancelled at Stripe: exit 1, that (org, meter, hour)
labelled ``over`` and ``short``; the worker's scheduled run alerts on its second run. A run that could compare
nothing says why and exits 3, never 0.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from decimal import Decimal
from typing import Any

import orjson
import pytest

from infra.catalog import ensure_customers, ensure_meters
from infra.kafka_io import publish_sync
from models.billing import UNIFIED_METER
from models.policy import OrgPolicy
from models.reconcile import HOUR
from sinks.reconcile.store import ReconcileStore

pytestmark = pytest.mark.integration


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _ticks(org: str, stamps: list[int]) -> list[tuple[bytes, bytes]]:
    batch = [
        {
            "id": f"sb_{org}:1:{ts}",
            "type": "usage_tick",
            "org_id": org,
            "sandbox_id": f"sb_{org}",
            "worker_id": "",
            "cell_id": "eu-1",
            "payload": {"interval_s": 20, "memory_mb": 2048, "cpu_count": 1},
            "timestamp": _iso(ts),
        }
        for ts in stamps
    ]
    return [(org.encode(), orjson.dumps(batch))]


def _cli(stack: Any, *args: str, **env: str) -> tuple[int, str, str]:
    p = subprocess.run(
        [sys.executable, "-m", "infra.devkit.cli", "reconcile", *args],
        env={**stack.env, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return p.returncode, p.stdout, p.stderr


def test_a_loss_and_an_excess_in_todays_hours_are_found_within_the_hour(make_stack: Any) -> None:
    now = int(time.time())
    if now % HOUR < 5:  # the newest hour closes with the first tick of this one: give it a moment
        time.sleep(5 - now % HOUR)
        now = int(time.time())
    cur = now // HOUR * HOUR  # the current hour: its bucket is still open
    if (cur + HOUR) % 86_400 == 0:
        # In a UTC day's last hour every bucket ending that day is closed, so the reconciler compares the day
        # as one day window (as it should): the hour windows this test is about do not exist then.
        pytest.skip("the day's last UTC hour: today is compared as one day window, not by hour")
    stack = make_stack(
        EDGEBILL_GRACE_SECONDS="0",
        EDGEBILL_BILL_FROM=str(cur - 6 * HOUR),
        EDGEBILL_STRIPE_AUDIT_INTERVAL="1",
        EDGEBILL_STRIPE_AUDIT_SETTLE="1",
        EDGEBILL_STRIPE_AUDIT_LOOKBACK_DAYS="2",
        EDGEBILL_STRIPE_AUDIT_READS_PER_S="25",
    )
    ensure_meters(stack.client)
    cust = ensure_customers(stack.client, {"org_a": "a@x.test", "org_b": "b@x.test"})
    policies = [
        (
            org.encode(),
            OrgPolicy.model_validate(
                {
                    "org_id": org,
                    "plan": "pro",
                    "billing_mode": "unified",
                    "stripe_customer_id": cust[org],
                    "effective_at": 0,
                }
            ).to_json(),
        )
        for org in ("org_a", "org_b")
    ]
    publish_sync(stack.bootstrap, stack.topic("org-policy"), policies)
    # Three closed hours and a tick of the current one (it moves the watermark past the newest bucket's end).
    stamps = [cur - k * HOUR + 60 * j for k in (3, 2, 1) for j in range(1, 4)] + [cur + (now - cur) // 2]
    publish_sync(stack.bootstrap, stack.topic("usage-ticks"), _ticks("org_a", stamps) + _ticks("org_b", stamps))
    stack.start_worker()
    stack.wait(lambda: stack.ledger.state_counts() == {"sent": 6}, 90, "every closed bucket sent")
    store = ReconcileStore(stack.engine)

    # Settled? Not for a day: a run that compares nothing says why and is never 0.
    code, out, err = _cli(stack, "--json", EDGEBILL_STRIPE_AUDIT_SETTLE="86400")
    assert code == 3, (code, out, err)
    rep = json.loads(out)
    assert rep["compared"] == 0 and rep["windows"] == [] and "not settled" in rep["why"]
    code, out, _ = _cli(stack, EDGEBILL_STRIPE_AUDIT_SETTLE="86400")
    assert code == 3 and out.startswith("NOTHING COMPARED: every window of the range is not closed")

    def clean() -> bool:
        code, out, _ = _cli(stack, "--json")
        rep = json.loads(out) if out else {}
        return code == 0 and {(w["org_id"], w["window"]["start"]) for w in rep.get("windows", [])} >= {
            ("org_a", cur),
            ("org_b", cur),
        }

    stack.wait(clean, 60, "today's newest closed hour compared clean", step=1.0)
    code, out, err = _cli(stack, "--json")
    assert code == 0, (out, err)
    rep = json.loads(out)
    assert rep["why"] is None and rep["range"]["grouping"] == "mixed" and rep["newest_compared"] == cur + HOUR
    today = cur // 86_400 * 86_400
    hours_today = [w for w in rep["windows"] if w["window"]["start"] >= today]
    assert hours_today and all(w["window"]["grouping"] == "hour" and w["label"] == "ok" for w in hours_today)
    code, human, _ = _cli(stack)
    assert code == 0 and "compared:" in human and _iso(cur)[:16] in human  # names the hours it compared

    # Another sender bills org_a's customer in the newest closed hour; one of org_b's events of that hour is
    # cancelled at Stripe.
    stack.client.v1.billing.meter_events.create(
        {
            "event_name": UNIFIED_METER,
            "identifier": "someone-else-1",
            "timestamp": cur + 1,
            "payload": {"stripe_customer_id": cust["org_a"], "value": "12.5"},
        }
    )
    (row_b,) = [r for r in stack.ledger.rows(org="org_b") if r["bucket_end"] == cur]
    stack.client.v1.billing.meter_event_adjustments.create(
        {"event_name": UNIFIED_METER, "type": "cancel", "cancel": {"identifier": row_b["id"]}}
    )
    time.sleep(1.5)  # the settle time (Stripe's summaries are eventually consistent)
    code, out, err = _cli(stack, "--json")
    assert code == 1, (out, err)
    bad = {
        (w["org_id"], w["meter"], w["window"]["start"], w["window"]["grouping"]): w
        for w in json.loads(out)["windows"]
        if w["label"] != "ok"
    }
    assert set(bad) == {("org_a", UNIFIED_METER, cur, "hour"), ("org_b", UNIFIED_METER, cur, "hour")}
    over, short = bad[("org_a", UNIFIED_METER, cur, "hour")], bad[("org_b", UNIFIED_METER, cur, "hour")]
    assert over["label"] == "over" and Decimal(over["difference"]) == Decimal("12.5")
    assert over["excess"] == [{"hour": cur, "value": "12.5"}]
    assert short["label"] == "short" and Decimal(short["difference"]) == -Decimal(row_b["value"])
    assert [(c["cause"], c["rows"]) for c in short["causes"]] == [("missing_at_stripe", [row_b["id"]])]

    # The scheduled run alerts on the second run in a row that sees each difference.
    def alerted() -> bool:
        return {(a["org_id"], a["label"]) for a in store.alerts() if a["published_ms"] is not None} == {
            ("org_a", "over"),
            ("org_b", "short"),
        }

    stack.wait(alerted, 60, "both alerts published")
    for a in store.alerts():
        assert a["window_start"] == cur and a["fired_run"] == a["first_run"] + 1
    assert "stripe_reconcile: ALERT stripe_reconcile:hour:" in stack.log_text()
    snap = store.snapshot()
    assert snap.newest_compared == cur + HOUR and snap.last_run is not None
    assert snap.last_run["grouping"] == "mixed"
