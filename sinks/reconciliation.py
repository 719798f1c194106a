"""One reconciliation: the ledger's rows of a range against what Stripe holds (meter event summaries), the check
of each pro org's upcoming invoice (invoice preview), and the repair of short windows through the outbox.

Reads the ledger through :class:`~sinks.reconcile_store.ReconcileStore` and Stripe through
:class:`~sinks.stripe_reconcile.StripeReader` (paced, read-only); the rules are :mod:`models.reconcile`. Used by
``edgebill reconcile`` and by the worker's scheduled run (``streams.reconcile``), which stores the results.

Stripe requests per run: one list of the meters; one list of the v2 error reports since the ledger's
error-report cursor (only when rows were sent); per (customer, meter) with settled windows, one summaries list
for the whole range (a page holds 100 windows); per window that differs, one more, by hour, to find which rows
are missing; per subscription checked, one invoice preview.
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from models.billing import RowState
from models.invoice_check import InvoiceLineResult, compare_invoice_line
from models.reconcile import (
    DAY,
    Grouping,
    Label,
    MeterConfig,
    RowFact,
    RowKind,
    WindowKey,
    WindowResult,
    aligned_range,
    choose_meter,
    compare_window,
    dec,
    meter_problems,
    plan_repair,
    window_buckets,
    window_of,
    window_ready,
)
from sinks.outbox import DUPLICATE_NOTE
from sinks.reconcile_repair import RepairDone, RepairRequest
from sinks.reconcile_store import ReconcileStore, StoredRow
from sinks.stripe_reconcile import Answer, ErrorReportIds, Problem, StripeReader
from sinks.stripe_v2 import ASYNC_REJECTION_NOTE, ERROR_REPORT_CURSOR

__all__ = ["ReconcileConfig", "ReconcileReport", "Reconciliation", "RepairReport", "Unsettled"]

log = logging.getLogger(__name__)

_ASYNC_CODE = re.compile(rf"^{re.escape(ASYNC_REJECTION_NOTE)} \(([^)]*)\)")
#: Stripe keeps v2 events (the error reports) this long.
_REPORTS_KEPT_S = 30 * DAY
_REPORT_OVERLAP_S = 600


@dataclass(frozen=True, slots=True)
class ReconcileConfig:
    """``settle_seconds``: a window is compared only once its newest row was sent at least this long ago
    (Stripe's summaries are eventually consistent); ``lookback_days``: what the scheduled run compares;
    ``alert_runs``: consecutive runs a difference must persist for before it alerts; ``invoice_ahead_seconds``:
    the scheduled run checks a subscription's upcoming invoice within this much of its period end (and once
    when first seen)."""

    bucket_seconds: int
    grace_seconds: int = 600
    settle_seconds: int = 600
    lookback_days: int = 7
    alert_runs: int = 2
    invoice_ahead_seconds: int = 72 * 3600


@dataclass(frozen=True, slots=True)
class Unsettled:
    org_id: str
    meter: str
    start: int
    grouping: Grouping
    reason: str

    def to_wire(self) -> dict[str, Any]:
        return {
            "org_id": self.org_id,
            "meter": self.meter,
            "window": {"start": self.start, "end": self.start + self.grouping.seconds, "grouping": self.grouping.value},
            "reason": self.reason,
        }


@dataclass(slots=True)
class ReconcileReport:
    lo: int
    hi: int
    grouping: Grouping
    started_ms: int
    finished_ms: int = 0
    results: list[WindowResult] = field(default_factory=list)
    unsettled: list[Unsettled] = field(default_factory=list)
    failure: str | None = None  # Stripe could not be read at all (unreachable, key refused, throttled)
    notes: list[str] = field(default_factory=list)  # partial problems (an unreadable error-report list, ...)
    invoices: list[InvoiceLineResult] = field(default_factory=list)
    invoice_checked: bool = False
    requests: int = 0
    throttled: int = 0
    reads_per_s: float = 0.0

    @property
    def differences(self) -> list[WindowResult]:
        return [r for r in self.results if r.label.difference]

    @property
    def invoice_differences(self) -> list[InvoiceLineResult]:
        return [i for i in self.invoices if i.difference]

    def to_wire(self) -> dict[str, Any]:
        by_label: dict[str, int] = defaultdict(int)
        for r in self.results:
            by_label[r.label.value] += 1
        return {
            "range": {"from": self.lo, "to": self.hi, "grouping": self.grouping.value},
            "started_ms": self.started_ms,
            "finished_ms": self.finished_ms,
            "failure": self.failure,
            "notes": self.notes,
            "compared": len(self.results),
            "differences": len(self.differences),
            "by_label": dict(sorted(by_label.items())),
            "windows": [r.to_wire() for r in self.results],
            "unsettled": [u.to_wire() for u in self.unsettled],
            "invoice": [i.to_wire() for i in self.invoices] if self.invoice_checked else None,
            "stripe": {"requests": self.requests, "throttled": self.throttled, "reads_per_s": self.reads_per_s},
        }


@dataclass(slots=True)
class RepairReport:
    done: list[RepairDone] = field(default_factory=list)
    refused: list[tuple[WindowKey, str]] = field(default_factory=list)

    def to_wire(self) -> dict[str, Any]:
        return {
            "done": [
                {
                    "row": d.row_id,
                    "action": d.action.value,
                    "value": dec(d.value),
                    "new_row": d.new_row_id,
                    "skipped": d.skipped,
                }
                for d in self.done
            ],
            "refused": [
                {"org_id": k.org_id, "meter": k.meter, "window": {"start": k.start, "end": k.end}, "reason": why}
                for k, why in self.refused
            ],
        }


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _facts(rows: Sequence[StoredRow], reports: ErrorReportIds, resent: set[str]) -> dict[str, RowFact]:
    """Each row as the comparison sees it (:class:`~models.reconcile.RowKind`, what Stripe said about it)."""
    replaced = {r.repair_of for r in rows if r.repair_of}
    out: dict[str, RowFact] = {}
    for r in rows:
        code: str | None = None
        if r.id in replaced:
            kind = RowKind.REPLACED
        elif r.state == RowState.SENT.value:
            kind = RowKind.SENT
        elif r.state == RowState.PENDING.value:
            kind = RowKind.PENDING
        elif r.state == RowState.REJECTED.value and (m := _ASYNC_CODE.match(r.last_error or "")):
            kind, code = RowKind.REJECTED_AFTER_SEND, m.group(1)
        else:
            kind = RowKind.NOT_SENT
        held = r.id in reports.held or (kind is RowKind.SENT and (r.last_error or "").startswith(DUPLICATE_NOTE))
        out[r.id] = RowFact(
            id=r.id,
            value=r.value,
            kind=kind,
            bucket_end=r.bucket_end,
            sent_ms=r.sent_ms,
            error_code=code,
            reported=reports.refused.get(r.id) if kind is RowKind.SENT else None,
            held=held,
            resent=r.id in resent,
            repair_of=r.repair_of,
        )
    return out


class Reconciliation:
    """Compares, checks invoices, repairs. One instance can serve many runs (the worker keeps one)."""

    def __init__(
        self,
        store: ReconcileStore,
        reader: StripeReader,
        cfg: ReconcileConfig,
        *,
        now_ms: Callable[[], int] = _wall_ms,
    ) -> None:
        self.store = store
        self.reader = reader
        self.cfg = cfg
        self._now_ms = now_ms

    # ---------------------------------------------------------------------------------------- compare

    def compare(
        self, lo_s: int, hi_s: int, grouping: Grouping, *, orgs: Sequence[str] | None = None
    ) -> ReconcileReport:
        """Every settled window of ``[lo_s, hi_s)`` (aligned to ``grouping``) against Stripe's summaries.

        Windows that are not closed or not sent yet, or sent less than ``settle_seconds`` ago, are listed as
        unsettled and not compared. A failure to read Stripe at all ends the run with ``failure`` set.
        """
        lo, hi = aligned_range(lo_s, hi_s, grouping)
        now = self._now_ms()
        report = ReconcileReport(lo, hi, grouping, started_ms=now, reads_per_s=self.reader.reads_per_s)
        try:
            self._compare(report, orgs, now)
        finally:
            report.finished_ms = self._now_ms()
            report.requests = self.reader.requests
            report.throttled = self.reader.throttled
        return report

    def _compare(self, report: ReconcileReport, orgs: Sequence[str] | None, now: int) -> None:
        cfg = self.cfg
        size = cfg.bucket_seconds
        g = report.grouping
        rows = self.store.window_rows(report.lo, report.hi, size, orgs)
        if not rows:
            return
        first, _ = window_buckets(report.lo, g, size)
        _, last = window_buckets(report.hi - g.seconds, g, size)
        open_buckets = self.store.open_sample_buckets(first, last)
        # Readiness per (org, meter, window): every row, whatever its customer, counts.
        per_window: dict[tuple[str, str, int], list[StoredRow]] = defaultdict(list)
        for r in rows:
            per_window[(r.org_id, r.meter, window_of(r.bucket_end, g))].append(r)
        ready: set[tuple[str, str, int]] = set()
        for (org, event_name, start), rs in sorted(per_window.items()):
            b0, b1 = window_buckets(start, g, size)
            sent = [r.sent_ms for r in rs if r.sent_ms is not None and r.state == RowState.SENT.value]
            why = window_ready(
                start,
                g,
                now_s=now // 1000,
                grace_s=cfg.grace_seconds,
                settle_s=cfg.settle_seconds,
                open_samples=any(b0 <= b <= b1 for b in open_buckets),
                pending_rows=any(r.state == RowState.PENDING.value for r in rs),
                newest_sent_s=max(sent) // 1000 if sent else None,
            )
            if why is None:
                ready.add((org, event_name, start))
            else:
                report.unsettled.append(Unsettled(org, event_name, start, g, why))
        keyed: dict[WindowKey, list[StoredRow]] = defaultdict(list)
        for r in rows:
            start = window_of(r.bucket_end, g)
            if r.customer and (r.org_id, r.meter, start) in ready:
                keyed[WindowKey(r.org_id, r.customer, r.meter, start, g)].append(r)
        if not keyed:
            return
        meters = self.reader.meters()
        if meters.value is None:
            report.failure = self._failed("the billing meters", meters)
            return
        reports = self._error_reports(rows, report, now)
        if report.failure:
            return
        resent = self.store.resent_ids(r.id for rs in keyed.values() for r in rs)
        facts = _facts(rows, reports, resent)
        by_pair: dict[tuple[str, str], list[WindowKey]] = defaultdict(list)
        for k in keyed:
            by_pair[(k.customer, k.meter)].append(k)
        for (customer, meter_name), keys in sorted(by_pair.items()):
            meter = choose_meter(meter_name, meters.value)
            issues = meter_problems(meter_name, meter)
            values: dict[int, Decimal] | None = None
            customer_known = True
            if meter is not None:
                got = self.reader.summaries(meter.id, customer, min(k.start for k in keys), max(k.end for k in keys), g)
                if got.problem is not None and got.problem.fatal:
                    report.failure = self._failed(f"the summaries of {meter_name} for {customer}", got)
                    return
                if got.problem is Problem.NOT_FOUND and got.param == "customer":
                    customer_known = False
                elif got.value is None:
                    report.notes.append(f"summaries of {meter_name} for {customer}: {got.problem}: {got.detail}")
                    continue
                values = got.value
            for k in sorted(keys):
                stripe = None if values is None else values.get(k.start, Decimal(0))
                result = self._one(k, [facts[r.id] for r in keyed[k]], stripe, issues, customer_known, meter)
                if isinstance(result, str):
                    report.failure = result
                    return
                report.results.append(result)

    def _one(
        self,
        key: WindowKey,
        facts: list[RowFact],
        stripe: Decimal | None,
        issues: list[str],
        customer_known: bool,
        meter: MeterConfig | None,
    ) -> WindowResult | str:
        """The window's result, with its hours read when it differs; a string: Stripe could not be read."""
        result = compare_window(key, facts, stripe, meter_issues=issues, customer_known=customer_known)
        if stripe is None or stripe == result.ledger or meter is None:
            return result
        if key.grouping is Grouping.HOUR:
            hours: dict[int, Decimal] | None = {key.start: stripe}
        else:
            got = self.reader.summaries(meter.id, key.customer, key.start, key.end, Grouping.HOUR)
            if got.problem is not None and got.problem.fatal:
                return self._failed(f"the hourly summaries of {key.meter} for {key.customer}", got)
            hours = got.value
        if hours is None:
            return result
        return compare_window(key, facts, stripe, meter_issues=issues, customer_known=customer_known, hours=hours)

    def _error_reports(self, rows: Sequence[StoredRow], report: ReconcileReport, now: int) -> ErrorReportIds:
        """Stripe's error reports the ledger has not applied yet (since its cursor, with an overlap)."""
        sent = [r.sent_ms for r in rows if r.sent_ms is not None and r.state == RowState.SENT.value]
        if not sent:
            return ErrorReportIds()
        cursor = self.store.counter(ERROR_REPORT_CURSOR)
        since = min(sent) / 1000 if cursor is None else cursor / 1000
        since = max(since - _REPORT_OVERLAP_S, now / 1000 - _REPORTS_KEPT_S)
        got = self.reader.error_reports(since)
        if got.value is not None:
            return got.value
        if got.problem is not None and got.problem.fatal:
            report.failure = self._failed("the v2 error reports", got)
        else:
            report.notes.append(f"error reports not read ({got.problem}: {got.detail}): causes may be incomplete")
        return ErrorReportIds()

    @staticmethod
    def _failed(what: str, got: Answer[Any]) -> str:
        return f"reading {what}: {got.problem}: {got.detail}"

    # --------------------------------------------------------------------------------------- invoices

    def invoices(self, *, orgs: Sequence[str] | None = None) -> ReconcileReport:
        """A report of the invoice check alone (see :meth:`check_invoices`), for every pro org with a subscription."""
        now = self._now_ms()
        day = now // 1000 // DAY * DAY
        report = ReconcileReport(day, day + DAY, Grouping.DAY, started_ms=now, reads_per_s=self.reader.reads_per_s)
        try:
            self.check_invoices(report, orgs=orgs)
        finally:
            report.finished_ms = self._now_ms()
            report.requests = self.reader.requests
            report.throttled = self.reader.throttled
        return report

    def check_invoices(
        self, report: ReconcileReport, *, orgs: Sequence[str] | None = None, due_only: bool = False
    ) -> None:
        """Each pro org's upcoming invoice (Stripe's preview of its subscription) against the ledger.

        Per usage line: the line's quantity against what Stripe should hold for the line's meter and period
        (as for a window), rows not yet sent shown apart. ``due_only`` (the scheduled run): only subscriptions
        never checked, past their last checked period, or within ``invoice_ahead_seconds`` of its end.
        """
        report.invoice_checked = True
        now = self._now_ms()
        subs = self.store.subscriptions(now, orgs)
        if due_only:
            checks = self.store.invoice_checks()
            ahead = self.cfg.invoice_ahead_seconds
            subs = [
                s
                for s in subs
                if s.subscription not in checks
                or checks[s.subscription][0] <= now // 1000
                or checks[s.subscription][0] - now // 1000 <= ahead
            ]
        if not subs:
            return
        prices = self.store.prices()
        for sub in subs:
            got = self.reader.invoice_preview(sub.subscription)
            if got.value is None:
                if got.problem is not None and got.problem.fatal:
                    report.failure = self._failed(f"the invoice preview of {sub.subscription}", got)
                    return
                report.notes.append(
                    f"invoice preview of {sub.subscription} ({sub.org_id}): {got.problem}: {got.detail}"
                )
                continue
            preview = got.value
            lines = [ln for ln in preview.lines if ln.period_end > ln.period_start]
            if not lines:
                continue
            rows = self.store.window_rows(
                min(ln.period_start for ln in lines),
                max(ln.period_end for ln in lines),
                self.cfg.bucket_seconds,
                [sub.org_id],
            )
            facts = _facts(rows, ErrorReportIds(), set())
            customer = preview.customer or sub.customer
            for line in lines:
                meter = prices.get(line.price_id)
                report.invoices.append(
                    self._line(sub.org_id, sub.subscription, customer, line, meter, rows, facts, now)
                )

    def _line(
        self,
        org: str,
        subscription: str,
        customer: str,
        line: Any,
        meter: str | None,
        rows: Sequence[StoredRow],
        facts: dict[str, RowFact],
        now: int,
    ) -> InvoiceLineResult:
        mine = [
            r
            for r in rows
            if r.meter == meter
            and line.period_start <= r.bucket_end < line.period_end
            and r.customer in (customer, None)
        ]
        expected = [facts[r.id] for r in mine if r.customer == customer and facts[r.id].kind.expected]
        pending = [facts[r.id] for r in mine if facts[r.id].kind is RowKind.PENDING]
        ledger = sum((f.value for f in expected), Decimal(0))
        waiting = sum((f.value for f in pending), Decimal(0))
        recent = [f for f in expected if f.sent_ms is not None and f.sent_ms > now - self.cfg.settle_seconds * 1000]
        label = compare_invoice_line(line.quantity, ledger, meter_known=meter is not None)
        notes = []
        if meter is None:
            notes.append("a price that is not in billing_prices (not published by `edgebill stripe setup`)")
        if waiting:
            notes.append(f"{dec(waiting)} in rows not sent yet")
        if recent:
            notes.append(f"{len(recent)} row(s) sent less than {self.cfg.settle_seconds} s ago: not settled")
        return InvoiceLineResult(
            org_id=org,
            subscription=subscription,
            customer=customer,
            price_id=line.price_id,
            meter=meter,
            period_start=line.period_start,
            period_end=line.period_end,
            stripe=line.quantity,
            ledger=ledger,
            pending=waiting,
            label=label,
            detail="; ".join(notes),
            settled=not recent,
        )

    # ----------------------------------------------------------------------------------------- repair

    def repair(self, report: ReconcileReport, *, by: str) -> RepairReport:
        """Repair the short windows of ``report`` through the outbox (see :mod:`sinks.reconcile_repair`).

        Refused: a window that is not short (``over`` goes to the over-billing path), rows out of Stripe's
        window, rows that cannot be told apart, and an org whose customer changed since the rows were sent
        (the outbox sends to the org's customer now; a repair never moves usage to another customer).
        """
        out = RepairReport()
        now = self._now_ms()
        shorts = [r for r in report.results if r.label.difference]
        if not shorts:
            return out
        customers = self.store.current_customers(now, sorted({r.key.org_id for r in shorts}))
        requests: list[RepairRequest] = []
        for res in shorts:
            steps, refused = plan_repair(res, now // 1000)
            out.refused.extend((res.key, why) for why in refused)
            if steps and customers.get(res.key.org_id) != res.key.customer:
                out.refused.append(
                    (res.key, f"the org's customer is now {customers.get(res.key.org_id)}, not {res.key.customer}")
                )
                continue
            evidence = {
                "window": res.to_wire()["window"],
                "ledger": dec(res.ledger),
                "stripe": None if res.stripe is None else dec(res.stripe),
                "hours": [{"start": h, "ledger": dec(a), "stripe": dec(b)} for h, a, b in res.hours],
                "compared_ms": report.finished_ms,
            }
            requests.extend(RepairRequest(s, res.key.customer, evidence) for s in steps)
        if requests:
            out.done = self.store.apply_repairs(requests, by=by)
            for d in out.done:
                if d.skipped is None:
                    log.warning(
                        "reconcile repair: %s %s (%s)%s",
                        d.action.value,
                        d.row_id,
                        dec(d.value),
                        f" as {d.new_row_id}" if d.new_row_id else "",
                    )
        return out


def labels(results: Iterable[WindowResult]) -> dict[str, int]:
    """Windows by label."""
    out: dict[str, int] = defaultdict(int)
    for r in results:
        out[r.label.value] += 1
    for label in Label:
        out.setdefault(label.value, 0)
    return dict(out)
