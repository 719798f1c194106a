"""Assembling a worker process: settings -> configuration objects, database, ledger, Stripe sender ->
Faust app -> run. The only place where ``Settings`` turn into what the lower layers take."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from fractions import Fraction
from typing import NoReturn

import requests

from infra.settings import Settings, StripeSettings
from models.errors import BrokerError
from models.parity import AlertRule
from sinks.base import RetryingSink
from sinks.ledger import CloseConfig, Ledger
from sinks.outbox import OutboxSender
from sinks.parity import ParityConfig
from sinks.schema import make_engine, migrate
from sinks.stripe import StripeMeterSink, make_client, make_http_session
from sinks.stripe_v2 import ErrorReportReconciler, StripeStreamSink
from streams.config import KafkaConfig, Topics, WebConfig, WorkerConfig
from streams.pipeline import Deps

__all__ = [
    "CONTROL_TOPIC_CONFIG",
    "build_deps",
    "build_sender",
    "parity_config",
    "run_worker",
    "topic_configs",
    "topics",
    "web_config",
    "worker_config",
]

log = logging.getLogger(__name__)


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
        tolerance=Fraction(p.tolerance),
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
        parity_tolerance=p.tolerance,
        gate_hours=p.gate_hours,
    )


def worker_config(settings: Settings) -> WorkerConfig:
    """Everything the worker's agents, timers and pages take, from the settings."""
    k = settings.kafka
    b = settings.billing
    return WorkerConfig(
        kafka=KafkaConfig(
            servers=k.servers,
            group_id=k.group_id,
            partitions=k.partitions,
            replication_factor=k.replication_factor,
            session_timeout=k.session_timeout,
            heartbeat_interval=k.heartbeat_interval,
            rebalance_timeout=k.rebalance_timeout,
            request_timeout=k.request_timeout,
            max_fetch_bytes=k.max_fetch_bytes,
        ),
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
        authority=b.pro_billing_authority,
        close_interval_s=b.close_interval,
        send_interval_s=settings.stripe.send_interval,
        parity_refresh_interval_s=settings.parity.refresh_interval,
        progress_stale_after_ms=int(b.progress_stale_after * 1000),
    )


def build_deps(settings: Settings) -> Deps:
    """The pipeline's dependencies from settings (migrates the database first)."""
    engine = make_engine(settings.db.resolved_url)
    migrate(engine)
    ledger = Ledger(engine)
    ledger.check_bucket_seconds(settings.billing.bucket_seconds)
    sender = build_sender(settings.stripe, ledger)
    return Deps(config=worker_config(settings), ledger=ledger, sender=sender)


def build_sender(
    st: StripeSettings,
    ledger: Ledger,
    *,
    session: requests.Session | None = None,
    sleep: Callable[[float], None] = time.sleep,
    drain_s: float = 5.0,
) -> OutboxSender:
    """The outbox sender for ``st.mode``, retrying with ``st.max_attempts`` and the default backoff.

    ``v1``: :class:`~sinks.stripe.StripeMeterSink` (one call per event, one at a time per customer and
    meter, paced under ``v1_max_calls_per_s``). ``v2``: :class:`~sinks.stripe_v2.StripeStreamSink`
    (sessions, ≤ 100 events a request) and the :class:`~sinks.stripe_v2.ErrorReportReconciler` every
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
        t.control: 1,
    }


def topic_configs(settings: Settings) -> dict[str, dict[str, str]]:
    """Topic configs to create topics with: the control topic is compacted."""
    return {topics(settings).control: dict(CONTROL_TOPIC_CONFIG)}


def run_worker(settings: Settings) -> NoReturn:
    """Run the worker until SIGINT/SIGTERM; exits the process (Faust's worker owns the event loop)."""
    import faust

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
    # Ingest allocates a tuple or two per tick while the process holds a large, long-lived heap (Faust,
    # aiokafka, SQLAlchemy): move that heap out of the collector's view and collect young objects less
    # often. Measured on the ingest hot path: about +40 % ticks/s (docs/performance.md).
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    worker = faust.Worker(app, loglevel="INFO", quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
