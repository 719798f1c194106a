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
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import CommitFailedError, ConsumerStoppedError, IllegalStateError, KafkaError
from mode import Service

from streams.pipeline import IngestBatch, Pipeline, prepare_ingest
from streams.records import DeadLetter, RawRecord, retry_forever

__all__ = ["TickIngestor", "make_ingest_service"]

log = logging.getLogger(__name__)

SendDead = Callable[[list[DeadLetter]], Awaitable[None]]


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, owner: TickIngestor) -> None:
        self._owner = owner

    async def on_partitions_revoked(self, revoked: Any) -> None:
        # Let the batches already read finish (write + commit) so the next owner re-reads as little as
        # possible. Not needed for correctness: re-read ticks are duplicates by id.
        await self._owner.drain(limit_s=2.0)
        if revoked:
            log.info("ingest: partitions revoked %s", sorted(tp.partition for tp in revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info("ingest: partitions assigned %s", sorted(tp.partition for tp in assigned))


class TickIngestor:
    """Reads ``usage-ticks`` in batches and writes them to the ledger; see the module docstring."""

    def __init__(
        self,
        pipe: Pipeline,
        send_dead: SendDead,
        *,
        target_ticks: int = 8000,
        depth: int = 2,
    ) -> None:
        self.pipe = pipe
        self._send_dead = send_dead
        # Batches are sized in ticks, not messages: a message may carry one tick or hundreds.
        self._target_ticks = target_ticks
        self._ticks_per_message = 1.0
        k = pipe.deps.config.kafka
        self.group_id = f"{k.group_id}.ticks"
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=k.servers,
            group_id=self.group_id,
            client_id=f"edgebill-ingest-{pipe.deps.owner}",
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            # This consumer joins after Faust's own group (Faust starts services once it is ready), and on
            # Tansu a join lasts about session_timeout / 2: keep it short so ingest starts ~1 s later.
            session_timeout_ms=int(min(k.session_timeout, 2.0) * 1000),
            heartbeat_interval_ms=int(min(k.heartbeat_interval, 0.2) * 1000),
            rebalance_timeout_ms=int(min(k.rebalance_timeout, 2.0) * 1000),
            max_poll_interval_ms=300_000,
            request_timeout_ms=int(max(k.request_timeout, k.session_timeout + 5) * 1000),
            fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=k.max_fetch_bytes,
        )
        self._queue: asyncio.Queue[tuple[IngestBatch, dict[TopicPartition, int]] | None] = asyncio.Queue(depth)
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.batches = 0

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        await self._consumer.start()
        self._consumer.subscribe([self.pipe.ticks_topic], listener=_Listener(self))
        self._tasks = [
            asyncio.create_task(self._fetch_loop(), name="edgebill.ingest.fetch"),
            asyncio.create_task(self._write_loop(), name="edgebill.ingest.write"),
        ]
        log.info("ingest: consuming %s as group %s", self.pipe.ticks_topic, self.group_id)

    async def stop(self) -> None:
        """Stop reading, finish what was read (write + commit), leave the group."""
        self._stopping.set()
        fetch, write = self._tasks or (None, None)
        if fetch is not None:
            fetch.cancel()
            await asyncio.gather(fetch, return_exceptions=True)
        if write is not None:
            await self._queue.put(None)
            try:
                await asyncio.wait_for(write, timeout=30)
            except TimeoutError:
                log.error("ingest: the last batch did not finish writing within 30 s; it will be re-read")
        await self._consumer.stop()

    async def drain(self, limit_s: float) -> None:
        """Wait until every batch read so far is written and committed (best effort, bounded)."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout=limit_s)
        except TimeoutError:
            log.info("ingest: batches still in flight after %.1fs; they finish after the rebalance", limit_s)

    # -- progress -------------------------------------------------------------------------------

    def highwaters(self) -> dict[int, int]:
        """Log end of each owned partition, from the consumer's last Fetch responses (right on Tansu)."""
        out: dict[int, int] = {}
        for tp in self._consumer.assignment():
            hw = self._consumer.highwater(tp)
            if hw is not None:
                out[tp.partition] = int(hw)
        return out

    # -- loops ----------------------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        topic = self.pipe.ticks_topic
        while not self._stopping.is_set():
            try:
                max_records = max(1, min(10_000, int(self._target_ticks / self._ticks_per_message)))
                batch = await self._consumer.getmany(timeout_ms=200, max_records=max_records)
            except ConsumerStoppedError:
                return
            except KafkaError as exc:
                log.warning("ingest: fetch failed (%s); retrying", exc)
                await asyncio.sleep(0.5)
                continue
            if not batch:
                continue
            records: list[RawRecord] = []
            offsets: dict[TopicPartition, int] = {}
            for tp, msgs in batch.items():
                for m in msgs:
                    records.append(RawRecord(tp.partition, m.offset, m.key, m.value))
                offsets[tp] = msgs[-1].offset + 1
            prepared = prepare_ingest(records, topic, self.pipe.deps.clock_ms())
            per = (len(prepared.ticks) + len(prepared.dead)) / len(records)
            self._ticks_per_message = 0.7 * self._ticks_per_message + 0.3 * max(per, 1.0)
            await self._queue.put((prepared, offsets))

    async def _write_loop(self) -> None:
        while True:
            item = await self._queue.get()
            if item is None:
                self._queue.task_done()
                return
            try:
                prepared, offsets = item
                if prepared.dead:
                    for d in prepared.dead:
                        log.warning(
                            "dead-lettered %s: %s",
                            d.headers["edgebill-source"].decode(),
                            d.headers["edgebill-reason"].decode(),
                        )
                    await self._send_dead(prepared.dead)
                await retry_forever("ledger write", functools.partial(self.pipe.write_batch, prepared))
                try:
                    await self._consumer.commit(offsets)
                except (CommitFailedError, IllegalStateError, KafkaError) as exc:
                    # The batch is in the ledger; whoever reads these offsets again finds duplicates.
                    log.info("ingest: offset commit skipped (%s); re-reads are absorbed by tick-id dedup", exc)
                self.batches += 1
            finally:
                self._queue.task_done()


def make_ingest_service(pipe: Pipeline, send_dead: SendDead) -> type[Service]:
    """A :class:`mode.Service` class that runs a :class:`TickIngestor` with the Faust worker.

    The running ingestor is published as ``pipe.ingestor`` (the progress reporter reads its log ends).
    """

    class IngestService(Service):
        async def on_start(self) -> None:
            ingestor = TickIngestor(pipe, send_dead)
            await ingestor.start()
            pipe.ingestor = ingestor

        async def on_stop(self) -> None:
            ingestor, pipe.ingestor = pipe.ingestor, None
            if isinstance(ingestor, TickIngestor):
                await ingestor.stop()

    return IngestService
