"""The cutover in the ledger, on SQLite and PostgreSQL: one decision per bucket (the seam defect), the state
in force and its audit, a rollback's sweep, a release, the migration that fills decisions, and a delivery
that races a rollback.

Money assertions compare against values computed here from the ticks written.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import pytest
from sqlalchemy import text

from models.billing import UNIFIED_METER, Authority, RowState
from models.cutover import CutoverState, armed_state, rolled_back_state
from models.errors import CutoverRefused
from models.policy import OrgPolicy
from models.ticks import Tick
from sinks.ledger import BOOTSTRAP_SOURCE, LEDGER_SOURCE, CloseConfig, CutoverView, Ledger, SourcedTick
from sinks.schema import make_engine, migrate

pytestmark = pytest.mark.integration

H = 3600
T = 1_790_000_000 // H * H  # the cutover boundary
NOW_MS = (T + 6 * H) * 1000
SHADOW_BOOT = CloseConfig(bucket_seconds=H, grace_seconds=600, shadow=True, bill_from=0)


@pytest.fixture
def ledger(db_url: str) -> Iterator[Ledger]:
    engine = make_engine(db_url)
    migrate(engine)
    yield Ledger(engine, clock=lambda: NOW_MS)
    engine.dispose()


_seq = iter(range(10**9))


def tick(org: str, ts_s: int, mb: int = 1024, secs: int = 20) -> SourcedTick:
    n = next(_seq)
    return SourcedTick(Tick(f"sb:{n}", org, "sb", "w", "c", mb, 0, secs, ts_s * 1000), 0, n)


def write(led: Ledger, ticks: list[SourcedTick]) -> None:
    led.write_ticks("usage-ticks", ticks, bucket_seconds=H, progress={})


def pro(led: Ledger, org: str = "o") -> None:
    p = OrgPolicy.model_validate({"org_id": org, "plan": "pro", "stripe_customer_id": "cus_1", "effective_at": 0})
    led.write_policies("org-policy", [(p, 0, 0)], {}, {})


def states(led: Ledger) -> dict[str, tuple[str, str]]:
    return {r["id"]: (r["value"], r["state"]) for r in led.rows()}


def arm(led: Ledger, at: int = T, ms: int = 1) -> None:
    led.record_state(armed_state(at, changed_at_ms=ms, by="ops@test", reason="soak clean", command="arm"))


def test_a_bucket_closed_in_shadow_keeps_its_decision_for_every_correction(ledger: Ledger) -> None:
    """The defect: bucket T closed while SHADOW was on kept its first row shadow, and its late correction was
    sent as pending once SHADOW was off — Stripe got part of an hour."""
    pro(ledger)
    write(ledger, [tick("o", T + 10)])
    ledger.close(NOW_MS, SHADOW_BOOT)  # closes in shadow: decided shadow
    arm(ledger)  # SHADOW off from now on
    write(ledger, [tick("o", T + 20)])  # a late tick of T
    res = ledger.close(NOW_MS, SHADOW_BOOT)
    assert res.corrections == 1 and res.decided == {}  # no new decision: T already had one
    base = f"o:{T}:{UNIFIED_METER}"
    assert states(ledger) == {base: ("20", "shadow"), f"{base}:r1": ("20", "shadow")}
    assert ledger.decided_buckets(at_or_after=T, decision=None) == [(T, "shadow")]


def test_before_t_skipped_from_t_billed_whatever_the_order_of_late_ticks(ledger: Ledger) -> None:
    pro(ledger)
    arm(ledger)
    write(ledger, [tick("o", T - H + 5), tick("o", T + 5)])
    res = ledger.close(NOW_MS, SHADOW_BOOT)  # the bootstrap (shadow) is not in force any more
    assert res.decided == {T - H: "skipped_before_bill_from", T: "billed"}
    write(ledger, [tick("o", T - H + 50), tick("o", T + 50)])
    ledger.close(NOW_MS, SHADOW_BOOT)
    before, at = f"o:{T - H}:{UNIFIED_METER}", f"o:{T}:{UNIFIED_METER}"
    assert states(ledger) == {
        before: ("20", "skipped_before_bill_from"),
        f"{before}:r1": ("20", "skipped_before_bill_from"),
        at: ("20", "pending"),
        f"{at}:r1": ("20", "pending"),
    }


def test_the_state_in_force_its_source_audit_and_idempotence(ledger: Ledger) -> None:
    boot = SHADOW_BOOT.bootstrap
    eff = ledger.effective_cutover(boot)
    assert (eff.source, eff.seq, eff.state.shadow) == (BOOTSTRAP_SOURCE, 0, True)
    state = armed_state(T, changed_at_ms=5, by="ops@test", reason="soak clean", command="edgebill cutover arm")
    first = ledger.record_state(state)
    again = ledger.record_state(CutoverState.from_json(state.to_json()), published=True)  # read back from the topic
    assert first.new and not again.new and again.seq == first.seq
    eff = ledger.effective_cutover(boot)
    assert (eff.source, eff.seq, eff.state.flags()) == (LEDGER_SOURCE, first.seq, (False, T, None, Authority.EDGE))
    (entry,) = ledger.cutover_log()
    assert (entry.by, entry.reason, entry.command, entry.kind) == ("ops@test", "soak clean", state.command, "state")
    assert entry.published_ms is not None and ledger.unpublished_states() == []
    view = CutoverView(ledger, boot, ttl_s=60)
    assert view.authority is Authority.EDGE and view.live
    ledger.ack_cutover("w1", first.seq)
    ledger.ack_cutover("w1", first.seq)
    assert [(o, s) for o, s, _ in ledger.cutover_acks()] == [("w1", first.seq)]


def test_rollback_skips_what_the_edge_has_not_sent_and_decides_later_buckets_for_the_cell(ledger: Ledger) -> None:
    pro(ledger)
    arm(ledger)
    # T and T+H close billed; T+H's row is sent, T+2H's not yet
    write(ledger, [tick("o", T + 5, mb=1000), tick("o", T + H + 5, mb=1000), tick("o", T + 2 * H + 5, mb=1000)])
    ledger.close(NOW_MS, SHADOW_BOOT)
    ids = {r["bucket_start"]: r["id"] for r in ledger.rows()}
    ledger.set_states([(ids[T + H], RowState.SENT, "cus_1", None)], attempts=1)
    current = ledger.effective_cutover(SHADOW_BOOT.bootstrap).state
    rb = rolled_back_state(current, T + H, changed_at_ms=9, by="ops@test", reason="drift", command="rollback")
    got = ledger.record_state(rb)
    assert got.rows_moved == [ids[T + 2 * H]]
    by_bucket = {r["bucket_start"]: r["state"] for r in ledger.rows()}
    assert by_bucket == {T: "pending", T + H: "sent", T + 2 * H: "skipped_rolled_back"}
    assert [r["id"] for r in ledger.sent_rows_from(T + H)] == [ids[T + H]]
    # a later bucket closes for the cell, and a late tick of a rolled-back bucket stays the cell's
    write(ledger, [tick("o", T + 3 * H + 5, mb=1000), tick("o", T + 2 * H + 9, mb=1000)])
    ledger.close(NOW_MS, SHADOW_BOOT)
    assert {r["bucket_start"] for r in ledger.rows(state="skipped_rolled_back")} == {T + 2 * H, T + 3 * H}
    # the billed carry lost the skipped row: the next billed row brings the stream back to its exact total
    write(ledger, [tick("o", T + 17, mb=1000)])
    ledger.close(NOW_MS, SHADOW_BOOT)
    billed = [r for r in ledger.rows() if r["state"] in ("pending", "sent")]
    exact = Decimal(sum(r["units"] for r in billed)) / 1024
    assert sum(Decimal(r["value"]) for r in billed) == exact.quantize(Decimal("0.000001"))


def test_release_turns_a_gap_into_billed_rows_through_the_billed_carry(ledger: Ledger) -> None:
    pro(ledger)
    write(ledger, [tick("o", T + 5, mb=1000, secs=7)])
    ledger.close(NOW_MS, SHADOW_BOOT)  # T closed in shadow: a gap once T is armed
    arm(ledger)
    with pytest.raises(CutoverRefused, match="not a gap"):
        ledger.release_bucket(
            T + H,
            bucket_seconds=H,
            bootstrap=SHADOW_BOOT.bootstrap,
            change_id="x",
            by="",
            reason="",
            command="",
            changed_ms=1,
        )
    got = ledger.release_bucket(
        T,
        bucket_seconds=H,
        bootstrap=SHADOW_BOOT.bootstrap,
        change_id="rel1",
        by="ops",
        reason="gap",
        command="r",
        changed_ms=2,
    )
    assert got.new and len(got.rows_moved) == 1
    ((value, state),) = states(ledger).values()
    assert state == "pending" and Decimal(value) == (Decimal(7000) / 1024).quantize(Decimal("0.000001"))
    assert ledger.decided_buckets(at_or_after=T) == [(T, "billed")]
    write(ledger, [tick("o", T + 50, mb=1000, secs=7)])
    ledger.close(NOW_MS, SHADOW_BOOT)
    assert [s for _, s in states(ledger).values()] == ["pending", "pending"]  # the correction follows: billed


def test_a_row_sent_while_a_rollback_skipped_it_is_recorded_as_sent(ledger: Ledger) -> None:
    pro(ledger)
    arm(ledger)
    write(ledger, [tick("o", T + 5)])
    ledger.close(NOW_MS, SHADOW_BOOT)
    (row,) = ledger.sendable(10)  # the sender has read it ...
    current = ledger.effective_cutover(SHADOW_BOOT.bootstrap).state
    ledger.record_state(rolled_back_state(current, T, changed_at_ms=3, by="ops", reason="r", command="c"))
    assert ledger.rows()[0]["state"] == "skipped_rolled_back"
    ledger.set_states([(row.id, RowState.SENT, "cus_1", None)], attempts=1)  # ... and Stripe took it
    (got,) = ledger.rows()
    assert got["state"] == "sent" and "rollback" in got["last_error"]
    assert [r["id"] for r in ledger.sent_rows_from(T)] == [row.id]


def test_migration_fills_decisions_from_the_rows_of_buckets_closed_before_it(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        migrate(engine, "0005")
        with engine.begin() as conn:
            for b in (T, T + H, T + 2 * H, T + 3 * H):  # T + 3H: closed, without any row
                conn.execute(
                    text("INSERT INTO closed_buckets (bucket_start, closed_ms, close_id, seq) VALUES (:b, 0, 1, 0)"),
                    {"b": b},
                )
            for b, st in ((T, "shadow"), (T, "pending"), (T + H, "skipped_before_bill_from"), (T + 2 * H, "sent")):
                conn.execute(
                    text(
                        "INSERT INTO meter_events (id, org_id, bucket_start, bucket_end, meter, revision, "
                        "billing_mode, value, units, samples, state, close_id, created_ms, updated_ms, attempts) "
                        "VALUES (:id, 'o', :b, :e, 'm', 0, 'unified', '1', 1024, 1, :st, 1, 0, 0, 0)"
                    ),
                    {"id": f"o:{b}:{st}", "b": b, "e": b + H, "st": st},
                )
        migrate(engine)
        led = Ledger(engine, clock=lambda: NOW_MS)
        assert led.bucket_decisions([T, T + H, T + 2 * H, T + 3 * H]) == {
            T: "shadow",  # the defect's bucket: its first row decided it
            T + H: "skipped_before_bill_from",
            T + 2 * H: "billed",
            T + 3 * H: None,  # decided at its next close
        }
    finally:
        engine.dispose()
