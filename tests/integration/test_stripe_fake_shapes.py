"""Every object the local Stripe server returns has the shape of Stripe's own example object.

v1 objects are compared with ``fixtures3.json`` (Stripe's published example for each resource,
from github.com/stripe/openapi): same key set and ``object`` value, recursively into nested
objects both sides have (free-form maps such as ``metadata`` and ``payload`` excepted). v2 objects,
which that file does not cover, are compared with the fields the official SDK declares.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import stripe

from infra.devkit.stripe_fake import StripeServerThread

pytestmark = pytest.mark.integration

#: Stripe's own example object for every resource (MIT, Stripe), vendored with its licence.
FIXTURE_CANDIDATES = [Path(__file__).resolve().parents[1] / "fixtures" / "stripe" / "fixtures3.json"]
FREE_FORM = {"metadata", "payload", "previous_attributes"}
#: Sub-objects whose content is another resource (checked on its own) rather than this one's shape.
OTHER_RESOURCE = {"event.data.object"}
#: Keys Stripe documents as present only sometimes, which one example object cannot show.
SOMETIMES = {
    "event.data": {"previous_attributes"},  # on *.updated events
    # an invoice line's price, present when ``pricing.type`` is ``price_details`` (every subscription line)
    "line_item.pricing": {"price_details"},
    "invoice.lines.data[0].pricing": {"price_details"},
}
#: Keys Stripe leaves out of some objects: ``quantity`` of a subscription item on a metered price.
OMITTED = {"subscription_item": {"quantity"}, "subscription.items.data[0]": {"quantity"}}

Obj = dict[str, Any]


@pytest.fixture(scope="module")
def fixtures() -> dict[str, Obj]:
    for path in FIXTURE_CANDIDATES:
        if path.is_file():
            resources: dict[str, Obj] = json.loads(path.read_text())["resources"]
            return resources
    pytest.fail(f"Stripe's fixtures3.json not found; looked in {[str(p) for p in FIXTURE_CANDIDATES]}")


@pytest.fixture(scope="module")
def server() -> Iterator[StripeServerThread]:
    with StripeServerThread() as srv:
        yield srv


@pytest.fixture(scope="module")
def api(server: StripeServerThread) -> Iterator[Any]:
    """Raw JSON access (what the server really sends), with Stripe's auth and form encoding."""

    class Api:
        def __init__(self, session: requests.Session) -> None:
            self.s = session

        def call(self, method: str, path: str, data: Any = None, *, json_body: Any = None, key: str = "") -> Obj:
            headers = {"Authorization": f"Bearer {key or 'sk_test_shapes'}"}
            resp = self.s.request(method, server.base_url + path, data=data, json=json_body, headers=headers)
            assert resp.status_code < 300, resp.text
            out: Obj = resp.json()
            return out

    with requests.Session() as session:
        yield Api(session)


def shape_diff(ours: Obj, theirs: Obj, path: str) -> list[str]:
    problems = []
    missing = sorted(set(theirs) - set(ours) - OMITTED.get(path, set()))
    extra = sorted(set(ours) - set(theirs) - SOMETIMES.get(path, set()))
    if missing:
        problems.append(f"{path}: missing {missing}")
    if extra:
        problems.append(f"{path}: extra {extra}")
    for key in sorted(set(ours) & set(theirs)):
        sub = f"{path}.{key}"
        if key in FREE_FORM or sub in OTHER_RESOURCE:
            continue
        a, b = ours[key], theirs[key]
        if isinstance(a, dict) and isinstance(b, dict) and b:
            problems += shape_diff(a, b, sub)
        elif isinstance(a, list) and isinstance(b, list) and a and b and isinstance(a[0], dict):
            problems += shape_diff(a[0], b[0], f"{sub}[0]")
    return problems


def assert_shape(fixtures: dict[str, Obj], resource: str, ours: Obj) -> None:
    theirs = fixtures[resource]
    problems = shape_diff(ours, theirs, resource)
    if ours.get("object") != theirs.get("object"):
        problems.append(f"{resource}: object {ours.get('object')!r} != {theirs.get('object')!r}")
    assert not problems, "\n".join(problems)


def sdk_fields(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        names |= {n for n in getattr(klass, "__annotations__", {}) if not n.startswith("_") and n != "OBJECT_NAME"}
    return names


def test_v1_resources_match_stripe_fixtures(fixtures: dict[str, Obj], api: Any) -> None:
    now = int(time.time())
    customer = api.call("POST", "/v1/customers", {"name": "Shape", "email": "s@x.test", "metadata[k]": "v"})
    assert_shape(fixtures, "customer", customer)
    assert_shape(fixtures, "customer", api.call("GET", f"/v1/customers/{customer['id']}"))
    txn = api.call("POST", f"/v1/customers/{customer['id']}/balance_transactions", {"amount": -5, "currency": "usd"})
    assert_shape(fixtures, "customer_balance_transaction", txn)

    meter = api.call(
        "POST",
        "/v1/billing/meters",
        {"display_name": "m", "event_name": "shape_ev", "default_aggregation[formula]": "sum"},
    )
    assert_shape(fixtures, "billing.meter", meter)
    event = api.call(
        "POST",
        "/v1/billing/meter_events",
        {
            "event_name": "shape_ev",
            "identifier": "shape-1",
            "payload[stripe_customer_id]": customer["id"],
            "payload[value]": "1.5",
            "timestamp": now,
        },
    )
    assert_shape(fixtures, "billing.meter_event", event)
    adjustment = api.call(
        "POST",
        "/v1/billing/meter_event_adjustments",
        {"event_name": "shape_ev", "type": "cancel", "cancel[identifier]": "shape-1"},
    )
    assert_shape(fixtures, "billing.meter_event_adjustment", adjustment)
    start = now // 3600 * 3600
    summaries = api.call(
        "GET",
        f"/v1/billing/meters/{meter['id']}/event_summaries",
        {"customer": customer["id"], "start_time": start, "end_time": start + 3600},
    )
    assert_shape(fixtures, "billing.meter_event_summary", summaries["data"][0])

    product = api.call("POST", "/v1/products", {"name": "Compute"})
    assert_shape(fixtures, "product", product)
    metered = api.call(
        "POST",
        "/v1/prices",
        {
            "currency": "usd",
            "product": product["id"],
            "unit_amount_decimal": "0.5",
            "recurring[interval]": "month",
            "recurring[usage_type]": "metered",
            "recurring[meter]": meter["id"],
        },
    )
    assert_shape(fixtures, "price", metered)
    one_time = api.call("POST", "/v1/prices", {"currency": "usd", "product": product["id"], "unit_amount": 100})
    assert_shape(fixtures, "price", one_time)

    sub = api.call("POST", "/v1/subscriptions", {"customer": customer["id"], "items[0][price]": metered["id"]})
    assert_shape(fixtures, "subscription", sub)
    item = sub["items"]["data"][0]
    assert_shape(fixtures, "subscription_item", item)
    assert_shape(fixtures, "plan", item["plan"])
    items = api.call("GET", "/v1/subscription_items", {"subscription": sub["id"]})
    assert_shape(fixtures, "subscription_item", items["data"][0])
    assert_shape(fixtures, "subscription", api.call("DELETE", f"/v1/subscriptions/{sub['id']}"))

    session = api.call(
        "POST",
        "/v1/checkout/sessions",
        {"mode": "subscription", "line_items[0][price]": metered["id"], "success_url": "https://x.test/ok"},
    )
    assert_shape(fixtures, "checkout.session", session)
    completed = api.call("POST", f"/_fake/checkout_sessions/{session['id']}/complete")
    assert_shape(fixtures, "checkout.session", completed)
    payment = api.call(
        "POST",
        "/v1/checkout/sessions",
        {"mode": "payment", "line_items[0][price]": one_time["id"], "line_items[0][quantity]": 2},
    )
    assert_shape(fixtures, "checkout.session", payment)

    created = api.call(
        "POST",
        "/v1/webhook_endpoints",
        {"url": "http://127.0.0.1:9/hook", "enabled_events[0]": "customer.created"},
    )
    endpoint = api.call("GET", f"/v1/webhook_endpoints/{created['id']}")
    assert_shape(fixtures, "webhook_endpoint", endpoint)
    assert set(created) == set(endpoint) | {"secret"}  # Stripe reveals the secret once, at creation

    events = api.call("GET", "/v1/events", {"limit": 100})["data"]
    assert {e["type"] for e in events} >= {"customer.created", "checkout.session.completed", "price.created"}
    for e in events:
        assert_shape(fixtures, "event", e)

    assert_shape(fixtures, "deleted_webhook_endpoint", api.call("DELETE", f"/v1/webhook_endpoints/{created['id']}"))
    bare = api.call("POST", "/v1/products", {"name": "to delete"})
    assert_shape(fixtures, "deleted_product", api.call("DELETE", f"/v1/products/{bare['id']}"))
    assert_shape(fixtures, "deleted_customer", api.call("DELETE", f"/v1/customers/{customer['id']}"))
    assert_shape(fixtures, "deleted_customer", api.call("GET", f"/v1/customers/{customer['id']}"))


def test_v2_objects_match_the_sdk(api: Any) -> None:
    from stripe.events._v1_billing_meter_error_report_triggered_event import (
        V1BillingMeterErrorReportTriggeredEvent as ErrorReport,
    )

    customer = api.call("POST", "/v1/customers", {"name": "v2"})
    api.call(
        "POST",
        "/v1/billing/meters",
        {"display_name": "m", "event_name": "v2_ev", "default_aggregation[formula]": "sum"},
    )
    session = api.call("POST", "/v2/billing/meter_event_session", json_body={})
    assert set(session) == sdk_fields(stripe.v2.billing.MeterEventSession)
    event = api.call(
        "POST",
        "/v2/billing/meter_events",
        json_body={
            "event_name": "v2_ev",
            "identifier": "v2-shape",
            "payload": {"stripe_customer_id": customer["id"], "value": "1"},
        },
    )
    assert set(event) == sdk_fields(stripe.v2.billing.MeterEvent)
    adjustment = api.call(
        "POST",
        "/v2/billing/meter_event_adjustments",
        json_body={"event_name": "v2_ev", "type": "cancel", "cancel": {"identifier": "v2-shape"}},
    )
    assert set(adjustment) == sdk_fields(stripe.v2.billing.MeterEventAdjustment)
    stream = api.call(
        "POST",
        "/v2/billing/meter_event_stream",
        json_body={
            "events": [{"event_name": "v2_ev", "payload": {"stripe_customer_id": customer["id"], "value": "x"}}]
        },
        key=session["authentication_token"],
    )
    assert stream == {}
    report = api.call("GET", "/_fake/error_reports")["data"][0]
    # only on some v2 event types; context and reason only when they apply (not required in Stripe's schema)
    optional = {"changes", "snapshot_event", "context", "reason"}
    assert sdk_fields(ErrorReport) - optional <= set(report) <= sdk_fields(ErrorReport)
    data_cls = ErrorReport.V1BillingMeterErrorReportTriggeredEventData
    assert set(report["data"]) == sdk_fields(data_cls)
    assert set(report["data"]["reason"]) == sdk_fields(data_cls.Reason)
    assert set(report["data"]["reason"]["error_types"][0]) == sdk_fields(data_cls.Reason.ErrorType)


def test_expanded_line_items_match_stripe_fixtures(fixtures: dict[str, Obj], api: Any) -> None:
    product = api.call("POST", "/v1/products", {"name": "Line"})
    price = api.call("POST", "/v1/prices", {"currency": "usd", "product": product["id"], "unit_amount": 300})
    session = api.call(
        "POST",
        "/v1/checkout/sessions",
        {"mode": "payment", "line_items[0][price]": price["id"], "line_items[0][quantity]": 2},
    )
    expanded = api.call("GET", f"/v1/checkout/sessions/{session['id']}", {"expand[0]": "line_items"})
    (item,) = expanded["line_items"]["data"]
    assert_shape(fixtures, "item", item)
    assert (item["amount_total"], item["quantity"]) == (600, 2)
