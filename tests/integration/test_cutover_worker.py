"""The worker's side of the cutover without a broker (the pipeline as the Faust wiring drives it): a state
read from billing-control is recorded once, a new state is logged once and acknowledged, and the sender runs
only while the state in force is live — all without a restart."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest

from infra.runtime import worker_config
from infra.settings import load_settings
from models.cutover import CutoverState, armed_state
from sinks.ledger import Ledger
from sinks.outbox_sender import SendReport
from sinks.schema import make_engine, migrate
from streams.pipeline import Deps, Pipeline
from streams.records import RawRecord

pytestmark = pytest.mark.integration

T = 1_790_000_000 // 3600 * 3600


class _Sender:
    def __init__(self) -> None:
        self.runs = 0

    def run_once(self) -> SendReport:
        self.runs += 1
        return SendReport()


@pytest.fixture
def pipe(sqlite_url: str) -> Iterator[tuple[Pipeline, _Sender]]:
    engine = make_engine(sqlite_url)
    migrate(engine)
    sender = _Sender()
    cfg = worker_config(load_settings(kafka={"topic_prefix": ""}))  # the defaults: shadow, authority cell
    deps: Any = Deps(config=cfg, ledger=Ledger(engine), sender=sender, owner="host:42")  # type: ignore[arg-type]
    yield Pipeline(deps), sender
    engine.dispose()


def test_a_change_from_the_control_topic_is_recorded_once_applied_and_acknowledged(
    pipe: tuple[Pipeline, _Sender], caplog: pytest.LogCaptureFixture
) -> None:
    p, sender = pipe
    led = p.deps.ledger
    assert p.control_topic == "billing-control"
    assert p.send_once() is None and sender.runs == 0  # the environment's state: shadow
    assert p.control_tick() is not None and led.cutover_acks()[0][:2] == ("host:42", 0)
    state = armed_state(T, changed_at_ms=7, by="other-tool", reason="cell team", command="kcat")
    rec = RawRecord(0, 0, b"cutover", state.to_json())
    bad = RawRecord(0, 1, b"cutover", b"{not a state")
    other = RawRecord(0, 2, b"something-else", b"{}")
    with caplog.at_level(logging.INFO):
        assert p.record_control([rec, bad, other]) == [state]
        assert p.record_control([rec]) == []  # read again (a redelivery): recorded once
        eff = p.control_tick()
        assert p.control_tick() is None  # logged once
    assert eff is not None and eff.state.flags() == state.flags() and eff.seq > 0
    assert [(e.kind, e.by, e.command) for e in led.cutover_log()] == [("state", "other-tool", "kcat")]
    assert led.cutover_log()[0].published_ms is not None  # it came from the topic
    assert led.cutover_acks()[0][:2] == ("host:42", eff.seq)
    assert sum("cutover state in force: seq" in r.getMessage() for r in caplog.records) == 1
    assert "not made through this ledger" in caplog.text and "not a cutover state" in caplog.text
    assert p.send_once() is not None and sender.runs == 1  # live now, without a restart
    back = CutoverState(shadow=True, bill_from=T, changed_at=9, by="ops")
    led.record_state(back)
    assert p.send_once() is None and sender.runs == 1  # shadow again: the next run does not send
    assert p.deps.cutover.fresh().state.shadow
