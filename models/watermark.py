"""The event-time watermark that decides when a bucket may close.

Closing must neither wait for ever on an idle partition nor close a bucket while unread ticks for it may
still sit in the topic; it must also survive restarts and rebalances, so it is driven by what the ledger
holds, not by Faust's wall-clock windows (which never fire for a window open at shutdown and drop late
data silently).

The watermark is the minimum, over every partition of every input topic, of what that partition
guarantees:

* a partition that is **caught up** (everything up to its log end is written to the ledger, and
  its owner reported the log end recently) guarantees wall-clock *now*: any tick still to come is
  produced from now on, and one for an old bucket is late data (a correction), not a reason to wait;
* a partition that is **lagging** guarantees only the newest event time it has written
  (``max_event_ms``): unread ticks behind it may still belong to older buckets;
* a partition with no report, a stale report (owner gone, rebalance in progress), or nothing
  written while lagging guarantees nothing, and holds the watermark back (``None``).

Topics that carry no event time (``org-policy``) hold the watermark back while lagging, so a tick is
never priced before the policy that was published ahead of it has been read.

A bucket ``[s, e)`` closes once ``e + grace <= watermark``. Pure functions: no I/O, no clock.
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
