"""The cell agent's pure step (prepare_scale), the /metrics rendering, the parity settings."""

from __future__ import annotations

from decimal import Decimal

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from infra.settings import load_settings
from models.errors import ConfigError
from models.parity import ParityStatus
from models.watermark import PartitionState
from sinks.observe import stripe_errors_total, stripe_request_seconds
from sinks.parity import GateStatus, MetricsSnapshot, ParityRow
from sinks.reconcile.store import ReconcileSnapshot
from streams.cell import prepare_scale
from streams.metrics_view import render_metrics
from streams.records import RawRecord

NOW = 1_790_000_000_000
TOPIC = "sandbox-scale-events"


def rec(offset: int, value: bytes | None, partition: int = 0) -> RawRecord:
    return RawRecord(partition, offset, b"sb_1", value)


def good(**kw: object) -> bytes:
    body: dict[str, object] = {
        "id": "r1",
        "sandbox_id": "sb_1",
        "org_id": "o1",
        "worker_id": "w-1",
        "memory_mb": 1024,
        "started_at": (NOW - 3_600_000) / 1000,
        "ended_at": None,
    }
    body.update(kw)
    return orjson.dumps(body)


def test_prepare_scale_dead_letters_every_bad_record_with_its_reason_and_source() -> None:
    batch = prepare_scale(
        [
            rec(5, good()),
            rec(6, b"not json"),
            rec(7, None),
            rec(8, good(started_at=(NOW + 2 * 3_600_000) / 1000)),  # starts 2 h in the future
            rec(3, good(id="r2", memory_mb=-5), partition=2),
        ],
        TOPIC,
        NOW,
    )
    assert [e.event.id for e in batch.events] == ["r1"]
    assert [(d.headers["edgebill-reason"], d.headers["edgebill-source"], d.value) for d in batch.dead] == [
        (b"not_json", b"sandbox-scale-events/0/6", b"not json"),
        (b"empty_record", b"sandbox-scale-events/0/7", b""),
        (b"timestamp_in_future", b"sandbox-scale-events/0/8", good(started_at=(NOW + 2 * 3_600_000) / 1000)),
        (b"bad_memory_mb", b"sandbox-scale-events/2/3", good(id="r2", memory_mb=-5)),
    ]
    assert batch.progress == {0: 8, 2: 3}  # every record is accounted for, good or bad
    assert batch.counts == {"scale.read": 5, "scale.rejected": 4}


def _snapshot() -> MetricsSnapshot:
    row = ParityRow("o1", 7200, 1024 * 100, 5, 1024 * 1000 * 90, 0, Decimal("0.111111"), ParityStatus.DRIFT, 1)
    return MetricsSnapshot(
        counters={"ticks.ingested": 42, "ticks.duplicate": 3, "records.rejected": 2, "unbilled.zombie": 4},
        rows_by_state={"sent": 7, "pending": 1},
        buckets_closed=9,
        progress=[
            PartitionState("usage-ticks", 0, 99, None, 120, NOW),
            PartitionState("usage-ticks", 1, -1, None, None, None),
            PartitionState("other", 0, 1, None, 50, NOW),
        ],
        parity_bucket=7200,
        parity_rows=[row],
        gate=GateStatus(3, 7200, 0, 0, 3600),
        refreshed_ms=NOW - 2000,
    )


def test_metrics_render_ledger_figures_and_process_metrics() -> None:
    stripe_request_seconds.observe(0.2)
    stripe_errors_total.labels(kind="rate_limited").inc()
    text = render_metrics(_snapshot(), {"usage-ticks"}, NOW / 1000).decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    value = {(f.name, s.name, tuple(sorted(s.labels.items()))): s.value for f in fams.values() for s in f.samples}
    assert value[("edgebill_ticks_ingested", "edgebill_ticks_ingested_total", ())] == 42
    assert value[("edgebill_ticks_duplicate", "edgebill_ticks_duplicate_total", ())] == 3
    assert value[("edgebill_ticks_rejected", "edgebill_ticks_rejected_total", ())] == 2
    assert value[("edgebill_ticks_zombie", "edgebill_ticks_zombie_total", ())] == 4
    assert value[("edgebill_buckets_closed", "edgebill_buckets_closed_total", ())] == 9
    assert value[("edgebill_meter_rows", "edgebill_meter_rows", (("state", "sent"),))] == 7
    lag = {k[2]: v for k, v in value.items() if k[0] == "edgebill_consumer_lag"}
    assert lag == {(("partition", "0"), ("topic", "usage-ticks")): 20}  # 120 - (99 + 1); unknown/other omitted
    assert value[("edgebill_parity_worst_drift", "edgebill_parity_worst_drift", ())] == pytest.approx(0.111111)
    assert "edgebill_parity_drift" not in fams and "o1" not in text  # no series per org unless configured
    per_org = render_metrics(_snapshot(), {"usage-ticks"}, NOW / 1000, per_org=True).decode()
    assert 'edgebill_parity_drift{org_id="o1"} 0.111111' in per_org
    assert value[("edgebill_parity_rows", "edgebill_parity_rows", (("status", "drift"),))] == 1
    assert value[("edgebill_parity_clean_hours", "edgebill_parity_clean_hours", ())] == 3
    assert value[("edgebill_parity_refresh_age_seconds", "edgebill_parity_refresh_age_seconds", ())] == 2
    assert "edgebill_stripe_request_seconds" in fams
    assert any(s.labels.get("kind") == "rate_limited" and s.value >= 1 for s in fams["edgebill_stripe_errors"].samples)


def test_parity_settings_defaults_and_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for k in list(os.environ):
        if k.startswith("EDGEBILL_"):
            monkeypatch.delenv(k)
    p = load_settings().parity
    assert (p.tolerance, p.alert_min_orgs, p.alert_consecutive_buckets) == (Decimal("0.02"), 3, 2)
    assert (p.alert_org_min_gb_seconds, p.alert_aggregate_min_gb_seconds) == (100, 300)
    assert p.alerts_topic == "billing-alerts" and p.boundary_slack_seconds == 40
    monkeypatch.setenv("EDGEBILL_PARITY_TOLERANCE", "-1")
    monkeypatch.setenv("EDGEBILL_PARITY_ALERTS_TOPIC", "no spaces")
    with pytest.raises(ConfigError) as e:
        load_settings()
    assert {p.split(":")[0] for p in e.value.problems} == {"EDGEBILL_PARITY_TOLERANCE", "EDGEBILL_PARITY_ALERTS_TOPIC"}


def test_metrics_name_no_org_customer_or_amount_unless_configured() -> None:
    """What an unauthenticated scraper reads: counts by label, never an org id, a customer id or a value."""
    diffs = [
        {"org_id": f"org_secret_{i}", "customer": f"cus_secret_{i}", "meter": "sandbox_compute_sandbox_overage"}
        | {"label": "short" if i % 2 else "over", "stripe_value": "1234.5", "ledger_value": "1000.25"}
        for i in range(50)
    ]
    rec = ReconcileSnapshot(
        last_run={"finished_ms": NOW - 1000, "unsettled": 0, "requests": 3, "throttled": 0},
        by_label={"ok": 5, "short": 25, "over": 25},
        differences=diffs,
        invoices=[{"org_id": "org_secret_0", "label": "ok", "stripe": "99.5"}],
    )
    text = render_metrics(_snapshot(), {"usage-ticks"}, NOW / 1000, reconcile=rec).decode()
    assert "secret" not in text and "o1" not in text
    assert "1234.5" not in text and "234.25" not in text  # no value, no difference
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    differing = {s.labels["label"]: s.value for s in fams["edgebill_reconcile_differing_orgs"].samples}
    assert differing == {"short": 25, "over": 25, "unknown_customer": 0, "meter_misconfigured": 0}
    # bounded: the number of series does not grow with the orgs
    series = sum(len(f.samples) for f in fams.values())
    more = ReconcileSnapshot(
        last_run=rec.last_run,
        by_label=rec.by_label,
        differences=diffs * 10 + [dict(d, org_id="x" + d["org_id"]) for d in diffs],
    )
    text_more = render_metrics(_snapshot(), {"usage-ticks"}, NOW / 1000, reconcile=more).decode()
    assert sum(len(f.samples) for f in text_string_to_metric_families(text_more)) == series

    per_org = render_metrics(_snapshot(), {"usage-ticks"}, NOW / 1000, reconcile=rec, per_org=True).decode()
    labels = 'label="short",meter="sandbox_compute_sandbox_overage",org_id="org_secret_1"'
    assert f"edgebill_reconcile_difference{{{labels}}} 234.25" in per_org
