"""``edgebill replay --apply``: write the ticks missing from the ledger, and nothing else."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Final

from infra.replay.plan import ReplayRefused
from infra.replay.report import ReplayResult, _iso
from models.billing import bucket_end, bucket_start
from models.stripe_window import expired_at_close
from sinks.ledger import Ledger

__all__ = ["APPLY_CHUNK", "ApplyResult", "apply_missing", "apply_problems"]

log = logging.getLogger(__name__)

APPLY_CHUNK: Final = 5_000  # ticks per ledger transaction when applying (keeps the SQLite write lock short)


@dataclass(frozen=True, slots=True)
class ApplyResult:
    offered: int  # missing ticks written through write_ticks
    inserted: int  # new samples (the rest were present by then: e.g. the worker ingested them meanwhile)
    chunks: int
    too_old: int = 0  # refused: before the ledger's dedup horizon (it moved since the replay read it)


def apply_problems(result: ReplayResult, *, now_ms: int | None = None) -> list[str]:
    """Why ``--apply`` should not write these ticks (empty: safe). ``--force`` overrides.

    * A missing tick whose bucket ended more than Stripe's 35 days ago would only become an ``expired`` row.
    * A compared (org, bucket, meter) with missing ticks whose difference is not exactly their units: the
      ledger already accounts for part of them (e.g. samples deleted after their bucket was billed) or
      prices differently; writing them would not make it agree, and could bill twice.
    """
    rep = result.report
    now = now_ms if now_ms is not None else time.time_ns() // 1_000_000
    problems: list[str] = []
    size = rep.bucket_seconds
    # The closer's own test: a row of such a bucket, written now, would be written 'expired'.
    buckets = sorted({bucket_start(st.tick.ts_ms, size) for st in result.missing})
    expired = {b for b in buckets if expired_at_close(bucket_end(b, size), now)}
    if expired:
        first, last = min(expired), max(expired)
        n = sum(1 for st in result.missing if bucket_start(st.tick.ts_ms, size) in expired)
        problems.append(
            f"{n} missing tick(s) in {len(expired)} bucket(s) from {_iso(first)} to {_iso(last)} are "
            f"older than Stripe's 35-day window: they can no longer be sent and would only become 'expired' rows"
        )
    unexplained = [k for k in rep.keys if k.missing_units and not k.explained]
    if unexplained:
        k = unexplained[0]
        problems.append(
            f"{len(unexplained)} (org, bucket, meter) with missing ticks differ by other than those ticks' units "
            f"(e.g. {k.org_id} {_iso(k.bucket_start)} {k.meter}: difference {k.diff_units}, missing "
            f"{k.missing_units} units): applying would not make the ledger agree and could bill twice"
        )
    return problems


def apply_missing(
    ledger: Ledger, result: ReplayResult, *, force: bool = False, now_ms: int | None = None
) -> ApplyResult:
    """Write the ticks missing from the ledger, and nothing else.

    Refuses (:class:`ReplayRefused`) when :func:`apply_problems` finds any, unless ``force``.
    Side effects, per chunk of :data:`APPLY_CHUNK` ticks in (partition, offset) order, each one
    transaction of :meth:`Ledger.write_ticks` with no partition progress: (1) INSERT the samples
    ``ON CONFLICT (id) DO NOTHING`` (a tick the worker ingested meanwhile is absorbed; a tick before the
    ledger's dedup horizon, which retention may have moved since the replay, is refused and counted);
    (2) bump the counters ``ticks.ingested`` / ``ticks.duplicate`` and ``replay.ticks_offered``; commit. Nothing else is
    touched: no existing sample or meter row, no partition progress, no Kafka offset, no Stripe call.
    The worker's closer then claims the new samples and writes their rows (corrections ``…:r{n}`` for
    buckets already closed). A crash between chunks leaves the earlier chunks applied; replaying again
    finds only the rest missing.
    """
    problems = apply_problems(result, now_ms=now_ms)
    if problems and not force:
        raise ReplayRefused(problems)
    for p in problems:
        log.warning("applying despite (--force): %s", p)
    ticks = result.missing
    size = result.report.bucket_seconds
    inserted = chunks = too_old = 0
    for i in range(0, len(ticks), APPLY_CHUNK):
        chunk = ticks[i : i + APPLY_CHUNK]
        res = ledger.write_ticks(
            result.report.topic,
            chunk,
            bucket_seconds=size,
            progress={},
            counts={"replay.ticks_offered": len(chunk)},
        )
        inserted += res.inserted
        too_old += len(res.too_old)
        chunks += 1
    log.info(
        "replay applied %d missing tick(s): %d inserted, %d already present, %d before the dedup horizon",
        len(ticks),
        inserted,
        len(ticks) - inserted - too_old,
        too_old,
    )
    return ApplyResult(offered=len(ticks), inserted=inserted, chunks=chunks, too_old=too_old)
