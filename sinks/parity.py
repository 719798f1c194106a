"""The parity store: cell intervals from ``sandbox-scale-events``, the parity table, its alerts.

Tables (:mod:`sinks.schema`, "parity" section): ``cell_intervals`` (one row per cell row id), ``usage_parity``
(one row per pro org × bucket: edge GB-s, cell GB-s, samples, drift, status), ``parity_edge`` (the edge
side's sums per bucket and org, each sample added once: :meth:`ParityStore.advance_edge`), ``parity_dirty`` (buckets
whose cell side changed since they were last computed), ``parity_alerts`` (one row per alert, the dedup)
and ``parity_state`` (the refresher's watermark and time of the last refresh).

The rules are in :mod:`models.parity`; this module only reads and writes. Every write is one database
transaction; each writing function's docstring gives the order of its side effects and what a crash
between them does.

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

import logging
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Any, Final

import orjson
from sqlalchemy import Connection, Engine, and_, delete, func, or_, select, text, tuple_, union_all

from models.billing import Plan, bucket_start, bucket_start_s
from models.parity import (
    AlertEpisode,
    AlertRule,
    BucketVerdict,
    Interval,
    Measure,
    ParityStatus,
    ScaleEvent,
    alert_episodes,
    bucket_verdict,
    classify,
    clean_streak,
    edge_gb_seconds,
    gb_seconds_of_mb_ms,
    measure_intervals,
    ratio_decimal,
)
from models.policy import OrgPolicy, PolicyHistory
from models.stripe_window import PARITY_MARGIN_SECONDS, oldest_accepted_ms
from models.watermark import PartitionState, last_closable_bucket, watermark
from sinks.ledger import Clock, SqlStore, policy_from_row, read_partition_states, wall_clock_ms
from sinks.schema import (
    cell_intervals,
    close_runs,
    closed_buckets,
    counters,
    meter_events,
    org_policies,
    parity_alerts,
    parity_dirty,
    parity_edge,
    parity_state,
    usage_parity,
    usage_samples,
)

__all__ = [
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

log = logging.getLogger(__name__)

EDGE_UPTO: Final = "edge_upto_seq"  # parity_state: samples up to this seq are summed in parity_edge
_ADVISORY_LOCK_PARITY_EDGE: Final = 0x6564676570617269  # "edgepari": one edge advance at a time (PostgreSQL)

_CHUNK = 500  # ids per IN list
_MAX_SPAN_BUCKETS = 48  # buckets recomputed per transaction


@dataclass(frozen=True, slots=True)
class SourcedScaleEvent:
    event: ScaleEvent
    partition: int
    offset: int


@dataclass(frozen=True, slots=True)
class ScaleWriteResult:
    upserted: int
    reopen_ignored: int
    dirty_buckets: int


@dataclass(frozen=True, slots=True)
class ParityConfig:
    """Everything the refresher needs (built from the settings at the application edge)."""

    bucket_seconds: int
    grace_seconds: int
    tolerance: Fraction
    slack_seconds: int
    lookback_seconds: int
    rule: AlertRule
    stale_after_ms: int
    ticks_topic: str
    required: Mapping[str, int]  # topic -> partitions whose progress settles a bucket
    event_time_topics: frozenset[str]


@dataclass(frozen=True, slots=True)
class ParityRow:
    """One row of the parity table."""

    org_id: str
    bucket_start: int
    edge_mb_s: int
    samples: int
    cell_mb_ms: int
    slack_mb_ms: int
    drift: Decimal
    status: ParityStatus
    updated_ms: int

    @property
    def edge_gb_s(self) -> Decimal:
        return edge_gb_seconds(self.edge_mb_s)

    @property
    def cell_gb_s(self) -> Decimal:
        return gb_seconds_of_mb_ms(self.cell_mb_ms)

    @property
    def flagged(self) -> bool:
        return self.status is not ParityStatus.OK


@dataclass(frozen=True, slots=True)
class WindowOrg:
    """One org over an arbitrary window (the ``/internal/usage-parity`` answer)."""

    org_id: str
    measure: Measure
    drift: Decimal
    status: ParityStatus


@dataclass(frozen=True, slots=True)
class PendingAlert:
    id: str
    body: dict[str, Any]
    new: bool  # first time seen (log it); False = a retry of an unpublished alert


@dataclass(slots=True)
class RefreshState:
    """The refresher's in-memory cursors (one per process; a fresh one rebuilds the lookback window)."""

    policies: dict[str, tuple[tuple[int, str], ...]] | None = None
    close_cursor: int | None = None  # insertion seq of usage_samples seen (see the module doc)


@dataclass(slots=True)
class RefreshResult:
    buckets: list[int] = field(default_factory=list)
    rows: int = 0
    flagged: int = 0
    watermark_ms: int | None = None
    alerts: list[PendingAlert] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class GateStatus:
    """The cutover gate: consecutive clean settled buckets up to the newest settled one."""

    clean_buckets: int
    last_settled: int | None
    last_flagged: int | None
    first_bucket: int | None
    bucket_seconds: int

    @property
    def clean_hours(self) -> Decimal:
        return Decimal(self.clean_buckets * self.bucket_seconds) / 3600


@dataclass(slots=True)
class MetricsSnapshot:
    counters: dict[str, int]
    rows_by_state: dict[str, int]
    buckets_closed: int
    progress: list[PartitionState]
    parity_bucket: int | None  # newest settled bucket with parity rows
    parity_rows: list[ParityRow]
    gate: GateStatus | None
    refreshed_ms: int | None


def _spans(buckets: Iterable[int], size: int) -> Iterator[list[int]]:
    """Sorted buckets cut into runs of consecutive ones, at most _MAX_SPAN_BUCKETS long."""
    run: list[int] = []
    for b in sorted(set(buckets)):
        if run and (b != run[-1] + size or len(run) >= _MAX_SPAN_BUCKETS):
            yield run
            run = []
        run.append(b)
    if run:
        yield run


def _pro_during(hist: PolicyHistory, start_ms: int, end_ms: int) -> bool:
    """Was the org on the pro plan at any time in ``[start_ms, end_ms)``?"""
    pol = hist.as_of(start_ms)
    if pol is not None and pol.plan is Plan.PRO:
        return True
    for t in hist.change_points(start_ms, end_ms):
        p = hist.as_of(t)
        if p is not None and p.plan is Plan.PRO:
            return True
    return False


class ParityStore(SqlStore):
    """All parity reads and writes. Thread-safe through the engine pool; the refresher's cursors live in
    a :class:`RefreshState` owned by the caller."""

    def __init__(self, engine: Engine, *, bucket_seconds: int, clock: Clock = wall_clock_ms) -> None:
        super().__init__(engine, clock=clock)
        self.bucket_seconds = bucket_seconds

    # ------------------------------------------------------------------ helpers

    def _bucket(self, ms: int) -> int:
        return bucket_start(ms, self.bucket_seconds)

    def _mark_dirty(self, conn: Connection, buckets: Iterable[int]) -> int:
        rows = [{"bucket_start": b, "version": 1} for b in sorted(set(buckets))]
        if not rows:
            return 0
        stmt = self._insert(parity_dirty)
        conn.execute(
            stmt.on_conflict_do_update(index_elements=["bucket_start"], set_={"version": parity_dirty.c.version + 1}),
            rows,
        )
        return len(rows)

    def _covered(self, started_ms: int, ended_ms: int | None, now_ms: int) -> range:
        """Buckets an interval covers (open: up to now), limited to those Stripe could still take a change of."""
        size = self.bucket_seconds
        end = max(started_ms, now_ms if ended_ms is None else ended_ms)
        lo = max(self._bucket(started_ms), self._bucket(oldest_accepted_ms(now_ms, PARITY_MARGIN_SECONDS)))
        hi = min(self._bucket(end), self._bucket(now_ms) + size)
        return range(lo, hi + size, size) if hi >= lo else range(0)

    # ------------------------------------------------------------------ cell side

    def write_scale_events(
        self,
        topic: str,
        events: Sequence[SourcedScaleEvent],
        progress: Mapping[int, int],
        counts: Mapping[str, int] | None = None,
    ) -> ScaleWriteResult:
        """Upsert cell intervals, mark the buckets they change, advance the topic's progress, atomically.

        Within the batch, records of one id are folded in log order; a republished *open* row never
        replaces a *closed* one (in the batch, against the stored row, and again in the upsert's WHERE so
        a concurrent writer cannot break it). One transaction, in this order: (1) read the stored rows of
        the batch's ids; (2) upsert ``cell_intervals``; (3) mark every bucket covered by the old or the
        new span in ``parity_dirty``; (4) upsert ``partition_progress``; (5) bump counters; commit.
        A crash before the commit writes nothing and the records are redelivered (their Kafka offsets are
        committed only after this returns); applying a record again is a no-op.
        """
        now = self._clock()
        folded: dict[str, SourcedScaleEvent] = {}
        ignored = 0
        for se in sorted(events, key=lambda s: (s.partition, s.offset)):
            prev = folded.get(se.event.id)
            if prev is not None and se.event.open and not prev.event.open:
                ignored += 1
                continue
            folded[se.event.id] = se
        ci = cell_intervals.c
        dirty: set[int] = set()
        upserted = 0
        with self._w.begin() as conn:
            existing: dict[str, Any] = {}
            ids = sorted(folded)
            for i in range(0, len(ids), _CHUNK):
                for r in conn.execute(
                    select(ci.id, ci.org_id, ci.memory_mb, ci.started_ms, ci.ended_ms).where(
                        ci.id.in_(ids[i : i + _CHUNK])
                    )
                ):
                    existing[r.id] = r
            rows: list[dict[str, Any]] = []
            for sid in ids:
                se = folded[sid]
                ev = se.event
                old = existing.get(sid)
                if old is not None and old.ended_ms is not None and ev.open:
                    ignored += 1
                    continue
                same = old is not None and (old.org_id, old.memory_mb, old.started_ms, old.ended_ms) == (
                    ev.org_id,
                    ev.memory_mb,
                    ev.started_ms,
                    ev.ended_ms,
                )
                if not same:  # a repeat of the stored row changes nothing
                    dirty.update(self._covered(ev.started_ms, ev.ended_ms, now))
                    if old is not None:
                        dirty.update(self._covered(old.started_ms, old.ended_ms, now))
                rows.append(
                    {
                        "id": ev.id,
                        "sandbox_id": ev.sandbox_id,
                        "org_id": ev.org_id,
                        "cell_id": ev.cell_id,
                        "worker_id": ev.worker_id,
                        "memory_mb": ev.memory_mb,
                        "cpu_percent": ev.cpu_percent,
                        "disk_mb": ev.disk_mb,
                        "started_ms": ev.started_ms,
                        "ended_ms": ev.ended_ms,
                        "src_partition": se.partition,
                        "src_offset": se.offset,
                        "updated_ms": now,
                    }
                )
            if rows:
                stmt = self._insert(cell_intervals)
                ex = stmt.excluded
                upd = {k: getattr(ex, k) for k in rows[0] if k != "id"}
                stmt = stmt.on_conflict_do_update(
                    index_elements=["id"],
                    set_=upd,
                    where=~and_(ex.ended_ms.is_(None), ci.ended_ms.is_not(None)),
                )
                conn.execute(stmt, rows)
                upserted = len(rows)
            n_dirty = self._mark_dirty(conn, dirty)
            self._upsert_progress(conn, topic, {p: (off, None) for p, off in progress.items()})
            all_counts = dict(counts or {})
            all_counts["scale.upserted"] = all_counts.get("scale.upserted", 0) + upserted
            all_counts["scale.reopen_ignored"] = all_counts.get("scale.reopen_ignored", 0) + ignored
            self._bump_counters(conn, all_counts)
        return ScaleWriteResult(upserted=upserted, reopen_ignored=ignored, dirty_buckets=n_dirty)

    def record_progress(self, topic: str, progress: Mapping[int, int], counts: Mapping[str, int]) -> None:
        """Advance progress for a batch that wrote no interval (all rejected), with counters; one transaction."""
        with self._w.begin() as conn:
            self._upsert_progress(conn, topic, {p: (off, None) for p, off in progress.items()})
            self._bump_counters(conn, counts)

    def intervals(self, *, org: str | None = None, sandbox: str | None = None) -> list[dict[str, Any]]:
        q = select(cell_intervals).order_by(cell_intervals.c.sandbox_id, cell_intervals.c.started_ms)
        if org:
            q = q.where(cell_intervals.c.org_id == org)
        if sandbox:
            q = q.where(cell_intervals.c.sandbox_id == sandbox)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    # ------------------------------------------------------------------ computing

    @staticmethod
    def _histories(conn: Connection) -> tuple[dict[str, PolicyHistory], dict[str, tuple[tuple[int, str], ...]]]:
        found: dict[str, list[OrgPolicy]] = defaultdict(list)
        op = org_policies.c
        for r in conn.execute(select(op.org_id, op.effective_ms, op.plan, op.billing_mode, op.billing_provider)):
            found[r.org_id].append(policy_from_row(r))
        hists = {org: PolicyHistory(p) for org, p in found.items()}
        prints = {org: tuple(sorted((p.effective_at_ms, p.plan.value) for p in pols)) for org, pols in found.items()}
        return hists, prints

    def _edge_query(self, lo_s: int, hi_s: int, *, by_bucket: bool) -> Any:
        """The edge side per org (and bucket): rows ``org_id, [bucket_start,] n, mbs``.

        Per bucket it is one statement (so one snapshot, on PostgreSQL too): the kept sums in
        ``parity_edge`` plus the samples above ``edge_upto_seq`` (the few since the last advance, found
        through the ``seq`` primary key: ``bucket_start + 0`` keeps the planner off the bucket index,
        which would walk whole hours). An arbitrary window is one scan of its samples by bucket and time.
        Orgs that are not pro are dropped by the caller.
        """
        us = usage_samples.c
        mbs = func.sum(us.memory_mb * us.interval_s)
        if not by_bucket:
            return (
                select(us.org_id, func.count().label("n"), mbs.label("mbs"))
                .where(
                    us.bucket_start >= self._bucket(lo_s * 1000),
                    us.bucket_start < hi_s,
                    us.ts_ms >= lo_s * 1000,
                    us.ts_ms < hi_s * 1000,
                )
                .group_by(us.org_id)
            )
        pe = parity_edge.c
        ps = parity_state.c
        upto = select(func.coalesce(func.max(ps.value), 0)).where(ps.name == EDGE_UPTO).scalar_subquery()
        kept = select(pe.org_id, pe.bucket_start, pe.samples.label("n"), pe.edge_mb_s.label("mbs")).where(
            pe.bucket_start >= lo_s, pe.bucket_start < hi_s
        )
        tail = (
            select(us.org_id, us.bucket_start, func.count().label("n"), mbs.label("mbs"))
            .where(us.seq > upto, us.bucket_start + 0 >= lo_s, us.bucket_start + 0 < hi_s)
            .group_by(us.org_id, us.bucket_start)
        )
        both = union_all(kept, tail).subquery()
        return select(
            both.c.org_id, both.c.bucket_start, func.sum(both.c.n).label("n"), func.sum(both.c.mbs).label("mbs")
        ).group_by(both.c.org_id, both.c.bucket_start)

    def _settled_seq(self) -> int:
        """``max(seq)``, at or below which no sample can still appear: SQLite hands out ``seq`` in commit
        order (one writer); PostgreSQL reads it under a momentary ``LOCK TABLE usage_samples IN SHARE
        MODE``, which waits for in-flight ingest (the closer holds the same lock for its whole run)."""
        top = select(func.max(usage_samples.c.seq))
        if self._dialect != "postgresql":
            with self.engine.connect() as conn:
                return int(conn.execute(top).scalar_one_or_none() or 0)
        with self._w.begin() as conn:
            conn.execute(text("LOCK TABLE usage_samples IN SHARE MODE"))
            return int(conn.execute(top).scalar_one_or_none() or 0)

    def advance_edge(self) -> int:
        """Add the samples with ``seq`` in ``(edge_upto_seq, S]`` to ``parity_edge``; returns the new
        ``edge_upto_seq``. The sums are computed without the writer lock, so ingest is held up only for
        the few rows written at the end.

        In order: (1) ``S`` = :meth:`_settled_seq`, a ``seq`` at or below which no sample can still
        appear; (2) read ``edge_upto_seq`` and sum ``(edge_upto_seq, S]`` per (bucket, org) in a read
        transaction; (3) one write transaction: (PostgreSQL: an advisory lock) re-read ``edge_upto_seq``
        and stop if another refresher moved it meanwhile, upsert the sums adding to the kept ones, store
        ``edge_upto_seq = S``, commit. A crash before that commit leaves sums and cursor as they were (the
        next refresh adds the range); they commit together, so no sample is ever added twice or skipped.
        Samples are never updated or deleted, so a kept sum stays true.
        """
        us = usage_samples.c
        pe = parity_edge.c
        ps = parity_state.c
        upto_q = select(ps.value).where(ps.name == EDGE_UPTO)
        target = self._settled_seq()
        with self.engine.connect() as conn:
            upto = int(conn.execute(upto_q).scalar_one_or_none() or 0)
            if target <= upto:
                return upto
            sums = [
                {"bucket_start": int(r.bucket_start), "org_id": r.org_id, "samples": int(r.n), "edge_mb_s": int(r.mbs)}
                for r in conn.execute(
                    select(
                        us.bucket_start,
                        us.org_id,
                        func.count().label("n"),
                        func.sum(us.memory_mb * us.interval_s).label("mbs"),
                    )
                    .where(us.seq > upto, us.seq <= target)
                    .group_by(us.bucket_start, us.org_id)
                )
            ]
        with self._w.begin() as conn:
            if self._dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _ADVISORY_LOCK_PARITY_EDGE})
            now_upto = int(conn.execute(upto_q).scalar_one_or_none() or 0)
            if now_upto != upto:
                log.info("parity: edge sums moved to seq %d by another refresher; skipping this advance", now_upto)
                return now_upto
            if sums:
                stmt = self._insert(parity_edge)
                stmt = stmt.on_conflict_do_update(
                    index_elements=["bucket_start", "org_id"],
                    set_={
                        "samples": pe.samples + stmt.excluded.samples,
                        "edge_mb_s": pe.edge_mb_s + stmt.excluded.edge_mb_s,
                    },
                )
                conn.execute(stmt, sums)
            self._set_state(conn, {EDGE_UPTO: target})
        log.debug("parity: edge sums advanced from seq %d to %d (%d bucket-org sums)", upto, target, len(sums))
        return target

    def _measure(
        self,
        conn: Connection,
        spans: Sequence[tuple[int, int]],
        hists: Mapping[str, PolicyHistory],
        now_ms: int,
        slack_s: int,
        *,
        by_bucket: bool,
    ) -> dict[tuple[str, int], Measure]:
        """Both sides per (pro org, span start). ``by_bucket``: spans are ledger buckets (edge grouped by the
        stored ``bucket_start``); otherwise a single arbitrary window."""
        lo_s, hi_s = spans[0][0], spans[-1][1]
        pro: dict[str, set[int]] = {}
        for org, hist in hists.items():
            ok = {s for s, e in spans if _pro_during(hist, s * 1000, e * 1000)}
            if ok:
                pro[org] = ok
        if not pro:
            return {}
        orgs = sorted(pro)
        ci = cell_intervals.c
        slack_ms = slack_s * 1000
        out: dict[tuple[str, int], Measure] = {}
        for r in conn.execute(self._edge_query(lo_s, hi_s, by_bucket=by_bucket)):
            if r.org_id not in pro:
                continue
            start = int(r.bucket_start) if by_bucket else lo_s
            m = out.setdefault((r.org_id, start), Measure())
            m.samples += int(r.n)
            m.edge_mb_s += int(r.mbs or 0)
        for i in range(0, len(orgs), _CHUNK):
            chunk = orgs[i : i + _CHUNK]
            ivs = [
                Interval(r.org_id, r.sandbox_id, int(r.memory_mb), int(r.started_ms), r.ended_ms)
                for r in conn.execute(
                    select(ci.org_id, ci.sandbox_id, ci.memory_mb, ci.started_ms, ci.ended_ms).where(
                        ci.org_id.in_(chunk),
                        ci.started_ms < hi_s * 1000 + slack_ms,
                        or_(ci.ended_ms.is_(None), ci.ended_ms > lo_s * 1000 - slack_ms),
                    )
                )
            ]
            for key, cm in measure_intervals(ivs, spans, now_ms, slack_ms).items():
                m = out.setdefault(key, Measure())
                m.cell_mb_ms += cm.cell_mb_ms
                m.slack_mb_ms += cm.slack_mb_ms
        return {k: m for k, m in out.items() if k[1] in pro.get(k[0], ()) and not m.empty}

    def _rows_for(
        self, measures: Mapping[tuple[str, int], Measure], tolerance: Fraction, now_ms: int
    ) -> list[dict[str, Any]]:
        rows = []
        for (org, start), m in sorted(measures.items()):
            d, status = classify(m.edge_mb_ms, m.cell_mb_ms, m.slack_mb_ms, tolerance)
            rows.append(
                {
                    "org_id": org,
                    "bucket_start": start,
                    "edge_mb_s": m.edge_mb_s,
                    "samples": m.samples,
                    "cell_mb_ms": m.cell_mb_ms,
                    "slack_mb_ms": m.slack_mb_ms,
                    "drift": str(ratio_decimal(d)),
                    "status": status.value,
                    "updated_ms": now_ms,
                }
            )
        return rows

    def _recompute(
        self,
        buckets: Iterable[int],
        hists: Mapping[str, PolicyHistory],
        cfg: ParityConfig,
        now_ms: int,
        dirty_versions: Mapping[int, int],
    ) -> tuple[int, int]:
        """Rewrite the parity rows of ``buckets``, per run of consecutive buckets: (1) compute both sides in a
        read transaction (no write lock held while computing); then one write transaction: (2) delete the
        run's rows; (3) insert the new ones; (4) clear the run's ``parity_dirty`` marks as they were read
        before computing; commit. Data that lands between (1) and (2) is not lost: a cell change bumps its
        mark's version, so the mark survives (4); a new sample is unclaimed or claimed by a newer close run,
        so the next refresh finds its bucket. A crash leaves the old rows and the marks: the next refresh
        redoes it."""
        size = cfg.bucket_seconds
        n_rows = n_flagged = 0
        for run in _spans(buckets, size):
            spans = [(b, b + size) for b in run]
            with self.engine.connect() as conn:
                measures = self._measure(conn, spans, hists, now_ms, cfg.slack_seconds, by_bucket=True)
            rows = self._rows_for(measures, cfg.tolerance, now_ms)
            with self._w.begin() as conn:
                conn.execute(delete(usage_parity).where(usage_parity.c.bucket_start.in_(run)))
                if rows:
                    conn.execute(self._insert(usage_parity), rows)
                marks = [(b, dirty_versions[b]) for b in run if b in dirty_versions]
                if marks:
                    pd = parity_dirty.c
                    conn.execute(delete(parity_dirty).where(tuple_(pd.bucket_start, pd.version).in_(marks)))
            n_rows += len(rows)
            n_flagged += sum(1 for r in rows if r["status"] != ParityStatus.OK.value)
        return n_rows, n_flagged

    def recompute_range(self, from_s: int, to_s: int, cfg: ParityConfig) -> int:
        """Recompute every bucket overlapping ``[from_s, to_s)`` now (``edgebill parity --refresh``)."""
        size = cfg.bucket_seconds
        now = self._clock()
        self.advance_edge()
        with self.engine.connect() as conn:
            hists, _ = self._histories(conn)
        first = bucket_start_s(from_s, size)
        rows, _ = self._recompute(range(first, to_s, size), hists, cfg, now, {})
        return rows

    def window(self, from_s: int, to_s: int, cfg: ParityConfig) -> list[WindowOrg]:
        """Parity over an arbitrary window ``[from_s, to_s)``, live from the raw samples and intervals
        (the seed's endpoint semantics: raw samples, whatever their billing state)."""
        now = self._clock()
        with self.engine.connect() as conn:
            hists, _ = self._histories(conn)
            measures = self._measure(conn, [(from_s, to_s)], hists, now, cfg.slack_seconds, by_bucket=False)
        out = []
        for (org, _), m in sorted(measures.items()):
            d, status = classify(m.edge_mb_ms, m.cell_mb_ms, m.slack_mb_ms, cfg.tolerance)
            out.append(WindowOrg(org, m, ratio_decimal(d), status))
        return out

    # ------------------------------------------------------------------ the refresher

    def refresh(self, state: RefreshState, cfg: ParityConfig) -> RefreshResult:
        """One refresh: find the buckets to recompute (module doc), rewrite them, store the watermark,
        record newly due alerts. Alerts are returned for the caller to publish, then
        :meth:`mark_published`. Run by one process at a time (the leader); safe to run concurrently
        (every write is a whole-bucket rewrite of the same result)."""
        now = self._clock()
        size = cfg.bucket_seconds
        current = self._bucket(now)
        lookback_lo = current - (cfg.lookback_seconds // size) * size
        self.advance_edge()
        us = usage_samples.c
        with self.engine.connect() as conn:
            hists, prints = self._histories(conn)
            consistent = (
                conn.execute(
                    select(close_runs.c.upto_seq).order_by(close_runs.c.id.desc()).limit(1)
                ).scalar_one_or_none()
                or 0
            )
            buckets: set[int] = {current, current - size}
            if state.close_cursor is not None:
                buckets.update(
                    int(b)
                    for b in conn.execute(
                        select(us.bucket_start).where(us.seq > state.close_cursor).distinct()
                    ).scalars()
                )
            dirty = {int(r.bucket_start): int(r.version) for r in conn.execute(select(parity_dirty))}
            progress = self._progress(conn)
        buckets.update(dirty)
        if state.policies is None or state.close_cursor is None:
            buckets.update(range(lookback_lo, current + size, size))
        else:
            changed = [
                eff
                for org in set(prints) | set(state.policies)
                if prints.get(org) != state.policies.get(org)
                for eff, _ in set(prints.get(org, ())) ^ set(state.policies.get(org, ()))
            ]
            if changed:
                buckets.update(range(max(lookback_lo, self._bucket(min(changed))), current + size, size))
        n_rows, n_flagged = self._recompute(buckets, hists, cfg, now, dirty)
        state.policies = prints
        state.close_cursor = consistent
        wm = watermark(progress, cfg.required, now, cfg.stale_after_ms, event_time_topics=cfg.event_time_topics)
        result = RefreshResult(sorted(buckets), n_rows, n_flagged, wm)
        with self._w.begin() as conn:
            self._set_state(conn, {"refreshed_ms": now, **({"watermark_ms": wm} if wm is not None else {})})
        result.alerts = self._alerts(cfg, now, lookback_lo, wm)
        return result

    def _set_state(self, conn: Connection, values: Mapping[str, int]) -> None:
        stmt = self._insert(parity_state)
        conn.execute(
            stmt.on_conflict_do_update(index_elements=["name"], set_={"value": stmt.excluded.value}),
            [{"name": k, "value": v} for k, v in values.items()],
        )

    @staticmethod
    def _progress(conn: Connection) -> list[PartitionState]:
        return read_partition_states(conn)

    def _alerts(self, cfg: ParityConfig, now: int, lookback_lo: int, wm: int | None) -> list[PendingAlert]:
        """Record newly due alerts (dedup by key) and return every alert not yet published.

        (1) read the settled rows of the lookback window and the known alert ids; (2) evaluate the rule;
        (3) one write transaction, only when an episode is new: INSERT it ON CONFLICT DO NOTHING (so two
        refreshers racing record it once); commit; (4) read the unpublished alerts. The caller publishes
        them, then :meth:`mark_published`; a crash in between publishes an alert again (same key) later.
        """
        size = cfg.bucket_seconds
        last = last_closable_bucket(wm, size, cfg.grace_seconds) if wm is not None else None
        fresh: set[str] = set()
        if last is not None:
            with self.engine.connect() as conn:
                verdicts = self._verdicts(conn, lookback_lo - cfg.rule.consecutive * size, last, cfg.rule)
                known = set(conn.execute(select(parity_alerts.c.id)).scalars())
            due = [ep for ep in alert_episodes(verdicts, size, cfg.rule.consecutive) if ep.key not in known]
            if due:
                with self._w.begin() as conn:
                    for ep in due:
                        got = conn.execute(
                            self._insert(parity_alerts)
                            .values(
                                id=ep.key,
                                first_bucket=ep.first_bucket,
                                fired_bucket=ep.fired_at_bucket,
                                created_ms=now,
                                published_ms=None,
                                body=orjson.dumps(self._alert_body(ep, cfg.rule, now)).decode(),
                            )
                            .on_conflict_do_nothing(index_elements=["id"])
                            .returning(parity_alerts.c.id)
                        ).all()
                        if got:
                            fresh.add(ep.key)
        with self.engine.connect() as conn:
            pending = conn.execute(
                select(parity_alerts.c.id, parity_alerts.c.body)
                .where(parity_alerts.c.published_ms.is_(None))
                .order_by(parity_alerts.c.first_bucket)
            ).all()
        return [PendingAlert(r.id, orjson.loads(r.body), r.id in fresh) for r in pending]

    @staticmethod
    def _alert_body(ep: AlertEpisode, rule: AlertRule, now: int) -> dict[str, Any]:
        return {
            "type": "billing_drift",
            "id": ep.key,
            "severity": "warning",
            "first_bucket": ep.first_bucket,
            "fired_bucket": ep.fired_at_bucket,
            "buckets": [v.to_wire() for v in ep.verdicts],
            "rule": {
                "org_min_gb_seconds": str(rule.org_min_gb_seconds),
                "org_drift": str(rule.org_drift),
                "min_orgs": rule.min_orgs,
                "aggregate_min_gb_seconds": str(rule.aggregate_min_gb_seconds),
                "aggregate_drift": str(rule.aggregate_drift),
                "consecutive": rule.consecutive,
            },
            "created_ms": now,
        }

    def _verdicts(self, conn: Connection, lo: int, last: int, rule: AlertRule) -> list[BucketVerdict]:
        up = usage_parity.c
        by_bucket: dict[int, list[tuple[str, int, int]]] = defaultdict(list)
        for r in conn.execute(
            select(up.org_id, up.bucket_start, up.edge_mb_s, up.cell_mb_ms).where(
                up.bucket_start >= lo, up.bucket_start <= last
            )
        ):
            by_bucket[int(r.bucket_start)].append((r.org_id, int(r.edge_mb_s) * 1000, int(r.cell_mb_ms)))
        return [bucket_verdict(b, rows, rule) for b, rows in sorted(by_bucket.items())]

    def mark_published(self, ids: Sequence[str]) -> None:
        """Record that these alerts are on the alerts topic (one transaction)."""
        if not ids:
            return
        now = self._clock()
        with self._w.begin() as conn:
            conn.execute(
                parity_alerts.update()
                .where(parity_alerts.c.id.in_(list(ids)), parity_alerts.c.published_ms.is_(None))
                .values(published_ms=now)
            )

    # ------------------------------------------------------------------ reading

    def rows(self, from_s: int, to_s: int, *, org: str | None = None, flagged_only: bool = False) -> list[ParityRow]:
        """Parity rows of buckets starting in ``[from_s, to_s)``, by bucket then org."""
        up = usage_parity.c
        q = (
            select(usage_parity)
            .where(up.bucket_start >= from_s, up.bucket_start < to_s)
            .order_by(up.bucket_start, up.org_id)
        )
        if org:
            q = q.where(up.org_id == org)
        if flagged_only:
            q = q.where(up.status != ParityStatus.OK.value)
        with self.engine.connect() as conn:
            return [self._row(r) for r in conn.execute(q)]

    @staticmethod
    def _row(r: Any) -> ParityRow:
        return ParityRow(
            org_id=r.org_id,
            bucket_start=int(r.bucket_start),
            edge_mb_s=int(r.edge_mb_s),
            samples=int(r.samples),
            cell_mb_ms=int(r.cell_mb_ms),
            slack_mb_ms=int(r.slack_mb_ms),
            drift=Decimal(r.drift),
            status=ParityStatus(r.status),
            updated_ms=int(r.updated_ms),
        )

    def state(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {r.name: int(r.value) for r in conn.execute(select(parity_state))}

    def alerts(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [
                {**dict(r._mapping), "body": orjson.loads(r.body)}
                for r in conn.execute(select(parity_alerts).order_by(parity_alerts.c.first_bucket))
            ]

    def gate(self, grace_seconds: int, *, watermark_ms: int | None = None) -> GateStatus:
        """Consecutive clean settled buckets (see :func:`models.parity.clean_streak`). Settled = end + grace
        at or before the refresher's stored watermark (or ``watermark_ms``)."""
        size = self.bucket_seconds
        up = usage_parity.c
        with self.engine.connect() as conn:
            wm = watermark_ms
            if wm is None:
                wm = conn.execute(
                    select(parity_state.c.value).where(parity_state.c.name == "watermark_ms")
                ).scalar_one_or_none()
            last = last_closable_bucket(int(wm), size, grace_seconds) if wm is not None else None
            first = conn.execute(select(func.min(up.bucket_start))).scalar_one_or_none()
            flagged = None
            if last is not None:
                flagged = conn.execute(
                    select(func.max(up.bucket_start)).where(up.status != ParityStatus.OK.value, up.bucket_start <= last)
                ).scalar_one_or_none()
        streak = clean_streak(
            [] if flagged is None else [int(flagged)], None if first is None else int(first), last, size
        )
        return GateStatus(
            clean_buckets=streak,
            last_settled=last,
            last_flagged=None if flagged is None else int(flagged),
            first_bucket=None if first is None else int(first),
            bucket_seconds=size,
        )

    def metrics(self, grace_seconds: int) -> MetricsSnapshot:
        """Everything ``/metrics`` exports that lives in the database, read in one go."""
        me = meter_events.c
        up = usage_parity.c
        with self.engine.connect() as conn:
            ctr = {r.name: int(r.value) for r in conn.execute(select(counters))}
            states = {
                r.state: int(r.n) for r in conn.execute(select(me.state, func.count().label("n")).group_by(me.state))
            }
            closed = int(conn.execute(select(func.count()).select_from(closed_buckets)).scalar_one())
            progress = self._progress(conn)
            st = {r.name: int(r.value) for r in conn.execute(select(parity_state))}
        gate = self.gate(grace_seconds, watermark_ms=st.get("watermark_ms"))
        rows: list[ParityRow] = []
        bucket = None
        if gate.last_settled is not None:
            with self.engine.connect() as conn:
                bucket = conn.execute(
                    select(func.max(up.bucket_start)).where(up.bucket_start <= gate.last_settled)
                ).scalar_one_or_none()
            if bucket is not None:
                rows = self.rows(int(bucket), int(bucket) + 1)
        return MetricsSnapshot(
            counters=ctr,
            rows_by_state=states,
            buckets_closed=closed,
            progress=progress,
            parity_bucket=None if bucket is None else int(bucket),
            parity_rows=rows,
            gate=gate,
            refreshed_ms=st.get("refreshed_ms"),
        )
