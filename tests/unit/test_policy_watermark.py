"""Policy as of a tick's time; the closing watermark's rules."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from models.billing import BillingMode, Plan
from models.policy import OrgPolicy, PolicyHistory
from models.watermark import PartitionState, last_closable_bucket, partition_watermark, watermark

H = 3600 * 1000


def pol(eff_s: int, plan: str = "pro", mode: str = "unified", cust: str | None = "cus_1") -> OrgPolicy:
    return OrgPolicy.model_validate(
        {"org_id": "o", "plan": plan, "billing_mode": mode, "stripe_customer_id": cust, "effective_at": eff_s}
    )


def test_upgrade_at_1030_bills_from_1030() -> None:
    ten = 1781560800  # 2026-06-15T22:00Z
    hist = PolicyHistory([pol(ten - 86400, "free"), pol(ten + 1800, "pro")])
    assert hist.as_of((ten + 1799) * 1000).plan is Plan.FREE  # type: ignore[union-attr]
    assert hist.as_of((ten + 1800) * 1000).plan is Plan.PRO  # type: ignore[union-attr]
    assert hist.change_points(ten * 1000, (ten + 3600) * 1000) == [(ten + 1800) * 1000]
    assert hist.as_of((ten - 86401) * 1000) is None  # before any policy: unknown org


def test_policy_accepts_rfc3339_and_round_trips_the_wire() -> None:
    p = OrgPolicy.model_validate(
        {"org_id": "o", "plan": "pro", "billing_mode": "legacy", "effective_at": "2026-06-15T23:00:00Z"}
    )
    assert p.effective_at_ms == 1781564400000 and p.billing_mode is BillingMode.LEGACY
    assert OrgPolicy.from_json(p.to_json()) == p
    with pytest.raises(ValueError):
        OrgPolicy.model_validate({"org_id": "o", "plan": "gold", "effective_at": 0})
    with pytest.raises(ValueError):
        OrgPolicy.model_validate({"org_id": "o", "plan": "pro", "effective_at": "soon"})


def test_only_pro_orgs_billed_through_stripe_are_billable() -> None:
    assert pol(0).billable
    assert not pol(0, "free").billable
    autumn = OrgPolicy.model_validate({"org_id": "o", "plan": "pro", "billing_provider": "autumn", "effective_at": 0})
    assert not autumn.billable


@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=20, unique=True), st.integers(0, 10**6))
def test_as_of_is_the_latest_policy_not_after_t(starts: list[int], t: int) -> None:
    hist = PolicyHistory([pol(s) for s in starts])
    got = hist.as_of(t * 1000)
    before = [s for s in starts if s <= t]
    if not before:
        assert got is None
    else:
        assert got is not None and got.effective_at_ms == max(before) * 1000


def st_(off: int, ev: int | None, hw: int | None, rep: int | None, topic: str = "t", p: int = 0) -> PartitionState:
    return PartitionState(topic, p, off, ev, hw, rep)


NOW = 10_000 * H


def test_caught_up_partition_guarantees_now() -> None:
    assert partition_watermark(st_(99, 5 * H, 100, NOW - 1000), NOW, 15_000) == NOW


def test_lagging_partition_guarantees_only_its_newest_event() -> None:
    assert partition_watermark(st_(50, 5 * H, 100, NOW - 1000), NOW, 15_000) == 5 * H


def test_stale_report_means_lagging_even_if_offsets_look_caught_up() -> None:
    assert partition_watermark(st_(99, 5 * H, 100, NOW - 60_000), NOW, 15_000) == 5 * H


def test_unknown_or_empty_lagging_partition_holds_everything() -> None:
    assert partition_watermark(None, NOW, 15_000) is None
    assert partition_watermark(st_(-1, None, 10, NOW), NOW, 15_000) is None


def test_idle_empty_partition_does_not_block() -> None:
    assert partition_watermark(st_(-1, None, 0, NOW - 100), NOW, 15_000) == NOW


def test_policy_topic_without_event_time_holds_while_lagging() -> None:
    assert partition_watermark(st_(3, None, 10, NOW), NOW, 15_000, event_time=False) is None
    assert partition_watermark(st_(9, None, 10, NOW), NOW, 15_000, event_time=False) == NOW


def test_global_watermark_is_the_minimum_and_needs_every_partition() -> None:
    states = [
        st_(99, 7 * H, 100, NOW, "ticks", 0),
        st_(10, 6 * H, 100, NOW, "ticks", 1),
        st_(4, None, 5, NOW, "policy", 0),
    ]
    req = {"ticks": 2, "policy": 1}
    assert watermark(states, req, NOW, 15_000, event_time_topics=frozenset({"ticks"})) == 6 * H
    assert watermark(states, {"ticks": 3, "policy": 1}, NOW, 15_000, event_time_topics=frozenset({"ticks"})) is None
    future = [st_(10, NOW + 10 * H, 100, NOW, "ticks", 0)]
    assert watermark(future, {"ticks": 1}, NOW, 15_000, event_time_topics=frozenset({"ticks"})) == NOW


def test_bucket_closes_only_after_end_plus_grace() -> None:
    start = 1781564400
    end_plus_grace = (start + 3600 + 600) * 1000
    assert last_closable_bucket(end_plus_grace - 1000, 3600, 600) == start - 3600
    assert last_closable_bucket(end_plus_grace, 3600, 600) == start
    assert last_closable_bucket(1000, 3600, 600) is None
