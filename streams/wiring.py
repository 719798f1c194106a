"""Register the worker's topics, agents, services, timers and pages on the Faust app.

Ingest (:mod:`streams.ingest`), the ``policy`` and ``control`` agents, the cell agent and parity refresher
(:mod:`streams.cell`), the ``progress`` timer (every worker), the ``closer``, ``sender`` and ``retention``
timers (leader), webhooks (:mod:`streams.webhooks`), the reconciliation (:mod:`streams.reconcile`) and the
web views (:mod:`streams.web`). What each does: docs/architecture.md, "Module notes".
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

from streams.cell import install_parity
from streams.health import LEDGER
from streams.ingest import IngestContext, IngestService, SendDead, TickIngestor
from streams.pipeline import Deps, Pipeline
from streams.reconcile import install_reconcile
from streams.records import RAW_BYTES, DeadLetter, RawRecord, first_line, retry_forever
from streams.web import install_web
from streams.webhooks import install_webhooks

__all__ = ["install", "tick_ingestor"]

log = logging.getLogger(__name__)


def tick_ingestor(pipe: Pipeline, send_dead: SendDead) -> TickIngestor:
    """The ingest consumer of ``pipe``'s ticks topic, writing through ``pipe`` with its health and log throttle."""
    deps = pipe.deps
    ctx = IngestContext(
        deps.config.kafka, pipe.ticks_topic, pipe.dlq_topic, deps.owner, deps.clock_ms, pipe.health, pipe.log_throttle
    )
    return TickIngestor(ctx, pipe, send_dead)


def install(app: Any, deps: Deps) -> Pipeline:
    """Register topics, agents, timers and pages on ``app`` (a configured :class:`faust.App`)."""
    pipe = Pipeline(deps)
    cfg = deps.config
    dlq = app.topic(pipe.dlq_topic, partitions=cfg.kafka.partitions, **RAW_BYTES)
    # usage-ticks: a batch consumer run by a child service of the app (streams.ingest), started while Faust
    # starts, not after its group join as @app.service would be: the two joins overlap (~1 s off a start).
    ingest = IngestService(lambda: tick_ingestor(pipe, functools.partial(send_dead, dlq)))
    app.add_dependency(ingest)
    _install_policy(app, pipe)
    _install_control(app, pipe)

    async def progress() -> None:
        await report_progress(app, pipe, ingest)

    app.timer(0.5, name="edgebill.progress")(progress)
    app.timer(cfg.close_interval_s, on_leader=True, name="edgebill.closer")(pipe.close_tick)
    app.timer(cfg.send_interval_s, on_leader=True, name="edgebill.sender")(pipe.send_tick)
    if cfg.retention_days > 0:
        app.timer(cfg.retention_interval_s, on_leader=True, name="edgebill.retention")(pipe.retention_tick)

    install_parity(app, deps)
    install_webhooks(app, deps)
    install_reconcile(app, deps)
    consumed = {pipe.ticks_topic, pipe.policy_topic, pipe.scale_topic}
    install_web(app, deps, health=pipe.health, log_throttle=pipe.log_throttle, consumed=consumed)
    return pipe


async def send_dead(topic: Any, dead: list[DeadLetter]) -> None:
    """Produce ``dead`` to ``topic``, then wait for every acknowledgement."""
    futs = [await topic.send(key=d.key, value=d.value, headers=d.headers) for d in dead]
    for f in futs:
        await f


def _records(events: list[Any]) -> list[RawRecord]:
    return [RawRecord(e.message.partition, e.message.offset, e.message.key, e.message.value) for e in events]


def _install_policy(app: Any, pipe: Pipeline) -> None:
    n = pipe.deps.config.kafka.partitions
    policy = app.topic(pipe.policy_topic, partitions=n, **RAW_BYTES)
    policy_dlq = app.topic(pipe.policy_dlq_topic, partitions=1, **RAW_BYTES)

    async def policy_agent(stream: Any) -> Any:
        async for events in stream.take_events(500, within=0.1):
            records = _records(events)
            good, dead = pipe.policies_from(records)
            if dead:
                await send_dead(policy_dlq, dead)
            progress: dict[int, tuple[int, int | None]] = {}
            for r in records:
                progress[r.partition] = (max(r.offset, progress.get(r.partition, (-1, None))[0]), None)
            counts = {"policies.read": len(records), "policies.rejected": len(dead)}

            await retry_forever(
                "policy write",
                functools.partial(pipe.deps.ledger.write_policies, pipe.policy_topic, good, progress, counts),
                log_throttle=pipe.log_throttle,
            )
            yield len(records)

    app.agent(policy, name="edgebill.policy")(policy_agent)


def _install_control(app: Any, pipe: Pipeline) -> None:
    control = app.topic(pipe.control_topic, partitions=1, **RAW_BYTES)

    async def control_agent(stream: Any) -> Any:
        async for events in stream.take_events(100, within=0.2):
            records = _records(events)
            await retry_forever("cutover control write", functools.partial(pipe.record_control, records))
            await pipe.control_progress()  # apply it here at once, not at the next progress tick
            yield len(records)

    app.agent(control, name="edgebill.control")(control_agent)


async def report_progress(app: Any, pipe: Pipeline, ingest: IngestService) -> None:
    """Report the log end of owned partitions, from the consumer's last Fetch responses.

    The Fetch high watermark is right on Tansu (ListOffsets is not, see infra.kafka_fixes) and costs
    no request. A partition with no Fetch answer yet is not reported: it stays "lagging". Covers
    every topic the closer waits on, the cell side's scale events included. A write that fails holds
    the ``ledger_unwritable`` readiness condition until one succeeds.
    """
    what = "progress report"
    wrote = False
    deps = pipe.deps
    try:
        by_topic: dict[str, dict[int, int]] = {}
        for tp in app.consumer.assignment():
            if tp.topic not in pipe.partitions:
                continue
            hw = app.consumer.highwater(tp)
            if hw is not None:
                by_topic.setdefault(tp.topic, {})[tp.partition] = int(hw)
        if ingest.ingestor is not None:  # usage-ticks is read by the ingest service's own consumer
            by_topic[pipe.ticks_topic] = ingest.ingestor.highwaters()
        for topic, marks in by_topic.items():
            if not marks:
                continue
            await asyncio.to_thread(deps.ledger.report_highwaters, topic, marks, deps.owner)
            wrote = True
    except Exception as exc:
        pipe.health.fail(LEDGER, f"{what}: {type(exc).__name__}: {first_line(exc)}", source=what)
        pipe.log_throttle.failure(
            what,
            "%s failed (%s: %s)",
            what,
            type(exc).__name__,
            first_line(exc),
            exc_info=None if pipe.log_throttle.failing(what) else exc,
        )
    else:
        if wrote:
            pipe.health.ok(LEDGER, source=what)
            pipe.log_throttle.recovered(what)
    await pipe.control_progress()
