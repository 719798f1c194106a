"""The Stripe sinks without a server: classification, per-key serialisation, pacing, the v2 stream sink
(chunking, bisection, sessions), and the reading of Stripe's error reports."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, cast

import pytest
import stripe

from sinks.base import Backoff, RetryingSink, Status
from sinks.stripe.errors import classify
from sinks.stripe.v1 import KeyedLocks, MeterEvent, RateLimiter, StripeMeterSink, meter_events_base_for
from sinks.stripe.v2 import (
    ACCEPTED_ASYNC,
    MeterEventSessions,
    StripeStreamSink,
    iso_timestamp,
    read_error_reports,
)

NOW = 1_790_000_000
METER = "sandbox_compute_sandbox_overage"


def ev(i: int, customer: str = "cus_1", value: str = "1.5", meter: str = METER) -> MeterEvent:
    return MeterEvent(f"org:{i}:{meter}", meter, customer, value, NOW - 3600)


# -- classify -----------------------------------------------------------------------------------------


def test_a_500_that_says_do_not_retry_is_transient_for_a_sender_that_uses_new_keys() -> None:
    err = stripe.APIError("boom", http_status=500, headers={"Stripe-Should-Retry": "false"})
    assert classify(err, None).status is Status.PERMANENT  # taken literally: replaying that key cannot succeed
    assert classify(err, None, new_request_per_attempt=True).status is Status.TRANSIENT  # a new key is a new request
    bad = stripe.InvalidRequestError("No such customer: cus_x", "payload", http_status=400)
    assert classify(bad, None, new_request_per_attempt=True).status is Status.PERMANENT  # a 4xx stays permanent
    dup = stripe.InvalidRequestError(
        "An event already exists with identifier org:1:m.",
        None,
        http_status=400,
        headers={"Stripe-Should-Retry": "false"},
    )
    assert classify(dup, None, new_request_per_attempt=True).status is Status.DUPLICATE


def test_retry_after_is_read_as_seconds_or_as_an_http_date() -> None:
    rl = stripe.RateLimitError("slow down", http_status=429, headers={"Retry-After": "3"})
    assert classify(rl, None).retry_after == 3.0
    later = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    dated = stripe.RateLimitError("slow down", http_status=429, headers={"retry-after": later})
    ra = classify(dated, None).retry_after
    assert ra is not None and 25 <= ra <= 31
    junk = stripe.RateLimitError("slow down", http_status=429, headers={"Retry-After": "soon"})
    o = classify(junk, None)
    assert (o.status, o.error) == (Status.TRANSIENT, "slow down") and o.retry_after is None
    should = stripe.InvalidRequestError("locked", None, http_status=409, headers={"Stripe-Should-Retry": "true"})
    assert classify(should, None).status is Status.TRANSIENT


def test_the_stream_goes_to_stripes_meter_events_host_only_for_the_real_api() -> None:
    assert meter_events_base_for("https://api.stripe.com") == "https://meter-events.stripe.com"
    assert meter_events_base_for("http://127.0.0.1:12111") == "http://127.0.0.1:12111"


# -- per-key locks and pacing ---------------------------------------------------------------------------


def test_keyed_locks_serialise_one_key_and_forget_it_afterwards() -> None:
    locks: KeyedLocks[str] = KeyedLocks()
    inside: Counter[str] = Counter()
    worst: Counter[str] = Counter()
    guard = threading.Lock()

    def work(key: str) -> None:
        for _ in range(20):
            with locks.hold(key):
                with guard:
                    inside[key] += 1
                    worst[key] = max(worst[key], inside[key])
                time.sleep(0.0005)
                with guard:
                    inside[key] -= 1

    threads = [threading.Thread(target=work, args=(k,)) for k in ("a", "a", "a", "b", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert worst == Counter({"a": 1, "b": 1})
    assert len(locks) == 0


def test_rate_limiter_spaces_calls_and_can_be_off() -> None:
    clock = [100.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)

    limiter = RateLimiter(4.0, clock=lambda: clock[0], sleep=sleep)
    for _ in range(4):
        limiter.acquire()
    assert slept == pytest.approx([0.25, 0.5, 0.75])  # reserved slots 0, .25, .5, .75 s ahead
    off = RateLimiter(0, clock=lambda: clock[0], sleep=sleep)
    off.acquire()
    assert len(slept) == 3


# -- a fake SDK client ----------------------------------------------------------------------------------


class _Service:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self.create = fn


class FakeClient:
    """Just enough of ``stripe.StripeClient`` for the sinks: v1 meter events, v2 sessions and stream."""

    def __init__(
        self,
        v1: Callable[[dict[str, Any]], None] | None = None,
        stream: Callable[[dict[str, Any], str], None] | None = None,
    ) -> None:
        self.sessions = 0
        self.tokens: list[str] = []
        self.streamed: list[list[dict[str, Any]]] = []
        self._v1 = v1 or (lambda p: None)
        self._stream = stream or (lambda p, token: None)
        v1_ns = type("NS", (), {})()
        v1_ns.billing = type("NS", (), {})()
        v1_ns.billing.meter_events = _Service(lambda params: self._v1(params))
        v2_ns = type("NS", (), {})()
        v2_ns.billing = type("NS", (), {})()
        v2_ns.billing.meter_event_session = _Service(self._session)
        v2_ns.billing.meter_event_stream = _Service(self._stream_create)
        self.v1 = v1_ns
        self.v2 = v2_ns

    def _session(self, params: Any = None) -> Any:
        self.sessions += 1
        token = f"tok_{self.sessions}"
        self.tokens.append(token)
        return type(
            "Session",
            (),
            {
                "authentication_token": token,
                "created": "2026-01-01T00:00:00.000Z",
                "expires_at": "2026-01-01T00:15:00.000Z",
            },
        )()

    def _stream_create(self, params: dict[str, Any], options: dict[str, str]) -> None:
        events = list(params["events"])
        assert len(events) <= 100
        self._stream(params, options["api_key"])
        self.streamed.append(events)


def sdk(fake: FakeClient) -> stripe.StripeClient:
    return cast(stripe.StripeClient, fake)


# -- v1 sink --------------------------------------------------------------------------------------------


def test_v1_never_runs_two_calls_for_one_customer_and_meter_even_across_threads() -> None:
    guard = threading.Lock()
    active: Counter[tuple[str, str]] = Counter()
    worst: Counter[tuple[str, str]] = Counter()
    in_flight = [0, 0]  # now, max

    def create(params: dict[str, Any]) -> None:
        key = (params["payload"]["stripe_customer_id"], params["event_name"])
        with guard:
            active[key] += 1
            worst[key] = max(worst[key], active[key])
            in_flight[0] += 1
            in_flight[1] = max(in_flight[1], in_flight[0])
        time.sleep(0.001)
        with guard:
            active[key] -= 1
            in_flight[0] -= 1

    fake = FakeClient(v1=create)
    # Two senders in two threads (each its own sink and buffer): the per-key locks are per process.
    sinks = [StripeMeterSink(sdk(fake), concurrency=3, now=lambda: NOW) for _ in range(2)]
    results: list[Any] = []

    def run(sink: StripeMeterSink, offset: int) -> None:
        for flush in range(3):  # consecutive flushes too
            for i in range(12):
                sink.add(ev(offset + flush * 100 + i, customer=f"cus_{i % 4}"))
            results.extend(sink.flush())

    threads = [threading.Thread(target=run, args=(s, k * 1000)) for k, s in enumerate(sinks)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for s in sinks:
            s.close()
    assert len(results) == 72 and {o.status for o in results} == {Status.OK}
    assert set(worst.values()) == {1}  # never two at once per (customer, meter)
    assert in_flight[1] <= 6  # each sink keeps to its bound (3)


def test_v1_honours_retry_after_and_should_retry_through_the_retrying_sink() -> None:
    calls: Counter[str] = Counter()

    def create(params: dict[str, Any]) -> None:
        calls[params["identifier"]] += 1
        if calls[params["identifier"]] == 1:
            raise stripe.RateLimitError(
                "Too many requests", http_status=429, headers={"Retry-After": "2", "Stripe-Should-Retry": "true"}
            )
        if calls[params["identifier"]] == 2:
            raise stripe.APIError("boom", http_status=500, headers={"Stripe-Should-Retry": "false"})

    sleeps: list[float] = []
    inner = StripeMeterSink(sdk(FakeClient(v1=create)), concurrency=1, now=lambda: NOW)
    sink = RetryingSink(inner, max_attempts=5, sleep=sleeps.append, rng=random.Random(3), backoff=Backoff(0.1, 1))
    sink.add(ev(1))
    (out,) = sink.flush()
    assert out.status is Status.OK and out.attempts == 3
    assert sleeps[0] >= 2.0  # Stripe's Retry-After wins over a shorter backoff
    assert 0.1 <= sleeps[1] <= 0.2  # then the jittered backoff (attempt 2: [base, 2*base])
    inner.close()


def test_v1_presend_validation_sends_nothing_stripe_would_refuse() -> None:
    fake = FakeClient()
    sent: list[str] = []
    fake._v1 = lambda p: sent.append(p["identifier"])
    sink = StripeMeterSink(sdk(fake), now=lambda: NOW)
    sink.add(ev(1, value="1234567890.1234567"))
    sink.add(MeterEvent("x" * 101, METER, "cus_1", "1", NOW))
    sink.add(ev(2, customer=""))
    sink.add(MeterEvent("old", METER, "cus_1", "1", NOW - 36 * 86400))
    sink.add(MeterEvent("noname", "", "cus_1", "1", NOW))
    outs = sink.flush()
    assert sent == [] and {o.status for o in outs} == {Status.PERMANENT}
    assert {o.code for o in outs} == {"edgebill_presend_validation"}
    sink.close()


# -- v2 stream sink ---------------------------------------------------------------------------------------


def test_stream_sends_at_most_100_events_a_request_with_iso_timestamps() -> None:
    fake = FakeClient()
    sink = StripeStreamSink(sdk(fake), concurrency=3, now=lambda: NOW)
    try:
        for i in range(250):
            sink.add(ev(i))
        outs = sink.flush()
    finally:
        sink.close()
    assert sorted(len(r) for r in fake.streamed) == [50, 100, 100]
    assert {o.status for o in outs} == {Status.OK} and {o.code for o in outs} == {ACCEPTED_ASYNC}
    first = fake.streamed[0][0]
    assert first["timestamp"] == iso_timestamp(NOW - 3600) == "2026-09-21T13:13:20.000Z"
    assert first["payload"] == {"stripe_customer_id": "cus_1", "value": "1.5"}
    assert fake.sessions == 1  # one session for every request


def test_a_request_refused_as_a_whole_is_split_until_the_bad_event_is_alone() -> None:
    def stream(params: dict[str, Any], token: str) -> None:
        if any(e["identifier"] == "org:37:" + METER for e in params["events"]):
            raise stripe.InvalidRequestError("Invalid events[0].payload", "events", http_status=400)

    fake = FakeClient(stream=stream)
    sink = StripeStreamSink(sdk(fake), concurrency=1, now=lambda: NOW)
    for i in range(100):
        sink.add(ev(i))
    outs = {o.item.identifier: o for o in sink.flush()}
    sink.close()
    bad = outs.pop("org:37:" + METER)
    assert bad.status is Status.PERMANENT and "Invalid events" in (bad.error or "")
    assert {o.status for o in outs.values()} == {Status.OK}
    assert sum(len(r) for r in fake.streamed) == 99  # every good event delivered once


def test_transient_stream_failures_are_retried_by_the_retrying_sink() -> None:
    failures = [stripe.RateLimitError("slow", http_status=429, headers={"Retry-After": "1"})]

    def stream(params: dict[str, Any], token: str) -> None:
        if failures:
            raise failures.pop()

    sleeps: list[float] = []
    fake = FakeClient(stream=stream)
    inner = StripeStreamSink(sdk(fake), concurrency=2, now=lambda: NOW)
    sink = RetryingSink(inner, max_attempts=3, sleep=sleeps.append)
    for i in range(150):
        sink.add(ev(i))
    outs = sink.flush()
    inner.close()
    assert {o.status for o in outs} == {Status.OK} and len(outs) == 150
    assert sleeps and sleeps[0] >= 1.0


def test_an_expired_session_is_renewed_once_and_the_request_sent_again() -> None:
    expired = {"tok_1"}

    def stream(params: dict[str, Any], token: str) -> None:
        if token in expired:
            raise stripe.TemporarySessionExpiredError(
                "The meter event session has expired.", http_status=401, code="billing_meter_event_session_expired"
            )

    fake = FakeClient(stream=stream)
    sink = StripeStreamSink(sdk(fake), concurrency=4, now=lambda: NOW)
    for i in range(400):
        sink.add(ev(i))
    outs = sink.flush()
    sink.close()
    assert {o.status for o in outs} == {Status.OK}
    assert fake.sessions == 2  # four requests hit the expiry; one new session, not four


def test_sessions_are_renewed_before_they_expire() -> None:
    clock = [0.0]
    fake = FakeClient()
    sessions = MeterEventSessions(sdk(fake), margin_s=60, now=lambda: clock[0])
    assert sessions.token() == "tok_1"
    clock[0] = 839.0
    assert sessions.token() == "tok_1"
    clock[0] = 841.0  # 15 min - 60 s margin has passed
    assert sessions.token() == "tok_2"
    assert sessions.refresh("tok_1") == "tok_2"  # a stale token does not cause another renewal
    assert sessions.refresh("tok_2") == "tok_3"
    assert sessions.created == 3


def test_stream_presend_validation_sends_nothing_stripe_would_refuse_later() -> None:
    fake = FakeClient()
    sink = StripeStreamSink(sdk(fake), now=lambda: NOW)
    sink.add(ev(1, value="12345678901234567"))
    sink.add(MeterEvent("future", METER, "cus_1", "1", NOW + 600))
    sink.add(ev(2))
    outs = {o.item.identifier: o.status for o in sink.flush()}
    sink.close()
    assert outs == {f"org:1:{METER}": Status.PERMANENT, "future": Status.PERMANENT, f"org:2:{METER}": Status.OK}
    assert [e["identifier"] for r in fake.streamed for e in r] == [f"org:2:{METER}"]


def test_a_closed_stream_sink_refuses_to_send_in_parallel() -> None:
    sink = StripeStreamSink(sdk(FakeClient()), concurrency=2, now=lambda: NOW)
    sink.close()
    for i in range(150):
        sink.add(ev(i))
    with pytest.raises(RuntimeError):
        sink.flush()


# -- error reports ----------------------------------------------------------------------------------------


def _report(ident: str | None, code: str, created: str, count: int = 1, typ: str = "error_report_triggered") -> Any:
    samples = [] if ident is None else [{"error_message": f"bad {ident}", "request": {"identifier": ident}}]
    return {
        "id": f"evt_{ident}_{code}",
        "object": "v2.core.event",
        "created": created,
        "type": f"v1.billing.meter.{typ}",
        "data": {
            "reason": {
                "error_count": count,
                "error_types": [{"code": code, "error_count": count, "sample_errors": samples}],
            }
        },
    }


def test_error_reports_name_the_refused_identifiers() -> None:
    docs = [
        _report("a", "meter_event_customer_not_found", "2026-01-01T00:00:01.000Z"),
        _report("b", "no_meter", "2026-01-01T00:00:03.500Z", typ="no_meter_found"),
        _report("c", "meter_event_duplicate_identifier", "2026-01-01T00:00:02.000Z"),
        _report("d", "meter_event_value_too_many_digits", "2026-01-01T00:00:02.000Z", count=5),
        _report(None, "timestamp_too_far_in_past", "2026-01-01T00:00:02.000Z", count=2),
        {"type": "v1.billing.meter.created", "created": "2026-01-01T00:00:09.000Z"},
    ]
    out = read_error_reports(docs)
    assert set(out.rejections) == {"a", "b", "d"}  # a duplicate is not a refusal: the first copy counts
    assert out.rejections["a"].code == "meter_event_customer_not_found"
    assert "bad a" in out.rejections["a"].error and "evt_a_" in out.rejections["a"].error
    assert out.unattributed == 4 + 2 and out.duplicates == 1 and out.events == 5
    assert out.newest_ms == 1767225603500
    again = read_error_reports(docs, count_after_ms=1767225602000)
    assert again.unattributed == 0 and set(again.rejections) == {"a", "b", "d"}


def test_the_sdk_sends_the_same_json_body_without_form_encoding_the_events_first() -> None:
    import json

    from stripe._encode import _api_encode, _make_suitable_for_json

    from sinks.stripe.v2 import _JsonBodyList

    events = [StripeStreamSink._wire(ev(i)) for i in range(3)]
    marked = {"events": _JsonBodyList(events)}
    assert len(list(_api_encode(marked))) == 1  # the SDK's (unused) form copy costs one pair, not 18
    assert json.dumps(marked, default=_make_suitable_for_json) == json.dumps({"events": events})
