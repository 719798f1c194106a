"""``edgebill replay --apply`` repairs both ways, against the session broker, a SQLite ledger and the local
Stripe server: a gap (ticks missing from the ledger) is found and billed; an over-billing Stripe received
less than 24 h ago is cancelled and resent with its corrected value; an older one gets a negative
correction; a second ``--apply`` sends nothing; a broker that is down gives exit 2 and one line.

The over-billings come from a policy published late with an effective time in the past (the org went free
in the middle of an hour the closer had already billed in full): the replay prices each tick by the policy
in force at its time and finds the ledger billing more than the ticks say.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner, Result
from sqlalchemy import update

from infra.catalog import ensure_customers, ensure_meters, meter_totals
from infra.devkit.broker import free_port
from infra.devkit.cli import cli
from infra.devkit.stripe_fake import StripeServerThread
from infra.kafka_io import publish_sync
from infra.replay import progress_display
from models.billing import UNIFIED_METER
from models.policy import OrgPolicy
from models.ticks import parse_record
from sinks.base import RetryingSink
from sinks.ledger import CloseConfig, Ledger, SourcedTick
from sinks.outbox_sender import OutboxSender
from sinks.schema import make_engine, meter_events, migrate
from sinks.stripe.v1 import StripeMeterSink, make_client

pytestmark = pytest.mark.integration

H = 3600
NOW_S = int(time.time())
B1 = (NOW_S // H - 3) * H
LIVE = CloseConfig(H, 600, shadow=False, bill_from=B1 - 10 * H)
MB, SECS = 1000, 13  # GB-s with decimals: the rounding carry is exercised


def _iso(ts_s: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts_s))


def _env(tid: str, org: str, ts_s: int) -> bytes:
    return orjson.dumps(
        {
            "id": tid,
            "type": "usage_tick",
            "org_id": org,
            "sandbox_id": f"sb-{org}",
            "worker_id": "w",
            "cell_id": "c",
            "payload": {"memory_mb": MB, "interval_s": SECS, "cpu_count": 1},
            "timestamp": _iso(ts_s),
        }
    )


@pytest.fixture
def srv() -> Iterator[StripeServerThread]:
    s = StripeServerThread()
    s.start()
    yield s
    s.stop()


def _gbs(n_ticks: int) -> Decimal:
    return (Decimal(n_ticks * MB * SECS) / 1024).quantize(Decimal("0.000001"))


def test_replay_repairs_a_gap_and_over_billing_both_sides_of_stripes_24h_window(
    kafka_bootstrap: str, tmp_path: Path, srv: StripeServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = f"rr{time.monotonic_ns() % 10**8}."
    topic = f"{prefix}usage-ticks"
    client = make_client("sk_test_x", srv.base_url, timeout=10)
    meters = ensure_meters(client)
    orgs = ("a", "b", "c")
    customers = ensure_customers(client, {o: f"{o}@example.test" for o in orgs})
    # six ticks per org in B1, every ten minutes; c's last two never reach the ledger (the gap)
    records = [_env(f"{o}:{k}", o, B1 + 600 * k + 5) for o in orgs for k in range(6)]
    publish_sync(kafka_bootstrap, topic, [(b"k", v, 0) for v in records])
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = make_engine(url)
    migrate(engine)
    led = Ledger(engine)
    for o in orgs:
        p = OrgPolicy.model_validate(
            {"org_id": o, "plan": "pro", "stripe_customer_id": customers[o], "effective_at": 0}
        )
        led.write_policies("org-policy", [(p, 0, 0)], {}, {})
    ticks = [SourcedTick(t, 0, i) for i, v in enumerate(records) for t in parse_record(v).ticks]
    led.write_ticks("usage-ticks", [t for t in ticks if t.tick.id not in ("c:4", "c:5")], bucket_seconds=H, progress={})
    led.close(NOW_S * 1000, LIVE)

    def send() -> None:
        inner = StripeMeterSink(client, concurrency=2)
        try:
            OutboxSender(led, RetryingSink(inner, max_attempts=3), now_s=lambda: int(time.time())).run_once()
        finally:
            inner.close()

    def row_id(org: str) -> str:
        return f"{org}:{B1}:{UNIFIED_METER}"

    # b's hour reached Stripe more than 24 h ago; a's and c's just now
    _send_only(led, send, keep={row_id("b")})
    with engine.begin() as conn:
        conn.execute(
            update(meter_events).where(meter_events.c.id == row_id("b")).values(sent_ms=(NOW_S - 25 * H) * 1000)
        )
    srv.state.advance_clock(25 * 3600)
    send()
    assert {r["state"] for r in led.rows()} == {"sent"}
    # a and b went free at B1 + 30 min, published only now: the closer billed their whole hour
    for o in ("a", "b"):
        p = OrgPolicy.model_validate({"org_id": o, "plan": "free", "effective_at": B1 + 1800})
        led.write_policies("org-policy", [(p, 0, 1)], {}, {})

    env = {
        "EDGEBILL_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "EDGEBILL_KAFKA_TOPIC_PREFIX": prefix,
        "EDGEBILL_DATABASE_URL": url,
        "EDGEBILL_STRIPE_API_BASE": srv.base_url,
    }

    def replay(*args: str, env_: dict[str, str] = env) -> Result:
        return CliRunner().invoke(cli, ["replay", "--json", *args], env=env_)

    res = replay()
    assert res.exit_code == 1, res.output
    out = json.loads(res.stdout)
    labels = {(d["org_id"], d["label"]) for d in out["differences"]}
    assert labels == {("a", "over-billed"), ("b", "over-billed"), ("c", "missing")}
    assert out["labels"] == {"ok": 0, "missing": 1, "under-billed": 0, "over-billed": 2, "pending_close": 0}
    assert out["missing_ids"] == ["c:4", "c:5"]

    res = replay("--apply")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["applied"]["inserted"] == 2 and out["repaired"]["cancelled"] == [row_id("a")]
    fixes = {c["org_id"]: c for c in out["repaired"]["corrections"]}
    assert fixes["a"]["id"] == row_id("a") + ":r1" and Decimal(fixes["a"]["value"]) == _gbs(3)  # resent, corrected
    # negative: what takes b's total from its whole hour to its first half, through the rounding carry
    assert fixes["b"]["id"] == row_id("b") + ":r1" and Decimal(fixes["b"]["value"]) == _gbs(3) - _gbs(6) < 0
    assert out["repaired"]["credit_needed"] == [] and out["repaired"]["errors"] == []
    # only a's event was cancelled at Stripe: b's was past the window, nothing was asked for it
    assert [a["cancel"]["identifier"] for a in srv.state.adjustments] == [row_id("a")]
    led.close(NOW_S * 1000, LIVE)  # the worker's closer: c's missing ticks become a correction
    send()  # the worker's sender: a's corrected row, b's negative row, c's correction
    assert {r["id"]: r["state"] for r in led.rows()} == {
        row_id("a"): "cancelled",
        row_id("a") + ":r1": "sent",
        row_id("b"): "sent",
        row_id("b") + ":r1": "sent",
        row_id("c"): "sent",
        row_id("c") + ":r1": "sent",
    }
    truth = {"a": _gbs(3), "b": _gbs(3), "c": _gbs(6)}
    for o in orgs:
        stripe_total = meter_totals(client, meters[UNIFIED_METER], customers[o], B1 - H, B1 + 3 * H)
        assert stripe_total == truth[o], o
    assert srv.state.conflicting_identifiers() == []

    # a second --apply finds nothing and sends nothing
    events, adjustments = len(srv.state.accepted_meter_events()), len(srv.state.adjustments)
    rows_before = {r["id"]: r["value"] for r in led.rows()}
    res = replay("--apply")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["clean"] and out["applied"]["offered"] == 0
    assert out["repaired"]["corrections"] == [] and out["repaired"]["cancelled"] == []
    send()
    assert {r["id"]: r["value"] for r in led.rows()} == rows_before
    assert (len(srv.state.accepted_meter_events()), len(srv.state.adjustments)) == (events, adjustments)

    # --org narrows both sides
    out = json.loads(replay("--org", "c").stdout)
    assert out["counts"]["compared_keys"] == 1 and out["clean"]

    # the broker down: exit 2 and one line, no traceback
    down = {**env, "EDGEBILL_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"}
    for args in ((), ("--apply",)):
        res = CliRunner().invoke(cli, ["replay", *args], env=down)
        assert res.exit_code == 2, res.output
        assert res.stdout == "" and len(res.stderr.strip().splitlines()) == 1 and "Kafka broker" in res.stderr
    # the ledger unreachable (PostgreSQL nobody answers): exit 2 and one line
    gone = {**env, "EDGEBILL_DATABASE_URL": f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/x"}
    res = CliRunner().invoke(cli, ["replay"], env=gone)
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1 and "ledger" in res.stderr, res.output
    engine.dispose()


def _send_only(led: Ledger, send: Any, keep: set[str]) -> None:
    """Send only the rows in ``keep`` (the others are held back as deferred for one cycle)."""
    others = [r["id"] for r in led.rows(state="pending") if r["id"] not in keep]
    with led.engine.begin() as conn:
        conn.execute(update(meter_events).where(meter_events.c.id.in_(others)).values(state="hold"))
    send()
    with led.engine.begin() as conn:
        conn.execute(update(meter_events).where(meter_events.c.id.in_(others)).values(state="pending"))


def test_the_progress_display_shows_rate_and_time_left_on_a_terminal_and_nothing_otherwise() -> None:
    screen = io.StringIO()
    with progress_display(screen, enabled=True) as progress:
        assert progress is not None
        progress(1_000, 10_000)
        time.sleep(0.3)
        progress(5_000, 10_000)
        time.sleep(0.3)
    shown = screen.getvalue()
    assert "replay: scanning" in shown and "records/s" in shown and "ETA" in shown and "/10000" in shown
    quiet = io.StringIO()
    with progress_display(quiet, enabled=False) as progress:
        assert progress is None
    assert quiet.getvalue() == ""
