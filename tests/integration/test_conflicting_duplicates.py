"""A tick id seen again with another payload: the first copy stored counts, the other is counted as a
conflicting duplicate and dead-lettered with both fingerprints and where the kept copy was read; the same
payload twice stays a plain duplicate. Within one batch and across batches, writers and restarts."""

from __future__ import annotations

from collections.abc import Iterator

import orjson
import pytest

from infra.runtime import worker_config
from infra.settings import load_settings
from models.ticks import tick_fingerprint
from sinks.ledger import Ledger
from sinks.parity import ParityStore
from sinks.schema import make_engine, migrate
from streams.metrics_view import render_metrics
from streams.pipeline import Deps, Pipeline, WritePlan, prepare_ingest
from streams.records import RawRecord

pytestmark = pytest.mark.integration

NOW_MS = 1_790_000_000_000
TS = "2026-09-21T12:00:00Z"


def env(tid: str, memory: int = 1024, org: str = "o1") -> bytes:
    return orjson.dumps({"id": tid, "org_id": org, "payload": {"interval_s": 20, "memory_mb": memory}, "timestamp": TS})


@pytest.fixture
def ledger(db_url: str) -> Iterator[Ledger]:
    engine = make_engine(db_url)
    migrate(engine)
    yield Ledger(engine, clock=lambda: NOW_MS)
    engine.dispose()


def _pipe(ledger: Ledger) -> Pipeline:
    settings = load_settings(kafka={"partitions": 2, "topic_prefix": ""}, billing={"shadow": True})
    return Pipeline(Deps(config=worker_config(settings), ledger=ledger, sender=None, clock_ms=lambda: NOW_MS))


def _write(pipe: Pipeline, records: list[RawRecord]) -> WritePlan:
    plan = WritePlan(prepare_ingest(records, "usage-ticks", NOW_MS))
    pipe.write_step(plan)
    assert plan.written and not plan.isolating
    return plan


def test_a_reused_id_with_another_payload_is_counted_and_dead_lettered_first_copy_wins(ledger: Ledger) -> None:
    pipe = _pipe(ledger)
    first = _write(pipe, [RawRecord(0, 1, b"o1", env("a")), RawRecord(0, 2, b"o1", env("b"))])
    assert first.conflicts == []
    # Across batches: "a" again with another memory size (conflict), "b" again unchanged (plain duplicate);
    # within one batch: "c" twice with different payloads (the first of the batch is kept).
    second = _write(
        pipe,
        [
            RawRecord(1, 7, b"o1", env("a", memory=4096)),
            RawRecord(1, 8, b"o1", env("b")),
            RawRecord(1, 9, b"o1", orjson.dumps([orjson.loads(env("c")), orjson.loads(env("c", memory=2048))])),
        ],
    )
    letters = pipe.conflict_letters(second)
    assert len(letters) == 2
    by_src = {d.headers["edgebill-source"]: d for d in letters}
    a = by_src[b"usage-ticks/1/7"]
    assert a.headers["edgebill-reason"] == b"conflicting_duplicate"
    assert a.headers["edgebill-kept-source"] == b"usage-ticks/0/1"
    kept_a = next(c.kept.tick for c in second.conflicts if c.tick.tick.id == "a")
    refused_a = next(c.tick.tick for c in second.conflicts if c.tick.tick.id == "a")
    assert a.headers["edgebill-kept-fingerprint"] == tick_fingerprint(kept_a).encode()
    assert a.headers["edgebill-fingerprint"] == tick_fingerprint(refused_a).encode()
    assert kept_a.memory_mb == 1024 and refused_a.memory_mb == 4096
    assert a.value == env("a", memory=4096)
    c = by_src[b"usage-ticks/1/9"]
    assert c.headers["edgebill-array-index"] == b"1" and c.headers["edgebill-kept-source"] == b"usage-ticks/1/9"
    counters = ledger.counters()
    assert counters["ticks.conflicting_duplicate"] == 2 and counters["ticks.duplicate"] == 1
    assert counters["ticks.ingested"] == 3
    # The totals are the first copies': a, b and the first c, all 1024 MB for 20 s.
    assert ledger.sample_totals() == {"o1": (3, 3 * 1024 * 20)}
    assert "edgebill_conflicting_duplicate_ticks_total 2.0" in _metrics(ledger)

    # A restarted worker (a fresh dedup index, rebuilt from the stored batches) sees the same.
    fresh = _pipe(Ledger(ledger.engine, clock=lambda: NOW_MS))
    third = _write(fresh, [RawRecord(0, 30, b"o1", env("a", memory=512)), RawRecord(0, 31, b"o1", env("a"))])
    assert [cf.tick.tick.memory_mb for cf in third.conflicts] == [512]
    assert ledger.sample_totals() == {"o1": (3, 3 * 1024 * 20)}


def _metrics(ledger: Ledger) -> str:
    """The worker's /metrics page as it renders from this ledger."""
    snap = ParityStore(ledger.engine, bucket_seconds=3600).metrics(600)
    return render_metrics(snap, {"usage-ticks"}, NOW_MS / 1000).decode()
