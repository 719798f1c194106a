"""What the reconciliation needs from the local Stripe, over HTTP with the official SDK and compared with Stripe's
published example objects (``fixtures3.json``, as in ``test_stripe_fake_shapes.py``): summaries grouped by day and
hour, invoice previews with usage lines for metered prices (and their lines listed past the first page), the test
helpers that lose an accepted event after the 202, what a deactivated meter does, read rate limits."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import requests
import stripe
from test_stripe_fake_shapes import FIXTURE_CANDIDATES, assert_shape

from infra.devkit.stripe_fake import FaultConfig, StripeServerThread
from sinks.stripe.v1 import make_client

pytestmark = pytest.mark.integration

DAY = 86400
NOW = int(time.time())
D = (NOW // DAY - 2) * DAY
Obj = dict[str, Any]


@pytest.fixture(scope="module")
def fixtures() -> dict[str, Obj]:
    resources: dict[str, Obj] = json.loads(FIXTURE_CANDIDATES[0].read_text())["resources"]
    return resources


@pytest.fixture
def server() -> Iterator[StripeServerThread]:
    with StripeServerThread() as srv:
        yield srv


@pytest.fixture
def client(server: StripeServerThread) -> stripe.StripeClient:
    return make_client("sk_test_recon", server.base_url, timeout=5)


def _meter(client: stripe.StripeClient, name: str = "recon_ev") -> Any:
    return client.v1.billing.meters.create(
        {
            "display_name": name,
            "event_name": name,
            "default_aggregation": {"formula": "sum"},
            "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
            "value_settings": {"event_payload_key": "value"},
        }
    )


def _event(client: stripe.StripeClient, name: str, ident: str, ts: int, cust: str, value: str) -> None:
    client.v1.billing.meter_events.create(
        {
            "event_name": name,
            "identifier": ident,
            "timestamp": ts,
            "payload": {"stripe_customer_id": cust, "value": value},
        }
    )


def _raw(server: StripeServerThread, method: str, path: str, **data: Any) -> Obj:
    resp = requests.request(
        method,
        server.base_url + path,
        data=data or None,
        headers={"Authorization": "Bearer sk_test_recon"},
        timeout=5,
    )
    assert resp.status_code == 200, resp.text
    out: Obj = resp.json()
    return out


def _metered_price(client: stripe.StripeClient, meter_id: str, amount: str = "0.5") -> Any:
    product = client.v1.products.create({"name": "p"})
    return client.v1.prices.create(
        {
            "currency": "usd",
            "product": product.id,
            "unit_amount_decimal": amount,
            "recurring": {"interval": "month", "usage_type": "metered", "meter": meter_id},
        }
    )


def test_summaries_by_day_and_hour_hold_what_the_meter_holds(client: stripe.StripeClient) -> None:
    meter = _meter(client)
    cust = client.v1.customers.create({"name": "c"}).id
    for i, (h, v) in enumerate([(1, "0.1"), (1, "0.2"), (5, "7"), (30, "2.5")]):
        _event(client, "recon_ev", f"e{i}", D + h * 3600, cust, v)
    days = client.v1.billing.meters.event_summaries.list(
        meter.id, {"customer": cust, "start_time": D, "end_time": D + 2 * DAY, "value_grouping_window": "day"}
    )
    assert [(s.start_time, s.end_time) for s in days.data] == [(D + DAY, D + 2 * DAY), (D, D + DAY)]  # newest first
    hours = client.v1.billing.meters.event_summaries.list(
        meter.id,
        {"customer": cust, "start_time": D, "end_time": D + 6 * 3600, "value_grouping_window": "hour", "limit": 100},
    )
    by_hour = {s.start_time: Decimal(repr(s.aggregated_value)) for s in hours.data}
    assert by_hour[D + 3600] == Decimal("0.3") and by_hour[D + 5 * 3600] == Decimal(7) and len(by_hour) == 6


def test_invoice_preview_has_stripes_shape_and_the_periods_usage(
    client: stripe.StripeClient, server: StripeServerThread, fixtures: dict[str, Obj]
) -> None:
    meter = _meter(client)
    cust = client.v1.customers.create({"name": "c", "balance": -300}).id
    price = _metered_price(client, meter.id, "0.5")
    product = client.v1.products.create({"name": "seat"})
    seat = client.v1.prices.create(
        {"currency": "usd", "product": product.id, "unit_amount": 1000, "recurring": {"interval": "month"}}
    )
    sub = client.v1.subscriptions.create(
        {"customer": cust, "items": [{"price": price.id}, {"price": seat.id, "quantity": 2}], "backdate_start_date": D}
    )
    item = sub.items.data[0]
    assert (sub.start_date, item.current_period_start) == (D, D)
    _event(client, "recon_ev", "in1", D + 3600, cust, "10.25")
    _event(client, "recon_ev", "in2", D + 7200, cust, "0.000001")
    _event(client, "recon_ev", "before", D - 60, cust, "99")  # before the period: not on this invoice
    client.v1.billing.meter_event_adjustments.create({"event_name": "recon_ev", "cancel": {"identifier": "in2"}})

    preview = _raw(server, "POST", "/v1/invoices/create_preview", subscription=sub.id)
    assert_shape(fixtures, "invoice", preview)
    usage, licensed = preview["lines"]["data"]
    assert preview["lines"]["has_more"] is False
    assert (usage["quantity_decimal"], usage["quantity"], usage["amount"]) == ("10.25", 10, 5)  # 5.125 cents -> 5
    assert usage["pricing"]["price_details"]["price"] == price.id
    assert usage["period"] == {"start": D, "end": item.current_period_end}
    assert usage["parent"]["subscription_item_details"]["subscription_item"] == item.id
    assert (licensed["quantity"], licensed["amount"]) == (2, 2000)
    assert preview["subtotal"] == 2005 and preview["amount_due"] == 1705 and preview["starting_balance"] == -300

    via_sdk = client.v1.invoices.create_preview({"subscription": sub.id})
    assert via_sdk.lines.data[0].quantity_decimal == Decimal("10.25")
    assert client.v1.invoices.create_preview({"customer": cust}).parent.subscription_details.subscription == sub.id

    with pytest.raises(stripe.InvalidRequestError, match="No such subscription"):
        client.v1.invoices.create_preview({"subscription": "sub_nope"})


def test_invoice_lines_past_the_first_page_are_listed(
    client: stripe.StripeClient, server: StripeServerThread, fixtures: dict[str, Obj]
) -> None:
    cust = client.v1.customers.create({"name": "c"}).id
    prices = [_metered_price(client, _meter(client, f"m{i}").id) for i in range(12)]
    sub = client.v1.subscriptions.create({"customer": cust, "items": [{"price": p.id} for p in prices]})
    preview = _raw(server, "POST", "/v1/invoices/create_preview", subscription=sub.id)
    assert len(preview["lines"]["data"]) == 10 and preview["lines"]["has_more"] is True
    rest = _raw(
        server, "GET", preview["lines"]["url"] + f"?limit=100&starting_after={preview['lines']['data'][-1]['id']}"
    )
    assert len(rest["data"]) == 2 and rest["has_more"] is False
    assert_shape(fixtures, "line_item", rest["data"][0])


def test_helpers_drop_or_reject_an_accepted_event_after_the_202(
    client: stripe.StripeClient, server: StripeServerThread
) -> None:
    meter = _meter(client)
    cust = client.v1.customers.create({"name": "c"}).id
    for i in range(3):
        _event(client, "recon_ev", f"e{i}", D + 3600, cust, "2")
    requests.post(f"{server.base_url}/_fake/meter_events/e0/drop", timeout=5).raise_for_status()
    requests.post(
        f"{server.base_url}/_fake/meter_events/e1/reject", json={"code": "meter_event_invalid_value"}, timeout=5
    )
    (s,) = client.v1.billing.meters.event_summaries.list(
        meter.id, {"customer": cust, "start_time": D, "end_time": D + DAY}
    ).data
    assert s.aggregated_value == 2  # only e2 is left
    reports = list(client.v2.core.events.list({"types": ["v1.billing.meter.error_report_triggered"]}).data)
    assert len(reports) == 1
    sample = reports[0].to_dict()["data"]["reason"]["error_types"][0]
    assert sample["code"] == "meter_event_invalid_value" and sample["sample_errors"][0]["request"]["identifier"] == "e1"
    # The dropped identifier is free: sent again, it is a new event (not a duplicate).
    _event(client, "recon_ev", "e0", D + 3600, cust, "2")
    lost = requests.get(f"{server.base_url}/_fake/receipts", timeout=5).json()
    assert lost["lost"] == {"e0": "dropped", "e1": "rejected"} and lost["data"]["e0"] == ["2", "2"]
    assert server.state.duplicate_attempt_list() == []


def test_a_deactivated_meter_refuses_events_and_prices_and_keeps_its_summaries(client: stripe.StripeClient) -> None:
    meter = _meter(client)
    cust = client.v1.customers.create({"name": "c"}).id
    _event(client, "recon_ev", "before", D + 3600, cust, "3")
    client.v1.billing.meters.deactivate(meter.id)
    with pytest.raises(stripe.InvalidRequestError, match="No active meter"):
        _event(client, "recon_ev", "after", D + 3600, cust, "4")
    with pytest.raises(stripe.InvalidRequestError, match="inactive"):
        _metered_price(client, meter.id)
    (s,) = client.v1.billing.meters.event_summaries.list(
        meter.id, {"customer": cust, "start_time": D, "end_time": D + DAY}
    ).data
    assert s.aggregated_value == 3
    listed = {m.id: m.status for m in client.v1.billing.meters.list({"limit": 100}).auto_paging_iter()}
    assert listed[meter.id] == "inactive"


def test_read_limits_answer_429_beyond_the_rate() -> None:
    with StripeServerThread(faults=FaultConfig(read_limits=True, reads_per_s=5)) as srv:
        client = make_client("sk_test_recon", srv.base_url, timeout=5)
        codes = []
        for _ in range(8):
            try:
                client.v1.customers.list({"limit": 1})
                codes.append(200)
            except stripe.RateLimitError as exc:
                codes.append(429)
                assert (exc.headers or {}).get("Stripe-Should-Retry") == "true"
        assert codes[:5] == [200] * 5 and 429 in codes[5:]
        assert srv.state.faults.injected["limit_reads"] == codes.count(429)
        client.v1.customers.create({"name": "writes are not reads"})  # a POST is not limited as a read
