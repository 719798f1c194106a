"""The ledger's read models: meter rows, counters, samples, unbilled usage and policies as reports and
commands see them, and the reads a replay compares against. Nothing here writes."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from sqlalchemy import func, inspect, select

from models.billing import RowState
from models.policy import OrgPolicy
from models.ticks import Tick
from models.zombie import Interval
from sinks.ledger.closer import close_position, not_aggregated
from sinks.ledger.store import SqlStore, policy_from_row, read_dedup_horizon
from sinks.schema import cell_intervals, counters, meter_events, org_policies, unbilled_usage, usage_samples

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
        """Samples not aggregated into meter rows yet (open buckets, and late samples of closed ones)."""
        us = usage_samples.c
        with self.engine.connect() as conn:
            done_seq, done_bucket = close_position(conn)
            fresh = conn.execute(select(func.count()).select_from(usage_samples).where(us.seq > done_seq)).scalar_one()
            older = select(func.count()).select_from(usage_samples).where(us.seq <= done_seq)
            if done_bucket is not None:
                older = older.where(us.bucket_start > done_bucket)
            return int(fresh) + int(conn.execute(older).scalar_one())

    def sample_totals(self) -> dict[str, tuple[int, int]]:
        """org -> (samples, MB-s) over every sample the ledger holds (retention drops those of retired buckets)."""
        us = usage_samples.c
        with self.engine.connect() as conn:
            return {
                r.org_id: (int(r.n), int(r.mbs or 0))
                for r in conn.execute(
                    select(
                        us.org_id,
                        func.count().label("n"),
                        func.sum(us.memory_mb * us.interval_s).label("mbs"),
                    ).group_by(us.org_id)
                )
            }

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
        return bool(inspect(self.engine).has_table(usage_samples.name))

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

    @staticmethod
    def _sample_scope(
        first_bucket: int, last_bucket: int, lo_ms: int | None, hi_ms: int | None, orgs: Sequence[str] | None = None
    ) -> list[Any]:
        us = usage_samples.c
        conds = [us.bucket_start >= first_bucket, us.bucket_start <= last_bucket]
        if lo_ms is not None:
            conds.append(us.ts_ms >= lo_ms)
        if hi_ms is not None:
            conds.append(us.ts_ms < hi_ms)
        if orgs:
            conds.append(us.org_id.in_(list(orgs)))
        return conds

    def sample_ids(
        self,
        first_bucket: int,
        last_bucket: int,
        lo_ms: int | None = None,
        hi_ms: int | None = None,
        orgs: Sequence[str] | None = None,
    ) -> set[str]:
        """Ids of the samples in buckets ``[first_bucket, last_bucket]`` with ``lo_ms <= ts < hi_ms`` (of
        ``orgs`` only, when given).

        The ids come back as one separator-joined string (an order of magnitude faster than a row per id);
        should an id contain the separator, the count tells and the rows are read instead.
        """
        us = usage_samples.c
        conds = self._sample_scope(first_bucket, last_bucket, lo_ms, hi_ms, orgs)
        with self.engine.connect() as conn:
            if self._dialect == "sqlite":
                sep, agg = "\x00", func.group_concat(us.id, func.char(0))
            else:  # PostgreSQL text cannot hold NUL
                sep, agg = "\x01", func.string_agg(us.id, func.chr(1))
            n, joined = conn.execute(select(func.count(), agg).where(*conds)).one()
            ids = set(joined.split(sep)) if joined else set()
            if len(ids) != n:
                ids = set(conn.execute(select(us.id).where(*conds)).scalars())
            return ids

    def sample_sources(
        self,
        first_bucket: int,
        last_bucket: int,
        lo_ms: int | None = None,
        hi_ms: int | None = None,
        orgs: Sequence[str] | None = None,
    ) -> list[tuple[str, int, int]]:
        """``(id, partition, offset)`` each sample of that scope (see :meth:`sample_ids`) was ingested from."""
        us = usage_samples.c
        conds = self._sample_scope(first_bucket, last_bucket, lo_ms, hi_ms, orgs)
        with self.engine.connect() as conn:
            return [
                (r[0], int(r[1]), int(r[2]))
                for r in conn.execute(select(us.id, us.src_partition, us.src_offset).where(*conds))
            ]

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
        """The samples of buckets ``[first_bucket, last_bucket]`` (of ``orgs`` when given) not aggregated into
        meter rows yet, as ticks."""
        us = usage_samples.c
        q = select(
            us.id,
            us.org_id,
            us.sandbox_id,
            us.worker_id,
            us.cell_id,
            us.memory_mb,
            us.cpu_count,
            us.interval_s,
            us.ts_ms,
        ).where(not_aggregated(), us.bucket_start >= first_bucket, us.bucket_start <= last_bucket)
        if orgs:
            q = q.where(us.org_id.in_(list(orgs)))
        with self.engine.connect() as conn:
            return [
                Tick(r[0], r[1], r[2], r[3], r[4], int(r[5]), int(r[6]), int(r[7]), int(r[8])) for r in conn.execute(q)
            ]
