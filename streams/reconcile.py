"""The scheduled reconciliation with Stripe, on the leader (:func:`install_reconcile`).

Every ``EDGEBILL_STRIPE_AUDIT_INTERVAL`` seconds, never in shadow, in a thread, one run at a time: (1) compare
the lookback and check due invoices (:class:`sinks.reconcile.run.Reconciliation`); (2) record the results
and alerts (:meth:`sinks.reconcile.store.ReconcileStore.record_run`); (3) publish unpublished alerts to
``billing-alerts``, each logged once. ``/metrics`` and the dashboard read the stored results.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Final

from models.reconcile import Grouping
from sinks.reconcile.run import ReconcileReport, Reconciliation
from sinks.reconcile.store import PendingAlert, ReconcileSnapshot, RunRecord
from streams.health import RateLimitedLog
from streams.pipeline import Deps
from streams.records import RAW_BYTES, Publish, alert_publisher, publish_alerts, run_logged

__all__ = ["ReconcileRuntime", "dashboard_json", "install_reconcile"]

log = logging.getLogger(__name__)


def _day(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


def _window(ts: int, grouping: Grouping) -> str:
    fmt = "%Y-%m-%d" if grouping is Grouping.DAY else "%Y-%m-%dT%H:00Z"
    return datetime.fromtimestamp(ts, UTC).strftime(fmt)


class ReconcileRuntime:
    """The scheduled run's behaviour, independent of Faust so tests can drive it."""

    def __init__(self, reconciliation: Reconciliation, *, alerts_topic: str, clock_ms: Callable[[], int]) -> None:
        self.rec = reconciliation
        self.store = reconciliation.store
        self.alerts_topic = alerts_topic
        self._clock_ms = clock_ms
        self.last: ReconcileReport | None = None
        self._lock = asyncio.Lock()
        self._log_throttle = RateLimitedLog(log)
        self._logged: set[tuple[str, str, str, int, str]] = set()

    def run_once(self) -> tuple[ReconcileReport, list[PendingAlert]]:
        """One scheduled run (blocking: call it from a thread). Returns the report and the alerts to publish."""
        cfg = self.rec.cfg
        self.rec.reader.begin_run()
        report = self.rec.compare_recent()
        report.explain()
        if report.failure is None:
            self.rec.check_invoices(report, due_only=True)
            report.requests = self.rec.reader.requests
            report.throttled = self.rec.reader.throttled
            report.finished_ms = self._clock_ms()
        alerts = self.store.record_run(
            RunRecord(
                started_ms=report.started_ms,
                finished_ms=report.finished_ms,
                lo=report.lo,
                hi=report.hi,
                grouping=report.grouping_name,
                results=report.results if report.failure is None else (),
                unsettled=len(report.unsettled),
                requests=report.requests,
                throttled=report.throttled,
                invoices=report.invoices if report.failure is None else (),
                error=report.failure,
            ),
            alert_runs=cfg.alert_runs,
        )
        self.last = report
        self._log(report)
        return report, alerts

    def _log(self, report: ReconcileReport) -> None:
        if report.failure is not None:
            self._log_throttle.failure(
                "stripe reconcile",
                "stripe_reconcile: the run could not read Stripe (%s); it will run again",
                report.failure,
                level=logging.ERROR,
            )
            return
        self._log_throttle.recovered("stripe reconcile")
        if report.why is not None:
            self._log_throttle.failure(
                "stripe reconcile nothing compared",
                "stripe_reconcile: nothing compared with Stripe: %s",
                report.why,
                level=logging.WARNING,
            )
        else:
            self._log_throttle.recovered("stripe reconcile nothing compared")
        diffs = report.differences
        log.info(
            "stripe_reconcile: %d window(s) of %s..%s compared, %d different, %d not settled; %d invoice line(s), "
            "%d different; %d Stripe request(s) (%d throttled) at <= %.1f/s",
            len(report.results),
            _day(report.lo),
            _day(report.hi - 1),
            len(diffs),
            len(report.unsettled),
            len(report.invoices),
            len(report.invoice_differences),
            report.requests,
            report.throttled,
            report.reads_per_s,
        )
        seen = set()
        for r in diffs:
            k = r.key
            tag = (k.org_id, k.customer, k.meter, k.start, r.label.value)
            seen.add(tag)
            if tag in self._logged:
                continue
            self._logged.add(tag)
            log.warning(
                "stripe_reconcile: %s org=%s meter=%s window=%s customer=%s ledger=%s stripe=%s causes=%s",
                r.label.value.upper(),
                k.org_id,
                k.meter,
                _window(k.start, k.grouping),
                k.customer,
                r.to_wire()["ledger"],
                r.to_wire()["stripe"],
                ", ".join(f"{c.cause.value}:{c.to_wire()['value']}" for c in r.causes) or "-",
            )
        self._logged &= seen  # a difference that went away is logged again if it comes back

    async def tick(self, publish: Publish) -> None:
        """One scheduled run, then publish the alerts not yet published (each logged once, when first due)."""
        if self._lock.locked():
            return
        async with self._lock:
            done = await run_logged(self._log_throttle, "stripe reconcile run", self.run_once)
            if done is not None:
                _report, alerts = done
                await publish_alerts(alerts, publish, self.store.mark_published, self._announce)

    def _announce(self, alert: PendingAlert) -> None:
        b = alert.body
        log.warning(
            "stripe_reconcile: ALERT %s %s org=%s meter=%s window=%s runs=%s (published to %s)",
            alert.id,
            str(b.get("label", "")).upper(),
            b.get("org_id"),
            b.get("meter"),
            (b.get("window") or {}).get("start"),
            b.get("runs"),
            self.alerts_topic,
        )


_RUN_FIELDS: Final = (
    "id",
    "started_ms",
    "finished_ms",
    "window_lo",
    "window_hi",
    "grouping",
    "compared",
    "differences",
    "unsettled",
    "requests",
    "throttled",
    "invoice_lines",
    "invoice_differences",
    "error",
)
# (the panel's key, the snapshot's) of a difference, an alert and an invoice line
_DIFFERENCE_FIELDS: Final = (
    ("org_id", "org_id"),
    ("customer", "customer_id"),
    ("meter", "meter"),
    ("window_start", "window_start"),
    ("grouping", "grouping"),
    ("label", "label"),
    ("ledger", "ledger_value"),
    ("stripe", "stripe_value"),
    ("streak", "streak"),
)
_ALERT_FIELDS: Final = tuple((k, k) for k in ("id", "org_id", "meter", "window_start", "label"))
_INVOICE_FIELDS: Final = (
    ("org_id", "org_id"),
    ("subscription", "subscription_id"),
    ("price", "price_id"),
    ("meter", "meter"),
    ("period_start", "period_start"),
    ("period_end", "period_end"),
    ("stripe", "stripe_quantity"),
    ("ledger", "ledger_value"),
    ("pending", "pending_value"),
    ("label", "label"),
    ("detail", "detail"),
    ("checked_ms", "checked_ms"),
)


def _pick(row: Mapping[str, Any], fields: Iterable[tuple[str, str]]) -> dict[str, Any]:
    return {out: row[name] for out, name in fields}


def dashboard_json(snap: ReconcileSnapshot) -> dict[str, Any]:
    """The reconciliation panel's data: the last run, the windows that differ, the alerts, the invoice checks.
    Values are exact decimal strings."""
    run = snap.last_run
    return {
        "last_run": None if run is None else {k: run[k] for k in _RUN_FIELDS},
        "newest_compared": snap.newest_compared,
        "by_label": dict(sorted(snap.by_label.items())),
        "differences": [
            {
                **_pick(d, _DIFFERENCE_FIELDS),
                "causes": [
                    {"cause": c["cause"], "value": c["value"], "rows": len(c["rows"]), "explains": c["explains"]}
                    for c in d["causes"]
                ],
            }
            for d in snap.differences[:50]
        ],
        "alerts": [{**_pick(a, _ALERT_FIELDS), "published": a["published_ms"] is not None} for a in snap.alerts],
        "invoices": [_pick(i, _INVOICE_FIELDS) for i in snap.invoices],
        "repairs": snap.repairs,
        "recent_repairs": snap.recent_repairs,
    }


def install_reconcile(app: Any, deps: Deps) -> ReconcileRuntime | None:
    """Register the scheduled reconciliation (leader), unless it is off or not configured. Each run first asks
    the cutover state in force: in shadow nothing is sent, so nothing is held at Stripe and the run is skipped
    (a cutover armed while the worker runs starts the reconciliation without a restart)."""
    cfg = deps.config
    rec = deps.reconciliation
    if rec is None or cfg.reconcile_interval_s <= 0:
        return None
    rt = ReconcileRuntime(rec, alerts_topic=cfg.topics.alerts, clock_ms=deps.clock_ms)
    alerts = app.topic(rt.alerts_topic, partitions=1, **RAW_BYTES)

    publish = alert_publisher(alerts)

    async def run() -> None:
        live = await asyncio.to_thread(lambda: deps.cutover.live)
        if not live:
            return
        await rt.tick(publish)

    app.timer(cfg.reconcile_interval_s, on_leader=True, name="edgebill.reconcile")(run)
    return rt
