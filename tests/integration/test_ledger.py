"""The SQL ledger on a real database (SQLite file, and PostgreSQL when it answers).

Money assertions compare against totals computed here by hand from the ticks written.
"""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import select

from models.billing import UNIFIED_METER, RowState
from models.policy import OrgPolicy
from models.ticks import Tick
from sinks.ledger import CloseConfig, Ledger, SourcedTick
from sinks.schema import make_engine, meter_totals, migrate

pytestmark = pytest.mark.integration

H = 3600
B0 = 1_790_000_000 // H * H  # a bucket start
NOW_MS = (B0 + 5 * H) * 1000  # "now": five hours after B0 starts
LIVE = CloseConfig(bucket_seconds=H, grace_seconds=600, shadow=False, bill_from=B0 - 10 * H)


@pytest.fixture
def ledger(db_url: str) -> Iterator[Ledger]:
    engine = make_engine(db_url)
    migrate(engine)
    yield Ledger(engine, clock=lambda: NOW_MS)
    engine.dispose()


_seq = iter(range(10**9))


def tick(org: str, ts_s: float, mb: int = 1024, secs: int = 20, tid: str | None = None) -> SourcedTick:
    n = next(_seq)
    return SourcedTick(Tick(tid or f"sb:{n}", org, "sb", "w", "c", mb, 0, secs, int(ts_s * 1000)), 0, n)


def write(led: Ledger, ticks: list[SourcedTick]) -> Any:
    newest = max(t.tick.ts_ms for t in ticks)
    return led.write_ticks("usage-ticks", ticks, bucket_seconds=H, progress={0: (ticks[-1].offset, newest)})


def policy(
    led: Ledger, org: str, eff_s: int, plan: str = "pro", mode: str = "unified", cust: str | None = "cus_1"
) -> None:
    p = OrgPolicy.model_validate(
        {"org_id": org, "plan": plan, "billing_mode": mode, "stripe_customer_id": cust, "effective_at": eff_s}
    )
    led.write_policies("org-policy", [(p, 0, 0)], {0: (0, None)}, {})


def rows(led: Ledger, **kw: Any) -> dict[str, tuple[str, str]]:
    return {r["id"]: (r["value"], r["state"]) for r in led.rows(**kw)}


def test_ticks_are_deduplicated_by_id_across_batches(ledger: Ledger) -> None:
    a = [tick("o", B0 + 10, tid="x:1"), tick("o", B0 + 30, tid="x:2")]
    assert write(ledger, a).inserted == 2
    r = write(ledger, [*a, tick("o", B0 + 50, tid="x:3"), tick("o", B0 + 50, tid="x:3")])
    assert (r.inserted, r.duplicates) == (1, 3)
    c = ledger.counters()
    assert (c["ticks.ingested"], c["ticks.duplicate"]) == (3, 3)


def test_a_large_batch_dedups_exactly_across_statement_chunks(ledger: Ledger) -> None:
    """SQLite writes 1,000 rows per statement: ids already stored, repeated inside the batch and spread over
    several chunks are each counted once, and the stored total is exactly the distinct ticks'."""
    first = [tick("o", B0 + i % 3000, mb=512 + i % 7, tid=f"big:{i}") for i in range(1500)]
    assert write(ledger, first).inserted == 1500
    again = [tick("o", B0 + i % 3000, mb=512 + i % 7, tid=f"big:{i}") for i in range(1000, 3700)]
    batch = [*again, *again[::3]]  # 1,000 stored ids, 2,200 new ids, 900 repeats inside the batch
    r = write(ledger, batch)
    assert (r.inserted, r.duplicates) == (2200, len(batch) - 2200)
    truth = sum((512 + i % 7) * 20 for i in range(3700))
    assert ledger.sample_totals()["o"] == (3700, truth)


def test_a_failed_ingest_transaction_writes_nothing(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a: object, **k: object) -> None:
        raise RuntimeError("crash between the sample insert and the progress update")

    monkeypatch.setattr(ledger, "_upsert_progress", boom)
    with pytest.raises(RuntimeError):
        write(ledger, [tick("o", B0 + 10, tid="y:1")])
    monkeypatch.undo()
    assert ledger.sample_totals() == {}
    assert write(ledger, [tick("o", B0 + 10, tid="y:1")]).inserted == 1  # the redelivery counts once


def test_close_writes_one_row_per_org_bucket_meter_with_exact_values(ledger: Ledger) -> None:
    policy(ledger, "u", 0)
    policy(ledger, "l", 0, mode="legacy")
    write(ledger, [tick("u", B0 + i * 20, mb=3000, secs=21) for i in range(10)])
    write(ledger, [tick("l", B0 + i * 20, mb=4096, secs=20) for i in range(5)] + [tick("l", B0 + 200, mb=1024, secs=7)])
    res = ledger.close(NOW_MS, LIVE)
    assert res.samples == 16 and res.rows == 3 and res.corrections == 0
    assert rows(ledger) == {
        f"u:{B0}:{UNIFIED_METER}": ("615.234375", "pending"),  # 10 x 3000 x 21 / 1024
        f"l:{B0}:sandbox_compute_sandbox_4gb": ("100", "pending"),
        f"l:{B0}:sandbox_compute_sandbox_1gb": ("7", "pending"),
    }
    assert ledger.open_samples() == 0
    assert ledger.close(NOW_MS, LIVE).rows == 0  # closing again writes nothing


def test_bucket_stays_open_until_end_plus_grace(ledger: Ledger) -> None:
    policy(ledger, "u", 0)
    write(ledger, [tick("u", B0 + 100)])
    assert ledger.close((B0 + H + 599) * 1000, LIVE).rows == 0
    assert ledger.open_samples() == 1
    assert ledger.close((B0 + H + 600) * 1000, LIVE).rows == 1


def test_late_ticks_become_coalesced_corrections(ledger: Ledger) -> None:
    policy(ledger, "u", 0)
    write(ledger, [tick("u", B0 + 100, mb=2048, secs=20)])
    ledger.close(NOW_MS, LIVE)
    write(ledger, [tick("u", B0 + 200, mb=1024, secs=10), tick("u", B0 + 300, mb=1024, secs=30)])
    res = ledger.close(NOW_MS, LIVE)
    assert (res.rows, res.corrections) == (1, 1)
    write(ledger, [tick("u", B0 + 400, mb=512, secs=4)])
    ledger.close(NOW_MS, LIVE)
    base = f"u:{B0}:{UNIFIED_METER}"
    assert rows(ledger) == {base: ("40", "pending"), f"{base}:r1": ("40", "pending"), f"{base}:r2": ("2", "pending")}


def test_shadow_bill_from_and_expired_states(ledger: Ledger) -> None:
    policy(ledger, "u", 0)
    old = B0 - 40 * 86400  # beyond Stripe's 35 days
    write(ledger, [tick("u", B0 + 10), tick("u", B0 - 2 * H + 10), tick("u", old + 10)])
    cfg = CloseConfig(bucket_seconds=H, grace_seconds=600, shadow=False, bill_from=B0 - H)
    ledger.close(NOW_MS, cfg)
    states = {r["bucket_start"]: r["state"] for r in ledger.rows()}
    assert states == {B0: "pending", B0 - 2 * H: "skipped_before_bill_from", old: "skipped_before_bill_from"}
    write(ledger, [tick("u", B0 + H + 10)])
    ledger.close(NOW_MS, CloseConfig(bucket_seconds=H, grace_seconds=600, shadow=True, bill_from=0))
    assert {r["bucket_start"]: r["state"] for r in ledger.rows()}[B0 + H] == "shadow"
    write(ledger, [tick("u", old + H + 10)])
    ledger.close(NOW_MS, CloseConfig(bucket_seconds=H, grace_seconds=600, shadow=False, bill_from=0))
    assert {r["bucket_start"]: r["state"] for r in ledger.rows()}[old + H] == "expired"


def test_a_policy_batch_keeps_the_later_record_per_org_and_time(ledger: Ledger) -> None:
    def pol(org: str, plan: str, cust: str) -> OrgPolicy:
        return OrgPolicy.model_validate({"org_id": org, "plan": plan, "stripe_customer_id": cust, "effective_at": 0})

    ledger.write_policies("org-policy", [(pol("a", "pro", "cus_old"), 0, 1)], {0: (1, None)}, {})
    batch = [(pol("a", "free", "cus_mid"), 0, 2), (pol("b", "pro", "cus_b"), 0, 3), (pol("a", "pro", "cus_new"), 0, 4)]
    ledger.write_policies("org-policy", batch, {0: (4, None)}, {})
    got = {(p["org_id"], p["plan"], p["stripe_customer_id"], p["src_offset"]) for p in ledger.policies()}
    assert got == {("a", "pro", "cus_new", 4), ("b", "pro", "cus_b", 3)}


def test_policy_as_of_tick_time_within_a_bucket(ledger: Ledger) -> None:
    policy(ledger, "o", 0, plan="free")
    policy(ledger, "o", B0 + 1800, plan="pro")  # upgrade at :30
    policy(ledger, "o", B0 + H + 1800, plan="pro", mode="legacy")  # mode change at next :30
    policy(ledger, "o", B0 + 2 * H + 1800, plan="free")  # downgrade
    ticks = [tick("o", B0 + s, mb=1024, secs=10) for s in (600, 1799, 1800, 3000)]
    ticks += [tick("o", B0 + H + s, mb=1024, secs=10) for s in (600, 1800)]
    ticks += [tick("o", B0 + 2 * H + s, mb=1024, secs=10) for s in (600, 1800, 2400)]
    write(ledger, ticks)
    ledger.close(NOW_MS, LIVE)
    assert rows(ledger) == {
        f"o:{B0}:{UNIFIED_METER}": ("20", "pending"),  # only 10:30 and later
        f"o:{B0 + H}:{UNIFIED_METER}": ("10", "pending"),
        f"o:{B0 + H}:sandbox_compute_sandbox_1gb": ("10", "pending"),
        f"o:{B0 + 2 * H}:sandbox_compute_sandbox_1gb": ("10", "pending"),  # downgrade at :30 stops billing
    }
    unbilled = {(u["bucket_start"], u["reason"]): u["samples"] for u in ledger.unbilled()}
    assert unbilled == {(B0, "free_plan"): 2, (B0 + 2 * H, "free_plan"): 2}


def test_unknown_free_and_untiered_usage_is_counted_not_billed(ledger: Ledger) -> None:
    policy(ledger, "free", 0, plan="free")
    policy(ledger, "leg", 0, mode="legacy")
    write(ledger, [tick("nobody", B0 + 1), tick("free", B0 + 2), tick("leg", B0 + 3, mb=2048)])
    res = ledger.close(NOW_MS, LIVE)
    assert res.rows == 0
    assert res.unbilled == {"unknown_org": 1, "free_plan": 1, "legacy_unknown_tier": 1}
    assert {u["org_id"]: u["mb_seconds"] for u in ledger.unbilled()} == {
        "nobody": 20480,
        "free": 20480,
        "leg": 40960,
    }


def test_rounding_carry_across_buckets_sums_to_the_total_rounded_once(ledger: Ledger) -> None:
    policy(ledger, "u", 0)
    for b in range(4):  # 3000 MB x 21 s = 61.5234375 GB-s in each of 4 buckets
        write(ledger, [tick("u", B0 + b * H + 5, mb=3000, secs=21)])
    ledger.close((B0 + 5 * H) * 1000, LIVE)
    values = [Decimal(v) for v, _ in rows(ledger).values()]
    assert values == [Decimal("61.523438"), Decimal("61.523437"), Decimal("61.523438"), Decimal("61.523437")]
    assert sum(values) == Decimal("246.09375")  # 4 x 61.5234375 exactly


def test_a_crash_inside_close_leaves_nothing_half_done(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    policy(ledger, "u", 0)
    policy(ledger, "v", 0)
    write(ledger, [tick("u", B0 + 1), tick("v", B0 + 2)])
    real = Ledger._write_rows

    def crash_after_rows(self: Ledger, *a: Any, **k: Any) -> None:
        real(self, *a, **k)  # rows and carries written inside the transaction...
        raise RuntimeError("killed mid-close")  # ...then the process dies before the commit

    monkeypatch.setattr(Ledger, "_write_rows", crash_after_rows)
    with pytest.raises(RuntimeError):
        ledger.close(NOW_MS, LIVE)
    monkeypatch.undo()
    assert ledger.rows() == [] and ledger.open_samples() == 2
    with ledger.engine.connect() as conn:
        assert conn.execute(select(meter_totals)).all() == []
    assert ledger.close(NOW_MS, LIVE).rows == 2


def test_sendable_reads_customer_fresh_and_deferred_rows_never_starve_pending(ledger: Ledger) -> None:
    policy(ledger, "nocust", 0, cust=None)
    policy(ledger, "ok", 0, cust="cus_ok")
    write(ledger, [tick("nocust", B0 - b * H) for b in range(1, 9)] + [tick("ok", B0 + 1)])
    ledger.close(NOW_MS, LIVE)
    deferred = [(r["id"], RowState.DEFERRED_NO_CUSTOMER, None, "no customer") for r in ledger.rows(org="nocust")]
    ledger.set_states(deferred)
    got = ledger.sendable(4)
    assert [r.org_id for r in got] == ["ok"]  # deferred rows without a customer are not re-read
    policy(ledger, "nocust", 100, cust="cus_late")
    got = ledger.sendable(4)
    assert got[0].org_id == "ok" and {r.stripe_customer_id for r in got[1:]} == {"cus_late"}
    assert len(got) == 2  # a quarter of the batch for the deferred backlog, the rest for pending


def test_a_sent_row_never_moves_back(ledger: Ledger) -> None:
    policy(ledger, "u", 0)
    write(ledger, [tick("u", B0 + 1)])
    ledger.close(NOW_MS, LIVE)
    (row,) = ledger.rows()
    ledger.set_states([(row["id"], RowState.SENT, "cus_1", None)])
    ledger.set_states([(row["id"], RowState.REJECTED, "cus_1", "late outcome")])
    assert ledger.rows()[0]["state"] == "sent" and ledger.rows()[0]["sent_ms"] == NOW_MS


def test_ledger_refuses_another_bucket_size(ledger: Ledger) -> None:
    from models.errors import LedgerError

    ledger.check_bucket_seconds(3600)
    ledger.check_bucket_seconds(3600)
    with pytest.raises(LedgerError, match="3600"):
        ledger.check_bucket_seconds(900)


def _interval(led: Ledger, iid: str, sandbox: str, worker: str, start_s: int, end_s: int | None) -> None:
    from sinks.schema import cell_intervals

    with led.engine.begin() as conn:
        conn.execute(
            cell_intervals.insert().values(
                id=iid,
                sandbox_id=sandbox,
                org_id="o",
                cell_id="c",
                worker_id=worker,
                memory_mb=1024,
                cpu_percent=100,
                disk_mb=0,
                started_ms=start_s * 1000,
                ended_ms=None if end_s is None else end_s * 1000,
                src_partition=0,
                src_offset=0,
                updated_ms=0,
            )
        )


def _ztick(sandbox: str, worker: str, ts_s: int, tid: str) -> SourcedTick:
    return SourcedTick(Tick(tid, "o", sandbox, worker, "c", 1024, 0, 20, ts_s * 1000), 0, 0)


def test_zombie_ticks_are_counted_not_billed(ledger: Ledger) -> None:
    """Zombie rule, in event time: a tick from a worker that did not own the sandbox at the tick's time, or
    stamped after the sandbox ended, is counted but not billed; unknown ownership is allowed."""
    policy(ledger, "o", 0)
    # sb1: w-a owns it for 20 min, then it migrates to w-b, which stops it at :40.
    _interval(ledger, "i1", "sb1", "w-a", B0, B0 + 1200)
    _interval(ledger, "i2", "sb1", "w-b", B0 + 1200, B0 + 2400)
    _interval(ledger, "i3", "sb2", "w-a", B0, None)  # sb2: still running on w-a
    ticks = [
        _ztick("sb1", "w-a", B0 + 600, "ok-owner-a"),
        _ztick("sb1", "w-a", B0 + 1210, "ok-final-flush-a"),  # a last slice just after migrating: in slack
        _ztick("sb1", "w-a", B0 + 1800, "zombie-not-owner"),  # w-a keeps ticking after the migration
        _ztick("sb1", "w-b", B0 + 1800, "ok-owner-b"),
        _ztick("sb1", "w-b", B0 + 3000, "zombie-after-stop"),  # sandbox ended at :40
        _ztick("sb2", "w-b", B0 + 100, "zombie-other-worker"),
        _ztick("sb2", "w-a", B0 + 3500, "ok-open-interval"),
        _ztick("sb3", "w-z", B0 + 100, "ok-unknown-sandbox"),  # no cell data: allowed
        _ztick("sb1", "", B0 + 3000, "ok-no-worker-id"),  # old producer without worker id: allowed
    ]
    ledger.write_ticks("usage-ticks", ticks, bucket_seconds=H, progress={})
    res = ledger.close(NOW_MS, LIVE)
    assert res.unbilled == {"zombie": 3}
    assert rows(ledger) == {f"o:{B0}:{UNIFIED_METER}": ("120", "pending")}  # 6 billable ticks x 20 GB-s
    assert {(u["reason"], u["samples"]) for u in ledger.unbilled()} == {("zombie", 3)}
    assert ledger.counters()["unbilled.zombie"] == 3
