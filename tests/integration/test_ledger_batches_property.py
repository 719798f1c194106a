"""Ticks as batches, exact whatever happens: the same ticks fed in random batchings, orders, duplicate
patterns, partitions, two writers (two workers on one ledger), crash points (a writer lost before or after
its commit, its batch redelivered to a fresh one) and close runs in between; the billed totals must equal
an independent sum over the unique ticks, on SQLite and on PostgreSQL."""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from models.ticks import SourcedTick, Tick
from sinks.ledger import CloseConfig, Ledger
from sinks.schema import make_engine, meter_totals, migrate

pytestmark = pytest.mark.integration

H = 3600
CFG = CloseConfig(bucket_seconds=H, grace_seconds=0, shadow=True, bill_from=0)
_examples = itertools.count()


@pytest.fixture(scope="module")
def shared_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One ledger per database for the whole module: each example uses its own orgs, ids and hours."""
    yield f"sqlite:///{tmp_path_factory.mktemp('prop') / 'ledger.db'}"


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, object]:
    n = draw(st.integers(1, 60))
    ticks = [
        (draw(st.integers(0, 2)), draw(st.integers(0, 3 * H - 1)), draw(st.integers(1, 60)), draw(st.integers(0, 1)))
        for _ in range(n)
    ]  # (org index, second within three hours, interval, memory choice)
    copies = draw(st.lists(st.integers(1, 3), min_size=n, max_size=n))
    stream = [i for i, c in enumerate(copies) for _ in range(c)]
    order = draw(st.permutations(stream))
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(order) - 1)), max_size=6))))
    events = draw(
        st.lists(st.sampled_from(["write0", "write1", "crash_before", "crash_after", "close"]), min_size=len(cuts) + 1)
    )
    parts = draw(st.lists(st.integers(0, 3), min_size=len(order), max_size=len(order)))
    return {"ticks": ticks, "order": order, "cuts": cuts, "events": events, "parts": parts}


def _run(url: str, sc: dict[str, object]) -> None:
    ex = next(_examples)
    base = (1_790_000_000 // H + ex * 5) * H  # every example in hours of its own
    raw = sc["ticks"]
    assert isinstance(raw, list)
    ticks = [
        Tick(f"e{ex}-t{i}", f"e{ex}-o{org}", f"sb{i % 5}", "", "c", (1024, 2048)[mem], 1, secs, (base + at) * 1000)
        for i, (org, at, secs, mem) in enumerate(raw)
    ]
    order = sc["order"]
    parts = sc["parts"]
    cuts = sc["cuts"]
    events = sc["events"]
    assert isinstance(order, list) and isinstance(parts, list) and isinstance(cuts, list) and isinstance(events, list)
    sourced = [SourcedTick(ticks[i], parts[k], k) for k, i in enumerate(order)]
    batches = [sourced[a:b] for a, b in itertools.pairwise([0, *cuts, len(sourced)]) if sourced[a:b]]
    engine = make_engine(url)

    def now() -> int:  # the hours are recent at close time: shadow rows, one exact carry per (org, meter)
        return (base + 10 * H) * 1000

    writers = [Ledger(engine, clock=now), Ledger(engine, clock=now)]
    try:
        for batch, event in zip(batches, itertools.cycle(events), strict=False):
            if event == "close":
                writers[0].close((base + 10 * H) * 1000, CFG)
                event = "write0"
            w = 1 if event == "write1" else 0
            if event == "crash_before":
                writers[w] = Ledger(engine, clock=now)  # lost before its commit: nothing written, redelivered below
            writers[w].write_ticks("usage-ticks", batch, bucket_seconds=H, progress={})
            if event == "crash_after":  # committed, not acknowledged: a fresh writer gets it again
                writers[w] = Ledger(engine, clock=now)
                again = writers[w].write_ticks("usage-ticks", batch, bucket_seconds=H, progress={})
                assert again.inserted == 0
        writers[1].close((base + 10 * H) * 1000, CFG)
        truth: dict[str, int] = defaultdict(int)
        for t in ticks:
            truth[t.org_id] += t.memory_mb * t.interval_s
        mt = meter_totals.c
        with engine.connect() as conn:
            billed: dict[str, int] = defaultdict(int)
            for org, units in conn.execute(select(mt.org_id, mt.units).where(mt.org_id.like(f"e{ex}-%"))):
                billed[org] += int(units)
        assert dict(billed) == dict(truth)
        totals = writers[0].sample_totals()
        assert {o: v for o, v in totals.items() if o.startswith(f"e{ex}-")} == {
            o: (sum(1 for t in ticks if t.org_id == o), mbs) for o, mbs in truth.items()
        }
    finally:
        engine.dispose()


def _pro_everyone(url: str) -> None:
    from models.policy import OrgPolicy

    engine = make_engine(url)
    migrate(engine)
    led = Ledger(engine)
    pols = [
        (OrgPolicy.model_validate({"org_id": f"e{e}-o{o}", "plan": "pro", "effective_at": 0}), 0, e * 3 + o)
        for e in range(400)
        for o in range(3)
    ]
    led.write_policies("org-policy", pols, {}, {})
    engine.dispose()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sc=scenarios())
def test_billed_totals_equal_the_unique_ticks_whatever_the_batching_sqlite(
    shared_url: str, sc: dict[str, object]
) -> None:
    if next(_prepared_sqlite):
        _pro_everyone(shared_url)
    _run(shared_url, sc)


_prepared_sqlite = itertools.chain([True], itertools.repeat(False))
_prepared_pg = itertools.chain([True], itertools.repeat(False))


@pytest.fixture(scope="module")
def shared_pg_url(request: pytest.FixtureRequest) -> Iterator[str]:
    from conftest import _pg_schema_url, _pg_unavailable_reason, _TestEnv

    base = _TestEnv().pg_url
    reason = _pg_unavailable_reason(base)
    if reason:
        pytest.skip(reason)
    yield from _pg_schema_url(base)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sc=scenarios())
def test_billed_totals_equal_the_unique_ticks_whatever_the_batching_postgresql(
    shared_pg_url: str, sc: dict[str, object]
) -> None:
    if next(_prepared_pg):
        _pro_everyone(shared_pg_url)
    _run(shared_pg_url, sc)
