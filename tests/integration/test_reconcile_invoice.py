"""The invoice check: Stripe's preview of a subscription carrying every catalog price (published by the same code
as `edgebill stripe setup`) against the ledger, over HTTP with the official SDK; then a difference injected.

The org is legacy for the first half of the period's billed day and unified after, so three meters carry usage
(two tier meters and the overage meter) and six catalog prices carry none: every line is checked, exactly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from infra.catalog import ensure_catalog, ensure_customers
from infra.devkit.stripe_fake import StripeServerThread
from infra.settings import child_env
from models.billing import LEGACY_TIER_METERS, UNIFIED_METER
from models.catalog import CATALOG
from models.policy import OrgPolicy
from models.reconcile import DAY, Grouping, Label
from models.ticks import Tick
from sinks.base import RetryingSink
from sinks.catalog_store import CatalogStore
from sinks.ledger import CloseConfig, Ledger, SourcedTick
from sinks.outbox_sender import OutboxSender
from sinks.reconcile.run import ReconcileConfig, ReconcileReport, Reconciliation
from sinks.reconcile.store import ReconcileStore, RunRecord
from sinks.reconcile.stripe_reader import StripeReader
from sinks.schema import make_engine, migrate
from sinks.stripe.v1 import StripeMeterSink, make_client

pytestmark = pytest.mark.integration

H = 3600
NOW = int(time.time())
D = (NOW // DAY - 2) * DAY
LIVE = CloseConfig(bucket_seconds=H, grace_seconds=600, shadow=False, bill_from=D - DAY)


@pytest.fixture
def ledger(sqlite_url: str) -> Iterator[Ledger]:
    engine = make_engine(sqlite_url)
    migrate(engine)
    yield Ledger(engine)
    engine.dispose()


def _cli(url: str, base: str, cwd: Path) -> tuple[int, dict[str, object]]:
    env = child_env(
        {
            **{k: None for k in child_env({}) if k.startswith("EDGEBILL_")},
            "EDGEBILL_DATABASE_URL": url,
            "EDGEBILL_STRIPE_API_BASE": base,
            "EDGEBILL_STRIPE_AUDIT_SETTLE": "0",
        }
    )
    p = subprocess.run(
        [sys.executable, "-m", "infra.devkit.cli", "reconcile", "--invoice", "--json"],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode in (0, 1), p.stderr
    return p.returncode, json.loads(p.stdout)


def test_invoice_preview_matches_the_ledger_for_every_catalog_price_then_reports_an_injected_difference(
    ledger: Ledger, sqlite_url: str, tmp_path: Path
) -> None:
    with StripeServerThread() as srv:
        client = make_client("sk_test_k", srv.base_url, timeout=5)
        setup = ensure_catalog(client)
        assert setup.complete and len(setup.prices) == len(CATALOG)
        CatalogStore(ledger.engine).publish_catalog(setup.prices)
        cust = ensure_customers(client, {"org_p": "p@x.test"})["org_p"]
        sub = client.v1.subscriptions.create(
            {
                "customer": cust,
                "items": [{"price": price} for _meter, price in setup.prices.values()],
                "backdate_start_date": D - 3 * DAY,
            }
        )
        for mode, eff in (("legacy", 0), ("unified", D + 12 * H)):
            p = OrgPolicy.model_validate(
                {
                    "org_id": "org_p",
                    "plan": "pro",
                    "billing_mode": mode,
                    "stripe_customer_id": cust,
                    "stripe_subscription_id": sub.id,
                    "effective_at": eff,
                }
            )
            ledger.write_policies("org-policy", [(p, 0, 0)], {0: (0, None)}, {})
        ticks = [
            SourcedTick(
                Tick(f"t{h}:{k}:{mb}", "org_p", "sb", "w", "c", mb, 0, 17 + k, (D + h * H + 9 * k) * 1000), 0, n
            )
            for n, (h, k, mb) in enumerate(
                (h, k, mb) for h in range(2, 20) for k in range(3) for mb in (1024, 4096 if h % 2 else 3000)
            )
        ]
        ledger.write_ticks("usage-ticks", ticks, bucket_seconds=H, progress={0: (len(ticks), None)})
        ledger.close(NOW * 1000, LIVE)
        meters_used = {r["meter"] for r in ledger.rows()}
        assert meters_used == {LEGACY_TIER_METERS[1024], LEGACY_TIER_METERS[4096], UNIFIED_METER}
        inner = StripeMeterSink(client, concurrency=2)
        sender = OutboxSender(ledger, RetryingSink(inner, sleep=lambda s: None), now_s=lambda: int(time.time()))
        try:
            sender.run_once()
        finally:
            inner.close()
        assert set(ledger.state_counts()) == {"sent"}

        rec = Reconciliation(
            ReconcileStore(ledger.engine), StripeReader(client, reads_per_s=100), ReconcileConfig(H, settle_seconds=0)
        )
        report = ReconcileReport(D, D + DAY, Grouping.DAY, started_ms=NOW * 1000)
        rec.check_invoices(report)
        assert report.failure is None and report.notes == []
        lines = {i.meter: i for i in report.invoices}
        assert set(lines) == {p.meter for p in CATALOG} and len(report.invoices) == len(CATALOG)
        for meter, line in lines.items():
            truth = sum((Decimal(r["value"]) for r in ledger.rows() if r["meter"] == meter), Decimal(0))
            assert (line.label, line.stripe, line.ledger) == (Label.OK, truth, truth), meter
            assert (line.period_start, line.subscription) == (D - 3 * DAY, sub.id)
        assert sum(1 for i in report.invoices if i.stripe) == 3
        code, out = _cli(sqlite_url, srv.base_url, tmp_path)
        assert code == 0 and len(out["invoice"]) == len(CATALOG)  # type: ignore[arg-type]

        # Another sender bills the same meter and customer: the invoice would charge more than edgebill sent.
        client.v1.billing.meter_events.create(
            {
                "event_name": UNIFIED_METER,
                "identifier": "someone-else-1",
                "timestamp": D + 20 * H,
                "payload": {"stripe_customer_id": cust, "value": "7.5"},
            }
        )
        report = ReconcileReport(D, D + DAY, Grouping.DAY, started_ms=NOW * 1000)
        rec.check_invoices(report)
        (diff,) = report.invoice_differences
        assert (diff.meter, diff.label, diff.stripe - diff.ledger) == (UNIFIED_METER, Label.OVER, Decimal("7.5"))
        code, out = _cli(sqlite_url, srv.base_url, tmp_path)
        assert code == 1
        over = [i for i in out["invoice"] if i["label"] != "ok"]  # type: ignore[union-attr]
        assert [(i["meter"], i["difference"]) for i in over] == [(UNIFIED_METER, "7.5")]
        # The scheduled run keeps it for the dashboard and /metrics.
        ReconcileStore(ledger.engine).record_invoices(report.invoices, NOW * 1000)
        stored = {i["meter"]: i["label"] for i in ReconcileStore(ledger.engine).invoices()}
        assert stored[UNIFIED_METER] == "over" and sum(1 for v in stored.values() if v == "ok") == len(CATALOG) - 1
        # In the last hours of the period the scheduled run checks it on every run: a line that differs in two
        # runs in a row alerts once, before Stripe finalizes the invoice.
        store = ReconcileStore(ledger.engine)
        first = store.record_run(
            RunRecord(NOW * 1000, NOW * 1000, D, D + DAY, "mixed", invoices=report.invoices), alert_runs=2
        )
        assert [a for a in first if a.body["type"] == "stripe_reconcile_invoice"] == []
        second = store.record_run(
            RunRecord(NOW * 1000 + 1, NOW * 1000 + 1, D, D + DAY, "mixed", invoices=report.invoices), alert_runs=2
        )
        (alert,) = [a for a in second if a.body["type"] == "stripe_reconcile_invoice"]
        assert (alert.body["meter"], alert.body["label"], alert.body["difference"], alert.body["runs"]) == (
            UNIFIED_METER,
            "over",
            "7.5",
            2,
        )
        assert alert.body["subscription"] == sub.id and alert.new
        third = store.record_run(
            RunRecord(NOW * 1000 + 2, NOW * 1000 + 2, D, D + DAY, "mixed", invoices=report.invoices), alert_runs=2
        )
        assert [a.id for a in third if a.body["type"] == "stripe_reconcile_invoice"] == [alert.id]  # not a new one
        assert not [a for a in third if a.new]
