"""The ledger side of the reconciliation with Stripe: the rows of a range as Stripe should hold them, the pro
orgs' subscriptions and prices (reads), and each scheduled run's results, streaks, alerts and invoice checks
(writes: ``reconcile_runs``, ``reconcile_results``, ``reconcile_alerts``, ``reconcile_invoices``). The rules
are :mod:`models.reconcile`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import orjson
from sqlalchemy import and_, func, select

from models.billing import RowState
from models.invoice_check import InvoiceLineResult
from models.reconcile import WindowResult, alert_id, dec
from sinks.base import PendingAlert
from sinks.ledger.closer import not_aggregated
from sinks.reconcile.repair import ReconcileRepairs
from sinks.schema import (
    billing_prices,
    counters,
    meter_events,
    org_policies,
    reconcile_alerts,
    reconcile_invoices,
    reconcile_repairs,
    reconcile_results,
    reconcile_runs,
    tick_batches,
)

__all__ = ["PendingAlert", "ReconcileSnapshot", "ReconcileStore", "RunRecord", "StoredRow", "Subscription"]

#: The states a row of a compared window can be in and still matter (the others never reach Stripe).
_STATES = (
    RowState.SENT.value,
    RowState.REJECTED.value,
    RowState.PENDING.value,
    RowState.EXPIRED.value,
    RowState.DEFERRED_NO_CUSTOMER.value,
)


@dataclass(frozen=True, slots=True)
class StoredRow:
    """A meter row as the reconciliation reads it."""

    id: str
    org_id: str
    meter: str
    bucket_start: int
    bucket_end: int
    value: Decimal
    state: str
    customer: str | None
    sent_ms: int | None
    last_error: str | None
    repair_of: str | None


@dataclass(frozen=True, slots=True)
class Subscription:
    org_id: str
    subscription: str
    customer: str


@dataclass(slots=True)
class RunRecord:
    """One scheduled run, as stored."""

    started_ms: int
    finished_ms: int
    lo: int
    hi: int
    grouping: str
    results: Sequence[WindowResult] = ()
    unsettled: int = 0
    requests: int = 0
    throttled: int = 0
    invoices: Sequence[InvoiceLineResult] = ()
    error: str | None = None


@dataclass(slots=True)
class ReconcileSnapshot:
    """What ``/metrics`` and the dashboard show: the last run and its results, the alerts, the invoice checks."""

    last_run: dict[str, Any] | None = None
    by_label: dict[str, int] = field(default_factory=dict)
    differences: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    alerts_total: int = 0
    alerts_unpublished: int = 0
    invoices: list[dict[str, Any]] = field(default_factory=list)
    repairs: int = 0
    newest_compared: int | None = None  # end (unix s) of the newest window ever compared
    recent_repairs: list[dict[str, Any]] = field(default_factory=list)


class ReconcileStore(ReconcileRepairs):
    """Reads and writes of the reconciliation. Thread-safe through the engine pool."""

    # ------------------------------------------------------------------------------------- ledger reads

    def window_rows(
        self, lo_s: int, hi_s: int, bucket_seconds: int, orgs: Sequence[str] | None = None
    ) -> list[StoredRow]:
        """The rows whose timestamp (bucket end) is in ``[lo_s, hi_s)``, in the states that can matter."""
        me = meter_events.c
        q = select(
            me.id,
            me.org_id,
            me.meter,
            me.bucket_start,
            me.bucket_end,
            me.value,
            me.state,
            me.stripe_customer_id,
            me.sent_ms,
            me.last_error,
            me.repair_of,
        ).where(
            me.state.in_(_STATES),
            me.bucket_start >= lo_s - bucket_seconds,
            me.bucket_start < hi_s,
            me.bucket_end >= lo_s,
            me.bucket_end < hi_s,
        )
        if orgs:
            q = q.where(me.org_id.in_(list(orgs)))
        with self.engine.connect() as conn:
            return [
                StoredRow(
                    id=r.id,
                    org_id=r.org_id,
                    meter=r.meter,
                    bucket_start=int(r.bucket_start),
                    bucket_end=int(r.bucket_end),
                    value=Decimal(r.value),
                    state=r.state,
                    customer=r.stripe_customer_id,
                    sent_ms=None if r.sent_ms is None else int(r.sent_ms),
                    last_error=r.last_error,
                    repair_of=r.repair_of,
                )
                for r in conn.execute(q.order_by(me.org_id, me.bucket_start, me.id))
            ]

    def resent_ids(self, ids: Iterable[str]) -> set[str]:
        """Which of ``ids`` a repair already queued again under their own identifier."""
        wanted = list(set(ids))
        out: set[str] = set()
        rr = reconcile_repairs.c
        with self.engine.connect() as conn:
            for i in range(0, len(wanted), 500):
                out.update(
                    conn.execute(
                        select(rr.row_id).where(rr.row_id.in_(wanted[i : i + 500]), rr.action == "resend")
                    ).scalars()
                )
        return out

    def open_sample_buckets(self, first_bucket: int, last_bucket: int) -> set[int]:
        """Buckets in ``[first, last]`` holding ticks not aggregated into meter rows yet."""
        us = tick_batches.c
        with self.engine.connect() as conn:
            return {
                int(b)
                for b in conn.execute(
                    select(us.bucket_start)
                    .where(not_aggregated(), us.bucket_start >= first_bucket, us.bucket_start <= last_bucket)
                    .distinct()
                ).scalars()
            }

    def _latest_policies(self, conn: Any, now_ms: int, orgs: Sequence[str] | None) -> list[Any]:
        op = org_policies.c
        latest = select(op.org_id, func.max(op.effective_ms).label("eff")).where(op.effective_ms <= now_ms)
        if orgs:
            latest = latest.where(op.org_id.in_(list(orgs)))
        sub = latest.group_by(op.org_id).subquery()
        return list(
            conn.execute(select(org_policies).join(sub, and_(sub.c.org_id == op.org_id, sub.c.eff == op.effective_ms)))
        )

    def current_customers(self, now_ms: int, orgs: Sequence[str] | None = None) -> dict[str, str | None]:
        """org -> the Stripe customer of its policy in force now (what the sender would send to)."""
        with self.engine.connect() as conn:
            return {r.org_id: r.stripe_customer_id for r in self._latest_policies(conn, now_ms, orgs)}

    def subscriptions(self, now_ms: int, orgs: Sequence[str] | None = None) -> list[Subscription]:
        """Pro orgs billed through Stripe with a subscription and a customer, per their policy in force now."""
        with self.engine.connect() as conn:
            return [
                Subscription(r.org_id, r.stripe_subscription_id, r.stripe_customer_id)
                for r in self._latest_policies(conn, now_ms, orgs)
                if r.plan == "pro"
                and r.billing_provider == "stripe"
                and r.stripe_subscription_id
                and r.stripe_customer_id
            ]

    def prices(self) -> dict[str, str]:
        """price id -> meter event name, from the catalog ``edgebill stripe setup`` published."""
        with self.engine.connect() as conn:
            return {r.price_id: r.meter for r in conn.execute(select(billing_prices))}

    def invoice_checks(self) -> dict[str, tuple[int, int]]:
        """subscription -> (period end, checked at ms) of its latest invoice check."""
        ri = reconcile_invoices.c
        with self.engine.connect() as conn:
            return {
                r.subscription_id: (int(r.pe), int(r.at))
                for r in conn.execute(
                    select(
                        ri.subscription_id, func.max(ri.period_end).label("pe"), func.max(ri.checked_ms).label("at")
                    ).group_by(ri.subscription_id)
                )
            }

    def counter(self, name: str) -> int | None:
        with self.engine.connect() as conn:
            got = conn.execute(select(counters.c.value).where(counters.c.name == name)).scalar_one_or_none()
        return None if got is None else int(got)

    # ------------------------------------------------------------------------------------------ writes

    def record_run(self, run: RunRecord, *, alert_runs: int) -> list[PendingAlert]:
        """Store one scheduled run; record the alerts it makes due; return every alert not yet published.

        One transaction, in order: (1) insert the run; (2) per compared window: read its previous result, set
        ``streak`` (consecutive runs with a difference: +1 when the previous result differed and came from the
        last run before this one that could read Stripe, else 1; 0 when ok) and ``first_run`` (the run this
        difference was first seen in), upsert the result; (3) per window whose streak reaches ``alert_runs``,
        insert its alert unless one with the same key (window, first run) exists; (4) upsert the invoice lines
        checked, with their streaks the same way (a settled line that differs, same period) and an alert per
        line whose streak reaches ``alert_runs``; commit. Then (5) read the alerts not yet published. The
        caller publishes them, then :meth:`mark_published`: a crash in between publishes an alert again (same
        key) later. A crash before the commit records nothing: the next run starts the streaks from the run
        before, as if this one had not happened.
        """
        rr = reconcile_results.c
        ra = reconcile_alerts.c
        fresh: set[str] = set()
        summary: dict[str, int] = {}
        for res in run.results:
            summary[res.label.value] = summary.get(res.label.value, 0) + 1
        diffs = sum(1 for r in run.results if r.label.difference)
        inv_diffs = sum(1 for i in run.invoices if i.difference)
        with self._w.begin() as conn:
            # The run before this one that compared (a run that could not read Stripe breaks no streak).
            prev_run = conn.execute(
                select(func.max(reconcile_runs.c.id)).where(reconcile_runs.c.error.is_(None))
            ).scalar_one_or_none()
            run_id = int(
                conn.execute(
                    reconcile_runs.insert()
                    .values(
                        started_ms=run.started_ms,
                        finished_ms=run.finished_ms,
                        window_lo=run.lo,
                        window_hi=run.hi,
                        grouping=run.grouping,
                        compared=len(run.results),
                        differences=diffs,
                        unsettled=run.unsettled,
                        requests=run.requests,
                        throttled=run.throttled,
                        invoice_lines=len(run.invoices),
                        invoice_differences=inv_diffs,
                        error=run.error,
                        summary=json.dumps(summary, sort_keys=True),
                    )
                    .returning(reconcile_runs.c.id)
                ).scalar_one()
            )
            for res in run.results:
                k = res.key
                where = and_(
                    rr.org_id == k.org_id,
                    rr.customer_id == k.customer,
                    rr.meter == k.meter,
                    rr.window_start == k.start,
                    rr.grouping == k.grouping.value,
                )
                prev = conn.execute(select(rr.label, rr.streak, rr.first_run, rr.run_id).where(where)).first()
                if not res.label.difference:
                    streak, first = 0, None
                elif prev is not None and prev.label != "ok" and prev_run is not None and prev.run_id == prev_run:
                    streak, first = int(prev.streak) + 1, (prev.first_run or run_id)
                else:
                    streak, first = 1, run_id
                values = {
                    "label": res.label.value,
                    "ledger_value": dec(res.ledger),
                    "stripe_value": None if res.stripe is None else dec(res.stripe),
                    "lost_value": dec(res.lost),
                    "causes": json.dumps([c.to_wire() for c in res.causes]),
                    "streak": streak,
                    "first_run": first,
                    "run_id": run_id,
                    "checked_ms": run.finished_ms,
                }
                stmt = self._insert(reconcile_results).values(
                    org_id=k.org_id,
                    customer_id=k.customer,
                    meter=k.meter,
                    window_start=k.start,
                    grouping=k.grouping.value,
                    **values,
                )
                conn.execute(
                    stmt.on_conflict_do_update(
                        index_elements=["org_id", "customer_id", "meter", "window_start", "grouping"], set_=values
                    )
                )
                if streak >= alert_runs and first is not None:
                    aid = alert_id(k, int(first))
                    body = self._alert_body(aid, res, streak, int(first), run_id, run.finished_ms)
                    got = conn.execute(
                        self._insert(reconcile_alerts)
                        .values(
                            id=aid,
                            org_id=k.org_id,
                            meter=k.meter,
                            window_start=k.start,
                            label=res.label.value,
                            first_run=int(first),
                            fired_run=run_id,
                            created_ms=run.finished_ms,
                            published_ms=None,
                            body=orjson.dumps(body).decode(),
                        )
                        .on_conflict_do_nothing(index_elements=["id"])
                        .returning(ra.id)
                    ).all()
                    if got:
                        fresh.add(aid)
            for line in run.invoices:
                inv_alert = self._upsert_invoice(
                    conn, line, run_id, run.finished_ms, prev_run=prev_run, alert_runs=alert_runs
                )
                if inv_alert is not None:
                    fresh.add(inv_alert)
            self._bump_counters(conn, {"reconcile.runs": 1, "reconcile.alerts": len(fresh)})
        return self.pending_alerts(fresh)

    def record_invoices(self, lines: Sequence[InvoiceLineResult], now_ms: int) -> None:
        """Store invoice checks made outside a scheduled run (one transaction)."""
        with self._w.begin() as conn:
            for line in lines:
                self._upsert_invoice(conn, line, None, now_ms)

    def _upsert_invoice(
        self,
        conn: Any,
        line: InvoiceLineResult,
        run_id: int | None,
        now_ms: int,
        *,
        prev_run: int | None = None,
        alert_runs: int = 0,
    ) -> str | None:
        """Upsert one checked line. In a scheduled run (``alert_runs`` > 0) also its streak: consecutive runs it
        differed in (settled), for the same period; at ``alert_runs`` one alert per episode (returned when new).
        Lines checked outside a scheduled run keep their streak."""
        ri = reconcile_invoices.c
        streaks: dict[str, Any] = {}
        alert: str | None = None
        if alert_runs:
            prev = conn.execute(
                select(ri.streak, ri.first_run, ri.run_id, ri.period_end).where(
                    ri.subscription_id == line.subscription, ri.price_id == line.price_id
                )
            ).first()
            if not line.difference:
                streak, first = 0, None
            elif (
                prev is not None
                and int(prev.streak) > 0
                and prev.run_id == prev_run
                and prev_run is not None
                and int(prev.period_end) == line.period_end
            ):
                streak, first = int(prev.streak) + 1, prev.first_run or run_id
            else:
                streak, first = 1, run_id
            streaks = {"streak": streak, "first_run": first}
            if streak >= alert_runs and first is not None and run_id is not None:
                alert = self._invoice_alert(conn, line, streak, int(first), run_id, now_ms)
        values = {
            "org_id": line.org_id,
            "customer_id": line.customer,
            "meter": line.meter,
            "period_start": line.period_start,
            "period_end": line.period_end,
            "stripe_quantity": dec(line.stripe),
            "ledger_value": dec(line.ledger),
            "pending_value": dec(line.pending),
            "label": line.label.value,
            "detail": line.detail,
            "run_id": run_id,
            "checked_ms": now_ms,
            **streaks,
        }
        stmt = self._insert(reconcile_invoices).values(
            subscription_id=line.subscription, price_id=line.price_id, **values
        )
        conn.execute(stmt.on_conflict_do_update(index_elements=["subscription_id", "price_id"], set_=values))
        return alert

    def _invoice_alert(
        self, conn: Any, line: InvoiceLineResult, streak: int, first_run: int, run_id: int, now_ms: int
    ) -> str | None:
        """Record the alert of an upcoming invoice's line that differs (once per episode); its id when new."""
        aid = f"stripe_reconcile_invoice:{line.subscription}:{line.price_id}:{line.period_end}:{first_run}"
        wire = line.to_wire()
        body = {
            "type": "stripe_reconcile_invoice",
            "id": aid,
            "severity": "critical",
            **{k: wire[k] for k in ("org_id", "subscription", "customer", "price", "meter", "period", "label")},
            "stripe": wire["stripe"],
            "ledger": wire["ledger"],
            "difference": wire["difference"],
            "detail": wire["detail"],
            "runs": streak,
            "first_run": first_run,
            "fired_run": run_id,
            "created_ms": now_ms,
        }
        got = conn.execute(
            self._insert(reconcile_alerts)
            .values(
                id=aid,
                org_id=line.org_id,
                meter=(line.meter or line.price_id)[:100],
                window_start=line.period_start,
                label=line.label.value,
                first_run=first_run,
                fired_run=run_id,
                created_ms=now_ms,
                published_ms=None,
                body=orjson.dumps(body).decode(),
            )
            .on_conflict_do_nothing(index_elements=["id"])
            .returning(reconcile_alerts.c.id)
        ).all()
        return aid if got else None

    @staticmethod
    def _alert_body(
        aid: str, res: WindowResult, streak: int, first_run: int, run_id: int, now_ms: int
    ) -> dict[str, Any]:
        wire = res.to_wire()
        return {
            "type": "stripe_reconcile",
            "id": aid,
            "severity": "critical" if res.label.value in ("short", "over") else "warning",
            **{k: wire[k] for k in ("org_id", "customer", "meter", "window", "label", "ledger", "stripe")},
            "difference": wire["difference"],
            "causes": wire["causes"],
            "runs": streak,
            "first_run": first_run,
            "fired_run": run_id,
            "created_ms": now_ms,
        }

    def pending_alerts(self, fresh: Iterable[str] = ()) -> list[PendingAlert]:
        ra = reconcile_alerts.c
        new = set(fresh)
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(ra.id, ra.body).where(ra.published_ms.is_(None)).order_by(ra.created_ms, ra.id)
            ).all()
        return [PendingAlert(r.id, orjson.loads(r.body), r.id in new) for r in rows]

    def mark_published(self, ids: Sequence[str]) -> None:
        """Record that these alerts are on the alerts topic (one transaction)."""
        if not ids:
            return
        now = self._clock()
        ra = reconcile_alerts.c
        with self._w.begin() as conn:
            conn.execute(
                reconcile_alerts.update()
                .where(ra.id.in_(list(ids)), ra.published_ms.is_(None))
                .values(published_ms=now)
            )

    # ------------------------------------------------------------------------------------------ reads

    def last_run(self) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            r = conn.execute(select(reconcile_runs).order_by(reconcile_runs.c.id.desc()).limit(1)).first()
        return None if r is None else dict(r._mapping)

    def results(self, run_id: int | None = None, *, differences_only: bool = False) -> list[dict[str, Any]]:
        """The results written by ``run_id`` (default: the latest run that compared anything)."""
        rr = reconcile_results.c
        with self.engine.connect() as conn:
            if run_id is None:
                run_id = conn.execute(select(func.max(rr.run_id))).scalar_one_or_none()
                if run_id is None:
                    return []
            q = select(reconcile_results).where(rr.run_id == run_id)
            if differences_only:
                q = q.where(rr.label != "ok")
            rows = conn.execute(q.order_by(rr.window_start.desc(), rr.org_id, rr.meter)).all()
        out = []
        for r in rows:
            d = dict(r._mapping)
            d["causes"] = json.loads(d["causes"])
            out.append(d)
        return out

    def alerts(self, limit: int = 20) -> list[dict[str, Any]]:
        ra = reconcile_alerts.c
        with self.engine.connect() as conn:
            return [
                {k: v for k, v in r._mapping.items() if k != "body"}
                for r in conn.execute(select(reconcile_alerts).order_by(ra.created_ms.desc(), ra.id).limit(limit))
            ]

    def invoices(self) -> list[dict[str, Any]]:
        ri = reconcile_invoices.c
        with self.engine.connect() as conn:
            return [
                dict(r._mapping)
                for r in conn.execute(select(reconcile_invoices).order_by(ri.org_id, ri.subscription_id, ri.price_id))
            ]

    def newest_compared(self) -> int | None:
        """The end (unix s) of the newest window any run compared with Stripe (None: none ever was)."""
        rr = reconcile_results.c
        with self.engine.connect() as conn:
            got = [
                (int(start) + (86_400 if grouping == "day" else 3_600))
                for grouping, start in conn.execute(
                    select(rr.grouping, func.max(rr.window_start)).group_by(rr.grouping)
                )
                if start is not None
            ]
        return max(got, default=None)

    def recent_repairs(self, limit: int = 20) -> list[dict[str, Any]]:
        """The latest repairs (newest first), with the operator's reason and the hour of an over-billing one."""
        out = []
        for r in self.repairs(limit):
            ev = json.loads(r["evidence"] or "{}")
            out.append(
                {
                    "id": r["id"],
                    "row": r["row_id"],
                    "action": r["action"],
                    "new_row": r["new_row_id"],
                    "value": r["value"],
                    "cause": r["cause"],
                    "hour": ev.get("hour"),
                    "window": ev.get("window"),
                    "excess": ev.get("excess"),
                    "by": r["by"],
                    "reason": r["reason"] or "",
                    "created_ms": r["created_ms"],
                }
            )
        return out

    def snapshot(self) -> ReconcileSnapshot:
        """Everything ``/metrics`` and the dashboard show, read at once."""
        snap = ReconcileSnapshot(last_run=self.last_run())
        results = self.results()
        for r in results:
            snap.by_label[r["label"]] = snap.by_label.get(r["label"], 0) + 1
        snap.differences = [r for r in results if r["label"] != "ok"]
        snap.alerts = self.alerts(10)
        ra = reconcile_alerts.c
        with self.engine.connect() as conn:
            snap.alerts_total = int(conn.execute(select(func.count()).select_from(reconcile_alerts)).scalar_one())
            snap.alerts_unpublished = int(
                conn.execute(
                    select(func.count()).select_from(reconcile_alerts).where(ra.published_ms.is_(None))
                ).scalar_one()
            )
            snap.repairs = int(conn.execute(select(func.count()).select_from(reconcile_repairs)).scalar_one())
        snap.invoices = self.invoices()
        snap.newest_compared = self.newest_compared()
        snap.recent_repairs = self.recent_repairs(10)
        return snap
