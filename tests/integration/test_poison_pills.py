"""No record can stop billing: each bad record costs that record only, on SQLite and on PostgreSQL.

* a record the parser refuses — 5 MB of garbage, a 1.1 MB envelope, a 10,000-character sandbox id, a NUL —
  is dead-lettered (a bounded copy when too large for a producer request) and the ticks after it are billed;
* a tick the *database* refuses is isolated from its batch and dead-lettered with the database's reason (and
  one the ledger itself refuses, with the ledger's);
* a database that is down is retried, never dead-lettered; a dead letter that cannot be written stops
  ingestion where it is (not ready) and nothing after it is written until it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
import sqlalchemy.exc
from sqlalchemy import Engine

from infra.kafka_io import publish_sync, read_topic_sync
from infra.runtime import worker_config
from infra.settings import load_settings
from models.ticks import Tick
from sinks.ledger import Ledger, SourcedTick
from sinks.schema import make_engine, migrate
from streams.health import DEAD_LETTERS, LEDGER, STARTING
from streams.ingest import TickIngestor
from streams.pipeline import Deps, IngestBatch, Pipeline, WritePlan, prepare_ingest
from streams.records import DEAD_LETTER_MAX_BYTES, DeadLetter, RawRecord, Stopped
from streams.wiring import tick_ingestor

pytestmark = pytest.mark.integration

H = 3600
NOW_MS = 1_790_000_000_000
TS = "2026-09-21T12:00:00Z"  # well before NOW_MS: never in the future


def tick_env(tid: str, org: str = "o1", memory: int = 1024, interval: int = 20, **over: Any) -> dict[str, Any]:
    return {"id": tid, "org_id": org, "payload": {"interval_s": interval, "memory_mb": memory}, "timestamp": TS} | over


POISON_TS = "2026-09-21T09:30:00Z"  # the hour the database refuses in these tests
POISON_BUCKET = 1_789_981_200 // H * H


def refuse_bucket(engine: Engine, bucket: int) -> None:
    """Make the database itself refuse to store ticks of one bucket (a data error, like a real one)."""
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql(
                "CREATE TRIGGER refuse_test_bucket BEFORE INSERT ON tick_batches "
                f"WHEN NEW.bucket_start = {bucket} BEGIN SELECT RAISE(ABORT, 'bucket refused by the test'); END"
            )
        else:
            conn.exec_driver_sql(
                f"ALTER TABLE tick_batches ADD CONSTRAINT refuse_test_bucket CHECK (bucket_start <> {bucket})"
            )


@pytest.fixture
def ledger(db_url: str) -> Iterator[Ledger]:
    engine = make_engine(db_url)
    migrate(engine)
    yield Ledger(engine, clock=lambda: NOW_MS)
    engine.dispose()


def pipeline(ledger: Ledger) -> Pipeline:
    settings = load_settings(kafka={"partitions": 2, "topic_prefix": ""}, billing={"shadow": True})
    return Pipeline(
        Deps(config=worker_config(settings), ledger=ledger, sender=None, clock_ms=lambda: NOW_MS, owner="test")
    )


# ------------------------------------------------------------------------ isolation, without a broker


def test_a_tick_the_database_refuses_is_isolated_and_the_rest_of_its_batch_written(ledger: Ledger) -> None:
    refuse_bucket(ledger.engine, POISON_BUCKET)
    pipe = pipeline(ledger)
    poison_elem = tick_env("p1", org="poison-a", timestamp=POISON_TS)
    records = [
        RawRecord(0, 10, b"o1", orjson.dumps(tick_env("g1"))),
        RawRecord(0, 11, b"o1", orjson.dumps([tick_env("g2"), poison_elem, tick_env("g3", memory=2048)])),
        RawRecord(1, 5, b"p", orjson.dumps(tick_env("p2", org="poison-b", timestamp=POISON_TS))),
        *[RawRecord(1, 6 + i, b"o2", orjson.dumps(tick_env(f"h{i}", org="o2", memory=512))) for i in range(40)],
    ]
    batch = prepare_ingest(records, "usage-ticks", NOW_MS)
    assert batch.dead == [] and len(batch.ticks) == 45  # the parser has nothing against them
    plan = WritePlan(batch)
    pipe.write_step(plan)
    assert plan.isolating and plan.written
    assert sorted(st.tick.id for st, _ in plan.refused) == ["p1", "p2"]
    letters = {d.headers["edgebill-source"]: d for d in pipe.refused_letters(plan)}
    assert set(letters) == {b"usage-ticks/0/11", b"usage-ticks/1/5"}
    in_array = letters[b"usage-ticks/0/11"]
    assert in_array.value == orjson.dumps(poison_elem) and in_array.headers["edgebill-array-index"] == b"1"
    whole = letters[b"usage-ticks/1/5"]
    assert whole.value == records[2].value and "edgebill-array-index" not in whole.headers
    for d in letters.values():
        assert d.headers["edgebill-reason"] == b"ledger_refused"
        detail = d.headers["edgebill-detail"].decode()
        assert ("IntegrityError" in detail or "CheckViolation" in detail) and "refuse" in detail
    # Nothing of the batch's progress or counters is recorded until the dead letters are out.
    assert ledger.counters().get("records.read", 0) == 0
    pipe.finish_isolated(plan)
    c = ledger.counters()
    assert (c["records.read"], c["records.rejected"], c["ticks.ingested"]) == (43, 2, 43)
    assert ledger.sample_totals() == {"o1": (3, 20 * 1024 * 2 + 20 * 2048), "o2": (40, 40 * 20 * 512)}
    assert {(p.partition, p.committed_offset) for p in ledger.partition_states()} == {(0, 11), (1, 45)}


def test_what_the_parser_refuses_the_ledger_refuses_too(ledger: Ledger) -> None:
    """Ticks the parser refuses, handed to the ledger by another writer: it refuses them itself, with its
    reason, on every database (a NUL or an overlong id would otherwise reach the meter rows)."""
    pipe = pipeline(ledger)
    ok = [SourcedTick(Tick(f"g{i}", "o1", "sb", "w", "c", 1024, 1, 20, NOW_MS - H * 1000), 0, i) for i in range(9)]
    long_sandbox = SourcedTick(Tick("long", "o1", "s" * 10_000, "w", "c", 1024, 1, 20, NOW_MS - H * 1000), 0, 9)
    nul_org = SourcedTick(Tick("nul", "o\x001", "sb", "w", "c", 1024, 1, 20, NOW_MS - H * 1000), 0, 10)
    records = [RawRecord(0, i, None, b"{}") for i in range(11)]
    batch = IngestBatch(ticks=[*ok[:4], long_sandbox, *ok[4:], nul_org], progress={0: (10, None)}, records=records)
    plan = WritePlan(batch)
    pipe.write_step(plan)
    assert {st.tick.id: why for st, why in plan.refused} == {
        "long": "TickRefused: sandbox_id is longer than 255 characters",
        "nul": "TickRefused: org_id contains a NUL character",
    }
    assert ledger.sample_totals() == {"o1": (9, 9 * 20 * 1024)}


# -------------------------------------------------------- the write path's order, retries and stop


class FlakyLedger(Ledger):
    """The real ledger, except that the database is "down" for the first ``down`` ingest writes."""

    def __init__(self, inner: Ledger, down: int) -> None:
        super().__init__(inner.engine, clock=lambda: NOW_MS)
        self.down = down

    def write_ticks(self, *args: Any, **kwargs: Any) -> Any:
        if self.down > 0:
            self.down -= 1
            raise sqlalchemy.exc.OperationalError("INSERT", {}, Exception("connection refused"))
        return super().write_ticks(*args, **kwargs)


def _batch(pipe: Pipeline) -> IngestBatch:
    records = [
        RawRecord(0, 0, None, b"not json"),
        *[RawRecord(0, i, b"o1", orjson.dumps(tick_env(f"t{i}"))) for i in range(1, 6)],
    ]
    return prepare_ingest(records, pipe.ticks_topic, NOW_MS)


@contextlib.asynccontextmanager
async def _ingestor(pipe: Pipeline, send: Any) -> AsyncIterator[TickIngestor]:
    ing = tick_ingestor(pipe, send)  # not started: only its write path is driven here
    pipe.health.ok(STARTING)
    try:
        yield ing
    finally:
        await ing._consumer.stop()


def test_a_database_that_is_down_is_retried_and_nothing_is_dead_lettered_for_it(ledger: Ledger) -> None:
    flaky = FlakyLedger(ledger, down=3)
    pipe = pipeline(flaky)
    sent: list[DeadLetter] = []
    seen_down: list[bool] = []

    async def send(letters: list[DeadLetter]) -> None:
        sent.extend(letters)

    async def watch() -> None:
        while flaky.down > 0:
            seen_down.append(pipe.health.holds(LEDGER))
            await asyncio.sleep(0.05)

    async def run() -> None:
        async with _ingestor(pipe, send) as ing:
            await asyncio.gather(ing._write(_batch(pipe)), watch())

    asyncio.run(run())
    assert [d.headers["edgebill-reason"] for d in sent] == [b"not_json"]  # the parser's, not the database's
    assert any(seen_down) and pipe.health.ready()
    assert ledger.sample_totals() == {"o1": (5, 5 * 20 * 1024)}


def test_a_dead_letter_that_cannot_be_written_stops_ingestion_until_it_is(ledger: Ledger) -> None:
    pipe = pipeline(ledger)
    calls: list[tuple[bool, int]] = []  # (ready?, samples in the ledger) at each attempt

    async def send(letters: list[DeadLetter]) -> None:
        calls.append((pipe.health.ready(), ledger.open_samples()))
        if len(calls) <= 3:
            raise ConnectionError("broker refused the dead letter")

    async def run() -> None:
        async with _ingestor(pipe, send) as ing:
            await ing._write(_batch(pipe))

    asyncio.run(run())
    assert len(calls) == 4
    assert [samples for _, samples in calls] == [0, 0, 0, 0]  # nothing written past the undead-lettered record
    assert [ready for ready, _ in calls] == [True, False, False, False]  # not ready while it fails
    assert pipe.health.ready() and ledger.sample_totals() == {"o1": (5, 5 * 20 * 1024)}


def test_a_stop_during_a_stalled_retry_gives_up_at_once_and_writes_nothing(ledger: Ledger) -> None:
    pipe = pipeline(ledger)

    async def send(letters: list[DeadLetter]) -> None:
        raise ConnectionError("broker refused the dead letter")

    async def run() -> float:
        async with _ingestor(pipe, send) as ing:
            task = asyncio.create_task(ing._write(_batch(pipe)))
            await asyncio.sleep(2.0)
            assert pipe.health.holds(DEAD_LETTERS)
            t0 = time.monotonic()
            ing._stopping.set()
            with pytest.raises(Stopped):
                await task
            return time.monotonic() - t0

    assert asyncio.run(run()) < 0.5
    assert ledger.open_samples() == 0


# ----------------------------------------------------------------------------- a real worker


def _readyz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return r.status, orjson.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read()
        e.close()
        return e.code, orjson.loads(body)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_poison_records_cost_only_themselves_in_a_running_worker(make_stack: Any, database: str) -> None:
    stack = make_stack(database=database)
    refuse_bucket(stack.ledger.engine, POISON_BUCKET)
    stack.start_worker()
    topic = stack.topic("usage-ticks")
    garbage = b"\xff\x00 not json " * (5 * 1024 * 1024 // 14)  # ~5 MB
    big_invalid = orjson.dumps(tick_env("big", timestamp="not a time", note="x" * 1_100_000))  # ~1.1 MB
    long_sandbox = orjson.dumps(tick_env("long", sandbox_id="s" * 10_000))
    nul_org = orjson.dumps(tick_env("nul", org="o\x001"))
    refused = orjson.dumps(
        [
            tick_env("r-ok1", org="o2"),
            tick_env("r-bad", org="poison-x", timestamp=POISON_TS),
            tick_env("r-ok2", org="o2"),
        ]
    )
    expected = {
        "not_json": garbage,
        "bad_timestamp": big_invalid,
        "sandbox_id_too_long": long_sandbox,
        "org_id_contains_nul": nul_org,
        "ledger_refused": orjson.dumps(tick_env("r-bad", org="poison-x", timestamp=POISON_TS)),
    }
    good = 0
    for i, bad in enumerate([garbage, big_invalid, long_sandbox, nul_org, refused]):
        publish_sync(stack.bootstrap, topic, [(b"k", bad, 0)])
        # ...each followed by good ticks, on every partition
        msgs = [(f"o{j}".encode(), orjson.dumps(tick_env(f"good-{i}-{j}", org="o1")), j % 4) for j in range(8)]
        good += publish_sync(stack.bootstrap, topic, msgs)

    def all_in() -> bool:
        # A batch written around a refused tick stores its ticks first and its counters (the rejections
        # among them) in a second transaction: wait for both, not for the ticks alone.
        counters = stack.ledger.counters()
        return counters.get("ticks.ingested", 0) >= good + 2 and counters.get("records.rejected", 0) >= 5

    stack.wait(all_in, 120, "the good ticks behind the poison records, and the poison records counted")
    assert stack.ledger.sample_totals() == {"o1": (good, good * 20 * 1024), "o2": (2, 2 * 20 * 1024)}
    assert stack.ledger.counters()["records.rejected"] == 5
    dlq = read_topic_sync(stack.bootstrap, stack.topic("usage-ticks-dlq"), idle_timeout=2.0, max_wait=30)
    got = {d.headers["edgebill-reason"].decode(): d for d in dlq}
    assert set(got) == set(expected) and len(dlq) == 5
    for reason, d in got.items():
        original = expected[reason]
        src_topic, part, off = d.headers["edgebill-source"].decode().rsplit("/", 2)
        assert (src_topic, part) == (topic, "0") and int(off) >= 0, d.headers
        assert len(d.value) + len(d.key or b"") <= DEAD_LETTER_MAX_BYTES
        if len(original) > DEAD_LETTER_MAX_BYTES:
            assert d.headers["edgebill-truncated"] == str(len(original)).encode()
            assert original.startswith(d.value) and len(d.value) > 100_000
        else:
            assert d.value == original and "edgebill-truncated" not in d.headers
    assert got["ledger_refused"].headers["edgebill-array-index"] == b"1"
    assert b"refuse" in got["ledger_refused"].headers["edgebill-detail"]
    # Their offsets are distinct and in publication order.
    offsets = [int(got[r].headers["edgebill-source"].rsplit(b"/", 1)[1]) for r in expected]
    assert offsets == sorted(offsets) and len(set(offsets)) == 5
    assert all(p.poll() is None for p in stack.procs)
    stack.wait(lambda: _readyz(stack.web_port)[0] == 200, 30, "the worker to be ready")
