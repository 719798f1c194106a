"""The zombie rule: usage a worker reports for a sandbox it did not own at the time is counted, not billed.

Decided in event time by :func:`is_zombie` (through :class:`models.usage.Pricer`, for the closer and replay
alike), with a slack of the tick's span plus ``ZOMBIE_SLACK_MS``; unknown ownership bills. The rule at
length: docs/architecture.md, "Module notes".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from models.ticks import MAX_INTERVAL_S

__all__ = [
    "MAX_ZOMBIE_SLACK_MS",
    "ZOMBIE_SLACK_MS",
    "Interval",
    "SandboxOwnership",
    "is_zombie",
    "ownership_by_sandbox",
    "zombie_slack_ms",
]

# Beyond the tick's own interval: the worker's and the cell's clocks may disagree by this much.
ZOMBIE_SLACK_MS: Final = 5_000

# (sandbox, worker, started_ms, ended_ms or None): one ownership interval as the cell side reports it.
Interval = tuple[str, str, int, int | None]


def zombie_slack_ms(interval_s: int) -> int:
    """How far around an ownership interval a tick of ``interval_s`` seconds still counts as covered."""
    return interval_s * 1000 + ZOMBIE_SLACK_MS


# The largest slack any valid tick gets: intervals starting later than a tick plus this cannot decide it.
MAX_ZOMBIE_SLACK_MS: Final = zombie_slack_ms(MAX_INTERVAL_S)


@dataclass(slots=True)
class SandboxOwnership:
    """What the cell side knows of one sandbox: its earliest interval start, and its intervals
    ``(started_ms, ended_ms or None)`` per owning worker."""

    first_start_ms: int
    by_worker: dict[str, list[tuple[int, int | None]]]


def ownership_by_sandbox(intervals: Iterable[Interval]) -> dict[str, SandboxOwnership]:
    """Index ownership intervals by sandbox, for :func:`is_zombie`."""
    out: dict[str, SandboxOwnership] = {}
    for sandbox, worker, started, ended in intervals:
        o = out.get(sandbox)
        if o is None:
            o = out[sandbox] = SandboxOwnership(started, {})
        elif started < o.first_start_ms:
            o.first_start_ms = started
        o.by_worker.setdefault(worker, []).append((started, ended))
    return out


def is_zombie(owner: SandboxOwnership | None, worker_id: str, ts_ms: int, interval_s: int) -> bool:
    """The zombie rule for a tick of ``worker_id`` at ``ts_ms``; ``owner``: what the cell side
    knows of the tick's sandbox (None: nothing)."""
    if not worker_id or owner is None:
        return False
    slack = interval_s * 1000 + ZOMBIE_SLACK_MS  # zombie_slack_ms, inlined: replay calls this per tick
    if owner.first_start_ms > ts_ms + slack:
        return False  # the sandbox was not known to have started by t: ownership unknown, allowed
    for started, ended in owner.by_worker.get(worker_id, ()):
        if started - slack <= ts_ms and (ended is None or ts_ms <= ended + slack):
            return False
    return True
