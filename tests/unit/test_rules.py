"""The billing rules' one home in ``models``: pricing under a policy, the row state, Stripe's window with
each stage's margin, and the bucket math every caller shares."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.billing import UNIFIED_METER, BillingMode, RowState, bucket_end, bucket_start, bucket_start_s, mb_seconds
from models.cutover import CutoverState, Decision, decide
from models.policy import OrgPolicy
from models.pricing import (
    BILLED_STREAM,
    FREE_PLAN,
    LEGACY_UNKNOWN_TIER,
    SHADOW_STREAM,
    UNKNOWN_ORG,
    Priced,
    Unbilled,
    price_usage,
    row_placement,
)
from models.stripe_window import (
    CLOSE_MARGIN_SECONDS,
    PARITY_MARGIN_SECONDS,
    SEND_MARGIN_SECONDS,
    STRIPE_MAX_AGE_SECONDS,
    STRIPE_MAX_FUTURE_SECONDS,
    VALIDATE_MARGIN_SECONDS,
    expired_at_close,
    expired_at_send,
    oldest_accepted_ms,
    oldest_accepted_s,
    stripe_refuses_as_future,
    stripe_refuses_as_old,
)

H = 3600
NOW_S = 1_790_000_000


def pol(plan: str = "pro", mode: str = "unified", provider: str = "stripe") -> OrgPolicy:
    return OrgPolicy.model_validate(
        {"org_id": "o", "plan": plan, "billing_mode": mode, "billing_provider": provider, "effective_at": 0}
    )


def test_price_usage_meter_units_or_the_reason_it_is_not_billed() -> None:
    mb, secs = 4096, 40
    mbs = mb_seconds(mb, secs)
    assert price_usage(pol(), mb, secs, mbs) == Priced(UNIFIED_METER, mbs, BillingMode.UNIFIED)
    assert price_usage(pol(mode="legacy"), mb, secs, mbs) == Priced(
        "sandbox_compute_sandbox_4gb", secs, BillingMode.LEGACY
    )
    assert price_usage(pol(mode="legacy"), 2048, secs, 2048 * secs) == Unbilled(LEGACY_UNKNOWN_TIER)
    assert price_usage(None, mb, secs, mbs) == Unbilled(UNKNOWN_ORG)
    assert price_usage(pol(plan="free"), mb, secs, mbs) == Unbilled(FREE_PLAN)
    assert price_usage(pol(provider="paddle"), mb, secs, mbs) == Unbilled("provider_paddle")
    assert price_usage(pol(plan="free", provider="paddle"), mb, secs, mbs) == Unbilled("provider_paddle")


def test_legacy_provider_is_billed_through_stripe_and_autumn_is_counted_as_billed_elsewhere() -> None:
    mb, secs = 4096, 40
    mbs = mb_seconds(mb, secs)
    assert pol(provider="legacy").billable
    assert price_usage(pol(provider="legacy"), mb, secs, mbs) == Priced(UNIFIED_METER, mbs, BillingMode.UNIFIED)
    assert price_usage(pol(plan="free", provider="legacy"), mb, secs, mbs) == Unbilled(FREE_PLAN)
    assert not pol(provider="autumn").billable
    assert price_usage(pol(provider="autumn"), mb, secs, mbs) == Unbilled("provider_autumn")


@given(
    st.sampled_from([1024, 3000, 4096, 65536]),
    st.lists(st.integers(0, 86_400), min_size=1, max_size=20),
    st.sampled_from(["unified", "legacy"]),
)
def test_pricing_is_additive_over_ticks(mem: int, intervals: list[int], mode: str) -> None:
    """The closer prices whole groups and replay subtracts ticks it gave up: both need additivity."""
    p = pol(mode=mode)
    whole = price_usage(p, mem, sum(intervals), sum(mb_seconds(mem, s) for s in intervals))
    parts = [price_usage(p, mem, s, mb_seconds(mem, s)) for s in intervals]
    assert all(type(x) is type(whole) for x in parts)
    if isinstance(whole, Priced):
        assert all(isinstance(x, Priced) and x.meter == whole.meter for x in parts)
        assert sum(x.units for x in parts if isinstance(x, Priced)) == whole.units
    else:
        assert all(x == whole for x in parts)


def test_row_placement_in_order_of_precedence() -> None:
    now_ms = NOW_S * 1000
    fresh = bucket_start_s(NOW_S, H) - H
    old = bucket_start_s(NOW_S - STRIPE_MAX_AGE_SECONDS, H) - H

    def place(b: int, *, bill_from: int = 0, shadow: bool = False) -> tuple[RowState, str | None]:
        decision = decide(CutoverState(shadow=shadow, bill_from=bill_from), b)
        return row_placement(decision, bucket_end(b, H), now_ms)

    assert place(fresh) == (RowState.PENDING, BILLED_STREAM)
    assert place(fresh, shadow=True) == (RowState.SHADOW, SHADOW_STREAM)
    assert place(old) == (RowState.EXPIRED, None)
    assert place(old, shadow=True) == (RowState.EXPIRED, None)
    assert place(old, bill_from=fresh) == (RowState.SKIPPED_BEFORE_BILL_FROM, None)  # before bill_from wins
    assert place(fresh, bill_from=fresh) == (RowState.PENDING, BILLED_STREAM)  # bill_from is inclusive


def test_every_row_of_a_bucket_is_placed_from_its_one_decision() -> None:
    now_ms = NOW_S * 1000
    fresh = bucket_start_s(NOW_S, H) - H
    old = bucket_start_s(NOW_S - STRIPE_MAX_AGE_SECONDS, H) - H
    end = bucket_end(fresh, H)
    assert row_placement(Decision.BILLED, end, now_ms) == (RowState.PENDING, BILLED_STREAM)
    assert row_placement(Decision.SHADOW, end, now_ms) == (RowState.SHADOW, SHADOW_STREAM)
    assert row_placement(Decision.SKIPPED_ROLLED_BACK, end, now_ms) == (RowState.SKIPPED_ROLLED_BACK, None)
    assert row_placement(Decision.SKIPPED_ROLLED_BACK, bucket_end(old, H), now_ms) == (
        RowState.SKIPPED_ROLLED_BACK,
        None,
    )
    assert row_placement(Decision.BILLED, bucket_end(old, H), now_ms) == (RowState.EXPIRED, None)


def test_stripe_window_and_the_margin_of_each_stage() -> None:
    # Each stage leaves the next one room: a row the closer writes pending is not expired by the sender at
    # once, and what the sender lets through is not refused by the sink's exact check.
    assert CLOSE_MARGIN_SECONDS > SEND_MARGIN_SECONDS > VALIDATE_MARGIN_SECONDS == 0 == PARITY_MARGIN_SECONDS
    edge = NOW_S - STRIPE_MAX_AGE_SECONDS
    assert oldest_accepted_s(NOW_S, 0) == edge
    assert oldest_accepted_ms(NOW_S * 1000 + 999, 60) == (edge + 60) * 1000 + 999
    # The sink's check is Stripe's own rule: the oldest second it takes, and no older.
    assert not stripe_refuses_as_old(edge, NOW_S, VALIDATE_MARGIN_SECONDS)
    assert stripe_refuses_as_old(edge - 1, NOW_S, VALIDATE_MARGIN_SECONDS)
    assert not stripe_refuses_as_future(NOW_S + STRIPE_MAX_FUTURE_SECONDS, NOW_S)
    assert stripe_refuses_as_future(NOW_S + STRIPE_MAX_FUTURE_SECONDS + 1, NOW_S)
    # The sender: SEND_MARGIN_SECONDS inside the window.
    assert not expired_at_send(edge + SEND_MARGIN_SECONDS, NOW_S)
    assert expired_at_send(edge + SEND_MARGIN_SECONDS - 1, NOW_S)
    # The closer: CLOSE_MARGIN_SECONDS inside, with its clock in ms (the second it is in counts).
    for now_ms in (NOW_S * 1000, NOW_S * 1000 + 999):
        assert not expired_at_close(edge + CLOSE_MARGIN_SECONDS, now_ms)
        assert expired_at_close(edge + CLOSE_MARGIN_SECONDS - 1, now_ms)
    # A row the closer keeps is not expired by the sender within CLOSE - SEND seconds.
    end = edge + CLOSE_MARGIN_SECONDS
    assert not expired_at_send(end, NOW_S + CLOSE_MARGIN_SECONDS - SEND_MARGIN_SECONDS)


@given(st.integers(-(10**15), 10**15), st.sampled_from([60, 300, 3600, 86400]))
def test_bucket_start_in_ms_and_in_seconds_agree(ts_ms: int, size: int) -> None:
    assert bucket_start(ts_ms, size) == bucket_start_s(ts_ms // 1000, size)
    assert bucket_end(bucket_start(ts_ms, size), size) == bucket_start(ts_ms, size) + size


@pytest.mark.parametrize(
    "name",
    [
        "Clock",
        "CloseConfig",
        "CloseResult",
        "IngestResult",
        "Ledger",
        "MeterRow",
        "SourcedTick",
        "SqlStore",
        "ZOMBIE_SLACK_MS",
        "not_aggregated",
        "policy_from_row",
        "read_partition_states",
        "wall_clock_ms",
    ],
)
def test_the_ledger_package_keeps_every_name_importable(name: str) -> None:
    """Other modules import these from ``sinks.ledger``; the split into a package keeps them there."""
    import sinks.ledger

    assert hasattr(sinks.ledger, name)
