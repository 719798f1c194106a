"""The ingest hot path: ``usage-ticks`` through a batch consumer inside the Faust worker.

Why not a Faust agent: Faust delivers every Kafka message through its per-message stream machinery
(a task and a ``wait_first`` per event). Measured on these 2-core machines, a bare Faust agent stops at
about 4,500 messages/s while a bare aiokafka consumer reads 130-170k single-tick messages/s
(``edgebill bench``). Ticks are high volume and need no per-message stream features, so they are
read in whole fetch batches by an aiokafka consumer owned by a Faust service (started and stopped
with the worker, in its event loop). Policies and scale events stay Faust agents.

Exactness is the same as before, and the order of side effects is explicit rather than left to Faust's
acking:

1. ``getmany`` a batch (several partitions, in offset order per partition);
2. parse it (:func:`streams.pipeline.prepare_ingest`), on the event loop;
3. in a second task, in fetch order: dead letters to ``usage-ticks-dlq`` (awaited), then the ledger
   transaction (samples deduplicated by tick id + partition progress + counters), in a thread;
4. only then commit the batch's offsets to Kafka.

A crash after 3 and before 4 re-delivers the batch: every tick id is already in the ledger and counts as
a duplicate. A rebalance between 3 and 4 makes the commit fail (the partitions moved): harmless for the
same reason. Parsing batch *n + 1* overlaps with writing batch *n* (SQLite and psycopg release the
GIL while they work), with at most ``depth`` batches in between (backpressure).

No single record can stop ingestion; each failure costs that record only:

* a record the parser rejects is dead-lettered (a bounded copy when it is larger than a producer request,
  :func:`streams.records.dead_letter`);
* a tick the *database* refuses (a data error, not an outage) is isolated from its batch and
  dead-lettered with the database's reason; the rest is written (:meth:`streams.pipeline.Pipeline.write_step`);
* a database that is unavailable is retried, never dead-lettered (not ready meanwhile);
* a dead letter that cannot be produced stops this consumer where it is, loudly (not ready, a metric, an
  error line): it retries and never commits an offset past the record it could not dead-letter.

Stopping never waits on a stuck write: the retry loops give up at once, a write still running in its
thread is abandoned after ``stop_grace_s`` (its offsets are not committed: the batch is re-read by the next
owner, its ticks counted as duplicates).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, Final, Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition, errors
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, ConsumerStoppedError, IllegalStateError, KafkaError
from mode import Service

from sinks.base import BATCH_RETRY, DEAD_LETTER_RETRY
from streams.config import KafkaConfig
from streams.health import (
    BROKER,
    DEAD_LETTERS,
    LEDGER,
    STARTING,
    Health,
    RateLimitedLog,
    dead_letter_failures_total,
    ingest_fetch_errors_total,
    ledger_write_failures_total,
)
from streams.pipeline import IngestBatch, WritePlan, prepare_ingest
from streams.records import (
    DeadLetter,
    Record,
    Stopped,
    bound_dead_letter,
    first_line,
    log_failure,
    retry_forever,
    retry_until_done,
    sleep_unless,
)

__all__ = ["BatchWriter", "IngestContext", "IngestService", "TickIngestor"]

log = logging.getLogger(__name__)

SendDead = Callable[[list[DeadLetter]], Awaitable[None]]

#: A dead letter the broker still finds too large is cut down to this before it is tried again.
SMALL_DEAD_LETTER_BYTES: Final = 16 * 1024
#: What the producer raises for a request the broker finds too large.
_TOO_LARGE: Final = (errors.MessageSizeTooLargeError, errors.RecordTooLargeError, errors.RecordListTooLargeError)
_DEAD_LETTER_TIMEOUT_S: Final = 30.0
_BROKER_PROBE_EVERY_S: Final = 3.0


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: TickIngestor) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: Any) -> None:
        # Let the batches already read finish (write + commit) so the next owner re-reads as little as
        # possible. Not needed for correctness: re-read ticks are duplicates by id.
        await self._owner.drain(limit_s=2.0)
        self._owner.forget(revoked)
        if revoked:
            log.info("ingest: partitions revoked %s", sorted(tp.partition for tp in revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("ingest: partitions assigned %s", sorted(tp.partition for tp in assigned))


class BatchWriter(Protocol):
    """The ledger side of ingest (:class:`streams.pipeline.Pipeline` is one): writes, dead letters, horizon."""

    horizon_s: int  # the ledger's dedup horizon as its last write reported it (prepare_ingest refuses before it)

    def write_step(self, plan: WritePlan) -> None: ...
    def too_old_letters(self, plan: WritePlan) -> list[DeadLetter]: ...
    def conflict_letters(self, plan: WritePlan) -> list[DeadLetter]: ...
    def refused_letters(self, plan: WritePlan) -> list[DeadLetter]: ...
    def finish_isolated(self, plan: WritePlan) -> None: ...


@dataclass(frozen=True, slots=True)
class IngestContext:
    """What a :class:`TickIngestor` reads from and reports to, besides its writer: the broker, ``topic``
    (dead letters to ``dlq_topic``), the owner's name, the clock, the readiness conditions it sets
    (``BROKER``, ``LEDGER``, ``DEAD_LETTERS``) and the log throttle of its repeated failures."""

    kafka: KafkaConfig
    topic: str
    dlq_topic: str
    owner: str
    clock_ms: Callable[[], int]
    health: Health
    log_throttle: RateLimitedLog


class TickIngestor:
    """Reads ``ctx.topic`` in batches and writes them through ``writer``; see the module docstring.
    ``send_dead`` produces dead letters."""

    def __init__(
        self,
        ctx: IngestContext,
        writer: BatchWriter,
        send_dead: SendDead,
        *,
        target_ticks: int = 8000,
        depth: int = 2,
        stop_grace_s: float = 3.0,
    ) -> None:
        self._ctx = ctx
        self._writer = writer
        self.health = ctx.health
        self._log_throttle = ctx.log_throttle
        self._send_dead = send_dead
        # Batches are sized in ticks, not messages: a message may carry one tick or hundreds.
        self._target_ticks = target_ticks
        self._ticks_per_message = 1.0
        self._stop_grace_s = stop_grace_s
        kafka = ctx.kafka
        self.group_id = f"{kafka.group_id}.ticks"
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=kafka.servers,
            group_id=self.group_id,
            client_id=f"edgebill-ingest-{ctx.owner}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # This consumer joins after Faust's own group (Faust starts services once it is ready), and on
            # Tansu a join lasts about session_timeout / 2: keep it short so ingest starts ~1 s later.
            session_timeout_ms=int(min(kafka.session_timeout, 2.0) * 1000),
            heartbeat_interval_ms=int(min(kafka.heartbeat_interval, 0.2) * 1000),
            rebalance_timeout_ms=int(min(kafka.rebalance_timeout, 2.0) * 1000),
            max_poll_interval_ms=300_000,
            request_timeout_ms=int(max(kafka.request_timeout, kafka.session_timeout + 5) * 1000),
            fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=kafka.max_fetch_bytes,
        )
        self._queue: asyncio.Queue[tuple[IngestBatch, dict[TopicPartition, int]] | None] = asyncio.Queue(depth)
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.batches = 0
        # Per owned partition: the next offset not yet written to the ledger (after a batch is written), and
        # the first offset fetched since it was assigned (until then): what the lag is counted from.
        self._written: dict[TopicPartition, int] = {}
        self._first_fetched: dict[TopicPartition, int] = {}
        self._probe_at = 0.0
        self._answer_at = time.monotonic()  # the broker's last sign of life

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._consumer.start()
        self._consumer.subscribe([self._ctx.topic], listener=_Listener(self))
        self._tasks = [
            asyncio.create_task(self._fetch_loop(), name="edgebill.ingest.fetch"),
            asyncio.create_task(self._write_loop(), name="edgebill.ingest.write"),
            asyncio.create_task(self._monitor_loop(), name="edgebill.ingest.monitor"),
        ]
        self.health.ok(STARTING)
        log.info("ingest: consuming %s as group %s", self._ctx.topic, self.group_id)

    async def stop(self) -> None:
        """Stop reading; finish the batches already read if that takes under ``stop_grace_s``; leave the group.

        Order: (1) stop fetching; (2) let the write task write + commit what is queued, for at most
        ``stop_grace_s`` (a retry in progress gives up at once: that batch is not committed); (3) cancel
        the write task if still running (a ledger write in its thread may still commit later: its batch is
        re-read by the next owner and counted as duplicates); (4) leave the group (bounded). Never longer
        than about ``stop_grace_s + 3`` seconds, whatever the broker or the database do.
        """
        self._stopping.set()
        fetch, write, monitor = self._tasks or (None, None, None)
        for t in (fetch, monitor):
            if t is not None:
                t.cancel()
                await asyncio.gather(t, return_exceptions=True)
        if write is not None:
            with contextlib.suppress(asyncio.QueueFull):  # if full: the write task sees the stop flag itself
                self._queue.put_nowait(None)
            done, _ = await asyncio.wait({write}, timeout=self._stop_grace_s)
            if not done:
                log.warning(
                    "ingest: the batch in progress did not finish within %.1f s of the stop; it is not committed "
                    "and will be re-read",
                    self._stop_grace_s,
                )
                write.cancel()
                await asyncio.gather(write, return_exceptions=True)
        try:
            await asyncio.wait_for(self._consumer.stop(), timeout=3.0)
        except (TimeoutError, KafkaError) as exc:
            log.warning("ingest: consumer stop did not finish cleanly (%s)", type(exc).__name__)

    async def drain(self, limit_s: float) -> None:
        """Wait until every batch read so far is written and committed (best effort, bounded)."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout=limit_s)
        except TimeoutError:
            log.info("ingest: batches still in flight after %.1fs; they finish after the rebalance", limit_s)

    def forget(self, partitions: Collection[TopicPartition]) -> None:
        """Partitions no longer owned: their lag is someone else's."""
        for tp in partitions:
            self._written.pop(tp, None)
            self._first_fetched.pop(tp, None)

    # -- progress -------------------------------------------------------------------------------

    def highwaters(self) -> dict[int, int]:
        """Log end of each owned partition, from the consumer's last Fetch responses (right on Tansu)."""
        out: dict[int, int] = {}
        for tp in self._consumer.assignment():
            hw = self._consumer.highwater(tp)
            if hw is not None:
                out[tp.partition] = int(hw)
        return out

    async def lag(self) -> int:
        """Records of the owned partitions not yet written to the ledger (log end as last fetched)."""
        total = 0
        for tp in self._consumer.assignment():
            hw = self._consumer.highwater(tp)
            if hw is None:
                continue
            base = self._written.get(tp, self._first_fetched.get(tp))
            if base is None:  # nothing fetched since assignment: count from where fetching starts
                try:
                    base = int(await asyncio.wait_for(self._consumer.position(tp), timeout=0.5))
                except (TimeoutError, IllegalStateError, KafkaError):
                    continue
            total += max(0, int(hw) - base)
        return total

    # -- loops ----------------------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        topic = self._ctx.topic
        while not self._stopping.is_set():
            try:
                max_records = max(1, min(10_000, int(self._target_ticks / self._ticks_per_message)))
                batch = await self._consumer.getmany(timeout_ms=200, max_records=max_records)
            except ConsumerStoppedError:
                return
            except KafkaError as exc:
                ingest_fetch_errors_total.inc()
                self._log_throttle.failure("fetch", "ingest: fetch failed (%s: %s); retrying", type(exc).__name__, exc)
                await asyncio.sleep(0.5)
                continue
            self._log_throttle.recovered("fetch")
            if not batch:
                continue
            records: list[Record] = []  # the consumer's own records: no copy per message
            offsets: dict[TopicPartition, int] = {}
            for tp, msgs in batch.items():
                records.extend(msgs)
                offsets[tp] = msgs[-1].offset + 1
                self._first_fetched.setdefault(tp, msgs[0].offset)
            prepared = prepare_ingest(records, topic, self._ctx.clock_ms(), self._writer.horizon_s)
            per = (len(prepared.ticks) + len(prepared.dead)) / len(records)
            self._ticks_per_message = 0.7 * self._ticks_per_message + 0.3 * max(per, 1.0)
            await self._queue.put((prepared, offsets))

    async def _write_loop(self) -> None:
        while True:
            if self._stopping.is_set() and self._queue.empty():
                return
            item = await self._queue.get()
            try:
                if item is None:
                    return
                prepared, offsets = item
                await self._write_until_done(prepared)
                await self._commit(offsets)
            except Stopped:
                log.info("ingest: stopping mid-batch; its offsets are not committed (it will be re-read)")
                return
            finally:
                self._queue.task_done()

    async def _write_until_done(self, prepared: IngestBatch) -> None:
        """:meth:`_write`, again after an unexpected error, by :data:`~sinks.base.BATCH_RETRY` (a bug must
        stall ingestion loudly, not kill it). Raises :class:`Stopped` when the worker stops meanwhile."""
        msg = "ingest: writing a batch failed unexpectedly (%s: %s); trying it again"
        failed = log_failure(self._log_throttle, "ingest batch", msg, level=logging.ERROR)
        await retry_until_done(
            "ingest batch", lambda: self._write(prepared), BATCH_RETRY, failed, stopping=self._stopping
        )
        self._log_throttle.recovered("ingest batch")

    async def _write(self, prepared: IngestBatch) -> None:
        """Write one batch: everything but the offset commit, which the caller does only after this returns.

        In order: (1) the parser's dead letters (those of ticks before the dedup horizon last seen included),
        produced and acknowledged; (2) the ledger transaction (ticks + progress + counters), or, when the
        database refuses a tick, the batch written in parts around it (:meth:`Pipeline.write_step`); (3) the
        dead letters of ticks the ledger itself found before its dedup horizon (it moved since the last
        batch), if any, and those of conflicting duplicates (an id stored already with another payload);
        then, only when the batch was written in parts, (4) the refused ticks' dead letters and (5) the
        batch's progress and counters. A crash anywhere re-delivers the whole batch: dead letters are written
        again, ticks already written count as duplicates. Raises :class:`Stopped` if the worker
        stops while a step is being retried; nothing of the batch is acknowledged then.
        """
        if prepared.dead:
            await self._dead_letters(prepared.dead)
        plan = WritePlan(prepared)
        await retry_forever(
            "ledger write",
            lambda: self._step(plan),
            log_throttle=self._log_throttle,
            health=self.health,
            condition=LEDGER,
            stopping=self._stopping,
        )
        if plan.too_old:
            await self._dead_letters(self._writer.too_old_letters(plan))
        if plan.conflicts:
            await self._dead_letters(self._writer.conflict_letters(plan))
        if plan.isolating:
            letters = self._writer.refused_letters(plan)
            if letters:
                await self._dead_letters(letters)
            await retry_forever(
                "ledger write",
                lambda: self._writer.finish_isolated(plan),
                log_throttle=self._log_throttle,
                health=self.health,
                condition=LEDGER,
                stopping=self._stopping,
            )
        self.health.progress()

    def _step(self, plan: WritePlan) -> None:
        try:
            self._writer.write_step(plan)
        except Exception:
            ledger_write_failures_total.labels("unavailable").inc()
            raise

    async def _commit(self, offsets: dict[TopicPartition, int]) -> None:
        try:
            await asyncio.wait_for(self._consumer.commit(offsets), timeout=10.0)
        except (CommitFailedError, IllegalStateError, KafkaError, TimeoutError) as exc:
            # The batch is in the ledger; whoever reads these offsets again finds duplicates.
            self._log_throttle.failure(
                "offset commit",
                "ingest: offset commit skipped (%s); re-reads are absorbed by tick-id dedup",
                type(exc).__name__,
                level=logging.INFO,
            )
        else:
            self._log_throttle.recovered("offset commit")
        for tp, nxt in offsets.items():
            if tp in self._first_fetched:  # still owned
                self._written[tp] = max(nxt, self._written.get(tp, 0))
        self.batches += 1

    async def _dead_letters(self, letters: list[DeadLetter]) -> None:
        """Produce ``letters`` to the dead-letter topic; retry until they are written or the worker stops.

        While they cannot be written, this consumer goes no further (no offset is committed past a record
        that is not dead-lettered): not ready (``dead_letters_unwritable``), the failure metric counts, and
        one error line says so (then once per interval); the waits are :data:`~sinks.base.DEAD_LETTER_RETRY`'s.
        A letter the broker finds too large is cut to :data:`SMALL_DEAD_LETTER_BYTES` and sent again at once.
        A retry after a partial failure may write some letters twice. Raises :class:`Stopped` when the worker
        stops meanwhile.
        """
        for d in letters:
            self._log_throttle.failure(
                f"dead letter {d.headers.get('edgebill-reason', b'?').decode(errors='replace')}",
                "dead-lettered %s: %s",
                d.headers["edgebill-source"].decode(),
                d.headers["edgebill-reason"].decode(errors="replace"),
            )

        async def send() -> None:
            nonlocal letters
            try:
                await asyncio.wait_for(self._send_dead(letters), timeout=_DEAD_LETTER_TIMEOUT_S)
            except _TOO_LARGE:
                if all(len(d.value) + len(d.key or b"") <= SMALL_DEAD_LETTER_BYTES for d in letters):
                    raise
                dead_letter_failures_total.inc()
                letters = [bound_dead_letter(d, SMALL_DEAD_LETTER_BYTES) for d in letters]
                log.warning("ingest: the broker refused a dead letter as too large; retrying with a 16 KiB prefix")
                await send()  # at once: the cut letters are small, a second refusal is an ordinary failure

        def failed(exc: Exception) -> None:
            dead_letter_failures_total.inc()
            self.health.fail(DEAD_LETTERS, f"{type(exc).__name__}: {first_line(exc)}")
            self._log_throttle.failure(
                "dead letters",
                "ingest: STOPPED - cannot write %d dead letter(s) to %s (%s: %s); nothing past them is "
                "committed until they are written",
                len(letters),
                self._ctx.dlq_topic,
                type(exc).__name__,
                first_line(exc),
                level=logging.ERROR,
            )

        await retry_until_done("dead letters", send, DEAD_LETTER_RETRY, failed, stopping=self._stopping)
        self.health.ok(DEAD_LETTERS)
        self._log_throttle.recovered("dead letters")

    async def _monitor_loop(self) -> None:
        """Every second: the lag (for the stall condition) and whether the broker answers."""
        while not self._stopping.is_set():
            try:
                self.health.observe_lag(await self.lag())
                await self._check_broker()
            except Exception as exc:
                self._log_throttle.failure("health check", "ingest: health check failed (%s)", first_line(exc))
            await sleep_unless(self._stopping, 1.0)

    async def _check_broker(self) -> None:
        """Whether the broker answers: a Fetch answered recently on an owned partition; else (no partition,
        or a paused fetcher) a metadata request, at most every few seconds. Unreachable once nothing has
        answered for ``broker_timeout_s``."""
        now = time.monotonic()
        newest: int | None = None
        for tp in self._consumer.assignment():
            stamp = self._consumer.last_poll_timestamp(tp)
            if stamp is not None and (newest is None or stamp > newest):
                newest = stamp
        if newest is not None:
            self._answer_at = max(self._answer_at, now - max(0.0, time.time() - newest / 1000))
        if now - self._answer_at < _BROKER_PROBE_EVERY_S:
            self._reachable()
            return
        if now - self._probe_at < _BROKER_PROBE_EVERY_S:
            return
        self._probe_at = now
        timeout_s = self.health.broker_timeout_s
        try:
            await asyncio.wait_for(self._consumer.topics(), timeout=timeout_s / 2)
        except (TimeoutError, KafkaError, OSError) as exc:
            silent = time.monotonic() - self._answer_at
            if silent >= timeout_s:
                servers = self._ctx.kafka.servers
                self.health.fail(BROKER, f"no answer from {servers} for {silent:.0f} s")
            self._log_throttle.failure(
                "broker", "ingest: the Kafka broker does not answer (%s: %s)", type(exc).__name__, first_line(exc)
            )
        else:
            self._answer_at = time.monotonic()
            self._reachable()

    def _reachable(self) -> None:
        self.health.ok(BROKER)
        self._log_throttle.recovered("broker")


class IngestService(Service):
    """Starts a new :class:`TickIngestor` with the worker, stops it with it; ``ingestor`` is the running one."""

    def __init__(self, new_ingestor: Callable[[], TickIngestor]) -> None:
        super().__init__()
        self._new_ingestor = new_ingestor
        self.ingestor: TickIngestor | None = None

    async def on_start(self) -> None:
        ingestor = self._new_ingestor()
        await ingestor.start()
        self.ingestor = ingestor

    async def on_stop(self) -> None:
        ingestor, self.ingestor = self.ingestor, None
        if ingestor is not None:
            await ingestor.stop()
