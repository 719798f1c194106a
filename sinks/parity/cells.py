"""The cell side: intervals upserted from ``sandbox-scale-events``, and the buckets each change marks for
recomputing (``parity_dirty``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, select

from models.parity import ScaleEvent
from models.stripe_window import PARITY_MARGIN_SECONDS, oldest_accepted_ms
from sinks.parity.base import CHUNK, ParityBase
from sinks.schema import cell_intervals, parity_dirty

__all__ = ["CellSide", "ScaleWriteResult", "SourcedScaleEvent"]


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


class CellSide(ParityBase):
    """Writes of the cell side and the reads of its intervals."""

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
            for i in range(0, len(ids), CHUNK):
                for r in conn.execute(
                    select(ci.id, ci.org_id, ci.memory_mb, ci.started_ms, ci.ended_ms).where(
                        ci.id.in_(ids[i : i + CHUNK])
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
