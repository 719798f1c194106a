"""Route table: Stripe endpoints mapped onto ``FakeStripe`` operations, plus the ``/_fake`` inspection API."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from infra.devkit.stripe_fake._app import STATE_KEY, json_response, params, state_of, stripe_middleware
from infra.devkit.stripe_fake._errors import StripeError
from infra.devkit.stripe_fake._faults import FaultConfig
from infra.devkit.stripe_fake._state import FakeStripe
from infra.devkit.stripe_fake._webhooks import WebhookDeliverer

__all__ = ["add_routes", "build_app"]

Obj = dict[str, Any]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _op(fn: Callable[[web.Request], Any], status: int = 200) -> Handler:
    """Wrap a synchronous state call (given the request) into a JSON handler; ``expand[]`` is applied to the
    answer (Stripe expands after the operation, on what it returns)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        obj = fn(request)
        expand = params(request).get("expand")
        if expand is not None:
            obj = state_of(request).expand(obj, expand if isinstance(expand, list) else [expand])
        return json_response(obj, status)

    return handler


def _id(request: web.Request) -> str:
    return request.match_info["id"]


# -- /_fake inspection -------------------------------------------------------------------------------


async def _fake_json(request: web.Request) -> Obj:
    body = await request.read()
    if not body.strip():
        return {}
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise StripeError(400, "invalid JSON body") from None
    if not isinstance(data, dict):
        raise StripeError(400, "JSON body must be an object")
    return data


async def fake_meter_events(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    include = request.query.get("include_cancelled", "true") != "false"
    data = state.accepted_meter_events(include_cancelled=include)
    return json_response({"data": data, "count": len(data)})


async def fake_drop_event(request: web.Request) -> web.StreamResponse:
    return json_response(state_of(request).drop_meter_event(_id(request)))


async def fake_reject_event(request: web.Request) -> web.StreamResponse:
    data = await _fake_json(request)
    code, message = data.get("code"), data.get("message")
    if not isinstance(code, str | None) or not isinstance(message, str | None):
        raise StripeError(400, "code and message must be strings")
    return json_response(state_of(request).reject_meter_event(_id(request), code, message))


async def fake_receipts(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    return json_response({"data": state.receipt_list(), "lost": state.lost_identifier_list()})


async def fake_duplicates(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    return json_response({"data": state.duplicate_attempt_list(), "conflicting": state.conflicting_identifiers()})


async def fake_requests(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    return json_response({"data": state.request_counts(), "faults_injected": dict(state.faults.injected)})


async def fake_error_reports(request: web.Request) -> web.StreamResponse:
    data = state_of(request).error_report_list()
    return json_response({"data": data, "count": len(data)})


async def fake_reset(request: web.Request) -> web.StreamResponse:
    state_of(request).reset()
    return json_response({"reset": True})


async def fake_faults(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    if request.method == "POST":
        data = await _fake_json(request)
        try:
            cfg = FaultConfig.from_mapping(data, None if data.pop("_replace", False) else state.faults.config)
        except (TypeError, ValueError) as exc:
            raise StripeError(400, str(exc)) from None
        state.set_faults(cfg)
    return json_response({"faults": state.faults.config.to_dict(), "injected": dict(state.faults.injected)})


async def fake_webhook_deliveries(request: web.Request) -> web.StreamResponse:
    data = state_of(request).webhook_deliveries()
    return json_response({"data": data, "count": len(data)})


async def fake_complete_checkout(request: web.Request) -> web.StreamResponse:
    data = await _fake_json(request)
    email, name = data.get("email"), data.get("name")
    if not isinstance(email, str | None) or not isinstance(name, str | None):
        raise StripeError(400, "email and name must be strings")
    session = state_of(request).complete_checkout_session(_id(request), email=email, name=name)
    return json_response(session)


async def fake_resend_event(request: web.Request) -> web.StreamResponse:
    return json_response(state_of(request).resend_event(_id(request)))


async def fake_clock(request: web.Request) -> web.StreamResponse:
    state = state_of(request)
    if request.method == "POST":
        data = await _fake_json(request)
        advance = data.get("advance", 0)
        if not isinstance(advance, int | float) or isinstance(advance, bool) or advance < 0:
            raise StripeError(400, "advance must be a non-negative number of seconds")
        state.advance_clock(float(advance))
    return json_response({"now": state.now()})


# -- table -------------------------------------------------------------------------------------------


def add_routes(app: web.Application) -> None:
    r = app.router
    s = state_of

    # customers
    r.add_post("/v1/customers", _op(lambda q: s(q).create_customer(params(q))))
    r.add_get("/v1/customers", _op(lambda q: s(q).list_customers(params(q))))
    r.add_get("/v1/customers/search", _op(lambda q: s(q).search_customers(params(q))))
    r.add_get("/v1/customers/{id}", _op(lambda q: s(q).retrieve_customer(_id(q))))
    r.add_post("/v1/customers/{id}", _op(lambda q: s(q).update_customer(_id(q), params(q))))
    r.add_delete("/v1/customers/{id}", _op(lambda q: s(q).delete_customer(_id(q))))
    r.add_post(
        "/v1/customers/{id}/balance_transactions",
        _op(lambda q: s(q).create_balance_transaction(_id(q), params(q))),
    )
    r.add_get(
        "/v1/customers/{id}/balance_transactions",
        _op(lambda q: s(q).list_balance_transactions(_id(q), params(q))),
    )

    # billing meters, meter events, summaries, adjustments
    r.add_post("/v1/billing/meters", _op(lambda q: s(q).create_meter(params(q))))
    r.add_get("/v1/billing/meters", _op(lambda q: s(q).list_meters(params(q))))
    r.add_get("/v1/billing/meters/{id}", _op(lambda q: s(q).retrieve_meter(_id(q))))
    r.add_post("/v1/billing/meters/{id}", _op(lambda q: s(q).update_meter(_id(q), params(q))))
    r.add_post("/v1/billing/meters/{id}/deactivate", _op(lambda q: s(q).set_meter_active(_id(q), False)))
    r.add_post("/v1/billing/meters/{id}/reactivate", _op(lambda q: s(q).set_meter_active(_id(q), True)))
    r.add_get(
        "/v1/billing/meters/{id}/event_summaries",
        _op(lambda q: s(q).list_event_summaries(_id(q), params(q))),
    )
    r.add_post("/v1/billing/meter_events", _op(lambda q: s(q).create_meter_event_v1(params(q))))
    r.add_post("/v1/billing/meter_event_adjustments", _op(lambda q: s(q).create_adjustment_v1(params(q))))

    # catalog
    r.add_post("/v1/products", _op(lambda q: s(q).create_product(params(q))))
    r.add_get("/v1/products", _op(lambda q: s(q).list_products(params(q))))
    r.add_get("/v1/products/search", _op(lambda q: s(q).search_products(params(q))))
    r.add_get("/v1/products/{id}", _op(lambda q: s(q).retrieve_product(_id(q))))
    r.add_post("/v1/products/{id}", _op(lambda q: s(q).update_product(_id(q), params(q))))
    r.add_delete("/v1/products/{id}", _op(lambda q: s(q).delete_product(_id(q))))
    r.add_post("/v1/prices", _op(lambda q: s(q).create_price(params(q))))
    r.add_get("/v1/prices", _op(lambda q: s(q).list_prices(params(q))))
    r.add_get("/v1/prices/search", _op(lambda q: s(q).search_prices(params(q))))
    r.add_get("/v1/prices/{id}", _op(lambda q: s(q).retrieve_price(_id(q))))
    r.add_post("/v1/prices/{id}", _op(lambda q: s(q).update_price(_id(q), params(q))))

    # subscriptions and checkout
    r.add_post("/v1/subscriptions", _op(lambda q: s(q).create_subscription(params(q))))
    r.add_get("/v1/subscriptions", _op(lambda q: s(q).list_subscriptions(params(q))))
    r.add_get("/v1/subscriptions/{id}", _op(lambda q: s(q).retrieve_subscription(_id(q))))
    r.add_post("/v1/subscriptions/{id}", _op(lambda q: s(q).update_subscription(_id(q), params(q))))
    r.add_delete("/v1/subscriptions/{id}", _op(lambda q: s(q).cancel_subscription(_id(q), params(q))))
    r.add_get("/v1/subscription_items", _op(lambda q: s(q).list_subscription_items(params(q))))
    r.add_post("/v1/invoices/create_preview", _op(lambda q: s(q).create_invoice_preview(params(q))))
    r.add_get("/v1/invoices/{id}/lines", _op(lambda q: s(q).list_invoice_lines(_id(q), params(q))))
    r.add_post("/v1/checkout/sessions", _op(lambda q: s(q).create_checkout_session(params(q))))
    r.add_get("/v1/checkout/sessions", _op(lambda q: s(q).list_checkout_sessions(params(q))))
    r.add_get("/v1/checkout/sessions/{id}", _op(lambda q: s(q).retrieve_checkout_session(_id(q))))
    r.add_post("/v1/checkout/sessions/{id}/expire", _op(lambda q: s(q).expire_checkout_session(_id(q))))

    # webhooks and events
    r.add_post("/v1/webhook_endpoints", _op(lambda q: s(q).create_webhook_endpoint(params(q))))
    r.add_get("/v1/webhook_endpoints", _op(lambda q: s(q).list_webhook_endpoints(params(q))))
    r.add_get("/v1/webhook_endpoints/{id}", _op(lambda q: s(q).retrieve_webhook_endpoint(_id(q))))
    r.add_post("/v1/webhook_endpoints/{id}", _op(lambda q: s(q).update_webhook_endpoint(_id(q), params(q))))
    r.add_delete("/v1/webhook_endpoints/{id}", _op(lambda q: s(q).delete_webhook_endpoint(_id(q))))
    r.add_get("/v1/events", _op(lambda q: s(q).list_events(params(q))))
    r.add_get("/v1/events/{id}", _op(lambda q: s(q).retrieve_event(_id(q))))

    # v2 billing
    r.add_post("/v2/billing/meter_event_session", _op(lambda q: s(q).create_session()))
    r.add_post("/v2/billing/meter_events", _op(lambda q: s(q).create_meter_event_v2(params(q))))
    r.add_post("/v2/billing/meter_event_adjustments", _op(lambda q: s(q).create_adjustment_v2(params(q))))

    async def stream(request: web.Request) -> web.StreamResponse:
        state_of(request).stream_meter_events(params(request))
        return json_response({}, 202)

    r.add_post("/v2/billing/meter_event_stream", stream)
    r.add_get("/v2/core/events", _op(lambda q: s(q).list_v2_events(params(q))))
    r.add_get("/v2/core/events/{id}", _op(lambda q: s(q).retrieve_v2_event(_id(q))))

    # inspection
    r.add_get("/_fake/meter_events", fake_meter_events)
    r.add_post("/_fake/meter_events/{id}/drop", fake_drop_event)
    r.add_post("/_fake/meter_events/{id}/reject", fake_reject_event)
    r.add_get("/_fake/receipts", fake_receipts)
    r.add_get("/_fake/duplicates", fake_duplicates)
    r.add_get("/_fake/requests", fake_requests)
    r.add_get("/_fake/error_reports", fake_error_reports)
    r.add_get("/_fake/webhook_deliveries", fake_webhook_deliveries)
    r.add_post("/_fake/checkout_sessions/{id}/complete", fake_complete_checkout)
    r.add_post("/_fake/events/{id}/resend", fake_resend_event)
    r.add_post("/_fake/reset", fake_reset)
    r.add_get("/_fake/faults", fake_faults)
    r.add_post("/_fake/faults", fake_faults)
    r.add_get("/_fake/clock", fake_clock)
    r.add_post("/_fake/clock", fake_clock)


def build_app(state: FakeStripe) -> web.Application:
    """The aiohttp application serving ``state`` (Stripe API under /v1, /v2; inspection under /_fake)."""
    app = web.Application(middlewares=[stripe_middleware], client_max_size=16 * 1024 * 1024)
    app[STATE_KEY] = state
    add_routes(app)
    deliverer = WebhookDeliverer(state)

    async def start_webhooks(_: web.Application) -> None:
        await deliverer.start()

    async def stop_webhooks(_: web.Application) -> None:
        await deliverer.stop()

    app.on_startup.append(start_webhooks)
    app.on_cleanup.append(stop_webhooks)
    return app
