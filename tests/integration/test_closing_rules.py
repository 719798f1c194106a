"""The closing rules, each with a test that fails when the rule is broken.

A bucket closes once its end + grace has passed on an event-time watermark that never runs ahead of a
lagging consumer and still advances on idle partitions; closing survives restarts and rebalances.
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from decimal import Decimal
from typing import Any

import orjson
import pytest

from infra.kafka_io import publish_sync
from infra.runtime import worker_config
from infra.settings import load_settings
from models.ticks import Tick
from sinks.ledger import CloseConfig, Ledger, SourcedTick
from sinks.schema import make_engine, migrate
from streams.pipeline import Deps, Pipeline

pytestmark = pytest.mark.integration

H = 3600
B0 = 1_790_000_000 // H * H
NOW_MS = (B0 + 3 * H) * 1000
LIVE = CloseConfig(bucket_seconds=H, grace_seconds=600, shadow=False, bill_from=B0 - 10 * H)


@pytest.fixture
def ledger(db_url: str) -> Iterator[Ledger]:
    engine = make_engine(db_url)
    migrate(engine)
    yield Ledger(engine, clock=lambda: NOW_MS)
    engine.dispose()


def _pipeline(ledger: Ledger, partitions: int = 2) -> Pipeline:
    settings = load_settings(
        kafka={"partitions": partitions, "topic_prefix": ""},
        billing={"shadow": False, "pro_billing_authority": "edge", "bill_from": B0 - 10 * H},
    )
    return Pipeline(
        Deps(config=worker_config(settings), ledger=ledger, sender=None, clock_ms=lambda: NOW_MS, owner="test")
    )


def _tick(org: str, ts_s: int, tid: str, part: int, off: int) -> SourcedTick:
    return SourcedTick(Tick(tid, org, "sb", "w", "c", 1024, 0, 20, ts_s * 1000), part, off)


def _pro(ledger: Ledger, org: str = "o") -> None:
    from models.policy import OrgPolicy

    p = OrgPolicy.model_validate({"org_id": org, "plan": "pro", "stripe_customer_id": "cus", "effective_at": 0})
    ledger.write_policies("org-policy", [(p, 0, 0)], {0: (0, None), 1: (0, None)}, {})
    ledger.report_highwaters("org-policy", {0: 1, 1: 1}, "test")
    ledger.report_highwaters("sandbox-scale-events", {0: 0, 1: 0, 2: 0}, "test")  # empty: caught up


def test_a_lagging_partition_holds_its_buckets_open(ledger: Ledger) -> None:
    pipe = _pipeline(ledger)
    _pro(ledger)
    # Partition 0 is caught up; partition 1 has read up to B0+20 min only and its log goes on.
    ledger.write_ticks(
        "usage-ticks", [_tick("o", B0 + 10, "a", 0, 0)], bucket_seconds=H, progress={0: (0, (B0 + 10) * 1000)}
    )
    ledger.write_ticks(
        "usage-ticks", [_tick("o", B0 + 1200, "b", 1, 0)], bucket_seconds=H, progress={1: (0, (B0 + 1200) * 1000)}
    )
    ledger.report_highwaters("usage-ticks", {0: 1, 1: 500}, "test")
    res = pipe.close_once()
    assert res is not None and res.rows == 0 and ledger.open_samples() == 2
    # Partition 1 reads on, past the bucket's end + grace: now the bucket may close.
    ledger.write_ticks(
        "usage-ticks", [_tick("o", B0 + H + 600, "c", 1, 1)], bucket_seconds=H, progress={1: (1, (B0 + H + 600) * 1000)}
    )
    res = pipe.close_once()
    assert res is not None and res.rows == 1 and ledger.rows()[0]["value"] == "40"


def test_an_idle_partition_does_not_block_closing(ledger: Ledger) -> None:
    pipe = _pipeline(ledger)
    _pro(ledger)
    ledger.write_ticks(
        "usage-ticks", [_tick("o", B0 + 10, "a", 0, 0)], bucket_seconds=H, progress={0: (0, (B0 + 10) * 1000)}
    )
    ledger.report_highwaters("usage-ticks", {0: 1, 1: 0}, "test")  # partition 1 never received anything
    res = pipe.close_once()
    assert res is not None and res.rows == 1


def test_an_unreported_partition_blocks_closing(ledger: Ledger) -> None:
    pipe = _pipeline(ledger, partitions=3)  # partition 2 has no owner report at all (e.g. mid-rebalance)
    _pro(ledger)
    ledger.write_ticks(
        "usage-ticks", [_tick("o", B0 + 10, "a", 0, 0)], bucket_seconds=H, progress={0: (0, (B0 + 10) * 1000)}
    )
    ledger.report_highwaters("usage-ticks", {0: 1, 1: 0}, "test")
    assert pipe.close_once() is None and ledger.open_samples() == 1


def test_lagging_cell_events_hold_closing_because_they_decide_zombie_ticks(ledger: Ledger) -> None:
    pipe = _pipeline(ledger)
    _pro(ledger)
    ledger.write_ticks(
        "usage-ticks", [_tick("o", B0 + 10, "a", 0, 0)], bucket_seconds=H, progress={0: (0, (B0 + 10) * 1000)}
    )
    ledger.report_highwaters("usage-ticks", {0: 1, 1: 0}, "test")
    ledger.report_highwaters("sandbox-scale-events", {0: 0, 1: 7}, "test")  # 7 scale events not read yet
    assert pipe.close_once() is None and ledger.open_samples() == 1


def test_concurrent_closers_never_close_a_sample_twice(ledger: Ledger) -> None:
    """Two leaders at once (a rebalance hand-over): every sample lands in exactly one row."""
    _pro(ledger)
    for org in ("o", "p", "q"):
        _pro(ledger, org)
    ticks = [
        _tick(org, B0 + b * H + k * 20, f"{org}{b}:{k}", 0, 0) for org in "opq" for b in range(2) for k in range(50)
    ]
    ledger.write_ticks("usage-ticks", ticks, bucket_seconds=H, progress={})
    results: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(ledger.close(NOW_MS, LIVE))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sum(r.samples for r in results) == len(ticks)
    rows = ledger.rows()
    assert len(rows) == 6 and all(r["revision"] == 0 for r in rows)
    assert sum(r["units"] for r in rows) == len(ticks) * 1024 * 20


def _units(led: Ledger) -> dict[tuple[str, int, str], int]:
    out: dict[tuple[str, int, str], int] = defaultdict(int)
    for r in led.rows():
        out[(r["org_id"], r["bucket_start"], r["meter"])] += r["units"]
    return dict(out)


def _values(led: Ledger) -> dict[tuple[str, str], Decimal]:
    out: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for r in led.rows():
        out[(r["org_id"], r["meter"])] += Decimal(r["value"])
    return dict(out)


def test_replaying_the_same_ticks_gives_the_same_bill_whenever_and_however_it_runs(db_url: str, tmp_path: Any) -> None:
    """One ledger closes once at the end; another closes after every small batch, in another order."""
    from models.policy import OrgPolicy

    rng = random.Random(5)
    ticks = [_tick(f"o{rng.randrange(4)}", B0 + rng.randrange(0, 3 * H), f"t{i}", 0, i) for i in range(600)]
    ticks = [
        SourcedTick(
            Tick(
                t.tick.id,
                t.tick.org_id,
                "sb",
                "w",
                "c",
                rng.choice([1024, 3000]),
                0,
                rng.choice([19, 21]),
                t.tick.ts_ms,
            ),
            0,
            t.offset,
        )
        for t in ticks
    ]
    pols = [
        OrgPolicy.model_validate(
            {
                "org_id": f"o{i}",
                "plan": "pro",
                "billing_mode": "unified" if i % 2 else "legacy",
                "stripe_customer_id": "c",
                "effective_at": 0,
            }
        )
        for i in range(4)
    ] + [
        OrgPolicy.model_validate(
            {"org_id": "o0", "plan": "pro", "billing_mode": "unified", "effective_at": B0 + H + 1234}
        )
    ]
    ledgers = []
    for name, clock_ms in (("a", NOW_MS), ("b", NOW_MS + 20 * 86400 * 1000)):
        engine = make_engine(f"sqlite:///{tmp_path / name}.db") if name == "b" else make_engine(db_url)
        migrate(engine)
        led = Ledger(engine, clock=lambda c=clock_ms: c)
        led.write_policies("org-policy", [(p, 0, 0) for p in pols], {0: (0, None)}, {})
        ledgers.append((led, engine))
    a, b = ledgers[0][0], ledgers[1][0]
    a.write_ticks("usage-ticks", ticks, bucket_seconds=H, progress={})
    a.close(NOW_MS, LIVE)
    shuffled = list(ticks)
    rng.shuffle(shuffled)
    for i in range(0, len(shuffled), 37):
        b.write_ticks("usage-ticks", shuffled[i : i + 37], bucket_seconds=H, progress={})
        b.close(NOW_MS, LIVE)  # closes early and often: later ticks become corrections
    assert any(r["revision"] > 0 for r in b.rows())
    assert _units(a) == _units(b)
    assert _values(a) == _values(b)
    for _, engine in ledgers:
        engine.dispose()


def test_a_bucket_open_at_shutdown_closes_after_restart(make_stack: Callable[..., Any]) -> None:
    """Faust's own windows never fire for a window open at shutdown; ours closes on the next start."""
    stack = make_stack(
        EDGEBILL_BUCKET_SECONDS="60",
        EDGEBILL_GRACE_SECONDS="2",
        EDGEBILL_BILL_FROM="0",
        EDGEBILL_SHADOW="true",
        EDGEBILL_PRO_BILLING_AUTHORITY="cell",
    )
    from models.policy import OrgPolicy

    pol = OrgPolicy.model_validate({"org_id": "o", "plan": "pro", "effective_at": 0})
    publish_sync(stack.bootstrap, stack.topic("org-policy"), [(b"o", pol.to_json())])
    # Stamp ticks in the current minute, at least 15 s before it ends.
    while time.time() % 60 > 40:
        time.sleep(0.5)
    now = time.time()
    bucket_end = int(now) // 60 * 60 + 60
    ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
    worker = stack.start_worker()
    ticks = [
        (
            b"o",
            orjson.dumps(
                {"id": f"s:{i}", "org_id": "o", "payload": {"interval_s": 5, "memory_mb": 1024}, "timestamp": ts}
            ),
        )
        for i in range(3)
    ]
    publish_sync(stack.bootstrap, stack.topic("usage-ticks"), ticks)
    stack.wait(lambda: stack.ledger.counters().get("ticks.ingested", 0) == 3, 30, "ingest")
    stack.stop(worker)
    assert time.time() < bucket_end, "the test must stop the worker before the bucket ends"
    assert stack.ledger.rows() == [] and stack.ledger.open_samples() == 3
    time.sleep(max(0.0, bucket_end + 3 - time.time()))
    stack.start_worker()
    stack.wait(lambda: stack.ledger.open_samples() == 0, 30, "the bucket to close after restart")
    (row,) = stack.ledger.rows()
    assert (row["bucket_start"], row["value"], row["state"]) == (bucket_end - 60, "15", "shadow")
