"""The pure webhook rules (models.webhooks) and the price catalog (models.catalog)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
import pytest

from models.billing import LEGACY_TIER_METERS, UNIFIED_METER, Plan
from models.catalog import CATALOG, CATALOG_KEYS, CATALOG_METERS, missing_keys
from models.errors import InvalidRecord
from models.webhooks import (
    Ignore,
    PlanState,
    SetupCheckout,
    SubscriptionChange,
    SubState,
    classify,
    credit_idempotency_key,
    is_out_of_order,
    org_plan,
    parse_event,
    plan_changes,
    routing_key,
    subscription_idempotency_key,
)


def event(etype: str, obj: dict[str, Any], *, created: int = 1_000, ident: str = "evt_1") -> bytes:
    return orjson.dumps({"id": ident, "object": "event", "type": etype, "created": created, "data": {"object": obj}})


def setup_session(**meta: str) -> dict[str, Any]:
    return {"id": "cs_1", "object": "checkout.session", "mode": "setup", "customer": "cus_1", "metadata": meta}


def sub(status: str = "active", **meta: str) -> dict[str, Any]:
    return {"id": "sub_1", "object": "subscription", "customer": "cus_1", "status": status, "metadata": meta}


# ------------------------------------------------------------------------------------------- parsing


def test_parse_event_keeps_what_the_agent_uses() -> None:
    ev = parse_event(event("customer.subscription.created", sub(org_id="o1"), created=42))
    assert (ev.id, ev.type, ev.created, ev.object_id, ev.livemode) == (
        "evt_1",
        "customer.subscription.created",
        42,
        "sub_1",
        False,
    )
    assert ev.metadata() == {"org_id": "o1"}


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "not_json"),
        (b"[]", "not_an_event"),
        (orjson.dumps({"id": "evt_1", "type": "x", "created": 1}), "not_an_event"),  # no data.object
        (orjson.dumps({"id": "evt_1", "type": "x", "created": True, "data": {"object": {}}}), "not_an_event"),
        (orjson.dumps({"id": "", "type": "x", "created": 1, "data": {"object": {}}}), "not_an_event"),
        (orjson.dumps({"id": "evt_1", "type": "x", "created": -1, "data": {"object": {}}}), "not_an_event"),
    ],
)
def test_parse_event_refuses_what_is_not_an_event(raw: bytes, reason: str) -> None:
    with pytest.raises(InvalidRecord) as info:
        parse_event(raw)
    assert info.value.reason == reason


def test_routing_key_is_the_objects_id() -> None:
    assert routing_key(orjson.loads(event("x.y", {"id": "sub_9"}))) == b"sub_9"
    assert routing_key({"id": "evt_2", "data": {"object": {}}}) == b"evt_2"


# ------------------------------------------------------------------------------------------- meaning


def test_a_setup_checkout_asks_for_provisioning() -> None:
    ev = parse_event(event("checkout.session.completed", setup_session(org_id="o1", type="setup")))
    assert classify(ev) == SetupCheckout("o1", "cus_1", "cs_1")
    expanded = {**setup_session(org_id="o1", type="setup"), "customer": {"id": "cus_2", "object": "customer"}}
    assert classify(parse_event(event("checkout.session.completed", expanded))) == SetupCheckout("o1", "cus_2", "cs_1")


@pytest.mark.parametrize(
    ("obj", "why"),
    [
        (setup_session(org_id="o1"), "not a setup checkout"),
        (setup_session(type="setup"), "setup checkout without metadata.org_id"),
        ({**setup_session(org_id="o1", type="setup"), "customer": None}, "setup checkout without a customer"),
    ],
)
def test_other_checkouts_are_ignored(obj: dict[str, Any], why: str) -> None:
    assert classify(parse_event(event("checkout.session.completed", obj))) == Ignore(why)


def test_subscription_events_carry_the_state_and_a_deletion_is_always_canceled() -> None:
    created = classify(parse_event(event("customer.subscription.created", sub(org_id="o1"))))
    assert created == SubscriptionChange("sub_1", "cus_1", "o1", "active")
    assert isinstance(created, SubscriptionChange) and created.pro
    deleted = classify(parse_event(event("customer.subscription.deleted", sub("active"))))
    assert deleted == SubscriptionChange("sub_1", "cus_1", None, "canceled")
    assert classify(parse_event(event("invoice.paid", {"id": "in_1"}))) == Ignore("type invoice.paid is not handled")


# ------------------------------------------------------------------------------------------ ordering


def test_the_ordering_guard() -> None:
    assert not is_out_of_order(None, 10, "active")
    active = SubState("active", 10)
    assert is_out_of_order(active, 9, "canceled")  # older than the state held
    assert not is_out_of_order(active, 10, "past_due")  # same second: applies (repeating is harmless)
    assert not is_out_of_order(active, 11, "canceled")
    ended = SubState("canceled", 10)
    assert is_out_of_order(ended, 9, "active")  # a created delivered after deleted
    assert is_out_of_order(ended, 10, "active")  # even in the same second
    assert is_out_of_order(ended, 99, "active")  # and later: a canceled subscription never comes back
    assert not is_out_of_order(ended, 10, "canceled")


def test_an_org_is_pro_while_one_subscription_pays() -> None:
    assert org_plan([]) is Plan.FREE
    assert org_plan(["canceled", "unpaid"]) is Plan.FREE
    assert org_plan(["canceled", "past_due"]) is Plan.PRO
    assert org_plan(["trialing"]) is Plan.PRO


# ---------------------------------------------------------------------------------------- publishing


def test_plan_changes_publish_each_change_once_at_the_events_time() -> None:
    times, st = plan_changes(PlanState(), Plan.PRO, 100)
    assert times == [100] and st == PlanState(Plan.PRO, 100, 100, None)
    assert plan_changes(st, Plan.PRO, 150) == ([], st)  # same plan later: nothing
    times, st = plan_changes(st, Plan.FREE, 200)
    assert times == [200] and st == PlanState(Plan.FREE, 200, 200, 100)


def test_a_change_learnt_late_never_goes_behind_a_newer_record() -> None:
    st = PlanState(Plan.FREE, 200, 200, 100)  # pro@100, free@200
    times, st2 = plan_changes(st, Plan.PRO, 150)  # another subscription, active since 150, learnt now
    assert times == [200]  # replaces free@200: pro throughout
    assert st2 == PlanState(Plan.PRO, 200, 200, 100)


def test_pro_extends_back_only_where_nothing_of_ours_lies_between() -> None:
    st = PlanState(Plan.PRO, 200, 200, 100)  # free@100?, pro@200
    assert plan_changes(st, Plan.PRO, 150) == ([150], PlanState(Plan.PRO, 150, 200, 100))
    assert plan_changes(st, Plan.PRO, 100) == ([], st)  # at the floor: would replace our older record
    assert plan_changes(st, Plan.PRO, 50) == ([], st)  # beyond it
    free = PlanState(Plan.FREE, 200, 200, 100)
    assert plan_changes(free, Plan.FREE, 150) == ([], free)  # free is never extended back


def test_idempotency_keys() -> None:
    assert subscription_idempotency_key("org_7", 0) == "sub-create-org_7"
    assert subscription_idempotency_key("org_7", 2) == "sub-create-org_7-2"
    assert credit_idempotency_key("org_7") == "credit-org_7"


# ------------------------------------------------------------------------------------------ catalog


def test_the_catalog_has_every_seed_key_with_its_meter_and_amount() -> None:
    assert CATALOG_KEYS == (
        "tier_1024",
        "tier_4096",
        "tier_8192",
        "tier_16384",
        "tier_32768",
        "tier_65536",
        "overage",
        "reserved",
        "disk_overage",
    )
    by_key = {p.key: p for p in CATALOG}
    for mb, meter in LEGACY_TIER_METERS.items():
        assert by_key[f"tier_{mb}"].meter == meter
    assert by_key["overage"].meter == UNIFIED_METER
    # USD/s x 100, truncated to Stripe's 12 decimals.
    assert by_key["tier_1024"].unit_amount_decimal == Decimal("0.000108024691")
    assert by_key["tier_65536"].unit_amount_decimal == Decimal("0.05401234568")
    assert by_key["disk_overage"].unit_amount_decimal == Decimal("0.00001")
    assert all(-p.unit_amount_decimal.as_tuple().exponent <= 12 for p in CATALOG)  # type: ignore[operator]
    assert len(set(CATALOG_METERS)) == len(CATALOG_METERS) == 9
    assert len({p.tier for p in CATALOG}) == len(CATALOG)
    assert by_key["tier_8192"].metadata() == {
        "edgebill": "compute",
        "tier": "sandbox_8gb_v5",
        "unit": "second",
        "billing_key": "tier_8192",
        "memory_mb": "8192",
    }


def test_missing_keys() -> None:
    assert missing_keys({}) == list(CATALOG_KEYS)
    full = {k: f"price_{k}" for k in CATALOG_KEYS}
    assert missing_keys(full) == []
    assert missing_keys({**full, "reserved": ""}) == ["reserved"]
