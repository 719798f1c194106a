"""The one exception tree of edgebill.

::

    EdgebillError                      root: catch this to catch everything edgebill raises
    ├── ConfigError                    settings invalid; carries every problem at once
    ├── InvalidRecord                  a usage tick / policy record that cannot be used (dead-lettered)
    ├── LedgerError                    the SQL ledger refused an operation
    ├── BrokerError                    the Kafka broker could not be started or reached
    └── SinkError                      a sink could not deliver
        ├── TransientSinkError         retry later (429, 5xx, timeouts, connection drops)
        └── PermanentSinkError         retrying cannot help (Stripe 4xx other than 409/429)

Stripe's own exceptions are mapped onto ``TransientSinkError`` / ``PermanentSinkError`` at the
boundary (:mod:`sinks.stripe`), never further in.
"""

from __future__ import annotations

__all__ = [
    "BrokerError",
    "ConfigError",
    "EdgebillError",
    "InvalidRecord",
    "LedgerError",
    "PermanentSinkError",
    "SinkError",
    "TransientSinkError",
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


class BrokerError(EdgebillError):
    """The Kafka-compatible broker could not be started or reached."""


class SinkError(EdgebillError):
    """A sink could not deliver an item."""


class TransientSinkError(SinkError):
    """Delivery failed for a reason that may go away; ``retry_after`` (seconds) when the peer said."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        super().__init__(message)


class PermanentSinkError(SinkError):
    """Delivery was refused for good; ``code`` is the peer's error code when it gave one."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        self.code = code
        super().__init__(message)
