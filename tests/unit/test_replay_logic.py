"""``infra.replay`` without a broker: pricing (the closer's rules), the range arithmetic, the report, the guards."""

from __future__ import annotations

from decimal import Decimal

import click
import pytest
from zombie_cases import B0 as ZOMBIE_B0
from zombie_cases import MIGRATION, MIGRATION_INTERVALS

from infra.cli.replay import _partition_offsets
from infra.replay import (
    EXIT_CLEAN,
    EXIT_DIFFERENCES,
    EXIT_PENDING_CLOSE,
    Aggregates,
    KeyDiff,
    OrgMeterDiff,
    PartitionRange,
    Pricer,
    ReplayReport,
    ReplayResult,
    ReplaySpec,
    ScanCounts,
    _compared_buckets,
    _id_scope,
    _slices,
    apply_problems,
    render_table,
    repairable,
)
from models.billing import UNIFIED_METER
from models.policy import OrgPolicy
from models.ticks import Tick
from sinks.ledger import SourcedTick

H = 3600
B0 = 1_790_000_000 // H * H


def pol(org: str, eff_s: int, plan: str = "pro", mode: str = "unified", provider: str = "stripe") -> OrgPolicy:
    return OrgPolicy.model_validate(
        {"org_id": org, "plan": plan, "billing_mode": mode, "billing_provider": provider, "effective_at": eff_s}
    )


def tk(tid: str, org: str, ts_s: int, mb: int = 1024, secs: int = 10, sandbox: str = "sb", worker: str = "w") -> Tick:
    return Tick(tid, org, sandbox, worker, "c", mb, 0, secs, ts_s * 1000)


def test_policy_as_of_tick_time_is_priced_like_the_closer() -> None:
    """The closer's own test case (test_ledger::test_policy_as_of_tick_time_within_a_bucket), re-derived."""
    policies = {
        "o": [
            pol("o", 0, plan="free"),
            pol("o", B0 + 1800),  # upgrade at :30
            pol("o", B0 + H + 1800, mode="legacy"),  # mode change at next :30
            pol("o", B0 + 2 * H + 1800, plan="free"),  # downgrade
        ]
    }
    pricer = Pricer(policies, [], H)
    ticks = [tk(f"a{s}", "o", B0 + s) for s in (600, 1799, 1800, 3000)]
    ticks += [tk(f"b{s}", "o", B0 + H + s) for s in (600, 1800)]
    ticks += [tk(f"c{s}", "o", B0 + 2 * H + s) for s in (600, 1800, 2400)]
    agg = pricer.price(ticks)
    assert agg.billable == {
        ("o", B0, UNIFIED_METER): [20 * 1024, 2],  # 2 ticks x 1 GB x 10 s, in MB-s
        ("o", B0 + H, UNIFIED_METER): [10 * 1024, 1],
        ("o", B0 + H, "sandbox_compute_sandbox_1gb"): [10, 1],
        ("o", B0 + 2 * H, "sandbox_compute_sandbox_1gb"): [10, 1],
    }
    assert agg.unbilled == {("o", B0, "free_plan"): [2, 20480], ("o", B0 + 2 * H, "free_plan"): [2, 20480]}


def test_unknown_free_provider_and_untiered_usage_is_unbilled() -> None:
    pricer = Pricer(
        {
            "free": [pol("free", 0, plan="free")],
            "leg": [pol("leg", 0, mode="legacy")],
            "paddle": [pol("paddle", 0, provider="paddle")],
            "late": [pol("late", B0 + H)],  # no policy yet when its tick happens
        },
        [],
        H,
    )
    agg = pricer.price(
        [
            tk("1", "nobody", B0 + 1, secs=20),
            tk("2", "free", B0 + 2, secs=20),
            tk("3", "leg", B0 + 3, mb=2048, secs=20),
            tk("4", "leg", B0 + 4, mb=4096, secs=20),
            tk("5", "paddle", B0 + 5, secs=20),
            tk("6", "late", B0 + 6, secs=20),
        ]
    )
    assert agg.billable == {("leg", B0, "sandbox_compute_sandbox_4gb"): [20, 1]}
    assert agg.unbilled == {
        ("nobody", B0, "unknown_org"): [1, 20480],
        ("free", B0, "free_plan"): [1, 20480],
        ("leg", B0, "legacy_unknown_tier"): [1, 40960],
        ("paddle", B0, "provider_paddle"): [1, 20480],
        ("late", B0, "unknown_org"): [1, 20480],
    }


def test_zombie_rule_is_the_closers() -> None:
    """The zombie case table that also runs through the closer's SQL form (tests/zombie_cases.py), priced."""
    assert ZOMBIE_B0 == B0
    pricer = Pricer({"o": [pol("o", 0)]}, MIGRATION_INTERVALS, H)
    for name, (sandbox, worker, ts_ms, secs, zombie) in MIGRATION.items():
        assert pricer.is_zombie(sandbox, worker, ts_ms, secs) is zombie, name
    ticks = [tk(n, "o", ts // 1000, secs=secs, sandbox=sb, worker=w) for n, (sb, w, ts, secs, _) in MIGRATION.items()]
    agg = pricer.price(ticks)
    assert agg.unbilled[("o", B0, "zombie")] == [3, 3 * 20480]
    assert agg.billable[("o", B0, UNIFIED_METER)] == [6 * 20480, 6]
    assert agg.billable[("o", B0 - H, UNIFIED_METER)] == [20480, 1]


def test_pricing_is_additive_so_given_up_ticks_can_be_subtracted() -> None:
    pricer = Pricer({"o": [pol("o", 0), pol("o", B0 + 100, mode="legacy")]}, [], H)
    a = [tk(f"t{i}", "o", B0 + i * 7, mb=1024 * (1 + i % 5), secs=3 + i % 4) for i in range(300)]
    part = a[::3]
    whole = pricer.price(a)
    whole.merge(pricer.price(part), sign=-1)
    rest = pricer.price([t for t in a if t not in part])
    nonzero = {k: v for k, v in whole.billable.items() if v != [0, 0]}
    assert nonzero == rest.billable
    assert {k: v for k, v in whole.unbilled.items() if v != [0, 0]} == rest.unbilled


def test_window_and_scopes() -> None:
    spec = ReplaySpec("t", since_ms=(B0 + 1800) * 1000, until_ms=(B0 + 3 * H + 10) * 1000)
    assert spec.window_ms(H) == ((B0 + 1800) * 1000, (B0 + 3 * H + 10) * 1000)
    counts = ScanCounts(min_ts=(B0 + 1800) * 1000, max_ts=(B0 + 3 * H + 5) * 1000)
    # Compared: only buckets wholly inside [since, until): B0+H and B0+2H.
    assert _compared_buckets(spec, counts, H) == (B0 + H, B0 + 2 * H)
    assert _id_scope(*spec.window_ms(H), counts, H) == (B0, B0 + 3 * H)
    # Bucket bounds are inclusive bucket starts; any time inside a bucket means that bucket.
    spec = ReplaySpec("t", bucket_from=B0 + 10, bucket_to=B0 + H + 5)
    assert spec.window_ms(H) == (B0 * 1000, (B0 + 2 * H) * 1000)
    assert _compared_buckets(spec, ScanCounts(), H) == (B0, B0 + H)
    # Open sides: the span of the ticks read; nothing read and no bound: nothing to compare.
    assert _compared_buckets(ReplaySpec("t"), counts, H) == (B0, B0 + 3 * H)
    assert _compared_buckets(ReplaySpec("t"), ScanCounts(), H) is None
    assert _id_scope(*ReplaySpec("t").window_ms(H), ScanCounts(), H) == (None, None)
    # An until on a bucket boundary keeps the bucket that ends there.
    spec = ReplaySpec("t", until_ms=(B0 + H) * 1000)
    assert _compared_buckets(spec, counts, H) == (B0, B0)


def test_slices_cover_each_partition_exactly_once() -> None:
    ranges = [PartitionRange(0, 10, 17, 0, 17), PartitionRange(1, 0, 1, 0, 1), PartitionRange(2, 5, 5, 0, 5)]
    jobs = _slices(ranges, 3)
    covered: dict[int, list[int]] = {}
    for job in jobs:
        for r in job:
            covered.setdefault(r.partition, []).extend(range(r.start, r.end))
    assert covered == {0: list(range(10, 17)), 1: [0]}
    assert [(r.start, r.end) for r in jobs[0] if r.partition == 0] == [(10, 12)]
    assert ranges[1].whole and not ranges[0].whole


def test_partition_offsets_option() -> None:
    assert _partition_offsets(("3:100", "7", "0:0"), "--from-offset") == {3: 100, None: 7, 0: 0}
    with pytest.raises(click.BadParameter):
        _partition_offsets(("a:b",), "--from-offset")


def _report(keys: list[KeyDiff], missing: list[str] = (), extra: list[str] = ()) -> ReplayReport:  # type: ignore[assignment]
    return ReplayReport(
        topic="usage-ticks",
        bucket_seconds=H,
        ranges=[PartitionRange(0, 0, 10, 0, 10)],
        complete=True,
        window_ms=(None, None),
        compared_buckets=(B0, B0 + H),
        counts={
            "records": 10,
            "ticks_read": 12,
            "selected": 12,
            "unique": 11,
            "duplicates": 1,
            "rejected": 1,
            "ignored_type": 0,
            "missing_from_ledger": len(missing),
            "extra_in_ledger": len(extra),
            "compared_keys": 2,
            "differing_keys": sum(1 for k in keys if k.diff_units),
        },
        rejected={"not_json": 1},
        unbilled={"zombie": [1, 20480]},
        keys=keys,
        org_meters=[OrgMeterDiff("o", UNIFIED_METER, 3072, 2048, 0, Decimal("2"))],
        missing_ids=list(missing),
        extra_ids=list(extra),
        jobs=1,
        seconds=0.1,
        now_ms=B0 * 1000,
    )


def test_report_differences_explanations_and_rendering() -> None:
    explained = KeyDiff("o", B0, UNIFIED_METER, 3072, 2048, 0, 1024, True)
    assert (explained.diff_units, explained.explained) == (1024, True)
    # Samples deleted after billing: the ledger billed them, they look missing; applying would bill twice.
    billed_twice = KeyDiff("o", B0 + H, UNIFIED_METER, 3072, 3072, 0, 1024, True)
    assert (billed_twice.diff_units, billed_twice.explained) == (0, False)
    edge = KeyDiff("o", B0 + 2 * H, UNIFIED_METER, 1024, 0, 0, 1024, False)
    assert (edge.diff_units, edge.explained) == (0, True)
    rep = _report([explained], missing=["t1"])
    assert not rep.clean and rep.differing_keys == [explained]
    wire = rep.to_wire()
    assert wire["differences"][0]["diff"] == "1" and wire["differences"][0]["derived"] == "3"
    assert wire["org_meters"][0]["value_diff"] == "1" and not wire["org_meters"][0]["units_agree"]
    text = "\n".join(render_table(rep))
    assert "DIFFERENCES: 1 missing tick(s)" in text and "t1" in text and "not_json=1" in text
    assert _report([]).clean and "no difference" in render_table(_report([]))


def test_apply_refuses_expired_buckets_and_unexplained_differences() -> None:
    now_ms = (B0 + 40 * 86400) * 1000
    old = SourcedTick(tk("old", "o", B0 + 10), 0, 1)
    fresh = SourcedTick(tk("new", "o", B0 + 39 * 86400), 0, 2)
    ok = ReplayResult(_report([], missing=["new"]), [fresh])
    assert apply_problems(ok, now_ms=now_ms) == []
    expired = ReplayResult(_report([], missing=["old", "new"]), [old, fresh])
    (problem,) = apply_problems(expired, now_ms=now_ms)
    assert "1 missing tick(s)" in problem and "35-day" in problem
    twice = KeyDiff("o", B0 + 39 * 86400 // H * H, UNIFIED_METER, 3072, 3072, 0, 1024, True)
    (problem,) = apply_problems(ReplayResult(_report([twice], missing=["new"]), [fresh]), now_ms=now_ms)
    assert "could bill twice" in problem


def test_aggregates_merge() -> None:
    a = Aggregates({("o", 1, "m"): [5, 1]}, {})
    a.merge(Aggregates({("o", 1, "m"): [2, 1], ("p", 1, "m"): [1, 1]}, {("o", 1, "zombie"): [1, 9]}))
    assert a.billable == {("o", 1, "m"): [7, 2], ("p", 1, "m"): [1, 1]} and a.unbilled == {("o", 1, "zombie"): [1, 9]}


def test_a_key_holding_unaggregated_ticks_is_pending_close_and_never_clean() -> None:
    # KeyDiff(org, bucket, meter, derived, billed, open, missing, compared)
    pending = KeyDiff("o", B0, UNIFIED_METER, 3072, 2048, 1024, 0, True)
    assert (pending.label, pending.difference, pending.pending_units, pending.diff_units) == (
        "pending_close",
        "ok",
        1024,
        0,
    )
    # Whatever else the key shows, its unaggregated units make it pending close; its difference says the rest.
    under = KeyDiff("o", B0, UNIFIED_METER, 4096, 2048, 1024, 0, True)
    assert (under.label, under.difference, under.diff_units) == ("pending_close", "under-billed", 1024)
    with_missing = KeyDiff("o", B0, UNIFIED_METER, 4096, 2048, 1024, 1024, True)
    assert (with_missing.label, with_missing.difference, with_missing.explained) == ("pending_close", "missing", True)
    # Outside the compared buckets nothing is pending (units are not compared there).
    assert KeyDiff("o", B0, UNIFIED_METER, 0, 0, 1024, 0, False).pending_units == 0
    assert KeyDiff("o", B0, UNIFIED_METER, 2048, 2048, 0, 0, True).label == "ok"

    rep = _report([pending])
    assert rep.pending_keys == [pending] and not rep.has_differences and not rep.clean
    assert rep.exit_code == EXIT_PENDING_CLOSE == 4
    wire = rep.to_wire()
    assert not wire["clean"] and "closer" in wire["pending_close_note"]
    (d,) = wire["differences"]
    assert (d["label"], d["difference_label"], d["pending_close_units"], d["pending_close"]) == (
        "pending_close",
        "ok",
        1024,
        "1",
    )
    text = "\n".join(render_table(rep))
    assert "pending_close" in text and "PENDING CLOSE: 1 (org, bucket, meter)" in text and "no difference" not in text
    # A real difference wins the exit code, in another key or in the same one.
    assert _report([pending], missing=["t1"]).exit_code == EXIT_DIFFERENCES
    assert _report([under]).exit_code == EXIT_DIFFERENCES
    assert "pending_close, under-billed" in "\n".join(render_table(_report([under])))
    assert _report([]).exit_code == EXIT_CLEAN and _report([]).to_wire()["pending_close_note"] is None
    # --apply writes no correction for a key pending close, even one that also differs.
    over = KeyDiff("o", B0 + H, UNIFIED_METER, 1024, 4096, 0, 0, True)
    assert repairable(ReplayResult(_report([pending, under, over]), [])) == [over]
