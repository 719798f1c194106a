"""The local Stripe server's answers conform to Stripe's published OpenAPI schema, path by path.

``tests/fixtures/stripe/openapi_subset.json`` keeps the response schemas of the paths edgebill calls on the
meter-event, reconciliation and subscription side (v1: meters, meter events, adjustments, event summaries,
subscriptions; v2: meter event sessions, the meter event stream and its errors, events), copied from Stripe's
spec (see its ``_source``). Each path is called over HTTP as edgebill calls it, and the JSON that comes back is
validated against the schema for that path, method and status: types, ``nullable``, enums, required properties,
nested objects and lists. The objects of the other paths (customers, products, prices, invoices, webhook
endpoints) are compared with Stripe's example objects in ``test_stripe_fake_shapes.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from infra.devkit.stripe_fake import StripeServerThread

pytestmark = pytest.mark.integration

SUBSET = json.loads((Path(__file__).resolve().parents[1] / "fixtures" / "stripe" / "openapi_subset.json").read_text())
SCHEMAS: dict[str, Any] = SUBSET["schemas"]
PATHS: dict[str, Any] = SUBSET["paths"]
KEY = "sk_test_openapi"

_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
}


def problems(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    """Why ``value`` does not conform to ``schema`` (empty: it does). A reference to a schema the subset does
    not keep accepts an object or its id, as an expandable field is one or the other."""
    if "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        if name not in SCHEMAS:
            return (
                []
                if isinstance(value, dict | str) or (value is None and schema.get("nullable"))
                else [f"{where}: {value!r} is not an object ({name})"]
            )
        return problems(value, SCHEMAS[name], where)
    if value is None:
        return [] if schema.get("nullable") or not schema else [f"{where}: null, not nullable"]
    for combo in ("anyOf", "oneOf"):
        if combo in schema:
            tried = [problems(value, s, where) for s in schema[combo]]
            if all(tried):
                return [f"{where}: matches none of {combo}: " + " | ".join("; ".join(t) for t in tried)]
            return []
    out: list[str] = []
    kind = schema.get("type")
    if kind is not None:
        ok = isinstance(value, _TYPES[kind]) and not (kind in ("integer", "number") and isinstance(value, bool))
        if not ok:
            return [f"{where}: {type(value).__name__} {value!r} is not {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{where}: {value!r} not in {schema['enum']}")
    if "maxLength" in schema and isinstance(value, str) and len(value) > schema["maxLength"]:
        out.append(f"{where}: longer than {schema['maxLength']}")
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if name not in value:
                out.append(f"{where}: missing required {name!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for name, v in value.items():
            if name in props:
                out += problems(v, props[name], f"{where}.{name}")
            elif isinstance(extra, dict):
                out += problems(v, extra, f"{where}.{name}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            out += problems(v, schema["items"], f"{where}[{i}]")
    return out


class Api:
    def __init__(self, base: str) -> None:
        self.base = base
        self.s = requests.Session()
        self.checked: set[str] = set()

    def call(
        self, method: str, path: str, route: str, *, data: Any = None, body: Any = None, token: str = KEY
    ) -> tuple[int, Any]:
        resp = self.s.request(
            method, self.base + path, data=data, json=body, headers={"Authorization": f"Bearer {token}"}
        )
        got = resp.json()
        responses = PATHS[f"{method} {route}"]
        schema = responses.get("200") if resp.status_code < 300 else responses.get("default")
        assert schema is not None, f"{method} {route} answered {resp.status_code}, which the subset does not describe"
        found = problems(got, schema)
        assert not found, f"{method} {path} ({resp.status_code}):\n" + "\n".join(found)
        self.checked.add(f"{method} {route}{'' if resp.status_code < 300 else ' error'}")
        return resp.status_code, got


@pytest.fixture
def api() -> Iterator[Api]:
    with StripeServerThread() as srv:
        a = Api(srv.base_url)
        yield a
        a.s.close()


def test_every_path_edgebill_uses_answers_in_stripes_published_schema(api: Api) -> None:
    now = int(time.time())
    # Meters, meter events (v1), adjustments, summaries.
    _, meter = api.call(
        "POST",
        "/v1/billing/meters",
        "/v1/billing/meters",
        data={"display_name": "m", "event_name": "oa_ev", "default_aggregation[formula]": "sum"},
    )
    api.call("GET", "/v1/billing/meters?limit=100", "/v1/billing/meters")
    customer = api.s.post(
        api.base + "/v1/customers", data={"email": "o@x.test"}, headers={"Authorization": f"Bearer {KEY}"}
    ).json()["id"]
    for i, value in enumerate(("2.5", "-0.5", "7")):
        api.call(
            "POST",
            "/v1/billing/meter_events",
            "/v1/billing/meter_events",
            data={
                "event_name": "oa_ev",
                "identifier": f"oa-{i}",
                "timestamp": now - 3600 * i,
                "payload[stripe_customer_id]": customer,
                "payload[value]": value,
            },
        )
    api.call(
        "POST",
        "/v1/billing/meter_event_adjustments",
        "/v1/billing/meter_event_adjustments",
        data={"event_name": "oa_ev", "type": "cancel", "cancel[identifier]": "oa-2"},
    )
    day = now // 86400 * 86400
    for window, lo, hi in (
        ("day", day - 86400, day + 86400),
        ("hour", now // 3600 * 3600 - 7200, now // 3600 * 3600 + 3600),
    ):
        _, summaries = api.call(
            "GET",
            f"/v1/billing/meters/{meter['id']}/event_summaries?customer={customer}&start_time={lo}&end_time={hi}"
            f"&value_grouping_window={window}",
            "/v1/billing/meters/{id}/event_summaries",
        )
        assert summaries["data"]

    # Subscriptions: create, retrieve, list, update.
    auth = {"Authorization": f"Bearer {KEY}"}
    product = api.s.post(api.base + "/v1/products", data={"name": "p"}, headers=auth).json()["id"]
    price = api.s.post(
        api.base + "/v1/prices",
        data={
            "product": product,
            "currency": "usd",
            "unit_amount_decimal": "0.5",
            "recurring[interval]": "month",
            "recurring[usage_type]": "metered",
            "recurring[meter]": meter["id"],
        },
        headers=auth,
    ).json()["id"]
    _, sub = api.call(
        "POST", "/v1/subscriptions", "/v1/subscriptions", data={"customer": customer, "items[0][price]": price}
    )
    api.call("GET", f"/v1/subscriptions/{sub['id']}", "/v1/subscriptions/{id}")
    api.call("GET", f"/v1/subscriptions?customer={customer}&status=all", "/v1/subscriptions")
    _, updated = api.call(
        "POST",
        f"/v1/subscriptions/{sub['id']}",
        "/v1/subscriptions/{id}",
        data={"description": "edge", "metadata[org_id]": "o"},
    )
    assert updated["description"] == "edge"
    settings = updated["invoice_settings"]
    assert {"custom_fields", "description", "footer", "issuer"} <= set(settings)
    item = updated["items"]["data"][0]
    assert "plan" in item and "trial_period_days" in item["price"]["recurring"]

    # v2: a meter event session, the stream (accepted, and each way it refuses), events.
    _, session = api.call("POST", "/v2/billing/meter_event_session", "/v2/billing/meter_event_session", body={})
    token = session["authentication_token"]
    stream = "/v2/billing/meter_event_stream"
    event = {"event_name": "oa_ev", "identifier": "oa-v2-1", "payload": {"stripe_customer_id": customer, "value": "1"}}
    status, _ = api.call("POST", stream, stream, body={"events": [event]}, token=token)
    assert status == 202
    refusals = [
        {"events": [event], "extra": 1},
        {"events": []},
        {"events": [dict(event, identifier=f"x{i}") for i in range(101)]},
        {"events": ["not an object"]},
        {"events": [{**event, "color": "red"}]},
    ]
    for body in refusals:
        status, err = api.call("POST", stream, stream, body=body, token=token)
        assert status == 400 and "param" not in err["error"], err  # Stripe's v2 errors carry no param
    status, err = api.call("POST", stream, stream, body={"events": [event]}, token=KEY)
    assert status == 401 and err["error"]["code"]
    status, err = api.call("POST", stream, stream, body={"events": [event]}, token="mes_unknown")
    assert status == 401
    api.s.post(api.base + "/_fake/meter_events/oa-v2-1/reject", json={})
    _, events = api.call("GET", "/v2/core/events?types[0]=v1.billing.meter.error_report_triggered", "/v2/core/events")
    (report,) = events["data"]
    assert not problems(report, {"$ref": "#/schemas/v1.billing.meter.error_report_triggered"})
    api.call("GET", f"/v2/core/events/{report['id']}", "/v2/core/events/{id}")
    api.s.post(api.base + "/_fake/clock", json={"advance": 16 * 60})  # the session expires after 15 minutes
    status, err = api.call("POST", stream, stream, body={"events": [event]}, token=token)
    assert status == 401 and err["error"]["code"] == "billing_meter_event_session_expired"

    assert {p for p in api.checked if not p.endswith(" error")} == set(PATHS)  # every path in the subset called


def test_the_validator_finds_what_does_not_conform() -> None:
    meter = {"$ref": "#/schemas/billing.meter_event_summary"}
    good = {
        "aggregated_value": 1.5,
        "end_time": 2,
        "id": "s",
        "livemode": False,
        "meter": "m",
        "object": "billing.meter_event_summary",
        "start_time": 1,
    }
    assert problems(good, meter) == []
    assert problems({**good, "aggregated_value": "1.5"}, meter) == ["$.aggregated_value: str '1.5' is not number"]
    assert problems({k: v for k, v in good.items() if k != "meter"}, meter) == ["$: missing required 'meter'"]
    assert problems({**good, "object": "x"}, meter)[0].startswith("$.object: 'x' not in")
    settings = {"$ref": "#/schemas/subscriptions_resource_subscription_invoice_settings"}
    assert problems({"issuer": {"type": "self"}, "footer": None}, settings) == []
    assert problems({"footer": None}, settings) == ["$: missing required 'issuer'"]
