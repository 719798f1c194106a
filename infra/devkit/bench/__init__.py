"""``edgebill bench``: performance measured in one run, as ratios against the raw limit of this machine.

Every benchmark prints JSON lines ``{"metric", "value", "unit", "ratio_to_raw"}``. The raw limit is
what a bare aiokafka consumer does on the same broker and the same messages (``getmany`` + orjson
decode), measured in the same run, so the ratios stay comparable across machines and noise.

Benchmarks register themselves in :data:`BENCHMARKS` (name -> function taking a :class:`BenchContext`
and yielding :class:`Metric`); every module of this package is imported to fill it.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import pkgutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from infra.devkit.broker import EmbeddedBroker, free_port
from infra.kafka_io import publish

__all__ = ["BENCHMARKS", "BenchContext", "Metric", "raw_consume_rate", "register", "run_benchmarks"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Metric:
    metric: str
    value: float
    unit: str
    ratio_to_raw: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        d: dict[str, Any] = {
            "metric": self.metric,
            "value": round(self.value, 3),
            "unit": self.unit,
            "ratio_to_raw": None if self.ratio_to_raw is None else round(self.ratio_to_raw, 4),
        }
        d.update(self.extra)
        return json.dumps(d)


@dataclass
class BenchContext:
    bootstrap: str
    workdir: Path
    quick: bool
    raw: dict[str, float] = field(default_factory=dict)  # raw limits measured in this run (ticks/s)

    def scale(self, full: int, quick: int) -> int:
        return quick if self.quick else full


Benchmark = Callable[[BenchContext], Iterator[Metric]]
BENCHMARKS: dict[str, Benchmark] = {}


def register(name: str) -> Callable[[Benchmark], Benchmark]:
    def deco(fn: Benchmark) -> Benchmark:
        BENCHMARKS[name] = fn
        return fn

    return deco


def tick_messages(n_ticks: int, per_message: int, *, seed: int = 1, orgs: int = 1000) -> list[tuple[bytes, bytes]]:
    """``n_ticks`` usage ticks, ``per_message`` per Kafka message (1 = single envelopes, >1 = arrays)."""
    base_ms = (int(time.time()) // 3600 - 4) * 3600 * 1000
    span_ms = 3 * 3600 * 1000
    msgs: list[tuple[bytes, bytes]] = []
    batch: list[dict[str, Any]] = []
    for i in range(n_ticks):
        org = f"org_{(i * 7919 + seed) % orgs:04d}"
        env = {
            "id": f"sb_{i % 50_000:05d}:{seed}:{i}",
            "type": "usage_tick",
            "sandbox_id": f"sb_{i % 50_000:05d}",
            "org_id": org,
            "worker_id": "w-1",
            "cell_id": "bench",
            "payload": {"interval_s": 20, "memory_mb": 1024 * (1 + i % 4), "cpu_count": 2},
            # Time-ordered over 3 hours with a little jitter, as a fleet's stream is (buckets close
            # once, behind the stream, as in production).
            # (Clamped into the 3 hours: a tick in the hour before now would stay open until :10 past.)
            "timestamp": _iso(base_ms + min(i * span_ms // n_ticks + (i * 7919) % 5000, span_ms - 1)),
        }
        if per_message == 1:
            msgs.append((org.encode(), orjson.dumps(env)))
        else:
            batch.append(env)
            if len(batch) == per_message:
                msgs.append((org.encode(), orjson.dumps(batch)))
                batch = []
    if batch:
        msgs.append((b"org_rest", orjson.dumps(batch)))
    return msgs


def _iso(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def _raw_consume(bootstrap: str, topic: str, expect_ticks: int, limit_s: float = 120.0) -> float:
    """Seconds a bare consumer needs to read and orjson-decode ``expect_ticks`` ticks from ``topic``."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_bytes=64 * 1024 * 1024,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            await consumer.topics()
            parts = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in parts])
        seen = 0
        loads = orjson.loads
        t0 = time.perf_counter()
        deadline = t0 + limit_s
        while seen < expect_ticks and time.perf_counter() < deadline:
            batch = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for recs in batch.values():
                for r in recs:
                    doc = loads(r.value)
                    seen += len(doc) if isinstance(doc, list) else 1
        return time.perf_counter() - t0
    finally:
        await consumer.stop()


def raw_consume_rate(ctx: BenchContext, per_message: int, n_ticks: int) -> tuple[float, str]:
    """(ticks/s, topic) of the raw limit for ``n_ticks`` ticks sent ``per_message`` per message."""
    from infra.kafka_admin import ensure_topics

    topic = f"bench-raw-{per_message}-{uuid.uuid4().hex[:6]}"
    ensure_topics(ctx.bootstrap, {topic: 4})
    msgs = tick_messages(n_ticks, per_message)
    asyncio.run(publish(ctx.bootstrap, topic, msgs))
    secs = asyncio.run(_raw_consume(ctx.bootstrap, topic, n_ticks))
    return n_ticks / secs, topic


@register("raw")
def bench_raw(ctx: BenchContext) -> Iterator[Metric]:
    """The physical limit: bare aiokafka getmany + orjson decode of the same ticks."""
    n = ctx.scale(200_000, 40_000)
    single, _ = raw_consume_rate(ctx, 1, n)
    ctx.raw["single"] = single
    yield Metric("raw_consume_single_ticks_per_s", single, "ticks/s", 1.0, {"ticks": n})
    batched, _ = raw_consume_rate(ctx, 100, n * 2)
    ctx.raw["batched"] = batched
    yield Metric("raw_consume_batched_ticks_per_s", batched, "ticks/s", 1.0, {"ticks": n * 2, "per_message": 100})


def _load_modules() -> None:
    """Import every benchmark module of this package (each registers its benchmarks on import)."""
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")


def run_benchmarks(only: list[str] | None, quick: bool, emit: Callable[[str], None]) -> int:
    """Run the selected benchmarks (``raw`` always first) on a fresh embedded broker; 0 on success."""
    _load_modules()
    names = list(BENCHMARKS)
    if only:
        unknown = [n for n in only if n not in BENCHMARKS]
        if unknown:
            raise ValueError(f"unknown benchmark(s) {unknown}; known: {names}")
        names = ["raw", *[n for n in only if n != "raw"]]
    with tempfile.TemporaryDirectory(prefix="edgebill-bench-") as tmp, EmbeddedBroker(free_port()) as broker:
        ctx = BenchContext(bootstrap=broker.bootstrap, workdir=Path(tmp), quick=quick)
        failed = []
        for name in names:
            log.info("benchmark %s", name)
            try:
                for metric in BENCHMARKS[name](ctx):
                    emit(metric.line())
            except Exception as exc:  # one broken benchmark must not hide the others' figures
                log.exception("benchmark %s failed", name)
                emit(
                    json.dumps(
                        {
                            "metric": f"{name}_failed",
                            "value": None,
                            "unit": None,
                            "ratio_to_raw": None,
                            "error": f"{type(exc).__name__}: {exc}",
                        }
                    )
                )
                failed.append(name)
    return 1 if failed else 0
