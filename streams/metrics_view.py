"""The ``/metrics`` page: the process registry (:mod:`sinks.observe`) and the ledger's durable figures.

In-process metrics reset with the process; durable figures (:class:`sinks.parity.MetricsSnapshot`,
:class:`sinks.reconcile.store.ReconcileSnapshot`) are read from the ledger at scrape time. Unless
``per_org``, no series names an org, a customer or an amount, and the series are bounded. The exported
names: docs/architecture.md, "Module notes".
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator
from decimal import Decimal
from typing import Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sinks.observe import REGISTRY
from sinks.parity import MetricsSnapshot
from sinks.reconcile.store import ReconcileSnapshot

__all__ = ["ReconcileCollector", "SnapshotCollector", "render_metrics"]

# ledger counter -> (exported counter name without _total, help)
_COUNTERS: Final = {
    "ticks.ingested": ("edgebill_ticks_ingested", "Usage ticks written to the ledger (first time seen)."),
    "records.rejected": ("edgebill_ticks_rejected", "Usage-tick records or array elements dead-lettered."),
    "ticks.duplicate": ("edgebill_ticks_duplicate", "Usage ticks seen again (dedup by bucket and tick id)."),
    "ticks.conflicting_duplicate": (
        "edgebill_conflicting_duplicate_ticks",
        "Usage ticks whose id was stored already with another payload (the first copy counts; dead-lettered).",
    ),
    "ticks.zombie": ("edgebill_ticks_zombie", "Usage ticks from a worker that did not own the sandbox (not billed)."),
    "scale.rejected": ("edgebill_scale_events_rejected", "sandbox-scale-events records dead-lettered."),
}

# Where a figure may be counted under more than one ledger counter name (zombie ticks are recorded by the
# closer as unbilled usage with reason "zombie").
_ALIASES: Final = {"ticks.zombie": ("ticks.zombie", "unbilled.zombie")}


class SnapshotCollector(Collector):
    """Turns one :class:`MetricsSnapshot` into metric families (a fresh one per scrape)."""

    def __init__(
        self, snap: MetricsSnapshot, consumed_topics: Collection[str], now_s: float, *, per_org: bool = False
    ) -> None:
        self.snap = snap
        self.topics = consumed_topics
        self.now_s = now_s
        self.per_org = per_org

    def collect(self) -> Iterator[Metric]:
        s = self.snap
        for key, (name, doc) in _COUNTERS.items():
            yield _one(CounterMetricFamily, name, doc, sum(s.counters.get(k, 0) for k in _ALIASES.get(key, (key,))))
        yield _one(CounterMetricFamily, "edgebill_buckets_closed", "Buckets closed by the closer.", s.buckets_closed)
        yield _by(
            "edgebill_meter_rows",
            "Meter rows in the outbox, by state.",
            ["state"],
            (([state], n) for state, n in sorted(s.rows_by_state.items())),
        )
        yield _by(
            "edgebill_consumer_lag",
            "Records not yet written to the ledger: log end (as last reported) - committed offset - 1.",
            ["topic", "partition"],
            (
                ([p.topic, str(p.partition)], max(0, p.highwater - (p.committed_offset + 1)))
                for p in sorted(s.progress, key=lambda p: (p.topic, p.partition))
                if p.topic in self.topics and p.highwater is not None
            ),
        )
        yield from self._parity()
        yield _one(
            GaugeMetricFamily, "edgebill_parity_bucket_start_seconds", "Start of that bucket (unix s).", s.parity_bucket
        )
        yield _one(
            GaugeMetricFamily,
            "edgebill_parity_clean_hours",
            "Consecutive clean settled hours of parity (the cutover gate).",
            None if s.gate is None else float(s.gate.clean_hours),
        )
        yield _one(
            GaugeMetricFamily,
            "edgebill_parity_refresh_age_seconds",
            "Seconds since the last parity refresh.",
            None if s.refreshed_ms is None else max(0.0, self.now_s - s.refreshed_ms / 1000),
        )
        yield _by(
            "edgebill_ledger_counter",
            "Every counter of the ledger.",
            ["name"],
            (([name], v) for name, v in sorted(s.counters.items())),
        )

    def _parity(self) -> Iterator[Metric]:
        """The newest settled bucket's parity: drift per org (only ``per_org``), worst, rows by status, aggregate."""
        rows = self.snap.parity_rows
        counts: dict[str, int] = {"ok": 0, "drift": 0, "edge_only": 0, "cell_only": 0}
        edge = cell = 0
        for r in rows:
            counts[r.status.value] = counts.get(r.status.value, 0) + 1
            edge += r.edge_mb_s * 1000
            cell += r.cell_mb_ms
        if self.per_org:
            yield _by(
                "edgebill_parity_drift",
                "(edge - cell) / cell per pro org, newest settled bucket with parity rows.",
                ["org_id"],
                (([r.org_id], float(r.drift)) for r in rows),
            )
        yield _one(
            GaugeMetricFamily,
            "edgebill_parity_worst_drift",
            "Largest |drift| among the pro orgs of the newest settled bucket.",
            max(abs(float(r.drift)) for r in rows) if rows else None,
        )
        yield _by(
            "edgebill_parity_rows",
            "Parity rows of the newest settled bucket, by status.",
            ["status"],
            (([status], n) for status, n in sorted(counts.items())),
        )
        aggregate = (float((edge - cell) / cell) if cell else (1.0 if edge else 0.0)) if rows else None
        yield _one(
            GaugeMetricFamily,
            "edgebill_parity_aggregate_drift",
            "Aggregate drift of the newest settled bucket.",
            aggregate,
        )


def _one(family: type[GaugeMetricFamily | CounterMetricFamily], name: str, doc: str, value: float | None) -> Metric:
    """A metric of one unlabelled sample, ``value`` (none when None)."""
    m = family(name, doc)
    if value is not None:
        m.add_metric([], value)
    return m


def _by(name: str, doc: str, labels: list[str], samples: Iterable[tuple[list[str], float]]) -> Metric:
    """A gauge with a sample per label values."""
    g = GaugeMetricFamily(name, doc, labels=labels)
    for values, v in samples:
        g.add_metric(values, v)
    return g


_LABELS: Final = ("ok", "short", "over", "unknown_customer", "meter_misconfigured")


class ReconcileCollector(Collector):
    """The reconciliation with Stripe, from its last scheduled run (a fresh one per scrape)."""

    def __init__(self, snap: ReconcileSnapshot, now_s: float, *, per_org: bool = False) -> None:
        self.snap = snap
        self.now_s = now_s
        self.per_org = per_org

    def collect(self) -> Iterator[Metric]:
        s = self.snap
        yield _by(
            "edgebill_reconcile_windows",
            "Windows (org, customer, meter, day or hour) compared with Stripe's summaries in the last run, by label.",
            ["label"],
            (([label], s.by_label.get(label, 0)) for label in _LABELS),
        )
        if self.per_org:
            sums: dict[tuple[str, str, str], Decimal] = {}
            for d in s.differences:
                if d["stripe_value"] is not None:
                    k = (d["org_id"], d["meter"], d["label"])
                    sums[k] = sums.get(k, Decimal(0)) + Decimal(d["stripe_value"]) - Decimal(d["ledger_value"])
            yield _by(
                "edgebill_reconcile_difference",
                "Stripe's value minus the ledger's (meter units) over the windows that differ, per org, meter, label.",
                ["org_id", "meter", "label"],
                ((list(k), float(v)) for k, v in sorted(sums.items())),
            )
        orgs: dict[str, set[str]] = {label: set() for label in _LABELS if label != "ok"}
        for d in s.differences:
            orgs.setdefault(d["label"], set()).add(d["org_id"])
        yield _by(
            "edgebill_reconcile_differing_orgs",
            "Orgs with a window that differs from Stripe in the last run, by label.",
            ["label"],
            (([label], len(orgs[label])) for label in sorted(orgs)),
        )
        yield from self._run_gauges()
        yield _one(
            CounterMetricFamily,
            "edgebill_reconcile_alerts",
            "Reconciliation alerts recorded (a difference in consecutive runs).",
            s.alerts_total,
        )
        yield _one(
            CounterMetricFamily,
            "edgebill_reconcile_repairs",
            "Rows queued again or billed again by repairs.",
            s.repairs,
        )
        counts: dict[str, int] = {}
        for i in s.invoices:
            counts[i["label"]] = counts.get(i["label"], 0) + 1
        yield _by(
            "edgebill_reconcile_invoice_lines",
            "Invoice-preview usage lines checked, by label.",
            ["label"],
            (([label], counts.get(label, 0)) for label in _LABELS),
        )

    def _run_gauges(self) -> Iterator[Metric]:
        """The last run's figures, and the newest window compared."""
        s = self.snap
        run = s.last_run or {}
        for name, doc, value in (
            (
                "edgebill_reconcile_unsettled",
                "Windows of the last run not compared yet (not closed, sent or settled).",
                run.get("unsettled"),
            ),
            ("edgebill_reconcile_requests", "Stripe requests the last run made.", run.get("requests")),
            ("edgebill_reconcile_throttled", "Of those, answered 429 (retried after a backoff).", run.get("throttled")),
            (
                "edgebill_reconcile_run_failed",
                "1 when the last run could not read Stripe.",
                None if not run else int(bool(run.get("error"))),
            ),
            (
                "edgebill_reconcile_alerts_unpublished",
                "Reconciliation alerts not yet on the alerts topic.",
                s.alerts_unpublished,
            ),
            (
                "edgebill_reconcile_newest_compared_timestamp_seconds",
                "End (unix s) of the newest window any run compared with Stripe: a stale value is a reconciliation "
                "that compares nothing.",
                s.newest_compared,
            ),
            (
                "edgebill_reconcile_last_run_seconds",
                "Seconds since the last scheduled run ended.",
                None if run.get("finished_ms") is None else max(0.0, self.now_s - run["finished_ms"] / 1000),
            ),
        ):
            yield _one(GaugeMetricFamily, name, doc, None if value is None else float(value))


def render_metrics(
    snap: MetricsSnapshot | None,
    consumed_topics: Collection[str],
    now_s: float,
    *,
    reconcile: ReconcileSnapshot | None = None,
    per_org: bool = False,
) -> bytes:
    """The Prometheus text exposition: the process registry, then the ledger snapshot (None: the ledger
    could not be read; the process metrics, readiness included, are still exposed) and the reconciliation's.
    ``per_org``: the series per org too (docs/architecture.md, "Module notes")."""
    if snap is None:
        return generate_latest(REGISTRY)
    per_scrape = CollectorRegistry(auto_describe=False)
    per_scrape.register(SnapshotCollector(snap, consumed_topics, now_s, per_org=per_org))
    if reconcile is not None:
        per_scrape.register(ReconcileCollector(reconcile, now_s, per_org=per_org))
    return generate_latest(REGISTRY) + generate_latest(per_scrape)
