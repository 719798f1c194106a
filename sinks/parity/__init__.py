"""The parity store: cell intervals from ``sandbox-scale-events``, the parity table, its alerts.

Tables (:mod:`sinks.schema`, "parity" section): ``cell_intervals`` (one row per cell row id), ``usage_parity``
(one row per pro org × bucket: edge GB-s, cell GB-s, samples, drift, status), ``parity_edge`` (the edge
side's sums per bucket and org, each sample added once: :meth:`ParityStore.advance_edge`), ``parity_dirty`` (buckets
whose cell side changed since they were last computed), ``parity_alerts`` (one row per alert, the dedup)
and ``parity_state`` (the refresher's watermark and time of the last refresh).

The rules are in :mod:`models.parity`; this package only reads and writes, one module per job:
:mod:`~sinks.parity.cells` (scale events into intervals, dirty marks), :mod:`~sinks.parity.edge` (the
edge side's kept sums), :mod:`~sinks.parity.measure` (both sides of a span), :mod:`~sinks.parity.refresh`
(the recompute, the watermark, the alerts) and :mod:`~sinks.parity.reads` (rows, window, state, gate, the
metrics snapshot); :class:`ParityStore` combines them. Every write is one database transaction; each
writing function's docstring gives the order of its side effects and what a crash between them does.

What makes a bucket need recomputing (:meth:`ParityStore.refresh`):

* its cell side changed: the cell write marks every bucket an interval covered before and after the
  change, in the same transaction as the change (``parity_dirty``);
* its edge side changed: a sample for it was inserted after the refresher's cursor (insertion ``seq``).
  The cursor only moves up to the last close run's ``upto_seq``, a point below which no sample can still
  be uncommitted (the closer takes it under a lock), so every inserted sample is seen, late ones included;
* it is the current or the previous bucket (open intervals count up to *now*);
* an org's policy changed (plan membership): every bucket from the change on, within the lookback;
* the refresher just started: the whole lookback window.
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
