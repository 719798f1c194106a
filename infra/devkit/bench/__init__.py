"""``edgebill bench``: performance measured in one run, as ratios against the raw limit of this machine.

Every benchmark prints JSON lines ``{"metric", "value", "unit", "ratio_to_raw", ...}``. The raw limit is
what a bare aiokafka consumer does on the same broker and the same messages (``getmany`` + orjson
decode), measured in the same run, so the ratios stay comparable across machines and noise.

Beside a wall-clock rate of ticks, a line carries ``cpu_us_per_tick`` (the CPU the process doing the work
spent per tick: the worker's own clock, the raw consumer's, the replay's; = CPU seconds per million ticks)
and ``cpu_ratio_to_raw`` (the raw consumer's CPU per tick / this one's: the same "fraction of raw" as
``ratio_to_raw``, but in CPU, which a neighbour on the same cores disturbs far less than wall time).

``--runs N`` repeats every selected benchmark N times, each run on a fresh broker with the raw limit measured
again; every line then carries its ``run``, and after the last run one ``"summary": true`` line per metric
gives the median of the runs for each figure that varied, with every run's value under ``runs``.

Benchmarks register themselves in :data:`BENCHMARKS` (name -> function taking a :class:`BenchContext`
and yielding :class:`Metric`); every module of this package is imported to fill it.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import pkgutil
import statistics
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

__all__ = [
    "BENCHMARKS",
    "BenchContext",
    "Metric",
    "RawLimit",
    "raw_consume_rate",
    "register",
    "run_benchmarks",
    "summarize",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Metric:
    metric: str
    value: float
    unit: str
    ratio_to_raw: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    cpu_us_per_tick: float | None = None  # CPU of the process doing the work, per tick (= CPU s per 1M ticks)
    cpu_ratio_to_raw: float | None = None  # raw consumer's CPU per tick / cpu_us_per_tick

    def fields(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "metric": self.metric,
            "value": round(self.value, 3),
            "unit": self.unit,
            "ratio_to_raw": None if self.ratio_to_raw is None else round(self.ratio_to_raw, 4),
        }
        if self.cpu_us_per_tick is not None:
            d["cpu_us_per_tick"] = round(self.cpu_us_per_tick, 3)
        if self.cpu_ratio_to_raw is not None:
            d["cpu_ratio_to_raw"] = round(self.cpu_ratio_to_raw, 4)
        d.update(self.extra)
        return d

    def line(self) -> str:
        return json.dumps(self.fields())


@dataclass(frozen=True)
class RawLimit:
    """The raw consumer on one message shape: ticks per wall second, and its own CPU per tick."""

    rate: float
    cpu_us_per_tick: float

    def cpu_ratio(self, cpu_us_per_tick: float | None) -> float | None:
        """The raw consumer's CPU per tick over ``cpu_us_per_tick`` (None without a usable measurement)."""
        return self.cpu_us_per_tick / cpu_us_per_tick if cpu_us_per_tick else None


@dataclass
class BenchContext:
    bootstrap: str
    workdir: Path
    quick: bool
    raw: dict[str, float] = field(default_factory=dict)  # raw limits measured in this run (ticks/s)
    raw_cpu: dict[str, float] = field(default_factory=dict)  # the raw consumer's CPU µs per tick, same keys

    def scale(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def raw_limit(self, kind: str, n_ticks: int) -> RawLimit:
        """The raw limit of ``kind`` ("single" or "batched") measured in this run, or measured now on
        ``n_ticks`` ticks when the ``raw`` benchmark did not give it."""
        if kind not in self.raw or kind not in self.raw_cpu:
            rate, cpu, _ = raw_consume(self, 1 if kind == "single" else 100, n_ticks)
            self.raw[kind], self.raw_cpu[kind] = rate, cpu
        return RawLimit(self.raw[kind], self.raw_cpu[kind])


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


async def _raw_consume(bootstrap: str, topic: str, expect_ticks: int, limit_s: float = 120.0) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) a bare consumer needs to read and orjson-decode
    ``expect_ticks`` ticks from ``topic``."""
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
        c0 = time.process_time()
        t0 = time.perf_counter()
        deadline = t0 + limit_s
        while seen < expect_ticks and time.perf_counter() < deadline:
            batch = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for recs in batch.values():
                for r in recs:
                    doc = loads(r.value)
                    seen += len(doc) if isinstance(doc, list) else 1
        return time.perf_counter() - t0, time.process_time() - c0
    finally:
        await consumer.stop()


def raw_consume(ctx: BenchContext, per_message: int, n_ticks: int) -> tuple[float, float, str]:
    """(ticks/s, CPU µs per tick, topic) of the raw limit for ``n_ticks`` ticks sent ``per_message`` per message."""
    from infra.kafka_admin import ensure_topics

    topic = f"bench-raw-{per_message}-{uuid.uuid4().hex[:6]}"
    ensure_topics(ctx.bootstrap, {topic: 4})
    msgs = tick_messages(n_ticks, per_message)
    asyncio.run(publish(ctx.bootstrap, topic, msgs))
    secs, cpu = asyncio.run(_raw_consume(ctx.bootstrap, topic, n_ticks))
    return n_ticks / secs, cpu * 1e6 / n_ticks, topic


def raw_consume_rate(ctx: BenchContext, per_message: int, n_ticks: int) -> tuple[float, str]:
    """(ticks/s, topic) of the raw limit for ``n_ticks`` ticks sent ``per_message`` per message."""
    rate, _, topic = raw_consume(ctx, per_message, n_ticks)
    return rate, topic


@register("raw")
def bench_raw(ctx: BenchContext) -> Iterator[Metric]:
    """The physical limit: bare aiokafka getmany + orjson decode of the same ticks (its CPU per tick beside)."""
    n = ctx.scale(200_000, 40_000)
    for kind, per_message, count in (("single", 1, n), ("batched", 100, n * 2)):
        rate, cpu, _ = raw_consume(ctx, per_message, count)
        ctx.raw[kind], ctx.raw_cpu[kind] = rate, cpu
        extra: dict[str, Any] = {"ticks": count} if per_message == 1 else {"ticks": count, "per_message": 100}
        yield Metric(f"raw_consume_{kind}_ticks_per_s", rate, "ticks/s", 1.0, extra, cpu, 1.0)


def _load_modules() -> None:
    """Import every benchmark module of this package (each registers its benchmarks on import)."""
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")


def _run_once(
    names: list[str], quick: bool, run: int | None, emit: Callable[[str], None]
) -> tuple[list[Metric], list[str]]:
    """Every benchmark in ``names`` once, on a fresh broker and work folder: (the metrics, the failed names)."""
    metrics: list[Metric] = []
    failed: list[str] = []
    tag = {} if run is None else {"run": run}
    with tempfile.TemporaryDirectory(prefix="edgebill-bench-") as tmp, EmbeddedBroker(free_port()) as broker:
        ctx = BenchContext(bootstrap=broker.bootstrap, workdir=Path(tmp), quick=quick)
        for name in names:
            log.info("benchmark %s%s", name, "" if run is None else f" (run {run})")
            try:
                for metric in BENCHMARKS[name](ctx):
                    metrics.append(metric)
                    emit(json.dumps({**metric.fields(), **tag}))
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
                            **tag,
                        }
                    )
                )
                failed.append(name)
    return metrics, failed


def summarize(runs: list[list[Metric]]) -> list[dict[str, Any]]:
    """One line per metric over ``runs`` (each run's metrics): a figure equal in every run is kept as is;
    a number that varied becomes the median of the runs, with every run's value under ``runs``; anything
    else that varied is listed under ``runs``. Metrics missing from a run (it failed) are counted in
    ``runs_missing``."""
    order: list[str] = []
    by_metric: dict[str, list[dict[str, Any]]] = {}
    for metrics in runs:
        for m in metrics:
            if m.metric not in by_metric:
                order.append(m.metric)
                by_metric[m.metric] = []
            by_metric[m.metric].append(m.fields())
    out: list[dict[str, Any]] = []
    for name in order:
        lines = by_metric[name]
        line: dict[str, Any] = {"metric": name, "summary": True, "median_of": len(lines)}
        varied: dict[str, list[Any]] = {}
        keys = list(dict.fromkeys(k for d in lines for k in d if k != "metric"))
        for key in keys:
            values = [d.get(key) for d in lines]
            if all(v == values[0] for v in values):
                line[key] = values[0]
                continue
            varied[key] = values
            numbers = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
            line[key] = round(statistics.median(numbers), 4) if len(numbers) == len(values) else None
        line["runs"] = varied
        if len(lines) < len(runs):
            line["runs_missing"] = len(runs) - len(lines)
        out.append(line)
    return out


def run_benchmarks(only: list[str] | None, quick: bool, emit: Callable[[str], None], runs: int = 1) -> int:
    """Run the selected benchmarks (``raw`` always first) ``runs`` times, each time on a fresh embedded
    broker; with more than one run, then a summary line per metric (the median of the runs). 0 on success."""
    _load_modules()
    names = list(BENCHMARKS)
    if only:
        unknown = [n for n in only if n not in BENCHMARKS]
        if unknown:
            raise ValueError(f"unknown benchmark(s) {unknown}; known: {names}")
        names = ["raw", *[n for n in only if n != "raw"]]
    if runs < 1:
        raise ValueError(f"runs must be at least 1, not {runs}")
    all_metrics: list[list[Metric]] = []
    failed: list[str] = []
    for run in range(1, runs + 1):
        metrics, failures = _run_once(names, quick, run if runs > 1 else None, emit)
        all_metrics.append(metrics)
        failed.extend(failures)
    if runs > 1:
        for line in summarize(all_metrics):
            emit(json.dumps(line))
    return 1 if failed else 0
