"""The v2 meter-event stream: outbox -> official SDK -> the local Stripe server over real HTTP.

Faults of every kind, Stripe's asynchronous error reports reconciled into ``rejected``, session renewal
(before expiry and after a 401), and the worker's wiring of the mode.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pytest
import stripe
from pydantic import SecretStr

from infra.catalog import ensure_customers, ensure_meters, meter_totals
from infra.devkit.stripe_fake import FaultConfig, StripeServerThread
from infra.runtime import build_sender
from infra.settings import StripeSettings
from models.billing import UNIFIED_METER
from models.policy import OrgPolicy
from models.ticks import Tick
from sinks.base import RetryingSink
from sinks.ledger import CloseConfig, Ledger, SourcedTick
from sinks.outbox_sender import V2_ACCEPTED_NOTE, OutboxSender
from sinks.schema import make_engine, migrate
from sinks.stripe.v1 import make_client
from sinks.stripe.v2 import ERROR_REPORT_CURSOR, ErrorReportReconciler, MeterEventSessions, StripeStreamSink

pytestmark = pytest.mark.integration

H = 3600
NOW = int(time.time())
B0 = (NOW // H - 12) * H
LIVE = CloseConfig(bucket_seconds=H, grace_seconds=600, shadow=False, bill_from=B0)
KEY = "sk_test_edgebill"


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
    """Two ticks per org per bucket; exact MB-s per org."""
    truth: dict[str, int] = {}
    ticks = []
    n = 0
    for org in orgs:
        for b in range(buckets):
            for k in range(2):
                n += 1
                secs = 19 + k + b % 5
                ts = (B0 + b * H + 60 * k) * 1000
                ticks.append(SourcedTick(Tick(f"{org}:{b}:{k}", org, "sb", "w", "c", mb, 0, secs, ts), 0, n))
                truth[org] = truth.get(org, 0) + mb * secs
    led.write_ticks("usage-ticks", ticks, bucket_seconds=H, progress={0: (n, None)})
    return truth


def _gbs(mb_s: int) -> Decimal:
    return (Decimal(mb_s) / 1024).quantize(Decimal("0.000001"), rounding=ROUND_HALF_UP)


def _v2(
    led: Ledger, client: stripe.StripeClient, sessions: MeterEventSessions | None = None, per_request: int = 100
) -> tuple[OutboxSender, StripeStreamSink]:
    inner = StripeStreamSink(client, concurrency=4, sessions=sessions, events_per_request=per_request)
    sink = RetryingSink(inner, max_attempts=8, sleep=lambda s: None)
    reconciler = ErrorReportReconciler(client, led)
    sender = OutboxSender(
        led,
        sink,
        batch=500,
        now_s=lambda: int(time.time()),
        reconciler=reconciler,
        reconcile_every_s=0,
        on_close=[inner.close],
    )
    return sender, inner


def _drain(sender: OutboxSender, led: Ledger, rounds: int = 30) -> None:
    for _ in range(rounds):
        sender.run_once()
        if not led.state_counts().get("pending"):
            return
    raise AssertionError(f"rows still pending after {rounds} rounds: {led.state_counts()}")


def _stream_statuses(srv: StripeServerThread) -> dict[int, int]:
    return {
        r["status"]: r["count"]
        for r in srv.state.request_counts()
        if r["path"] == "/v2/billing/meter_event_stream" and r["method"] == "POST"
    }


@pytest.mark.parametrize(
    "faults",
    [
        FaultConfig(live_limits=True),
        # seed 9: the first 30 requests already draw every kind of fault (4 events a request here)
        FaultConfig(seed=9, p_429=0.04, p_500=0.03, p_cutoff=0.03, p_slow=0.05, slow_seconds=0.01, live_limits=True),
    ],
    ids=["clean", "10pct-faults"],
)
def test_v2_every_row_reaches_stripe_exactly_once(ledger: Ledger, faults: FaultConfig) -> None:
    orgs = [f"org{i}" for i in range(12)]
    with StripeServerThread() as srv:
        client = make_client(KEY, srv.base_url, timeout=5)
        meters = ensure_meters(client)
        customers = ensure_customers(client, {o: f"{o}@example.test" for o in orgs})
        for o in orgs:
            _policy(ledger, o, customers[o])
        truth = _fill(ledger, orgs, buckets=10)
        ledger.close(NOW * 1000, LIVE)
        srv.state.set_faults(faults)
        sender, _ = _v2(ledger, client, per_request=4)  # many small requests: many chances to fail
        try:
            _drain(sender, ledger)
        finally:
            sender.close()
        injected = dict(srv.state.faults.injected)
        srv.state.set_faults(FaultConfig())  # (resets the injected counts)
        assert ledger.state_counts() == {"sent": 120}
        for o in orgs:
            theirs = meter_totals(client, meters[UNIFIED_METER], customers[o], B0, B0 + 13 * H)
            ours = sum(Decimal(r["value"]) for r in ledger.rows(org=o))
            assert theirs == ours == _gbs(truth[o])
        assert srv.state.conflicting_identifiers() == []
        assert srv.state.error_report_list() == []
        if faults.p_429:
            assert injected.get("429") and injected.get("500") and injected.get("cutoff"), injected
            # cut off after Stripe recorded them: sent again, absorbed by Stripe's identifier dedup
            assert srv.state.duplicate_attempt_list()


def test_v2_rows_are_sent_with_a_visible_note_and_stripes_later_refusals_become_rejected(ledger: Ledger) -> None:
    with StripeServerThread() as srv:
        client = make_client(KEY, srv.base_url, timeout=5)
        meters = ensure_meters(client, [UNIFIED_METER])  # no legacy tier meters at Stripe
        cust = ensure_customers(client, {"good": "g@example.test", "legacy": "l@example.test"})
        _policy(ledger, "good", cust["good"])
        _policy(ledger, "ghost", "cus_doesnotexist")  # passes pre-send checks; Stripe knows no such customer
        _policy(ledger, "legacy", cust["legacy"], mode="legacy")  # its 4gb meter does not exist at Stripe
        truth = _fill(ledger, ["good", "ghost"], buckets=3)
        _fill(ledger, ["legacy"], buckets=2, mb=4096)
        ledger.close(NOW * 1000, LIVE)
        sender, _ = _v2(ledger, client)
        try:
            report = sender.run_once()
        finally:
            sender.close()
        # Every event was accepted (202), then Stripe's validation refused five of them.
        assert (report.sent, report.accepted_async, report.rejected, report.rejected_async) == (8, 8, 0, 5)
        assert ledger.state_counts() == {"sent": 3, "rejected": 5}
        good = ledger.rows(org="good")
        assert {r["state"] for r in good} == {"sent"} and {r["last_error"] for r in good} == {V2_ACCEPTED_NOTE}
        for r in ledger.rows(org="ghost"):
            assert r["state"] == "rejected"
            assert "meter_event_customer_not_found" in r["last_error"] and "cus_doesnotexist" in r["last_error"]
        for r in ledger.rows(org="legacy"):
            assert r["state"] == "rejected" and "(no_meter)" in r["last_error"]
        assert meter_totals(client, meters[UNIFIED_METER], cust["good"], B0, B0 + 13 * H) == _gbs(truth["good"])
        assert ledger.counters()["rows.rejected_async"] == 5
        cursor = ledger.stripe_cursor(ERROR_REPORT_CURSOR)
        assert cursor is not None and cursor > (NOW - 60) * 1000
        # Reading the same reports again changes nothing.
        again = ErrorReportReconciler(client, ledger).run_once()
        assert again.events == 5 and again.rejected == 0
        assert ledger.counters()["rows.rejected_async"] == 5


def test_v2_error_reports_are_read_across_pages(ledger: Ledger) -> None:
    with StripeServerThread() as srv:
        client = make_client(KEY, srv.base_url, timeout=5)
        ensure_meters(client, [UNIFIED_METER])
        orgs = [f"ghost{i}" for i in range(25)]
        for i, o in enumerate(orgs):
            _policy(ledger, o, f"cus_ghost{i}")
        _fill(ledger, orgs, buckets=1)
        ledger.close(NOW * 1000, LIVE)
        inner = StripeStreamSink(client, concurrency=2, events_per_request=1)  # one report per request
        sender = OutboxSender(ledger, RetryingSink(inner, sleep=lambda s: None), now_s=lambda: int(time.time()))
        try:
            sender.run_once()
        finally:
            inner.close()
        assert ledger.state_counts() == {"sent": 25}
        report = ErrorReportReconciler(client, ledger, page_size=10).run_once()
        assert (report.events, report.rejected) == (25, 25)
        assert ledger.state_counts() == {"rejected": 25}


def test_v2_session_is_renewed_before_it_expires(ledger: Ledger) -> None:
    with StripeServerThread() as srv:
        client = make_client(KEY, srv.base_url, timeout=5)
        ensure_meters(client)
        cust = ensure_customers(client, {"o": "o@example.test"})["o"]
        _policy(ledger, "o", cust)
        _fill(ledger, ["o"], buckets=2)
        ledger.close(NOW * 1000, LIVE)
        # The sender's clock is the server's (advance_clock moves both): it sees expiry coming.
        sessions = MeterEventSessions(client, margin_s=60, now=srv.state.now)
        sender, _ = _v2(ledger, client, sessions=sessions)
        try:
            sender.run_once()
            srv.state.advance_clock(14 * 60 + 30)  # 30 s before expiry, inside the 60 s margin
            _fill(ledger, ["o"], buckets=4)  # two more buckets -> two more rows, sent with a new session
            ledger.close(int(srv.state.now()) * 1000, LIVE)
            _drain(sender, ledger)
        finally:
            sender.close()
        assert sessions.created == 2
        assert 401 not in _stream_statuses(srv)  # never refused: renewed in time
        assert ledger.state_counts() == {"sent": 4}


def test_v2_expired_session_is_renewed_after_a_401_and_the_request_sent_again(ledger: Ledger) -> None:
    with StripeServerThread() as srv:
        client = make_client(KEY, srv.base_url, timeout=5)
        meters = ensure_meters(client)
        cust = ensure_customers(client, {"o": "o@example.test"})["o"]
        _policy(ledger, "o", cust)
        truth = _fill(ledger, ["o"], buckets=2)
        ledger.close(NOW * 1000, LIVE)
        sessions = MeterEventSessions(client, margin_s=60)  # local clock: it cannot see the fake's jump
        sender, _ = _v2(ledger, client, sessions=sessions)
        try:
            sessions.token()  # a session exists, then Stripe's clock passes its expiry
            srv.state.advance_clock(16 * 60)
            report = sender.run_once()
        finally:
            sender.close()
        assert report.sent == 2 and report.retry_later == 0
        assert sessions.created == 2
        assert _stream_statuses(srv) == {401: 1, 202: 1}
        assert meter_totals(client, meters[UNIFIED_METER], cust, B0, B0 + 13 * H) == _gbs(truth["o"])


@pytest.mark.parametrize("mode", ["v1", "v2"])
def test_the_worker_builds_the_sender_of_the_configured_mode(ledger: Ledger, mode: Any) -> None:
    with StripeServerThread() as srv:
        client = make_client(KEY, srv.base_url, timeout=5)
        meters = ensure_meters(client)
        cust = ensure_customers(client, {"o": "o@example.test"})["o"]
        _policy(ledger, "o", cust)
        truth = _fill(ledger, ["o"], buckets=3)
        ledger.close(NOW * 1000, LIVE)
        st = StripeSettings(api_base=srv.base_url, api_key=SecretStr(KEY), mode=mode)
        sender = build_sender(st, ledger, sleep=lambda s: None)
        try:
            report = sender.run_once()
        finally:
            sender.close()
        assert report.sent == 3 and report.accepted_async == (3 if mode == "v2" else 0)
        paths = {r["path"] for r in srv.state.request_counts()}
        assert ("/v2/billing/meter_event_stream" in paths) == (mode == "v2")
        assert ("/v1/billing/meter_events" in paths) == (mode == "v1")
        notes = {r["last_error"] for r in ledger.rows()}
        assert notes == ({V2_ACCEPTED_NOTE} if mode == "v2" else {None})
        assert meter_totals(client, meters[UNIFIED_METER], cust, B0, B0 + 13 * H) == _gbs(truth["o"])
