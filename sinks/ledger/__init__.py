"""The SQL ledger: ticks in compressed batches (dedup by bucket and tick id), org policy history, the meter-row
outbox.

Every write here is one database transaction; each function's docstring gives the order of its
side effects and what a crash between two of them does. The tables are in :mod:`sinks.schema`, and
only this package (and the parity store, over its own tables) touches them: replay, the benchmarks and
the commands read through :class:`Ledger` methods.

One module per job, joined into :class:`Ledger`:

* :mod:`~sinks.ledger.store` — the engine, the write view, upserts, counters, partition progress;
* :mod:`~sinks.ledger.batches` — the stored form of tick batches, and their decoding;
* :mod:`~sinks.ledger.dedup` — exact dedup of tick ids in memory, in step with the stored batches;
* :mod:`~sinks.ledger.ingest` — tick batches, policies, progress, highwaters (the worker's hot path);
* :mod:`~sinks.ledger.closer` — ticks into meter rows, priced by :class:`models.usage.Pricer`;
* :mod:`~sinks.ledger.outbox` — the rows to send, send outcomes, Stripe's error-report cursor;
* :mod:`~sinks.ledger.queries` — read models for reports, commands and replay;
* :mod:`~sinks.ledger.corrections` — rows written or moved after a close by operator commands (replay's
  corrections, cancellations at Stripe), keeping the rounding carry exact;
* :mod:`~sinks.ledger.cutover` — the cutover's audit log, the state in force, the workers' acknowledgements,
  a rollback's sweep and a release; :class:`CutoverView` for the worker.

Concurrency: SQLite serialises writers; on PostgreSQL ingest transactions take an advisory lock one at a
time (dedup must see every batch committed before it), the closer takes another so that two workers can
never close at once, plus a short SHARE lock on ``tick_batches`` so that no batch below the insertion
``seq`` it reads can still be uncommitted. Ingest only inserts; batches are never updated (see
:meth:`Ledger.close`).
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
