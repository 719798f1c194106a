"""The web server's limits as rules: the connection cap's decisions and the settings that set the limits.

The same limits against a real worker over sockets: ``tests/integration/test_web_limits.py``.
"""

from __future__ import annotations

import pytest

from infra.runtime import web_config
from infra.settings import load_settings
from streams.config import WebLimits
from streams.web_server import ConnectionCap


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _cap(limit: int) -> tuple[ConnectionCap, Clock, list[str]]:
    clock = Clock()
    return ConnectionCap(limit, clock=clock), clock, []


def _open(cap: ConnectionCap, clock: Clock, conns: list[str], name: str) -> None:
    clock.t += 1
    cap.created(name)
    cap.opened(name)
    conns.append(name)


def test_under_the_limit_every_connection_is_let_in() -> None:
    cap, clock, conns = _cap(3)
    closed: list[str] = []
    for name in "abc":
        assert cap.admit(conns, closed.append)
        _open(cap, clock, conns, name)
    assert closed == [] and cap.evicted == 0


def test_at_the_limit_the_longest_idle_connection_makes_room_never_a_busy_one() -> None:
    cap, clock, conns = _cap(3)
    for name in "abc":
        _open(cap, clock, conns, name)
    cap.begin("a")  # the oldest has a request in progress
    clock.t += 1
    cap.begin("c")
    cap.end("c")  # c answered just now: b is idle the longest
    closed: list[str] = []
    assert cap.admit(conns, closed.append)
    assert closed == ["b"] and cap.evicted == 1
    # a closed connection leaves the open ones: no second eviction for it
    conns.remove("b")
    _open(cap, clock, conns, "d")
    assert cap.admit(conns, closed.append) and closed == ["b", "c"]


def test_when_every_connection_has_a_request_in_progress_the_new_one_is_refused() -> None:
    cap, clock, conns = _cap(2)
    for name in "ab":
        _open(cap, clock, conns, name)
        cap.begin(name)
    closed: list[str] = []
    assert not cap.admit(conns, closed.append)
    assert closed == [] and cap.refused == 1
    cap.end("a")
    assert cap.admit(conns, closed.append) and closed == ["a"]


def test_connections_created_in_one_burst_count_before_they_are_open_and_over_the_limit_is_closed_back() -> None:
    cap, clock, conns = _cap(2)
    closed: list[str] = []
    for name in "abcd":  # accepted together: none reported open yet
        assert cap.admit(conns, closed.append)
        clock.t += 0.001
        cap.created(name)
    assert closed == []  # nothing open to close: let in
    for name in "abcd":
        cap.opened(name)
        conns.append(name)
    assert cap.admit(conns, closed.append)
    assert closed == ["a", "b", "c"]  # back to one below the limit, longest idle first


def test_a_connection_that_never_opened_stops_counting() -> None:
    cap, clock, conns = _cap(1)
    cap.created("ghost")
    clock.t += ConnectionCap.PENDING_S + 1
    assert cap.admit(conns, lambda c: None) and cap.refused == 0


def test_the_settings_set_the_limits_and_the_defaults_are_the_documented_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    limits = web_config(load_settings()).limits
    assert (limits.max_line_bytes, limits.max_field_bytes, limits.max_headers) == (8190, 8190, 64)
    assert (limits.idle_timeout_s, limits.body_timeout_s, limits.max_connections) == (15.0, 10.0, 256)
    assert limits.metrics_per_org is False
    assert limits.body_limit("/webhooks/stripe") == 262144 and limits.body_limit("/healthz") == 0
    monkeypatch.setenv("EDGEBILL_WEB_MAX_CONNECTIONS", "32")
    monkeypatch.setenv("EDGEBILL_WEB_IDLE_TIMEOUT", "2.5")
    monkeypatch.setenv("EDGEBILL_WEB_METRICS_PER_ORG", "true")
    monkeypatch.setenv("EDGEBILL_STRIPE_WEBHOOK_MAX_BODY", "2048")
    limits = web_config(load_settings()).limits
    assert (limits.max_connections, limits.idle_timeout_s, limits.metrics_per_org) == (32, 2.5, True)
    assert limits.body_limit("/webhooks/stripe") == 2048
    assert WebLimits().body_limit("/webhooks/stripe") == 0  # a path takes a body only when listed
