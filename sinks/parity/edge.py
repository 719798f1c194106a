"""The edge side: the sums of stored ticks per bucket and org, kept incrementally in ``parity_edge`` (each
tick batch added exactly once), and the edge read that adds the few batches above the kept cursor."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterator
from typing import Final

from sqlalchemy import Connection, func, literal, null, select, text, union_all

from sinks.ledger.batches import decode_rows, usage_by_org
from sinks.parity.base import ParityBase
from sinks.schema import parity_edge, parity_state, tick_batches

__all__ = ["EDGE_UPTO", "EdgeSide"]

log = logging.getLogger(__name__)

EDGE_UPTO: Final = "edge_upto_seq"  # parity_state: samples up to this seq are summed in parity_edge
_ADVISORY_LOCK_PARITY_EDGE: Final = 0x6564676570617269  # "edgepari": one edge advance at a time (PostgreSQL)


class EdgeSide(ParityBase):
    """The edge side's kept sums and its query."""

    def _edge_sums(
        self, conn: Connection, lo_s: int, hi_s: int, *, by_bucket: bool
    ) -> Iterator[tuple[str, int, int, int]]:
        """The edge side per org (and bucket): ``(org_id, bucket_start or lo_s, ticks, MB-s)``.

        Per bucket it is one statement (so one snapshot, on PostgreSQL too): the kept sums in
        ``parity_edge`` beside the batches above ``edge_upto_seq`` (the few since the last advance, found
        through the ``seq`` primary key: ``bucket_start + 0`` keeps the planner off the bucket index,
        which would walk whole hours), which are decoded and added here. An arbitrary window is one scan
        of its buckets' batches, ticks filtered by time. Orgs that are not pro are dropped by the caller.
        """
        tb = tick_batches.c
        if not by_bucket:
            q = select(tb.seq, tb.bucket_start, tb.data).where(
                tb.bucket_start >= self._bucket(lo_s * 1000), tb.bucket_start < hi_s
            )
            lo_ms, hi_ms = lo_s * 1000, hi_s * 1000
            window: dict[str, list[int]] = defaultdict(lambda: [0, 0])
            for batch in decode_rows(conn.execute(q)):
                for t in batch.ticks:
                    if lo_ms <= t.ts_ms < hi_ms:
                        w = window[t.org_id]
                        w[0] += 1
                        w[1] += t.memory_mb * t.interval_s
            for org, (n, mbs) in window.items():
                yield org, lo_s, n, mbs
            return
        pe = parity_edge.c
        ps = parity_state.c
        upto = select(func.coalesce(func.max(ps.value), 0)).where(ps.name == EDGE_UPTO).scalar_subquery()
        kept = select(
            pe.org_id, pe.bucket_start, pe.samples.label("n"), pe.edge_mb_s.label("mbs"), null().label("data")
        ).where(pe.bucket_start >= lo_s, pe.bucket_start < hi_s)
        tail = select(
            literal("").label("org_id"), tb.bucket_start, literal(0).label("n"), literal(0).label("mbs"), tb.data
        ).where(tb.seq > upto, tb.bucket_start + 0 >= lo_s, tb.bucket_start + 0 < hi_s)
        sums: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
        for org, b, n, mbs, data in conn.execute(union_all(kept, tail)):
            if data is None:
                slot = sums[(org, int(b))]
                slot[0] += int(n)
                slot[1] += int(mbs or 0)
            else:
                for org, (n, mbs) in usage_by_org(data).items():
                    slot = sums[(org, int(b))]
                    slot[0] += n
                    slot[1] += mbs
        for (org, b), (n, mbs) in sums.items():
            yield org, b, n, mbs

    def _settled_seq(self) -> int:
        """``max(seq)``, at or below which no batch can still appear: SQLite hands out ``seq`` in commit
        order (one writer); PostgreSQL reads it under a momentary ``LOCK TABLE tick_batches IN SHARE
        MODE``, which waits for in-flight ingest (the closer holds the same lock for its whole run)."""
        top = select(func.max(tick_batches.c.seq))
        if self._dialect != "postgresql":
            with self.engine.connect() as conn:
                return int(conn.execute(top).scalar_one_or_none() or 0)
        with self._w.begin() as conn:
            conn.execute(text("LOCK TABLE tick_batches IN SHARE MODE"))
            return int(conn.execute(top).scalar_one_or_none() or 0)

    def advance_edge(self) -> int:
        """Add the batches with ``seq`` in ``(edge_upto_seq, S]`` to ``parity_edge``; returns the new
        ``edge_upto_seq``. The sums are computed without the writer lock, so ingest is held up only for
        the few rows written at the end.

        In order: (1) ``S`` = :meth:`_settled_seq`, a ``seq`` at or below which no batch can still
        appear; (2) read ``edge_upto_seq`` and sum ``(edge_upto_seq, S]`` per (bucket, org) in a read
        transaction; (3) one write transaction: (PostgreSQL: an advisory lock) re-read ``edge_upto_seq``
        and stop if another refresher moved it meanwhile, upsert the sums adding to the kept ones, store
        ``edge_upto_seq = S``, commit. A crash before that commit leaves sums and cursor as they were (the
        next refresh adds the range); they commit together, so no batch is ever added twice or skipped.
        Batches are never updated (retention deletes only batches already added), so a kept sum stays true.
        """
        pe = parity_edge.c
        ps = parity_state.c
        upto_q = select(ps.value).where(ps.name == EDGE_UPTO)
        target = self._settled_seq()
        with self.engine.connect() as conn:
            upto = int(conn.execute(upto_q).scalar_one_or_none() or 0)
            if target <= upto:
                return upto
            acc: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
            tb = tick_batches.c
            q = select(tb.bucket_start, tb.data).where(tb.seq > upto, tb.seq <= target)
            for b, data in conn.execute(q.execution_options(yield_per=256)):
                for org, (n, mbs) in usage_by_org(data).items():
                    slot = acc[(org, int(b))]
                    slot[0] += n
                    slot[1] += mbs
            sums = [
                {"bucket_start": b, "org_id": org, "samples": n, "edge_mb_s": mbs}
                for (org, b), (n, mbs) in sorted(acc.items(), key=lambda kv: (kv[0][1], kv[0][0]))
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
