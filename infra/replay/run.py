"""``run_replay``: plan, scan (in worker processes for big ranges), diff against the ledger, report."""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

from infra.replay.compare import _check_bucket_seconds, _compare, _compared_buckets, _id_scope, _ledger_ids
from infra.replay.plan import NO_HIGH, NO_LOW, PartitionRange, ReplaySpec, _slices, plan_ranges
from infra.replay.price import Aggregates, load_pricer
from infra.replay.report import LABELS, ReplayReport, ReplayResult
from infra.replay.scan import ScanCounts, _Job, _Scanner
from models.retention import horizon_ms
from models.ticks import Tick
from sinks.ledger import Ledger, SourcedTick

__all__ = ["INLINE_BELOW_RECORDS", "MAX_JOBS", "run_replay"]

log = logging.getLogger(__name__)

INLINE_BELOW_RECORDS: Final = 5_000  # smaller ranges are scanned in this process (forking costs more)
MAX_JOBS: Final = 8


def run_replay(
    ledger: Ledger,
    bootstrap: str,
    spec: ReplaySpec,
    *,
    bucket_seconds: int,
    jobs: int | None = None,
    inline_below: int = INLINE_BELOW_RECORDS,
    progress: Callable[[int, int], None] | None = None,
) -> ReplayResult:
    """Re-derive ``spec``'s range and compare it with the ledger. Read-only on Kafka and on the ledger.

    ``jobs``: worker processes for the scan (default: one per CPU, at most 8; ranges of fewer than
    ``inline_below`` records are scanned in this process). ``progress(records read, records to read)`` is
    called as the scan goes (from this process, whichever process scans).
    """
    t0 = time.perf_counter()
    now_ms = time.time_ns() // 1_000_000
    _check_bucket_seconds(ledger, bucket_seconds)
    ranges, complete = asyncio.run(plan_ranges(bootstrap, spec))
    lo, hi = spec.window_ms(bucket_seconds)
    # Retention dropped the ledger's ticks before its dedup horizon: compare from the horizon on, and say so.
    horizon = ledger.dedup_horizon()
    clipped = horizon > 0 and lo < horizon_ms(horizon)
    if clipped:
        lo = horizon_ms(horizon)
        log.info("replay: the range reaches past the ledger's dedup horizon; ticks are compared from it on")
    pricer = load_pricer(ledger, bucket_seconds, hi)
    total = sum(r.size for r in ranges)
    n_jobs = min(MAX_JOBS, max(1, jobs if jobs is not None else (os.cpu_count() or 1)))
    fork = n_jobs > 1 and total >= inline_below and "fork" in multiprocessing.get_all_start_methods()
    if not fork:
        n_jobs = 1
    t_plan = time.perf_counter()
    if fork:
        # Children inherit this process: no pooled DB connection may cross the fork, nor buffered output.
        ledger.dispose()
        sys.stdout.flush()
        sys.stderr.flush()
    orgs = frozenset(spec.orgs) if spec.orgs else None
    counters: list[Any] = [
        multiprocessing.get_context("fork").Value("q", 0, lock=False) if fork else _Counter() for _ in range(n_jobs)
    ]

    def report_progress() -> None:
        if progress is not None:
            progress(min(total, sum(int(c.value) for c in counters)), total)

    gc_was_enabled = gc.isenabled()
    gc.disable()  # millions of acyclic objects (ticks, ids): the collector would only rescan them, repeatedly
    try:
        scanners = [
            _Scanner(bootstrap, spec.topic, sl, (lo, hi), pricer, orgs=orgs, counter=counters[k])
            for k, sl in enumerate(_slices(ranges, n_jobs))
        ]
        if not fork:
            for sc in scanners:
                sc.on_progress = report_progress
        sd = _scan_and_diff(
            ledger, scanners, fork, lo, hi, None if complete else ranges, bucket_seconds, spec.orgs, report_progress
        )
        if progress is not None:
            progress(total, total)
        del scanners  # every tick but the missing ones is freed here, before the collector runs again
        t_diff = time.perf_counter()
        compared = _compared_buckets(spec, sd.counts, bucket_seconds, horizon or None) if complete else None
        keys, n_compared, org_meters, unbilled = _compare(ledger, pricer, sd.derived, sd.missed, compared, spec.orgs)
    finally:
        if gc_was_enabled:
            gc.enable()
    counts = sd.counts
    counts_out = {
        "records": counts.records,
        "ticks_read": counts.ticks,
        "outside_window": counts.outside,
        "selected": counts.ticks - counts.outside,
        "unique": sd.unique,
        "duplicates": counts.duplicates + sd.cross_dups,
        "rejected": sum(counts.rejected.values()),
        "ignored_type": counts.ignored,
        "missing_from_ledger": len(sd.missing_ids),
        "extra_in_ledger": len(sd.extra_ids),
        "compared_keys": n_compared,
        "differing_keys": sum(1 for k in keys if k.diff_units),
        "pending_close_keys": sum(1 for k in keys if k.pending_units),
    }
    labels = dict.fromkeys(LABELS, 0)
    for k in keys:
        labels[k.label] += 1
    labels["ok"] = n_compared - sum(1 for k in keys if k.compared and k.label != "ok")
    seconds = time.perf_counter() - t0
    log.debug(
        "replay timings: plan+pricer %.3fs, scan %.3fs, ids+ledger ids %.3fs, diff+finish %.3fs, compare %.3fs",
        t_plan - t0,
        sd.t_scan - t_plan,
        sd.t_ids - sd.t_scan,
        t_diff - sd.t_ids,
        time.perf_counter() - t_diff,
    )
    report = ReplayReport(
        topic=spec.topic,
        bucket_seconds=bucket_seconds,
        ranges=ranges,
        complete=complete,
        window_ms=(None if lo == NO_LOW else lo, None if hi == NO_HIGH else hi),
        compared_buckets=compared,
        counts=counts_out,
        rejected=dict(sorted(counts.rejected.items())),
        unbilled=unbilled,
        keys=keys,
        org_meters=org_meters,
        missing_ids=sd.missing_ids,
        extra_ids=sd.extra_ids,
        jobs=n_jobs,
        seconds=seconds,
        now_ms=now_ms,
        labels=labels,
        horizon_s=horizon,
        clipped=clipped,
    )
    return ReplayResult(report, [SourcedTick(t, p, o) for t, p, o in sd.missing_ticks])


class _Counter:
    """Records read by a scan in this process (a worker process gets a shared ``multiprocessing.Value``)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


@dataclass
class _ScanDiff:
    counts: ScanCounts
    derived: Aggregates
    missed: Aggregates
    missing_ids: list[str]
    extra_ids: list[str]
    missing_ticks: list[tuple[Tick, int, int]]
    unique: int
    cross_dups: int
    t_scan: float
    t_ids: float


def _scan_and_diff(
    ledger: Ledger,
    scanners: Sequence[_Scanner],
    fork: bool,
    lo: int,
    hi: int,
    partial: Sequence[PartitionRange] | None,
    bucket_seconds: int,
    orgs: Sequence[str] | None = None,
    on_wait: Callable[[], None] | None = None,
) -> _ScanDiff:
    """Run the scanners (worker processes when ``fork``) through their three steps against the ledger's ids."""
    jobs: list[_Job] = []
    try:
        for sc in scanners:
            jobs.append(_Job(sc, fork, on_wait))
        # Step 1: the scans; their span of tick times bounds the ledger scope.
        counts = ScanCounts()
        for job in jobs:
            counts.merge(job.scanned())
        t_scan = time.perf_counter()
        # The ledger side of the tick-level comparison, read in a thread (the database driver releases the
        # GIL) while this one takes in the scanners' ids. Step 2: every scanner's unique ids and priced
        # ticks; an id two scanners hold counts for the earliest slice only.
        id_lo, id_hi = _id_scope(lo, hi, counts, bucket_seconds)
        with ThreadPoolExecutor(1, thread_name_prefix="edgebill-replay-ids") as pool:
            ledger_read = pool.submit(_ledger_ids, ledger, id_lo, id_hi, lo, hi, partial, orgs)
            derived = Aggregates()
            earlier: set[str] = set()  # ids of the scanners before the current one
            owned: list[AbstractSet[str]] = []
            drops: list[set[str]] = []
            for k, job in enumerate(jobs):
                mine, agg = job.ids()
                derived.merge(agg)
                drops.append(set(mine & earlier) if earlier else set())
                if k < len(jobs) - 1:
                    earlier.update(mine)
                owned.append(mine)
            ledger_ids, in_range = ledger_read.result()
        t_ids = time.perf_counter()
        # Set work is kept to what the answer needs: no union is built unless the counts say that some
        # sample is extra.
        missing: set[str] = set()
        for mine in owned:
            missing |= mine - ledger_ids
        unique = sum(len(m) for m in owned) - sum(len(d) for d in drops)
        t_union = time.perf_counter()
        # |ledger ∩ topic| = unique - missing; anything else in the scope is extra.
        if partial is not None or len(ledger_ids) > unique - len(missing):
            extra_ids = sorted(in_range.difference(*owned))
        else:
            extra_ids = []
        del ledger_ids, in_range, earlier
        log.debug("replay timings: missing %.3fs, extra %.3fs", t_union - t_ids, time.perf_counter() - t_union)
        # Step 3: give up cross-slice duplicates, price and collect the missing ticks.
        missed = Aggregates()
        missing_ticks: list[tuple[Tick, int, int]] = []
        for job, mine, drop in zip(jobs, owned, drops, strict=True):
            part = job.part(drop, {i for i in missing if i in mine} if len(jobs) > 1 else missing)
            derived.merge(part.dropped, sign=-1)
            missed.merge(part.missing)
            missing_ticks.extend(part.missing_ticks)
    finally:
        for job in jobs:
            job.stop()
    missing_ticks.sort(key=lambda x: (x[1], x[2]))
    return _ScanDiff(
        counts=counts,
        derived=derived,
        missed=missed,
        missing_ids=sorted(missing),
        extra_ids=extra_ids,
        missing_ticks=missing_ticks,
        unique=unique,
        cross_dups=sum(len(d) for d in drops),
        t_scan=t_scan,
        t_ids=t_ids,
    )
