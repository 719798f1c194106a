"""The local Stripe on the provisioning path, through the official SDK over HTTP: signed events for setup
checkouts and subscription deletions, delivery retries on Stripe's schedule compressed by a speed factor,
metered items without ``quantity``, ``expand[]``, and the ``code`` of v2 meter-event-stream errors."""

from __future__ import annotations

import http.server
import itertools
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import stripe

from infra.devkit.stripe_fake import StripeServerThread
from infra.devkit.stripe_fake._webhooks import STRIPE_RETRY_SCHEDULE_S, retry_delays

pytestmark = pytest.mark.integration


class Receiver:
    """A webhook receiver on 127.0.0.1 that answers 500 to the first ``fail_first`` requests."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first = fail_first
        self.received: list[tuple[float, bytes, str]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append((time.monotonic(), body, self.headers.get("Stripe-Signature", "")))
                self.send_response(500 if len(outer.received) <= outer.fail_first else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/webhooks/stripe"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def events(self, secret: str) -> list[Any]:
        return [stripe.Webhook.construct_event(body.decode(), sig, secret) for _, body, sig in self.received]


@pytest.fixture
def server() -> Iterator[StripeServerThread]:
    with StripeServerThread() as srv:
        yield srv


@pytest.fixture
def client(server: StripeServerThread) -> Iterator[stripe.StripeClient]:
    transport = stripe.RequestsClient()
    yield stripe.StripeClient(
        "sk_test_fidelity",
        base_addresses={"api": server.base_url, "meter_events": server.base_url},
        max_network_retries=0,
        http_client=transport,
    )
    transport.close()  # type: ignore[no-untyped-call]


def metered_price(client: stripe.StripeClient) -> Any:
    meter = client.v1.billing.meters.create(
        {"display_name": "m", "event_name": "fid_ev", "default_aggregation": {"formula": "sum"}}
    )
    return client.v1.prices.create(
        {
            "currency": "usd",
            "product_data": {"name": "Compute"},
            "unit_amount_decimal": "0.5",
            "recurring": {"interval": "month", "usage_type": "metered", "meter": meter.id},
        }
    )


def test_setup_checkout_completion_fires_a_signed_completed_event(
    client: stripe.StripeClient, server: StripeServerThread
) -> None:
    customer = client.v1.customers.create({"email": "o@x.test", "metadata": {"org_id": "org_1"}})
    with Receiver() as rx:
        endpoint = client.v1.webhook_endpoints.create({"url": rx.url, "enabled_events": ["checkout.session.completed"]})
        session = client.v1.checkout.sessions.create(
            {
                "mode": "setup",
                "customer": customer.id,
                "currency": "usd",
                "success_url": "https://x.test/ok",
                "metadata": {"org_id": "org_1", "type": "setup"},
            }
        )
        done = requests.post(f"{server.base_url}/_fake/checkout_sessions/{session.id}/complete", timeout=10)
        assert done.status_code == 200
        assert server.state.wait_for_webhooks(10)
    assert endpoint.secret is not None
    (event,) = rx.events(endpoint.secret)
    obj = event.data.object
    assert event.type == "checkout.session.completed"
    assert (obj["id"], obj["mode"], obj["status"], obj["customer"]) == (session.id, "setup", "complete", customer.id)
    assert obj["metadata"].to_dict() == {"org_id": "org_1", "type": "setup"}
    assert obj["setup_intent"].startswith("seti_")
    assert obj["subscription"] is None


def test_subscription_deletion_fires_a_signed_deleted_event(
    client: stripe.StripeClient, server: StripeServerThread
) -> None:
    price = metered_price(client)
    customer = client.v1.customers.create({"email": "o@x.test"})
    sub = client.v1.subscriptions.create(
        {"customer": customer.id, "items": [{"price": price.id}], "metadata": {"org_id": "org_2"}}
    )
    with Receiver() as rx:
        endpoint = client.v1.webhook_endpoints.create(
            {"url": rx.url, "enabled_events": ["customer.subscription.deleted"]}
        )
        client.v1.subscriptions.cancel(sub.id)
        assert server.state.wait_for_webhooks(10)
    assert endpoint.secret is not None
    (event,) = rx.events(endpoint.secret)
    assert event.type == "customer.subscription.deleted"
    assert (event.data.object["id"], event.data.object["status"]) == (sub.id, "canceled")
    assert event.data.object["metadata"].to_dict() == {"org_id": "org_2"}


def test_failed_deliveries_are_retried_on_stripes_schedule_compressed(
    client: stripe.StripeClient, server: StripeServerThread
) -> None:
    # Stripe: exponential backoff for up to three days in live mode.
    assert sum(STRIPE_RETRY_SCHEDULE_S) <= 72 * 3600 < sum(STRIPE_RETRY_SCHEDULE_S) + 86_400
    assert all(b >= a for a, b in itertools.pairwise(STRIPE_RETRY_SCHEDULE_S))
    speed = 600.0  # the first three retries after 0.1, 0.3 and 0.9 s
    server.state.set_webhook_speed(speed)
    assert server.state.webhook_retry_delays == retry_delays(speed)
    with Receiver(fail_first=3) as rx:
        client.v1.webhook_endpoints.create({"url": rx.url, "enabled_events": ["customer.created"]})
        client.v1.customers.create({"name": "retry me"})
        assert server.state.wait_for_webhooks(15)
    statuses = [d["status"] for d in server.state.webhook_deliveries()]
    assert statuses == [500, 500, 500, 200]
    times = [t for t, _, _ in rx.received]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    for gap, scheduled in zip(gaps, retry_delays(speed), strict=False):
        assert scheduled * 0.9 <= gap < scheduled + 0.5, (gaps, retry_delays(speed))
    bodies = {body for _, body, _ in rx.received}
    assert len(bodies) == 1  # the same event each time


def test_resend_delivers_the_same_event_again(client: stripe.StripeClient, server: StripeServerThread) -> None:
    with Receiver() as rx:
        endpoint = client.v1.webhook_endpoints.create({"url": rx.url, "enabled_events": ["customer.created"]})
        client.v1.customers.create({"name": "twice"})
        assert server.state.wait_for_webhooks(10)
        event_id = rx.events(str(endpoint.secret))[0].id
        assert requests.post(f"{server.base_url}/_fake/events/{event_id}/resend", timeout=10).status_code == 200
        assert server.state.wait_for_webhooks(10)
    assert [e.id for e in rx.events(str(endpoint.secret))] == [event_id, event_id]


def test_metered_subscription_items_omit_quantity(client: stripe.StripeClient, server: StripeServerThread) -> None:
    metered = metered_price(client)
    licensed = client.v1.prices.create(
        {"currency": "usd", "product_data": {"name": "seat"}, "unit_amount": 100, "recurring": {"interval": "month"}}
    )
    customer = client.v1.customers.create({"name": "q"})
    raw = requests.post(
        f"{server.base_url}/v1/subscriptions",
        data={"customer": customer.id, "items[0][price]": metered.id, "items[1][price]": licensed.id},
        headers={"Authorization": "Bearer sk_test_fidelity"},
        timeout=10,
    ).json()
    first, second = raw["items"]["data"]
    assert "quantity" not in first
    assert second["quantity"] == 1


def test_expand_customer_and_line_items(client: stripe.StripeClient, server: StripeServerThread) -> None:
    price = metered_price(client)
    customer = client.v1.customers.create({"name": "x", "metadata": {"org_id": "org_3"}})
    sub = client.v1.subscriptions.create({"customer": customer.id, "items": [{"price": price.id}]})
    assert client.v1.subscriptions.retrieve(sub.id).customer == customer.id
    expanded = client.v1.subscriptions.retrieve(sub.id, {"expand": ["customer"]})
    assert isinstance(expanded.customer, stripe.Customer)
    assert expanded.customer.metadata is not None and expanded.customer.metadata["org_id"] == "org_3"
    listed = client.v1.subscriptions.list({"customer": customer.id, "expand": ["data.customer"]})
    assert isinstance(listed.data[0].customer, stripe.Customer)
    deep = client.v1.subscriptions.retrieve(sub.id, {"expand": ["items.data.price.product"]})
    assert isinstance(deep["items"].data[0].price.product, stripe.Product)

    session = client.v1.checkout.sessions.create(
        {"mode": "subscription", "line_items": [{"price": price.id}], "success_url": "https://x.test/ok"}
    )
    assert "line_items" not in client.v1.checkout.sessions.retrieve(session.id)
    with_items = client.v1.checkout.sessions.retrieve(session.id, {"expand": ["line_items"]})
    assert with_items.line_items is not None
    (item,) = with_items.line_items.data
    assert (item.object, item.price.id, item.currency) == ("item", price.id, "usd")

    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.subscriptions.retrieve(sub.id, {"expand": ["no_such_field"]})
    assert info.value.http_status == 400
    assert "cannot be expanded" in str(info.value)


def test_v2_stream_errors_carry_a_code(client: stripe.StripeClient, server: StripeServerThread) -> None:
    url = f"{server.base_url}/v2/billing/meter_event_stream"
    customer = client.v1.customers.create({"name": "s"})
    event = {"event_name": "fid_ev", "payload": {"stripe_customer_id": customer.id, "value": "1"}}
    token = client.v2.billing.meter_event_session.create().authentication_token

    def post(auth: str, events: list[Any]) -> tuple[int, dict[str, Any]]:
        r = requests.post(url, json={"events": events}, headers={"Authorization": f"Bearer {auth}"}, timeout=10)
        return r.status_code, r.json()["error"]

    status, err = post(token, [event] * 101)
    assert (status, err["code"]) == (400, "too_many_events")
    status, err = post("sk_test_fidelity", [event])
    assert (status, err["code"]) == (401, "secret_key_not_allowed")
    status, err = post("mes_tok_test_unknown", [event])
    assert (status, err["code"]) == (401, "invalid_authentication_token")
    assert all(isinstance(e["message"], str) and e["message"] for e in (err,))
