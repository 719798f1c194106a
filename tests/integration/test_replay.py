"""``edgebill replay`` against a real broker and real ledgers (SQLite, and PostgreSQL when it answers).

The truth a replay is checked against is what :meth:`Ledger.close` makes of *all* the ticks in a ledger of
its own: the replay's re-derivation must equal it per (org, bucket, meter), and after ``--apply`` and a
close the ledger under test must too, with every row written before left exactly as it was.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner
from ledger_surgery import delete_tick

from infra.kafka_io import publish_sync
from infra.replay import ReplayRefused, ReplayResult, ReplaySpec, apply_missing, run_replay
from models.billing import UNIFIED_METER
from models.policy import OrgPolicy
from models.ticks import Tick, parse_record
from sinks.ledger import CloseConfig, Ledger, SourcedTick
from sinks.schema import cell_intervals, make_engine, migrate

pytestmark = pytest.mark.integration

H = 3600
NOW_S = int(time.time())
B0 = (NOW_S // H - 4) * H  # three full buckets B0, B0+H, B0+2H, all closable now
LIVE = CloseConfig(bucket_seconds=H, grace_seconds=600, shadow=False, bill_from=0)
Record = tuple[int, bytes]  # (partition, value)


def _iso(ts_s: int) -> str:
    return datetime.fromtimestamp(ts_s, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _env(tid: str, org: str, ts_s: int, mb: int = 1024, secs: int = 20, sandbox: str = "sb", worker: str = "w") -> Any:
    return {
        "id": tid,
        "type": "usage_tick",
        "org_id": org,
        "sandbox_id": sandbox,
        "worker_id": worker,
        "cell_id": "c",
        "payload": {"memory_mb": mb, "interval_s": secs, "cpu_count": 1},
        "timestamp": _iso(ts_s),
    }


ORGS = ("u", "l", "f", "x", "c")


def _fleet() -> list[Record]:
    """Ticks of five orgs over three buckets (arrays and single messages, four partitions), zombie ticks,
    duplicates (one across partitions), malformed records and an envelope of another type."""
    records: list[Record] = []
    for o, org in enumerate(ORGS):
        envs = [
            _env(f"{org}:{b}:{j}", org, B0 + b * H + 550 * j + 17, mb=(1024, 4096, 3000)[j % 3], secs=(20, 7)[j % 2])
            for b in range(3)
            for j in range(6)
        ]
        for i in range(0, len(envs), 4):
            chunk = envs[i : i + 4]
            records.append((o % 4, orjson.dumps(chunk if i % 8 == 0 else chunk[0])))
            records.extend((o % 4, orjson.dumps(e)) for e in ([] if i % 8 == 0 else chunk[1:]))
    records.append((1, orjson.dumps(_env("z1", "u", B0 + 1800, sandbox="zs", worker="w1"))))  # zombie: migrated
    records.append((1, orjson.dumps(_env("z2", "u", B0 + 1800, sandbox="zs", worker="w2"))))  # the owner
    records.append((1, orjson.dumps(_env("z3", "u", B0 + 3000, sandbox="zs", worker="w2"))))  # zombie: ended
    records.append((2, b"not json"))
    records.append((2, orjson.dumps({"id": "no-org", "timestamp": _iso(B0 + 5)})))
    records.append((3, orjson.dumps([_env("in-array", "u", B0 + 60), {"org_id": "u", "timestamp": _iso(B0)}])))
    records.append((3, orjson.dumps({"id": "hb", "type": "heartbeat", "org_id": "u", "timestamp": _iso(B0)})))
    records.append((0, records[0][1]))  # a repeated message, same partition
    records.append((3, records[1][1]))  # and one on another partition
    return records


def _publish(bootstrap: str, topic: str, records: list[Record]) -> list[tuple[int, int, bytes]]:
    """Publish to explicit partitions; returns (partition, offset, value) (a fresh topic: offsets from 0)."""
    publish_sync(bootstrap, topic, [(b"k", v, p) for p, v in records])
    nxt: dict[int, int] = defaultdict(int)
    out = []
    for p, v in records:
        out.append((p, nxt[p], v))
        nxt[p] += 1
    return out


def _ticks(published: list[tuple[int, int, bytes]]) -> list[SourcedTick]:
    """What ingest writes: every valid tick of every record, with its source (duplicates included)."""
    return [SourcedTick(t, p, off) for p, off, v in published for t in parse_record(v).ticks]


def _setup(led: Ledger) -> None:
    def pol(org: str, eff: int, plan: str = "pro", mode: str = "unified") -> tuple[OrgPolicy, int, int]:
        p = {"org_id": org, "plan": plan, "billing_mode": mode, "stripe_customer_id": "cus", "effective_at": eff}
        return OrgPolicy.model_validate(p), 0, 0

    led.write_policies(
        "org-policy",
        [
            pol("u", 0),
            pol("l", 0, mode="legacy"),
            pol("f", 0, plan="free"),
            pol("c", 0),
            pol("c", B0 + 1800, mode="legacy"),  # inside bucket B0: priced per tick
            pol("c", B0 + H + 1200, plan="free"),  # inside bucket B0+H
        ],
        {},
        {},
    )
    with led.engine.begin() as conn:
        for iid, worker, start, end in (("i1", "w1", B0, B0 + 1200), ("i2", "w2", B0 + 1200, B0 + 2400)):
            conn.execute(
                cell_intervals.insert().values(
                    id=iid,
                    sandbox_id="zs",
                    org_id="u",
                    cell_id="c",
                    worker_id=worker,
                    memory_mb=1024,
                    cpu_percent=100,
                    disk_mb=0,
                    started_ms=start * 1000,
                    ended_ms=end * 1000,
                    src_partition=0,
                    src_offset=0,
                    updated_ms=0,
                )
            )


def _write(led: Ledger, ticks: list[SourcedTick], skip: set[str] = frozenset()) -> None:  # type: ignore[assignment]
    led.write_ticks("usage-ticks", [t for t in ticks if t.tick.id not in skip], bucket_seconds=H, progress={})


def _units(led: Ledger) -> dict[tuple[str, int, str], int]:
    out: dict[tuple[str, int, str], int] = defaultdict(int)
    for r in led.rows():
        out[(r["org_id"], r["bucket_start"], r["meter"])] += r["units"]
    return dict(out)


@pytest.fixture
def make_ledger(tmp_path: Path) -> Iterator[Callable[[str], Ledger]]:
    engines: list[Any] = []

    def make(url: str) -> Ledger:
        engine = make_engine(url)
        migrate(engine)
        engines.append(engine)
        led = Ledger(engine)
        _setup(led)
        return led

    yield make
    for e in engines:
        e.dispose()


@pytest.fixture
def truth(make_ledger: Callable[[str], Ledger], tmp_path: Path) -> Callable[[list[SourcedTick]], Any]:
    """Per (org, bucket, meter) units the closer bills for all the ticks, in a ledger of its own."""

    def compute(ticks: list[SourcedTick]) -> dict[tuple[str, int, str], int]:
        led = make_ledger(f"sqlite:///{tmp_path / 'truth.db'}")
        _write(led, ticks)
        led.close(NOW_S * 1000, LIVE)
        return _units(led)

    return compute


def _replay(led: Ledger, bootstrap: str, topic: str, **kw: Any) -> ReplayResult:
    jobs = kw.pop("jobs", 1)
    inline_below = kw.pop("inline_below", 10**9)
    return run_replay(led, bootstrap, ReplaySpec(topic, **kw), bucket_seconds=H, jobs=jobs, inline_below=inline_below)


async def _groups(bootstrap: str) -> set[str]:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return {g[0] for g in await admin.list_consumer_groups()}
    finally:
        await admin.close()


def test_a_fully_ingested_topic_replays_clean_priced_like_the_closer(
    db_url: str, kafka_bootstrap: str, create_topic: Callable[..., str], topic_name: str, make_ledger: Any
) -> None:
    topic = create_topic(topic_name, 4)
    ticks = _ticks(_publish(kafka_bootstrap, topic, _fleet()))
    led = make_ledger(db_url)
    _write(led, ticks)
    led.close(NOW_S * 1000, LIVE)
    groups = asyncio.run(_groups(kafka_bootstrap))

    rep = _replay(led, kafka_bootstrap, topic).report

    assert rep.clean, rep.to_wire()
    assert rep.complete and rep.compared_buckets == (B0, B0 + 2 * H)
    unique = {t.tick.id for t in ticks}
    c = rep.counts
    assert (c["unique"], c["ticks_read"], c["duplicates"]) == (len(unique), len(ticks), len(ticks) - len(unique))
    assert c["duplicates"] == 5  # a 4-tick array and a single message, repeated
    assert rep.rejected == {"missing_id": 1, "missing_org_id": 1, "not_json": 1} and c["ignored_type"] == 1
    # Every (org, bucket, meter) the closer billed was re-derived to the unit, policy changes, legacy tiers
    # and zombies included; the usage it did not bill was set aside for the same reasons.
    assert c["compared_keys"] == len(_units(led)) > 10 and c["differing_keys"] == 0
    ledger_unbilled: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for u in led.unbilled():
        ledger_unbilled[u["reason"]][0] += u["samples"]
        ledger_unbilled[u["reason"]][1] += u["mb_seconds"]
    assert rep.unbilled == dict(ledger_unbilled)
    assert set(rep.unbilled) == {"zombie", "unknown_org", "free_plan", "legacy_unknown_tier"}
    assert rep.unbilled["zombie"][0] == 2
    # Read-only on Kafka: no consumer group appeared.
    assert asyncio.run(_groups(kafka_bootstrap)) == groups


HOLDOUT = {
    "u:0:1",  # unified, 4 GB x 7 s
    "l:1:1",  # legacy 4 GB tier: seconds
    "l:1:2",  # legacy 3000 MB: not billable (no units, still missing)
    "c:0:4",  # after the mid-bucket switch to legacy: the 4 GB tier
    "c:0:0",  # before it: unified, in a 1 GB slice
    "f:2:0",  # free
    "x:1:3",  # unknown org
    "z1",  # zombie: counted, not billed
    "u:0:4",  # unified 4 GB x 20 s; its message is repeated on another partition
}


def test_missing_ticks_are_found_exactly_and_apply_writes_only_them(
    db_url: str,
    kafka_bootstrap: str,
    create_topic: Callable[..., str],
    topic_name: str,
    make_ledger: Any,
    truth: Any,
) -> None:
    topic = create_topic(topic_name, 4)
    ticks = _ticks(_publish(kafka_bootstrap, topic, _fleet()))
    expected = truth(ticks)
    led = make_ledger(db_url)
    _write(led, ticks, skip=HOLDOUT)
    led.close(NOW_S * 1000, LIVE)
    before_rows = {r["id"]: r for r in led.rows()}
    before = _units(led)

    result = _replay(led, kafka_bootstrap, topic)
    rep = result.report

    assert not rep.clean
    assert rep.missing_ids == sorted(HOLDOUT) and not rep.extra_ids
    assert [st.tick.id for st in result.missing] and {st.tick.id for st in result.missing} == HOLDOUT
    # The differences, per (org, bucket, meter), are exactly truth - billed, and exactly the missing ticks.
    diffs = {(k.org_id, k.bucket_start, k.meter): k.diff_units for k in rep.keys}
    want = {k: expected.get(k, 0) - before.get(k, 0) for k in set(expected) | set(before)}
    assert diffs == {k: v for k, v in want.items() if v}
    assert all(k.explained and k.diff_units == k.missing_units for k in rep.keys)
    assert diffs == {
        ("u", B0, UNIFIED_METER): 4096 * 7 + 4096 * 20,  # u:0:1 and u:0:4
        ("l", B0 + H, "sandbox_compute_sandbox_4gb"): 7,
        ("c", B0, "sandbox_compute_sandbox_4gb"): 20,
        ("c", B0, UNIFIED_METER): 1024 * 20,
    }
    assert rep.counts["differing_keys"] == 4

    applied = apply_missing(led, result)
    assert (applied.offered, applied.inserted) == (len(HOLDOUT), len(HOLDOUT))
    led.close(NOW_S * 1000, LIVE)
    after_rows = {r["id"]: r for r in led.rows()}
    assert {i: after_rows[i] for i in before_rows} == before_rows  # no existing row rewritten
    new = {
        after_rows[i]["id"]: (after_rows[i]["org_id"], after_rows[i]["bucket_start"], after_rows[i]["meter"])
        for i in set(after_rows) - set(before_rows)
    }
    # Corrections ...:r1 where the bucket had a row for that meter; the first row where it had none.
    assert {i: after_rows[i]["revision"] for i in new} == {i: int(k in before) for i, k in new.items()}
    assert sorted(i for i in new if after_rows[i]["revision"]) == sorted(
        f"{o}:{b}:{m}:r1" for o, b, m in diffs if (o, b, m) in before
    )
    assert _units(led) == expected
    assert _replay(led, kafka_bootstrap, topic).report.clean


def test_a_forked_scan_counts_cross_slice_duplicates_once(
    sqlite_url: str, kafka_bootstrap: str, create_topic: Callable[..., str], topic_name: str, make_ledger: Any
) -> None:
    topic = create_topic(topic_name, 4)
    records = _fleet()
    # The same ticks again, later in other partitions: every slice split sees ids another slice holds.
    records += [((p + 1) % 4, v) for p, v in records[:12]]
    ticks = _ticks(_publish(kafka_bootstrap, topic, records))
    led = make_ledger(sqlite_url)
    _write(led, ticks, skip={"u:0:1", "l:0:0"})
    led.close(NOW_S * 1000, LIVE)

    inline = _replay(led, kafka_bootstrap, topic)
    forked = _replay(led, kafka_bootstrap, topic, jobs=3, inline_below=0)

    assert (inline.report.jobs, forked.report.jobs) == (1, 3)
    a, b = inline.report.to_wire(), forked.report.to_wire()
    for w in (a, b):
        w.pop("seconds"), w.pop("jobs")
    assert a == b
    assert a["missing_ids"] == ["l:0:0", "u:0:1"]
    assert a["counts"]["duplicates"] == len(ticks) - len({t.tick.id for t in ticks})
    assert sorted(st.tick.id for st in forked.missing) == sorted(st.tick.id for st in inline.missing)


def test_time_window_and_partial_offset_ranges(
    sqlite_url: str, kafka_bootstrap: str, create_topic: Callable[..., str], topic_name: str, make_ledger: Any
) -> None:
    topic = create_topic(topic_name, 4)
    published = _publish(kafka_bootstrap, topic, _fleet())
    ticks = _ticks(published)
    led = make_ledger(sqlite_url)
    _write(led, ticks, skip={"u:0:1", "u:2:1", "l:2:3"})
    led.close(NOW_S * 1000, LIVE)

    # A window from the middle of B0+H: only B0+2H lies wholly inside and is compared.
    rep = _replay(led, kafka_bootstrap, topic, since_ms=(B0 + H + 1800) * 1000).report
    assert rep.compared_buckets == (B0 + 2 * H, B0 + 2 * H)
    assert rep.missing_ids == ["l:2:3", "u:2:1"]  # u:0:1 is outside the window
    assert rep.counts["selected"] == sum(1 for t in ticks if t.tick.ts_ms >= (B0 + H + 1800) * 1000)
    assert {k.bucket_start for k in rep.keys if k.compared} == {B0 + 2 * H}
    # The same bucket by bucket bounds.
    rep2 = _replay(led, kafka_bootstrap, topic, bucket_from=B0 + 2 * H, bucket_to=B0 + 2 * H + 1).report
    assert rep2.missing_ids == rep.missing_ids and rep2.counts["differing_keys"] == rep.counts["differing_keys"]

    # Part of one partition: tick-level only; a sample the ledger says came from inside the range but that
    # the range does not hold is extra, one from outside it is not.
    part0 = [(p, off) for p, off, _ in published if p == 0]
    last = part0[-1][1]
    extra = [
        SourcedTick(Tick(f"ghost-{o}", "u", "sb", "w", "c", 1024, 0, 20, (B0 + 99) * 1000), 0, o)
        for o in (2, last + 50)
    ]
    led.write_ticks("usage-ticks", extra, bucket_seconds=H, progress={})
    rep3 = _replay(led, kafka_bootstrap, topic, partitions=(0,), from_offsets={0: 2}).report
    assert not rep3.complete and rep3.compared_buckets is None and rep3.counts["compared_keys"] == 0
    assert rep3.ranges[0].start == 2 and rep3.ranges[0].end == last + 1
    # Org u lives on partition 0; u:0:1 sits at offset 0, and again in the repeated array at its end.
    assert rep3.missing_ids == ["u:0:1", "u:2:1"]
    assert rep3.extra_ids == ["ghost-2"]
    assert {k.diff_units for k in rep3.keys} == {0} and all(k.missing_units for k in rep3.keys)


def test_apply_refuses_what_it_cannot_fix(
    sqlite_url: str, kafka_bootstrap: str, create_topic: Callable[..., str], topic_name: str, make_ledger: Any
) -> None:
    topic = create_topic(topic_name, 4)
    old_s = (NOW_S // H - 40 * 24) * H  # 40 days ago: past Stripe's 35 days
    records = [*_fleet(), (0, orjson.dumps(_env("old", "u", old_s + 5)))]
    ticks = _ticks(_publish(kafka_bootstrap, topic, records))
    led = make_ledger(sqlite_url)
    _write(led, ticks, skip={"old"})
    led.close(NOW_S * 1000, LIVE)

    result = _replay(led, kafka_bootstrap, topic)
    assert result.report.missing_ids == ["old"]
    with pytest.raises(ReplayRefused, match="35-day"):
        apply_missing(led, result)
    assert apply_missing(led, result, force=True).inserted == 1
    led.close(NOW_S * 1000, LIVE)
    assert {r["state"] for r in led.rows(bucket=old_s)} == {"expired"}  # visible, never sent

    # Samples deleted after their bucket was billed look missing, but the rows already count them:
    # applying would bill them twice.
    assert delete_tick(led.engine, "u:1:0") == 1
    result = _replay(led, kafka_bootstrap, topic)
    assert result.report.missing_ids == ["u:1:0"] and result.report.counts["differing_keys"] == 0
    with pytest.raises(ReplayRefused, match="bill twice"):
        apply_missing(led, result)


def test_cli_dry_run_exit_codes_json_and_apply(
    kafka_bootstrap: str, create_topic: Callable[..., str], tmp_path: Path, make_ledger: Any
) -> None:
    from infra.devkit.cli import cli

    prefix = f"r{NOW_S % 100000}{time.monotonic_ns() % 10000}."
    topic = create_topic(f"{prefix}usage-ticks", 4)
    ticks = _ticks(_publish(kafka_bootstrap, topic, _fleet()))
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    led = make_ledger(url)
    _write(led, ticks, skip={"u:0:1", "c:0:4"})
    led.close(NOW_S * 1000, LIVE)
    env = {"EDGEBILL_KAFKA_BOOTSTRAP": kafka_bootstrap, "EDGEBILL_KAFKA_TOPIC_PREFIX": prefix}
    env["EDGEBILL_DATABASE_URL"] = url
    runner = CliRunner()

    res = runner.invoke(cli, ["replay"], env=env)
    assert res.exit_code == 1, res.output
    assert "DIFFERENCES: 2 missing tick(s)" in res.output and "u:0:1" in res.output
    res = runner.invoke(cli, ["replay", "--json", "--bucket-from", _iso(B0), "--bucket-to", str(B0 + 2 * H)], env=env)
    assert res.exit_code == 1, res.output
    out = json.loads(res.stdout)
    assert out["missing_ids"] == ["c:0:4", "u:0:1"] and out["counts"]["differing_keys"] == 2
    assert not out["clean"] and out["compared_buckets"] == [B0, B0 + 2 * H]

    res = runner.invoke(cli, ["replay", "--apply"], env=env)
    assert res.exit_code == 0, res.output
    assert "applied: 2 missing tick(s) written" in res.output
    # Written, not closed yet: nothing differs, but Stripe has not been billed for them (4, never clean) ...
    res = runner.invoke(cli, ["replay"], env=env)
    assert res.exit_code == 4, res.output
    assert "missing from ledger 0" in res.output and "PENDING CLOSE" in res.output
    assert "no difference" not in res.output
    # ... and once the closer billed them as corrections, the rows do.
    led.close(NOW_S * 1000, LIVE)
    assert {r["id"].rsplit(":", 1)[-1] for r in led.rows() if r["revision"]} == {"r1"}
    res = runner.invoke(cli, ["replay", "--json"], env=env)
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["clean"]

    # A sample deleted after it was billed: reported (1), and --apply refuses to bill it twice (2).
    assert delete_tick(led.engine, "u:1:0") == 1
    assert runner.invoke(cli, ["replay"], env=env).exit_code == 1
    res = runner.invoke(cli, ["replay", "--apply", "--json"], env=env)
    assert res.exit_code == 2, res.output
    out = json.loads(res.stdout)
    assert out["applied"] is None and "bill twice" in out["refused"][0] and out["missing_ids"] == ["u:1:0"]
    # the report is the one JSON object, and it carries the error (no second object after it)
    assert (out["error"], out["exit_code"], out["command"]) == ("nothing applied", 2, "edgebill replay")
    assert "--force" in out["hint"]
    assert "refused:" in res.stderr and "nothing applied" in res.stderr
    assert runner.invoke(cli, ["replay", "--to-offset", "x:y"], env=env).exit_code == 2


# Ticks the ledger receives after their buckets were closed, with no closer run since: in the ledger, in no
# meter row, so Stripe has not been billed for them.
LATE = {
    "u:0:1",  # unified, 4 GB x 7 s
    "u:0:4",  # unified, 4 GB x 20 s
    "l:1:1",  # legacy 4 GB tier: seconds
    "c:0:4",  # after the mid-bucket switch to legacy: the 4 GB tier
    "c:0:0",  # before it: unified, in a 1 GB slice
    "x:1:3",  # unknown org: not billable, so no key pending
    "z1",  # zombie: not billable either
}
# Their units per (org, bucket, meter): what the closer's next run bills.
LATE_UNITS = {
    ("c", B0, UNIFIED_METER): 1024 * 20,
    ("c", B0, "sandbox_compute_sandbox_4gb"): 20,
    ("l", B0 + H, "sandbox_compute_sandbox_4gb"): 7,
    ("u", B0, UNIFIED_METER): 4096 * 7 + 4096 * 20,
}


def _cli_env(kafka_bootstrap: str, create_topic: Callable[..., str], url: str) -> tuple[str, dict[str, str]]:
    prefix = f"p{NOW_S % 100000}{time.monotonic_ns() % 10000}."
    topic = create_topic(f"{prefix}usage-ticks", 4)
    env = {"EDGEBILL_KAFKA_BOOTSTRAP": kafka_bootstrap, "EDGEBILL_KAFKA_TOPIC_PREFIX": prefix}
    env["EDGEBILL_DATABASE_URL"] = url
    return topic, env


def _pending(out: dict[str, Any]) -> dict[tuple[str, int, str], int]:
    return {
        (d["org_id"], d["bucket_start"], d["meter"]): d["pending_close_units"]
        for d in out["differences"]
        if d["label"] == "pending_close"
    }


def test_ticks_in_the_ledger_not_yet_in_meter_rows_are_pending_close_until_the_closer_runs(
    kafka_bootstrap: str, create_topic: Callable[..., str], tmp_path: Path, make_ledger: Any, truth: Any
) -> None:
    from infra.devkit.cli import cli

    url = f"sqlite:///{tmp_path / 'pending.db'}"
    topic, env = _cli_env(kafka_bootstrap, create_topic, url)
    ticks = _ticks(_publish(kafka_bootstrap, topic, _fleet()))
    expected = truth(ticks)
    led = make_ledger(url)
    _write(led, ticks, skip=LATE)
    led.close(NOW_S * 1000, LIVE)
    rows_before = {r["id"]: r for r in led.rows()}
    # The late ticks come in through ingest's write path; their buckets are closed and no closer runs.
    _write(led, [t for t in ticks if t.tick.id in LATE])
    runner = CliRunner()

    res = runner.invoke(cli, ["replay", "--json"], env=env)
    assert res.exit_code == 4, res.output
    out = json.loads(res.stdout)
    # Nothing differs: the topic and the ledger hold the same ticks, and the ledger's rows plus its
    # unaggregated ticks equal the re-derived units. Yet it is not clean: these units were never billed.
    assert not out["clean"] and not out["missing_ids"] and not out["extra_ids"]
    assert out["counts"]["differing_keys"] == 0 and out["counts"]["pending_close_keys"] == len(LATE_UNITS)
    assert out["labels"]["pending_close"] == len(LATE_UNITS)
    assert _pending(out) == LATE_UNITS
    assert {d["label"] for d in out["differences"]} == {"pending_close"}
    assert {d["difference_label"] for d in out["differences"]} == {"ok"}
    assert all(d["diff_units"] == 0 for d in out["differences"])
    u = next(d for d in out["differences"] if (d["org_id"], d["meter"]) == ("u", UNIFIED_METER))
    assert u["pending_close"] == "108"  # 110592 MB-s = 108 GB-s, exactly
    assert "closer" in out["pending_close_note"] and "--apply writes no correction" in out["pending_close_note"]

    res = runner.invoke(cli, ["replay"], env=env)
    assert res.exit_code == 4, res.output
    rows = [line for line in res.output.splitlines() if line.endswith("pending_close")]
    assert len(rows) == len(LATE_UNITS)
    assert any(line.startswith("u ") and " 108 " in line for line in rows)
    assert f"PENDING CLOSE: {len(LATE_UNITS)} (org, bucket, meter)" in res.output and "no difference" not in res.output

    # --apply leaves them to the closer: no tick to write, no correction, and still not clean.
    res = runner.invoke(cli, ["replay", "--apply", "--json"], env=env)
    assert res.exit_code == 4, res.output
    out = json.loads(res.stdout)
    assert out["applied"]["offered"] == 0 and out["repaired"]["corrections"] == []
    assert out["repaired"]["skipped"] == [] and _pending(out) == LATE_UNITS
    assert {r["id"]: r for r in led.rows()} == rows_before

    # The closer's run bills them (corrections of the buckets it had closed): clean.
    led.close(NOW_S * 1000, LIVE)
    after = {r["id"]: r for r in led.rows()}
    assert {i: after[i] for i in rows_before} == rows_before
    assert {i for i in after if i not in rows_before} == {
        f"{o}:{b}:{m}:r1" if any(r["id"] == f"{o}:{b}:{m}" for r in rows_before.values()) else f"{o}:{b}:{m}"
        for o, b, m in LATE_UNITS
    }
    assert _units(led) == expected
    res = runner.invoke(cli, ["replay"], env=env)
    assert res.exit_code == 0, res.output
    assert "no difference" in res.output and "pending_close 0" in res.output and "PENDING" not in res.output
    res = runner.invoke(cli, ["replay", "--json"], env=env)
    assert res.exit_code == 0 and json.loads(res.stdout)["clean"], res.output


def test_a_difference_wins_over_pending_close_and_apply_corrects_only_the_difference(
    kafka_bootstrap: str, create_topic: Callable[..., str], tmp_path: Path, make_ledger: Any, truth: Any
) -> None:
    from infra.devkit.cli import cli

    url = f"sqlite:///{tmp_path / 'mixed.db'}"
    topic, env = _cli_env(kafka_bootstrap, create_topic, url)
    ticks = _ticks(_publish(kafka_bootstrap, topic, _fleet()))
    expected = truth(ticks)
    led = make_ledger(url)
    _write(led, ticks, skip=LATE | {"l:0:0", "u:1:2"})  # l:0:0 and u:1:2 never reach the ledger
    led.close(NOW_S * 1000, LIVE)
    _write(led, [t for t in ticks if t.tick.id in LATE])
    runner = CliRunner()

    res = runner.invoke(cli, ["replay", "--json"], env=env)
    assert res.exit_code == 1, res.output  # the difference's code, although keys are pending close too
    out = json.loads(res.stdout)
    assert out["missing_ids"] == ["l:0:0", "u:1:2"] and _pending(out) == LATE_UNITS
    assert (out["labels"]["missing"], out["labels"]["pending_close"]) == (2, len(LATE_UNITS))
    text = runner.invoke(cli, ["replay"], env=env).output
    assert "DIFFERENCES: 2 missing tick(s)" in text and f"{len(LATE_UNITS)} (org, bucket, meter) pending close" in text

    # --apply writes the missing ticks, and writes no correction for the keys pending close; what is left
    # is pending close only: exit 4.
    res = runner.invoke(cli, ["replay", "--apply"], env=env)
    assert res.exit_code == 4, res.output
    assert "applied: 2 missing tick(s) written" in res.output
    assert f"not repaired: {len(LATE_UNITS)} (org, bucket, meter) pending close" in res.output
    assert not [r for r in led.rows() if r["revision"]]  # no correction row
    res = runner.invoke(cli, ["replay", "--json"], env=env)
    assert res.exit_code == 4, res.output
    out = json.loads(res.stdout)
    # the applied ticks are pending close now too, each in its own key
    assert _pending(out) == {
        **LATE_UNITS,
        ("l", B0, "sandbox_compute_sandbox_1gb"): 20,
        ("u", B0 + H, UNIFIED_METER): 3000 * 20,
    }
    led.close(NOW_S * 1000, LIVE)
    assert _units(led) == expected
    assert runner.invoke(cli, ["replay"], env=env).exit_code == 0
