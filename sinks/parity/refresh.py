"""The refresher: which buckets to recompute (see :mod:`sinks.parity`), their rewrite, the watermark, and
the drift alerts recorded once and handed to the caller to publish."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import orjson
from sqlalchemy import Connection, delete, select, tuple_

from models.billing import bucket_start_s
from models.parity import (
    AlertEpisode,
    AlertRule,
    BucketVerdict,
    alert_episodes,
    bucket_verdict,
)
from models.policy import PolicyHistory
from models.watermark import last_closable_bucket, watermark
from sinks.base import PendingAlert
from sinks.parity.base import ParityConfig
from sinks.parity.measure import Measuring
from sinks.parity.reads import ParityRow
from sinks.schema import close_runs, parity_alerts, parity_dirty, tick_batches, usage_parity

__all__ = ["PendingAlert", "RefreshResult", "RefreshState", "Refresher"]

_MAX_SPAN_BUCKETS: Final = 48  # buckets recomputed per transaction


@dataclass(slots=True)
class RefreshState:
    """The refresher's in-memory cursors (one per process; a fresh one rebuilds the lookback window)."""

    policies: dict[str, tuple[tuple[int, str], ...]] | None = None
    close_cursor: int | None = None  # insertion seq of tick_batches seen (see :mod:`sinks.parity`)


@dataclass(slots=True)
class RefreshResult:
    buckets: list[int] = field(default_factory=list)
    rows: int = 0
    flagged: int = 0
    watermark_ms: int | None = None
    alerts: list[PendingAlert] = field(default_factory=list)


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


class Refresher(Measuring):
    """Recomputes parity rows and records alerts."""

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
            rows = [ParityRow.of(org, b, m, cfg.tolerance, now_ms) for (org, b), m in sorted(measures.items())]
            with self._w.begin() as conn:
                conn.execute(delete(usage_parity).where(usage_parity.c.bucket_start.in_(run)))
                if rows:
                    conn.execute(self._insert(usage_parity), [r.values() for r in rows])
                marks = [(b, dirty_versions[b]) for b in run if b in dirty_versions]
                if marks:
                    pd = parity_dirty.c
                    conn.execute(delete(parity_dirty).where(tuple_(pd.bucket_start, pd.version).in_(marks)))
            n_rows += len(rows)
            n_flagged += sum(1 for r in rows if r.flagged)
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

    def refresh(self, state: RefreshState, cfg: ParityConfig) -> RefreshResult:
        """One refresh: find the buckets to recompute (:mod:`sinks.parity`), rewrite them, store the watermark,
        record newly due alerts. Alerts are returned for the caller to publish, then
        :meth:`mark_published`. Run by one process at a time (the leader); safe to run concurrently
        (every write is a whole-bucket rewrite of the same result)."""
        now = self._clock()
        size = cfg.bucket_seconds
        current = self._bucket(now)
        lookback_lo = current - (cfg.lookback_seconds // size) * size
        self.advance_edge()
        tb = tick_batches.c
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
                        select(tb.bucket_start).where(tb.seq > state.close_cursor).distinct()
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
