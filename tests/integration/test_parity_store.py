"""The parity store on SQLite and PostgreSQL: cell intervals, the parity table, late data, alerts, the gate."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import pytest

from infra.devkit.simulator import FleetSpec, SimScaleRow, SimTick, build_fleet, inject_drift, pick_drift_specs
from models.parity import AlertRule, ParityStatus, ScaleEvent
from models.policy import OrgPolicy
from models.ticks import Tick
from models.watermark import last_closable_bucket
from sinks.ledger import CloseConfig, Ledger, SourcedTick
from sinks.parity import ParityConfig, ParityStore, RefreshState, SourcedScaleEvent
from sinks.schema import make_engine, migrate

pytestmark = pytest.mark.integration

H = 3600
TICKS, POLICY, SCALE = "usage-ticks", "org-policy", "sandbox-scale-events"


class Clock:
    def __init__(self, ms: int) -> None:
        self.ms = ms

    def __call__(self) -> int:
        return self.ms


@dataclass
class Env:
    ledger: Ledger
    store: ParityStore
    clock: Clock
    cfg: ParityConfig
    offsets: dict[str, int]

    def policies(self, orgs: list[tuple[str, str]], effective_s: int) -> None:
        pols = [
            (OrgPolicy.model_validate({"org_id": o, "plan": plan, "effective_at": effective_s}), 0, i)
            for i, (o, plan) in enumerate(orgs, start=self.offsets[POLICY] + 1)
        ]
        self.offsets[POLICY] += len(pols)
        self.ledger.write_policies(POLICY, pols, {0: (self.offsets[POLICY], None)}, {})

    def ticks(self, ticks: list[SimTick]) -> None:
        st = []
        for t in ticks:
            self.offsets[TICKS] += 1
            tick = Tick(t.id, t.org_id, t.sandbox_id, t.worker_id, "sim-1", t.memory_mb, 1, t.interval_s, t.ts_ms)
            st.append(SourcedTick(tick, 0, self.offsets[TICKS]))
        self.ledger.write_ticks(
            TICKS, st, bucket_seconds=H, progress={0: (self.offsets[TICKS], max(t.ts_ms for t in ticks))}
        )

    def scale(self, rows: list[SimScaleRow], *, closed: bool = True) -> None:
        evs = []
        for r in rows:
            self.offsets[SCALE] += 1
            evs.append(SourcedScaleEvent(ScaleEvent.model_validate(r.record(closed=closed)), 0, self.offsets[SCALE]))
        self.store.write_scale_events(SCALE, evs, {0: self.offsets[SCALE]}, {"scale.read": len(evs)})

    def caught_up(self) -> None:
        for topic in (TICKS, POLICY, SCALE):
            self.ledger.report_highwaters(topic, {0: self.offsets[topic] + 1}, "test")

    def statuses(self) -> dict[tuple[str, int], ParityStatus]:
        return {(r.org_id, r.bucket_start): r.status for r in self.store.rows(0, 2**40)}


SPEC = FleetSpec(orgs=10, hours=3, start=1_790_000_000 // H * H, seed=21, free_orgs=2)
NOW_MS = (SPEC.start + 6 * H) * 1000


def _cfg() -> ParityConfig:
    return ParityConfig(
        bucket_seconds=H,
        grace_seconds=600,
        tolerance=Fraction(2, 100),
        slack_seconds=40,
        lookback_seconds=48 * H,
        rule=AlertRule(),
        stale_after_ms=15_000,
        ticks_topic=TICKS,
        required={TICKS: 1, POLICY: 1, SCALE: 1},
        event_time_topics=frozenset({TICKS}),
    )


@pytest.fixture
def env(db_url: str) -> Iterator[Env]:
    engine = make_engine(db_url)
    migrate(engine)
    clock = Clock(NOW_MS)
    cfg = _cfg()
    try:
        yield Env(
            Ledger(engine, clock=clock),
            ParityStore(engine, bucket_seconds=H, clock=clock),
            clock,
            cfg,
            {TICKS: -1, POLICY: -1, SCALE: -1},
        )
    finally:
        engine.dispose()


def _load(env: Env, ticks: list[SimTick], rows: list[SimScaleRow], orgs: list[tuple[str, str]]) -> None:
    env.policies(orgs, SPEC.start - 86_400)
    env.ticks(ticks)
    env.scale(rows)
    env.caught_up()


def test_republished_open_row_never_reopens_a_closed_one(env: Env) -> None:
    row = SimScaleRow("r1", "sb", "o1", "w-1", 4096, SPEC.start * 1000, (SPEC.start + 600) * 1000)
    open_ev = ScaleEvent.model_validate(row.record(closed=False))
    closed_ev = ScaleEvent.model_validate(row.record(closed=True))
    # in one batch, open after closed (a stale CDC repeat): the closed version wins
    r = env.store.write_scale_events(
        SCALE, [SourcedScaleEvent(closed_ev, 0, 1), SourcedScaleEvent(open_ev, 0, 2)], {0: 2}
    )
    assert r.reopen_ignored == 1
    # in a later batch, again
    r = env.store.write_scale_events(SCALE, [SourcedScaleEvent(open_ev, 0, 3)], {0: 3})
    assert (r.upserted, r.reopen_ignored) == (0, 1)
    (iv,) = env.store.intervals()
    assert (iv["ended_ms"], iv["worker_id"], iv["src_offset"]) == ((SPEC.start + 600) * 1000, "w-1", 1)
    # open first, then the close: the close applies
    row2 = SimScaleRow("r2", "sb", "o1", "w-1", 1024, (SPEC.start + 600) * 1000, (SPEC.start + 900) * 1000)
    env.store.write_scale_events(
        SCALE, [SourcedScaleEvent(ScaleEvent.model_validate(row2.record(closed=False)), 0, 4)], {0: 4}
    )
    assert [i["ended_ms"] for i in env.store.intervals()] == [(SPEC.start + 600) * 1000, None]
    env.store.write_scale_events(
        SCALE, [SourcedScaleEvent(ScaleEvent.model_validate(row2.record(closed=True)), 1, 0)], {1: 0}
    )
    assert [i["ended_ms"] for i in env.store.intervals()] == [(SPEC.start + 600) * 1000, (SPEC.start + 900) * 1000]
    states = {(p.topic, p.partition): p.committed_offset for p in env.ledger.partition_states()}
    assert states == {(SCALE, 0): 4, (SCALE, 1): 0}
    assert env.ledger.counters()["scale.reopen_ignored"] == 2


def test_clean_fleet_is_clean_and_each_drift_kind_is_flagged_exactly(env: Env) -> None:
    fleet = build_fleet(SPEC)
    specs = pick_drift_specs(fleet, ["missing", "zombie", "skew"], seed=5)
    case = inject_drift(fleet, specs)
    drifted = {s.org_id for s in specs}
    orgs = [(o.org_id, o.plan) for o in fleet.orgs]
    # The clean orgs' ticks and every org's cell rows; the drifted orgs' edge side comes with the drift.
    _load(env, case.ticks, fleet.scale_rows(), orgs)
    state = RefreshState()
    result = env.store.refresh(state, env.cfg)
    got = env.statuses()
    pro = {o.org_id for o in fleet.orgs if o.plan == "pro"}
    assert {org for org, _ in got} == pro  # pro orgs only, every one of them
    flagged = {k for k, s in got.items() if s is not ParityStatus.OK}
    assert flagged == case.affected
    assert all(s is ParityStatus.OK for (org, _), s in got.items() if org not in drifted)
    assert result.rows == len(got) and result.flagged == len(flagged)
    assert result.watermark_ms == NOW_MS
    # every edge and cell figure equals the simulator's own
    sim_edge: dict[tuple[str, int], int] = {}
    for t in case.ticks:
        k = (t.org_id, t.ts_ms // 1000 // H * H)
        sim_edge[k] = sim_edge.get(k, 0) + t.memory_mb * t.interval_s
    for r in env.store.rows(0, 2**40):
        assert r.edge_mb_s == sim_edge.get((r.org_id, r.bucket_start), 0)
    # a second refresh changes nothing
    env.store.refresh(state, env.cfg)
    assert env.statuses() == got


def test_the_table_updates_as_late_data_arrives(env: Env) -> None:
    fleet = build_fleet(SPEC)
    (spec,) = pick_drift_specs(fleet, ["missing"], seed=9)
    case = inject_drift(fleet, [spec])
    _load(env, case.ticks, fleet.scale_rows(), [(o.org_id, o.plan) for o in fleet.orgs])
    state = RefreshState()
    env.store.refresh(state, env.cfg)
    key = (spec.org_id, spec.bucket_start)
    assert env.statuses()[key] is not ParityStatus.OK
    # the closer claims everything, then the missing ticks arrive late and are claimed before the next refresh
    cfg = CloseConfig(bucket_seconds=H, grace_seconds=600, shadow=True, bill_from=0)
    env.ledger.close(NOW_MS, cfg)
    env.store.refresh(state, env.cfg)  # nothing open any more: only the recent buckets are recomputed
    published = set(case.ticks)
    missing = [t for t in fleet.ticks if t not in published]
    env.ticks(missing)
    env.ledger.close(NOW_MS, cfg)
    assert env.ledger.open_samples() == 0
    result = env.store.refresh(state, env.cfg)
    assert spec.bucket_start in result.buckets  # found through the close cursor
    assert env.statuses()[key] is ParityStatus.OK
    # late cell data: a row the cell forgot, published late, marks its buckets dirty
    extra = SimScaleRow(
        "late", "sb_late", spec.org_id, "w-1", 65536, (SPEC.start + H) * 1000, (SPEC.start + 2 * H) * 1000
    )
    env.scale([extra])
    result = env.store.refresh(state, env.cfg)
    assert SPEC.start + H in result.buckets
    assert env.statuses()[(spec.org_id, SPEC.start + H)] is ParityStatus.DRIFT  # cell > edge now
    assert env.store.refresh(state, env.cfg).buckets == [(NOW_MS // 1000 // H - 1) * H, NOW_MS // 1000 // H * H]


def _edge_truth(ticks: list[SimTick], pro: set[str]) -> dict[tuple[str, int], tuple[int, int]]:
    out: dict[tuple[str, int], tuple[int, int]] = {}
    for t in ticks:
        if t.org_id in pro:
            key = (t.org_id, t.ts_ms // 1000 // H * H)
            n, mbs = out.get(key, (0, 0))
            out[key] = (n + 1, mbs + t.memory_mb * t.interval_s)
    return out


def test_the_edge_side_is_kept_incrementally_and_exactly(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """Edge sums are added once per sample (kept sums up to edge_upto_seq, live samples above it):
    after every mix of ingest, close runs, late samples, a crash in the middle of an advance and refreshes,
    each (org, bucket)'s edge GB-s and sample count equal a count made here from the ticks written, and
    the ticks' dedup holds (a re-sent batch changes nothing)."""
    fleet = build_fleet(SPEC)
    pro = {o.org_id for o in fleet.orgs if o.plan == "pro"}
    ticks = sorted(fleet.ticks, key=lambda t: t.ts_ms)
    env.policies([(o.org_id, o.plan) for o in fleet.orgs], SPEC.start - 86_400)
    env.scale(fleet.scale_rows())
    cfg = CloseConfig(bucket_seconds=H, grace_seconds=600, shadow=True, bill_from=0)
    state = RefreshState()
    # Late ticks: every 7th tick is held back and written after the others (after its bucket closed).
    late = ticks[::7]
    on_time = [t for t in ticks if t not in set(late)]
    written: list[SimTick] = []

    def edge_now() -> dict[tuple[str, int], tuple[int, int]]:
        return {(r.org_id, r.bucket_start): (r.samples, r.edge_mb_s) for r in env.store.rows(0, 2**40) if r.samples}

    chunks = [on_time[i : i + len(on_time) // 4 + 1] for i in range(0, len(on_time), len(on_time) // 4 + 1)]
    for i, chunk in enumerate([*chunks, late]):
        env.ticks(chunk)
        written += chunk
        if i == 1:
            env.ticks(chunk[:50])  # a redelivered batch: duplicates by id
        env.caught_up()
        env.ledger.close(NOW_MS, cfg)
        if i == 2:
            # A crash between adding the sums and storing edge_upto_seq: nothing of the advance survives.
            def boom(*a: object, **k: object) -> None:
                raise RuntimeError("crash inside the edge advance")

            monkeypatch.setattr(env.store, "_set_state", boom)
            with pytest.raises(RuntimeError):
                env.store.advance_edge()
            monkeypatch.undo()
        env.store.refresh(state, env.cfg)
        assert edge_now() == _edge_truth(written, pro), f"after step {i}"
        kept = env.store.state().get("edge_upto_seq", 0)
        assert kept > 0  # the kept sums are in use, not only the live samples
    # Samples that land after the advance and before the measuring read are counted live (above
    # edge_upto_seq, same statement as the kept sums), then kept once by the next advance.
    extra = [SimTick(f"x{i}", t.org_id, t.sandbox_id, 2048, 20, t.ts_ms) for i, t in enumerate(ticks[:40])]
    env.ticks(extra)
    written += extra
    kept = env.store.state()["edge_upto_seq"]
    monkeypatch.setattr(env.store, "advance_edge", lambda: kept)
    env.store.recompute_range(SPEC.start, SPEC.start + SPEC.hours * H, env.cfg)
    assert env.store.state()["edge_upto_seq"] == kept
    assert edge_now() == _edge_truth(written, pro)
    monkeypatch.undo()
    env.store.refresh(state, env.cfg)
    env.store.recompute_range(SPEC.start, SPEC.start + SPEC.hours * H, env.cfg)
    assert env.store.state()["edge_upto_seq"] > kept
    assert edge_now() == _edge_truth(written, pro)


def test_open_intervals_count_up_to_now_and_plan_changes_apply(env: Env) -> None:
    b = SPEC.start
    env.policies([("o1", "pro")], b - 86_400)
    row = SimScaleRow("r", "sb", "o1", "w-1", 2048, b * 1000, None)
    env.scale([row], closed=False)
    env.clock.ms = (b + 1800) * 1000
    env.caught_up()
    state = RefreshState()
    env.store.refresh(state, env.cfg)
    (r,) = env.store.rows(b, b + H)
    assert r.cell_mb_ms == 2048 * 1_800_000 and r.status is ParityStatus.CELL_ONLY
    env.clock.ms = (b + 3000) * 1000
    env.store.refresh(state, env.cfg)
    (r,) = env.store.rows(b, b + H)
    assert r.cell_mb_ms == 2048 * 3_000_000
    # the org goes free from b+H on: its later rows disappear, the earlier one stays
    env.clock.ms = (b + 2 * H + 60) * 1000
    env.store.refresh(state, env.cfg)
    assert {x.bucket_start for x in env.store.rows(0, 2**40)} == {b, b + H, b + 2 * H}
    env.policies([("o1", "free")], b + H)
    env.store.refresh(state, env.cfg)
    assert {x.bucket_start for x in env.store.rows(0, 2**40)} == {b}


def test_alerts_fire_once_for_a_sustained_systemic_drift(env: Env) -> None:
    fleet = build_fleet(SPEC)
    at = SPEC.start + H
    specs = pick_drift_specs(fleet, ["missing"] * 3, seed=5, buckets=2, at=at)
    case = inject_drift(fleet, specs)
    _load(env, case.ticks, fleet.scale_rows(), [(o.org_id, o.plan) for o in fleet.orgs])
    state = RefreshState()
    result = env.store.refresh(state, env.cfg)
    assert [a.id for a in result.alerts] == [f"billing_drift:{at}"]
    (alert,) = result.alerts
    assert alert.new and alert.body["first_bucket"] == at and alert.body["fired_bucket"] == at + H
    assert set(alert.body["buckets"][0]["orgs"]) == {s.org_id for s in specs}
    # not published yet: offered again, but not new; once published, never again
    again = env.store.refresh(state, env.cfg)
    assert [(a.id, a.new) for a in again.alerts] == [(f"billing_drift:{at}", False)]
    env.store.mark_published([alert.id])
    assert env.store.refresh(state, env.cfg).alerts == []
    assert env.store.refresh(RefreshState(), env.cfg).alerts == []  # a restarted refresher too
    assert len(env.store.alerts()) == 1


def test_window_and_gate(env: Env) -> None:
    fleet = build_fleet(SPEC)
    (spec,) = pick_drift_specs(fleet, ["zombie"], seed=5)
    case = inject_drift(fleet, [spec])
    _load(env, case.ticks, fleet.scale_rows(), [(o.org_id, o.plan) for o in fleet.orgs])
    env.store.refresh(RefreshState(), env.cfg)
    # the endpoint's view over the whole simulated window: the zombie org is over, the others within slack
    orgs = {o.org_id: o for o in env.store.window(SPEC.start - H, SPEC.start + 4 * H, env.cfg)}
    assert orgs[spec.org_id].status is ParityStatus.DRIFT and orgs[spec.org_id].drift > 0
    assert all(o.status is ParityStatus.OK for k, o in orgs.items() if k != spec.org_id)
    rows = env.store.rows(0, 2**40, org=spec.org_id)
    assert sum(r.samples for r in rows) == orgs[spec.org_id].measure.samples
    # gate: settled up to the bucket before now - grace; clean since the zombie bucket
    gate = env.store.gate(600)
    assert gate.last_settled == last_closable_bucket(NOW_MS, H, 600) == SPEC.start + 4 * H
    assert gate.last_flagged == spec.bucket_start
    # only buckets with usage on both sides count (the fleet's last hour); the two quiet settled hours
    # after it are silence, not evidence
    last_with_usage = SPEC.start + (SPEC.hours - 1) * H
    assert gate.clean_buckets == (last_with_usage - spec.bucket_start) // H
    snap = env.store.metrics(600)
    assert snap.parity_bucket is not None and snap.gate == gate and snap.counters["scale.upserted"] > 0


def test_parity_command(sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import os

    from click.testing import CliRunner

    from infra.devkit.cli import cli

    for k in list(os.environ):
        if k.startswith("EDGEBILL_"):
            monkeypatch.delenv(k)
    engine = make_engine(sqlite_url)
    migrate(engine)
    try:
        clock = Clock(NOW_MS)
        ledger = Ledger(engine, clock=clock)
        env = Env(
            ledger,
            ParityStore(engine, bucket_seconds=H, clock=clock),
            clock,
            _cfg(),
            {TICKS: -1, POLICY: -1, SCALE: -1},
        )
        fleet = build_fleet(SPEC)
        (spec,) = pick_drift_specs(fleet, ["missing"], seed=5)
        case = inject_drift(fleet, [spec])
        _load(env, case.ticks, fleet.scale_rows(), [(o.org_id, o.plan) for o in fleet.orgs])
    finally:
        engine.dispose()
    run = CliRunner()
    envs = {"EDGEBILL_DATABASE_URL": sqlite_url}
    window = ["--from", str(SPEC.start - H), "--to", str(SPEC.start + 4 * H)]
    r = run.invoke(cli, ["parity", *window], env=envs)
    assert r.exit_code == 0, r.output
    assert "no parity rows in the window" in r.output  # nothing computed yet (no worker ran)
    r = run.invoke(cli, ["parity", *window, "--refresh", "--json"], env=envs)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    flagged = {(x["org_id"], x["bucket_start"]) for x in out["rows"] if x["status"] != "ok"}
    assert flagged == case.affected
    assert set(out["rows"][0]) == {
        "org_id",
        "bucket_start",
        "gb_seconds",
        "samples",
        "cell_gb_seconds",
        "slack_gb_seconds",
        "drift",
        "status",
    }
    r = run.invoke(cli, ["parity", *window, "--flagged"], env=envs)
    assert r.exit_code == 0 and spec.org_id in r.output
    assert "checked=1 flagged=1" in r.output and "gate:" in r.output
    r = run.invoke(cli, ["parity", *window, "--window", "--org", spec.org_id], env=envs)
    assert r.exit_code == 0 and spec.org_id in r.output and "drift" in r.output
    r = run.invoke(cli, ["parity", "--dashboard-url"], env={**envs, "EDGEBILL_WEB_PORT": "7777"})
    assert r.exit_code == 0 and r.output.startswith("http://127.0.0.1:7777/dashboard?token=")
    r = run.invoke(cli, ["parity", "--from", "10", "--to", "5"], env=envs)
    assert r.exit_code != 0
