"""Parity math (models.parity): clipping, drift, status, the alert rule, signing; the simulator's cell side."""

from __future__ import annotations

import itertools
from decimal import Decimal
from fractions import Fraction

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from infra.devkit.simulator import (
    FleetSpec,
    build_fleet,
    encode_scale_messages,
    inject_drift,
    pick_drift_specs,
    scale_rows,
    truth_of,
)
from models.parity import (
    AlertRule,
    Interval,
    ParityStatus,
    ScaleEvent,
    alert_episodes,
    boundary_slack_mb_ms,
    bucket_verdict,
    classify,
    clean_streak,
    clip_ms,
    dashboard_token,
    drift_ratio,
    edge_gb_seconds,
    gb_seconds_of_mb_ms,
    measure_intervals,
    parse_scale_event,
    ratio_decimal,
    sign_request,
    verify_dashboard_token,
    verify_request,
)

H = 3600
T0 = 1_790_000_000 // H * H  # a bucket start
GB = 1024  # MB
TOL = Fraction(2, 100)


def mb_ms(gb_s: float) -> int:
    """GB-s -> MB-ms."""
    return int(gb_s * 1024 * 1000)


# ------------------------------------------------------------------------------ clipping


def test_clip_counts_open_rows_up_to_now_and_clips_closed_rows_to_the_span() -> None:
    s, e = T0 * 1000, (T0 + H) * 1000
    # open row: up to now, never past the span end
    assert clip_ms(s - 10_000, None, s + 60_000, s, e) == 60_000
    assert clip_ms(s - 10_000, None, e + 99_000, s, e) == H * 1000
    # a closed row ending after the window is clipped to it (the replaced checker counted it to its end)
    assert clip_ms(s + 1000, e + 500_000, e + 600_000, s, e) == H * 1000 - 1000
    # outside the span, or an open row that starts after now: nothing
    assert clip_ms(e, e + 5000, e + 9000, s, e) == 0
    assert clip_ms(s - 9000, s, e, s, e) == 0
    assert clip_ms(s + 5000, None, s + 1000, s, e) == 0


def test_cell_measure_splits_an_interval_over_buckets_exactly() -> None:
    iv = Interval("o", "sb", 3000, T0 * 1000 + 1500, (T0 + 2 * H) * 1000 + 250)
    spans = [(T0 + i * H, T0 + (i + 1) * H) for i in range(3)]
    got = measure_intervals([iv], spans, now_ms=(T0 + 10 * H) * 1000, slack_ms=0)
    assert {k: m.cell_mb_ms for k, m in got.items()} == {
        ("o", T0): 3000 * (H * 1000 - 1500),
        ("o", T0 + H): 3000 * H * 1000,
        ("o", T0 + 2 * H): 3000 * 250,
    }
    total = sum(m.cell_mb_ms for m in got.values())
    assert total == 3000 * ((2 * H) * 1000 + 250 - 1500)
    assert gb_seconds_of_mb_ms(3000 * 1000) == Decimal(3000) / 1024  # exact


def test_boundary_slack_only_for_intervals_near_a_boundary() -> None:
    s, e = T0 * 1000, (T0 + H) * 1000
    inside = Interval("o", "a", 4096, s + 600_000, s + 1_200_000)
    across = Interval("o", "b", 4096, s - 600_000, e + 600_000)
    ends_near = Interval("o", "c", 1024, s + 100_000, e - 20_000)
    assert boundary_slack_mb_ms(inside, e, s, e, 40_000) == 0
    assert boundary_slack_mb_ms(across, e, s, e, 40_000) == 4096 * 40_000
    assert boundary_slack_mb_ms(ends_near, e, s, e, 40_000) == 1024 * 40_000
    assert boundary_slack_mb_ms(across, e, s, e, 0) == 0


# ------------------------------------------------------------------------------ drift and status


def test_drift_is_exact_and_100_percent_when_only_the_cell_side_is_near_zero() -> None:
    assert drift_ratio(mb_ms(110), mb_ms(100)) == Fraction(1, 10)
    assert drift_ratio(mb_ms(90), mb_ms(100)) == Fraction(-1, 10)
    assert drift_ratio(0, 0) == 0
    assert drift_ratio(mb_ms(5), 0) == 1  # cell ~0, edge not: +100 %
    assert drift_ratio(1, 1) == 0  # both below 1e-6 GB-s
    assert ratio_decimal(Fraction(1, 3)) == Decimal("0.333333")


@pytest.mark.parametrize(
    ("edge", "cell", "slack", "status"),
    [
        (mb_ms(101), mb_ms(100), 0, ParityStatus.OK),  # 1 % < 2 %
        (mb_ms(103), mb_ms(100), 0, ParityStatus.DRIFT),
        (mb_ms(97), mb_ms(100), 0, ParityStatus.DRIFT),
        (mb_ms(10), 0, 0, ParityStatus.EDGE_ONLY),
        (0, mb_ms(10), 0, ParityStatus.CELL_ONLY),
        (0, 0, 0, ParityStatus.OK),
        # a sandbox that started 15 s before the boundary: cell 15 s, edge 0; one tick of slack covers it
        (0, 4096 * 15_000, 4096 * 40_000, ParityStatus.OK),
        # ... but not a whole missing minute
        (0, 4096 * 60_000, 4096 * 40_000, ParityStatus.CELL_ONLY),
        # slack never hides a real drift on a large org: 10 % of 100 GB-h is far above one tick
        (mb_ms(396_000), mb_ms(360_000), 4096 * 40_000, ParityStatus.DRIFT),
    ],
)
def test_status(edge: int, cell: int, slack: int, status: ParityStatus) -> None:
    assert classify(edge, cell, slack, TOL)[1] is status


def test_gb_seconds_are_exact_decimals() -> None:
    assert edge_gb_seconds(3000 * 19) == Decimal("55.6640625")
    assert gb_seconds_of_mb_ms(1) == Decimal("9.765625E-7")


# ------------------------------------------------------------------------------ the wire model


def _ev(**kw: object) -> bytes:
    base: dict[str, object] = {
        "id": "row-1",
        "sandbox_id": "sb_1",
        "org_id": "org_1",
        "cell_id": "eu-1",
        "worker_id": "w-3",
        "memory_mb": 4096,
        "cpu_percent": 200,
        "disk_mb": 20480,
        "started_at": "2026-06-15T23:00:12.250Z",
        "ended_at": None,
    }
    base.update(kw)
    return orjson.dumps({k: v for k, v in base.items() if v is not ...})


def test_scale_event_parses_rfc3339_and_unix_seconds() -> None:
    ev = parse_scale_event(_ev())
    assert isinstance(ev, ScaleEvent) and ev.open and ev.started_ms == 1781564412250
    closed = parse_scale_event(_ev(started_at=1781564412, ended_at="2026-06-15T23:10:00+00:00"))
    assert isinstance(closed, ScaleEvent) and not closed.open
    assert (closed.started_ms, closed.ended_ms) == (1781564412000, 1781564400000 + 600_000)
    again = parse_scale_event(closed.to_json())
    assert again == closed
    assert isinstance(parse_scale_event(_ev(worker_id=None, cell_id=..., extra="x")), ScaleEvent)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "empty_record"),
        (b"{nope", "not_json"),
        (b"[1,2]", "not_an_object"),
        (_ev(id=...), "missing_id"),
        (_ev(org_id=""), "missing_org_id"),
        (_ev(sandbox_id=None), "missing_sandbox_id"),
        (_ev(memory_mb=...), "missing_memory_mb"),
        (_ev(memory_mb=-1), "bad_memory_mb"),
        (_ev(memory_mb="4096"), "bad_memory_mb"),
        (_ev(memory_mb=1.5), "bad_memory_mb"),
        (_ev(started_at="yesterday"), "bad_started_at"),
        (_ev(started_at="2026-06-15T23:00:12"), "bad_started_at"),  # no offset
        (_ev(ended_at="2026-06-15T22:00:00Z"), "ended_at_before_started_at"),
    ],
)
def test_bad_scale_events_have_a_reason(raw: bytes, reason: str) -> None:
    assert parse_scale_event(raw) == reason


# ------------------------------------------------------------------------------ alerts and the gate

RULE = AlertRule()


def _rows(*drifts: float, gb: float = 200.0) -> list[tuple[str, int, int]]:
    return [(f"o{i}", mb_ms(gb * (1 + d)), mb_ms(gb)) for i, d in enumerate(drifts)]


def test_systemic_needs_three_big_orgs_or_a_big_aggregate() -> None:
    assert bucket_verdict(T0, _rows(0.2, -0.3, 0.15), RULE).systemic
    assert bucket_verdict(T0, _rows(0.2, -0.3, 0.15), RULE).orgs_over == ("o1", "o0", "o2")
    assert not bucket_verdict(T0, _rows(0.2, -0.3, 0.05), RULE).systemic  # two orgs; aggregate -1.7 %
    assert not bucket_verdict(T0, _rows(0.5, 0.5, 0.5, gb=50), RULE).systemic  # small orgs, aggregate 150
    assert bucket_verdict(T0, _rows(0.5, 0.5, 0.5, gb=120), RULE).systemic
    assert bucket_verdict(T0, _rows(0.6, 0, 0, 0, 0, gb=100), RULE).systemic  # aggregate 560 GB-s, +12 %
    assert not bucket_verdict(T0, _rows(0.5, 0, 0, 0, 0, gb=100), RULE).systemic  # exactly +10 %: not over
    # a dead cell feed (cell 0 everywhere) alerts on the aggregate even with one org
    # (the replaced rule required the cell aggregate >= 300)
    assert bucket_verdict(T0, [("o", mb_ms(400), 0)], RULE).systemic


def test_an_alert_needs_consecutive_systemic_buckets_and_fires_once_per_episode() -> None:
    bad = _rows(0.2, 0.2, 0.2)
    good = _rows(0, 0, 0)
    v = [bucket_verdict(T0 + i * H, rows, RULE) for i, rows in enumerate([bad, good, bad, bad, bad, good, bad])]
    eps = alert_episodes(v, H, RULE.consecutive)
    assert [(e.first_bucket, e.fired_at_bucket) for e in eps] == [(T0 + 2 * H, T0 + 3 * H)]
    assert eps[0].key == f"billing_drift:{T0 + 2 * H}"
    # not adjacent (a bucket missing in between) is not consecutive
    gap = [bucket_verdict(T0, bad, RULE), bucket_verdict(T0 + 2 * H, bad, RULE)]
    assert alert_episodes(gap, H, 2) == []
    assert len(alert_episodes(gap, H, 1)) == 2


def test_the_gate_counts_evidence_not_silence() -> None:
    # Two settled buckets, only one with usage on both sides: one clean hour, not two.
    assert clean_streak([], T0, T0 + H, H, evidence=[T0 + H]) == 1
    # Quiet buckets neither count nor break the streak; a flagged bucket breaks it.
    assert clean_streak([], T0, T0 + 9 * H, H, evidence=[T0, T0 + 4 * H, T0 + 9 * H]) == 3
    assert clean_streak([T0 + 4 * H], T0, T0 + 9 * H, H, evidence=[T0, T0 + 4 * H, T0 + 9 * H]) == 1
    assert clean_streak([], T0, T0 + 9 * H, H, evidence=[]) == 0
    assert clean_streak([], T0, T0 + 9 * H, H, evidence=[T0 + 20 * H]) == 0  # not settled yet


def test_clean_streak_counts_back_to_the_last_flagged_bucket_or_the_first_data() -> None:
    assert clean_streak([], T0, T0 + 9 * H, H) == 10
    assert clean_streak([T0 + 4 * H], T0, T0 + 9 * H, H) == 5
    assert clean_streak([T0 + 9 * H], T0, T0 + 9 * H, H) == 0
    assert clean_streak([T0 + 20 * H], T0, T0 + 9 * H, H) == 10  # flagged but not settled yet
    assert clean_streak([], None, T0, H) == 0
    assert clean_streak([], T0, None, H) == 0


# ------------------------------------------------------------------------------ signing

SECRET = b"s3cret"


def test_signed_requests() -> None:
    path = "/internal/usage-parity?from=1&to=2"
    now = 1_790_000_000
    sig = sign_request(SECRET, now, path)
    assert verify_request(SECRET, str(now), sig, path, now) is None
    assert verify_request(SECRET, str(now - 299), sign_request(SECRET, now - 299, path), path, now) is None
    assert verify_request(SECRET, None, None, path, now) == "unsigned"
    assert verify_request(SECRET, str(now), None, path, now) == "unsigned"
    assert verify_request(SECRET, str(now - 301), sign_request(SECRET, now - 301, path), path, now) == "stale"
    assert verify_request(SECRET, str(now + 301), sign_request(SECRET, now + 301, path), path, now) == "stale"
    assert verify_request(SECRET, str(now), sign_request(b"other", now, path), path, now) == "bad_signature"
    assert verify_request(SECRET, str(now), sig, path.replace("to=2", "to=3"), now) == "bad_signature"
    assert verify_request(SECRET, "abc", sig, path, now) == "bad_timestamp"


def test_dashboard_tokens_expire_and_cannot_be_forged() -> None:
    tok = dashboard_token(SECRET, 2000)
    assert verify_dashboard_token(SECRET, tok, 1999)
    assert verify_dashboard_token(SECRET, tok, 2000)
    assert not verify_dashboard_token(SECRET, tok, 2001)
    assert not verify_dashboard_token(b"x", tok, 1000)
    assert not verify_dashboard_token(SECRET, tok.replace("2000.", "9999."), 1000)
    assert not verify_dashboard_token(SECRET, None, 1000)
    assert not verify_dashboard_token(SECRET, "garbage", 1000)


@pytest.mark.parametrize(
    ("ts", "sig", "reason"),
    [
        ("²", "ab", "bad_timestamp"),  # isdigit() but not int()
        ("١٧٩٠٠٠٠٠٠٠", "ab", "bad_timestamp"),  # Arabic-Indic digits: int() would read them
        ("1790000000", "é", "bad_signature"),  # compare_digest refuses non-ASCII text
        ("1790000000", "\udcff\udcfe", "bad_signature"),  # non-UTF-8 bytes, surrogate-escaped by the server
    ],
)
def test_odd_signature_headers_are_refused_not_raised(ts: str, sig: str, reason: str) -> None:
    assert verify_request(SECRET, ts, sig, "/internal/usage-parity?from=1&to=2", 1_790_000_000) == reason


def test_odd_paths_and_tokens_never_raise() -> None:
    now = 1_790_000_000
    odd_path = "/internal/usage-parity?x=\udcff"  # a target with a byte that is not UTF-8
    sig = sign_request(SECRET, now, odd_path)
    assert verify_request(SECRET, str(now), sig, odd_path, now) is None
    assert verify_request(SECRET, str(now), sig, "/internal/usage-parity?x=\ud800", now) == "bad_signature"
    for token in ("é.é", "²9.ab", "١٢.ab", "-5.ab", "9" * 5000 + ".ab", ".", "\udcff.ab"):
        assert not verify_dashboard_token(SECRET, token, 1000)


@given(st.text(), st.text(), st.text(), st.integers(0, 2**40))
def test_verify_never_raises(ts: str, sig: str, path: str, now: int) -> None:
    assert verify_request(SECRET, ts, sig, path, now) is not None or sig == sign_request(SECRET, ts.strip(), path)
    verify_dashboard_token(SECRET, sig, now)


# ------------------------------------------------------------------------------ the simulator, end to end in memory


def _parity(fleet_ticks: list, rows: list, spec: FleetSpec, slack_s: int) -> dict[tuple[str, int], ParityStatus]:  # type: ignore[type-arg]
    """Both sides with the models' math only, the way sinks.parity combines them (no database)."""
    size = spec.bucket_seconds
    spans = [(spec.start + i * size, spec.start + (i + 1) * size) for i in range(-1, spec.hours + 1)]
    cell = measure_intervals(
        [Interval(r.org_id, r.sandbox_id, r.memory_mb, r.started_ms, r.ended_ms) for r in rows],
        spans,
        now_ms=(spec.start + 100 * size) * 1000,
        slack_ms=slack_s * 1000,
    )
    edge: dict[tuple[str, int], int] = {}
    for t in fleet_ticks:
        k = (t.org_id, t.ts_ms // 1000 // size * size)
        edge[k] = edge.get(k, 0) + t.memory_mb * t.interval_s * 1000
    out = {}
    for k in set(edge) | set(cell):
        c = cell.get(k)
        out[k] = classify(edge.get(k, 0), c.cell_mb_ms if c else 0, c.slack_mb_ms if c else 0, TOL)[1]
    return out


SPEC = FleetSpec(orgs=24, hours=4, start=T0, seed=7)


def test_clean_fleet_is_clean_for_every_org_and_bucket_and_the_strict_rule_is_not() -> None:
    fleet = build_fleet(SPEC)
    rows = fleet.scale_rows()
    got = _parity(fleet.ticks, rows, SPEC, slack_s=40)
    assert got and all(s is ParityStatus.OK for s in got.values())
    # Without the boundary slack (the strict rule) a sandbox starting or resizing near a boundary is flagged.
    strict_rule = _parity(fleet.ticks, rows, SPEC, slack_s=0)
    assert any(s is not ParityStatus.OK for s in strict_rule.values())


def test_scale_rows_match_the_ticks_exactly_over_each_row() -> None:
    fleet = build_fleet(FleetSpec(orgs=6, hours=3, start=T0, seed=3))
    rows = scale_rows(fleet.ticks)
    for r in rows:
        assert r.ended_ms is not None
        secs = sum(
            t.interval_s
            for t in fleet.ticks
            if t.sandbox_id == r.sandbox_id and r.started_ms < t.ts_ms // 1000 * 1000 <= r.ended_ms
        )
        assert secs * 1000 == r.ended_ms - r.started_ms
    # a resize closes a row and opens the next one where it ends
    by_sb: dict[str, list] = {}  # type: ignore[type-arg]
    for r in rows:
        by_sb.setdefault(r.sandbox_id, []).append(r)
    for rs in by_sb.values():
        for a, b in itertools.pairwise(rs):
            assert a.ended_ms == b.started_ms and a.memory_mb != b.memory_mb


def test_scale_messages_are_cdc_like() -> None:
    fleet = build_fleet(FleetSpec(orgs=4, hours=2, start=T0, seed=5))
    rows = fleet.scale_rows()
    msgs = encode_scale_messages(rows, seed=5, repeat_rate=0.5)
    parsed = [parse_scale_event(v) for _, v in msgs]
    assert all(isinstance(p, ScaleEvent) for p in parsed)
    closed_ids = {p.id for p in parsed if isinstance(p, ScaleEvent) and not p.open}
    assert closed_ids == {r.id for r in rows}
    assert len(msgs) > 2 * len(rows)  # repeats
    # some stale "open" versions come after the close of the same row
    seen_closed: set[str] = set()
    stale = 0
    for p in parsed:
        assert isinstance(p, ScaleEvent)
        if p.open and p.id in seen_closed:
            stale += 1
        if not p.open:
            seen_closed.add(p.id)
    assert stale > 0
    assert all(k == orjson.loads(v)["sandbox_id"].encode() for k, v in msgs)


@pytest.mark.parametrize("kind", ["missing", "zombie", "skew"])
def test_each_drift_kind_is_flagged_for_exactly_the_affected_orgs_and_buckets(kind: str) -> None:
    fleet = build_fleet(SPEC)
    (spec,) = pick_drift_specs(fleet, [kind], seed=3)
    case = inject_drift(fleet, [spec])
    got = _parity(case.ticks, fleet.scale_rows(), SPEC, slack_s=40)
    flagged = {k for k, s in got.items() if s is not ParityStatus.OK}
    assert flagged == case.affected
    assert {org for org, _ in case.affected} == {spec.org_id}
    expected = {
        "missing": {spec.bucket_start},
        "zombie": {spec.bucket_start},
        "skew": {spec.bucket_start - SPEC.bucket_seconds, spec.bucket_start},
    }[kind]
    assert {b for _, b in case.affected} == expected
    if kind == "skew":  # usage moved, none lost: the billed total is unchanged
        assert truth_of(fleet.orgs, case.ticks).org_gb_seconds == fleet.truth.org_gb_seconds


def test_injections_too_small_to_see_are_refused() -> None:
    fleet = build_fleet(SPEC)
    (spec,) = pick_drift_specs(fleet, ["skew"], seed=3)
    from dataclasses import replace

    with pytest.raises(ValueError, match="too small"):
        inject_drift(fleet, [replace(spec, skew_seconds=5)])
