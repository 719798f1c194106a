"""The SQL ledger: usage samples (dedup by tick id), org policy history, the meter-row outbox.

Every write here is one database transaction; each function's docstring gives the order of its
side effects and what a crash between two of them does. The tables are in :mod:`sinks.schema`, and
only this package (and the parity store, over its own tables) touches them: replay, the benchmarks and
the commands read through :class:`Ledger` methods.

One module per job, joined into :class:`Ledger`:

* :mod:`~sinks.ledger.store` — the engine, the write view, upserts, counters, partition progress;
* :mod:`~sinks.ledger.ingest` — samples, policies, progress, highwaters (the worker's hot path);
* :mod:`~sinks.ledger.closer` — samples into meter rows, with the zombie rule in SQL;
* :mod:`~sinks.ledger.outbox` — the rows to send, send outcomes, Stripe's error-report cursor;
* :mod:`~sinks.ledger.queries` — read models for reports, commands and replay.

Concurrency: SQLite serialises writers; on PostgreSQL the closer takes a transaction-scoped
advisory lock so that two workers can never close at once, plus a short SHARE lock on
``usage_samples`` so that no sample below the insertion ``seq`` it reads can still be uncommitted.
Ingest only inserts; samples are never updated (see :meth:`Ledger.close`).
"""

from __future__ import annotations

from models.zombie import ZOMBIE_SLACK_MS
from sinks.ledger.closer import CloseConfig, CloseResult, LedgerCloser, close_position, not_aggregated, zombie_expr
from sinks.ledger.ingest import IngestResult, LedgerIngest, SourcedTick
from sinks.ledger.outbox import LedgerOutbox, MeterRow
from sinks.ledger.queries import LedgerQueries
from sinks.ledger.store import Clock, SqlStore, policy_from_row, read_partition_states, wall_clock_ms

__all__ = [
    "ZOMBIE_SLACK_MS",
    "Clock",
    "CloseConfig",
    "CloseResult",
    "IngestResult",
    "Ledger",
    "LedgerCloser",
    "LedgerIngest",
    "LedgerOutbox",
    "LedgerQueries",
    "MeterRow",
    "SourcedTick",
    "SqlStore",
    "close_position",
    "not_aggregated",
    "policy_from_row",
    "read_partition_states",
    "wall_clock_ms",
    "zombie_expr",
]


class Ledger(LedgerIngest, LedgerCloser, LedgerOutbox, LedgerQueries):
    """All ledger reads and writes. One instance per process; thread-safe through the engine pool."""
