"""Readiness conditions, the stall rule, and logs that say a failure repeats instead of repeating it."""

from __future__ import annotations

import logging
import re

import pytest

from streams.health import (
    BROKER,
    LEDGER,
    STALLED,
    STARTING,
    Health,
    RateLimitedLog,
    RepeatedLogFilter,
)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_not_ready_while_starting_then_ready() -> None:
    clock = Clock()
    h = Health(clock=clock)
    assert not h.ready() and set(h.conditions()) == {STARTING}
    h.ok(STARTING)
    assert h.ready()
    body = h.report()
    assert body["ready"] is True and body["conditions"] == {}


def test_stall_only_with_lag_and_no_progress_for_the_threshold() -> None:
    clock = Clock()
    h = Health(stall_after_s=15, clock=clock)
    h.ok(STARTING)
    h.observe_lag(0)
    clock.t += 100  # idle for long: nothing to do is not a stall
    assert h.ready()
    h.observe_lag(0)
    h.observe_lag(500)
    clock.t += 14
    assert h.ready()
    clock.t += 1.5
    assert set(h.conditions()) == {STALLED}
    assert "500 record(s) waiting" in h.report()["conditions"][STALLED]["detail"]
    h.progress()  # a batch was written
    assert h.ready()
    clock.t += 16
    assert not h.ready()
    h.observe_lag(0)  # caught up
    assert h.ready()


def test_a_condition_holds_while_any_of_its_sources_fails() -> None:
    clock = Clock()
    h = Health(clock=clock)
    h.ok(STARTING)
    h.fail(LEDGER, "ingest: locked", source="ledger write")
    clock.t += 5
    h.fail(LEDGER, "progress: locked", source="progress report")
    h.fail(LEDGER, "ingest: still locked", source="ledger write")
    report = h.report()["conditions"][LEDGER]
    assert report["for_s"] == 5.0 and "still locked" in report["detail"] and "progress" in report["detail"]
    h.ok(LEDGER, source="ledger write")
    assert h.holds(LEDGER)
    h.ok(LEDGER, source="progress report")
    h.ok(BROKER)  # clearing what does not hold is harmless
    assert h.ready()


def test_rate_limited_log_says_how_often_a_failure_repeated(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    logger = logging.getLogger("edgebill.test.rl")
    rl = RateLimitedLog(logger, interval_s=10, clock=clock)
    with caplog.at_level(logging.INFO, logger=logger.name):
        for _ in range(1000):  # 100 s of failures, ten a second
            rl.failure("fetch", "fetch failed (%s)", "boom")
            clock.t += 0.1
        rl.recovered("fetch")
        rl.recovered("fetch")  # only once
    lines = [r.getMessage() for r in caplog.records]
    assert 10 <= len(lines) <= 12  # not 1000
    assert lines[0] == "fetch failed (boom)"
    assert all(re.fullmatch(r"fetch failed \(boom\) \[10\d more time\(s\) in the last 10 s\]", x) for x in lines[1:-1])
    assert lines[-1] == "fetch: recovered after 1000 failure(s) over 100 s"


def _record(name: str, msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_repeated_library_messages_pass_once_per_interval_with_a_count() -> None:
    clock = Clock()
    flt = RepeatedLogFilter(interval_s=10, clock=clock)
    passed = []
    for i in range(600):  # a minute of connection errors, ten a second, to two nodes
        rec = _record("aiokafka.client", "Unable connect to node with id %s: %s", i % 2, "refused")
        if flt.filter(rec) and flt.filter(rec):  # the same decision on a second handler
            passed.append(rec.getMessage())
        clock.t += 0.1
    assert len(passed) == 6
    assert passed[0] == "Unable connect to node with id 0: refused"
    assert passed[1].endswith("[repeated 99 more time(s) in the last 10 s]")
    # Our own records and anything below WARNING always pass.
    own = [_record("streams.cell", "usage_parity: DRIFT org=%s", o, level=logging.WARNING) for o in "ab"]
    assert all(flt.filter(r) for r in own)
    assert all(flt.filter(_record("aiokafka.conn", "connected", level=logging.INFO)) for _ in range(3))
