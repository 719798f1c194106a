"""The scheduled reconciliation stays under its stated share of Stripe's read rate limit: the local Stripe enforces
test mode's 25 read requests a second, and the run, paced by EDGEBILL_STRIPE_AUDIT_READS_PER_S (default 5, a fifth
of it), is never refused and never goes faster. Against a Stripe that allows less than that pace, 429s are
retried after a backoff at a slower pace and the run still compares everything."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from infra.catalog import ensure_customers, ensure_meters
from infra.devkit.stripe_fake import FaultConfig, StripeServerThread
from infra.runtime import build_reconciliation, worker_config
from infra.settings import load_settings
from models.policy import OrgPolicy
from models.reconcile import DAY, Label
from models.ticks import Tick
from sinks.base import RetryingSink
from sinks.ledger import CloseConfig, Ledger, SourcedTick
from sinks.outbox_sender import OutboxSender
from sinks.reconcile.store import ReconcileStore
from sinks.reconcile.stripe_reader import DEFAULT_READS_PER_S, STRIPE_READ_LIMITS
from sinks.schema import make_engine, migrate
from sinks.stripe.v1 import make_client
from sinks.stripe.v2 import StripeStreamSink
from streams.pipeline import Deps
from streams.reconcile import ReconcileRuntime

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


def _fleet(ledger: Ledger, srv: StripeServerThread, orgs: int) -> None:
    client = make_client("sk_test_k", srv.base_url, timeout=5)
    ensure_meters(client)
    names = [f"org{i:02d}" for i in range(orgs)]
    cust = ensure_customers(client, {o: f"{o}@x.test" for o in names})
    ticks = []
    for o in names:
        p = OrgPolicy.model_validate({"org_id": o, "plan": "pro", "stripe_customer_id": cust[o], "effective_at": 0})
        ledger.write_policies("org-policy", [(p, 0, 0)], {0: (0, None)}, {})
        ticks += [Tick(f"{o}:{h}", o, "sb", "w", "c", 2048, 0, 20, (D + h * H + 5) * 1000) for h in (3, 9)]
    sourced = [SourcedTick(t, 0, i) for i, t in enumerate(ticks)]
    ledger.write_ticks("usage-ticks", sourced, bucket_seconds=H, progress={0: (len(sourced), None)})
    ledger.close(NOW * 1000, LIVE)
    inner = StripeStreamSink(client, concurrency=2)
    sender = OutboxSender(ledger, RetryingSink(inner, sleep=lambda s: None), now_s=lambda: int(time.time()))
    try:
        sender.run_once()
    finally:
        inner.close()
    assert set(ledger.state_counts()) == {"sent"}


def _runtime(ledger: Ledger, url: str, base: str) -> ReconcileRuntime:
    settings = load_settings(
        db={"url": url},
        stripe={"api_base": base, "audit_settle": 0, "audit_lookback_days": 3},
        billing={"shadow": False, "pro_billing_authority": "edge", "bill_from": D - DAY},
    )
    rec = build_reconciliation(settings, ledger.engine)
    deps = Deps(config=worker_config(settings), ledger=ledger, sender=None, reconciliation=rec)
    return ReconcileRuntime(rec, alerts_topic=deps.config.topics.alerts, clock_ms=deps.clock_ms)


def test_the_scheduled_run_stays_under_a_fifth_of_stripes_read_limit(ledger: Ledger, sqlite_url: str) -> None:
    limit = STRIPE_READ_LIMITS["test"]
    assert DEFAULT_READS_PER_S / limit == pytest.approx(0.2)  # the stated share
    with StripeServerThread(faults=FaultConfig(read_limits=True, reads_per_s=limit)) as srv:
        _fleet(ledger, srv, orgs=20)
        rt = _runtime(ledger, sqlite_url, srv.base_url)
        assert rt.rec.reader.reads_per_s == DEFAULT_READS_PER_S
        t0 = time.monotonic()
        report, _alerts = rt.run_once()
        reads = [r for r in srv.state.request_times() if r[0] >= t0]
        refused = srv.state.faults.injected.get("limit_reads", 0)
    assert report.failure is None and refused == 0 and report.throttled == 0
    assert [r.label for r in report.results] == [Label.OK] * 20
    assert {r[3] for r in reads} == {200} and len(reads) == report.requests == 22  # meters, error reports, 20 pairs
    times = [r[0] for r in reads]
    busiest = max(sum(1 for t in times if s <= t < s + 1.0) for s in times)
    assert busiest <= DEFAULT_READS_PER_S + 1, busiest  # +1: a request served late next to one on time
    assert (len(times) - 1) / (times[-1] - times[0]) <= DEFAULT_READS_PER_S * 1.05
    run = ReconcileStore(ledger.engine).last_run()
    assert run is not None and (run["requests"], run["throttled"], run["compared"]) == (22, 0, 20)


def test_a_stripe_allowing_less_is_answered_with_backoff_and_the_run_completes(ledger: Ledger, sqlite_url: str) -> None:
    with StripeServerThread(faults=FaultConfig(read_limits=True, reads_per_s=2)) as srv:
        _fleet(ledger, srv, orgs=8)
        time.sleep(1.1)  # the set-up's own reads out of the limiter's window
        rt = _runtime(ledger, sqlite_url, srv.base_url)
        report, _alerts = rt.run_once()
        refused = srv.state.faults.injected.get("limit_reads", 0)
    assert report.failure is None and refused > 0 and report.throttled == refused
    assert [r.label for r in report.results] == [Label.OK] * 8
    assert rt.rec.reader.reads_per_s < DEFAULT_READS_PER_S  # slowed down for the rest of the run
    run = ReconcileStore(ledger.engine).last_run()
    assert run is not None and run["throttled"] == refused and run["error"] is None
