"""Assembling a worker process: settings -> configuration objects, database, ledger, Stripe sender ->
Faust app -> run. The only place where ``Settings`` turn into what the lower layers take."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import fields
from typing import TYPE_CHECKING, Final, NoReturn

import requests
from sqlalchemy import Engine

from infra.settings import Settings, StripeSettings
from models.errors import BrokerError
from models.parity import AlertRule
from sinks.base import RetryingSink
from sinks.ledger import CloseConfig, Ledger
from sinks.outbox_sender import OutboxSender
from sinks.parity import ParityConfig
from sinks.reconcile.run import ReconcileConfig, Reconciliation
from sinks.reconcile.store import ReconcileStore
from sinks.reconcile.stripe_reader import StripeReader
from sinks.schema import make_engine, migrate
from sinks.stripe.v1 import StripeMeterSink, make_client, make_http_session
from sinks.stripe.v2 import ErrorReportReconciler, StripeStreamSink
from sinks.webhooks.provisioning import StripeProvisioner
from streams.config import KafkaConfig, Topics, WebConfig, WebhookConfig, WebLimits, WorkerConfig
from streams.pipeline import Deps
from streams.webhooks import WEBHOOK_PATH

__all__ = [
    "CONTROL_TOPIC_CONFIG",
    "STOP_DEADLINE_S",
    "build_deps",
    "build_provisioner",
    "build_reconciliation",
    "build_sender",
    "parity_config",
    "reconcile_config",
    "run_worker",
    "topic_configs",
    "topics",
    "web_config",
    "webhook_config",
    "webhook_url",
    "worker_config",
]

if TYPE_CHECKING:
    import faust

log = logging.getLogger(__name__)

#: After SIGTERM or SIGINT the worker process is gone within this many seconds, whatever it is doing.
STOP_DEADLINE_S: Final = 8.5
#: Exit status when the deadline ends the process: 0, as a graceful stop (the stop was asked for, and
#: nothing is lost); the critical log line tells the two apart.
_FORCED_EXIT_STATUS: Final = 0


def topics(settings: Settings) -> Topics:
    """The topic names in use, prefix applied."""
    return Topics.with_prefix(settings.kafka.topic_prefix, settings.parity.alerts_topic)


def parity_config(settings: Settings) -> ParityConfig:
    """The parity refresher's configuration: a bucket is settled on the ticks, policy and scale partitions."""
    p = settings.parity
    b = settings.billing
    t = topics(settings)
    n = settings.kafka.partitions
    return ParityConfig(
        bucket_seconds=b.bucket_seconds,
        grace_seconds=b.grace_seconds,
        tolerance=p.tolerance,
        slack_seconds=p.boundary_slack_seconds,
        lookback_seconds=p.lookback_hours * 3600,
        rule=AlertRule(
            org_min_gb_seconds=p.alert_org_min_gb_seconds,
            org_drift=p.alert_org_drift,
            min_orgs=p.alert_min_orgs,
            aggregate_min_gb_seconds=p.alert_aggregate_min_gb_seconds,
            aggregate_drift=p.alert_aggregate_drift,
            consecutive=p.alert_consecutive_buckets,
        ),
        stale_after_ms=int(b.progress_stale_after * 1000),
        ticks_topic=t.ticks,
        required={t.ticks: n, t.policy: n, t.scale: n},
        event_time_topics=frozenset({t.ticks}),
    )


def web_config(settings: Settings) -> WebConfig:
    w = settings.web
    p = settings.parity
    return WebConfig(
        host=w.host,
        port=w.port,
        internal_secret=w.internal_secret.get_secret_value().encode(),
        signature_tolerance_s=p.signature_tolerance_seconds,
        dashboard_token_ttl_s=p.dashboard_token_ttl,
        gate_hours=settings.billing.cutover_clean_hours,
        limits=WebLimits(
            max_line_bytes=w.max_line,
            max_field_bytes=w.max_header,
            max_headers=w.max_headers,
            idle_timeout_s=w.idle_timeout,
            body_timeout_s=w.body_timeout,
            body_bytes=((WEBHOOK_PATH, settings.stripe.webhook_max_body),),
            max_connections=w.max_connections,
            metrics_per_org=w.metrics_per_org,
        ),
    )


def webhook_config(settings: Settings) -> WebhookConfig:
    st = settings.stripe
    return WebhookConfig(
        secret=st.webhook_secret.get_secret_value(),
        tolerance_s=st.webhook_tolerance,
        max_body_bytes=st.webhook_max_body,
        body_timeout_s=settings.web.body_timeout,
        append_timeout_s=st.webhook_append_timeout,
        retry_interval_s=st.webhook_retry_interval,
    )


def webhook_url(settings: Settings) -> str:
    """Where Stripe delivers events: ``EDGEBILL_STRIPE_WEBHOOK_URL``, else the worker's own receiver."""
    return settings.stripe.webhook_url or f"http://{settings.web.host}:{settings.web.port}/webhooks/stripe"


def build_provisioner(st: StripeSettings) -> StripeProvisioner:
    """The webhook agent's Stripe client (its own, small: provisioning is a few calls per new org)."""
    return StripeProvisioner(make_client(st.api_key.get_secret_value(), st.base, timeout=st.timeout))


def reconcile_config(settings: Settings) -> ReconcileConfig:
    """The reconciliation's rules' settings (``EDGEBILL_STRIPE_AUDIT_*``)."""
    st = settings.stripe
    b = settings.billing
    return ReconcileConfig(
        bucket_seconds=b.bucket_seconds,
        grace_seconds=b.grace_seconds,
        settle_seconds=st.audit_settle,
        lookback_days=st.audit_lookback_days,
        alert_runs=st.audit_alert_runs,
        invoice_ahead_seconds=st.audit_invoice_ahead_hours * 3600,
    )


def build_reconciliation(
    settings: Settings, engine: Engine, *, sleep: Callable[[float], None] = time.sleep
) -> Reconciliation:
    """The reconciliation over ``engine``'s ledger, reading Stripe with its own client, paced at
    ``EDGEBILL_STRIPE_AUDIT_READS_PER_S``."""
    st = settings.stripe
    client = make_client(st.api_key.get_secret_value(), st.base, timeout=st.timeout)
    reader = StripeReader(client, reads_per_s=st.audit_reads_per_s, sleep=sleep)
    return Reconciliation(ReconcileStore(engine), reader, reconcile_config(settings))


def worker_config(settings: Settings) -> WorkerConfig:
    """Everything the worker's agents, timers and pages take, from the settings."""
    k = settings.kafka
    b = settings.billing
    return WorkerConfig(
        kafka=KafkaConfig(**{f.name: getattr(k, f.name) for f in fields(KafkaConfig)}),  # the same names
        topics=topics(settings),
        close=CloseConfig(
            bucket_seconds=b.bucket_seconds,
            grace_seconds=b.grace_seconds,
            shadow=b.shadow,
            bill_from=b.bill_from,
            authority=b.pro_billing_authority,
        ),
        parity=parity_config(settings),
        web=web_config(settings),
        webhooks=webhook_config(settings),
        authority=b.pro_billing_authority,
        close_interval_s=b.close_interval,
        send_interval_s=settings.stripe.send_interval,
        parity_refresh_interval_s=settings.parity.refresh_interval,
        progress_stale_after_ms=int(b.progress_stale_after * 1000),
        reconcile=reconcile_config(settings),
        reconcile_interval_s=settings.stripe.audit_interval,
        retention_days=b.retention_days,
        retention_interval_s=b.retention_interval,
    )


def build_deps(settings: Settings) -> Deps:
    """The pipeline's dependencies from settings (migrates the database first)."""
    engine = make_engine(settings.db.resolved_url)
    migrate(engine)
    ledger = Ledger(engine)
    ledger.check_bucket_seconds(settings.billing.bucket_seconds)
    sender = build_sender(settings.stripe, ledger)
    return Deps(
        config=worker_config(settings),
        ledger=ledger,
        sender=sender,
        provisioner=build_provisioner(settings.stripe),
        reconciliation=build_reconciliation(settings, engine),
    )


def build_sender(
    st: StripeSettings,
    ledger: Ledger,
    *,
    session: requests.Session | None = None,
    sleep: Callable[[float], None] = time.sleep,
    drain_s: float = 5.0,
) -> OutboxSender:
    """The outbox sender for ``st.mode``, retrying with ``st.max_attempts`` and the default backoff.

    ``v1``: :class:`~sinks.stripe.v1.StripeMeterSink` (one call per event, one at a time per customer and
    meter, paced under ``v1_max_calls_per_s``). ``v2``: :class:`~sinks.stripe.v2.StripeStreamSink`
    (sessions, ≤ 100 events a request) and the :class:`~sinks.stripe.v2.ErrorReportReconciler` every
    ``reconcile_interval`` s. Each ``run_once`` keeps sending full batches for up to ``drain_s`` s.
    Requests share one keep-alive pool (``session``, or a new one that ``close()`` closes).
    """
    http = session or make_http_session(st.concurrency + 2)
    client = make_client(
        st.api_key.get_secret_value(),
        st.base,
        timeout=st.timeout,
        meter_events_base=st.meter_events_base,
        session=http,
    )
    inner: StripeMeterSink | StripeStreamSink
    reconciler: ErrorReportReconciler | None = None
    if st.mode == "v2":
        inner = StripeStreamSink(client, concurrency=st.concurrency, session_margin_s=st.session_refresh_margin)
        reconciler = ErrorReportReconciler(client, ledger)
    else:
        inner = StripeMeterSink(client, concurrency=st.concurrency, max_calls_per_s=st.v1_max_calls_per_s)
    sink = RetryingSink(inner, max_attempts=st.max_attempts, sleep=sleep)
    log.info(
        "Stripe sender: mode %s, at most %d request(s) in flight, %d rows a batch",
        st.mode,
        st.concurrency,
        st.batch_rows,
    )
    return OutboxSender(
        ledger,
        sink,
        batch=st.batch_rows,
        now_s=lambda: int(time.time()),
        reconciler=reconciler,
        reconcile_every_s=st.reconcile_interval,
        drain_s=drain_s,
        on_close=[inner.close] if session is not None else [inner.close, http.close],
    )


#: The control topic keeps the latest state per key forever (where the broker implements compaction).
CONTROL_TOPIC_CONFIG: dict[str, str] = {"cleanup.policy": "compact"}


def _wanted_topics(settings: Settings) -> dict[str, int]:
    """Every topic the worker reads or writes, with the partition count to create it with."""
    t = topics(settings)
    n = settings.kafka.partitions
    return {
        t.ticks: n,
        t.dlq: n,
        t.policy: n,
        t.policy_dlq: 1,
        t.scale: n,
        t.scale_dlq: 1,
        t.alerts: 1,
        t.webhooks: n,
        t.control: 1,
    }


def topic_configs(settings: Settings) -> dict[str, dict[str, str]]:
    """Topic configs to create topics with: the control topic is compacted."""
    return {topics(settings).control: dict(CONTROL_TOPIC_CONFIG)}


def _arm_stop_deadline(seconds: float) -> None:
    """Make sure the process exits within ``seconds`` from now (once; later calls do nothing).

    Past the deadline a daemon thread logs one line and ends the process at once (a write blocked in the
    database or a client library cannot be interrupted otherwise). Nothing is lost: offsets are committed only
    after the ledger write, so an uncommitted batch is read again and its stored ticks count as duplicates.
    """
    global _deadline_armed
    if _deadline_armed:
        return
    _deadline_armed = True

    def expire() -> None:
        time.sleep(seconds)
        log.critical(
            "edgebill worker: still stopping %.1f s after the signal (a write blocked in the database or the "
            "broker); exiting now. Batches not committed are re-read by the next owner.",
            seconds,
        )
        for h in logging.getLogger().handlers:
            with contextlib.suppress(Exception):  # best effort before a hard exit
                h.flush()
        os._exit(_FORCED_EXIT_STATUS)

    threading.Thread(target=expire, name="edgebill-stop-deadline", daemon=True).start()


_deadline_armed = False


def _worker_class() -> type[faust.Worker]:
    """``faust.Worker`` with the two things a production worker needs from its process:

    * repeated warnings of the libraries (the Kafka client logs each failed connection attempt) pass once
      per interval with a count (:func:`streams.health.install_log_filter`, on the handlers Faust sets up);
    * SIGTERM / SIGINT arm :func:`_arm_stop_deadline` before Faust's own graceful stop begins.
    """
    import faust

    from streams.health import install_log_filter

    class Worker(faust.Worker):
        def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
            super().on_setup_root_logger(logger, level)
            install_log_filter()

        # mode.Worker's signal handlers (installed with loop.add_signal_handler); pinned mode-streaming 0.7.1.
        def _on_sigterm(self) -> None:
            _arm_stop_deadline(STOP_DEADLINE_S)
            super()._on_sigterm()

        def _on_sigint(self) -> None:
            _arm_stop_deadline(STOP_DEADLINE_S)
            super()._on_sigint()

    return Worker


def run_worker(settings: Settings) -> NoReturn:
    """Run the worker until SIGINT/SIGTERM; exits the process (Faust's worker owns the event loop), within
    :data:`STOP_DEADLINE_S` of the signal."""
    from infra import kafka_fixes
    from infra.kafka_admin import ensure_topics, kafka_answers
    from streams.app import configure
    from streams.wiring import install

    if settings.kafka.embedded and not kafka_answers(settings.kafka.servers, timeout=2.0):
        raise BrokerError(
            f"no Kafka broker answers on {settings.kafka.servers}: start one with `edgebill broker` "
            "or set EDGEBILL_KAFKA_BOOTSTRAP"
        )
    kafka_fixes.apply_all()
    deps = build_deps(settings)
    counts = ensure_topics(
        settings.kafka.servers,
        _wanted_topics(settings),
        replication_factor=settings.kafka.replication_factor,
        configs=topic_configs(settings),
    )
    app = configure(deps.config.kafka, deps.config.web)
    pipe = install(app, deps)
    # The closer must wait for every partition that exists, not only as many as configured.
    for topic in list(pipe.partitions):
        if topic in counts and counts[topic] != pipe.partitions[topic]:
            log.warning(
                "%s has %d partitions (EDGEBILL_KAFKA_PARTITIONS=%d); closing waits on all %d",
                topic,
                counts[topic],
                pipe.partitions[topic],
                counts[topic],
            )
            pipe.partitions[topic] = counts[topic]
    b = settings.billing
    eff = deps.cutover.fresh()
    log.info(
        "edgebill worker: broker=%s db=%s stripe=%s; cutover state in force (from the %s): shadow=%s "
        "bill_from=%s bill_until=%s authority=%s (environment: shadow=%s bill_from=%s authority=%s); web=%s:%s",
        settings.kafka.servers,
        deps.ledger.engine.url.render_as_string(hide_password=True),
        settings.stripe.base,
        eff.source,
        eff.state.shadow,
        eff.state.bill_from,
        eff.state.bill_until,
        eff.state.authority.value,
        b.shadow,
        b.bill_from,
        b.pro_billing_authority.value,
        settings.web.host,
        settings.web.port,
    )
    # Out of the collector's view: the long-lived heap; young objects collected less often (docs/performance.md).
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    worker = _worker_class()(app, loglevel="INFO", quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
