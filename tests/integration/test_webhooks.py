"""How an org becomes pro, end to end: the local Stripe delivers signed events over HTTP to ``edgebill worker``
(broker, SQLite ledger), which provisions through the official SDK and publishes org policy; ticks are then
billed by that policy. Each acceptance point of the webhook path is its own test.

The truth of the billing test is computed here from the ticks the test publishes, with integers.
"""

from __future__ import annotations

import signal
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest
import stripe

from infra.catalog import ensure_catalog, ensure_webhook_endpoint, meter_totals
from infra.devkit.stripe_fake import FaultConfig
from infra.kafka_io import publish_sync
from models.billing import UNIFIED_METER
from models.catalog import CATALOG_KEYS
from sinks.webhooks.store import WebhookStore

pytestmark = pytest.mark.integration

H = 3600


@dataclass
class Hooked:
    """A stack whose local Stripe delivers to the worker's ``/webhooks/stripe``."""

    stack: Any
    store: WebhookStore
    secret: str
    url: str
    endpoint: str

    @property
    def client(self) -> stripe.StripeClient:
        return self.stack.client  # type: ignore[no-any-return]

    @property
    def state(self) -> Any:
        return self.stack.stripe.state

    def start(self) -> None:
        """A worker on the endpoint's port, with the endpoint's signing secret."""
        env = {"EDGEBILL_STRIPE_WEBHOOK_SECRET": self.secret, "EDGEBILL_STRIPE_WEBHOOK_RETRY_INTERVAL": "0.5"}
        self.stack.start_worker(env, port=self.stack.web_port)
        self.stack.wait(self.stack.healthy, 60, "the worker's web server")

    def post(self, body: bytes, signature: str) -> int:
        req = urllib.request.Request(self.url, data=body, headers={"Stripe-Signature": signature}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            e.close()
            return int(e.code)

    def customer(self, org: str) -> str:
        return str(self.client.v1.customers.create({"email": f"{org}@x.test", "metadata": {"org_id": org}}).id)

    def setup_checkout(self, org: str, customer: str) -> str:
        """The org's customer completes a setup checkout; returns the session id."""
        session = self.client.v1.checkout.sessions.create(
            {
                "mode": "setup",
                "customer": customer,
                "currency": "usd",
                "success_url": "https://x.test/ok",
                "metadata": {"org_id": org, "type": "setup"},
            }
        )
        self.state.complete_checkout_session(session.id)
        return str(session.id)

    def event_of(self, etype: str, object_id: str) -> dict[str, Any]:
        return next(
            e
            for e in self.state.list_events({"limit": 100})["data"]
            if e["type"] == etype and e["data"]["object"]["id"] == object_id
        )

    def outcome(self, event_id: str) -> str | None:
        rows = [e for e in self.store.events() if e["event_id"] == event_id]
        return rows[0]["outcome"] if rows else None

    def wait_outcome(self, event_id: str, outcome: str, timeout: float = 60) -> None:
        self.stack.wait(lambda: self.outcome(event_id) == outcome, timeout, f"{event_id} {outcome}")

    def policies(self, org: str) -> list[tuple[str, int, str | None, str | None]]:
        return [
            (p["plan"], p["effective_ms"] // 1000, p["stripe_customer_id"], p["stripe_subscription_id"])
            for p in self.stack.ledger.policies(org)
        ]

    def subscriptions(self, customer: str) -> list[Any]:
        return list(self.client.v1.subscriptions.list({"customer": customer, "status": "all"}).data)

    def credits(self, customer: str) -> list[Any]:
        return list(self.client.v1.customers.balance_transactions.list(customer).data)


@pytest.fixture
def hooked(make_stack: Any) -> Any:
    def factory(**env: str) -> Hooked:
        stack = make_stack(**env)
        store = WebhookStore(stack.ledger.engine)
        rep = ensure_catalog(stack.client)
        assert rep.complete
        store.publish_catalog(rep.prices)
        url = f"http://127.0.0.1:{stack.web_port}/webhooks/stripe"
        ensure_webhook_endpoint(stack.client, url, rep)
        assert rep.endpoint is not None and rep.endpoint_secret is not None
        return Hooked(stack, store, rep.endpoint_secret, url, rep.endpoint)

    return factory


def sign(body: bytes, secret: str, at: int | None = None) -> str:
    return str(stripe.WebhookSignature.generate_signature_header(body.decode(), secret, at or int(time.time())))


def iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_a_setup_checkout_makes_the_org_pro_from_then_and_deletion_free_from_then(hooked: Any) -> None:
    h: Hooked = hooked()
    h.start()
    org = "org_pro"
    customer = h.customer(org)
    # Stripe's clock four hours back: the checkout completes at now-4h, the deletion at now-3h, so the ticks
    # around both moments (up to an hour after the deletion) are in buckets that closed at least an hour ago,
    # whatever the minute of the hour the test runs at (a bucket closes 10 minutes after its end).
    h.state.advance_clock(-4 * H)
    session = h.setup_checkout(org, customer)
    completed = h.event_of("checkout.session.completed", session)
    t_pro = int(completed["created"])
    h.wait_outcome(completed["id"], "applied")
    (sub,) = h.subscriptions(customer)
    catalog = h.store.catalog()
    assert sorted(i.price.id for i in sub["items"].data) == sorted(catalog[k] for k in CATALOG_KEYS)
    assert sub.metadata is not None and sub.metadata.to_dict() == {"org_id": org}
    assert h.client.v1.customers.retrieve(customer).balance == -3000
    assert len(h.credits(customer)) == 1
    h.stack.wait(lambda: h.policies(org)[:1] == [("pro", t_pro, customer, sub.id)], 60, "the pro policy")

    h.state.advance_clock(H)
    h.client.v1.subscriptions.cancel(sub.id)
    deleted = h.event_of("customer.subscription.deleted", sub.id)
    t_free = int(deleted["created"])
    h.wait_outcome(deleted["id"], "applied")
    h.stack.wait(lambda: ("free", t_free, customer, None) in h.policies(org), 60, "the free policy")
    assert [p[0] for p in h.policies(org)] == ["pro", "free"]
    h.state.advance_clock(3 * H)  # Stripe's clock back to now: meter events are checked against it

    # One tick a minute, 2 GiB for 60 s (120 GB-s), from an hour before the checkout to an hour after deletion.
    ticks = [
        {
            "id": f"sb_p:0:{i}",
            "type": "usage_tick",
            "sandbox_id": "sb_p",
            "org_id": org,
            "plan": "free",
            "cell_id": "c1",
            "payload": {"sandbox_id": "sb_p", "interval_s": 60, "memory_mb": 2048, "cpu_count": 1},
            "timestamp": iso(ts),
        }
        for i, ts in enumerate(range(t_pro - H + 7, t_free + H, 60))
    ]
    publish_sync(h.stack.bootstrap, h.stack.topic("usage-ticks"), [(org.encode(), orjson.dumps(t)) for t in ticks])
    mb_s = 2048 * 60
    stamps = [int(datetime.strptime(t["timestamp"], "%Y-%m-%dT%H:%M:%S%z").timestamp()) for t in ticks]
    pro_mb_s = sum(mb_s for ts in stamps if t_pro <= ts < t_free)
    before_mb_s = sum(mb_s for ts in stamps if ts < t_pro)
    after_mb_s = sum(mb_s for ts in stamps if ts >= t_free)
    assert pro_mb_s and before_mb_s and after_mb_s

    led = h.stack.ledger

    def billed() -> bool:
        st = led.state_counts()
        c = led.counters()
        return (
            c.get("ticks.ingested", 0) == len(ticks)
            and led.open_samples() == 0
            and st.get("pending", 0) == 0
            and st.get("sent", 0) > 0
        )

    h.stack.wait(billed, 120, "every tick billed and sent")
    truth = Decimal(pro_mb_s) / 1024
    rows = led.rows(org=org)
    assert {r["state"] for r in rows} == {"sent"} and {r["stripe_customer_id"] for r in rows} == {customer}
    assert sum((Decimal(r["value"]) for r in rows), Decimal(0)) == truth
    meter = next(m for m in h.client.v1.billing.meters.list({"limit": 100}).data if m.event_name == UNIFIED_METER)
    start = (t_pro - 2 * H) // H * H
    assert meter_totals(h.client, meter.id, customer, start, start + 6 * H) == truth
    unbilled: dict[str, int] = {}
    for u in led.unbilled():
        if u["org_id"] == org:
            unbilled[u["reason"]] = unbilled.get(u["reason"], 0) + u["mb_seconds"]
    assert unbilled == {"unknown_org": before_mb_s, "free_plan": after_mb_s}


def test_the_same_event_delivered_twice_is_applied_once(hooked: Any) -> None:
    h: Hooked = hooked()
    h.start()
    customer = h.customer("org_twice")
    session = h.setup_checkout("org_twice", customer)
    completed = h.event_of("checkout.session.completed", session)
    h.wait_outcome(completed["id"], "applied")
    h.state.resend_event(completed["id"])
    h.stack.wait(
        lambda: (
            [r["outcome"] for r in h.store.recent() if r["event_id"] == completed["id"]] == ["duplicate", "applied"]
        ),
        60,
        "the second delivery recorded as a duplicate",
    )
    assert len(h.subscriptions(customer)) == 1 and len(h.credits(customer)) == 1
    assert h.client.v1.customers.retrieve(customer).balance == -3000
    assert len(h.store.provisioning("org_twice")) == 1
    (ev,) = [e for e in h.store.events() if e["event_id"] == completed["id"]]
    assert ev["deliveries"] == 2


def _refused(h: Hooked, signature_for: Any) -> None:
    customer = h.customer("org_refused")
    h.state.set_webhook_speed(1e9)  # the endpoint is not the subject here
    h.client.v1.webhook_endpoints.update(h.endpoint, {"disabled": True})
    session = h.setup_checkout("org_refused", customer)
    body = orjson.dumps(h.event_of("checkout.session.completed", session))
    assert h.post(body, signature_for(body)) == 400
    time.sleep(2)  # had it been stored, the agent would have provisioned by now
    assert h.store.events() == [] and h.store.recent() == []
    assert h.subscriptions(customer) == [] and h.credits(customer) == []


def test_an_event_replayed_after_301_s_is_refused(hooked: Any) -> None:
    h: Hooked = hooked()
    h.start()
    _refused(h, lambda body: sign(body, h.secret, at=int(time.time()) - 301))


def test_a_forged_signature_is_refused(hooked: Any) -> None:
    h: Hooked = hooked()
    h.start()
    _refused(h, lambda body: sign(body, "whsec_not_the_endpoints"))


def test_created_delivered_after_deleted_does_not_resurrect_pro(hooked: Any) -> None:
    h: Hooked = hooked()
    h.start()
    org = "org_order"
    customer = h.customer(org)
    price = h.store.catalog()["overage"]
    h.client.v1.webhook_endpoints.update(h.endpoint, {"disabled": True})  # deliveries by hand, out of order
    sub = h.client.v1.subscriptions.create(
        {"customer": customer, "items": [{"price": price}], "metadata": {"org_id": org}}
    )
    h.state.advance_clock(10)
    h.client.v1.subscriptions.cancel(sub.id)
    created = h.event_of("customer.subscription.created", sub.id)
    deleted = h.event_of("customer.subscription.deleted", sub.id)
    assert created["created"] < deleted["created"]
    h.client.v1.webhook_endpoints.update(h.endpoint, {"disabled": False})
    h.state.resend_event(deleted["id"])
    h.wait_outcome(deleted["id"], "applied")
    h.state.resend_event(created["id"])
    h.wait_outcome(created["id"], "out_of_order")
    time.sleep(1.5)  # a pro record would have reached the ledger by now
    assert h.policies(org) == [("free", deleted["created"], customer, None)]
    (s,) = h.store.subscriptions(org)
    assert s["status"] == "canceled"


def test_a_crash_between_creating_the_subscription_and_recording_it(hooked: Any) -> None:
    h: Hooked = hooked()
    h.start()
    org = "org_crash"
    customer = h.customer(org)
    # The credit request (after the subscription) hangs for a while: the worker is killed inside that window.
    h.state.set_faults(FaultConfig(p_slow=1.0, slow_seconds=6.0, paths=("/v1/customers/",), methods=("POST",)))
    session = h.setup_checkout(org, customer)
    completed = h.event_of("checkout.session.completed", session)
    h.stack.wait(lambda: len(h.subscriptions(customer)) == 1, 60, "the subscription at Stripe")
    worker = h.stack.procs[0]
    h.stack.kill9(worker)
    assert worker.returncode == -signal.SIGKILL
    assert h.outcome(completed["id"]) == "received"  # stored, never recorded as applied
    h.state.set_faults(FaultConfig())
    h.stack.restart(worker)  # same port, same environment
    h.stack.wait(h.stack.healthy, 60, "the restarted worker")
    h.wait_outcome(completed["id"], "applied", timeout=90)
    assert len(h.subscriptions(customer)) == 1
    assert len(h.credits(customer)) == 1
    assert h.client.v1.customers.retrieve(customer).balance == -3000
    (log,) = h.store.provisioning(org)
    assert log["detail"]["adopted_subscription"] is True
    # Pro from the checkout's time on. The subscription's own `created` event may be applied before the
    # checkout is re-applied after the restart: then the history holds pro from the subscription's time
    # and is extended back to the checkout's (two pro records, the same bill), never anything but pro.
    h.stack.wait(
        lambda: (
            {p[0] for p in h.policies(org)} == {"pro"} and min(p[1] for p in h.policies(org)) == completed["created"]
        ),
        60,
        "the pro policy from the checkout's time",
    )


def test_under_authority_cell_nothing_is_created_and_a_shadow_log_is_written(hooked: Any) -> None:
    h: Hooked = hooked(EDGEBILL_PRO_BILLING_AUTHORITY="cell", EDGEBILL_SHADOW="true")
    h.start()
    org = "org_cell"
    customer = h.customer(org)
    session = h.setup_checkout(org, customer)
    completed = h.event_of("checkout.session.completed", session)
    h.wait_outcome(completed["id"], "shadow")
    assert h.subscriptions(customer) == [] and h.credits(customer) == []
    assert h.client.v1.customers.retrieve(customer).balance == 0
    (log,) = h.store.provisioning(org, mode="shadow")
    assert log["detail"]["subscription"]["idempotency_key"] == f"sub-create-{org}"
    assert log["detail"]["credit"]["amount"] == -3000
    assert log["detail"]["policy"] == {"plan": "pro", "effective_at": completed["created"]}
    assert h.policies(org) == []
