"""Retention on a real database (SQLite file, and PostgreSQL when it answers): what goes, what stays, the dedup
horizon, the bytes given back, the zombie rule for the ticks kept, and bounded transactions.

The ticks are 40 days old ("old", past the default 36-day retention) or a few hours old ("recent").
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from sqlalchemy import select

from infra.runtime import worker_config
from infra.settings import load_settings
from models.billing import RowState
from models.policy import OrgPolicy
from models.retention import DEFAULT_RETENTION_DAYS
from models.ticks import Tick
from models.zombie import is_zombie, ownership_by_sandbox
from sinks.ledger import CloseConfig, Ledger, SourcedTick
from sinks.parity import ParityStore
from sinks.retention import NOT_AGGREGATED, NOT_CLOSED, PARITY_BEHIND, UNSETTLED_ROWS, Retention
from sinks.schema import cell_intervals, make_engine, migrate, parity_edge, unbilled_usage
from streams.health import STARTING
from streams.pipeline import Deps, Pipeline, prepare_ingest
from streams.records import DeadLetter, RawRecord
from streams.wiring import tick_ingestor

pytestmark = pytest.mark.integration

H = 3600
DAY = 86_400
NOW_S = 1_790_000_000 // H * H + 1800
NOW_MS = NOW_S * 1000
OLD = NOW_S // H * H - 40 * DAY  # a bucket start 40 days back
RECENT = NOW_S // H * H - 4 * H  # a bucket start four hours back, closed by NOW
LIVE = CloseConfig(bucket_seconds=H, grace_seconds=600, shadow=False, bill_from=0)
DAYS = DEFAULT_RETENTION_DAYS


@pytest.fixture
def ledger(db_url: str) -> Iterator[Ledger]:
    engine = make_engine(db_url)
    migrate(engine)
    led = Ledger(engine, clock=lambda: NOW_MS)
    led.write_policies(
        "org-policy",
        [
            (
                OrgPolicy.model_validate(
                    {"org_id": o, "plan": "pro", "stripe_customer_id": "cus_1", "effective_at": 0}
                ),
                0,
                0,
            )
            for o in ("o", "p")
        ],
        {},
        {},
    )
    yield led
    engine.dispose()


def _id(prefix: str, n: int) -> str:
    """Ids in no particular order (as uuids are), so that index pages mix old and recent ids."""
    return f"{hashlib.sha1(f'{prefix}{n}'.encode()).hexdigest()[:24]}:{n}"


def tick(tid: str, ts_s: float, org: str = "o", sandbox: str = "sb", worker: str = "w") -> SourcedTick:
    return SourcedTick(Tick(tid, org, sandbox, worker, "c", 1024, 1, 20, int(ts_s * 1000)), 0, 0)


def spread(prefix: str, n: int, start_s: int, hours: int = 1) -> list[SourcedTick]:
    return [tick(_id(prefix, i), start_s + 1 + (i * (hours * H - 2)) // n, org=("o", "p")[i % 2]) for i in range(n)]


def write(led: Ledger, ticks: list[SourcedTick]) -> Any:
    out = None
    for i in range(0, len(ticks), 5000):
        out = led.write_ticks("usage-ticks", ticks[i : i + 5000], bucket_seconds=H, progress={})
    return out


def retention(led: Ledger, **kw: Any) -> Retention:
    return Retention(led.engine, bucket_seconds=H, pause_ratio=0, **kw)


def parity(led: Ledger) -> ParityStore:
    return ParityStore(led.engine, bucket_seconds=H, clock=lambda: NOW_MS)


def samples_bytes(ret: Retention) -> int:
    return next(t.bytes for t in ret.sizes() if t.name == "tick_batches")


def sample_ids(led: Ledger, first: int, last: int) -> set[str]:
    return led.sample_ids(first, last)


# ----------------------------------------------------------------------------------------------- what goes


def test_only_retired_buckets_lose_their_ticks_and_everything_billed_stays(ledger: Ledger) -> None:
    a, b, c, d = OLD, OLD + H, OLD + 2 * H, OLD + 3 * H
    # c closed while Stripe could still take it (a clock 40 days back): its rows are still pending.
    write(ledger, spread("c", 12, c))
    Ledger(ledger.engine, clock=lambda: (c + H + 700) * 1000).close((c + H + 600) * 1000, LIVE)
    assert {r["state"] for r in ledger.rows(bucket=c)} == {RowState.PENDING.value}
    # a and b close now (expired rows); d stays open; b gets a late tick after its close.
    write(ledger, spread("a", 30, a) + spread("b", 20, b) + spread("d", 10, d) + spread("r", 40, RECENT))
    ledger.close((c + H + 600) * 1000, LIVE)
    assert {r["state"] for r in ledger.rows(bucket=a)} == {RowState.EXPIRED.value}
    write(ledger, [tick("late-b", b + 99)])
    assert ledger.open_samples() == 10 + 1 + 40  # d, the late tick, the recent bucket
    rows_before = ledger.rows()
    with ledger.engine.connect() as conn:
        unbilled_before = conn.execute(select(unbilled_usage)).all()

    ret = retention(ledger)
    plan = ret.plan(NOW_MS, DAYS)
    assert plan.retire == {}  # a has not been added to the parity edge sums yet
    assert plan.held == {PARITY_BEHIND: [a], NOT_AGGREGATED: [b], UNSETTLED_ROWS: [c], NOT_CLOSED: [d]}
    result = ret.compact(NOW_MS, DAYS, parity=parity(ledger))

    assert result.plan.retire == {a: 30}
    assert result.plan.held == {NOT_AGGREGATED: [b], UNSETTLED_ROWS: [c], NOT_CLOSED: [d]}
    assert (result.samples, result.buckets, result.complete) == (30, 1, True)
    assert result.horizon_s == ledger.dedup_horizon() == a + H
    assert sample_ids(ledger, a, a) == set()
    assert len(sample_ids(ledger, b, d)) == 20 + 1 + 12 + 10 and len(sample_ids(ledger, RECENT, RECENT)) == 40
    # Meter rows, unbilled usage and the parity edge sums are untouched.
    assert ledger.rows() == rows_before
    with ledger.engine.connect() as conn:
        assert conn.execute(select(unbilled_usage)).all() == unbilled_before
        edge = {(r.bucket_start, r.org_id): r.samples for r in conn.execute(select(parity_edge))}
    assert sum(n for (bk, _), n in edge.items() if bk == a) == 30
    c_ = ledger.counters()
    assert (c_["retention.samples_deleted"], c_["retention.buckets_dropped"]) == (30, 1)

    # Once b's late tick and d are closed (expired rows), they retire too; c waits for its pending rows.
    ledger.close(NOW_MS, LIVE)
    again = ret.compact(NOW_MS, DAYS, parity=parity(ledger))
    assert again.plan.retire == {b: 21, d: 10} and again.plan.held == {UNSETTLED_ROWS: [c]}
    assert again.horizon_s == d + H  # c is before it now: its ticks are kept, copies of them refused
    assert ret.compact(NOW_MS, DAYS, parity=parity(ledger)).samples == 0  # nothing left to do


def test_a_tick_before_the_horizon_is_refused_and_dedup_after_it_holds(ledger: Ledger) -> None:
    old, recent = spread("a", 30, OLD), spread("r", 40, RECENT)
    write(ledger, old + recent)
    ledger.close(NOW_MS, LIVE)
    rows_before = ledger.rows()
    retention(ledger).compact(NOW_MS, DAYS, parity=parity(ledger))
    assert ledger.dedup_horizon() == OLD + H

    again = [old[0], tick("new-old", OLD + 5), recent[0], recent[1], tick("new-recent", RECENT + 7)]
    r = write(ledger, again)
    assert (r.inserted, r.duplicates, r.horizon_s) == (1, 2, OLD + H)
    assert [st.tick.id for st in r.too_old] == [old[0].tick.id, "new-old"]
    assert ledger.counters()["ticks.older_than_retention"] == 2
    ledger.close(NOW_MS, LIVE)
    new_rows = [x for x in ledger.rows() if x not in rows_before]
    assert [(x["bucket_start"], x["samples"]) for x in new_rows] == [(RECENT, 1)]  # only the new recent tick


def _record(offset: int, tid: str, ts_s: int) -> RawRecord:
    ts = datetime.fromtimestamp(ts_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    env = {"id": tid, "org_id": "o", "payload": {"interval_s": 20, "memory_mb": 1024}, "timestamp": ts}
    return RawRecord(0, offset, b"o", orjson.dumps(env))


def test_the_worker_dead_letters_ticks_before_the_horizon_even_when_it_moved_meanwhile(ledger: Ledger) -> None:
    write(ledger, spread("a", 30, OLD) + spread("r", 40, RECENT))
    ledger.close(NOW_MS, LIVE)
    retention(ledger).compact(NOW_MS, DAYS, parity=parity(ledger))
    settings = load_settings(kafka={"partitions": 2, "topic_prefix": ""})
    pipe = Pipeline(
        Deps(config=worker_config(settings), ledger=ledger, sender=None, clock_ms=lambda: NOW_MS, owner="test")
    )
    sent: list[DeadLetter] = []

    async def send(letters: list[DeadLetter]) -> None:
        sent.extend(letters)

    async def run(records: list[RawRecord]) -> int:
        batch = prepare_ingest(records, pipe.ticks_topic, NOW_MS, pipe.horizon_s)
        ing = tick_ingestor(pipe, send)  # not started: only its write path is driven here
        pipe.health.ok(STARTING)
        try:
            await ing._write(batch)
        finally:
            await ing._consumer.stop()
        return len(batch.dead)

    # The worker has not written since the horizon moved: its parser lets the old ticks through, the ledger
    # refuses them, and they are dead-lettered before the batch's offsets could be committed.
    first = [_record(1, "copy", OLD + 1), _record(2, "fresh", RECENT + 9), _record(3, "new-old", OLD + 50)]
    assert asyncio.run(run(first)) == 0
    assert [(d.headers["edgebill-source"], d.headers["edgebill-reason"]) for d in sent] == [
        (b"usage-ticks/0/1", b"older_than_retention"),
        (b"usage-ticks/0/3", b"older_than_retention"),
    ]
    assert pipe.horizon_s == OLD + H  # learnt from the write
    # The next batch's old ticks are refused by the parser step already.
    sent.clear()
    assert asyncio.run(run([_record(4, "again", OLD + 70), _record(5, "fresh-2", RECENT + 11)])) == 1
    assert [d.headers["edgebill-reason"] for d in sent] == [b"older_than_retention"]
    c = ledger.counters()
    assert (c["ticks.older_than_retention"], c["ticks.ingested"]) == (3, 30 + 40 + 2)


def test_after_retention_at_most_5_percent_of_the_dropped_ticks_bytes_remain(ledger: Ledger) -> None:
    ret = retention(ledger)
    write(ledger, spread("r", 2_000, RECENT, hours=3))
    only_recent = samples_bytes(ret)
    write(ledger, spread("a", 100_000, OLD, hours=3))
    before = samples_bytes(ret)
    old_bytes = before - only_recent
    assert old_bytes > 1_000_000  # ids as random as uuids compress to about 12 bytes each
    ledger.close(NOW_MS, LIVE)

    result = ret.compact(NOW_MS, DAYS, parity=parity(ledger))
    assert (result.samples, result.buckets) == (100_000, 3), result.to_wire()
    sqlite = ledger.engine.dialect.name == "sqlite"
    if sqlite:  # the pages the tick table and its index still hold, beyond what the recent ticks need
        assert samples_bytes(ret) - only_recent <= 0.05 * old_bytes
    else:  # what autovacuum does, twice: the second pass lets the emptied index pages be reused
        ret.vacuum()
        ret.vacuum()
    # The space is reused: as many new ticks as were dropped grow the table by at most 5 % of what they took.
    write(ledger, spread("n", 100_000, RECENT + 5 * H, hours=3))
    assert samples_bytes(ret) - before <= 0.05 * old_bytes


# ------------------------------------------------------------------------------------ the zombie rule stays


def _interval(iid: str, sandbox: str, worker: str, start_s: int, end_s: int | None) -> dict[str, Any]:
    return {
        "id": iid,
        "sandbox_id": sandbox,
        "org_id": "o",
        "cell_id": "c",
        "worker_id": worker,
        "memory_mb": 1024,
        "cpu_percent": 100,
        "disk_mb": 0,
        "started_ms": start_s * 1000,
        "ended_ms": None if end_s is None else end_s * 1000,
        "src_partition": 0,
        "src_offset": 0,
        "updated_ms": 0,
    }


def test_old_cell_intervals_go_but_every_kept_tick_is_decided_as_before(ledger: Ledger) -> None:
    intervals = [
        _interval("s1", "s", "w1", OLD - 10 * DAY, OLD - 9 * DAY),  # the sandbox's first interval: stays
        _interval("s2", "s", "w2", OLD - 9 * DAY, OLD - 2 * DAY),  # goes
        _interval("s3", "s", "w3", RECENT - 2 * H, None),  # open: stays
        _interval("t1", "t", "w1", OLD - 5 * DAY, OLD - 4 * DAY),  # t's first: stays, t is known to have run
        _interval("t2", "t", "w2", OLD - 4 * DAY, OLD - 3 * DAY),  # goes
        _interval("u1", "u", "w1", OLD - 3 * H, OLD + 3 * H),  # ended after the horizon: stays
    ]
    with ledger.engine.begin() as conn:
        conn.execute(cell_intervals.insert(), intervals)
    write(ledger, spread("a", 30, OLD))
    ledger.close(NOW_MS, LIVE)
    before = ownership_by_sandbox(ledger.ownership_intervals())
    probes = [
        (sb, w, (RECENT + k * 600) * 1000) for sb in ("s", "t", "u", "v") for w in ("w1", "w2", "w3") for k in range(6)
    ]
    expected = {p: is_zombie(before.get(p[0]), p[1], p[2], 20) for p in probes}
    assert any(expected.values()) and not all(expected.values())

    result = retention(ledger).compact(NOW_MS, DAYS, parity=parity(ledger))

    assert result.intervals == 2
    with ledger.engine.connect() as conn:
        assert sorted(conn.execute(select(cell_intervals.c.id)).scalars()) == ["s1", "s3", "t1", "u1"]
    after = ownership_by_sandbox(ledger.ownership_intervals())
    assert {p: is_zombie(after.get(p[0]), p[1], p[2], 20) for p in probes} == expected
    # The closer's SQL form of the rule agrees on kept ticks written after the compaction.
    write(ledger, [tick(f"z{i}", ts / 1000, sandbox=sb, worker=w) for i, (sb, w, ts) in enumerate(probes)])
    ledger.close(NOW_MS, LIVE)
    zombies = sum(u["samples"] for u in ledger.unbilled() if u["reason"] == "zombie")
    assert zombies == sum(expected.values())


# ------------------------------------------------------------------------------- bounded, resumable, planned


def test_compaction_runs_in_bounded_chunks_and_stops_between_them(ledger: Ledger) -> None:
    old = spread("a", 1_000, OLD)
    for i in range(0, 1_000, 100):  # ten batches of 100 ticks: retention deletes whole batches
        write(ledger, old[i : i + 100])
    write(ledger, spread("r", 10, RECENT))
    ledger.close(NOW_MS, LIVE)
    parity(ledger).advance_edge()
    pauses: list[float] = []
    ret = Retention(ledger.engine, bucket_seconds=H, chunk_rows=100, pause_ratio=2.0, sleep=pauses.append)
    chunks = iter(range(10**6))

    first = ret.compact(NOW_MS, DAYS, stop=lambda: next(chunks) >= 3)
    assert (first.samples, first.complete, first.horizon_s) == (300, False, OLD + H)
    assert first.transactions == 1 + 3 and len(pauses) == 3
    assert len(sample_ids(ledger, OLD, OLD)) == 700  # still there, but no copy of them can be written again
    assert write(ledger, [tick(_id("a", 999), OLD + 3500)]).too_old

    rest = ret.compact(NOW_MS, DAYS)
    assert (rest.samples, rest.buckets, rest.complete) == (700, 1, True)
    assert rest.transactions == 1 + 7 + 1  # the horizon, 7 chunks (the last sees the bucket empty), the intervals
    assert sample_ids(ledger, OLD, OLD) == set() and ledger.counters()["retention.samples_deleted"] == 1_000


def test_the_plan_and_the_sizes(ledger: Ledger) -> None:
    write(ledger, spread("a", 500, OLD) + spread("r", 50, RECENT))
    ledger.close(NOW_MS, LIVE)
    parity(ledger).advance_edge()
    ret = retention(ledger)
    sizes = {t.name: t for t in ret.sizes()}
    assert {"tick_batches", "meter_events", "counters", "cell_intervals", "parity_edge"} <= set(sizes)
    us = sizes["tick_batches"]
    assert us.bytes > 0 and (us.estimated or us.rows == 2)  # one batch per bucket written
    plan = ret.plan(NOW_MS, DAYS, estimate_bytes=True)
    assert (plan.retire, plan.held, plan.new_horizon_s) == ({OLD: 500}, {}, OLD + H)
    if not us.estimated:
        assert 0.8 * us.bytes * 500 / 550 <= plan.frees_bytes <= us.bytes
    assert ret.plan(NOW_MS, 0).retire == {} and ret.compact(NOW_MS, 0).samples == 0  # 0 = off
    assert ret.plan(NOW_MS - 5 * DAY * 1000, DAYS).retire == {}  # five days earlier it was not old enough
