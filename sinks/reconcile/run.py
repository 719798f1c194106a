"""One reconciliation: the ledger's rows of a range against Stripe's meter event summaries, the check of each
pro org's upcoming invoice, and the repair of short windows through the outbox.

Reads through :class:`~sinks.reconcile.store.ReconcileStore` and :class:`~sinks.reconcile.stripe_reader.StripeReader`;
the rules are :mod:`models.reconcile`. Used by ``edgebill reconcile`` and ``streams.reconcile``. Its Stripe
requests per run: docs/architecture.md, "Module notes".
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from models.billing import RowState
from models.invoice_check import InvoiceLineResult, compare_invoice_line
from models.reconcile import (
    DAY,
    Grouping,
    MeterConfig,
    RepairStep,
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
from models.reconcile_over import OverAction, OverStep, credit_of, over_key, plan_over_repair
from sinks.outbox_sender import DUPLICATE_NOTE
from sinks.reconcile.repair import OverDone, OverWrite, RepairDone, RepairRequest
from sinks.reconcile.store import ReconcileStore, StoredRow
from sinks.reconcile.stripe_reader import Answer, ErrorReportIds, Problem, StripeReader
from sinks.stripe.v1 import Cancellation
from sinks.stripe.v2 import ASYNC_REJECTION_NOTE, ERROR_REPORT_CURSOR

__all__ = ["MIXED", "ReconcileConfig", "ReconcileReport", "Reconciliation", "RepairReport", "Unsettled"]

log = logging.getLogger(__name__)

_ASYNC_CODE = re.compile(rf"^{re.escape(ASYNC_REJECTION_NOTE)} \(([^)]*)\)")
#: Stripe keeps v2 events (the error reports) this long.
_REPORTS_KEPT_S = 30 * DAY
_REPORT_OVERLAP_S = 600
#: The grouping of a run that compares whole UTC days where they are complete and hours elsewhere.
MIXED = "mixed"


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
    grouping: Grouping | None  # None: days where complete, hours elsewhere (:meth:`Reconciliation.compare_recent`)
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
    rows: int = 0  # meter rows of the range that could matter (sent, pending, refused, ...)
    why: str | None = None  # set by :meth:`explain` when nothing was compared

    @property
    def grouping_name(self) -> str:
        return MIXED if self.grouping is None else self.grouping.value

    @property
    def newest_compared(self) -> int | None:
        """The end of the newest window compared (unix s), None when none was."""
        return max((r.key.end for r in self.results), default=None)

    def explain(self, shadow: bool = False) -> str | None:
        """Why nothing was compared (None: something was, or Stripe could not be read): sets :attr:`why`."""
        if self.results or self.failure is not None:
            self.why = None
        elif shadow:
            self.why = "the cutover state in force is shadow: edgebill sends nothing to Stripe, so nothing is held"
        elif not self.rows:
            self.why = "no meter row of the range was sent or is waiting to be sent: there is nothing to compare"
        elif self.unsettled:
            counts: dict[str, int] = defaultdict(int)
            for u in self.unsettled:
                counts[u.reason] += 1
            parts = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
            self.why = f"every window of the range is not closed, not sent or not settled yet ({parts})"
        else:
            self.why = "no row of the range was sent to a Stripe customer (no customer, expired, or refused)"
        return self.why

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
            "range": {"from": self.lo, "to": self.hi, "grouping": self.grouping_name},
            "started_ms": self.started_ms,
            "finished_ms": self.finished_ms,
            "failure": self.failure,
            "notes": self.notes,
            "compared": len(self.results),
            "why": self.why,
            "newest_compared": self.newest_compared,
            "differences": len(self.differences),
            "by_label": dict(sorted(by_label.items())),
            "windows": [r.to_wire() for r in self.results],
            "unsettled": [u.to_wire() for u in self.unsettled],
            "invoice": [i.to_wire() for i in self.invoices] if self.invoice_checked else None,
            "stripe": {"requests": self.requests, "throttled": self.throttled, "reads_per_s": self.reads_per_s},
        }


@dataclass(slots=True)
class RepairReport:
    """What a repair planned (``applied`` False: a dry run, nothing written) or did.

    ``planned``/``done``: the rows Stripe lacks (queued again, or billed again); ``over``/``over_done``: what
    Stripe holds beyond what edgebill sent (credits, cancellations); ``refused``: what no repair can do here,
    with the reason."""

    applied: bool = False
    planned: list[tuple[WindowKey, RepairStep]] = field(default_factory=list)
    done: list[RepairDone] = field(default_factory=list)
    over: list[OverStep] = field(default_factory=list)
    over_done: list[OverDone] = field(default_factory=list)
    refused: list[tuple[WindowKey, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # cancellations Stripe could not make (transient, ...)

    @property
    def written(self) -> int:
        return sum(1 for d in self.done if d.skipped is None) + sum(1 for d in self.over_done if d.skipped is None)

    def to_wire(self) -> dict[str, Any]:
        return {
            "applied": self.applied,
            "planned": [
                {
                    "org_id": k.org_id,
                    "meter": k.meter,
                    "window": {"start": k.start, "end": k.end, "grouping": k.grouping.value},
                    "row": st.row_id,
                    "action": st.action.value,
                    "value": dec(st.value),
                    "cause": st.cause.value,
                }
                for k, st in self.planned
            ],
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
            "over": [o.to_wire() for o in self.over],
            "over_done": [{**d.step.to_wire(), "written": d.row_id, "skipped": d.skipped} for d in self.over_done],
            "refused": [
                {"org_id": k.org_id, "meter": k.meter, "window": {"start": k.start, "end": k.end}, "reason": why}
                for k, why in self.refused
            ],
            "errors": self.errors,
        }


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


def _facts(rows: Sequence[StoredRow], reports: ErrorReportIds, resent: set[str]) -> dict[str, RowFact]:
    """Each row as the comparison sees it (:class:`~models.reconcile.RowKind`, what Stripe said about it)."""
    replaced = {r.repair_of for r in rows if r.repair_of}
    out: dict[str, RowFact] = {}
    for r in rows:
        code: str | None = None
        if credit_of(r.repair_of) is not None:
            kind = RowKind.PENDING if r.state == RowState.PENDING.value else RowKind.CREDIT
        elif r.id in replaced:
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
        return self._run(ReconcileReport(lo, hi, grouping, 0), orgs)

    def compare_recent(self, *, orgs: Sequence[str] | None = None) -> ReconcileReport:
        """The lookback (``lookback_days`` UTC days, today included), as soon as each hour is settled.

        Per (org, meter) and day: the whole day when it is closed and settled (one window, fewer requests), else
        each of its hours that is (today's, and a day whose last hours are not settled yet); the other hours
        are listed as unsettled. Stripe's summaries group by ``hour`` as well as by ``day``, so a loss is seen
        within the hour, after the settle time, instead of the next UTC day.
        """
        today = self._now_ms() // 1000 // DAY * DAY
        lo, hi = today - (self.cfg.lookback_days - 1) * DAY, today + DAY
        return self._run(ReconcileReport(lo, hi, None, 0), orgs)

    def _run(self, report: ReconcileReport, orgs: Sequence[str] | None) -> ReconcileReport:
        now = self._now_ms()
        report.started_ms = now
        report.reads_per_s = self.reader.reads_per_s
        return self._measured(report, lambda: self._compare(report, orgs, now))

    def _measured(self, report: ReconcileReport, work: Callable[[], object]) -> ReconcileReport:
        """Run ``work`` for ``report``, then stamp its end and the reader's request counts (also on failure)."""
        try:
            work()
        finally:
            report.finished_ms = self._now_ms()
            report.requests = self.reader.requests
            report.throttled = self.reader.throttled
        return report

    def _readiness(
        self, rs: Sequence[StoredRow], start: int, g: Grouping, open_buckets: set[int], now: int
    ) -> str | None:
        """Why the window of ``rs`` (one org and meter) cannot be compared yet (None: it can)."""
        cfg = self.cfg
        size = cfg.bucket_seconds
        b0, b1 = window_buckets(start, g, size)
        sent = [r.sent_ms for r in rs if r.sent_ms is not None and r.state == RowState.SENT.value]
        return window_ready(
            start,
            g,
            now_s=now // 1000,
            grace_s=cfg.grace_seconds,
            settle_s=cfg.settle_seconds,
            open_samples=any(b0 <= b <= b1 for b in open_buckets),
            pending_rows=any(r.state == RowState.PENDING.value for r in rs),
            newest_sent_s=max(sent) // 1000 if sent else None,
            bucket_seconds=size,
        )

    def _windows(
        self, report: ReconcileReport, rows: Sequence[StoredRow], now: int
    ) -> set[tuple[str, str, int, Grouping]]:
        """The (org, meter, window start, grouping) to compare; the others go to ``report.unsettled``."""
        size = self.cfg.bucket_seconds
        open_buckets = self.store.open_sample_buckets(report.lo - size, report.hi - 2 * size)
        # Readiness per (org, meter, window): every row, whatever its customer, counts.
        per_window: dict[tuple[str, str, int], list[StoredRow]] = defaultdict(list)
        outer = report.grouping or Grouping.DAY
        for r in rows:
            per_window[(r.org_id, r.meter, window_of(r.bucket_end, outer))].append(r)
        ready: set[tuple[str, str, int, Grouping]] = set()
        for (org, meter, start), rs in sorted(per_window.items()):
            why = self._readiness(rs, start, outer, open_buckets, now)
            if why is None:
                ready.add((org, meter, start, outer))
                continue
            if report.grouping is not None:
                report.unsettled.append(Unsettled(org, meter, start, outer, why))
                continue
            # A day not complete yet: each of its hours, as soon as it is settled.
            by_hour: dict[int, list[StoredRow]] = defaultdict(list)
            for r in rs:
                by_hour[window_of(r.bucket_end, Grouping.HOUR)].append(r)
            for hour, hrs in sorted(by_hour.items()):
                hwhy = self._readiness(hrs, hour, Grouping.HOUR, open_buckets, now)
                if hwhy is None:
                    ready.add((org, meter, hour, Grouping.HOUR))
                else:
                    report.unsettled.append(Unsettled(org, meter, hour, Grouping.HOUR, hwhy))
        return ready

    def _compare(self, report: ReconcileReport, orgs: Sequence[str] | None, now: int) -> None:
        rows = self.store.window_rows(report.lo, report.hi, self.cfg.bucket_seconds, orgs)
        report.rows = len(rows)
        if not rows:
            return
        ready = self._windows(report, rows, now)
        keyed: dict[WindowKey, list[StoredRow]] = defaultdict(list)
        for r in rows:
            if not r.customer:
                continue
            for g in (Grouping.DAY, Grouping.HOUR):
                start = window_of(r.bucket_end, g)
                if (r.org_id, r.meter, start, g) in ready:
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
            values: dict[Grouping, dict[int, Decimal] | None] = {}
            customer_known = True
            skip = False
            for g in sorted({k.grouping for k in keys}):
                values[g] = None
                if meter is None:
                    continue
                mine = [k for k in keys if k.grouping is g]
                # One summaries list per grouping for the whole range (a page holds 100 windows).
                got = self.reader.summaries(meter.id, customer, min(k.start for k in mine), max(k.end for k in mine), g)
                if got.problem is not None and got.problem.fatal:
                    report.failure = self._failed(f"the summaries of {meter_name} for {customer}", got)
                    return
                if got.problem is Problem.NOT_FOUND and got.param == "customer":
                    customer_known = False
                elif got.value is None:
                    report.notes.append(f"summaries of {meter_name} for {customer}: {got.problem}: {got.detail}")
                    skip = True
                    break
                values[g] = got.value
            if skip:
                continue
            for k in sorted(keys):
                got_values = values.get(k.grouping)
                stripe = None if got_values is None else got_values.get(k.start, Decimal(0))
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
        return self._measured(report, lambda: self.check_invoices(report, orgs=orgs))

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

    def repair(
        self,
        report: ReconcileReport,
        *,
        by: str,
        reason: str = "",
        apply: bool = True,
        cancel: Callable[[str, str], Cancellation] | None = None,
    ) -> RepairReport:
        """Plan, and with ``apply`` make, the repairs of every window of ``report`` that differs.

        * Rows Stripe lacks (:func:`models.reconcile.plan_repair`): through the outbox
          (:meth:`sinks.reconcile.repair.ReconcileRepairs.apply_repairs`).
        * What Stripe holds beyond what edgebill sent, per hour (:func:`models.reconcile_over.plan_over_repair`):
          a credit row, or Stripe's cancellation (``cancel``, a meter-event adjustment) of an own identifier it
          held with another value and its value billed again
          (:meth:`~sinks.reconcile.repair.ReconcileRepairs.apply_over_repairs`).

        Order of side effects with ``apply``: (1) the short repairs, one transaction; (2) per cancellation:
        Stripe cancels, then the ledger records it and bills the row again (one transaction each; a
        cancellation Stripe says is too late becomes a credit); (3) each credit, one transaction each. A crash
        between (2)'s two steps leaves a row Stripe no longer holds: the next run finds that hour short and
        bills it again; every other write happens once per key (see the methods above).

        Refused: an org whose customer changed since the rows were sent (the outbox sends to the org's
        customer now; a repair never moves usage to another customer), rows out of Stripe's window, rows that
        cannot be told apart, a credit for an hour of a period before the subscription's current one (its
        invoice is finalized or about to be: a credit note is needed).
        """
        out = RepairReport(applied=apply)
        now = self._now_ms()
        diffs = [r for r in report.results if r.label.difference]
        if not diffs:
            return out
        customers = self.store.current_customers(now, sorted({r.key.org_id for r in diffs}))
        requests: list[RepairRequest] = []
        for res in diffs:
            steps, refused = plan_repair(res, now // 1000)
            over, over_refused = plan_over_repair(res, now // 1000, self.cfg.bucket_seconds)
            out.refused.extend((res.key, why) for why in refused)
            out.refused.extend((res.key, f"hour {h}: {why}") for h, why in over_refused)
            if (steps or over) and customers.get(res.key.org_id) != res.key.customer:
                out.refused.append(
                    (res.key, f"the org's customer is now {customers.get(res.key.org_id)}, not {res.key.customer}")
                )
                continue
            requests.extend(RepairRequest(s, res.key.customer, self._evidence(report, res)) for s in steps)
            out.planned.extend((res.key, s) for s in steps)
            out.over.extend(over)
        out.over = self._in_current_period(out, now)
        if not apply:
            return out
        if requests:
            out.done = self.store.apply_repairs(requests, by=by, reason=reason)
            for d in out.done:
                if d.skipped is None:
                    made = f" as {d.new_row_id}" if d.new_row_id else ""
                    log.warning("reconcile repair: %s %s (%s)%s", d.action.value, d.row_id, dec(d.value), made)
        writes: list[OverWrite] = []
        for o in out.over:
            res = next(r for r in diffs if _owns(r, o))
            ev = {**self._evidence(report, res), "hour": o.hour, "excess": dec(o.excess)}
            if o.action is OverAction.CANCEL_REPLACE:
                got = cancel(o.meter, str(o.row_id)) if cancel is not None else None
                if got is None:
                    out.errors.append(f"{o.row_id}: no Stripe client to cancel it with")
                    continue
                if got.too_late:
                    o = _as_credit(o, self.cfg.bucket_seconds)
                elif not got.cancelled:
                    out.errors.append(f"{o.row_id}: Stripe did not cancel it: {got.error}")
                    continue
            writes.append(OverWrite(o, ev))
        if writes:
            out.over_done = self.store.apply_over_repairs(writes, by=by, reason=reason)
            for od in out.over_done:
                if od.skipped is None:
                    st = od.step
                    what = f"{st.action.value} org={st.org_id} meter={st.meter} hour={st.hour} excess={dec(st.excess)}"
                    log.warning("reconcile repair: %s as %s", what, od.row_id)
        return out

    @staticmethod
    def _evidence(report: ReconcileReport, res: WindowResult) -> dict[str, Any]:
        return {
            "window": res.to_wire()["window"],
            "ledger": dec(res.ledger),
            "stripe": None if res.stripe is None else dec(res.stripe),
            "hours": [{"start": h, "ledger": dec(a), "stripe": dec(b)} for h, a, b in res.hours],
            "compared_ms": report.finished_ms,
        }

    def _in_current_period(self, out: RepairReport, now: int) -> list[OverStep]:
        """The credits whose hour lies in the current period of the org's subscription (one invoice preview
        per org with a subscription); the others are refused: their invoice is finalized or about to be."""
        credits = [o for o in out.over if o.action is OverAction.CREDIT]
        if not credits:
            return out.over
        subs = {s.org_id: s for s in self.store.subscriptions(now, sorted({o.org_id for o in credits}))}
        prices = self.store.prices()
        starts: dict[tuple[str, str], int] = {}
        for org, sub in subs.items():
            got = self.reader.invoice_preview(sub.subscription)
            if got.value is None:
                continue
            for line in got.value.lines:
                meter = prices.get(line.price_id)
                if meter is not None:
                    starts[(org, meter)] = line.period_start
        kept: list[OverStep] = []
        for o in out.over:
            start = starts.get((o.org_id, o.meter))
            if o.action is OverAction.CREDIT and start is not None and o.bucket_end < start:
                key = WindowKey(o.org_id, o.customer, o.meter, o.hour, Grouping.HOUR)
                out.refused.append(
                    (
                        key,
                        f"hour {o.hour}: {dec(o.excess)} more at Stripe in a period before the subscription's "
                        f"current one (from {start}): its invoice is finalized or about to be; issue a credit note",
                    )
                )
                continue
            kept.append(o)
        return kept


def _owns(res: WindowResult, o: OverStep) -> bool:
    k = res.key
    return (k.org_id, k.customer, k.meter) == (o.org_id, o.customer, o.meter) and k.start <= o.hour < k.end


def _as_credit(o: OverStep, bucket_seconds: int) -> OverStep:
    """A cancellation Stripe refused as too late, as a credit of the same hour instead."""
    return OverStep(
        over_key(o.org_id, o.meter, o.hour, o.excess, OverAction.CREDIT),
        OverAction.CREDIT,
        o.org_id,
        o.customer,
        o.meter,
        o.hour,
        o.excess,
        o.bucket_start,
        o.bucket_end,
        None,
        -o.excess,
    )
