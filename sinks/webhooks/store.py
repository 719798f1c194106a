"""The webhook store: received Stripe events, applied exactly once; subscription and provisioning state; the
plan records to publish on ``org-policy``; the price catalog (``billing_prices``).

One transaction per function. :meth:`WebhookStore.receive` stores events (``received``) before the agent
acks them; one ``finish_*`` transaction per event writes the effect and the final outcome (a race rolls
back as a duplicate). A crash before that commit leaves the event ``received``, applied again by the retry
timer (:meth:`WebhookStore.due`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from sqlalchemy import Connection, func, select, update

from models.billing import BillingMode, Plan
from models.errors import InvalidRecord
from models.policy import OrgPolicy
from models.webhooks import (
    ENDED_STATUSES,
    FINAL_OUTCOMES,
    PRO_STATUSES,
    Outcome,
    PlanState,
    StripeEvent,
    SubscriptionChange,
    SubState,
    is_out_of_order,
    org_plan,
    parse_event,
    plan_changes,
)
from sinks.catalog_store import CatalogStore
from sinks.schema import (
    org_policies,
    org_provisioning,
    provisioning_log,
    stripe_subscriptions,
    webhook_events,
    webhook_policy_outbox,
    webhook_receipts,
)
from sinks.webhooks.queries import WebhookQueries

__all__ = ["InboxEvent", "OrgSnapshot", "PendingPolicy", "Provisioned", "WebhookStore"]

log = logging.getLogger(__name__)

#: Outcomes an apply may move an event out of.
_OPEN: Final = (Outcome.RECEIVED.value, Outcome.FAILED.value)
_FINAL: Final = tuple(o.value for o in FINAL_OUTCOMES)
_PAYING: Final = sorted(PRO_STATUSES)


class _AlreadyFinal(Exception):
    """Another run finished the event first: roll this transaction back."""


@dataclass(frozen=True, slots=True)
class InboxEvent:
    event: StripeEvent
    outcome: Outcome
    attempts: int


@dataclass(frozen=True, slots=True)
class OrgSnapshot:
    """What provisioning needs to know about an org before calling Stripe."""

    org_id: str
    customer_id: str | None = None
    generation: int = 0
    credit_txn_id: str | None = None
    paying_subscriptions: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Provisioned:
    """The result of provisioning an org at Stripe (done now, or found done by an earlier attempt)."""

    subscription_id: str
    customer_id: str
    status: str
    credit_txn_id: str | None
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PendingPolicy:
    id: int
    org_id: str
    body: bytes


class WebhookStore(WebhookQueries, CatalogStore):
    """Reads and writes of the webhook tables (and the catalog, which provisioning reads). Thread-safe through
    the engine pool."""

    # ------------------------------------------------------------------------------------------ inbox

    def receive(self, topic: str, records: Sequence[tuple[int, int, bytes | None]], *, claim_ms: int = 0) -> list[str]:
        """Store the events of a batch of ``(partition, offset, value)`` records; returns the event ids to apply.

        The caller applies them now; :meth:`due` hands them to the retry timer only ``claim_ms`` later.

        One transaction, per record in order: a record already received (same topic, partition, offset: a
        redelivery after a crash) adds nothing; one that is not a Stripe event gets a receipt under
        ``invalid:<reason>``; a new event is inserted as ``received``; a known event with a final outcome gets
        a receipt marked duplicate; a known ``received`` / ``failed`` one is set to ``received`` again. A
        crash before the commit stores nothing: the records are read again (offsets are committed after).
        """
        now = self._clock()
        todo: dict[str, None] = {}
        counts: dict[str, int] = {}

        def count(name: str) -> None:
            counts[name] = counts.get(name, 0) + 1

        we = webhook_events.c
        with self._w.begin() as conn:
            for part, off, value in records:
                seen = conn.execute(
                    select(webhook_receipts.c.event_id).where(
                        webhook_receipts.c.topic == topic,
                        webhook_receipts.c.partition == part,
                        webhook_receipts.c.offset == off,
                    )
                ).first()
                if seen is not None:
                    row = conn.execute(select(we.outcome).where(we.event_id == seen.event_id)).first()
                    if row is not None and row.outcome in _OPEN:
                        todo[seen.event_id] = None
                    continue
                try:
                    ev = parse_event(value or b"")
                except InvalidRecord as exc:
                    self._receipt(conn, topic, part, off, f"invalid:{exc.reason}", False, now)
                    count("webhooks.invalid")
                    continue
                row = conn.execute(select(we.outcome).where(we.event_id == ev.id)).first()
                if row is None:
                    conn.execute(
                        webhook_events.insert().values(
                            event_id=ev.id,
                            type=ev.type,
                            object_id=ev.object_id,
                            org_id=None,
                            created_s=ev.created,
                            outcome=Outcome.RECEIVED.value,
                            detail=None,
                            body=(value or b"").decode("utf-8", "replace"),
                            deliveries=1,
                            attempts=0,
                            next_ms=now + claim_ms,
                            first_ms=now,
                            updated_ms=now,
                        )
                    )
                    count(f"webhooks.type.{ev.type}")
                    dup = False
                else:
                    dup = row.outcome in _FINAL
                    values: dict[str, Any] = {"deliveries": we.deliveries + 1, "updated_ms": now}
                    if not dup:
                        values.update(outcome=Outcome.RECEIVED.value, next_ms=now + claim_ms)
                    conn.execute(update(webhook_events).where(we.event_id == ev.id).values(**values))
                self._receipt(conn, topic, part, off, ev.id, dup, now)
                if dup:
                    count("webhooks.duplicate")
                else:
                    todo[ev.id] = None
            self._bump_counters(conn, counts)
        return list(todo)

    def _receipt(self, conn: Connection, topic: str, part: int, off: int, event_id: str, dup: bool, now: int) -> None:
        conn.execute(
            self._insert(webhook_receipts)
            .values(topic=topic, partition=part, offset=off, event_id=event_id, duplicate=int(dup), received_ms=now)
            .on_conflict_do_nothing(index_elements=["topic", "partition", "offset"])
        )

    def load(self, event_id: str) -> InboxEvent | None:
        """A stored event as the agent applies it (None if unknown)."""
        we = webhook_events.c
        with self.engine.connect() as conn:
            row = conn.execute(select(we.body, we.outcome, we.attempts).where(we.event_id == event_id)).first()
        if row is None:
            return None
        return InboxEvent(parse_event(row.body.encode()), Outcome(row.outcome), int(row.attempts))

    def due(self, limit: int = 100) -> list[str]:
        """Events still ``received`` whose retry time has come, oldest first."""
        we = webhook_events.c
        q = (
            select(we.event_id)
            .where(we.outcome == Outcome.RECEIVED.value, we.next_ms <= self._clock())
            .order_by(we.next_ms, we.first_ms)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [r.event_id for r in conn.execute(q)]

    def retry_later(self, event_id: str, error: str, delay_ms: int) -> None:
        """A transient failure: keep the event ``received``, count the attempt, retry after ``delay_ms``."""
        now = self._clock()
        we = webhook_events.c
        with self._w.begin() as conn:
            conn.execute(
                update(webhook_events)
                .where(we.event_id == event_id, we.outcome == Outcome.RECEIVED.value)
                .values(attempts=we.attempts + 1, next_ms=now + delay_ms, detail=error[:2000], updated_ms=now)
            )
            self._bump_counters(conn, {"webhooks.retried": 1})

    def requeue(self, event_id: str) -> Outcome | None:
        """Ask for an event to be applied again (``edgebill webhooks reapply``); returns its outcome before.

        Only an event not yet applied moves back to ``received`` (the retry timer of a running worker applies
        it under the authority in force then); an applied one stays as it is: exactly once.
        """
        now = self._clock()
        we = webhook_events.c
        with self._w.begin() as conn:
            row = conn.execute(select(we.outcome).where(we.event_id == event_id).with_for_update()).first()
            if row is None:
                return None
            before = Outcome(row.outcome)
            if before is not Outcome.APPLIED:
                conn.execute(
                    update(webhook_events)
                    .where(we.event_id == event_id)
                    .values(outcome=Outcome.RECEIVED.value, next_ms=now, detail="re-apply requested", updated_ms=now)
                )
            return before

    # ------------------------------------------------------------------------------------- snapshots

    def org_snapshot(self, org_id: str) -> OrgSnapshot:
        ss = stripe_subscriptions.c
        with self.engine.connect() as conn:
            org = conn.execute(select(org_provisioning).where(org_provisioning.c.org_id == org_id)).first()
            paying = conn.execute(select(ss.subscription_id).where(ss.org_id == org_id, ss.status.in_(_PAYING))).all()
        subs = tuple(r.subscription_id for r in paying)
        if org is None:
            return OrgSnapshot(org_id, paying_subscriptions=subs)
        return OrgSnapshot(org_id, org.customer_id, int(org.generation), org.credit_txn_id, subs)

    def resolve_org(self, subscription_id: str | None, customer_id: str | None) -> str | None:
        """The org of a subscription without ``metadata.org_id``: by the subscription, else by its customer."""
        ss = stripe_subscriptions.c
        with self.engine.connect() as conn:
            if subscription_id:
                org = conn.execute(select(ss.org_id).where(ss.subscription_id == subscription_id)).scalar()
                if org:
                    return str(org)
            if customer_id:
                org = conn.execute(
                    select(org_provisioning.c.org_id).where(org_provisioning.c.customer_id == customer_id).limit(1)
                ).scalar()
                if org:
                    return str(org)
                op = org_policies.c
                org = conn.execute(
                    select(op.org_id).where(op.stripe_customer_id == customer_id).order_by(op.effective_ms.desc())
                ).scalar()
                if org:
                    return str(org)
        return None

    # ------------------------------------------------------------------------------------- finishing

    def _claim(self, conn: Connection, event_id: str) -> None:
        """Lock the event's row; raise :class:`_AlreadyFinal` unless it is still received/failed (another run
        finished it meanwhile), which rolls the caller's transaction back."""
        we = webhook_events.c
        hit = conn.execute(
            update(webhook_events)
            .where(we.event_id == event_id, we.outcome.in_(_OPEN))
            .values(updated_ms=self._clock())
            .returning(we.event_id)
        ).first()
        if hit is None:
            raise _AlreadyFinal(event_id)

    def _set_outcome(
        self, conn: Connection, event_id: str, outcome: Outcome, detail: str | None, org: str | None
    ) -> None:
        we = webhook_events.c
        values: dict[str, Any] = {"outcome": outcome.value, "detail": detail, "updated_ms": self._clock()}
        if org is not None:
            values["org_id"] = org
        conn.execute(update(webhook_events).where(we.event_id == event_id).values(**values))
        self._bump_counters(conn, {f"webhooks.{outcome.value}": 1})

    def _finish(self, event_id: str, fn: Callable[[Connection], Outcome]) -> Outcome:
        """Run ``fn(conn)`` in one transaction after claiming the event; DUPLICATE when it was already finished."""
        try:
            with self._w.begin() as conn:
                self._claim(conn, event_id)
                return fn(conn)
        except _AlreadyFinal:
            log.info("webhook event %s was already applied; nothing done twice", event_id)
            return Outcome.DUPLICATE

    def finish_ignored(self, event_id: str, reason: str, org_id: str | None = None) -> Outcome:
        """Final outcome ``ignored`` (counted by type on receipt): one transaction, no other effect."""

        def run(conn: Connection) -> Outcome:
            self._set_outcome(conn, event_id, Outcome.IGNORED, reason, org_id)
            return Outcome.IGNORED

        return self._finish(event_id, run)

    def finish_failed(self, event_id: str, error: str, org_id: str | None = None) -> Outcome:
        """Outcome ``failed`` (a permanent error): not final, so a new delivery or a re-apply tries again."""

        def run(conn: Connection) -> Outcome:
            self._set_outcome(conn, event_id, Outcome.FAILED, error[:2000], org_id)
            return Outcome.FAILED

        return self._finish(event_id, run)

    def finish_noop(self, event_id: str, org_id: str, detail: str) -> Outcome:
        """Applied with nothing to do (e.g. the org already has a paying subscription)."""

        def run(conn: Connection) -> Outcome:
            self._set_outcome(conn, event_id, Outcome.APPLIED, detail, org_id)
            return Outcome.APPLIED

        return self._finish(event_id, run)

    def finish_subscription(self, event_id: str, created: int, change: SubscriptionChange, org_id: str) -> Outcome:
        """Apply a subscription's state as of an event, or refuse it as out of order; one transaction.

        Order: claim the event; lock the org; read the subscription's stored state; if the guard refuses the
        event, the outcome is ``out_of_order`` and nothing else changes; else upsert the subscription, derive
        the org's plan from all its subscriptions and queue the plan records due (``webhook_policy_outbox``),
        outcome ``applied``. A crash before the commit changes nothing (the event stays ``received``).
        """

        def run(conn: Connection) -> Outcome:
            self._lock_org(conn, org_id)
            stored = self._sub_state(conn, change.subscription_id)
            if is_out_of_order(stored, created, change.status):
                assert stored is not None
                detail = f"subscription {change.subscription_id} is {stored.status} since {stored.event_created}"
                self._set_outcome(conn, event_id, Outcome.OUT_OF_ORDER, detail, org_id)
                return Outcome.OUT_OF_ORDER
            self._upsert_sub(conn, change.subscription_id, org_id, change.customer_id, change.status, created, event_id)
            self._set_customer(conn, org_id, change.customer_id)
            self._update_plan(conn, org_id, created, event_id)
            self._set_outcome(conn, event_id, Outcome.APPLIED, f"subscription {change.status}", org_id)
            return Outcome.APPLIED

        return self._finish(event_id, run)

    def finish_provisioned(self, event_id: str, created: int, org_id: str, result: Provisioned) -> Outcome:
        """Record a provisioning done at Stripe, with its plan change; one transaction.

        Order: claim the event; lock the org; record the subscription (an already-ended one stays ended);
        record the org's customer, subscription, generation (+1 for a subscription not seen before) and credit;
        log the provisioning; queue the plan records due from the event's time; outcome ``applied``. A crash
        before the commit changes nothing here; Stripe already holds the subscription and the credit, and the
        retry finds them again (same idempotency keys, or by metadata), so there is still one of each.
        """

        def run(conn: Connection) -> Outcome:
            org = self._lock_org(conn, org_id)
            stored = self._sub_state(conn, result.subscription_id)
            status = stored.status if stored is not None and stored.status in ENDED_STATUSES else result.status
            self._upsert_sub(
                conn, result.subscription_id, org_id, result.customer_id, status, created, event_id, provisioned=True
            )
            new_sub = org.subscription_id != result.subscription_id
            conn.execute(
                update(org_provisioning)
                .where(org_provisioning.c.org_id == org_id)
                .values(
                    customer_id=result.customer_id,
                    subscription_id=result.subscription_id,
                    generation=org_provisioning.c.generation + (1 if new_sub else 0),
                    credit_txn_id=func.coalesce(org_provisioning.c.credit_txn_id, result.credit_txn_id),
                    updated_ms=self._clock(),
                )
            )
            self._log(
                conn,
                event_id,
                org_id,
                result.customer_id,
                "edge",
                result.subscription_id,
                result.credit_txn_id,
                result.detail,
            )
            self._update_plan(conn, org_id, created, event_id)
            self._set_outcome(conn, event_id, Outcome.APPLIED, f"provisioned {result.subscription_id}", org_id)
            return Outcome.APPLIED

        return self._finish(event_id, run)

    def finish_shadow(self, event_id: str, org_id: str, customer_id: str, would: Mapping[str, Any]) -> Outcome:
        """Authority ``cell``: log what provisioning would have done and remember the org's customer (so the
        cell's own subscription events find the org); outcome ``shadow``. One transaction; nothing at Stripe."""

        def run(conn: Connection) -> Outcome:
            self._lock_org(conn, org_id)
            self._set_customer(conn, org_id, customer_id)
            self._log(conn, event_id, org_id, customer_id, "shadow", None, None, would)
            self._set_outcome(conn, event_id, Outcome.SHADOW, "authority cell: provisioning not done", org_id)
            return Outcome.SHADOW

        return self._finish(event_id, run)

    # -------------------------------------------------------------------------------- inside a transaction

    def _lock_org(self, conn: Connection, org_id: str) -> Any:
        """The org's provisioning row, created if absent, locked until commit (PostgreSQL; SQLite writers are
        serialised anyway): two workers never update one org's plan at once."""
        conn.execute(
            self._insert(org_provisioning)
            .values(org_id=org_id, generation=0, updated_ms=self._clock())
            .on_conflict_do_nothing(index_elements=["org_id"])
        )
        return conn.execute(select(org_provisioning).where(org_provisioning.c.org_id == org_id).with_for_update()).one()

    def _set_customer(self, conn: Connection, org_id: str, customer_id: str | None) -> None:
        if customer_id:
            conn.execute(
                update(org_provisioning)
                .where(org_provisioning.c.org_id == org_id, org_provisioning.c.customer_id.is_(None))
                .values(customer_id=customer_id)
            )

    @staticmethod
    def _sub_state(conn: Connection, subscription_id: str) -> SubState | None:
        ss = stripe_subscriptions.c
        row = conn.execute(
            select(ss.status, ss.event_created_s).where(ss.subscription_id == subscription_id).with_for_update()
        ).first()
        return None if row is None else SubState(row.status, int(row.event_created_s))

    def _upsert_sub(
        self,
        conn: Connection,
        subscription_id: str,
        org_id: str,
        customer_id: str | None,
        status: str,
        created: int,
        event_id: str,
        *,
        provisioned: bool = False,
    ) -> None:
        ss = stripe_subscriptions.c
        values = {
            "subscription_id": subscription_id,
            "org_id": org_id,
            "customer_id": customer_id,
            "status": status,
            "event_created_s": created,
            "event_id": event_id,
            "provisioned": int(provisioned),
            "updated_ms": self._clock(),
        }
        stmt = self._insert(stripe_subscriptions).values(**values)
        ex = stmt.excluded
        conn.execute(
            stmt.on_conflict_do_update(
                index_elements=["subscription_id"],
                set_={
                    "org_id": ex.org_id,
                    "customer_id": func.coalesce(ex.customer_id, ss.customer_id),
                    "status": ex.status,
                    "event_created_s": func.max(ex.event_created_s, ss.event_created_s)
                    if self._dialect == "sqlite"
                    else func.greatest(ex.event_created_s, ss.event_created_s),
                    "event_id": ex.event_id,
                    "provisioned": func.max(ex.provisioned, ss.provisioned)
                    if self._dialect == "sqlite"
                    else func.greatest(ex.provisioned, ss.provisioned),
                    "updated_ms": ex.updated_ms,
                },
            )
        )

    def _update_plan(self, conn: Connection, org_id: str, at_s: int, event_id: str) -> None:
        """Derive the org's plan from its subscriptions; queue the records :func:`plan_changes` asks for."""
        ss = stripe_subscriptions.c
        subs = conn.execute(
            select(ss.subscription_id, ss.status).where(ss.org_id == org_id).order_by(ss.event_created_s.desc())
        ).all()
        plan = org_plan(r.status for r in subs)
        org = conn.execute(select(org_provisioning).where(org_provisioning.c.org_id == org_id)).one()
        state = PlanState(Plan(org.plan) if org.plan else None, org.plan_since_s, org.plan_last_s, org.plan_floor_s)
        times, new = plan_changes(state, plan, at_s)
        if times:
            paying = next((r.subscription_id for r in subs if r.status in _PAYING), None)
            mode = self._billing_mode(conn, org_id)
            now = self._clock()
            for t in times:
                pol = OrgPolicy.model_validate(
                    {
                        "org_id": org_id,
                        "plan": plan.value,
                        "billing_mode": mode.value,
                        "stripe_customer_id": org.customer_id,
                        "stripe_subscription_id": paying if plan is Plan.PRO else None,
                        "billing_provider": "stripe",
                        "effective_at": t,
                    }
                )
                conn.execute(
                    webhook_policy_outbox.insert().values(
                        org_id=org_id,
                        effective_ms=pol.effective_at_ms,
                        body=pol.to_json().decode(),
                        event_id=event_id,
                        created_ms=now,
                        published_ms=None,
                    )
                )
        conn.execute(
            update(org_provisioning)
            .where(org_provisioning.c.org_id == org_id)
            .values(
                plan=new.plan.value if new.plan else None,
                plan_since_s=new.since,
                plan_last_s=new.last,
                plan_floor_s=new.floor,
                updated_ms=self._clock(),
            )
        )

    @staticmethod
    def _billing_mode(conn: Connection, org_id: str) -> BillingMode:
        """The org's billing mode as its latest policy says (unified when it has none)."""
        op = org_policies.c
        mode = conn.execute(
            select(op.billing_mode).where(op.org_id == org_id).order_by(op.effective_ms.desc()).limit(1)
        ).scalar()
        return (
            BillingMode(mode) if mode in (BillingMode.LEGACY.value, BillingMode.UNIFIED.value) else BillingMode.UNIFIED
        )

    def _log(
        self,
        conn: Connection,
        event_id: str,
        org_id: str,
        customer_id: str,
        mode: str,
        subscription_id: str | None,
        credit_txn_id: str | None,
        detail: Mapping[str, Any],
    ) -> None:
        conn.execute(
            provisioning_log.insert().values(
                event_id=event_id,
                org_id=org_id,
                customer_id=customer_id,
                mode=mode,
                subscription_id=subscription_id,
                credit_txn_id=credit_txn_id,
                detail=orjson.dumps(detail, default=str).decode(),
                created_ms=self._clock(),
            )
        )

    # ------------------------------------------------------------------------------ plan records to publish

    def pending_policies(self, limit: int = 500) -> list[PendingPolicy]:
        """Plan records not yet on ``org-policy``, in the order they were decided."""
        wo = webhook_policy_outbox.c
        q = select(wo.id, wo.org_id, wo.body).where(wo.published_ms.is_(None)).order_by(wo.id).limit(limit)
        with self.engine.connect() as conn:
            return [PendingPolicy(int(r.id), r.org_id, r.body.encode()) for r in conn.execute(q)]

    def mark_published(self, ids: Iterable[int]) -> None:
        """After the records are on the topic. A crash before this publishes them again: harmless, a policy
        record is keyed by (org, effective time) and the same record twice is one record."""
        wanted = list(ids)
        if not wanted:
            return
        wo = webhook_policy_outbox.c
        with self._w.begin() as conn:
            conn.execute(
                update(webhook_policy_outbox)
                .where(wo.id.in_(wanted), wo.published_ms.is_(None))
                .values(published_ms=self._clock())
            )
