"""Assembling a worker process: settings -> database, ledger, Stripe sender -> Faust app -> run."""

from __future__ import annotations

import logging
import time
from typing import NoReturn

from infra.settings import Settings
from models.errors import BrokerError
from sinks.base import RetryingSink
from sinks.ledger import Ledger
from sinks.outbox import OutboxSender
from sinks.stripe import StripeMeterSink, make_client
from streams.pipeline import Deps

__all__ = ["build_deps", "run_worker"]

log = logging.getLogger(__name__)


def build_deps(settings: Settings) -> Deps:
    """The pipeline's dependencies from settings (migrates the database first)."""
    from infra.db import make_engine, migrate

    engine = make_engine(settings.db.resolved_url)
    migrate(engine)
    ledger = Ledger(engine)
    ledger.check_bucket_seconds(settings.billing.bucket_seconds)
    st = settings.stripe
    client = make_client(st.api_key.get_secret_value(), st.base, timeout=st.timeout)
    sink = RetryingSink(StripeMeterSink(client, concurrency=st.concurrency), max_attempts=st.max_attempts)
    sender = OutboxSender(ledger, sink, batch=st.send_batch, now_s=lambda: int(time.time()))
    return Deps(settings=settings, ledger=ledger, sender=sender)


def run_worker(settings: Settings) -> NoReturn:
    """Run the worker until SIGINT/SIGTERM; exits the process (Faust's worker owns the event loop)."""
    import faust

    from infra import kafka_fixes
    from infra.broker import kafka_answers
    from streams.app import configure
    from streams.pipeline import install

    if settings.kafka.embedded and not kafka_answers(settings.kafka.servers, timeout=2.0):
        raise BrokerError(
            f"no Kafka broker answers on {settings.kafka.servers}: start one with `edgebill broker` "
            "or set EDGEBILL_KAFKA_BOOTSTRAP"
        )
    kafka_fixes.apply_all()
    deps = build_deps(settings)
    app = configure(settings)
    install(app, deps)
    b = settings.billing
    log.info(
        "edgebill worker: broker=%s db=%s stripe=%s shadow=%s bill_from=%s authority=%s web=%s:%s",
        settings.kafka.servers,
        deps.ledger.engine.url.render_as_string(hide_password=True),
        settings.stripe.base,
        b.shadow,
        b.bill_from,
        b.pro_billing_authority.value,
        settings.web.host,
        settings.web.port,
    )
    worker = faust.Worker(app, loglevel="INFO", quiet=True, redirect_stdouts=False)
    worker.execute_from_commandline()
