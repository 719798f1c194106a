"""``edgebill cutover`` commands against a real ledger, the session broker and the local Stripe server: what
each refuses and why, what each records (audit, published on billing-control), a rollback that cancels rows
still inside Stripe's 24 h window and reports older ones for a credit, a release of a gap, and a broker that
is down at the moment of a change.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from infra.catalog import ensure_customers, ensure_meters
from infra.cli import cli
from infra.devkit.broker import free_port
from infra.devkit.stripe_fake import StripeServerThread
from infra.kafka_io import read_topic_sync
from models.billing import UNIFIED_METER
from models.cutover import CutoverState
from models.policy import OrgPolicy
from models.ticks import Tick
from sinks.base import RetryingSink
from sinks.ledger import CloseConfig, Ledger, SourcedTick
from sinks.outbox_sender import OutboxSender
from sinks.schema import make_engine, migrate
from sinks.stripe.v1 import StripeMeterSink, make_client

pytestmark = pytest.mark.integration

H = 3600
NOW = int(time.time())
CUR = NOW // H * H  # the current hour


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for k in list(os.environ):
        if k.startswith("EDGEBILL_"):
            monkeypatch.delenv(k)


@pytest.fixture
def stripe_srv() -> Iterator[StripeServerThread]:
    srv = StripeServerThread()
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def env(
    tmp_path: Path, kafka_bootstrap: str, stripe_srv: StripeServerThread, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    values = {
        "EDGEBILL_DATABASE_URL": f"sqlite:///{tmp_path / 'ledger.db'}",
        "EDGEBILL_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "EDGEBILL_KAFKA_TOPIC_PREFIX": f"c{uuid.uuid4().hex[:8]}.",
        "EDGEBILL_STRIPE_API_BASE": stripe_srv.base_url,
        "EDGEBILL_CUTOVER_CLEAN_HOURS": "0",
    }
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    return values


def run(*args: str) -> Result:
    return CliRunner().invoke(cli, ["cutover", *args], catch_exceptions=False)


def js(result: Result) -> Any:
    return json.loads(result.stdout)


def ledger_of(env: dict[str, str]) -> Ledger:
    engine = make_engine(env["EDGEBILL_DATABASE_URL"])
    migrate(engine)
    return Ledger(engine)


def test_plan_refuses_every_unsafe_t_at_once_unless_forced_with_a_reason(env: dict[str, str], monkeypatch: Any) -> None:
    monkeypatch.setenv("EDGEBILL_CUTOVER_CLEAN_HOURS", "24")
    res = run("plan", "--at", str(CUR - H + 60))
    assert res.exit_code == 2
    for needle in ("not on a bucket boundary", "not in the future", "0 consecutive clean hour(s)"):
        assert needle in res.stderr, res.stderr
    assert run("plan", "--at", str(CUR + H), "--force").exit_code == 2  # forcing needs a reason
    res = run("plan", "--at", str(CUR + H), "--force", "--reason", "parity proven by hand", "--by", "ana", "--json")
    assert res.exit_code == 0, res.output
    assert js(res)["planned"]["forced"] == [
        "parity has 0 consecutive clean hour(s) with usage on both sides; "
        "the cutover needs 24 (EDGEBILL_CUTOVER_CLEAN_HOURS)"
    ]
    st = js(run("status", "--json"))
    (entry,) = st["log"]
    assert (entry["kind"], entry["by"], entry["reason"], entry["bill_from"]) == (
        "plan",
        "ana",
        "parity proven by hand",
        CUR + H,
    )
    assert entry["details"]["forced"] and entry["command"].startswith("edgebill cutover plan --at")
    assert st["state"]["source"] == "environment" and st["plan"]["bill_from"] == CUR + H


def test_arm_publishes_the_state_and_status_shows_its_audit(env: dict[str, str]) -> None:
    assert run("arm").exit_code == 2  # nothing planned
    assert run("plan", "--at", str(CUR + H), "--reason", "soak clean").exit_code == 0
    res = run("arm", "--reason", "go", "--by", "ops", "--json")
    assert res.exit_code == 0, res.output
    assert js(res)["error"] is None and len(js(res)["published"]) == 1
    control = env["EDGEBILL_KAFKA_TOPIC_PREFIX"] + "billing-control"
    (rec,) = read_topic_sync(env["EDGEBILL_KAFKA_BOOTSTRAP"], control, idle_timeout=1.0)
    state = CutoverState.from_json(rec.value or b"")
    assert rec.key == b"cutover" and (state.shadow, state.bill_from, state.authority.value) == (False, CUR + H, "edge")
    assert (state.by, state.reason) == ("ops", "go")
    st = js(run("status", "--json"))
    assert st["state"]["source"] == "ledger" and st["state"]["live"] and st["unpublished"] == []
    assert [e["kind"] for e in st["log"]] == ["plan", "state"]
    assert st["environment"]["in_force"] is False and st["plan"] is None
    assert "audit log:" in run("status").stdout
    assert run("plan", "--at", str(CUR + 2 * H)).exit_code == 2  # a cutover is in force: roll back first


def test_a_broker_that_is_down_leaves_the_change_recorded_but_unpublished(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert run("plan", "--at", str(CUR + H)).exit_code == 0
    monkeypatch.setenv("EDGEBILL_KAFKA_BOOTSTRAP", f"127.0.0.1:{free_port()}")
    res = run("arm")
    assert res.exit_code == 1 and "NOT published" in res.stderr
    st = js(run("status", "--json"))
    assert st["state"]["live"] and len(st["unpublished"]) == 1  # in force at the edge, the cell not told yet
    monkeypatch.setenv("EDGEBILL_KAFKA_BOOTSTRAP", env["EDGEBILL_KAFKA_BOOTSTRAP"])
    assert run("publish").exit_code == 0
    assert js(run("status", "--json"))["unpublished"] == []


def _send_rows(led: Ledger, srv: StripeServerThread, orgs: dict[str, str]) -> None:
    client = make_client("sk_test_x", srv.base_url, timeout=10)
    inner = StripeMeterSink(client, concurrency=2)
    sender = OutboxSender(led, RetryingSink(inner, max_attempts=3), now_s=lambda: int(time.time()))
    try:
        sender.run_once()
    finally:
        inner.close()


def test_rollback_cancels_within_24h_reports_older_for_credit_and_skips_what_was_not_sent(
    env: dict[str, str], stripe_srv: StripeServerThread
) -> None:
    client = make_client("sk_test_x", stripe_srv.base_url, timeout=10)
    ensure_meters(client)
    customers = ensure_customers(client, {"o": "o@example.com"})
    led = ledger_of(env)
    t = CUR - 6 * H
    p = OrgPolicy.model_validate(
        {"org_id": "o", "plan": "pro", "stripe_customer_id": customers["o"], "effective_at": 0}
    )
    led.write_policies("org-policy", [(p, 0, 0)], {}, {})
    assert run("plan", "--at", str(t), "--force", "--reason", "rehearsal on past hours").exit_code == 0
    assert run("arm", "--force", "--reason", "rehearsal on past hours").exit_code == 0
    cfg = CloseConfig(H, 600, shadow=True, bill_from=0)

    def hour(b: int, n: int) -> None:
        tick = Tick(f"t{b}:{n}", "o", "sb", "w", "c", 1024, 0, 10, (b + 60 + n) * 1000)
        led.write_ticks("usage-ticks", [SourcedTick(tick, 0, b + n)], bucket_seconds=H, progress={})
        led.close(NOW * 1000, cfg)

    hour(t, 0)
    hour(t + H, 0)
    _send_rows(led, stripe_srv, customers)  # t+H's first row is received by Stripe now ...
    stripe_srv.state.advance_clock(25 * 3600)  # ... and is more than 24 h old for Stripe from here on
    hour(t + 2 * H, 0)
    _send_rows(led, stripe_srv, customers)  # t+2H's row: received "now", cancellable
    hour(t + 3 * H, 0)  # t+3H: closed, pending, never sent
    res = run("rollback", "--at", str(t + H), "--cancel-sent", "--reason", "drift at the edge", "--json")
    assert res.exit_code == 0, res.output
    out = js(res)
    ids = {r["bucket_start"]: r["id"] for r in led.rows()}
    assert out["rolled_back"]["rows_skipped"] == [ids[t + 3 * H]]
    assert out["cancelled"] == [ids[t + 2 * H]]
    assert [r["id"] for r in out["credit_needed"]] == [ids[t + H]]
    states = {r["bucket_start"]: r["state"] for r in led.rows()}
    assert states == {t: "sent", t + H: "sent", t + 2 * H: "cancelled", t + 3 * H: "skipped_rolled_back"}
    live = {e["identifier"] for e in stripe_srv.state.accepted_meter_events(include_cancelled=False)}
    assert live == {ids[t], ids[t + H]}
    # a bucket at or after R that closes later is the cell's
    hour(t + 4 * H, 0)
    assert {r["bucket_start"]: r["state"] for r in led.rows()}[t + 4 * H] == "skipped_rolled_back"
    st = js(run("status", "--json"))
    assert st["state"]["authority"] == "cell" and st["state"]["bill_until"] == t + H
    assert [e["kind"] for e in st["log"]] == ["plan", "state", "state", "cancel"]
    assert [r["id"] for r in st["seam"]["sent_from_R"]] == [ids[t + H]]
    led.dispose()


def test_release_bills_a_gap_and_is_recorded(env: dict[str, str]) -> None:
    led = ledger_of(env)
    t = CUR - 3 * H
    p = OrgPolicy.model_validate({"org_id": "o", "plan": "pro", "stripe_customer_id": "cus_1", "effective_at": 0})
    led.write_policies("org-policy", [(p, 0, 0)], {}, {})
    tick = Tick("g1", "o", "sb", "w", "c", 1000, 0, 7, (t + 5) * 1000)
    led.write_ticks("usage-ticks", [SourcedTick(tick, 0, 1)], bucket_seconds=H, progress={})
    led.close(NOW * 1000, CloseConfig(H, 600, shadow=True, bill_from=0))  # t closes in shadow
    assert run("plan", "--at", str(t), "--force", "--reason", "late plan").exit_code == 0
    assert run("arm", "--force", "--reason", "late arm").exit_code == 0
    st = js(run("status", "--json"))
    assert [g["bucket"] for g in st["seam"]["gaps"]] == [t]
    assert run("release", "--bucket", str(t)).exit_code == 2  # --reason is required
    res = run("release", "--bucket", str(t), "--reason", "nobody billed this hour", "--json")
    assert res.exit_code == 0, res.output
    ((value, state),) = {(r["value"], r["state"]) for r in led.rows()}
    assert state == "pending" and Decimal(value) == (Decimal(7000) / 1024).quantize(Decimal("0.000001"))
    st = js(run("status", "--json"))
    assert st["seam"]["gaps"] == [] and st["log"][-1]["kind"] == "release"
    assert st["log"][-1]["reason"] == "nobody billed this hour"
    assert run("release", "--bucket", str(t), "--reason", "again").exit_code == 0  # already recorded: no-op
    assert {r["state"] for r in led.rows()} == {"pending"} and UNIFIED_METER in led.rows()[0]["id"]
    led.dispose()


def test_status_without_a_ledger_shows_the_bootstrap_state_and_creates_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An operator preparing a cutover before any worker ran: the state in force is the settings' one."""
    db = tmp_path / "not-yet" / "ledger.db"
    monkeypatch.setenv("EDGEBILL_DATABASE_URL", f"sqlite:///{db}")
    monkeypatch.setenv("EDGEBILL_SHADOW", "false")
    monkeypatch.setenv("EDGEBILL_BILL_FROM", str(CUR - 24 * H))
    monkeypatch.setenv("EDGEBILL_PRO_BILLING_AUTHORITY", "edge")
    res = run("status", "--json")
    assert res.exit_code == 0, res.output
    st = js(res)
    assert st["ledger"] is None and st["ledger_url"] == f"sqlite:///{db.resolve().as_posix()}"
    assert (st["state"]["source"], st["state"]["seq"], st["environment"]["in_force"]) == ("environment", 0, True)
    assert (st["state"]["shadow"], st["state"]["bill_from"], st["state"]["authority"]) == (False, CUR - 24 * H, "edge")
    assert st["state"]["live"] is True and "no ledger exists yet" in st["note"]
    human = run("status")
    assert human.exit_code == 0 and "state in force (from the environment): shadow=False" in human.stdout
    assert "no ledger exists yet" in human.stdout
    assert not db.parent.exists()  # nothing created
    # An empty database file is no ledger either, and stays empty.
    db.parent.mkdir()
    db.touch()
    res = run("status", "--json")
    assert res.exit_code == 0 and js(res)["ledger"] is None and "no edgebill tables" in js(res)["note"]
    assert db.stat().st_size == 0
    # The other read-only commands keep refusing without a ledger (exit 2), and create none.
    db.unlink()
    other = CliRunner().invoke(cli, ["ledger", "--json"], catch_exceptions=False)
    assert other.exit_code == 2 and not db.exists()
