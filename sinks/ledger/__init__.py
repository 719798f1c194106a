"""The SQL ledger: ticks in compressed batches (dedup by bucket and tick id), org policy history, the meter-row
outbox; one module per job, joined into :class:`Ledger`.

Every write is one database transaction; each function's docstring gives the order of its side effects and
what a crash between two of them does. Only this package (and the parity store) touches the tables. Its
modules and locking: docs/architecture.md.
"""

from __future__ import annotations

from models.zombie import ZOMBIE_SLACK_MS
from sinks.ledger.closer import CloseConfig, CloseResult, LedgerCloser, close_position, not_aggregated
from sinks.ledger.corrections import Correction, LedgerCorrections, WrittenRow
from sinks.ledger.cutover import (
    BOOTSTRAP_SOURCE,
    LEDGER_SOURCE,
    CutoverView,
    EffectiveCutover,
    LedgerCutover,
    LogEntry,
    Recorded,
)
from sinks.ledger.ingest import CONFLICTING_DUPLICATE, Conflict, IngestResult, LedgerIngest, SourcedTick
from sinks.ledger.outbox import LedgerOutbox, MeterRow
from sinks.ledger.queries import LedgerQueries
from sinks.ledger.store import Clock, SqlStore, policy_from_row, read_partition_states, wall_clock_ms

__all__ = [
    "BOOTSTRAP_SOURCE",
    "CONFLICTING_DUPLICATE",
    "LEDGER_SOURCE",
    "ZOMBIE_SLACK_MS",
    "Clock",
    "CloseConfig",
    "CloseResult",
    "Conflict",
    "Correction",
    "CutoverView",
    "EffectiveCutover",
    "IngestResult",
    "Ledger",
    "LedgerCloser",
    "LedgerCorrections",
    "LedgerCutover",
    "LedgerIngest",
    "LedgerOutbox",
    "LedgerQueries",
    "LogEntry",
    "MeterRow",
    "Recorded",
    "SourcedTick",
    "SqlStore",
    "WrittenRow",
    "close_position",
    "not_aggregated",
    "policy_from_row",
    "read_partition_states",
    "wall_clock_ms",
]


class Ledger(LedgerIngest, LedgerCloser, LedgerOutbox, LedgerQueries, LedgerCutover):
    """All ledger reads and writes. One instance per process; thread-safe through the engine pool."""
