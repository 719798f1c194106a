"""The reconciliation on the ledger (SQLite and PostgreSQL) against the local Stripe over HTTP, official SDK, no
worker: labels and causes per (org, meter, day), repairs that never send a lost identifier again, the scheduled
run's streaks and alerts.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal

import pytest
import stripe

from infra.catalog import ensure_customers, ensure_meters
from infra.devkit.stripe_fake import StripeServerThread
from models.billing import LEGACY_TIER_METERS, UNIFIED_METER
from models.policy import OrgPolicy
from models.reconcile import DAY, Cause, Grouping, Label
from models.ticks import Tick
from sinks.base import RetryingSink
from sinks.ledger import CloseConfig, Ledger, SourcedTick
from sinks.outbox_sender import OutboxSender
from sinks.reconcile.run import ReconcileConfig, Reconciliation
from sinks.reconcile.store import ReconcileStore, RunRecord
from sinks.reconcile.stripe_reader import StripeReader
from sinks.schema import make_engine, migrate
from sinks.stripe.v1 import make_client
from sinks.stripe.v2 import ErrorReportReconciler, StripeStreamSink

pytestmark = pytest.mark.integration

H = 3600
NOW = int(time.time())
D = (NOW // DAY - 2) * DAY  # the day compared: two days ago, closed whatever the time of day
LIVE = CloseConfig(bucket_seconds=H, grace_seconds=600, shadow=False, bill_from=D - DAY)
G4 = LEGACY_TIER_METERS[4096]


@pytest.fixture
def ledger(db_url: str) -> Iterator[Ledger]:
    engine = make_engine(db_url)
    migrate(engine)
    yield Ledger(engine)
    engine.dispose()


def _policy(led: Ledger, org: str, cust: str, mode: str) -> None:
    p = OrgPolicy.model_validate(
        {"org_id": org, "plan": "pro", "billing_mode": mode, "stripe_customer_id": cust, "effective_at": 0}
    )
    led.write_policies("org-policy", [(p, 0, 0)], {0: (0, None)}, {})


def _ticks(led: Ledger, org: str, mb: int, hours: range, seq0: int) -> int:
    ticks = [
        SourcedTick(
            Tick(f"{org}:{h}:{k}", org, "sb", "w", "c", mb, 0, 20 + k + h % 3, (D + h * H + 30 * k) * 1000), 0, i
        )
        for i, (h, k) in enumerate(((h, k) for h in hours for k in range(3)), start=seq0)
    ]
    led.write_ticks("usage-ticks", ticks, bucket_seconds=H, progress={0: (seq0 + len(ticks), None)})
    return seq0 + len(ticks)


def _sender(led: Ledger, client: stripe.StripeClient) -> OutboxSender:
    inner = StripeStreamSink(client, concurrency=2)
    return OutboxSender(
        led,
        RetryingSink(inner, sleep=lambda s: None),
        now_s=lambda: int(time.time()),
        reconciler=ErrorReportReconciler(client, led),
        reconcile_every_s=0,
        on_close=[inner.close],
    )


def _drain(sender: OutboxSender, led: Ledger) -> None:
    for _ in range(20):
        sender.run_once()
        if not led.state_counts().get("pending"):
            return
    raise AssertionError(led.state_counts())


def test_labels_causes_repair_and_streaks(ledger: Ledger) -> None:
    with StripeServerThread() as srv:
        client = make_client("sk_test_k", srv.base_url, timeout=5)
        meters = ensure_meters(client)
        cust = ensure_customers(client, {"a": "a@x.test", "b": "b@x.test"})
        _policy(ledger, "a", cust["a"], "unified")
        _policy(ledger, "b", cust["b"], "legacy")
        seq = _ticks(ledger, "a", 3000, range(2, 8), 0)
        _ticks(ledger, "b", 4096, range(2, 5), seq)
        ledger.close(NOW * 1000, LIVE)
        sender = _sender(ledger, client)
        store = ReconcileStore(ledger.engine)
        reader = StripeReader(client, reads_per_s=200)
        rec = Reconciliation(store, reader, ReconcileConfig(bucket_seconds=H, settle_seconds=0))
        try:
            _drain(sender, ledger)
            clean = rec.compare(D, D + DAY, Grouping.DAY)
            assert clean.failure is None and clean.unsettled == []
            assert [(r.key.org_id, r.key.meter, r.label) for r in clean.results] == [
                ("a", UNIFIED_METER, Label.OK),
                ("b", G4, Label.OK),
            ]
            rows_a = sorted(ledger.rows(org="a"), key=lambda r: r["bucket_start"])
            dropped, refused = rows_a[1], rows_a[3]
            srv.state.drop_meter_event(dropped["id"])
            srv.state.reject_meter_event(refused["id"])
            srv.state.set_meter_active(meters[G4], False)
            sender.reconcile_now()  # the worker's error-report reconciler: refused -> rejected
            assert ledger.rows(org="a", state="rejected")[0]["id"] == refused["id"]

            bad = rec.compare(D, D + DAY, Grouping.DAY)
            by_org = {r.key.org_id: r for r in bad.results}
            a, b = by_org["a"], by_org["b"]
            assert a.label is Label.SHORT and b.label is Label.METER_MISCONFIGURED
            assert a.difference == -(Decimal(dropped["value"]) + Decimal(refused["value"]))
            causes = {c.cause: c.rows for c in a.causes}
            assert causes == {Cause.MISSING: (dropped["id"],), Cause.REJECTED_AFTER_SEND: (refused["id"],)}
            assert [c.cause for c in b.causes] == [Cause.METER] and "inactive" in b.causes[0].detail
            # By the hour (a range that is not whole days): each lost row in its own hour, with its cause.
            hourly = rec.compare(D + 90, D + 9 * H - 90, Grouping.HOUR)
            assert (hourly.lo, hourly.hi) == (D, D + 9 * H)
            short_hours = {r.key.start: r for r in hourly.results if r.key.org_id == "a" and r.label is Label.SHORT}
            assert sorted(short_hours) == [dropped["bucket_end"], refused["bucket_end"]]
            assert [c.cause for c in short_hours[dropped["bucket_end"]].causes] == [Cause.MISSING]
            assert [c.cause for c in short_hours[refused["bucket_end"]].causes] == [Cause.REJECTED_AFTER_SEND]
            assert sum(1 for r in hourly.results if r.key.org_id == "a" and r.label is Label.OK) == 4

            # The scheduled run's streaks: the second run in a row with the difference alerts, once; a run that
            # could not read Stripe in between breaks no streak.
            alerts = []
            for error in (None, "reading the billing meters: unreachable: connection refused", None, None):
                rep = rec.compare(D, D + DAY, Grouping.DAY)
                record = RunRecord(1, 2, rep.lo, rep.hi, "day", rep.results if error is None else (), error=error)
                alerts.append(store.record_run(record, alert_runs=2))
            assert [len(a) for a in alerts] == [0, 0, 2, 2]  # due after the 2nd good run, unpublished after the 3rd
            assert [a.new for a in alerts[2]] == [True, True] and [a.new for a in alerts[3]] == [False, False]
            store.mark_published([a.id for a in alerts[3]])
            assert store.pending_alerts() == []
            body = {a.body["org_id"]: a.body for a in alerts[2]}
            assert body["a"]["label"] == "short" and body["a"]["runs"] == 2
            assert {c["cause"] for c in body["a"]["causes"]} == {"missing_at_stripe", "rejected_after_send"}

            # Repair: the short window through the outbox; the misconfigured meter is refused (fix it first).
            fixed = rec.repair(bad, by="test")
            actions = {d.row_id: (d.action.value, d.new_row_id) for d in fixed.done}
            assert actions[dropped["id"]] == ("resend", None)
            assert actions[refused["id"]][0] == "replace" and (actions[refused["id"]][1] or "").endswith(":r1")
            assert [(k.org_id, "misconfigured" in why) for k, why in fixed.refused] == [("b", True)]
            srv.state.set_meter_active(meters[G4], True)  # the operator fixes the meter
            again = rec.repair(rec.compare(D, D + DAY, Grouping.DAY), by="test")
            assert again.done == []  # queued rows make a's window unsettled: nothing is repaired twice
            _drain(sender, ledger)
            final = rec.compare(D, D + DAY, Grouping.DAY)
            assert [r.label for r in final.results] == [Label.OK, Label.OK]
        finally:
            sender.close()
        receipts = srv.state.receipt_list()
        assert all(len(set(values)) == 1 for values in receipts.values())  # never an identifier with two values
        assert len(receipts[refused["id"]]) == 1  # the refused identifier was never sent again
        assert srv.state.duplicate_attempt_list() == []  # nothing Stripe held was sent again
        assert srv.state.totals()[(UNIFIED_METER, cust["a"])] == sum(Decimal(r["value"]) for r in rows_a)
        assert ledger.counters()["reconcile.resent"] == 1 and ledger.counters()["reconcile.replaced"] == 1
        # Replay counts the lost row's decision once: the replacement row is not counted again.
        billed = ledger.billed_by_key(D - H, D + DAY)
        assert sum(v for (o, _, _), (_, v) in billed.items() if o == "a") == sum(Decimal(r["value"]) for r in rows_a)


def test_unknown_customer_and_stripe_unreachable(ledger: Ledger) -> None:
    with StripeServerThread() as srv:
        client = make_client("sk_test_k", srv.base_url, timeout=5)
        ensure_meters(client)
        cust = ensure_customers(client, {"a": "a@x.test"})
        _policy(ledger, "a", cust["a"], "unified")
        _ticks(ledger, "a", 1024, range(1, 3), 0)
        ledger.close(NOW * 1000, LIVE)
        sender = _sender(ledger, client)
        try:
            _drain(sender, ledger)
        finally:
            sender.close()
        client.v1.customers.delete(cust["a"])
        rec = Reconciliation(
            ReconcileStore(ledger.engine), StripeReader(client, reads_per_s=200), ReconcileConfig(H, settle_seconds=0)
        )
        (res,) = rec.compare(D, D + DAY, Grouping.DAY).results
        assert res.label is Label.UNKNOWN_CUSTOMER and res.causes[0].cause is Cause.CUSTOMER
        base = srv.base_url
    gone = make_client("sk_test_k", base, timeout=2)  # the server is stopped: nothing answers
    rec = Reconciliation(
        ReconcileStore(ledger.engine),
        StripeReader(gone, reads_per_s=200, sleep=lambda s: None),
        ReconcileConfig(H, settle_seconds=0),
    )
    rep = rec.compare(D, D + DAY, Grouping.DAY)
    assert rep.failure is not None and "unreachable" in rep.failure and rep.results == []
