"""Both sides of the parity table for a set of spans (ledger buckets or one arbitrary window): the edge
side from :mod:`sinks.parity.edge`, the cell side from the intervals, for the orgs on the pro plan."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from sqlalchemy import Connection, or_, select

from models.billing import Plan
from models.parity import Interval, Measure, measure_intervals
from models.policy import PolicyHistory
from sinks.parity.base import CHUNK
from sinks.parity.edge import EdgeSide
from sinks.schema import cell_intervals

__all__ = ["Measuring"]


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


class Measuring(EdgeSide):
    """Measures both sides per (pro org, span)."""

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
        for org, start, n, mbs in self._edge_sums(conn, lo_s, hi_s, by_bucket=by_bucket):
            if org not in pro:
                continue
            m = out.setdefault((org, start), Measure())
            m.samples += n
            m.edge_mb_s += mbs
        for i in range(0, len(orgs), CHUNK):
            chunk = orgs[i : i + CHUNK]
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
