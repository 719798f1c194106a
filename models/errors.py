"""The one exception tree of edgebill: ``EdgebillError`` > ``ConfigError``, ``InvalidRecord``, ``LedgerError``,
``BrokerError``, ``CutoverRefused``.

Delivery failures are not exceptions: a sink returns one :class:`sinks.base.Outcome` per item; Stripe's
exceptions are classified at the boundary (:func:`sinks.stripe.errors.classify`).
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "ConfigError",
    "CutoverRefused",
    "EdgebillError",
    "InvalidRecord",
    "LedgerError",
    "TickRefused",
]


class EdgebillError(Exception):
    """Root of every exception edgebill raises on purpose."""


class ConfigError(EdgebillError):
    """The configuration is invalid. ``problems`` lists every problem found, not just the first."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


class InvalidRecord(EdgebillError):
    """A record that cannot be billed; ``reason`` is short, stable and machine-greppable."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class LedgerError(EdgebillError):
    """The SQL ledger refused an operation."""


class TickRefused(LedgerError):
    """The ledger refused to store a tick because of its data (a value no column it reaches could hold).

    A record error: the write path isolates the ticks it is about and dead-letters them."""


class BrokerError(EdgebillError):
    """The Kafka-compatible broker could not be started or reached."""


class CutoverRefused(EdgebillError):
    """A cutover command refused to change anything; ``problems`` lists every reason (``--force`` overrides
    those that may be overridden)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))
