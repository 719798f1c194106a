"""Replay's plan: what to read (:class:`ReplaySpec`), the offsets of each partition (:func:`plan_ranges`),
and how the ranges are split over scan processes (:func:`_slices`)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from models.billing import bucket_start_s
from models.errors import EdgebillError

__all__ = ["NO_HIGH", "NO_LOW", "PartitionRange", "ReplayError", "ReplayRefused", "ReplaySpec", "plan_ranges"]

# The unbounded sides of a window of unix ms.
NO_LOW: Final = -(1 << 62)
NO_HIGH: Final = 1 << 62


class ReplayError(EdgebillError):
    """A replay could not be completed (broker, worker process, or ledger problem)."""


class ReplayRefused(EdgebillError):
    """``--apply`` refused to write; ``reasons`` says why (``--force`` overrides)."""

    def __init__(self, reasons: Sequence[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = list(reasons)


@dataclass(frozen=True)
class ReplaySpec:
    """What to replay. Offsets are per partition, ``[from, to)``; times are unix ms of the tick's own
    timestamp, ``[since, until)``; bucket bounds are bucket starts (unix s), both inclusive.

    ``from_offsets`` / ``to_offsets`` map a partition (or None: every partition) to an offset. ``orgs``
    narrows everything, the topic's ticks and the ledger's side, to those orgs.
    """

    topic: str
    partitions: tuple[int, ...] | None = None
    from_offsets: Mapping[int | None, int] = field(default_factory=dict)
    to_offsets: Mapping[int | None, int] = field(default_factory=dict)
    since_ms: int | None = None
    until_ms: int | None = None
    bucket_from: int | None = None
    bucket_to: int | None = None
    orgs: tuple[str, ...] | None = None  # only the ticks (and ledger samples and rows) of these orgs

    def window_ms(self, bucket_seconds: int) -> tuple[int, int]:
        """The tick filter as one half-open window ``[lo, hi)`` of unix ms (unbounded sides = ±2^62)."""
        lo, hi = NO_LOW, NO_HIGH
        if self.since_ms is not None:
            lo = self.since_ms
        if self.bucket_from is not None:
            lo = max(lo, bucket_start_s(self.bucket_from, bucket_seconds) * 1000)
        if self.until_ms is not None:
            hi = self.until_ms
        if self.bucket_to is not None:
            hi = min(hi, (bucket_start_s(self.bucket_to, bucket_seconds) + bucket_seconds) * 1000)
        return lo, hi


@dataclass(frozen=True, slots=True)
class PartitionRange:
    """Offsets ``[start, end)`` of one partition to read, and the log's bounds when the plan was made."""

    partition: int
    start: int
    end: int
    log_start: int
    log_end: int

    @property
    def size(self) -> int:
        return max(0, self.end - self.start)

    @property
    def whole(self) -> bool:
        return self.start <= self.log_start and self.end >= self.log_end


async def plan_ranges(bootstrap: str, spec: ReplaySpec) -> tuple[list[PartitionRange], bool]:
    """(ranges to read, complete) — ``complete``: every partition of the topic, from its log start to its end.

    Read-only: a group-less consumer asks for the partitions, their first offsets and their true ends.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from infra.kafka_fixes import true_end_offsets

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        await asyncio.sleep(0)  # see kafka_fixes.true_end_offsets: let the start-up task run before stop()
        parts = consumer.partitions_for_topic(spec.topic)
        if not parts:
            await consumer.topics()
            parts = consumer.partitions_for_topic(spec.topic)
        if not parts:
            raise ReplayError(f"topic {spec.topic!r} does not exist on {bootstrap}")
        every = sorted(parts)
        chosen = every if spec.partitions is None else sorted(set(spec.partitions))
        unknown = [p for p in chosen if p not in parts]
        if unknown:
            raise ReplayError(f"topic {spec.topic!r} has no partition(s) {unknown}; it has {every}")
        tps = [TopicPartition(spec.topic, p) for p in chosen]
        begins = await consumer.beginning_offsets(tps)
        ends = await true_end_offsets(consumer, tps)
    finally:
        await consumer.stop()
    ranges: list[PartitionRange] = []
    for tp in tps:
        log_start, log_end = int(begins[tp]), int(ends[tp])
        start = spec.from_offsets.get(tp.partition, spec.from_offsets.get(None, log_start))
        end = spec.to_offsets.get(tp.partition, spec.to_offsets.get(None, log_end))
        start, end = max(start, log_start), min(end, log_end)
        ranges.append(PartitionRange(tp.partition, start, max(start, end), log_start, log_end))
    complete = len(chosen) == len(every) and all(r.whole for r in ranges)
    return ranges, complete


def _slices(ranges: Sequence[PartitionRange], jobs: int) -> list[list[PartitionRange]]:
    """Split every partition's range into ``jobs`` contiguous slices; job k gets slice k of each."""
    out: list[list[PartitionRange]] = [[] for _ in range(jobs)]
    for r in ranges:
        n = r.size
        for k in range(jobs):
            a = r.start + n * k // jobs
            b = r.start + n * (k + 1) // jobs
            if b > a:
                out[k].append(PartitionRange(r.partition, a, b, r.log_start, r.log_end))
    return out
