"""Replay's pricing: :class:`models.usage.Pricer` (the closer's own) loaded with the ledger's policies and the
cell side's ownership intervals."""

from __future__ import annotations

from infra.replay.plan import NO_HIGH
from models.usage import Aggregates, Groups, Key, Pricer
from models.zombie import MAX_ZOMBIE_SLACK_MS
from sinks.ledger import Ledger

__all__ = ["Aggregates", "Groups", "Key", "Pricer", "load_pricer"]


def load_pricer(ledger: Ledger, bucket_seconds: int, hi_ms: int = NO_HIGH) -> Pricer:
    """A :class:`Pricer` from the ledger's policies (all of them, converted as the closer converts them) and
    the cell side's ownership intervals. Intervals starting later than the window's end plus the largest
    slack cannot decide any tick of the window and are not read."""
    started_by = None if hi_ms >= NO_HIGH else hi_ms + MAX_ZOMBIE_SLACK_MS
    return Pricer(ledger.policies_by_org(), ledger.ownership_intervals(started_by), bucket_seconds)
