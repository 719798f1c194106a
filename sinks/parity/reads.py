"""The read models: parity rows, the live window over raw samples, the refresher's state, the alerts, the
cutover gate, and the snapshot ``/metrics`` exports."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

import orjson
from sqlalchemy import Connection, Table, func, select

from models.parity import GbSeconds, Measure, ParityStatus, clean_streak
from models.watermark import PartitionState, last_closable_bucket
from sinks.parity.base import ParityConfig
from sinks.parity.measure import Measuring
from sinks.schema import closed_buckets, counters, meter_events, parity_alerts, parity_state, usage_parity

__all__ = ["GateStatus", "MetricsSnapshot", "ParityReads", "ParityRow", "WindowOrg"]


def _int(v: Any) -> int | None:
    return None if v is None else int(v)


def _named(conn: Connection, table: Table) -> dict[str, int]:
    """A table of named integers (``counters``, ``parity_state``) as a dict."""
    return {r.name: int(r.value) for r in conn.execute(select(table))}


@dataclass(frozen=True, slots=True)
class ParityRow(GbSeconds):
    """One row of the parity table (its fields are the table's columns, in order)."""

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
    def flagged(self) -> bool:
        return self.status is not ParityStatus.OK

    @classmethod
    def of(cls, org_id: str, bucket_start: int, m: Measure, tolerance: Fraction | Decimal, now_ms: int) -> ParityRow:
        """The row of one measured (org, bucket), judged against ``tolerance``."""
        drift, status = m.judge(tolerance)
        return cls(org_id, bucket_start, m.edge_mb_s, m.samples, m.cell_mb_ms, m.slack_mb_ms, drift, status, now_ms)

    @classmethod
    def read(cls, r: Any) -> ParityRow:
        """The row as ``select(usage_parity)`` returns it."""
        return cls(**{**r._mapping, "drift": Decimal(r.drift), "status": ParityStatus(r.status)})

    def values(self) -> dict[str, Any]:
        """The row as ``usage_parity`` stores it."""
        own = {f: getattr(self, f) for f in self.__dataclass_fields__}
        return own | {"drift": str(self.drift), "status": self.status.value}


@dataclass(frozen=True, slots=True)
class WindowOrg:
    """One org over an arbitrary window (the ``/internal/usage-parity`` answer)."""

    org_id: str
    measure: Measure
    drift: Decimal
    status: ParityStatus


@dataclass(frozen=True, slots=True)
class GateStatus:
    """The cutover gate: clean settled buckets with usage on both sides since the last flagged one."""

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


class ParityReads(Measuring):
    """Everything read from the parity tables (and the window computed live)."""

    def window(self, from_s: int, to_s: int, cfg: ParityConfig) -> list[WindowOrg]:
        """Parity over an arbitrary window ``[from_s, to_s)``, live from the raw samples and intervals
        (the endpoint's semantics: raw samples, whatever their billing state)."""
        now = self._clock()
        with self.engine.connect() as conn:
            hists, _ = self._histories(conn)
            measures = self._measure(conn, [(from_s, to_s)], hists, now, cfg.slack_seconds, by_bucket=False)
        return [WindowOrg(org, m, *m.judge(cfg.tolerance)) for (org, _), m in sorted(measures.items())]

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
            return [ParityRow.read(r) for r in conn.execute(q)]

    def state(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return _named(conn, parity_state)

    def alerts(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [
                {**dict(r._mapping), "body": orjson.loads(r.body)}
                for r in conn.execute(select(parity_alerts).order_by(parity_alerts.c.first_bucket))
            ]

    def gate(self, grace_seconds: int, *, watermark_ms: int | None = None) -> GateStatus:
        """Clean settled buckets holding usage on both sides, back to the newest flagged one (see
        :func:`models.parity.clean_streak`). Settled = end + grace at or before the refresher's stored
        watermark (or ``watermark_ms``)."""
        size = self.bucket_seconds
        up = usage_parity.c
        with self.engine.connect() as conn:
            wm = _named(conn, parity_state).get("watermark_ms") if watermark_ms is None else watermark_ms
            last = last_closable_bucket(wm, size, grace_seconds) if wm is not None else None
            first = _int(conn.execute(select(func.min(up.bucket_start))).scalar_one_or_none())
            flagged = None
            evidence: list[int] = []
            if last is not None:
                flagged = _int(
                    conn.execute(
                        select(func.max(up.bucket_start)).where(
                            up.status != ParityStatus.OK.value, up.bucket_start <= last
                        )
                    ).scalar_one_or_none()
                )
                # Evidence, not silence: a bucket counts only when some org had usage on both sides in it.
                lower = first if flagged is None else flagged + size
                if lower is not None:
                    both = (up.bucket_start >= lower, up.bucket_start <= last, up.edge_mb_s > 0, up.cell_mb_ms > 0)
                    evidence = [int(b) for b in conn.execute(select(up.bucket_start).where(*both).distinct()).scalars()]
        streak = clean_streak([] if flagged is None else [flagged], first, last, size, evidence=evidence)
        return GateStatus(streak, last, flagged, first, size)

    def metrics(self, grace_seconds: int) -> MetricsSnapshot:
        """Everything ``/metrics`` exports that lives in the database, read in one go."""
        me = meter_events.c
        up = usage_parity.c
        with self.engine.connect() as conn:
            ctr = _named(conn, counters)
            states = {
                r.state: int(r.n) for r in conn.execute(select(me.state, func.count().label("n")).group_by(me.state))
            }
            closed = int(conn.execute(select(func.count()).select_from(closed_buckets)).scalar_one())
            progress = self._progress(conn)
            st = _named(conn, parity_state)
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
