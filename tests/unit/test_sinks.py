"""The sink contract, the retry wrapper, and Stripe error classification."""

from __future__ import annotations

import random

import stripe

from sinks.base import Backoff, Outcome, RetryingSink, Status
from sinks.memory import MemoryMeterSink
from sinks.stripe.errors import classify
from sinks.stripe.v1 import MeterEvent, validate_event

NOW = 1_790_000_000


def ev(i: int = 1, value: str = "1.5", customer: str = "cus_1") -> MeterEvent:
    return MeterEvent(f"org:{i}:m", "sandbox_compute_sandbox_overage", customer, value, NOW - 3600)


def test_flushing_twice_writes_once_and_a_duplicate_is_success() -> None:
    sink = MemoryMeterSink()
    sink.add(ev(1))
    assert [o.status for o in sink.flush()] == [Status.OK]
    assert sink.flush() == []  # nothing buffered: nothing written
    sink.add(ev(1))
    (dup,) = sink.flush()
    assert dup.status is Status.DUPLICATE and dup.status.delivered
    assert len(sink.events) == 1 and sink.conflicts == []
    sink.add(ev(1, value="2"))
    sink.flush()
    assert len(sink.conflicts) == 1  # same identifier, other value: recorded as the bug it would be


class Flaky:
    """Fails each item transiently ``fails`` times, then delivers it."""

    def __init__(self, fails: int, retry_after: float | None = None, permanent: set[str] | None = None) -> None:
        self.fails = fails
        self.retry_after = retry_after
        self.permanent = permanent or set()
        self.seen: dict[str, int] = {}
        self.buf: list[MeterEvent] = []

    def add(self, item: MeterEvent) -> None:
        self.buf.append(item)

    def flush(self) -> list[Outcome[MeterEvent]]:
        out = []
        todo, self.buf = self.buf, []
        for e in todo:
            n = self.seen.get(e.identifier, 0)
            self.seen[e.identifier] = n + 1
            if e.identifier in self.permanent:
                out.append(Outcome(e, Status.PERMANENT, "no such customer", "resource_missing"))
            elif n < self.fails:
                out.append(Outcome(e, Status.TRANSIENT, "429", retry_after=self.retry_after))
            else:
                out.append(Outcome(e, Status.OK))
        return out


def test_retrying_sink_retries_only_transient_and_sleeps_injected_backoff() -> None:
    sleeps: list[float] = []
    inner = Flaky(fails=2, permanent={"org:3:m"})
    sink = RetryingSink(inner, max_attempts=5, sleep=sleeps.append, rng=random.Random(1))
    for i in (1, 2, 3):
        sink.add(ev(i))
    outs = {o.item.identifier: o for o in sink.flush()}
    assert outs["org:1:m"].status is Status.OK and outs["org:1:m"].attempts == 3
    assert outs["org:3:m"].status is Status.PERMANENT and inner.seen["org:3:m"] == 1  # never retried
    assert len(sleeps) == 2 and all(0 < s <= 8 for s in sleeps)


def test_retrying_sink_honours_retry_after_and_gives_up() -> None:
    sleeps: list[float] = []
    sink = RetryingSink(Flaky(fails=100, retry_after=3.0), max_attempts=3, sleep=sleeps.append, rng=random.Random(1))
    sink.add(ev())
    (o,) = sink.flush()
    assert o.status is Status.TRANSIENT and o.attempts == 3
    assert sleeps == [3.0, 3.0]


def test_backoff_grows_and_is_capped() -> None:
    b = Backoff(base=0.5, cap=4.0)
    r = random.Random(0)
    assert 0.25 <= b.delay(1, r) <= 0.5
    assert 2.0 <= b.delay(10, r) <= 4.0


def test_stripe_errors_map_to_transient_permanent_duplicate() -> None:
    rl = stripe.RateLimitError(
        "slow down", http_status=429, headers={"Retry-After": "2", "Stripe-Should-Retry": "true"}
    )
    assert classify(rl, None).status is Status.TRANSIENT and classify(rl, None).retry_after == 2.0
    assert classify(stripe.APIConnectionError("reset"), None).status is Status.TRANSIENT
    assert classify(stripe.APIError("boom", http_status=500), None).status is Status.TRANSIENT
    bad = stripe.InvalidRequestError("No such customer: cus_x", "payload", code="resource_missing", http_status=400)
    o = classify(bad, None)
    assert (o.status, o.error, o.code) == (Status.PERMANENT, "No such customer: cus_x", "resource_missing")
    dup = stripe.InvalidRequestError(
        "An event with identifier org:1:m already exists.",
        "identifier",
        code="resource_already_exists",
        http_status=400,
    )
    assert classify(dup, None).status is Status.DUPLICATE
    auth = stripe.AuthenticationError("Invalid API Key", http_status=401)
    assert classify(auth, None).status is Status.TRANSIENT  # rows wait for the operator, they are not rejected
    no = stripe.APIError("nope", http_status=500, headers={"Stripe-Should-Retry": "false"})
    assert classify(no, None).status is Status.PERMANENT
    assert classify(RuntimeError("anything else"), None).status is Status.TRANSIENT


def test_presend_validation_catches_what_stripe_would_reject() -> None:
    assert validate_event(ev(), NOW) is None
    assert "significant digits" in (validate_event(ev(value="1234567890.1234567"), NOW) or "")
    assert "35 days" in (validate_event(MeterEvent("i", "m", "c", "1", NOW - 36 * 86400), NOW) or "")
    assert "future" in (validate_event(MeterEvent("i", "m", "c", "1", NOW + 600), NOW) or "")
    assert "identifier" in (validate_event(MeterEvent("x" * 101, "m", "c", "1", NOW), NOW) or "")
    assert "customer" in (validate_event(ev(customer=""), NOW) or "")
    assert "number" in (validate_event(ev(value="abc"), NOW) or "")
