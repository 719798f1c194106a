"""Stripe webhook events as billing decisions: which events matter, what each one means for an org's plan,
and the ordering guard. Pure: no I/O; the receiver, the agent and the store call these.

Setup checkouts provision pro; subscription events keep an org pro while one subscription pays
(:data:`PRO_STATUSES`); other events are ignored. Out-of-order events change nothing (per subscription:
the last ``created`` applied, and an ended one never pays again); plan records are published at times that
never go back (:func:`plan_changes`). In detail: docs/architecture.md, "Module notes".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final

import orjson

from models.billing import Plan
from models.errors import InvalidRecord

__all__ = [
    "CHECKOUT_COMPLETED",
    "CREDIT_CURRENCY",
    "ENDED_STATUSES",
    "FINAL_OUTCOMES",
    "PROMO_CREDIT_CENTS",
    "PRO_STATUSES",
    "SUBSCRIPTION_CREATED",
    "SUBSCRIPTION_DELETED",
    "SUBSCRIPTION_UPDATED",
    "WEBHOOK_EVENTS",
    "Ignore",
    "Outcome",
    "PlanState",
    "SetupCheckout",
    "StripeEvent",
    "SubState",
    "SubscriptionChange",
    "classify",
    "credit_idempotency_key",
    "is_out_of_order",
    "org_plan",
    "parse_event",
    "plan_changes",
    "routing_key",
    "subscription_idempotency_key",
]

CHECKOUT_COMPLETED: Final = "checkout.session.completed"
SUBSCRIPTION_CREATED: Final = "customer.subscription.created"
SUBSCRIPTION_UPDATED: Final = "customer.subscription.updated"
SUBSCRIPTION_DELETED: Final = "customer.subscription.deleted"
#: What the one webhook endpoint subscribes to (``edgebill stripe setup``).
WEBHOOK_EVENTS: Final = (CHECKOUT_COMPLETED, SUBSCRIPTION_CREATED, SUBSCRIPTION_UPDATED, SUBSCRIPTION_DELETED)
_SUBSCRIPTION_EVENTS: Final = frozenset({SUBSCRIPTION_CREATED, SUBSCRIPTION_UPDATED, SUBSCRIPTION_DELETED})

#: Subscription statuses in which the org is billed as pro. ``past_due`` stays pro: Stripe is still collecting,
#: and usage in that time is owed like any other.
PRO_STATUSES: Final = frozenset({"active", "trialing", "past_due"})
#: Statuses a subscription never leaves.
ENDED_STATUSES: Final = frozenset({"canceled", "incomplete_expired"})

#: The sign-up credit: $30 as a negative customer balance, applied once per org.
PROMO_CREDIT_CENTS: Final = -3000
CREDIT_CURRENCY: Final = "usd"


class Outcome(StrEnum):
    """What became of a received event (``duplicate`` is per delivery, the others per event)."""

    RECEIVED = "received"  # stored, not yet applied (the agent or the retry timer applies it)
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    OUT_OF_ORDER = "out_of_order"
    IGNORED = "ignored"
    SHADOW = "shadow"  # under authority cell: recorded what provisioning would have done
    FAILED = "failed"  # a permanent failure; re-applied on the next delivery or by `edgebill webhooks reapply`
    INVALID = "invalid"  # a record on the topic that is not a Stripe event


#: Outcomes that are final: a later delivery of the same event id is a duplicate.
FINAL_OUTCOMES: Final = frozenset({Outcome.APPLIED, Outcome.OUT_OF_ORDER, Outcome.IGNORED, Outcome.SHADOW})


@dataclass(frozen=True, slots=True)
class StripeEvent:
    """The parts of a v1 Stripe event the agent uses (the raw JSON is kept alongside)."""

    id: str
    type: str
    created: int  # unix s, Stripe's time of the event
    object: Mapping[str, Any]
    livemode: bool

    @property
    def object_id(self) -> str:
        oid = self.object.get("id")
        return oid if isinstance(oid, str) and oid else self.id

    def metadata(self) -> Mapping[str, Any]:
        meta = self.object.get("metadata")
        return meta if isinstance(meta, Mapping) else {}


def parse_event(raw: bytes | str) -> StripeEvent:
    """A Stripe event from its JSON; raises :class:`InvalidRecord` (``not_json``, ``not_an_event``)."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise InvalidRecord("not_json") from None
    if not isinstance(data, dict):
        raise InvalidRecord("not_an_event")
    ident, etype, created = data.get("id"), data.get("type"), data.get("created")
    body = data.get("data")
    obj = body.get("object") if isinstance(body, dict) else None
    if (
        not isinstance(ident, str)
        or not ident
        or len(ident) > 255
        or not isinstance(etype, str)
        or not etype
        or len(etype) > 100
        or isinstance(created, bool)
        or not isinstance(created, int)
        or created < 0
        or not isinstance(obj, dict)
    ):
        raise InvalidRecord("not_an_event")
    return StripeEvent(ident, etype, created, obj, bool(data.get("livemode", False)))


def routing_key(event: Mapping[str, Any]) -> bytes:
    """The topic key of a raw event: its object's id (events about one object stay on one partition)."""
    body = event.get("data")
    obj = body.get("object") if isinstance(body, Mapping) else None
    oid = obj.get("id") if isinstance(obj, Mapping) else None
    if isinstance(oid, str) and oid:
        return oid.encode()
    return str(event.get("id", "")).encode()


# ----------------------------------------------------------------------------------------- what an event means


@dataclass(frozen=True, slots=True)
class Ignore:
    reason: str


@dataclass(frozen=True, slots=True)
class SetupCheckout:
    """A completed setup checkout: provision ``org_id``'s pro subscription for ``customer_id``."""

    org_id: str
    customer_id: str
    session_id: str


@dataclass(frozen=True, slots=True)
class SubscriptionChange:
    """A subscription's state as of the event. ``org_id`` is None when the subscription carries no
    ``metadata.org_id`` (the agent then looks the org up by subscription or customer)."""

    subscription_id: str
    customer_id: str | None
    org_id: str | None
    status: str

    @property
    def pro(self) -> bool:
        return self.status in PRO_STATUSES


def _text(value: object, limit: int = 255) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= limit else None


def _customer_id(value: object) -> str | None:
    """``customer`` is an id, or an object when the event was built with ``expand``."""
    if isinstance(value, Mapping):
        value = value.get("id")
    return _text(value)


def classify(ev: StripeEvent) -> Ignore | SetupCheckout | SubscriptionChange:
    """What ``ev`` asks of the agent."""
    obj = ev.object
    meta = ev.metadata()
    org = _text(meta.get("org_id"))
    if ev.type == CHECKOUT_COMPLETED:
        if meta.get("type") != "setup":
            return Ignore("not a setup checkout")
        if org is None:
            return Ignore("setup checkout without metadata.org_id")
        customer = _customer_id(obj.get("customer"))
        if customer is None:
            return Ignore("setup checkout without a customer")
        return SetupCheckout(org, customer, ev.object_id)
    if ev.type in _SUBSCRIPTION_EVENTS:
        status = _text(obj.get("status"), 64)
        if ev.type == SUBSCRIPTION_DELETED:
            status = "canceled"  # whatever else the object says, the subscription has ended
        if status is None or obj.get("object") not in (None, "subscription"):
            return Ignore("not a subscription")
        return SubscriptionChange(ev.object_id, _customer_id(obj.get("customer")), org, status)
    return Ignore(f"type {ev.type} is not handled")


# ------------------------------------------------------------------------------------------- ordering guard


@dataclass(frozen=True, slots=True)
class SubState:
    """What the ledger holds for one subscription: its status and the ``created`` of the event that set it."""

    status: str
    event_created: int


def is_out_of_order(stored: SubState | None, created: int, status: str) -> bool:
    """True when an event (``created``, ``status``) must not change the stored state of its subscription.

    An ended subscription stays ended (a late ``created`` or ``updated`` cannot bring it back, even in the
    same second); otherwise an event older than the one that set the state is out of order. An event with
    the same ``created`` applies: Stripe's seconds do not order events, and repeating a state is harmless.
    """
    if stored is None:
        return False
    if stored.status in ENDED_STATUSES:
        return status not in ENDED_STATUSES
    return created < stored.event_created


def org_plan(statuses: Iterable[str]) -> Plan:
    """An org is pro while any of its subscriptions is in a paying status."""
    return Plan.PRO if any(s in PRO_STATUSES for s in statuses) else Plan.FREE


# ------------------------------------------------------------------------------------------ plan publishing


@dataclass(frozen=True, slots=True)
class PlanState:
    """The plan records this agent has published for one org (a history keyed by effective time, unix s).

    ``plan``: the current plan, which holds from ``since`` on; ``last``: the newest effective time published;
    ``floor``: the newest effective time published before ``since`` (None: nothing before it).
    """

    plan: Plan | None = None
    since: int | None = None
    last: int | None = None
    floor: int | None = None


def plan_changes(state: PlanState, plan: Plan, at: int) -> tuple[list[int], PlanState]:
    """The effective times at which to publish ``plan`` after an event of time ``at``, and the new state.

    * nothing published yet: publish at ``at``;
    * a different plan: publish at ``max(at, last)``: a change learnt late never goes behind a newer record
      (at ``last`` itself it replaces that record, whose key it shares);
    * pro again, for a time before the current pro run began (a late event about a paying subscription):
      extend the run back to ``at`` when no other record of ours lies in between;
    * otherwise nothing: the history already says so. A free plan is never extended backwards, since
      another subscription may have been paying then.
    """
    if state.plan is None or state.since is None or state.last is None:
        return [at], PlanState(plan, at, at, None)
    if plan != state.plan:
        eff = max(at, state.last)
        # At ``last`` the new record replaces the one there: what lies below that one bounds the new run.
        below_last = state.since if state.since < state.last else state.floor
        return [eff], PlanState(plan, eff, eff, state.last if eff > state.last else below_last)
    if plan is Plan.PRO and at < state.since and (state.floor is None or at > state.floor):
        return [at], PlanState(plan, at, state.last, state.floor)
    return [], state


# -------------------------------------------------------------------------------------- idempotency keys


def subscription_idempotency_key(org_id: str, generation: int) -> str:
    """``sub-create-{org}`` for an org's first provisioned subscription, ``sub-create-{org}-{n}`` for the n-th
    after that (an org that left and came back): a retry of one provisioning reuses its key, a new one does not.
    """
    return f"sub-create-{org_id}" if generation == 0 else f"sub-create-{org_id}-{generation}"


def credit_idempotency_key(org_id: str) -> str:
    """The sign-up credit is applied once per org."""
    return f"credit-{org_id}"
