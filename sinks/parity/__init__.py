"""The parity store: cell intervals from ``sandbox-scale-events``, the parity table, its alerts.

The rules are :mod:`models.parity`; this package reads and writes, one module per job, combined in
:class:`ParityStore`. Every write is one database transaction; each writing function's docstring gives the
order of its side effects and what a crash between them does. Its tables and what marks a bucket for
recomputing: docs/architecture.md, "Module notes".
"""

from __future__ import annotations

from sinks.parity.base import ParityConfig
from sinks.parity.cells import CellSide, ScaleWriteResult, SourcedScaleEvent
from sinks.parity.edge import EDGE_UPTO
from sinks.parity.reads import GateStatus, MetricsSnapshot, ParityReads, ParityRow, WindowOrg
from sinks.parity.refresh import PendingAlert, Refresher, RefreshResult, RefreshState

__all__ = [
    "EDGE_UPTO",
    "GateStatus",
    "MetricsSnapshot",
    "ParityConfig",
    "ParityRow",
    "ParityStore",
    "PendingAlert",
    "RefreshResult",
    "RefreshState",
    "ScaleWriteResult",
    "SourcedScaleEvent",
    "WindowOrg",
]


class ParityStore(CellSide, Refresher, ParityReads):
    """All parity reads and writes. Thread-safe through the engine pool; the refresher's cursors live in
    a :class:`RefreshState` owned by the caller."""
