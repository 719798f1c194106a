"""An in-memory meter-event sink with Stripe's identifier semantics (for tests and dry runs)."""

from __future__ import annotations

from decimal import Decimal

from sinks.base import Outcome, Status
from sinks.stripe.v1 import MeterEvent

__all__ = ["MemoryMeterSink"]


class MemoryMeterSink:
    """Keeps every accepted event; a repeated identifier is a ``duplicate``, as at Stripe.

    ``conflicts`` records any identifier that arrived again with a *different* value — the one thing
    that must never happen.
    """

    def __init__(self) -> None:
        self.events: dict[str, MeterEvent] = {}
        self.conflicts: list[tuple[MeterEvent, MeterEvent]] = []
        self.calls = 0
        self._buffer: list[MeterEvent] = []

    def add(self, item: MeterEvent) -> None:
        self._buffer.append(item)

    def flush(self) -> list[Outcome[MeterEvent]]:
        todo, self._buffer = self._buffer, []
        out: list[Outcome[MeterEvent]] = []
        for ev in todo:
            self.calls += 1
            prev = self.events.get(ev.identifier)
            if prev is None:
                self.events[ev.identifier] = ev
                out.append(Outcome(ev, Status.OK))
            else:
                if prev.value != ev.value or prev.customer != ev.customer:
                    self.conflicts.append((prev, ev))
                out.append(Outcome(ev, Status.DUPLICATE, "identifier already used"))
        return out

    def totals(self) -> dict[tuple[str, str], Decimal]:
        """(customer, event_name) -> Σ value."""
        acc: dict[tuple[str, str], Decimal] = {}
        for ev in self.events.values():
            key = (ev.customer, ev.event_name)
            acc[key] = acc.get(key, Decimal(0)) + Decimal(ev.value)
        return acc
