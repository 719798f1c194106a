"""The ledger's read models: meter rows, counters, stored ticks, unbilled usage and policies as reports and
commands see them, and the reads a replay compares against. Nothing here writes."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from decimal import Decimal
from typing import Any

from sqlalchemy import Connection, func, inspect, select

from models.billing import RowState
from models.policy import OrgPolicy
from models.ticks import Tick
from models.zombie import Interval
from sinks.ledger.batches import StoredBatch, decode_ids, decode_rows, usage_by_org
from sinks.ledger.closer import close_position, not_aggregated
from sinks.ledger.store import SqlStore, policy_from_row, read_dedup_horizon
from sinks.schema import cell_intervals, counters, meter_events, org_policies, tick_batches, unbilled_usage

__all__ = ["LedgerQueries"]


class LedgerQueries(SqlStore):
    """The read side of the :class:`sinks.ledger.Ledger`."""

    def counters(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {r.name: r.value for r in conn.execute(select(counters))}

    def rows(
        self, *, org: str | None = None, state: str | None = None, bucket: int | None = None
    ) -> list[dict[str, Any]]:
        q = select(meter_events).order_by(meter_events.c.org_id, meter_events.c.bucket_start, meter_events.c.id)
        if org:
            q = q.where(meter_events.c.org_id == org)
        if state:
            q = q.where(meter_events.c.state == state)
        if bucket is not None:
            q = q.where(meter_events.c.bucket_start == bucket)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def state_counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {
                r.state: r.n
                for r in conn.execute(
                    select(meter_events.c.state, func.count().label("n")).group_by(meter_events.c.state)
                )
            }

    def open_samples(self) -> int:
        """Ticks not aggregated into meter rows yet (open buckets, and late ticks of closed ones)."""
        tb = tick_batches.c
        n = func.coalesce(func.sum(tb.ticks), 0)
        with self.engine.connect() as conn:
            done_seq, done_bucket = close_position(conn)
            fresh = conn.execute(select(n).where(tb.seq > done_seq)).scalar_one()
            older = select(n).where(tb.seq <= done_seq, not_aggregated())
            if done_bucket is not None:
                older = older.where(tb.bucket_start > done_bucket)
            return int(fresh) + int(conn.execute(older).scalar_one())

    def stored_ticks(self) -> int:
        """Every tick the ledger holds (retention drops those of retired buckets)."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.coalesce(func.sum(tick_batches.c.ticks), 0))).scalar_one())

    def sample_totals(self) -> dict[str, tuple[int, int]]:
        """org -> (ticks, MB-s) over every tick the ledger holds (retention drops those of retired buckets)."""
        out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        q = select(tick_batches.c.data)
        with self.engine.connect() as conn:
            for (data,) in conn.execute(q.execution_options(yield_per=256)):
                for org, (n, mbs) in usage_by_org(data).items():
                    o = out[org]
                    o[0] += n
                    o[1] += mbs
        return {k: (v[0], v[1]) for k, v in out.items()}

    def unbilled(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [
                dict(r._mapping)
                for r in conn.execute(
                    select(unbilled_usage).order_by(unbilled_usage.c.org_id, unbilled_usage.c.bucket_start)
                )
            ]

    def policies(self, org: str | None = None) -> list[dict[str, Any]]:
        q = select(org_policies).order_by(org_policies.c.org_id, org_policies.c.effective_ms)
        if org:
            q = q.where(org_policies.c.org_id == org)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    # ------------------------------------------------------------------ what a replay compares against

    def has_schema(self) -> bool:
        """Whether the ledger's tables exist, checked without migrating (a read-only caller must not take
        the write lock that migrating takes)."""
        return bool(inspect(self.engine).has_table(tick_batches.name))

    def dedup_horizon(self) -> int:
        """The dedup horizon (unix s; 0 = none): retention dropped the samples of buckets before it, and ingest
        refuses every tick before it (:mod:`models.retention`). A replay compares ticks from it on."""
        with self.engine.connect() as conn:
            return read_dedup_horizon(conn)

    def stored_bucket_seconds(self) -> int | None:
        """The bucket size the ledger was started with (:meth:`check_bucket_seconds`); None before that."""
        with self.engine.connect() as conn:
            got = conn.execute(
                select(counters.c.value).where(counters.c.name == "config.bucket_seconds")
            ).scalar_one_or_none()
        return None if got is None else int(got)

    def policies_by_org(self) -> dict[str, list[OrgPolicy]]:
        """Every policy record, per org, converted exactly as the closer converts them (:func:`policy_from_row`)."""
        found: dict[str, list[OrgPolicy]] = defaultdict(list)
        with self.engine.connect() as conn:
            for r in conn.execute(select(org_policies)):
                found[r.org_id].append(policy_from_row(r))
        return dict(found)

    def ownership_intervals(self, started_by_ms: int | None = None) -> list[Interval]:
        """The cell side's ownership intervals ``(sandbox, worker, started_ms, ended_ms or None)`` that the
        zombie rule reads; only those starting at or before ``started_by_ms`` when given."""
        ci = cell_intervals.c
        q = select(ci.sandbox_id, ci.worker_id, ci.started_ms, ci.ended_ms)
        if started_by_ms is not None:
            q = q.where(ci.started_ms <= started_by_ms)
        with self.engine.connect() as conn:
            return [(r[0], r[1], int(r[2]), None if r[3] is None else int(r[3])) for r in conn.execute(q)]

    def scoped_ticks(
        self,
        first_bucket: int,
        last_bucket: int,
        lo_ms: int | None = None,
        hi_ms: int | None = None,
        orgs: Sequence[str] | None = None,
    ) -> Iterator[tuple[Tick, int, int]]:
        """``(tick, partition, offset)`` of every stored tick in buckets ``[first_bucket, last_bucket]`` with
        ``lo_ms <= ts < hi_ms`` (of ``orgs`` only, when given), batch by batch."""
        wanted = set(orgs) if orgs else None
        lo = -(2**63) if lo_ms is None else lo_ms
        hi = 2**63 if hi_ms is None else hi_ms
        with self.engine.connect() as conn:
            for batch in _batches(conn, first_bucket, last_bucket):
                for t, p, o in zip(batch.ticks, batch.partitions, batch.offsets, strict=True):
                    if lo <= t.ts_ms < hi and (wanted is None or t.org_id in wanted):
                        yield t, p, o

    def sample_ids(
        self,
        first_bucket: int,
        last_bucket: int,
        lo_ms: int | None = None,
        hi_ms: int | None = None,
        orgs: Sequence[str] | None = None,
    ) -> set[str]:
        """Ids of the stored ticks in that scope (see :meth:`scoped_ticks`). Without a time or org filter only
        the batches' id sections are decoded (a fraction of the cost of whole ticks)."""
        if lo_ms is not None or hi_ms is not None or orgs:
            return {t.id for t, _, _ in self.scoped_ticks(first_bucket, last_bucket, lo_ms, hi_ms, orgs)}
        tb = tick_batches.c
        q = select(tb.data).where(tb.bucket_start >= first_bucket, tb.bucket_start <= last_bucket)
        out: set[str] = set()
        with self.engine.connect() as conn:
            for (data,) in conn.execute(q.execution_options(yield_per=256)):
                out.update(decode_ids(data))
        return out

    def sample_sources(
        self,
        first_bucket: int,
        last_bucket: int,
        lo_ms: int | None = None,
        hi_ms: int | None = None,
        orgs: Sequence[str] | None = None,
    ) -> list[tuple[str, int, int]]:
        """``(id, partition, offset)`` each stored tick of that scope (see :meth:`scoped_ticks`) was read from."""
        return [(t.id, p, o) for t, p, o in self.scoped_ticks(first_bucket, last_bucket, lo_ms, hi_ms, orgs)]

    def billed_by_key(
        self, first_bucket: int, last_bucket: int, orgs: Sequence[str] | None = None
    ) -> dict[tuple[str, int, str], tuple[int, Decimal]]:
        """Per (org, bucket, meter) of buckets ``[first_bucket, last_bucket]``: the exact units and the sum
        of the values of its meter rows, over every revision and state but ``cancelled`` (a row cancelled at
        Stripe no longer counts anywhere). A row a reconciliation repair wrote to bill a lost row again
        (``repair_of``) is not counted either: the lost row already counts that decision."""
        me = meter_events.c
        out: dict[tuple[str, int, str], tuple[int, Decimal]] = {}
        q = select(me.org_id, me.bucket_start, me.meter, me.units, me.value).where(
            me.bucket_start >= first_bucket,
            me.bucket_start <= last_bucket,
            me.state != RowState.CANCELLED.value,
            me.repair_of.is_(None),
        )
        if orgs:
            q = q.where(me.org_id.in_(list(orgs)))
        with self.engine.connect() as conn:
            for r in conn.execute(q):
                k = (r[0], int(r[1]), r[2])
                units, value = out.get(k, (0, Decimal(0)))
                out[k] = (units + int(r[3]), value + Decimal(r[4]))
        return out

    def open_ticks(self, first_bucket: int, last_bucket: int, orgs: Sequence[str] | None = None) -> list[Tick]:
        """The ticks of buckets ``[first_bucket, last_bucket]`` (of ``orgs`` when given) not aggregated into
        meter rows yet."""
        wanted = set(orgs) if orgs else None
        with self.engine.connect() as conn:
            return [
                t
                for batch in _batches(conn, first_bucket, last_bucket, open_only=True)
                for t in batch.ticks
                if wanted is None or t.org_id in wanted
            ]


def _batches(
    conn: Connection, first_bucket: int | None = None, last_bucket: int | None = None, *, open_only: bool = False
) -> Iterator[StoredBatch]:
    """The stored batches of buckets ``[first_bucket, last_bucket]`` (all when not given), decoded, in
    bucket and seq order; ``open_only``: only those not aggregated yet."""
    tb = tick_batches.c
    q = select(tb.seq, tb.bucket_start, tb.data).order_by(tb.bucket_start, tb.seq)
    if first_bucket is not None:
        q = q.where(tb.bucket_start >= first_bucket)
    if last_bucket is not None:
        q = q.where(tb.bucket_start <= last_bucket)
    if open_only:
        q = q.where(not_aggregated())
    yield from decode_rows(conn.execute(q.execution_options(yield_per=256)))
