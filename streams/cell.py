"""The cell side and the parity refresher, wired onto the Faust app by :func:`install_parity`.

* ``cell`` agent (``sandbox-scale-events``): batches of records -> parse (:func:`prepare_scale`) -> bad
  ones to ``sandbox-scale-events-dlq`` (reason + source headers, original bytes) -> intervals into the
  ledger with the partition's progress, in one transaction (:meth:`ParityStore.write_scale_events`).
  Offsets are acked only after that commit: a failed write is retried, never acked.
* ``cell-progress`` timer (every worker): reports the log end of the scale partitions it owns, so the
  topic's lag is known and the parity watermark can tell when the cell side is caught up (only when the
  pipeline's own progress reporter does not already cover the topic).
* ``parity`` timer (leader): :meth:`ParityStore.refresh` in a thread — recomputes the buckets that changed,
  stores the watermark — then publishes due alerts to the alerts topic (``billing-alerts``) and logs them,
  once each, and logs every newly flagged settled (org, bucket) once per process.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from models.parity import ScaleEvent, parse_scale_event
from models.watermark import last_closable_bucket
from sinks.parity import ParityConfig, ParityStore, PendingAlert, RefreshResult, RefreshState, SourcedScaleEvent
from streams.pipeline import (
    FUTURE_TOLERANCE_MS,
    RAW_BYTES,
    TOPIC_SCALE_EVENTS,
    DeadLetter,
    RawRecord,
    Record,
    dead_letter,
    retry_forever,
)

if TYPE_CHECKING:
    from infra.settings import Settings
    from streams.pipeline import Deps, Pipeline

__all__ = [
    "FUTURE_TOLERANCE_MS",
    "TOPIC_ALERTS_DEFAULT",
    "TOPIC_SCALE",
    "TOPIC_SCALE_DLQ",
    "ParityRuntime",
    "ScaleBatch",
    "install_parity",
    "parity_config",
    "prepare_scale",
]

log = logging.getLogger(__name__)

TOPIC_SCALE = TOPIC_SCALE_EVENTS
TOPIC_SCALE_DLQ = "sandbox-scale-events-dlq"
TOPIC_ALERTS_DEFAULT = "billing-alerts"


@dataclass(slots=True)
class ScaleBatch:
    events: list[SourcedScaleEvent] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    progress: dict[int, int] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


def prepare_scale(records: Iterable[Record], topic: str, now_ms: int) -> ScaleBatch:
    """Parse a batch of ``sandbox-scale-events`` records: events, dead letters, per-partition progress. Pure."""
    out = ScaleBatch()
    read = rejected = 0
    for rec in records:
        read += 1
        parsed: ScaleEvent | str = parse_scale_event(rec.value)
        if isinstance(parsed, ScaleEvent):
            latest = parsed.started_ms if parsed.ended_ms is None else parsed.ended_ms
            if latest > now_ms + FUTURE_TOLERANCE_MS:
                parsed = "timestamp_in_future"
        if isinstance(parsed, ScaleEvent):
            out.events.append(SourcedScaleEvent(parsed, rec.partition, rec.offset))
        else:
            rejected += 1
            out.dead.append(dead_letter(rec, topic, parsed, rec.value or b""))
        out.progress[rec.partition] = max(rec.offset, out.progress.get(rec.partition, -1))
    out.counts = {"scale.read": read, "scale.rejected": rejected}
    return out


def parity_config(settings: Settings) -> ParityConfig:
    """The refresher's configuration: a bucket is settled on the ticks, policy and scale-event partitions."""
    from streams.pipeline import TOPIC_POLICY, TOPIC_TICKS

    k = settings.kafka
    ticks = k.topic(TOPIC_TICKS)
    return ParityConfig.from_settings(
        settings,
        ticks_topic=ticks,
        required={ticks: k.partitions, k.topic(TOPIC_POLICY): k.partitions, k.topic(TOPIC_SCALE): k.partitions},
    )


class ParityRuntime:
    """The cell agent's and the refresher's behaviour, independent of Faust so tests can drive it."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        s = deps.settings
        self.scale_topic = s.kafka.topic(TOPIC_SCALE)
        self.dlq_topic = s.kafka.topic(TOPIC_SCALE_DLQ)
        self.alerts_topic = s.kafka.topic(s.parity.alerts_topic)
        self.store = ParityStore(deps.ledger.engine, bucket_seconds=s.billing.bucket_seconds, clock=deps.clock_ms)
        self.cfg = parity_config(s)
        self.state = RefreshState()
        self.last_refresh: RefreshResult | None = None
        self._lock = asyncio.Lock()
        self._logged: set[tuple[str, int, str]] = set()

    def write(self, batch: ScaleBatch) -> None:
        if batch.events:
            self.store.write_scale_events(self.scale_topic, batch.events, batch.progress, batch.counts)
        else:
            self.store.record_progress(self.scale_topic, batch.progress, batch.counts)

    def refresh_once(self) -> RefreshResult:
        result = self.store.refresh(self.state, self.cfg)
        self.last_refresh = result
        self._log_flagged(result)
        return result

    def _log_flagged(self, result: RefreshResult) -> None:
        """Log each flagged settled (org, bucket) once per process, in the seed's log format."""
        if result.watermark_ms is None:
            return
        size = self.cfg.bucket_seconds
        last = last_closable_bucket(result.watermark_ms, size, self.cfg.grace_seconds)
        if last is None:
            return
        lo = last - self.cfg.lookback_seconds
        self._logged = {k for k in self._logged if k[1] >= lo}
        for r in self.store.rows(lo, last + 1, flagged_only=True):
            key = (r.org_id, r.bucket_start, r.status.value)
            if key in self._logged:
                continue
            self._logged.add(key)
            log.warning(
                "usage_parity: %s org=%s bucket=%s cell=%.3f edge=%.3f gb·s drift=%+.3f (%+.1f%%)",
                r.status.value.upper(),
                r.org_id,
                r.bucket_start,
                r.cell_gb_s,
                r.edge_gb_s,
                r.drift,
                r.drift * 100,
            )

    async def refresh_tick(self, publish: Callable[[PendingAlert], Awaitable[None]]) -> None:
        """One refresher run, then publish the due alerts (each logged once, when first due)."""
        if self._lock.locked():
            return
        async with self._lock:
            try:
                result = await asyncio.to_thread(self.refresh_once)
            except Exception:
                log.exception("parity refresh failed; it will run again")
                return
            done: list[str] = []
            for alert in result.alerts:
                b = alert.body
                if alert.new:
                    log.warning(
                        "usage_parity: ALERT %s buckets=%s orgs=%s (published to %s)",
                        alert.id,
                        [v["bucket_start"] for v in b.get("buckets", [])],
                        sorted({o for v in b.get("buckets", []) for o in v.get("orgs", [])}),
                        self.alerts_topic,
                    )
                try:
                    await publish(alert)
                except Exception:
                    log.exception("could not publish alert %s; will retry", alert.id)
                    break
                done.append(alert.id)
            if done:
                try:
                    await asyncio.to_thread(self.store.mark_published, done)
                except Exception:
                    log.exception("could not mark alerts published; they will be published again")


def install_parity(app: Any, deps: Deps, pipe: Pipeline) -> ParityRuntime:
    """Register the cell agent, its DLQ, the scale-topic progress reporter and the parity refresher."""
    rt = ParityRuntime(deps)
    k = deps.settings.kafka
    raw = RAW_BYTES
    scale = app.topic(rt.scale_topic, partitions=k.partitions, **raw)
    dlq = app.topic(rt.dlq_topic, partitions=k.partitions, **raw)
    alerts = app.topic(rt.alerts_topic, partitions=1, **raw)

    async def cell_agent(stream: Any) -> Any:
        async for events in stream.take_events(1000, within=0.1):
            records = [RawRecord(e.message.partition, e.message.offset, e.message.key, e.message.value) for e in events]
            batch = prepare_scale(records, rt.scale_topic, deps.clock_ms())
            if batch.dead:
                for d in batch.dead:
                    log.warning(
                        "dead-lettered %s: %s",
                        d.headers["edgebill-source"].decode(),
                        d.headers["edgebill-reason"].decode(),
                    )
                futs = [await dlq.send(key=d.key, value=d.value, headers=d.headers) for d in batch.dead]
                for f in futs:
                    await f
            await retry_forever("cell interval write", functools.partial(rt.write, batch))
            yield len(records)

    app.agent(scale, name="edgebill.cell")(cell_agent)

    async def report_progress() -> None:
        """Report the log end of the scale partitions this worker owns (see pipeline.report_progress)."""
        try:
            marks: dict[int, int] = {}
            for tp in app.consumer.assignment():
                if tp.topic != rt.scale_topic:
                    continue
                hw = app.consumer.highwater(tp)
                if hw is not None:
                    marks[tp.partition] = int(hw)
            if marks:
                await asyncio.to_thread(deps.ledger.report_highwaters, rt.scale_topic, marks, deps.owner)
        except Exception:
            log.exception("cell progress report failed")

    async def publish(alert: PendingAlert) -> None:
        fut = await alerts.send(
            key=alert.id.encode(),
            value=orjson.dumps(alert.body),
            headers={"edgebill-alert-id": alert.id.encode()},
        )
        await fut

    async def refresh() -> None:
        await rt.refresh_tick(publish)

    if rt.scale_topic not in getattr(pipe, "partitions", {}):  # else the pipeline's own reporter covers it
        app.timer(0.5, name="edgebill.cell-progress")(report_progress)
    app.timer(deps.settings.parity.refresh_interval, on_leader=True, name="edgebill.parity")(refresh)
    return rt
