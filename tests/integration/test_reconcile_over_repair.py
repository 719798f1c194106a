"""Stripe holding more than the ledger sent is mended by `edgebill reconcile --repair`, on the real pipeline: ticks on
the broker -> `edgebill worker` -> the local Stripe over HTTP with the official SDK.

A scenario of thirty hours settles exactly. Another sender then bills the org's customer in an hour older than
24 h and in one within 24 h. `edgebill reconcile` reports both hours; the repair's dry run names both and writes
nothing; an `--apply` killed after its first write, run again, writes the other (never the first twice); the
worker ships the two credit rows; Stripe's upcoming invoice then equals the usage computed from the ticks alone,
`reconcile` is clean, and a further `--apply` (or one from a plan made before the first) changes nothing.

A row of edgebill's own that Stripe holds with another value (a re-send after the ledger lost it) is cancelled at
Stripe and billed again under a new identifier instead (the ledger-level test below).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import orjson
import pytest

from infra.catalog import ensure_catalog, ensure_customers, ensure_meters
from infra.devkit.stripe_fake import StripeServerThread
from infra.kafka_io import publish_sync
from models.billing import UNIFIED_METER
from models.policy import OrgPolicy
from models.reconcile import DAY, HOUR, Grouping, Label
from models.reconcile_over import OverAction
from models.ticks import Tick
from sinks.base import RetryingSink
from sinks.catalog_store import CatalogStore
from sinks.ledger import CloseConfig, Ledger, SourcedTick
from sinks.outbox_sender import OutboxSender
from sinks.reconcile.repair import OverWrite, ReconcileRepairs
from sinks.reconcile.run import ReconcileConfig, Reconciliation
from sinks.reconcile.store import ReconcileStore
from sinks.reconcile.stripe_reader import StripeReader
from sinks.schema import make_engine, migrate
from sinks.stripe.v1 import StripeMeterSink, cancel_meter_event, make_client

pytestmark = pytest.mark.integration

MB = 3000


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _cli(stack: Any, *args: str) -> tuple[int, str, str]:
    p = subprocess.run(
        [sys.executable, "-m", "infra.devkit.cli", "reconcile", *args],
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return p.returncode, p.stdout, p.stderr


def _truth(intervals: list[int]) -> Decimal:
    """GB-s of the ticks, rounded once to Stripe's 6 decimals: what the invoice must bill."""
    return (Decimal(sum(i * MB for i in intervals)) / 1024).quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)


def _invoice_quantity(stack: Any, sub: str, price: str) -> Decimal:
    preview = stack.client.v1.invoices.create_preview({"subscription": sub})
    (line,) = [ln for ln in preview.lines.data if ln.pricing.price_details.price == price]
    return Decimal(line.quantity_decimal)


def test_stripe_holding_more_than_the_ledger_sent_is_taken_back_once(
    make_stack: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = int(time.time())
    # The hour the watermark tick goes in. The watermark never passes the clock, so the hour before it closes
    # only 600 s (the grace) after it ends: in an hour's first 11 minutes the test works one hour further back.
    cur = (now - 660) // HOUR * HOUR
    old_hour, new_hour = cur - 27 * HOUR, cur - 3 * HOUR  # bucket ends: older than 24 h, and within
    stack = make_stack(
        EDGEBILL_BILL_FROM=str(cur - 40 * HOUR),
        EDGEBILL_STRIPE_AUDIT_INTERVAL="0",
        EDGEBILL_STRIPE_AUDIT_SETTLE="1",
        EDGEBILL_STRIPE_AUDIT_LOOKBACK_DAYS="3",
        EDGEBILL_STRIPE_AUDIT_READS_PER_S="25",
    )
    setup = ensure_catalog(stack.client)
    CatalogStore(stack.engine).publish_catalog(setup.prices)
    price = setup.prices[next(k for k, (m, _p) in setup.prices.items() if m == UNIFIED_METER)][1]
    cust = ensure_customers(stack.client, {"org_p": "p@x.test"})["org_p"]
    sub = stack.client.v1.subscriptions.create(
        {
            "customer": cust,
            "items": [{"price": p} for _m, p in setup.prices.values()],
            "backdate_start_date": now - 3 * DAY,
        }
    )
    policy = OrgPolicy.model_validate(
        {
            "org_id": "org_p",
            "plan": "pro",
            "billing_mode": "unified",
            "stripe_customer_id": cust,
            "stripe_subscription_id": sub.id,
            "effective_at": 0,
        }
    )
    publish_sync(stack.bootstrap, stack.topic("org-policy"), [(b"org_p", policy.to_json())])
    # Thirty closed hours of usage, and a tick of the current hour that takes the watermark past the newest
    # bucket's end and its 600 s grace (early in an hour that tick is a few minutes ahead of the clock, well
    # inside the hour ingest tolerates).
    stamps = [(cur - k * HOUR + 100 + 7 * j, 20 + j + k % 5) for k in range(30, 0, -1) for j in range(3)]
    stamps.append((max(cur + (now - cur) // 2, cur + 660), 1))
    ticks = [
        {
            "id": f"t{ts}:{iv}",
            "type": "usage_tick",
            "org_id": "org_p",
            "sandbox_id": "sb_p",
            "worker_id": "",
            "cell_id": "eu-1",
            "payload": {"interval_s": iv, "memory_mb": MB, "cpu_count": 1},
            "timestamp": _iso(ts),
        }
        for ts, iv in stamps
    ]
    publish_sync(stack.bootstrap, stack.topic("usage-ticks"), [(b"org_p", orjson.dumps(ticks))])
    stack.start_worker()
    stack.wait(lambda: stack.ledger.state_counts() == {"sent": 30}, 120, "every closed bucket sent")
    truth = _truth([iv for ts, iv in stamps if ts < cur])
    assert sum(Decimal(r["value"]) for r in stack.ledger.rows()) == truth

    def reconciled() -> tuple[int, dict[str, Any]]:
        code, out, err = _cli(stack, "--json")
        assert code in (0, 1), (code, out, err)
        return code, json.loads(out)

    stack.wait(lambda: reconciled()[0] == 0, 60, "the scenario reconciles exactly", step=1.0)

    # Another sender bills the same customer and meter in both hours.
    for ident, ts, value in (("other-old", old_hour + 5, "7.25"), ("other-new", new_hour + 5, "3.5")):
        stack.client.v1.billing.meter_events.create(
            {
                "event_name": UNIFIED_METER,
                "identifier": ident,
                "timestamp": ts,
                "payload": {"stripe_customer_id": cust, "value": value},
            }
        )
    time.sleep(1.5)
    code, rep = reconciled()
    assert code == 1
    excess = {e["hour"]: e["value"] for w in rep["windows"] for e in w["excess"]}
    assert excess == {old_hour: "7.25", new_hour: "3.5"}
    assert {w["label"] for w in rep["windows"] if w["excess"]} == {"over"}
    assert _invoice_quantity(stack, sub.id, price) == truth + Decimal("10.75")

    # The dry run names both and changes nothing.
    rows_before, receipts_before = stack.ledger.rows(), stack.stripe.state.receipt_list()
    code, out, err = _cli(stack, "--repair", "--json")
    assert code == 1, (out, err)
    plan = json.loads(out)["repair"]
    assert plan["applied"] is False and plan["refused"] == [] and plan["planned"] == []
    assert {(o["hour"], o["excess"], o["action"], o["value"]) for o in plan["over"]} == {
        (old_hour, "7.25", "credit", "-7.25"),
        (new_hour, "3.5", "credit", "-3.5"),
    }
    code, human, _ = _cli(stack, "--repair")
    assert "dry run, nothing written" in human and f"hour {_iso(old_hour)}: Stripe holds 7.25 more" in human
    assert stack.ledger.rows() == rows_before and stack.stripe.state.receipt_list() == receipts_before

    # An --apply killed in the middle of its second write: the first is committed, the second is not.
    store = ReconcileStore(stack.engine)
    rec = Reconciliation(store, StripeReader(stack.client, reads_per_s=25), ReconcileConfig(HOUR, settle_seconds=1))
    planned_before = rec.repair(rec.compare_recent(), by="t", apply=False).over
    real_credit = ReconcileRepairs._credit
    calls = {"n": 0}

    def dies_on_the_second(conn: Any, st: Any, now: int) -> str:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")
        return real_credit(conn, st, now)

    monkeypatch.setattr(ReconcileRepairs, "_credit", staticmethod(dies_on_the_second))
    with pytest.raises(KeyboardInterrupt):
        rec.repair(rec.compare_recent(), by="ops", reason="killed run", apply=True)
    monkeypatch.undo()
    assert len([r for r in stack.ledger.rows() if r["units"] == 0]) == 1
    code, out, err = _cli(stack, "--repair", "--apply", "--by", "ops", "--reason", "another sender billed it", "--json")
    assert code == 1, (out, err)  # the credits are queued, not yet at Stripe
    done = json.loads(out)["repair"]["over_done"]  # the hour already credited is not even planned again
    assert [d["skipped"] for d in done] == [None]
    credits = [r for r in stack.ledger.rows() if r["units"] == 0]
    assert sorted(Decimal(r["value"]) for r in credits) == [Decimal("-7.25"), Decimal("-3.5")]
    assert {r["bucket_end"] for r in credits} == {old_hour, new_hour}

    # The worker ships them; the invoice equals the truth; reconcile is clean, and shows what was done.
    stack.wait(lambda: stack.ledger.state_counts() == {"sent": 32}, 60, "the credit rows sent")
    assert _invoice_quantity(stack, sub.id, price) == truth
    stack.wait(lambda: reconciled()[0] == 0, 60, "reconcile clean after the repair", step=1.0)
    code, rep = reconciled()
    assert code == 0 and rep["why"] is None
    recorded = {r["hour"]: r for r in rep["repairs_recorded"] if r["action"] == "credit"}
    assert set(recorded) == {old_hour, new_hour}
    assert recorded[new_hour]["by"] == "ops" and recorded[new_hour]["reason"] in (
        "killed run",
        "another sender billed it",
    )
    code, human, _ = _cli(stack)
    assert code == 0 and "repairs recorded for this range:" in human and "another sender billed it" in human

    # Nothing more: a second --apply, and the writes a run planned before the first (a crash mid-run).
    rows_after, receipts_after = stack.ledger.rows(), stack.stripe.state.receipt_list()
    code, out, err = _cli(stack, "--repair", "--apply", "--json")
    assert code == 0 and json.loads(out)["repair"]["over_done"] == [], (out, err)
    again = store.apply_over_repairs([OverWrite(o, {}) for o in planned_before], by="late", reason="stale plan")
    assert [d.skipped for d in again] == ["done already", "done already"]
    time.sleep(1.5)
    assert stack.ledger.rows() == rows_after and stack.stripe.state.receipt_list() == receipts_after
    assert _invoice_quantity(stack, sub.id, price) == truth
    assert stack.stripe.state.conflicting_identifiers() == []


# ------------------------------------------------------------------------------------- own identifier


@pytest.fixture
def ledger(sqlite_url: str) -> Iterator[Ledger]:
    engine = make_engine(sqlite_url)
    migrate(engine)
    yield Ledger(engine)
    engine.dispose()


def test_an_own_identifier_stripe_holds_with_another_value_is_cancelled_and_billed_again(ledger: Ledger) -> None:
    """The ledger lost a row it had sent (a restore) and billed the bucket again: its send came back "already
    exists", and Stripe holds the identifier with the old, bigger value. The repair cancels it at Stripe (inside
    24 h) and bills the ledger's value again under a new identifier; afterwards Stripe holds exactly the ledger."""
    now = int(time.time())
    h = now // HOUR * HOUR - 3 * HOUR
    cfg = CloseConfig(bucket_seconds=HOUR, grace_seconds=600, shadow=False, bill_from=h - DAY)
    with StripeServerThread() as srv:
        client = make_client("sk_test_k", srv.base_url, timeout=5)
        cust = ensure_customers(client, {"o": "o@x.test"})["o"]
        ensure_meters(client)
        p = OrgPolicy.model_validate(
            {"org_id": "o", "plan": "pro", "billing_mode": "unified", "stripe_customer_id": cust, "effective_at": 0}
        )
        ledger.write_policies("org-policy", [(p, 0, 0)], {0: (0, None)}, {})
        tick = SourcedTick(Tick("t1", "o", "sb", "w", "c", 1024, 0, 60, (h + 30) * 1000), 0, 0)
        ledger.write_ticks("usage-ticks", [tick], bucket_seconds=HOUR, progress={0: (1, None)})
        ledger.close(now * 1000, cfg)
        (row,) = ledger.rows()
        # The identifier already at Stripe, with the value of an earlier send the ledger no longer has.
        client.v1.billing.meter_events.create(
            {
                "event_name": UNIFIED_METER,
                "identifier": row["id"],
                "timestamp": row["bucket_end"],
                "payload": {"stripe_customer_id": cust, "value": "75"},
            }
        )
        inner = StripeMeterSink(client, concurrency=1)
        try:
            OutboxSender(ledger, RetryingSink(inner, sleep=lambda s: None), now_s=lambda: int(time.time())).run_once()
        finally:
            inner.close()
        (sent,) = ledger.rows()
        assert sent["state"] == "sent" and Decimal(sent["value"]) == Decimal(60)  # 60 s of 1 GB; Stripe said "exists"

        store = ReconcileStore(ledger.engine)
        rec = Reconciliation(store, StripeReader(client, reads_per_s=100), ReconcileConfig(HOUR, settle_seconds=0))
        rep = rec.compare(h, h + 2 * HOUR, Grouping.HOUR)
        (res,) = [r for r in rep.results if r.label is not Label.OK]
        assert res.label is Label.OVER and res.difference == Decimal(15)
        dry = rec.repair(rep, by="t", apply=False)
        (step,) = dry.over
        assert (step.action, step.row_id) == (OverAction.CANCEL_REPLACE, row["id"])

        def cancel(event_name: str, identifier: str) -> Any:
            return cancel_meter_event(client, event_name, identifier)

        done = rec.repair(rep, by="ops", reason="restored ledger", cancel=cancel)
        (od,) = done.over_done
        assert od.skipped is None and od.row_id == f"{row['id']}:r1"
        inner = StripeMeterSink(client, concurrency=1)
        try:
            OutboxSender(ledger, RetryingSink(inner, sleep=lambda s: None), now_s=lambda: int(time.time())).run_once()
        finally:
            inner.close()
        assert srv.state.totals()[(UNIFIED_METER, cust)] == Decimal(sent["value"])
        clean = rec.compare(h, h + 2 * HOUR, Grouping.HOUR)
        assert [r.label for r in clean.results] == [Label.OK]
        assert rec.repair(rec.compare(h, h + 2 * HOUR, Grouping.HOUR), by="ops", cancel=cancel).over_done == []
        receipts = srv.state.receipt_list()
        assert receipts[f"{row['id']}:r1"] == [sent["value"]]  # the ledger's value, under a new identifier
