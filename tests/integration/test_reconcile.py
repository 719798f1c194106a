"""Reconciliation with Stripe end to end: ticks on the broker -> `edgebill worker` (v2 stream) -> the local Stripe
over HTTP with the official SDK; `edgebill reconcile` run as an operator runs it.

After a normal run the reconciliation is clean. Then the local Stripe drops one accepted v2 event, refuses another
asynchronously (its error report), and a meter is deactivated: `edgebill reconcile` labels each window and names
each cause, the worker's scheduled reconciliation alerts after two runs (published to billing-alerts, logged once),
/metrics shows it, and `--repair` brings the day back to clean without an identifier ever reaching Stripe twice
or with two values (the refused identifier is never sent again; the dropped one, which Stripe no longer holds, is
sent again once, with its value).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from decimal import Decimal
from typing import Any

import orjson
import pytest

from infra.catalog import ensure_customers, ensure_meters
from infra.kafka_io import publish_sync, read_topic_sync
from models.billing import LEGACY_TIER_METERS, UNIFIED_METER
from models.policy import OrgPolicy
from models.reconcile import DAY
from sinks.reconcile.store import ReconcileStore

pytestmark = pytest.mark.integration

H = 3600
G4 = LEGACY_TIER_METERS[4096]


def _iso(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _ticks(org: str, mb: int, hours: range, day: int) -> list[tuple[bytes, bytes]]:
    out = []
    for h in hours:
        batch = [
            {
                "id": f"sb_{org}:1:{h * 10 + k}",
                "type": "usage_tick",
                "org_id": org,
                "sandbox_id": f"sb_{org}",
                "worker_id": "",
                "cell_id": "eu-1",
                "payload": {"interval_s": 20 + k, "memory_mb": mb, "cpu_count": 1},
                "timestamp": _iso(day + h * H + 60 * k + 7),
            }
            for k in range(3)
        ]
        out.append((org.encode(), orjson.dumps(batch)))
    return out


def _cli(stack: Any, *args: str) -> tuple[int, str, str]:
    p = subprocess.run(
        [sys.executable, "-m", "infra.devkit.cli", "reconcile", *args],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return p.returncode, p.stdout, p.stderr


def _metrics(stack: Any) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.web_port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def test_reconcile_finds_dropped_refused_and_misconfigured_then_repairs(make_stack: Any) -> None:
    now = int(time.time())
    day = (now // DAY - 2) * DAY  # closed whatever the time of day
    stack = make_stack(
        EDGEBILL_STRIPE_MODE="v2",
        EDGEBILL_BILL_FROM=str(day - DAY),
        EDGEBILL_STRIPE_RECONCILE_INTERVAL="1",
        EDGEBILL_STRIPE_AUDIT_INTERVAL="1",
        EDGEBILL_STRIPE_AUDIT_SETTLE="1",
        EDGEBILL_STRIPE_AUDIT_LOOKBACK_DAYS="3",
        EDGEBILL_STRIPE_AUDIT_READS_PER_S="25",
        EDGEBILL_WEB_METRICS_PER_ORG="true",  # the difference per org on /metrics below
    )
    meters = ensure_meters(stack.client)
    cust = ensure_customers(stack.client, {"org_a": "a@x.test", "org_b": "b@x.test"})
    policies = [
        (
            org.encode(),
            OrgPolicy.model_validate(
                {"org_id": org, "plan": "pro", "billing_mode": mode, "stripe_customer_id": cust[org], "effective_at": 0}
            ).to_json(),
        )
        for org, mode in (("org_a", "unified"), ("org_b", "legacy"))
    ]
    publish_sync(stack.bootstrap, stack.topic("org-policy"), policies)
    publish_sync(
        stack.bootstrap,
        stack.topic("usage-ticks"),
        _ticks("org_a", 3000, range(2, 8), day) + _ticks("org_b", 4096, range(2, 5), day),
    )
    stack.start_worker()
    stack.wait(lambda: stack.ledger.state_counts() == {"sent": 9}, 90, "every row sent")
    store = ReconcileStore(stack.engine)

    def scheduled(pred: Any) -> bool:
        results = store.results()
        return len(results) == 2 and pred(results)

    stack.wait(lambda: scheduled(lambda rs: all(r["label"] == "ok" for r in rs)), 60, "a clean scheduled run")
    code, out, err = _cli(stack, "--from", str(day), "--to", str(day + DAY), "--json")
    assert code == 0, (out, err)
    clean = json.loads(out)
    assert (clean["compared"], clean["differences"]) == (2, 0) and clean["failure"] is None

    # Stripe loses two accepted events of org_a and the 4 GB meter is deactivated.
    rows_a = sorted(stack.ledger.rows(org="org_a"), key=lambda r: r["bucket_start"])
    dropped, refused = rows_a[1], rows_a[4]
    stack.stripe.state.drop_meter_event(dropped["id"])
    stack.stripe.state.reject_meter_event(refused["id"])
    stack.client.v1.billing.meters.deactivate(meters[G4])
    stack.wait(
        lambda: [r["id"] for r in stack.ledger.rows(state="rejected")] == [refused["id"]],
        30,
        "the worker to apply Stripe's error report",
    )

    # The scheduled reconciliation alerts once a difference persists over two runs.
    def alerted() -> bool:
        return {a["label"] for a in store.alerts() if a["published_ms"] is not None} == {"short", "meter_misconfigured"}

    stack.wait(alerted, 60, "both alerts published")
    alerts = {a["label"]: a for a in store.alerts()}
    for a in alerts.values():
        assert a["fired_run"] == a["first_run"] + 1  # the second run in a row with the difference
    published = [
        orjson.loads(r.value or b"{}")
        for r in read_topic_sync(stack.bootstrap, stack.topic("billing-alerts"), idle_timeout=1.5)
    ]
    ours = {b["id"]: b for b in published if b.get("type") == "stripe_reconcile"}
    assert set(ours) == {a["id"] for a in alerts.values()}
    short_alert = ours[alerts["short"]["id"]]
    assert (short_alert["org_id"], short_alert["label"], short_alert["runs"]) == ("org_a", "short", 2)
    assert ours[alerts["meter_misconfigured"]["id"]]["meter"] == G4
    time.sleep(2.5)  # more runs: the alert is neither published nor logged again
    log = stack.log_text()
    for a in alerts.values():
        assert log.count(f"stripe_reconcile: ALERT {a['id']}") == 1
    assert len(read_topic_sync(stack.bootstrap, stack.topic("billing-alerts"), idle_timeout=1.5)) == len(published)

    # /metrics shows it.
    metrics = _metrics(stack)
    assert 'edgebill_reconcile_windows{label="short"} 1.0' in metrics
    assert 'edgebill_reconcile_windows{label="meter_misconfigured"} 1.0' in metrics
    lost = Decimal(dropped["value"]) + Decimal(refused["value"])
    (line,) = [ln for ln in metrics.splitlines() if ln.startswith("edgebill_reconcile_difference{") and "org_a" in ln]
    assert f'meter="{UNIFIED_METER}"' in line and 'label="short"' in line
    assert Decimal(line.rsplit(" ", 1)[1]) == -lost
    assert "edgebill_reconcile_alerts_total 2.0" in metrics

    # The operator's view: each window labelled, each cause named.
    code, out, err = _cli(stack, "--from", str(day), "--to", str(day + DAY), "--json")
    assert code == 1, (out, err)
    windows = {w["org_id"]: w for w in json.loads(out)["windows"]}
    a, b = windows["org_a"], windows["org_b"]
    assert a["label"] == "short" and Decimal(a["difference"]) == -lost
    assert {c["cause"]: c["rows"] for c in a["causes"]} == {
        "missing_at_stripe": [dropped["id"]],
        "rejected_after_send": [refused["id"]],
    }
    assert b["label"] == "meter_misconfigured" and b["causes"][0]["cause"] == "meter_misconfigured"
    assert "inactive" in b["causes"][0]["detail"]
    code, human, _ = _cli(stack, "--from", str(day), "--to", str(day + DAY))
    assert code == 1 and "missing_at_stripe" in human and f"{_iso(day)}" in human

    # The operator reactivates the meter, then repairs: the day is clean again.
    stack.client.v1.billing.meters.reactivate(meters[G4])
    code, out, err = _cli(stack, "--from", str(day), "--to", str(day + DAY), "--repair")  # a dry run
    assert code == 1 and "dry run, nothing written" in out and "2 row(s) Stripe lacks" in out, (out, err)
    assert f"{dropped['id']}: queue again under its own identifier" in out
    assert stack.ledger.state_counts() == {"sent": 8, "rejected": 1}
    code, out, err = _cli(stack, "--from", str(day), "--to", str(day + DAY), "--repair", "--apply", "--reason", "t")
    assert code == 1 and "2 row(s) queued in the outbox" in out, (out, err)
    assert f"{dropped['id']}: queued again under its own identifier" in out
    assert f"{refused['id']}: lost at Stripe; billed again as {refused['id']}:r1" in out
    stack.wait(lambda: stack.ledger.state_counts() == {"sent": 9, "rejected": 1}, 60, "the repaired rows sent")

    def clean_again() -> bool:
        code, out, _ = _cli(stack, "--from", str(day), "--to", str(day + DAY), "--json")
        return code == 0 and json.loads(out)["compared"] == 2

    stack.wait(clean_again, 60, "reconcile clean after the repair", step=1.0)
    stack.wait(lambda: scheduled(lambda rs: all(r["label"] == "ok" for r in rs)), 60, "a clean scheduled run")

    receipts = stack.stripe.state.receipt_list()
    assert all(len(set(values)) == 1 for values in receipts.values())  # no identifier ever carried two values
    assert len(receipts[refused["id"]]) == 1  # the identifier Stripe refused was never sent again
    assert len(receipts[dropped["id"]]) == 2  # sent again once, after Stripe had lost it
    assert stack.stripe.state.duplicate_attempt_list() == []  # nothing Stripe held was sent to it again
    assert stack.stripe.state.conflicting_identifiers() == []
    held = stack.stripe.state.totals()
    assert held[(UNIFIED_METER, cust["org_a"])] == sum(Decimal(r["value"]) for r in rows_a)
