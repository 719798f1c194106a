"""The webhook store on SQLite and PostgreSQL: the inbox, exactly-once finishing, the ordering guard in the
ledger, plan records to publish, the catalog table."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from models.policy import OrgPolicy
from models.webhooks import Outcome, SubscriptionChange
from sinks.ledger import Ledger
from sinks.schema import make_engine, migrate
from sinks.webhooks.store import Provisioned, WebhookStore

pytestmark = pytest.mark.integration

T = "stripe-webhook-events"


@pytest.fixture
def store(db_url: str) -> Iterator[WebhookStore]:
    engine = make_engine(db_url)
    migrate(engine)
    yield WebhookStore(engine, clock=lambda: 1_000_000)
    engine.dispose()


def raw(ident: str, etype: str, obj: dict[str, Any], created: int = 100) -> bytes:
    return orjson.dumps({"id": ident, "object": "event", "type": etype, "created": created, "data": {"object": obj}})


def sub_event(ident: str, etype: str, status: str, created: int, org: str = "o1") -> bytes:
    obj = {"id": "sub_1", "object": "subscription", "customer": "cus_1", "status": status, "metadata": {"org_id": org}}
    return raw(ident, etype, obj, created)


def change(status: str) -> SubscriptionChange:
    return SubscriptionChange("sub_1", "cus_1", "o1", status)


def policies(store: WebhookStore) -> list[tuple[str, int]]:
    out = []
    for p in store.pending_policies():
        pol = OrgPolicy.from_json(p.body)
        out.append((pol.plan.value, pol.effective_at_ms // 1000))
    return out


def test_receive_stores_each_event_once_with_a_receipt_per_record(store: WebhookStore) -> None:
    a = sub_event("evt_a", "customer.subscription.created", "active", 100)
    todo = store.receive(T, [(0, 0, a), (0, 1, b"not json"), (0, 2, a)])
    assert todo == ["evt_a"]
    assert store.receive(T, [(0, 0, a)]) == ["evt_a"]  # a redelivered record: nothing new, still to apply
    assert store.finish_subscription("evt_a", 100, change("active"), "o1") is Outcome.APPLIED
    assert store.receive(T, [(1, 0, a)]) == []  # a new delivery of an applied event: a duplicate
    rows = store.recent()
    assert [(r["offset"], r["outcome"]) for r in rows] == [
        (0, "duplicate"),
        (2, "applied"),
        (1, "invalid"),
        (0, "applied"),
    ]
    (ev,) = store.events()
    assert (ev["deliveries"], ev["outcome"], ev["org_id"]) == (3, "applied", "o1")
    counters = Ledger(store.engine).counters()
    assert counters["webhooks.type.customer.subscription.created"] == 1
    assert counters["webhooks.duplicate"] == 1 and counters["webhooks.invalid"] == 1


def test_an_event_is_finished_once_even_by_two_runs_at_once(store: WebhookStore) -> None:
    store.receive(T, [(0, 0, sub_event("evt_a", "customer.subscription.created", "active", 100))])
    results: list[Outcome] = []
    barrier = threading.Barrier(2)

    def run() -> None:
        barrier.wait()
        results.append(store.finish_subscription("evt_a", 100, change("active"), "o1"))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == sorted([Outcome.APPLIED, Outcome.DUPLICATE])
    assert policies(store) == [("pro", 100)]


def test_created_after_deleted_does_not_resurrect(store: WebhookStore) -> None:
    store.receive(
        T,
        [
            (0, 0, sub_event("evt_del", "customer.subscription.deleted", "canceled", 200)),
            (0, 1, sub_event("evt_cr", "customer.subscription.created", "active", 100)),
        ],
    )
    assert store.finish_subscription("evt_del", 200, change("canceled"), "o1") is Outcome.APPLIED
    assert store.finish_subscription("evt_cr", 100, change("active"), "o1") is Outcome.OUT_OF_ORDER
    assert policies(store) == [("free", 200)]
    (s,) = store.subscriptions()
    assert (s["status"], s["event_created_s"]) == ("canceled", 200)


def test_in_order_lifecycle_and_provisioning(store: WebhookStore) -> None:
    store.receive(T, [(0, 0, raw("evt_cs", "checkout.session.completed", {"id": "cs_1"}, 90))])
    result = Provisioned("sub_1", "cus_1", "active", "cbtxn_1", {"k": "v"})
    assert store.finish_provisioned("evt_cs", 90, "o1", result) is Outcome.APPLIED
    store.receive(T, [(0, 1, sub_event("evt_cr", "customer.subscription.created", "active", 91))])
    assert store.finish_subscription("evt_cr", 91, change("active"), "o1") is Outcome.APPLIED
    store.receive(T, [(0, 2, sub_event("evt_del", "customer.subscription.deleted", "canceled", 300))])
    assert store.finish_subscription("evt_del", 300, change("canceled"), "o1") is Outcome.APPLIED
    assert policies(store) == [("pro", 90), ("free", 300)]
    snap = store.org_snapshot("o1")
    assert (snap.customer_id, snap.generation, snap.credit_txn_id, snap.paying_subscriptions) == (
        "cus_1",
        1,
        "cbtxn_1",
        (),
    )
    (log,) = store.provisioning("o1")
    assert (log["mode"], log["subscription_id"], log["detail"]) == ("edge", "sub_1", {"k": "v"})
    pending = store.pending_policies()
    store.mark_published([p.id for p in pending])
    assert store.pending_policies() == []
    first = OrgPolicy.from_json(pending[0].body)
    assert (first.stripe_customer_id, first.stripe_subscription_id, first.billing_provider) == (
        "cus_1",
        "sub_1",
        "stripe",
    )


def test_requeue_never_reapplies_an_applied_event(store: WebhookStore) -> None:
    store.receive(T, [(0, 0, raw("evt_x", "checkout.session.completed", {"id": "cs_1"}))])
    assert store.finish_shadow("evt_x", "o1", "cus_1", {"would": 1}) is Outcome.SHADOW
    assert store.requeue("evt_x") is Outcome.SHADOW
    assert store.due() == ["evt_x"]
    assert store.finish_noop("evt_x", "o1", "done") is Outcome.APPLIED
    assert store.requeue("evt_x") is Outcome.APPLIED
    assert store.due() == []
    assert store.requeue("evt_nope") is None


def test_publish_catalog_writes_only_changes(store: WebhookStore) -> None:
    prices = {"overage": ("sandbox_compute_sandbox_overage", "price_1"), "reserved": ("m", "price_2")}
    assert store.publish_catalog(prices) == ["overage", "reserved"]
    before = store.catalog_rows()
    assert store.publish_catalog(prices) == []
    assert store.catalog_rows() == before
    assert store.publish_catalog({"reserved": ("m", "price_3")}) == ["reserved"]
    assert store.catalog() == {"overage": "price_1", "reserved": "price_3"}
