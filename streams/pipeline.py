"""Topics, agents, timers and web views of the worker, wired to explicit dependencies.

* ingest (``usage-ticks``, :mod:`streams.ingest`): a batch consumer run by a Faust service: batches of
  records -> parse -> bad parts to ``usage-ticks-dlq`` (reason + original bytes) -> valid ticks into the
  ledger, deduplicated by tick id, together with the partition's progress; offsets are committed to
  Kafka only after the ledger commit.
* ``policy`` agent (``org-policy``): policy history into the ledger.
* ``progress`` timer (every worker): reports the log end of the partitions it owns.
* ``closer`` timer (leader): computes the watermark and closes buckets (:meth:`Ledger.close`).
* ``sender`` timer (leader, only when not in shadow): drains the outbox to Stripe.

No Stripe call and no long transaction runs on the event loop: the closer and the sender run in a
thread, one at a time.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from infra.settings import Settings
from models.errors import InvalidRecord
from models.policy import OrgPolicy
from models.ticks import parse_record
from models.watermark import watermark
from sinks.ledger import CloseConfig, CloseResult, Ledger, SourcedTick
from sinks.outbox import OutboxSender, SendReport

__all__ = [
    "TOPIC_DLQ",
    "TOPIC_POLICY",
    "TOPIC_POLICY_DLQ",
    "TOPIC_SCALE_EVENTS",
    "TOPIC_TICKS",
    "DeadLetter",
    "Deps",
    "IngestBatch",
    "Pipeline",
    "RawRecord",
    "Record",
    "dead_letter",
    "install",
    "prepare_ingest",
]

log = logging.getLogger(__name__)

TOPIC_TICKS = "usage-ticks"
TOPIC_DLQ = "usage-ticks-dlq"
TOPIC_POLICY = "org-policy"
TOPIC_POLICY_DLQ = "org-policy-dlq"
TOPIC_SCALE_EVENTS = "sandbox-scale-events"
FUTURE_TOLERANCE_MS = 3600 * 1000  # a tick stamped more than 1 h ahead of the worker's clock is rejected


class Record(Protocol):
    """What the ingest step needs of a Kafka record."""

    @property
    def partition(self) -> int: ...

    @property
    def offset(self) -> int: ...

    @property
    def key(self) -> bytes | None: ...

    @property
    def value(self) -> bytes | None: ...


@dataclass(frozen=True, slots=True)
class RawRecord:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    key: bytes | None
    value: bytes
    headers: dict[str, bytes]


@dataclass(slots=True)
class IngestBatch:
    ticks: list[SourcedTick] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    progress: dict[int, tuple[int, int | None]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


def prepare_ingest(records: Iterable[Record], topic: str, now_ms: int) -> IngestBatch:
    """Parse a batch of ``usage-ticks`` records: good ticks, dead letters, per-partition progress. Pure."""
    out = IngestBatch()
    rejected = ignored = read = 0
    max_ts = now_ms + FUTURE_TOLERANCE_MS
    ticks_append = out.ticks.append
    progress = out.progress
    for rec in records:
        parsed = parse_record(rec.value, max_ts_ms=max_ts)
        read += 1
        part, off = rec.partition, rec.offset
        newest: int | None = None
        if parsed.ticks:
            for tick in parsed.ticks:
                ticks_append(SourcedTick(tick, part, off))
            newest = max(t.ts_ms for t in parsed.ticks)
        for r in parsed.rejected:
            out.dead.append(dead_letter(rec, topic, r.reason, r.raw, r.index))
            rejected += 1
        ignored += parsed.ignored
        prev = progress.get(part)
        if prev is None:
            progress[part] = (off, newest)
        else:
            ev = prev[1] if newest is None else (newest if prev[1] is None else max(prev[1], newest))
            progress[part] = (off if off > prev[0] else prev[0], ev)
    out.counts = {"records.read": read, "records.rejected": rejected, "records.ignored_type": ignored}
    return out


def dead_letter(rec: Record, topic: str, reason: str, raw: bytes, index: int | None = None) -> DeadLetter:
    """The dead letter of a rejected record: original bytes, reason and source in headers."""
    headers = {
        "edgebill-reason": reason.encode(),
        "edgebill-source": f"{topic}/{rec.partition}/{rec.offset}".encode(),
    }
    if index is not None:
        headers["edgebill-array-index"] = str(index).encode()
    return DeadLetter(key=rec.key, value=raw, headers=headers)


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Deps:
    """Everything the pipeline needs, passed in (the Faust app is the only global)."""

    settings: Settings
    ledger: Ledger
    sender: OutboxSender | None
    clock_ms: Callable[[], int] = field(default=lambda: time.time_ns() // 1_000_000)
    owner: str = field(default_factory=_owner)


class Pipeline:
    """The worker's behaviour, independent of Faust's decorators so it can be driven by tests."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        k = deps.settings.kafka
        self.ticks_topic = k.topic(TOPIC_TICKS)
        self.dlq_topic = k.topic(TOPIC_DLQ)
        self.policy_topic = k.topic(TOPIC_POLICY)
        self.policy_dlq_topic = k.topic(TOPIC_POLICY_DLQ)
        b = deps.settings.billing
        self.close_cfg = CloseConfig(
            bucket_seconds=b.bucket_seconds,
            grace_seconds=b.grace_seconds,
            shadow=b.shadow,
            bill_from=b.bill_from,
        )
        self.scale_topic = k.topic(TOPIC_SCALE_EVENTS)
        # Every input the closer must have read before a bucket closes: ticks (event time), and the two
        # topics that decide *how* a tick is billed — policies (plan, mode) and the cell's scale events
        # (sandbox ownership, for zombie ticks). Those two hold the watermark while they lag.
        self.partitions: dict[str, int] = {
            self.ticks_topic: k.partitions,
            self.policy_topic: k.partitions,
            self.scale_topic: k.partitions,
        }
        self._close_lock = asyncio.Lock()
        self._send_lock = asyncio.Lock()
        self.last_close: CloseResult | None = None
        self.ingestor: Any = None  # the running streams.ingest.TickIngestor, set by its service
        self.last_send: SendReport | None = None

    # -- ingest -------------------------------------------------------------------------------

    def write_batch(self, batch: IngestBatch) -> None:
        """Write a prepared batch to the ledger (ticks + progress + counters in one transaction)."""
        led = self.deps.ledger
        if batch.ticks:
            led.write_ticks(
                self.ticks_topic,
                batch.ticks,
                bucket_seconds=self.deps.settings.billing.bucket_seconds,
                progress=batch.progress,
                counts=batch.counts,
            )
        else:
            led.record_progress(self.ticks_topic, batch.progress, batch.counts)

    def policies_from(self, records: Sequence[Record]) -> tuple[list[tuple[OrgPolicy, int, int]], list[DeadLetter]]:
        good: list[tuple[OrgPolicy, int, int]] = []
        dead: list[DeadLetter] = []
        for rec in records:
            try:
                if not rec.value:
                    raise InvalidRecord("empty_record")
                good.append((OrgPolicy.from_json(rec.value), rec.partition, rec.offset))
            except (InvalidRecord, ValueError) as exc:
                reason = exc.reason if isinstance(exc, InvalidRecord) else "invalid_policy"
                log.error("org-policy %s/%s rejected: %s", rec.partition, rec.offset, exc)
                dead.append(dead_letter(rec, self.policy_topic, reason, rec.value or b"", None))
        return good, dead

    # -- closing and sending ------------------------------------------------------------------

    def close_once(self) -> CloseResult | None:
        """One closer run: watermark from partition progress, then :meth:`Ledger.close`."""
        now = self.deps.clock_ms()
        wm = watermark(
            self.deps.ledger.partition_states(),
            self.partitions,
            now,
            int(self.deps.settings.billing.progress_stale_after * 1000),
            event_time_topics=frozenset({self.ticks_topic}),
        )
        if wm is None:
            return None
        result = self.deps.ledger.close(wm, self.close_cfg)
        self.last_close = result
        return result

    def send_once(self) -> SendReport | None:
        if self.deps.sender is None or self.deps.settings.billing.shadow:
            return None
        report = self.deps.sender.run_once()
        self.last_send = report
        return report

    async def close_tick(self) -> None:
        if self._close_lock.locked():
            return
        async with self._close_lock:
            try:
                await asyncio.to_thread(self.close_once)
            except Exception:
                log.exception("closer run failed; it will run again")

    async def send_tick(self) -> None:
        if self._send_lock.locked():
            return
        async with self._send_lock:
            try:
                await asyncio.to_thread(self.send_once)
            except Exception:
                log.exception("sender run failed; it will run again")


async def retry_forever(what: str, fn: Callable[[], Any]) -> None:
    """Run a ledger write until it succeeds. Never ack a batch whose write failed (Faust would commit it)."""
    delay = 0.2
    while True:
        try:
            await asyncio.to_thread(fn)
            return
        except Exception:
            log.exception("%s failed; retrying in %.1fs (offsets are not committed meanwhile)", what, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


# Every topic of the worker carries bytes both ways: records are parsed (and dead-lettered) by this code.
RAW_BYTES: Final[dict[str, Any]] = {
    "key_type": bytes,
    "value_type": bytes,
    "key_serializer": "raw",
    "value_serializer": "raw",
}


def install(app: Any, deps: Deps) -> Pipeline:
    """Register topics, agents, timers and pages on ``app`` (a configured :class:`faust.App`)."""
    pipe = Pipeline(deps)
    k = deps.settings.kafka
    raw = RAW_BYTES
    dlq = app.topic(pipe.dlq_topic, partitions=k.partitions, **raw)
    policy = app.topic(pipe.policy_topic, partitions=k.partitions, **raw)
    policy_dlq = app.topic(pipe.policy_dlq_topic, partitions=1, **raw)

    async def send_dead(topic: Any, dead: list[DeadLetter]) -> None:
        futs = [await topic.send(key=d.key, value=d.value, headers=d.headers) for d in dead]
        for f in futs:
            await f

    async def policy_agent(stream: Any) -> Any:
        async for events in stream.take_events(500, within=0.1):
            records = [RawRecord(e.message.partition, e.message.offset, e.message.key, e.message.value) for e in events]
            good, dead = pipe.policies_from(records)
            if dead:
                await send_dead(policy_dlq, dead)
            progress: dict[int, tuple[int, int | None]] = {}
            for r in records:
                progress[r.partition] = (max(r.offset, progress.get(r.partition, (-1, None))[0]), None)
            counts = {"policies.read": len(records), "policies.rejected": len(dead)}

            await retry_forever(
                "policy write",
                functools.partial(deps.ledger.write_policies, pipe.policy_topic, good, progress, counts),
            )
            yield len(records)

    # usage-ticks: a batch consumer owned by a Faust service, not a per-message agent (streams.ingest).
    from streams.ingest import make_ingest_service

    # Started as a child of the app, i.e. while Faust starts — not after its own group join and recovery
    # like @app.service — so the two group joins overlap (about a second off every start on Tansu).
    app.add_dependency(make_ingest_service(pipe, functools.partial(send_dead, dlq))())
    app.agent(policy, name="edgebill.policy")(policy_agent)

    async def report_progress() -> None:
        """Report the log end of owned partitions, from the consumer's last Fetch responses.

        The Fetch high watermark is right on Tansu (ListOffsets is not, see infra.kafka_fixes) and costs
        no request. A partition with no Fetch answer yet is not reported: it stays "lagging".
        """
        try:
            by_topic: dict[str, dict[int, int]] = {}
            for tp in app.consumer.assignment():
                if tp.topic not in pipe.partitions:
                    continue
                hw = app.consumer.highwater(tp)
                if hw is not None:
                    by_topic.setdefault(tp.topic, {})[tp.partition] = int(hw)
            if pipe.ingestor is not None:  # usage-ticks is read by the ingest service's own consumer
                by_topic[pipe.ticks_topic] = pipe.ingestor.highwaters()
            for topic, marks in by_topic.items():
                if not marks:
                    continue
                await asyncio.to_thread(deps.ledger.report_highwaters, topic, marks, deps.owner)
        except Exception:
            log.exception("progress report failed")

    app.timer(0.5, name="edgebill.progress")(report_progress)
    app.timer(deps.settings.billing.close_interval, on_leader=True, name="edgebill.closer")(pipe.close_tick)
    app.timer(deps.settings.stripe.send_interval, on_leader=True, name="edgebill.sender")(pipe.send_tick)

    # The cell side + parity refresher, and every web view (/healthz, /metrics, parity, dashboard).
    from streams.cell import install_parity
    from streams.web import install_web

    install_parity(app, deps, pipe)
    install_web(app, deps, pipe)
    return pipe
