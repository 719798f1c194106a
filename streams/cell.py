"""The cell side and the parity refresher, wired onto the Faust app by :func:`install_parity`.

* ``cell`` agent: records -> :func:`prepare_scale` -> dead letters -> intervals and progress in one
  transaction; offsets acked only after that commit (a failed write is retried, never acked).
* ``parity`` timer (leader): :meth:`ParityStore.refresh` in a thread, then due alerts published and logged
  once each; newly flagged settled (org, bucket) logged once per process.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from models.parity import ScaleEvent, parse_scale_event
from models.ticks import FUTURE_TOLERANCE_MS
from models.watermark import last_closable_bucket
from sinks.parity import ParityConfig, ParityStore, PendingAlert, RefreshResult, RefreshState, SourcedScaleEvent
from streams.config import Topics
from streams.health import RateLimitedLog
from streams.pipeline import Deps
from streams.records import (
    RAW_BYTES,
    DeadLetter,
    Publish,
    RawRecord,
    Record,
    alert_publisher,
    dead_letter,
    publish_alerts,
    retry_forever,
    run_logged,
)

__all__ = ["ParityRuntime", "ScaleBatch", "install_parity", "prepare_scale"]

log = logging.getLogger(__name__)


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


class ParityRuntime:
    """The cell agent's and the refresher's behaviour, independent of Faust so tests can drive it."""

    def __init__(self, store: ParityStore, cfg: ParityConfig, topics: Topics) -> None:
        self.scale_topic = topics.scale
        self.dlq_topic = topics.scale_dlq
        self.alerts_topic = topics.alerts
        self.store = store
        self.cfg = cfg
        self.state = RefreshState()
        self.last_refresh: RefreshResult | None = None
        self._lock = asyncio.Lock()
        self._logged: set[tuple[str, int, str]] = set()
        self._log_throttle = RateLimitedLog(log)

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
        """Log each flagged settled (org, bucket) once per process, in the ``usage_parity: …`` line format that
        existing log alerts on the cell side already match."""
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

    async def refresh_tick(self, publish: Publish) -> None:
        """One refresher run, then publish the due alerts (each logged once, when first due)."""
        if self._lock.locked():
            return
        async with self._lock:
            result = await run_logged(self._log_throttle, "parity refresh", self.refresh_once)
            if result is not None:
                await publish_alerts(result.alerts, publish, self.store.mark_published, self._announce)

    def _announce(self, alert: PendingAlert) -> None:
        b = alert.body
        log.warning(
            "usage_parity: ALERT %s buckets=%s orgs=%s (published to %s)",
            alert.id,
            [v["bucket_start"] for v in b.get("buckets", [])],
            sorted({o for v in b.get("buckets", []) for o in v.get("orgs", [])}),
            self.alerts_topic,
        )


def install_parity(app: Any, deps: Deps) -> ParityRuntime:
    """Register the cell agent, its DLQ and the parity refresher.

    The scale topic's log end is reported by the worker's progress timer, with the other topics the
    closer waits on (:mod:`streams.wiring`).
    """
    cfg = deps.config
    rt = ParityRuntime(
        ParityStore(deps.ledger.engine, bucket_seconds=cfg.bucket_seconds, clock=deps.clock_ms), cfg.parity, cfg.topics
    )
    n = deps.config.kafka.partitions
    raw = RAW_BYTES
    scale = app.topic(rt.scale_topic, partitions=n, **raw)
    dlq = app.topic(rt.dlq_topic, partitions=n, **raw)
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
            await retry_forever(
                "cell interval write", functools.partial(rt.write, batch), log_throttle=rt._log_throttle
            )
            yield len(records)

    app.agent(scale, name="edgebill.cell")(cell_agent)

    publish = alert_publisher(alerts)

    async def refresh() -> None:
        await rt.refresh_tick(publish)

    app.timer(deps.config.parity_refresh_interval_s, on_leader=True, name="edgebill.parity")(refresh)
    return rt
