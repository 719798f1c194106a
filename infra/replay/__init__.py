"""``edgebill replay``: re-derive a range of ``usage-ticks`` and diff it against what the ledger billed.

Plan (:mod:`~infra.replay.plan`) -> scan (:mod:`~infra.replay.scan`, no group, no commits) -> price
(:mod:`~infra.replay.price`, the closer's rules) -> compare (:mod:`~infra.replay.compare`), driven by
:mod:`~infra.replay.run`. Read-only unless ``--apply``: :func:`apply_missing` writes missing ticks,
:func:`apply_repairs` writes correction rows; neither rewrites a row. Exit codes: :data:`EXIT_DIFFERENCES`,
:data:`EXIT_PENDING_CLOSE`. The steps and labels: docs/architecture.md, "Module notes".
"""

from __future__ import annotations

from infra.replay.apply import APPLY_CHUNK, ApplyResult, apply_missing, apply_problems
from infra.replay.compare import _compare as _compare
from infra.replay.compare import _compared_buckets as _compared_buckets
from infra.replay.compare import _id_scope as _id_scope
from infra.replay.compare import _ledger_ids as _ledger_ids
from infra.replay.plan import PartitionRange, ReplayError, ReplayRefused, ReplaySpec, plan_ranges
from infra.replay.plan import _slices as _slices
from infra.replay.price import Aggregates, Key, Pricer, load_pricer
from infra.replay.render import progress_display, render_table
from infra.replay.repair import RepairResult, apply_repairs, repair_problems, repairable
from infra.replay.report import (
    EXIT_CLEAN,
    EXIT_DIFFERENCES,
    EXIT_PENDING_CLOSE,
    LABELS,
    PENDING_CLOSE_NOTE,
    KeyDiff,
    OrgMeterDiff,
    ReplayReport,
    ReplayResult,
)
from infra.replay.run import INLINE_BELOW_RECORDS, MAX_JOBS, run_replay
from infra.replay.scan import STALL_SECONDS, ScanCounts

__all__ = [
    "APPLY_CHUNK",
    "EXIT_CLEAN",
    "EXIT_DIFFERENCES",
    "EXIT_PENDING_CLOSE",
    "INLINE_BELOW_RECORDS",
    "LABELS",
    "MAX_JOBS",
    "PENDING_CLOSE_NOTE",
    "STALL_SECONDS",
    "Aggregates",
    "ApplyResult",
    "Key",
    "KeyDiff",
    "OrgMeterDiff",
    "PartitionRange",
    "Pricer",
    "RepairResult",
    "ReplayError",
    "ReplayRefused",
    "ReplayReport",
    "ReplayResult",
    "ReplaySpec",
    "ScanCounts",
    "apply_missing",
    "apply_problems",
    "apply_repairs",
    "load_pricer",
    "plan_ranges",
    "progress_display",
    "render_table",
    "repair_problems",
    "repairable",
    "run_replay",
]
