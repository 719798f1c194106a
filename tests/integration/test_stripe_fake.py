"""The local Stripe server, driven through the official ``stripe`` SDK over real HTTP."""

from __future__ import annotations

import time
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
import requests
import stripe

from infra.devkit.stripe_fake import FakeStripe, FaultConfig, StripeServerThread
from infra.devkit.stripe_fake._params import parse_form

pytestmark = pytest.mark.integration

DAY = 86400


@pytest.fixture(scope="module")
def server() -> Iterator[StripeServerThread]:
    with StripeServerThread() as srv:
        yield srv


@pytest.fixture(autouse=True)
def _fresh(server: StripeServerThread) -> None:
    server.state.set_faults(FaultConfig())
    server.state.reset()


@pytest.fixture
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def make_client(base_url: str, key: str = "sk_test_edgebill") -> tuple[stripe.StripeClient, stripe.RequestsClient]:
    transport = stripe.RequestsClient()
    client = stripe.StripeClient(
        key,
        base_addresses={"api": base_url, "meter_events": base_url},
        max_network_retries=0,
        http_client=transport,
    )
    return client, transport


@pytest.fixture
def client(server: StripeServerThread) -> Iterator[stripe.StripeClient]:
    c, transport = make_client(server.base_url)
    yield c
    transport.close()  # type: ignore[no-untyped-call]


@pytest.fixture
def meter(client: stripe.StripeClient) -> Any:
    return client.v1.billing.meters.create(
        {
            "display_name": "GB-seconds",
            "event_name": "sandbox_compute_sandbox_overage",
            "default_aggregation": {"formula": "sum"},
            "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
            "value_settings": {"event_payload_key": "value"},
        }
    )


@pytest.fixture
def customer(client: stripe.StripeClient) -> Any:
    return client.v1.customers.create({"name": "Org 7", "email": "ops@org7.test", "metadata": {"org_id": "org_7"}})


def send(client: stripe.StripeClient, customer: Any, value: str, options: Any = None, **extra: Any) -> Any:
    params: dict[str, Any] = {
        "event_name": "sandbox_compute_sandbox_overage",
        "payload": {"stripe_customer_id": customer.id, "value": value},
        **extra,
    }
    return client.v1.billing.meter_events.create(params, options)  # type: ignore[arg-type]


# -- parsing -----------------------------------------------------------------------------------------


def test_form_bracket_nesting() -> None:
    parsed = parse_form(
        "payload%5Bvalue%5D=1&payload%5Bstripe_customer_id%5D=cus_1&items%5B0%5D%5Bprice%5D=p0"
        "&items%5B1%5D%5Bprice%5D=p1&metadata%5Bk%5D=v&expand%5B%5D=a&expand%5B%5D=b&empty="
    )
    assert parsed == {
        "payload": {"value": "1", "stripe_customer_id": "cus_1"},
        "items": [{"price": "p0"}, {"price": "p1"}],
        "metadata": {"k": "v"},
        "expand": ["a", "b"],
        "empty": "",
    }


# -- auth --------------------------------------------------------------------------------------------


def test_missing_key_is_401_with_stripe_body(server: StripeServerThread, http: requests.Session) -> None:
    resp = http.get(f"{server.base_url}/v1/customers")
    assert resp.status_code == 401
    err = resp.json()["error"]
    assert err["type"] == "invalid_request_error"
    assert err["message"].startswith("You did not provide an API key.")


def test_invalid_key_is_authentication_error(server: StripeServerThread) -> None:
    bad, transport = make_client(server.base_url, key="not_a_key")
    try:
        with pytest.raises(stripe.AuthenticationError) as info:
            bad.v1.customers.list()
        assert info.value.http_status == 401
        assert "Invalid API Key provided" in str(info.value.user_message)
    finally:
        transport.close()  # type: ignore[no-untyped-call]


def test_unknown_route_is_stripe_404(server: StripeServerThread, http: requests.Session) -> None:
    resp = http.get(f"{server.base_url}/v1/nope", headers={"Authorization": "Bearer sk_test_x"})
    assert resp.status_code == 404
    assert resp.json()["error"]["message"].startswith("Unrecognized request URL (GET: /v1/nope)")


# -- customers ---------------------------------------------------------------------------------------


def test_customer_create_retrieve_update_list(client: stripe.StripeClient) -> None:
    created = client.v1.customers.create(
        {"name": "Org 1", "email": "a@b.test", "metadata": {"org_id": "org_1"}, "balance": -500}
    )
    assert created.object == "customer"
    assert created.id.startswith("cus_")
    assert created.balance == -500
    assert created.metadata is not None
    assert created.metadata.to_dict() == {"org_id": "org_1"}
    updated = client.v1.customers.update(created.id, {"metadata": {"plan": "pro", "org_id": ""}, "balance": 100})
    assert updated.metadata is not None
    assert updated.metadata.to_dict() == {"plan": "pro"}
    assert updated.balance == 100
    assert client.v1.customers.retrieve(created.id).name == "Org 1"
    for i in range(4):
        client.v1.customers.create({"name": f"more {i}"})
    page = client.v1.customers.list({"limit": 2})
    assert [c.name for c in page.data] == ["more 3", "more 2"]
    assert page.has_more is True
    assert page.url == "/v1/customers"
    rest = client.v1.customers.list({"limit": 10, "starting_after": page.data[-1].id})
    assert [c.name for c in rest.data] == ["more 1", "more 0", "Org 1"]
    assert rest.has_more is False
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.customers.retrieve("cus_missing")
    assert info.value.http_status == 404
    assert info.value.code == "resource_missing"


def test_unknown_parameter_is_rejected(client: stripe.StripeClient) -> None:
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.customers.create({"nmae": "typo"})  # type: ignore[arg-type]
    assert info.value.code == "parameter_unknown"
    assert info.value.param == "nmae"


# -- meters ------------------------------------------------------------------------------------------


def test_meter_create_list_and_unique_event_name(client: stripe.StripeClient, meter: Any) -> None:
    assert meter.object == "billing.meter"
    assert meter.status == "active"
    assert meter.customer_mapping.event_payload_key == "stripe_customer_id"
    assert client.v1.billing.meters.retrieve(meter.id).event_name == meter.event_name
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.billing.meters.create(
            {
                "display_name": "again",
                "event_name": meter.event_name,
                "default_aggregation": {"formula": "sum"},
            }
        )
    assert [m.id for m in client.v1.billing.meters.list({"status": "active"}).data] == [meter.id]
    client.v1.billing.meters.deactivate(meter.id)
    assert client.v1.billing.meters.list({"status": "active"}).data == []
    again = client.v1.billing.meters.create(
        {"display_name": "again", "event_name": meter.event_name, "default_aggregation": {"formula": "sum"}}
    )
    assert again.value_settings.event_payload_key == "value"


# -- v1 meter events -------------------------------------------------------------------------------------


def test_meter_event_accepted(
    client: stripe.StripeClient, server: StripeServerThread, meter: Any, customer: Any
) -> None:
    ts = int(time.time()) - 3600
    event = send(client, customer, "3600.5", identifier="org_7:1781564400:gb", timestamp=ts)
    assert event.object == "billing.meter_event"
    assert event.identifier == "org_7:1781564400:gb"
    assert event.timestamp == ts
    assert event.payload.to_dict() == {"stripe_customer_id": customer.id, "value": "3600.5"}
    generated = send(client, customer, "1")
    assert generated.identifier  # generated when absent
    stored = server.state.accepted_meter_events()
    assert [(e["identifier"], e["value"], e["customer"]) for e in stored] == [
        ("org_7:1781564400:gb", "3600.5", customer.id),
        (generated.identifier, "1", customer.id),
    ]


def test_duplicate_identifier_is_rejected_like_stripe(
    client: stripe.StripeClient, server: StripeServerThread, meter: Any, customer: Any
) -> None:
    send(client, customer, "10", identifier="dup-1")
    with pytest.raises(stripe.InvalidRequestError) as info:
        send(client, customer, "11", identifier="dup-1")
    assert info.value.http_status == 400
    assert str(info.value.user_message) == "An event already exists with identifier dup-1."
    assert info.value.headers is not None
    assert info.value.headers.get("Stripe-Should-Retry") == "false"
    assert [e["value"] for e in server.state.accepted_meter_events()] == ["10"]
    assert server.state.conflicting_identifiers()[0]["value"] == "11"


@pytest.mark.parametrize(
    ("offset", "accepted"),
    [
        (-35 * DAY + 120, True),
        (-35 * DAY - 120, False),
        (240, True),
        (360, False),
    ],
)
def test_timestamp_window(client: stripe.StripeClient, meter: Any, customer: Any, offset: int, accepted: bool) -> None:
    ts = int(time.time()) + offset
    if accepted:
        assert send(client, customer, "1", timestamp=ts).timestamp == ts
        return
    with pytest.raises(stripe.InvalidRequestError) as info:
        send(client, customer, "1", timestamp=ts)
    assert info.value.param == "timestamp"
    expected = "in past" if offset < 0 else "in future"
    assert expected in str(info.value.user_message)


@pytest.mark.parametrize(
    ("value", "accepted"),
    [
        ("123456789012345", True),
        ("1234567890123456", False),
        ("0.1234567890123456", False),
        ("1.50000000000000000", True),
        ("-42.5", True),
        ("0", True),
        ("abc", False),
        ("NaN", False),
        ("1e400", True),
    ],
)
def test_value_validation(
    client: stripe.StripeClient,
    server: StripeServerThread,
    meter: Any,
    customer: Any,
    value: str,
    accepted: bool,
) -> None:
    if accepted:
        send(client, customer, value)
        assert Decimal(server.state.accepted_meter_events()[-1]["value"]) == Decimal(value)
        return
    with pytest.raises(stripe.InvalidRequestError) as info:
        send(client, customer, value)
    assert info.value.param == "payload[value]"
    if value.replace(".", "").isdigit():
        assert "can have at most 15 digits" in str(info.value.user_message)


def test_unknown_customer_event_name_and_missing_key(client: stripe.StripeClient, meter: Any, customer: Any) -> None:
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.billing.meter_events.create(
            {"event_name": meter.event_name, "payload": {"stripe_customer_id": "cus_nobody", "value": "1"}}
        )
    assert info.value.param == "payload[stripe_customer_id]"
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.billing.meter_events.create(
            {"event_name": "no_such_meter", "payload": {"stripe_customer_id": customer.id, "value": "1"}}
        )
    assert info.value.param == "event_name"
    assert "No active meter found" in str(info.value.user_message)
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.billing.meter_events.create({"event_name": meter.event_name, "payload": {"value": "1"}})
    assert "Customer mapping key stripe_customer_id not found in payload" in str(info.value.user_message)
    with pytest.raises(stripe.InvalidRequestError) as info:
        send(client, customer, "1", identifier="x" * 101)
    assert info.value.param == "identifier"


# -- summaries ---------------------------------------------------------------------------------------


def test_summary_is_exact(client: stripe.StripeClient, meter: Any, customer: Any) -> None:
    hour = (int(time.time()) // 3600 - 2) * 3600
    for i in range(3):
        send(client, customer, "0.1", timestamp=hour + i)
    send(client, customer, "1234.567891", timestamp=hour + 3599)
    send(client, customer, "5", timestamp=hour + 3600)  # next window: excluded
    other = client.v1.customers.create({"name": "other"})
    send(client, other, "7", timestamp=hour + 10)  # other customer: excluded
    summaries = client.v1.billing.meters.event_summaries.list(
        meter.id, {"customer": customer.id, "start_time": hour, "end_time": hour + 3600}
    )
    assert len(summaries.data) == 1
    s = summaries.data[0]
    assert s.object == "billing.meter_event_summary"
    assert (s.start_time, s.end_time, s.meter) == (hour, hour + 3600, meter.id)
    assert repr(float(s.aggregated_value)) == "1234.867891"
    only_tenths = client.v1.billing.meters.event_summaries.list(
        meter.id, {"customer": customer.id, "start_time": hour, "end_time": hour + 60}
    )
    assert repr(float(only_tenths.data[0].aggregated_value)) == "0.3"


def test_summary_grouping_and_alignment(client: stripe.StripeClient, meter: Any, customer: Any) -> None:
    hour = (int(time.time()) // 3600 - 3) * 3600
    send(client, customer, "1.25", timestamp=hour + 5)
    send(client, customer, "2.5", timestamp=hour + 3600 + 5)
    hourly = client.v1.billing.meters.event_summaries.list(
        meter.id,
        {
            "customer": customer.id,
            "start_time": hour,
            "end_time": hour + 3 * 3600,
            "value_grouping_window": "hour",
        },
    )
    got = {(s.start_time, s.aggregated_value) for s in hourly.data}
    assert got == {(hour, 1.25), (hour + 3600, 2.5), (hour + 7200, 0)}
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.billing.meters.event_summaries.list(
            meter.id, {"customer": customer.id, "start_time": hour + 1, "end_time": hour + 3600}
        )
    assert info.value.param == "start_time"


# -- inspection --------------------------------------------------------------------------------------


def test_inspection_endpoints(
    client: stripe.StripeClient, server: StripeServerThread, http: requests.Session, meter: Any, customer: Any
) -> None:
    send(client, customer, "2.5", identifier="i-1")
    with pytest.raises(stripe.InvalidRequestError):
        send(client, customer, "2.5", identifier="i-1")
    events = http.get(f"{server.base_url}/_fake/meter_events").json()["data"]
    assert [(e["identifier"], e["event_name"], e["customer"], e["value"]) for e in events] == [
        ("i-1", meter.event_name, customer.id, "2.5")
    ]
    assert {"timestamp", "received_at"} <= set(events[0])
    counts = http.get(f"{server.base_url}/_fake/requests").json()["data"]
    by = {(c["method"], c["path"], c["status"]): c["count"] for c in counts}
    assert by[("POST", "/v1/billing/meter_events", 200)] == 1
    assert by[("POST", "/v1/billing/meter_events", 400)] == 1
    assert http.post(f"{server.base_url}/_fake/reset").json() == {"reset": True}
    assert http.get(f"{server.base_url}/_fake/meter_events").json()["data"] == []


def test_in_process_state_without_http() -> None:
    state = FakeStripe()
    cus = state.create_customer({"name": "x"})
    state.create_meter({"display_name": "m", "event_name": "e", "default_aggregation": {"formula": "sum"}})
    state.create_meter_event_v1({"event_name": "e", "payload": {"stripe_customer_id": cus["id"], "value": "0.1"}})
    state.create_meter_event_v1({"event_name": "e", "payload": {"stripe_customer_id": cus["id"], "value": "0.2"}})
    assert state.totals() == {("e", cus["id"]): Decimal("0.3")}


# == phase 2 ==========================================================================================


def iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ts))


def stream_event(customer: Any, value: str, **extra: Any) -> Any:
    return {
        "event_name": "sandbox_compute_sandbox_overage",
        "payload": {"stripe_customer_id": customer.id, "value": value},
        **extra,
    }


# -- v2: sessions, the stream, sync events -----------------------------------------------------------


def test_v2_session_stream_and_expiry(
    client: stripe.StripeClient, server: StripeServerThread, meter: Any, customer: Any
) -> None:
    session = client.v2.billing.meter_event_session.create()
    assert session.object == "v2.billing.meter_event_session"
    created = time.mktime(time.strptime(session.created[:19], "%Y-%m-%dT%H:%M:%S"))
    expires = time.mktime(time.strptime(session.expires_at[:19], "%Y-%m-%dT%H:%M:%S"))
    assert expires - created == 15 * 60
    streamer, transport = make_client(server.base_url, key=session.authentication_token)
    try:
        now = time.time()
        streamer.v2.billing.meter_event_stream.create(
            {"events": [stream_event(customer, "1.5", identifier=f"s-{i}", timestamp=iso(now)) for i in range(3)]}
        )
        stored = server.state.accepted_meter_events()
        assert [(e["identifier"], e["value"], e["source"]) for e in stored] == [
            (f"s-{i}", "1.5", "v2_stream") for i in range(3)
        ]
        with pytest.raises(stripe.InvalidRequestError):
            streamer.v2.billing.meter_event_stream.create(
                {"events": [stream_event(customer, "1", identifier=f"x-{i}") for i in range(101)]}
            )
        with pytest.raises(stripe.AuthenticationError):  # the stream takes session tokens, not API keys
            client.v2.billing.meter_event_stream.create({"events": [stream_event(customer, "1")]})
        server.state.advance_clock(15 * 60 + 1)
        with pytest.raises(stripe.TemporarySessionExpiredError) as info:
            streamer.v2.billing.meter_event_stream.create({"events": [stream_event(customer, "1")]})
        assert info.value.http_status == 401
        assert info.value.code == "billing_meter_event_session_expired"
    finally:
        transport.close()  # type: ignore[no-untyped-call]


def test_stream_validation_errors_become_error_reports(
    client: stripe.StripeClient, server: StripeServerThread, http: requests.Session, meter: Any, customer: Any
) -> None:
    session = client.v2.billing.meter_event_session.create()
    streamer, transport = make_client(server.base_url, key=session.authentication_token)
    now = time.time()
    batch = [
        stream_event(customer, "2", identifier="ok"),
        stream_event(customer, "1234567890123456", identifier="digits"),
        stream_event(customer, "abc", identifier="nan"),
        {**stream_event(customer, "1", identifier="nocus"), "payload": {"value": "1"}},
        {**stream_event(customer, "1", identifier="ghost"), "payload": {"stripe_customer_id": "cus_x", "value": "1"}},
        stream_event(customer, "1", identifier="old", timestamp=iso(now - 36 * DAY)),
        stream_event(customer, "1", identifier="future", timestamp=iso(now + 3600)),
        {**stream_event(customer, "1", identifier="nometer"), "event_name": "nope"},
    ]
    try:
        streamer.v2.billing.meter_event_stream.create({"events": batch})  # 202 {}: nothing synchronous
    finally:
        transport.close()  # type: ignore[no-untyped-call]
    assert [e["identifier"] for e in server.state.accepted_meter_events()] == ["ok"]
    reports = http.get(f"{server.base_url}/_fake/error_reports").json()["data"]
    codes = {
        r["data"]["reason"]["error_types"][0]["sample_errors"][0]["request"]["identifier"]: (
            r["type"],
            r["data"]["reason"]["error_types"][0]["code"],
        )
        for r in reports
    }
    triggered = "v1.billing.meter.error_report_triggered"
    assert codes == {
        "digits": (triggered, "meter_event_value_too_many_digits"),
        "nan": (triggered, "meter_event_invalid_value"),
        "nocus": (triggered, "meter_event_no_customer_defined"),
        "ghost": (triggered, "meter_event_customer_not_found"),
        "old": (triggered, "timestamp_too_far_in_past"),
        "future": (triggered, "timestamp_in_future"),
        "nometer": ("v1.billing.meter.no_meter_found", "no_meter"),
    }
    digits = next(r for r in reports if r["data"]["reason"]["error_types"][0]["code"].endswith("digits"))
    assert digits["related_object"]["id"] == meter.id
    message = digits["data"]["reason"]["error_types"][0]["sample_errors"][0]["error_message"]
    assert message == "The value in the event payload can have at most 15 digits. Received 1234567890123456."
    listed = client.v2.core.events.list({"object_id": meter.id})
    assert len(listed.data) == 6


def test_v2_sync_meter_event(client: stripe.StripeClient, meter: Any, customer: Any) -> None:
    event = client.v2.billing.meter_events.create(stream_event(customer, "0.25", identifier="v2-1"))
    assert event.object == "v2.billing.meter_event"
    assert event.identifier == "v2-1"
    assert event.timestamp.endswith("Z")
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v2.billing.meter_events.create(stream_event(customer, "1234567890123456"))
    assert info.value.http_status == 400
    assert info.value.code == "meter_event_value_too_many_digits"


# -- adjustments -------------------------------------------------------------------------------------


def test_cancel_adjustment_within_24h(
    client: stripe.StripeClient, server: StripeServerThread, meter: Any, customer: Any
) -> None:
    hour = (int(time.time()) // 3600 - 1) * 3600
    send(client, customer, "1.5", identifier="a-1", timestamp=hour)
    send(client, customer, "2.5", identifier="a-2", timestamp=hour + 1)
    adj = client.v1.billing.meter_event_adjustments.create(
        {"event_name": meter.event_name, "type": "cancel", "cancel": {"identifier": "a-1"}}
    )
    assert (adj.object, adj.type, adj.cancel.identifier if adj.cancel else None) == (
        "billing.meter_event_adjustment",
        "cancel",
        "a-1",
    )
    summary = client.v1.billing.meters.event_summaries.list(
        meter.id, {"customer": customer.id, "start_time": hour, "end_time": hour + 3600}
    )
    assert summary.data[0].aggregated_value == 2.5
    with pytest.raises(stripe.InvalidRequestError):  # already cancelled
        client.v1.billing.meter_event_adjustments.create(
            {"event_name": meter.event_name, "type": "cancel", "cancel": {"identifier": "a-1"}}
        )
    server.state.advance_clock(DAY + 1)
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.billing.meter_event_adjustments.create(
            {"event_name": meter.event_name, "type": "cancel", "cancel": {"identifier": "a-2"}}
        )
    assert "within 24 hours" in str(info.value.user_message)
    send(client, customer, "4", identifier="a-3", timestamp=server.state.now_s())
    v2adj = client.v2.billing.meter_event_adjustments.create(
        {"event_name": meter.event_name, "type": "cancel", "cancel": {"identifier": "a-3"}}
    )
    assert v2adj.object == "v2.billing.meter_event_adjustment"
    live = [e["identifier"] for e in server.state.accepted_meter_events(include_cancelled=False)]
    assert live == ["a-2"]


# -- idempotency -------------------------------------------------------------------------------------


def test_idempotency_key_replay(
    client: stripe.StripeClient, server: StripeServerThread, http: requests.Session, meter: Any, customer: Any
) -> None:
    first = client.v1.customers.create({"name": "A"}, {"idempotency_key": "idem-1"})
    again = client.v1.customers.create({"name": "A"}, {"idempotency_key": "idem-1"})
    assert again.id == first.id
    assert again.last_response is not None
    assert again.last_response.headers.get("Idempotent-Replayed") == "true"
    names = [c.name for c in client.v1.customers.list().data]
    assert names.count("A") == 1
    with pytest.raises(stripe.IdempotencyError) as info:
        client.v1.customers.create({"name": "B"}, {"idempotency_key": "idem-1"})
    assert info.value.http_status == 400
    # A meter event retried under its key is replayed, not refused as a duplicate identifier.
    e1 = send(client, customer, "3", identifier="m-1", options={"idempotency_key": "mk-1"})
    e2 = send(client, customer, "3", identifier="m-1", options={"idempotency_key": "mk-1"})
    assert e1.identifier == e2.identifier == "m-1"
    assert len(server.state.accepted_meter_events()) == 1
    # v2 bodies (JSON) are keyed the same way.
    v2a = client.v2.billing.meter_events.create(
        stream_event(customer, "1", identifier="v2k"), {"idempotency_key": "k2"}
    )
    v2b = client.v2.billing.meter_events.create(
        stream_event(customer, "1", identifier="v2k"), {"idempotency_key": "k2"}
    )
    assert v2a.created == v2b.created


# -- faults ------------------------------------------------------------------------------------------


def test_fault_429_has_stripe_rate_limit_body(
    client: stripe.StripeClient, server: StripeServerThread, meter: Any, customer: Any
) -> None:
    server.state.set_faults(FaultConfig(p_429=1.0))
    with pytest.raises(stripe.RateLimitError) as info:
        send(client, customer, "1")
    assert info.value.http_status == 429
    assert info.value.headers is not None
    assert info.value.headers.get("Stripe-Should-Retry") == "true"
    body: Any = info.value.json_body
    assert body["error"]["code"] == "rate_limit"
    assert server.state.accepted_meter_events() == []


def test_fault_500_is_replayed_under_its_key(
    client: stripe.StripeClient, server: StripeServerThread, http: requests.Session, meter: Any, customer: Any
) -> None:
    server.state.set_faults(FaultConfig(p_500=1.0))
    with pytest.raises(stripe.APIError) as info:
        send(client, customer, "1", identifier="f5", options={"idempotency_key": "k500"})
    assert info.value.http_status == 500
    body: Any = info.value.json_body
    assert body["error"]["type"] == "api_error"
    server.state.set_faults(FaultConfig())
    with pytest.raises(stripe.APIError):  # Stripe: a key replays its result, "including 500 errors"
        send(client, customer, "1", identifier="f5", options={"idempotency_key": "k500"})
    assert send(client, customer, "1", identifier="f5", options={"idempotency_key": "k500b"}).identifier == "f5"


def test_fault_cutoff_records_then_drops(
    client: stripe.StripeClient, server: StripeServerThread, meter: Any, customer: Any
) -> None:
    server.state.set_faults(FaultConfig(p_cutoff=1.0))
    with pytest.raises(stripe.APIConnectionError):
        send(client, customer, "7", identifier="cut", options={"idempotency_key": "kcut"})
    assert [e["identifier"] for e in server.state.accepted_meter_events()] == ["cut"]
    server.state.set_faults(FaultConfig())
    replay = send(client, customer, "7", identifier="cut", options={"idempotency_key": "kcut"})
    assert replay.identifier == "cut"
    with pytest.raises(stripe.InvalidRequestError):  # a fresh key meets the identifier dedup
        send(client, customer, "7", identifier="cut", options={"idempotency_key": "kcut2"})
    assert len(server.state.accepted_meter_events()) == 1


def test_fault_latency(client: stripe.StripeClient, server: StripeServerThread, meter: Any, customer: Any) -> None:
    server.state.set_faults(FaultConfig(p_slow=1.0, slow_seconds=0.25))
    started = time.monotonic()
    send(client, customer, "1")
    assert time.monotonic() - started >= 0.25


def test_faults_are_seeded_and_settable_over_http(
    client: stripe.StripeClient, server: StripeServerThread, http: requests.Session, meter: Any, customer: Any
) -> None:
    def run() -> list[str]:
        outcomes = []
        for _ in range(30):
            try:
                send(client, customer, "1")
                outcomes.append("ok")
            except stripe.RateLimitError:
                outcomes.append("429")
            except stripe.APIError:
                outcomes.append("500")
        return outcomes

    resp = http.post(f"{server.base_url}/_fake/faults", json={"seed": 42, "p_429": 0.3, "p_500": 0.2})
    assert resp.json()["faults"]["p_429"] == 0.3
    first = run()
    injected = http.get(f"{server.base_url}/_fake/requests").json()["faults_injected"]
    assert injected == {"429": first.count("429"), "500": first.count("500")}
    http.post(f"{server.base_url}/_fake/faults", json={"seed": 42})  # same config: the RNG restarts
    second = run()
    assert first == second
    assert {"ok", "429", "500"} <= set(first)
    bad = http.post(f"{server.base_url}/_fake/faults", json={"p_429": 2})
    assert bad.status_code == 400


def _raw_meter_event(base: str, customer: str, ident: str) -> int:
    with requests.Session() as session:
        resp = session.post(
            f"{base}/v1/billing/meter_events",
            data={
                "event_name": "sandbox_compute_sandbox_overage",
                "identifier": ident,
                "payload[stripe_customer_id]": customer,
                "payload[value]": "1",
            },
            headers={"Authorization": "Bearer sk_test_x"},
        )
        return resp.status_code


def test_live_limits(client: stripe.StripeClient, server: StripeServerThread, meter: Any, customer: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    server.state.set_faults(FaultConfig(live_limits=True, v1_meter_events_per_s=3))
    statuses = [_raw_meter_event(server.base_url, customer.id, f"r{i}") for i in range(4)]
    assert statuses == [200, 200, 200, 429]
    time.sleep(1.05)
    server.state.set_faults(FaultConfig(live_limits=True, p_slow=1.0, slow_seconds=0.4))
    with ThreadPoolExecutor(2) as pool:
        both = sorted(pool.map(lambda i: _raw_meter_event(server.base_url, customer.id, f"c{i}"), range(2)))
    assert both == [200, 429]  # one concurrent call per (customer, meter)
    assert server.state.faults.injected.get("limit_v1_concurrency") == 1
    server.state.set_faults(FaultConfig(live_limits=True, v2_stream_per_s=2))
    token = client.v2.billing.meter_event_session.create().authentication_token
    streamer, transport = make_client(server.base_url, key=token)
    try:
        for i in range(2):
            streamer.v2.billing.meter_event_stream.create({"events": [stream_event(customer, "1", identifier=f"v{i}")]})
        with pytest.raises(stripe.RateLimitError):
            streamer.v2.billing.meter_event_stream.create({"events": [stream_event(customer, "1")]})
    finally:
        transport.close()  # type: ignore[no-untyped-call]


def test_concurrent_requests_with_one_idempotency_key(server: StripeServerThread, meter: Any, customer: Any) -> None:
    from concurrent.futures import ThreadPoolExecutor

    server.state.set_faults(FaultConfig(p_slow=1.0, slow_seconds=0.3))

    def post(_: int) -> tuple[int, str | None]:
        with requests.Session() as session:
            resp = session.post(
                f"{server.base_url}/v1/billing/meter_events",
                data={
                    "event_name": "sandbox_compute_sandbox_overage",
                    "identifier": "same",
                    "payload[stripe_customer_id]": customer.id,
                    "payload[value]": "1",
                },
                headers={"Authorization": "Bearer sk_test_x", "Idempotency-Key": "one-key"},
            )
            return resp.status_code, resp.headers.get("Idempotent-Replayed")

    with ThreadPoolExecutor(2) as pool:
        assert sorted(s for s, _ in pool.map(post, range(2))) == [200, 409]
    assert post(2) == (200, "true")
    assert len(server.state.accepted_meter_events()) == 1


# -- catalog, subscriptions, checkout, balance -------------------------------------------------------


def test_products_prices_and_search(client: stripe.StripeClient, meter: Any) -> None:
    product = client.v1.products.create({"id": "prod_sandbox_compute", "name": "Sandbox compute"})
    assert product.id == "prod_sandbox_compute"
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.products.create({"id": "prod_sandbox_compute", "name": "again"})
    price = client.v1.prices.create(
        {
            "currency": "usd",
            "product": product.id,
            "unit_amount_decimal": Decimal("0.0015"),
            "recurring": {"interval": "month", "usage_type": "metered", "meter": meter.id},
            "lookup_key": "gb_s_pro",
            "metadata": {"edgebill_meter": "sandbox_compute_sandbox_overage"},
        }
    )
    assert (price.unit_amount, price.unit_amount_decimal, price.type) == (None, Decimal("0.0015"), "recurring")
    assert price.recurring is not None and price.recurring.meter == meter.id
    with pytest.raises(stripe.InvalidRequestError) as info:
        client.v1.prices.create(
            {
                "currency": "usd",
                "product": product.id,
                "unit_amount": 1,
                "recurring": {"interval": "month", "usage_type": "metered"},
            }
        )
    assert info.value.param == "recurring[meter]"
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.prices.create({"currency": "usd", "product": product.id, "unit_amount": 5, "lookup_key": "gb_s_pro"})
    moved = client.v1.prices.create(
        {
            "currency": "usd",
            "product": product.id,
            "unit_amount": 5,
            "lookup_key": "gb_s_pro",
            "transfer_lookup_key": True,
        }
    )
    assert client.v1.prices.retrieve(price.id).lookup_key is None
    found = client.v1.prices.search({"query": "metadata['edgebill_meter']:'sandbox_compute_sandbox_overage'"})
    assert [p.id for p in found.data] == [price.id]
    assert [p.id for p in client.v1.prices.list({"lookup_keys": ["gb_s_pro"]}).data] == [moved.id]
    assert [p.id for p in client.v1.products.search({"query": "name:'Sandbox compute'"}).data] == [product.id]


def _metered_price(client: stripe.StripeClient, meter: Any) -> Any:
    return client.v1.prices.create(
        {
            "currency": "usd",
            "product_data": {"name": "compute"},
            "unit_amount_decimal": Decimal("0.001"),
            "recurring": {"interval": "month", "usage_type": "metered", "meter": meter.id},
        }
    )


def test_subscription_lifecycle_and_events(client: stripe.StripeClient, meter: Any, customer: Any) -> None:
    metered = _metered_price(client, meter)
    base = client.v1.prices.create(
        {"currency": "usd", "product_data": {"name": "pro"}, "unit_amount": 2000, "recurring": {"interval": "month"}}
    )
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.subscriptions.create({"customer": customer.id, "items": [{"price": metered.id, "quantity": 1}]})
    sub = client.v1.subscriptions.create(
        {"customer": customer.id, "items": [{"price": metered.id}, {"price": base.id}], "metadata": {"org_id": "org_7"}}
    )
    assert sub.status == "active"
    assert [i.price.id for i in sub["items"].data] == [metered.id, base.id]
    item = sub["items"].data[0]
    assert item.current_period_end > item.current_period_start
    assert client.v1.subscriptions.retrieve(sub.id).metadata.to_dict() == {"org_id": "org_7"}
    cancelled = client.v1.subscriptions.cancel(sub.id)
    assert cancelled.status == "canceled"
    assert cancelled.canceled_at is not None
    types = [e.type for e in client.v1.events.list({"type": "customer.subscription.*"}).data]
    assert types == ["customer.subscription.deleted", "customer.subscription.created"]
    assert client.v1.subscriptions.list({"customer": customer.id}).data == []
    assert len(client.v1.subscriptions.list({"customer": customer.id, "status": "all"}).data) == 1


def test_checkout_session_complete_helper(
    client: stripe.StripeClient, server: StripeServerThread, http: requests.Session, meter: Any
) -> None:
    metered = _metered_price(client, meter)
    session = client.v1.checkout.sessions.create(
        {
            "mode": "subscription",
            "line_items": [{"price": metered.id}],
            "success_url": "https://example.test/ok",
            "client_reference_id": "org_9",
            "subscription_data": {"metadata": {"org_id": "org_9"}},
        }
    )
    assert (session.status, session.payment_status, session.customer) == ("open", "unpaid", None)
    done = http.post(f"{server.base_url}/_fake/checkout_sessions/{session.id}/complete", json={"email": "o@9.test"})
    assert done.status_code == 200
    after = client.v1.checkout.sessions.retrieve(session.id)
    assert after.status == "complete"
    assert after.customer is not None and after.subscription is not None
    sub = client.v1.subscriptions.retrieve(str(after.subscription))
    assert sub.metadata is not None and sub.metadata.to_dict() == {"org_id": "org_9"}
    types = [e.type for e in client.v1.events.list().data]
    assert types[:3] == ["checkout.session.completed", "customer.subscription.created", "customer.created"]


def test_customer_balance_transactions(client: stripe.StripeClient, customer: Any) -> None:
    txn = client.v1.customers.balance_transactions.create(
        customer.id, {"amount": -1500, "currency": "usd", "description": "credit"}
    )
    assert (txn.object, txn.amount, txn.ending_balance) == ("customer_balance_transaction", -1500, -1500)
    assert client.v1.customers.retrieve(customer.id).balance == -1500


# -- webhooks ----------------------------------------------------------------------------------------


class Receiver:
    """A local webhook receiver; answers 500 to the first ``fail_first`` requests."""

    def __init__(self, fail_first: int = 0) -> None:
        import http.server
        import threading

        self.fail_first = fail_first
        self.received: list[tuple[bytes, str]] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.received.append((body, self.headers.get("Stripe-Signature", "")))
                status = 500 if len(outer.received) <= outer.fail_first else 200
                self.send_response(status)
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


def test_webhooks_are_signed_and_verifiable(
    client: stripe.StripeClient, server: StripeServerThread, meter: Any
) -> None:
    with Receiver() as rx:
        endpoint = client.v1.webhook_endpoints.create(
            {"url": rx.url, "enabled_events": ["checkout.session.completed", "customer.created"]}
        )
        assert endpoint.secret is not None and endpoint.secret.startswith("whsec_")
        metered = _metered_price(client, meter)
        session = client.v1.checkout.sessions.create({"mode": "subscription", "line_items": [{"price": metered.id}]})
        server.state.complete_checkout_session(session.id, email="who@x.test")
        assert server.state.wait_for_webhooks(5)
    events = [stripe.Webhook.construct_event(body.decode(), sig, endpoint.secret) for body, sig in rx.received]
    assert sorted(e.type for e in events) == ["checkout.session.completed", "customer.created"]
    completed = next(e for e in events if e.type == "checkout.session.completed")
    assert completed.data.object["id"] == session.id
    body, sig = rx.received[0]
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(body.decode(), sig, "whsec_wrong")
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(body.decode().replace("who@x.test", "evil@x.test"), sig, endpoint.secret)


def test_webhook_retries_are_bounded(client: stripe.StripeClient, server: StripeServerThread) -> None:
    server.state.webhook_retry_delays = (0.01, 0.01, 0.01)
    try:
        with Receiver(fail_first=2) as flaky:
            client.v1.webhook_endpoints.create({"url": flaky.url, "enabled_events": ["customer.created"]})
            created = client.v1.customers.create({"name": "retry me"})
            assert server.state.wait_for_webhooks(5)
        attempts = [d for d in server.state.webhook_deliveries() if d["url"] == flaky.url]
        assert [d["status"] for d in attempts] == [500, 500, 200]
        event = client.v1.events.list({"type": "customer.created"}).data[0]
        assert event.data.object["id"] == created.id
        assert event.pending_webhooks == 0
        server.state.reset()
        with Receiver(fail_first=100) as dead:
            client.v1.webhook_endpoints.create({"url": dead.url, "enabled_events": ["*"]})
            client.v1.customers.create({"name": "never delivered"})
            assert server.state.wait_for_webhooks(5)
        assert len(server.state.webhook_deliveries()) == 4  # 1 + len(retry delays), then given up
    finally:
        del server.state.webhook_retry_delays
