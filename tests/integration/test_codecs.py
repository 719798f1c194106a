"""Every Kafka codec a producer may use (gzip, snappy, lz4, zstd) is ingested, on SQLite and PostgreSQL.

Producers in other languages often compress with lz4, snappy or zstd by default; aiokafka decodes those
with ``cramjam`` (pinned). Each codec's batch is followed by uncompressed ticks: all are billed exactly.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from infra.kafka_io import publish_sync

pytestmark = pytest.mark.integration

CODECS = ("gzip", "snappy", "lz4", "zstd")
TS = "2026-09-21T12:00:00Z"


def tick(tid: str, org: str, memory: int) -> bytes:
    return orjson.dumps({"id": tid, "org_id": org, "payload": {"interval_s": 20, "memory_mb": memory}, "timestamp": TS})


async def produce_compressed(bootstrap: str, topic: str, codec: str, values: list[bytes]) -> None:
    """Send ``values`` as compressed record batches (several records per batch: linger + one partition)."""
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, compression_type=codec, linger_ms=100, max_batch_size=1024 * 1024, acks="all"
    )
    await producer.start()
    try:
        futures = [await producer.send(topic, v, key=b"k", partition=i % 2) for i, v in enumerate(values)]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


_READ_WITHOUT_CRAMJAM = """
import asyncio, sys
sys.modules["cramjam"] = None  # as if it were not installed
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import UnsupportedCodecError

async def main(bootstrap, topic):
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await c.start()
    try:
        tp = TopicPartition(topic, 0)
        c.assign([tp])
        await c.seek_to_beginning(tp)
        for _ in range(50):
            try:
                got = await c.getmany(tp, timeout_ms=200)
            except UnsupportedCodecError:
                print("UNSUPPORTED")
                return
            if got.get(tp):
                print("DECODED")
                return
        print("NOTHING")
    finally:
        await c.stop()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.parametrize("codec", ["snappy", "lz4", "zstd"])
def test_the_broker_keeps_batches_compressed_so_the_consumer_must_decode_them(
    kafka_bootstrap: str, create_topic: Any, topic_name: str, codec: str
) -> None:
    """Without a codec library the consumer cannot read these batches: the broker hands them over as
    produced (the worker test below therefore proves the worker decodes them)."""
    topic = create_topic(topic_name, 2)
    asyncio.run(produce_compressed(kafka_bootstrap, topic, codec, [tick(f"t{i}", "o", 1) for i in range(20)]))
    out = subprocess.run(
        [sys.executable, "-c", _READ_WITHOUT_CRAMJAM, kafka_bootstrap, topic],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "UNSUPPORTED", out.stdout + out.stderr


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_every_codec_is_ingested_exactly(make_stack: Any, database: str) -> None:
    stack = make_stack(database=database)
    stack.start_worker()
    topic = stack.topic("usage-ticks")
    truth: dict[str, tuple[int, int]] = {}
    for n, codec in enumerate(CODECS):
        org = f"org-{codec}"
        values = [tick(f"{codec}-{i}", org, 256 * (n + 1)) for i in range(200)]
        # an array record too: producers batch ticks in one value
        values.append(orjson.dumps([orjson.loads(tick(f"{codec}-arr-{i}", org, 256 * (n + 1))) for i in range(50)]))
        asyncio.run(produce_compressed(stack.bootstrap, topic, codec, values))
        plain = [(b"p", tick(f"plain-after-{codec}-{i}", "org-plain", 1024), i % 4) for i in range(10)]
        publish_sync(stack.bootstrap, topic, plain)
        truth[org] = (250, 250 * 20 * 256 * (n + 1))
    truth["org-plain"] = (40, 40 * 20 * 1024)
    total = sum(c for c, _ in truth.values())
    stack.wait(lambda: stack.ledger.counters().get("ticks.ingested", 0) >= total, 90, "every codec's ticks")
    assert stack.ledger.sample_totals() == truth
    assert stack.ledger.counters().get("records.rejected", 0) == 0
