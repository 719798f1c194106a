"""Outbox -> official stripe SDK -> the local Stripe server over real HTTP, with and without faults."""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest

from infra.catalog import ensure_customers, ensure_meters, meter_totals
from infra.devkit.stripe_fake import FaultConfig, StripeServerThread
from models.billing import UNIFIED_METER
from models.policy import OrgPolicy
from models.ticks import Tick
from sinks.base import RetryingSink
from sinks.ledger import CloseConfig, Ledger, SourcedTick
from sinks.outbox_sender import OutboxSender
from sinks.schema import make_engine, migrate
from sinks.stripe.v1 import StripeMeterSink, make_client

pytestmark = pytest.mark.integration

H = 3600
NOW = int(time.time())
B0 = (NOW // H - 8) * H
LIVE = CloseConfig(bucket_seconds=H, grace_seconds=600, shadow=False, bill_from=B0)


@pytest.fixture
def ledger(sqlite_url: str) -> Iterator[Ledger]:
    engine = make_engine(sqlite_url)
    migrate(engine)
    yield Ledger(engine)
    engine.dispose()


def _policy(led: Ledger, org: str, cust: str | None, mode: str = "unified", eff: int = 0) -> None:
    p = OrgPolicy.model_validate(
        {"org_id": org, "plan": "pro", "billing_mode": mode, "stripe_customer_id": cust, "effective_at": eff}
    )
    led.write_policies("org-policy", [(p, 0, 0)], {0: (0, None)}, {})


def _fill(led: Ledger, orgs: list[str], buckets: int, mb: int = 3000) -> dict[str, int]:
    """Write 3 ticks per org per bucket; return exact MB-s per org."""
    truth: dict[str, int] = {}
    ticks = []
    n = 0
    for org in orgs:
        for b in range(buckets):
            for k in range(3):
                n += 1
                secs = 19 + k
                ticks.append(
                    SourcedTick(
                        Tick(f"{org}:{b}:{k}", org, "sb", "w", "c", mb, 0, secs, (B0 + b * H + 60 * k) * 1000), 0, n
                    )
                )
                truth[org] = truth.get(org, 0) + mb * secs
    led.write_ticks("usage-ticks", ticks, bucket_seconds=H, progress={0: (n, None)})
    return truth


def _sender(led: Ledger, client: Any) -> OutboxSender:
    sink = RetryingSink(StripeMeterSink(client, concurrency=4), max_attempts=8, sleep=lambda s: None)
    return OutboxSender(led, sink, batch=200, now_s=lambda: int(time.time()))


def _drain(sender: OutboxSender, led: Ledger, rounds: int = 30) -> None:
    for _ in range(rounds):
        sender.run_once()
        if not led.state_counts().get("pending"):
            return
    raise AssertionError(f"rows still pending after {rounds} rounds: {led.state_counts()}")


def _rounded(mb_s: int) -> Decimal:
    from decimal import ROUND_HALF_UP

    return (Decimal(mb_s) / 1024).quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)


@pytest.mark.parametrize(
    "faults",
    [
        FaultConfig(),
        FaultConfig(seed=11, p_429=0.04, p_500=0.03, p_cutoff=0.03, p_slow=0.05, slow_seconds=0.01),
    ],
    ids=["clean", "10pct-faults"],
)
def test_every_row_reaches_stripe_exactly_once(ledger: Ledger, faults: FaultConfig) -> None:
    orgs = [f"org{i}" for i in range(6)]
    with StripeServerThread(faults=faults) as srv:
        client = make_client("sk_test_edgebill", srv.base_url, timeout=5)
        meters = ensure_meters(client)
        customers = ensure_customers(client, {o: f"{o}@example.test" for o in orgs})
        for o in orgs:
            _policy(ledger, o, customers[o])
        truth = _fill(ledger, orgs, buckets=5)
        ledger.close(NOW * 1000, LIVE)
        _drain(_sender(ledger, client), ledger)
        assert ledger.state_counts() == {"sent": len(orgs) * 5}
        for o in orgs:
            theirs = meter_totals(client, meters[UNIFIED_METER], customers[o], B0, B0 + 6 * H)
            ours = sum(Decimal(r["value"]) for r in ledger.rows(org=o))
            assert theirs == ours == _rounded(truth[o])
        assert srv.state.conflicting_identifiers() == []
        if faults.p_cutoff:
            # Some events were recorded by Stripe while their answer was lost: they came back as duplicates.
            assert any(r["last_error"] and "duplicate" in r["last_error"] for r in ledger.rows())


def test_rows_wait_for_a_customer_then_ship(ledger: Ledger) -> None:
    with StripeServerThread() as srv:
        client = make_client("sk_test_edgebill", srv.base_url, timeout=5)
        ensure_meters(client)
        _policy(ledger, "late", None)
        _fill(ledger, ["late"], buckets=2)
        ledger.close(NOW * 1000, LIVE)
        sender = _sender(ledger, client)
        report = sender.run_once()
        assert report.deferred == 2 and ledger.state_counts() == {"deferred_no_customer": 2}
        assert sender.run_once().touched == 0  # nothing to do until the customer exists
        cust = ensure_customers(client, {"late": "late@example.test"})["late"]
        _policy(ledger, "late", cust, eff=10)
        _drain(sender, ledger)
        assert ledger.state_counts() == {"sent": 2}
        assert {r["stripe_customer_id"] for r in ledger.rows()} == {cust}


def test_a_permanent_refusal_is_recorded_with_stripes_message(ledger: Ledger) -> None:
    with StripeServerThread() as srv:
        client = make_client("sk_test_edgebill", srv.base_url, timeout=5)
        ensure_meters(client)
        _policy(ledger, "ghost", "cus_doesnotexist")
        _fill(ledger, ["ghost"], buckets=1)
        ledger.close(NOW * 1000, LIVE)
        report = _sender(ledger, client).run_once()
        assert report.rejected == 1
        (row,) = ledger.rows()
        assert row["state"] == "rejected" and "cus_doesnotexist" in row["last_error"]


def test_a_resend_after_a_lost_answer_is_a_duplicate_not_a_second_charge(ledger: Ledger) -> None:
    with StripeServerThread() as srv:
        client = make_client("sk_test_edgebill", srv.base_url, timeout=5)
        meters = ensure_meters(client)
        cust = ensure_customers(client, {"o": "o@example.test"})["o"]
        _policy(ledger, "o", cust)
        truth = _fill(ledger, ["o"], buckets=1)
        ledger.close(NOW * 1000, LIVE)
        (row,) = ledger.sendable(10)
        # Simulate "sent, then crashed before marking": deliver directly, leave the row pending.
        client.v1.billing.meter_events.create(
            {
                "event_name": row.meter,
                "identifier": row.id,
                "timestamp": row.bucket_end,
                "payload": {"stripe_customer_id": cust, "value": row.value},
            }
        )
        report = _sender(ledger, client).run_once()
        assert (report.sent, report.duplicates) == (0, 1)
        assert ledger.state_counts() == {"sent": 1}
        # Meter events carry the bucket END as timestamp, so the summary window must include it.
        assert meter_totals(client, meters[UNIFIED_METER], cust, B0, B0 + 2 * H) == _rounded(truth["o"])
