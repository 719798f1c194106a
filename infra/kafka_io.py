"""Small aiokafka helpers for the CLI, the demo and tests: publish messages, read a topic."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

__all__ = ["ReadRecord", "TopicRead", "publish", "publish_sync", "read_to_end_sync", "read_topic", "read_topic_sync"]

log = logging.getLogger(__name__)


async def publish(
    bootstrap: str,
    topic: str,
    messages: Iterable[tuple[bytes | None, bytes]] | Iterable[tuple[bytes | None, bytes, int | None]],
    *,
    headers: list[tuple[str, bytes]] | None = None,
) -> int:
    """Send (key, value[, partition]) messages; wait until every one is acknowledged. Returns the count.

    A partition of None (or a 2-tuple) lets the key choose the partition, as producers normally do.
    """
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        linger_ms=5,
        max_batch_size=256 * 1024,
        max_request_size=16 * 1024 * 1024,
        acks="all",
    )
    await producer.start()
    n = 0
    try:
        futures = []
        for msg in messages:
            partition = msg[2] if len(msg) > 2 else None
            futures.append(await producer.send(topic, value=msg[1], key=msg[0], partition=partition, headers=headers))
            n += 1
            if len(futures) >= 5000:
                await asyncio.gather(*futures)
                futures.clear()
        await asyncio.gather(*futures)
        await producer.flush()
    finally:
        await producer.stop()
    return n


def publish_sync(
    bootstrap: str,
    topic: str,
    messages: Iterable[tuple[bytes | None, bytes]] | Iterable[tuple[bytes | None, bytes, int | None]],
) -> int:
    return asyncio.run(publish(bootstrap, topic, messages))


@dataclass(frozen=True, slots=True)
class ReadRecord:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    timestamp_ms: int | None = None


def _group_less_consumer(bootstrap: str) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest", group_id=None
    )


async def _assign_from_beginning(consumer: AIOKafkaConsumer, topic: str) -> list[Any]:
    """Assign every partition of ``topic`` to ``consumer`` at its first offset; [] when the topic does not exist."""
    from aiokafka import TopicPartition

    parts = consumer.partitions_for_topic(topic)
    if not parts:
        await consumer.topics()
        parts = consumer.partitions_for_topic(topic)
    if not parts:
        return []
    tps = [TopicPartition(topic, p) for p in sorted(parts)]
    consumer.assign(tps)
    await consumer.seek_to_beginning(*tps)
    return tps


def _read_record(partition: int, r: Any) -> ReadRecord:
    return ReadRecord(partition, r.offset, r.key, r.value, {k: bytes(v) for k, v in (r.headers or ())}, r.timestamp)


async def read_topic(
    bootstrap: str, topic: str, *, idle_timeout: float = 1.0, max_wait: float = 10.0
) -> list[ReadRecord]:
    """Every record of ``topic`` from the beginning (no group), stopping after ``idle_timeout`` of silence."""
    consumer = _group_less_consumer(bootstrap)
    await consumer.start()
    out: list[ReadRecord] = []
    try:
        if not await _assign_from_beginning(consumer, topic):
            return out
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_wait
        idle_since = loop.time()
        while loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            got = False
            for tp, recs in batch.items():
                for r in recs:
                    got = True
                    out.append(_read_record(tp.partition, r))
            if got:
                idle_since = loop.time()
            elif loop.time() - idle_since >= idle_timeout:
                break
    finally:
        await consumer.stop()
    return out


def read_topic_sync(
    bootstrap: str, topic: str, *, idle_timeout: float = 1.0, max_wait: float = 10.0
) -> list[ReadRecord]:
    return asyncio.run(read_topic(bootstrap, topic, idle_timeout=idle_timeout, max_wait=max_wait))


@dataclass(frozen=True, slots=True)
class TopicRead:
    """What :func:`read_to_end` found: the records, whether the topic exists, and whether it reached the end."""

    records: list[ReadRecord]
    exists: bool
    complete: bool


async def read_to_end(bootstrap: str, topic: str, *, max_wait: float = 60.0) -> TopicRead:
    """Every record of ``topic`` from the beginning up to each partition's high watermark, without a group.

    The end is the high watermark of the fetch responses (not ``end_offsets``, which some brokers answer
    short), so the read stops as soon as it has caught up instead of waiting for silence. ``complete`` is
    False when ``max_wait`` s passed first (the records read so far are returned).
    """
    consumer = _group_less_consumer(bootstrap)
    await consumer.start()
    out: list[ReadRecord] = []
    try:
        tps = await _assign_from_beginning(consumer, topic)
        if not tps:
            return TopicRead(out, exists=False, complete=True)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max_wait
        while loop.time() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for tp, recs in batch.items():
                out.extend(_read_record(tp.partition, r) for r in recs)
            done = True
            for tp in tps:
                hw = consumer.highwater(tp)
                if hw is None or await consumer.position(tp) < hw:
                    done = False
                    break
            if done:
                return TopicRead(out, exists=True, complete=True)
        return TopicRead(out, exists=True, complete=False)
    finally:
        await consumer.stop()


def read_to_end_sync(bootstrap: str, topic: str, *, max_wait: float = 60.0) -> TopicRead:
    return asyncio.run(read_to_end(bootstrap, topic, max_wait=max_wait))
