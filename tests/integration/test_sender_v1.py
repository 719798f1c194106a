"""v1 meter events at production limits: outbox -> official SDK -> the local Stripe server over real HTTP.

Live-mode limits on (1,000 calls/s, one concurrent call per customer and meter) with faults of every
kind, two senders in parallel on the same customers, a cut-off after Stripe recorded the event, and a
500 that says "do not retry".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest
import stripe

from infra.catalog import ensure_customers, ensure_meters, meter_totals
from infra.devkit.stripe_fake import FaultConfig, StripeServerThread
from models.billing import UNIFIED_METER
from models.policy import OrgPolicy
from models.ticks import Tick
from sinks.base import RetryingSink
from sinks.ledger import CloseConfig, Ledger, SourcedTick
from sinks.outbox_sender import OutboxSender
from sinks.schema import make_engine, migrate
from sinks.stripe.v1 import StripeMeterSink, make_client, make_http_session

pytestmark = pytest.mark.integration

H = 3600
NOW = int(time.time())
B0 = (NOW // H - 14) * H
LIVE = CloseConfig(bucket_seconds=H, grace_seconds=600, shadow=False, bill_from=B0)
KEY = "sk_test_edgebill"


def _ledger(path: Path) -> Ledger:
    engine = make_engine(f"sqlite:///{path}")
    migrate(engine)
    return Ledger(engine)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    led = _ledger(tmp_path / "ledger.db")
    yield led
    led.engine.dispose()


def _policy(led: Ledger, org: str, cust: str | None) -> None:
    p = OrgPolicy.model_validate(
        {"org_id": org, "plan": "pro", "billing_mode": "unified", "stripe_customer_id": cust, "effective_at": 0}
    )
    led.write_policies("org-policy", [(p, 0, 0)], {0: (0, None)}, {})


def _fill(led: Ledger, orgs: list[str], buckets: int) -> dict[str, int]:
    truth: dict[str, int] = {}
    ticks = []
    for n, (org, b) in enumerate(((o, b) for o in orgs for b in range(buckets)), start=1):
        mb, secs = 1024 * (1 + b % 3), 20 + b
        ticks.append(SourcedTick(Tick(f"{org}:{b}", org, "sb", "w", "c", mb, 0, secs, (B0 + b * H + 5) * 1000), 0, n))
        truth[org] = truth.get(org, 0) + mb * secs
    led.write_ticks("usage-ticks", ticks, bucket_seconds=H, progress={0: (len(ticks), None)})
    return truth


def _gbs(mb_s: int) -> Decimal:
    return (Decimal(mb_s) / 1024).quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)


def _sender(
    led: Ledger, client: stripe.StripeClient, *, max_attempts: int = 10
) -> tuple[OutboxSender, StripeMeterSink]:
    inner = StripeMeterSink(client, concurrency=8, max_calls_per_s=900)
    sink = RetryingSink(inner, max_attempts=max_attempts, sleep=lambda s: time.sleep(min(s, 0.005)))
    return OutboxSender(led, sink, batch=500, now_s=lambda: int(time.time()), on_close=[inner.close]), inner


def _drain(sender: OutboxSender, led: Ledger, rounds: int = 40) -> None:
    for _ in range(rounds):
        sender.run_once()
        if not led.state_counts().get("pending"):
            return
    raise AssertionError(f"rows still pending after {rounds} rounds: {led.state_counts()}")


def test_live_limits_and_faults_two_senders_on_the_same_customers(tmp_path: Path) -> None:
    """Two senders in parallel, each draining its own ledger onto the same four customers, with Stripe's
    live limits on and 10 % faults: every row ends ``sent``, Stripe's totals per customer equal both
    ledgers together, no identifier carries two values, and the one-call-per-(customer, meter) limit was
    never hit (the process-wide per-key locks hold across senders and threads)."""
    faults = FaultConfig(seed=3, p_429=0.04, p_500=0.03, p_cutoff=0.03, p_slow=0.2, slow_seconds=0.01, live_limits=True)
    ledgers = {side: _ledger(tmp_path / f"{side}.db") for side in ("a", "b")}
    http = make_http_session(20)
    try:
        with StripeServerThread() as srv:
            client = make_client(KEY, srv.base_url, timeout=5, session=http)
            meters = ensure_meters(client, [UNIFIED_METER])
            customers = ensure_customers(client, {f"c{i}": f"c{i}@example.test" for i in range(4)})
            truth: dict[str, Decimal] = {}  # customer -> exact GB-s of its two orgs (each rounded once)
            for side, led in ledgers.items():
                orgs = [f"{side}{i}" for i in range(4)]
                for i, o in enumerate(orgs):
                    _policy(led, o, customers[f"c{i}"])
                for org, mb_s in _fill(led, orgs, buckets=12).items():
                    truth[f"c{org[1:]}"] = truth.get(f"c{org[1:]}", Decimal(0)) + _gbs(mb_s)
                led.close(NOW * 1000, LIVE)
            srv.state.set_faults(faults)
            senders = [_sender(led, client) for led in ledgers.values()]
            errors: list[BaseException] = []

            def drain(sender: OutboxSender, led: Ledger) -> None:
                try:
                    _drain(sender, led)
                except BaseException as exc:
                    errors.append(exc)

            threads = [
                threading.Thread(target=drain, args=(s, led))
                for (s, _), led in zip(senders, ledgers.values(), strict=True)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for s, _ in senders:
                s.close()
            assert errors == []
            injected = dict(srv.state.faults.injected)
            srv.state.set_faults(FaultConfig())
            for led in ledgers.values():
                assert led.state_counts() == {"sent": 48}
            for name, cust in customers.items():
                theirs = meter_totals(client, meters[UNIFIED_METER], cust, B0, B0 + 15 * H)
                ours = sum(
                    Decimal(r["value"])
                    for led in ledgers.values()
                    for r in led.rows()
                    if r["stripe_customer_id"] == cust
                )
                assert theirs == ours == truth[name], name
            assert srv.state.conflicting_identifiers() == []
            assert injected.get("429") and injected.get("500") and injected.get("cutoff"), injected
            assert "limit_v1_concurrency" not in injected and "limit_v1_rate" not in injected, injected
    finally:
        http.close()
        for led in ledgers.values():
            led.engine.dispose()


def test_a_cut_off_after_stripe_recorded_the_event_ends_sent_as_a_duplicate(ledger: Ledger) -> None:
    with StripeServerThread() as srv:
        client = make_client(KEY, srv.base_url, timeout=5)
        meters = ensure_meters(client, [UNIFIED_METER])
        cust = ensure_customers(client, {"o": "o@example.test"})["o"]
        _policy(ledger, "o", cust)
        truth = _fill(ledger, ["o"], buckets=2)
        ledger.close(NOW * 1000, LIVE)
        srv.state.set_faults(FaultConfig(p_cutoff=1.0))  # recorded by Stripe, answer lost
        sender, _ = _sender(ledger, client, max_attempts=1)
        try:
            first = sender.run_once()
            assert first.retry_later == 2 and ledger.state_counts() == {"pending": 2}
            assert len(srv.state.accepted_meter_events()) == 2
            srv.state.set_faults(FaultConfig())
            second = sender.run_once()
        finally:
            sender.close()
        assert (second.sent, second.duplicates) == (0, 2)
        assert ledger.state_counts() == {"sent": 2}
        assert all(r["last_error"].startswith("duplicate at Stripe") for r in ledger.rows())
        assert meter_totals(client, meters[UNIFIED_METER], cust, B0, B0 + 15 * H) == _gbs(truth["o"])
        assert srv.state.conflicting_identifiers() == []


def test_a_500_that_says_do_not_retry_is_sent_again_as_a_new_request(ledger: Ledger) -> None:
    with StripeServerThread() as srv:
        client = make_client(KEY, srv.base_url, timeout=5)
        meters = ensure_meters(client, [UNIFIED_METER])
        cust = ensure_customers(client, {"o": "o@example.test"})["o"]
        _policy(ledger, "o", cust)
        truth = _fill(ledger, ["o"], buckets=3)
        ledger.close(NOW * 1000, LIVE)
        srv.state.set_faults(FaultConfig(seed=1, p_500=0.5))  # 500 + Stripe-Should-Retry: false
        sender, _ = _sender(ledger, client)
        try:
            _drain(sender, ledger)
        finally:
            sender.close()
        assert srv.state.faults.injected.get("500")
        assert ledger.state_counts() == {"sent": 3}
        assert meter_totals(client, meters[UNIFIED_METER], cust, B0, B0 + 15 * H) == _gbs(truth["o"])
