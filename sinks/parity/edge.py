"""The edge side: the sums of usage samples per bucket and org, kept incrementally in ``parity_edge`` (each
sample added exactly once), and the edge query that adds the few samples above the kept cursor."""

from __future__ import annotations

import logging
from typing import Any, Final

from sqlalchemy import func, select, text, union_all

from sinks.parity.base import ParityBase
from sinks.schema import parity_edge, parity_state, usage_samples

__all__ = ["EDGE_UPTO", "EdgeSide"]

log = logging.getLogger(__name__)

EDGE_UPTO: Final = "edge_upto_seq"  # parity_state: samples up to this seq are summed in parity_edge
_ADVISORY_LOCK_PARITY_EDGE: Final = 0x6564676570617269  # "edgepari": one edge advance at a time (PostgreSQL)


class EdgeSide(ParityBase):
    """The edge side's kept sums and its query."""

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
