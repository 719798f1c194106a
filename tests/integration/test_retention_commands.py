"""Retention end to end: ``edgebill ledger --summary`` / ``--compact``, replay inside the dedup horizon after
retention (SQLite and PostgreSQL), and a worker that runs retention on its timer and dead-letters a tick past
the horizon. Old ticks are 40 days old, past the default 36-day retention; recent ones a few hours old."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner

from infra.devkit.cli import cli
from infra.kafka_io import publish_sync, read_topic_sync
from infra.replay import ReplaySpec, apply_missing, run_replay
from infra.settings import DEFAULT_INTERNAL_SECRET
from models.parity import sign_request
from models.policy import OrgPolicy
from models.retention import DEFAULT_RETENTION_DAYS
from models.ticks import parse_record
from sinks.ledger import CloseConfig, Ledger, SourcedTick
from sinks.parity import ParityStore
from sinks.retention import Retention
from sinks.schema import make_engine, migrate

pytestmark = pytest.mark.integration

H = 3600
DAY = 86_400
LIVE = CloseConfig(bucket_seconds=H, grace_seconds=600, shadow=False, bill_from=0)


def _now_s() -> int:
    return int(time.time())


def _iso(ts_s: int) -> str:
    return datetime.fromtimestamp(ts_s, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _env(tid: str, ts_s: int, org: str = "o1") -> dict[str, Any]:
    return {"id": tid, "org_id": org, "payload": {"interval_s": 20, "memory_mb": 1024}, "timestamp": _iso(ts_s)}


def _fleet(old: int, recent: int) -> list[tuple[int, bytes]]:
    """(partition, record): three old buckets and three recent ones, arrays and single envelopes."""
    out: list[tuple[int, bytes]] = []
    for base, tag in ((old, "old"), (recent, "new")):
        envs = [
            _env(f"{tag}:{b}:{j}", base + b * H + 300 * j + 7, org=("o1", "o2")[j % 2])
            for b in range(3)
            for j in range(8)
        ]
        for i in range(0, len(envs), 4):
            out.append((i % 4, orjson.dumps(envs[i : i + 4])))
    return out


def _ledger(url: str) -> Ledger:
    engine = make_engine(url)
    migrate(engine)
    led = Ledger(engine)
    pol = [
        (OrgPolicy.model_validate({"org_id": o, "plan": "pro", "stripe_customer_id": "c", "effective_at": 0}), 0, 0)
        for o in ("o1", "o2")
    ]
    led.write_policies("org-policy", pol, {}, {})
    return led


@pytest.fixture
def ledgers() -> Iterator[Callable[[str], Ledger]]:
    made: list[Ledger] = []

    def make(url: str) -> Ledger:
        made.append(_ledger(url))
        return made[-1]

    yield make
    for led in made:
        led.dispose()


def _compact(led: Ledger) -> Any:
    ret = Retention(led.engine, bucket_seconds=H, pause_ratio=0)
    return ret.compact(_now_s() * 1000, DEFAULT_RETENTION_DAYS, parity=ParityStore(led.engine, bucket_seconds=H))


# -------------------------------------------------------------------------------------------------- replay


def test_replay_inside_the_horizon_is_exact_after_retention_and_says_where_it_starts(
    db_url: str,
    kafka_bootstrap: str,
    create_topic: Callable[..., str],
    topic_name: str,
    ledgers: Callable[[str], Ledger],
) -> None:
    now = _now_s()
    old, recent = (now - 40 * DAY) // H * H, (now // H - 4) * H
    topic = create_topic(topic_name, 4)
    records = _fleet(old, recent)
    publish_sync(kafka_bootstrap, topic, [(b"k", v, p) for p, v in records])
    ticks = [SourcedTick(t, p, 0) for p, v in records for t in parse_record(v).ticks]
    holdout = {"new:1:3", "new:2:0"}
    led = ledgers(db_url)
    led.write_ticks(topic, [t for t in ticks if t.tick.id not in holdout], bucket_seconds=H, progress={})
    led.close(now * 1000, LIVE)
    rows_before = led.rows()

    assert _compact(led).samples == 24
    horizon = led.dedup_horizon()
    assert horizon == old + 3 * H

    result = run_replay(led, kafka_bootstrap, ReplaySpec(topic), bucket_seconds=H, jobs=1)
    rep = result.report
    assert rep.clipped and rep.horizon_s == horizon and rep.window_ms[0] == horizon * 1000
    assert rep.compared_buckets == (recent, recent + 2 * H)  # none before the horizon
    assert rep.counts["outside_window"] == 24 and rep.counts["unique"] == 24  # the old ticks are not compared
    assert rep.missing_ids == sorted(holdout) and not rep.extra_ids
    assert {k.label for k in rep.keys} == {"missing"}
    assert any("dedup horizon" in line for line in _render(rep))
    wire = rep.to_wire()
    assert wire["dedup_horizon_s"] == horizon and wire["clipped_to_horizon"] is True

    applied = apply_missing(led, result)
    assert (applied.inserted, applied.too_old) == (2, 0)
    led.close(now * 1000, LIVE)
    assert all(r in led.rows() for r in rows_before)
    assert run_replay(led, kafka_bootstrap, ReplaySpec(topic), bucket_seconds=H, jobs=1).report.clean

    # A range wholly before the horizon compares nothing, and says why.
    early = run_replay(led, kafka_bootstrap, ReplaySpec(topic, until_ms=horizon * 1000), bucket_seconds=H, jobs=1)
    assert early.report.clipped and early.report.clean and early.report.compared_buckets is None


def _render(rep: Any) -> list[str]:
    from infra.replay import render_table

    return render_table(rep)


# -------------------------------------------------------------------------------------------------- commands


def _cli(url: str, *args: str, **env: str) -> Any:
    return CliRunner().invoke(cli, list(args), env={"EDGEBILL_DATABASE_URL": url, **env})


def test_ledger_summary_shows_the_sizes_and_what_retention_would_free_and_compact_drops_it(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    now = _now_s()
    old, recent = (now - 40 * DAY) // H * H, (now // H - 4) * H
    led = _ledger(url)
    ticks = [SourcedTick(t, p, 0) for p, v in _fleet(old, recent) for t in parse_record(v).ticks]
    led.write_ticks("usage-ticks", ticks, bucket_seconds=H, progress={})
    led.close(now * 1000, LIVE)
    ParityStore(led.engine, bucket_seconds=H).advance_edge()
    led.dispose()

    r = _cli(url, "ledger", "--summary", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    tables = {t["table"]: t for t in doc["tables"]}
    assert doc["ticks"]["stored"] == 48 and tables["tick_batches"]["rows"] > 0 and tables["tick_batches"]["bytes"] > 0
    ret = doc["retention"]
    assert ret["enabled"] and ret["days"] == DEFAULT_RETENTION_DAYS and ret["horizon_s"] == 0
    assert (ret["buckets"], ret["samples"], ret["new_horizon_s"]) == (3, 24, old + 3 * H)
    assert ret["frees_bytes_estimate"] > 0
    text = _cli(url, "ledger", "--summary")
    assert text.exit_code == 0 and "ledger size:" in text.stdout and "a run now would drop 24 sample(s)" in text.stdout

    dry = _cli(url, "ledger", "--compact", "--dry-run", "--json")
    assert dry.exit_code == 0 and json.loads(dry.stdout)["samples"] == 24
    assert Ledger(make_engine(url)).sample_totals()["o1"][0] == 24  # the dry run dropped nothing

    done = _cli(url, "ledger", "--compact", "--json")
    assert done.exit_code == 0, done.output
    out = json.loads(done.stdout)
    assert (out["samples"], out["buckets"], out["horizon_s"], out["complete"]) == (24, 3, old + 3 * H, True)
    after = json.loads(_cli(url, "ledger", "--summary", "--json").stdout)
    assert after["ticks"]["stored"] == 24
    assert after["retention"]["horizon_s"] == old + 3 * H and after["retention"]["samples"] == 0

    # Usage errors: exit 2, one line.
    assert _cli(url, "ledger", "--dry-run").exit_code == 2
    assert _cli(url, "ledger", "--compact", "--days", "10").exit_code == 2
    off = _cli(url, "ledger", "--compact", EDGEBILL_RETENTION_DAYS="0")
    assert off.exit_code == 2 and "retention is off" in off.output
    assert "retention: off" in _cli(url, "ledger", "--summary", EDGEBILL_RETENTION_DAYS="0").stdout


# -------------------------------------------------------------------------------------------------- the worker


def test_the_worker_runs_retention_and_dead_letters_a_tick_past_the_horizon(make_stack: Callable[..., Any]) -> None:
    stack = make_stack(EDGEBILL_RETENTION_INTERVAL="1")
    now = _now_s()
    old, recent = (now - 40 * DAY) // H * H, (now // H - 4) * H
    pol = OrgPolicy.model_validate({"org_id": "o1", "plan": "pro", "effective_at": now - 60 * DAY})
    publish_sync(stack.bootstrap, stack.topic("org-policy"), [(b"o1", pol.to_json())])
    first = [_env(f"old:{i}", old + 100 * i + 5) for i in range(30)] + [
        _env(f"new:{i}", recent + 60 * i) for i in range(10)
    ]
    publish_sync(stack.bootstrap, stack.topic("usage-ticks"), [(b"o1", orjson.dumps(first))])
    stack.start_worker()
    stack.wait(lambda: stack.ledger.dedup_horizon() == old + H, 90, "retention to drop the old bucket")
    assert stack.ledger.sample_totals()["o1"][0] == 10
    assert {r["state"] for r in stack.ledger.rows(bucket=old)} == {"skipped_before_bill_from"}

    again = [_env("old:3", old + 305), _env("old:new", old + 1_000), _env("new:late", recent + 3_000)]
    publish_sync(stack.bootstrap, stack.topic("usage-ticks"), [(b"o1", orjson.dumps(again))])
    stack.wait(lambda: stack.ledger.counters().get("ticks.older_than_retention", 0) == 2, 60, "the refusals")
    stack.wait(lambda: stack.ledger.counters().get("ticks.ingested", 0) == 41, 30, "the recent tick")
    dlq = read_topic_sync(stack.bootstrap, stack.topic("usage-ticks-dlq"), idle_timeout=1.5)
    assert sorted(orjson.loads(r.value)["id"] for r in dlq) == ["old:3", "old:new"]
    assert {r.headers["edgebill-reason"] for r in dlq} == {b"older_than_retention"}

    # The parity endpoint cannot sum the edge side of a window before the horizon: it says so.
    path = f"/internal/usage-parity?from={old}&to={old + H}"
    ts = _now_s()
    sig = sign_request(DEFAULT_INTERNAL_SECRET.encode(), ts, path)
    req = urllib.request.Request(
        f"http://127.0.0.1:{stack.web_port}{path}", headers={"X-Timestamp": str(ts), "X-Signature": sig}
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 400 and b"dedup horizon" in err.value.read()
    err.value.close()
