"""The Stripe reader's pacing and retries, with an injected clock and sleep (no network): even spacing, a 429
honoured with Retry-After and a slower pace, each kind of failure as data, exact decimals from the JSON body."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import stripe

from models.reconcile import Grouping
from sinks.reconcile.stripe_reader import Pacer, Problem, StripeReader


class Clock:
    def __init__(self) -> None:
        self.t = 0.0
        self.slept: list[float] = []

    def now(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.t += s


class Body:
    def __init__(self, doc: Any) -> None:
        self.body = doc if isinstance(doc, str) else json.dumps(doc)


class Client:
    """``raw_request`` answering from a script: each item is a document or an exception to raise."""

    def __init__(self, clock: Clock, script: list[Any]) -> None:
        self.clock = clock
        self.script = list(script)
        self.calls: list[tuple[float, str, str, dict[str, Any]]] = []

    def raw_request(self, method: str, path: str, **params: Any) -> Body:
        self.calls.append((self.clock.t, method, path, params))
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        return Body(item)


def _reader(script: list[Any], per_s: float = 5.0) -> tuple[StripeReader, Client, Clock]:
    clock = Clock()
    client = Client(clock, script)
    reader = StripeReader(
        client,  # type: ignore[arg-type]
        reads_per_s=per_s,
        clock=clock.now,
        sleep=clock.sleep,
        rng=random.Random(1),
    )
    return reader, client, clock


def _summary(value: str, start: int = 0) -> str:
    """A summaries page whose value is written as given (a JSON number, not a float's text)."""
    item = f'{{"id": "s1", "start_time": {start}, "aggregated_value": {value}}}'
    return f'{{"object": "list", "has_more": false, "data": [{item}]}}'


def test_requests_are_spaced_evenly_at_the_configured_pace() -> None:
    clock = Clock()
    pacer = Pacer(5.0, clock=clock.now, sleep=clock.sleep)
    for _ in range(6):
        pacer.acquire()
    assert clock.t == 1.0 and all(abs(s - 0.2) < 1e-9 for s in clock.slept)  # 6 requests: 5 gaps of 0.2 s
    pacer.slow_down()
    pacer.slow_down()
    pacer.slow_down()
    pacer.slow_down()
    assert pacer.per_s == 5.0 / 8  # never slower than an eighth
    pacer.reset()
    assert pacer.per_s == 5.0


def test_values_are_exact_decimals_never_floats() -> None:
    reader, client, _ = _reader([_summary("0.30000000000000004441"), _summary("123456789012.345678")])
    got = reader.summaries("mtr_1", "cus_1", 0, 86400, Grouping.DAY)
    assert got.value == {0: Decimal("0.30000000000000004441")}
    assert reader.summaries("mtr_1", "cus_1", 0, 86400, Grouping.DAY).value == {0: Decimal("123456789012.345678")}
    _t, method, path, params = client.calls[0]
    assert (method, path) == ("get", "/v1/billing/meters/mtr_1/event_summaries")
    assert params["value_grouping_window"] == "day" and params["limit"] == 100


def test_a_429_is_retried_after_retry_after_at_half_the_pace() -> None:
    limited = stripe.RateLimitError("slow down", http_status=429, headers={"Retry-After": "7"})
    reader, _client, clock = _reader([limited, _summary("5")])
    got = reader.summaries("mtr_1", "cus_1", 0, 86400, Grouping.DAY)
    assert got.ok and got.value == {0: Decimal(5)}
    assert reader.throttled == 1 and reader.requests == 2 and reader.reads_per_s == 2.5
    assert 7.0 in clock.slept  # Retry-After is longer than the first backoff: it wins
    reader.begin_run()
    assert (reader.reads_per_s, reader.requests, reader.throttled) == (5.0, 0, 0)


def test_every_failure_is_an_answer() -> None:
    def summaries(script: list[Any]) -> tuple[Any, Client]:
        reader, client, _ = _reader(script)
        return reader.summaries("mtr_1", "cus_1", 0, 86400, Grouping.DAY), client

    down = stripe.APIConnectionError("connection refused")
    got, client = summaries([down, down, down])
    assert got.problem is Problem.UNREACHABLE and got.problem.fatal and len(client.calls) == 3
    got, client = summaries([stripe.AuthenticationError("bad key", http_status=401)])
    assert got.problem is Problem.REFUSED_KEY and len(client.calls) == 1
    missing = stripe.InvalidRequestError(
        "No such customer: 'cus_1'", "customer", code="resource_missing", http_status=400
    )
    got, _ = summaries([missing])
    assert (got.problem, got.param, got.problem.fatal) == (Problem.NOT_FOUND, "customer", False)
    got, client = summaries([stripe.InvalidRequestError("bad start_time", "start_time", http_status=400)])
    assert got.problem is Problem.ERROR and len(client.calls) == 1
    limited = stripe.RateLimitError("slow down", http_status=429)
    got, client = summaries([limited] * 6)
    assert got.problem is Problem.THROTTLED and got.problem.fatal and len(client.calls) == 6
    server = stripe.APIError("boom", http_status=500, headers={"Stripe-Should-Retry": "true"})
    got, client = summaries([server, _summary("1")])
    assert got.ok and len(client.calls) == 2


def test_pages_are_followed_and_invoice_lines_read_exactly() -> None:
    page1 = {"object": "list", "has_more": True, "data": [{"id": "s2", "start_time": 3600, "aggregated_value": 2}]}
    page2 = {"object": "list", "has_more": False, "data": [{"id": "s1", "start_time": 0, "aggregated_value": 1}]}
    reader, client, _ = _reader([page1, page2])
    got = reader.summaries("mtr_1", "cus_1", 0, 7200, Grouping.HOUR)
    assert got.value == {0: Decimal(1), 3600: Decimal(2)}
    assert client.calls[1][3]["starting_after"] == "s2"
    line = {
        "id": "il_1",
        "pricing": {"price_details": {"price": "price_1", "product": "prod_1"}, "type": "price_details"},
        "quantity": 12,
        "quantity_decimal": "12.000001",
        "period": {"start": 10, "end": 20},
        "parent": {"subscription_item_details": {"subscription_item": "si_1"}},
    }
    preview = {
        "id": "upcoming_in_1",
        "customer": "cus_1",
        "lines": {"data": [line], "has_more": True, "url": "/v1/invoices/upcoming_in_1/lines"},
    }
    more = {"object": "list", "has_more": False, "data": [{**line, "id": "il_2", "quantity_decimal": None}]}
    reader, client, _ = _reader([preview, more])
    got = reader.invoice_preview("sub_1")
    assert got.value is not None
    assert [(ln.price_id, ln.quantity, ln.period_start, ln.subscription_item) for ln in got.value.lines] == [
        ("price_1", Decimal("12.000001"), 10, "si_1"),
        ("price_1", Decimal(12), 10, "si_1"),
    ]
    assert client.calls[0][1:3] == ("post", "/v1/invoices/create_preview")
    assert client.calls[1][1:3] == ("get", "/v1/invoices/upcoming_in_1/lines")


def test_error_reports_name_refused_and_held_identifiers() -> None:
    report: Callable[[str, str], dict[str, Any]] = lambda code, ident: {  # noqa: E731
        "code": code,
        "error_count": 1,
        "sample_errors": [{"error_message": "x", "request": {"identifier": ident}}],
    }
    events = {
        "data": [
            {
                "type": "v1.billing.meter.error_report_triggered",
                "data": {
                    "reason": {
                        "error_types": [
                            report("meter_event_customer_not_found", "a"),
                            report("duplicate_meter_event", "b"),
                        ]
                    }
                },
            }
        ],
        "next_page_url": None,
    }
    reader, client, _ = _reader([events])
    got = reader.error_reports(1000.0)
    assert got.value is not None and got.value.refused == {"a": "meter_event_customer_not_found"}
    assert got.value.held == {"b"}
    assert client.calls[0][2] == "/v2/core/events"
