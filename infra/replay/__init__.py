"""``edgebill replay``: re-derive a range of ``usage-ticks`` and diff it against what the ledger billed.

Kafka is the log of record and the ledger the state of record; replay checks one against the other.

1. **Plan** (:mod:`~infra.replay.plan`, read-only on Kafka): the partitions and offsets to read —
   ``[from, to)`` per partition, default the whole log as it is now (Tansu's short ``end_offsets`` are
   corrected with :func:`infra.kafka_fixes.true_end_offsets`; ticks produced after the plan are not read).
2. **Scan** (:mod:`~infra.replay.scan`): raw aiokafka consumers without a group (manual ``assign``, large
   ``getmany`` batches, no commits, so a running worker is never disturbed), every record through
   :func:`models.ticks.parse_record` (the ingest parser; rejects are counted by reason, never fatal),
   the tick's own timestamp against ``--since/--until`` and ``--bucket-from/--bucket-to`` (the broker's
   ListOffsets by time cannot be trusted for CreateTime on Tansu), dedup by tick id in memory.
   Big ranges are split over several processes (each reads a contiguous slice of every partition);
   ids seen by two of them are counted once, for the earliest slice.
3. **Price** (:mod:`~infra.replay.price`) each unique tick exactly as :meth:`sinks.ledger.Ledger.close`
   does, with the same rule functions: :func:`models.zombie.is_zombie` over the cell side's ownership
   intervals (the closer evaluates the same rule in SQL), the policy in force at the tick's time (split
   per tick only in buckets with a policy change, as the closer), :func:`models.pricing.price_usage`
   (the meter and units, or why the usage is not billed).
4. **Compare** (:mod:`~infra.replay.compare`) with the ledger, read-only through its methods: ticks of the
   range missing from the ledger's samples (by id) — the differences ``--apply`` writes — and samples of
   the range that the topic does not hold; per (org, bucket, meter) the re-derived units against the
   units of its meter rows summed over every revision and state plus the units of samples not aggregated
   into rows yet; per (org, meter) the values. :mod:`~infra.replay.run` drives the four steps,
   :mod:`~infra.replay.report` holds the result, :mod:`~infra.replay.render` prints it.

The unit comparison needs every tick of a bucket: it covers the buckets lying wholly inside the time
bounds, and it is skipped when the offset range is partial (not every partition from its log start to
its end) — the tick-level comparison (missing / extra) is exact in every case.

Each (org, bucket, meter) is labelled ``ok``, ``missing`` (ticks missing from the ledger explain it),
``under-billed`` or ``over-billed`` (for another reason: a policy or an ownership known only later), or
``pending_close`` whenever the ledger holds ticks of it that no meter row accounts for yet: Stripe has not
been billed for those, so such a key is never clean (exit :data:`EXIT_PENDING_CLOSE` when nothing else
differs; a difference elsewhere, or in the same key, still exits :data:`EXIT_DIFFERENCES`). Billing them is
the closer's job: no repair writes a correction for a key pending close.

:func:`apply_repairs` (:mod:`~infra.replay.repair`) repairs under- and over-billing with correction rows;
an over-billing still inside Stripe's 24 h cancel window is cancelled at Stripe and resent with its
corrected value under a new identifier, an older one gets a negative correction.

:func:`apply_missing` (:mod:`~infra.replay.apply`) writes only the missing ticks, through
:meth:`Ledger.write_ticks` with no partition progress (the id primary key absorbs anything already
present): the running closer turns them into correction rows ``…:r{n}`` for buckets already closed, and
the sender ships them. It never rewrites a row and never calls Stripe.
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
