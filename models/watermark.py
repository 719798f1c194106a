"""The event-time watermark that decides when a bucket may close. Pure functions: no I/O, no clock.

The watermark is the minimum over every partition of every input topic of what it guarantees: *now* when
caught up and reported recently, its newest event time written when lagging, nothing (``None``) when
unreported, stale, or lagging with nothing written. A bucket ``[s, e)`` closes once ``e + grace <=
watermark``. Why: docs/architecture.md, "Module notes".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from models.billing import bucket_start_s

__all__ = ["PartitionState", "last_closable_bucket", "partition_watermark", "watermark"]


@dataclass(frozen=True, slots=True)
class PartitionState:
    topic: str
    partition: int
    committed_offset: int  # last offset written to the ledger, -1 if none
    max_event_ms: int | None  # newest event time written, None if none / no event time
    highwater: int | None  # log end offset as last reported by the owner
    reported_ms: int | None  # when the owner last reported


def partition_watermark(
    state: PartitionState | None, now_ms: int, stale_after_ms: int, *, event_time: bool = True
) -> int | None:
    """What one partition guarantees (see module doc); None holds the watermark back."""
    if state is None:
        return None
    fresh = state.reported_ms is not None and now_ms - state.reported_ms <= stale_after_ms
    caught_up = fresh and state.highwater is not None and state.committed_offset + 1 >= state.highwater
    if caught_up:
        return now_ms
    if not event_time:
        return None
    return state.max_event_ms


def watermark(
    states: Iterable[PartitionState],
    required: Mapping[str, int],
    now_ms: int,
    stale_after_ms: int,
    *,
    event_time_topics: frozenset[str],
) -> int | None:
    """The global watermark over ``required`` = {topic: partition count}; None when any partition holds it."""
    by_key = {(s.topic, s.partition): s for s in states}
    marks: list[int] = []
    for topic, count in required.items():
        for p in range(count):
            wm = partition_watermark(
                by_key.get((topic, p)), now_ms, stale_after_ms, event_time=topic in event_time_topics
            )
            if wm is None:
                return None
            marks.append(wm)
    if not marks:
        return None
    return min(min(marks), now_ms)


def last_closable_bucket(watermark_ms: int, bucket_seconds: int, grace_seconds: int) -> int | None:
    """Start of the newest bucket with ``end + grace <= watermark``, or None if there is none yet."""
    wm_s = watermark_ms // 1000
    limit = wm_s - grace_seconds - bucket_seconds  # start <= limit  <=>  start + size + grace <= wm
    if limit < 0:
        return None
    return bucket_start_s(limit, bucket_seconds)
