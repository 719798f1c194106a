"""The webhook agent's behaviour without Faust (:class:`WebhookRuntime`): events from the local Stripe, applied
through the official SDK over HTTP against a SQLite ledger. The worker-level tests are in test_webhooks.py."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import stripe

from infra.catalog import ensure_catalog
from infra.devkit.stripe_fake import FaultConfig, StripeServerThread
from models.billing import Authority
from models.catalog import CATALOG_KEYS
from models.policy import OrgPolicy
from models.webhooks import Outcome
from sinks.schema import make_engine, migrate
from sinks.stripe.v1 import make_client
from sinks.webhooks.provisioning import StripeProvisioner
from sinks.webhooks.store import WebhookStore
from streams.webhooks import WebhookRuntime

pytestmark = pytest.mark.integration


@dataclass
class World:
    srv: StripeServerThread
    client: stripe.StripeClient
    store: WebhookStore
    offset: int = 0

    def runtime(self, authority: Authority = Authority.EDGE) -> WebhookRuntime:
        return WebhookRuntime(
            WebhookStore(self.store.engine),
            topic="stripe-webhook-events",
            authority=authority,
            provisioner=StripeProvisioner(self.client),
        )

    def deliver(self, event: dict[str, Any]) -> list[str]:
        self.offset += 1
        return self.store.receive("stripe-webhook-events", [(0, self.offset, orjson.dumps(event))])

    def setup_checkout(self, org: str) -> tuple[str, dict[str, Any]]:
        """A customer for ``org`` completes a setup checkout; returns (customer, the completed event)."""
        cus = self.client.v1.customers.create({"email": f"{org}@x.test", "metadata": {"org_id": org}})
        session = self.client.v1.checkout.sessions.create(
            {"mode": "setup", "customer": cus.id, "currency": "usd", "metadata": {"org_id": org, "type": "setup"}}
        )
        self.srv.state.complete_checkout_session(session.id)
        event = next(
            e
            for e in self.srv.state.list_events({"limit": 100})["data"]
            if e["type"] == "checkout.session.completed" and e["data"]["object"]["id"] == session.id
        )
        return str(cus.id), event

    def subscriptions(self, customer: str) -> list[Any]:
        return list(self.client.v1.subscriptions.list({"customer": customer, "status": "all"}).data)

    def credits(self, customer: str) -> list[Any]:
        return list(self.client.v1.customers.balance_transactions.list(customer).data)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    engine = make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    migrate(engine)
    with StripeServerThread() as srv:
        client = make_client("sk_test_agent", srv.base_url, timeout=10)
        store = WebhookStore(engine)
        rep = ensure_catalog(client)
        store.publish_catalog(rep.prices)
        yield World(srv, client, store)
    engine.dispose()


def published(store: WebhookStore) -> list[tuple[str, str, str | None, str | None, int]]:
    out = []
    for p in store.pending_policies():
        pol = OrgPolicy.from_json(p.body)
        out.append(
            (pol.org_id, pol.plan.value, pol.stripe_customer_id, pol.stripe_subscription_id, pol.effective_at_ms)
        )
    return out


def test_a_setup_checkout_provisions_one_subscription_with_every_price_and_one_credit(world: World) -> None:
    customer, event = world.setup_checkout("org_a")
    rt = world.runtime()
    (eid,) = world.deliver(event)
    assert rt.apply(eid) is Outcome.APPLIED
    (sub,) = world.subscriptions(customer)
    catalog = world.store.catalog()
    assert sorted(i.price.id for i in sub["items"].data) == sorted(catalog[k] for k in CATALOG_KEYS)
    assert sub.metadata is not None and sub.metadata.to_dict() == {"org_id": "org_a"}
    assert world.client.v1.customers.retrieve(customer).balance == -3000
    assert published(world.store) == [("org_a", "pro", customer, sub.id, event["created"] * 1000)]
    # The same event again (a new delivery): a duplicate, nothing at Stripe.
    assert world.deliver(event) == []
    assert len(world.subscriptions(customer)) == 1 and len(world.credits(customer)) == 1


def test_a_crash_between_creating_and_recording_still_ends_with_one_of_each(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    customer, event = world.setup_checkout("org_b")
    (eid,) = world.deliver(event)
    rt = world.runtime()

    def crash(*args: Any, **kwargs: Any) -> Outcome:
        raise SystemExit("killed after Stripe answered, before the ledger commit")

    monkeypatch.setattr(rt.store, "finish_provisioned", crash)
    with pytest.raises(SystemExit):
        rt.apply(eid)
    assert len(world.subscriptions(customer)) == 1  # Stripe holds it; the ledger does not
    assert world.store.load(eid) is not None and world.store.load(eid).outcome is Outcome.RECEIVED  # type: ignore[union-attr]
    # A new process applies the event again: the subscription and the credit are found, not made again.
    assert world.runtime().apply(eid) is Outcome.APPLIED
    assert len(world.subscriptions(customer)) == 1
    assert len(world.credits(customer)) == 1
    assert world.client.v1.customers.retrieve(customer).balance == -3000
    assert world.store.org_snapshot("org_b").generation == 1


def test_a_transient_stripe_failure_is_retried_later(world: World) -> None:
    customer, event = world.setup_checkout("org_c")
    (eid,) = world.deliver(event)
    world.srv.state.set_faults(FaultConfig(p_429=1.0, paths=("/v1/subscriptions",)))  # rate limited: retry
    rt = world.runtime()
    assert rt.apply(eid) is Outcome.RECEIVED
    (ev,) = world.store.events()
    assert ev["attempts"] == 1 and "subscription" in (ev["detail"] or "")
    world.srv.state.set_faults(FaultConfig())
    assert rt.apply(eid) is Outcome.APPLIED
    assert len(world.subscriptions(customer)) == 1


def test_an_empty_catalog_fails_visibly_and_a_reapply_provisions(world: World) -> None:
    with world.store._w.begin() as conn:
        conn.exec_driver_sql("DELETE FROM billing_prices")
    customer, event = world.setup_checkout("org_d")
    (eid,) = world.deliver(event)
    rt = world.runtime()
    assert rt.apply(eid) is Outcome.FAILED
    assert "edgebill stripe setup" in (world.store.events()[0]["detail"] or "")
    assert world.subscriptions(customer) == []
    world.store.publish_catalog(ensure_catalog(world.client).prices)
    assert world.store.requeue(eid) is Outcome.FAILED
    assert world.store.due() == [eid]
    assert rt.apply(eid) is Outcome.APPLIED
    assert len(world.subscriptions(customer)) == 1


def test_under_authority_cell_nothing_is_created_and_the_shadow_log_says_what_would_be(world: World) -> None:
    customer, event = world.setup_checkout("org_e")
    (eid,) = world.deliver(event)
    assert world.runtime(Authority.CELL).apply(eid) is Outcome.SHADOW
    assert world.subscriptions(customer) == []
    assert world.credits(customer) == []
    (log,) = world.store.provisioning(mode="shadow")
    would = log["detail"]
    assert would["subscription"]["idempotency_key"] == "sub-create-org_e"
    assert len(would["subscription"]["items"]) == len(CATALOG_KEYS)
    assert would["credit"]["amount"] == -3000
    assert published(world.store) == []
    # The cell's own subscription (no org_id metadata) is still found through the customer.
    price = world.store.catalog()["overage"]
    sub = world.client.v1.subscriptions.create({"customer": customer, "items": [{"price": price}]})
    created = next(
        e for e in world.srv.state.list_events({"limit": 100})["data"] if e["type"] == "customer.subscription.created"
    )
    (sid,) = world.deliver(created)
    assert world.runtime(Authority.CELL).apply(sid) is Outcome.APPLIED
    assert [p[:4] for p in published(world.store)] == [("org_e", "pro", customer, sub.id)]
