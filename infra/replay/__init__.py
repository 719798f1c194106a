"""``edgebill replay``: re-derive a range of ``usage-ticks`` and diff it against what the ledger billed.

Kafka is the log of record and the ledger the state of record; replay checks one against the other.

1. **Plan** (read-only on Kafka): the partitions and offsets to read — ``[from, to)`` per partition,
   default the whole log as it is now (Tansu's short ``end_offsets`` are corrected with
   :func:`infra.kafka_fixes.true_end_offsets`; ticks produced after the plan are not read).
2. **Scan**: raw aiokafka consumers without a group (manual ``assign``, large ``getmany`` batches, no
   commits, so a running worker is never disturbed), every record through
   :func:`models.ticks.parse_record` (the ingest parser; rejects are counted by reason, never fatal),
   the tick's own timestamp against ``--since/--until`` and ``--bucket-from/--bucket-to`` (ListOffsets
   by time is broken on Tansu for CreateTime, local-infra-findings §3), dedup by tick id in memory.
   Big ranges are split over several processes (each reads a contiguous slice of every partition);
   ids seen by two of them are counted once, for the earliest slice.
3. **Price** each unique tick exactly as :meth:`sinks.ledger.Ledger.close` does: zombie ticks per
   ``cell_intervals`` (the rule of ``sinks.ledger._zombie_expr``, here in Python), the policy in force
   at the tick's time from ``org_policies`` (split per tick only in buckets with a policy change, as the
   closer), :func:`models.billing.meter_amounts` (unified GB-s from MB-s, legacy tier seconds),
   unknown / free orgs and odd legacy sizes unbilled.
4. **Compare** with the ledger (read-only): ticks of the range missing from ``usage_samples`` (by id) —
   the differences ``--apply`` writes — and samples of the range that the topic does not hold; per
   (org, bucket, meter) the re-derived units against ``meter_events.units`` summed over every revision
   and state plus the units of samples not closed yet; per (org, meter) the values.

The unit comparison needs every tick of a bucket: it covers the buckets lying wholly inside the time
bounds, and it is skipped when the offset range is partial (not every partition from its log start to
its end) — the tick-level comparison (missing / extra) is exact in every case.

:func:`apply_missing` writes only the missing ticks, through :meth:`Ledger.write_ticks` with no partition
progress (the id primary key absorbs anything already present): the running closer turns them into
correction rows ``…:r{n}`` for buckets already closed, and the sender ships them. It never rewrites a row
and never calls Stripe.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import sys
import time
import traceback
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final

from sqlalchemy import Connection, func, select

from models.billing import STRIPE_MAX_AGE_SECONDS, meter_amounts, meter_unit_divisor, round_value
from models.errors import EdgebillError, LedgerError
from models.policy import OrgPolicy, PolicyHistory
from models.ticks import FUTURE_TOLERANCE_MS, MAX_INTERVAL_S, Tick, parse_record
from sinks.ledger import ZOMBIE_SLACK_MS, Ledger, SourcedTick, not_aggregated, policy_from_row
from sinks.schema import cell_intervals, counters, meter_events, org_policies, usage_samples

__all__ = [
    "ApplyResult",
    "KeyDiff",
    "OrgMeterDiff",
    "PartitionRange",
    "Pricer",
    "ReplayError",
    "ReplayRefused",
    "ReplayReport",
    "ReplayResult",
    "ReplaySpec",
    "apply_missing",
    "load_pricer",
    "plan_ranges",
    "render_table",
    "run_replay",
]

log = logging.getLogger(__name__)

_NO_LOW: Final = -(1 << 62)
_NO_HIGH: Final = 1 << 62
INLINE_BELOW_RECORDS: Final = 5_000  # smaller ranges are scanned in this process (forking costs more)
MAX_JOBS: Final = 8
APPLY_CHUNK: Final = 5_000  # ticks per ledger transaction when applying (keeps the SQLite write lock short)
STALL_SECONDS: Final = 30.0  # no record for this long while offsets remain to be read: give up, loudly

# Key of a priced aggregate: (org, bucket start, meter) for billable units, (org, bucket, reason) unbilled.
Key = tuple[str, int, str]


class ReplayError(EdgebillError):
    """A replay could not be completed (broker, worker process, or ledger problem)."""


class ReplayRefused(EdgebillError):
    """``--apply`` refused to write; ``reasons`` says why (``--force`` overrides)."""

    def __init__(self, reasons: Sequence[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = list(reasons)


# ============================================================================================ the range


@dataclass(frozen=True)
class ReplaySpec:
    """What to replay. Offsets are per partition, ``[from, to)``; times are unix ms of the tick's own
    timestamp, ``[since, until)``; bucket bounds are bucket starts (unix s), both inclusive.

    ``from_offsets`` / ``to_offsets`` map a partition (or None: every partition) to an offset.
    """

    topic: str
    partitions: tuple[int, ...] | None = None
    from_offsets: Mapping[int | None, int] = field(default_factory=dict)
    to_offsets: Mapping[int | None, int] = field(default_factory=dict)
    since_ms: int | None = None
    until_ms: int | None = None
    bucket_from: int | None = None
    bucket_to: int | None = None

    def window_ms(self, bucket_seconds: int) -> tuple[int, int]:
        """The tick filter as one half-open window ``[lo, hi)`` of unix ms (unbounded sides = ±2^62)."""
        lo, hi = _NO_LOW, _NO_HIGH
        if self.since_ms is not None:
            lo = self.since_ms
        if self.bucket_from is not None:
            lo = max(lo, _floor(self.bucket_from, bucket_seconds) * 1000)
        if self.until_ms is not None:
            hi = self.until_ms
        if self.bucket_to is not None:
            hi = min(hi, (_floor(self.bucket_to, bucket_seconds) + bucket_seconds) * 1000)
        return lo, hi


def _floor(ts_s: int, size: int) -> int:
    return ts_s // size * size


@dataclass(frozen=True, slots=True)
class PartitionRange:
    """Offsets ``[start, end)`` of one partition to read, and the log's bounds when the plan was made."""

    partition: int
    start: int
    end: int
    log_start: int
    log_end: int

    @property
    def size(self) -> int:
        return max(0, self.end - self.start)

    @property
    def whole(self) -> bool:
        return self.start <= self.log_start and self.end >= self.log_end


async def plan_ranges(bootstrap: str, spec: ReplaySpec) -> tuple[list[PartitionRange], bool]:
    """(ranges to read, complete) — ``complete``: every partition of the topic, from its log start to its end.

    Read-only: a group-less consumer asks for the partitions, their first offsets and their true ends.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from infra.kafka_fixes import true_end_offsets

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        await asyncio.sleep(0)  # see kafka_fixes.true_end_offsets: let the start-up task run before stop()
        parts = consumer.partitions_for_topic(spec.topic)
        if not parts:
            await consumer.topics()
            parts = consumer.partitions_for_topic(spec.topic)
        if not parts:
            raise ReplayError(f"topic {spec.topic!r} does not exist on {bootstrap}")
        every = sorted(parts)
        chosen = every if spec.partitions is None else sorted(set(spec.partitions))
        unknown = [p for p in chosen if p not in parts]
        if unknown:
            raise ReplayError(f"topic {spec.topic!r} has no partition(s) {unknown}; it has {every}")
        tps = [TopicPartition(spec.topic, p) for p in chosen]
        begins = await consumer.beginning_offsets(tps)
        ends = await true_end_offsets(consumer, tps)
    finally:
        await consumer.stop()
    ranges: list[PartitionRange] = []
    for tp in tps:
        log_start, log_end = int(begins[tp]), int(ends[tp])
        start = spec.from_offsets.get(tp.partition, spec.from_offsets.get(None, log_start))
        end = spec.to_offsets.get(tp.partition, spec.to_offsets.get(None, log_end))
        start, end = max(start, log_start), min(end, log_end)
        ranges.append(PartitionRange(tp.partition, start, max(start, end), log_start, log_end))
    complete = len(chosen) == len(every) and all(r.whole for r in ranges)
    return ranges, complete


def _slices(ranges: Sequence[PartitionRange], jobs: int) -> list[list[PartitionRange]]:
    """Split every partition's range into ``jobs`` contiguous slices; job k gets slice k of each."""
    out: list[list[PartitionRange]] = [[] for _ in range(jobs)]
    for r in ranges:
        n = r.size
        for k in range(jobs):
            a = r.start + n * k // jobs
            b = r.start + n * (k + 1) // jobs
            if b > a:
                out[k].append(PartitionRange(r.partition, a, b, r.log_start, r.log_end))
    return out


# ============================================================================================ pricing


@dataclass(slots=True)
class _Cells:
    """The cell side of one sandbox: its first interval start and its intervals per owning worker."""

    first_start: int
    by_worker: dict[str, list[tuple[int, int | None]]]


@dataclass(slots=True)
class Aggregates:
    """Priced usage: billable ``(org, bucket, meter) -> [units, samples]``, unbilled
    ``(org, bucket, reason) -> [samples, mb_seconds]``."""

    billable: dict[Key, list[int]] = field(default_factory=dict)
    unbilled: dict[Key, list[int]] = field(default_factory=dict)

    def merge(self, other: Aggregates, sign: int = 1) -> None:
        """Add (``sign=-1``: subtract) ``other``; pricing is additive per tick, so this is exact."""
        for src, dst in ((other.billable, self.billable), (other.unbilled, self.unbilled)):
            for k, (a, b) in src.items():
                slot = dst.get(k)
                if slot is None:
                    dst[k] = [sign * a, sign * b]
                else:
                    slot[0] += sign * a
                    slot[1] += sign * b


@dataclass(slots=True)
class _Groups:
    """Ticks grouped for pricing: (org, bucket index, memory_mb) -> [n, seconds]; ticks to price one by one;
    zombie usage (org, bucket, "zombie") -> [n, mb_seconds]."""

    groups: dict[tuple[str, int, int], list[int]] = field(default_factory=dict)
    singles: list[Tick] = field(default_factory=list)
    zombies: dict[Key, list[int]] = field(default_factory=dict)


class Pricer:
    """Prices ticks exactly as :meth:`Ledger.close` does (see the module docstring). Pure."""

    def __init__(
        self,
        policies: Mapping[str, Sequence[OrgPolicy]],
        intervals: Iterable[tuple[str, str, int, int | None]],
        bucket_seconds: int,
    ) -> None:
        """``intervals``: (sandbox, worker, started_ms, ended_ms or None) rows of ``cell_intervals``."""
        self.bucket_seconds = bucket_seconds
        self.histories = {org: PolicyHistory(list(pols)) for org, pols in policies.items()}
        # (org, bucket) pairs with a policy change strictly inside: priced per tick, as the closer does.
        size_ms = bucket_seconds * 1000
        self.split: set[tuple[str, int]] = set()
        for org, pols in policies.items():
            for p in pols:
                if p.effective_at_ms % size_ms:
                    self.split.add((org, p.effective_at_ms // size_ms * bucket_seconds))
        cells: dict[str, _Cells] = {}
        for sandbox, worker, started, ended in intervals:
            c = cells.get(sandbox)
            if c is None:
                c = cells[sandbox] = _Cells(started, {})
            elif started < c.first_start:
                c.first_start = started
            c.by_worker.setdefault(worker, []).append((started, ended))
        self.cells = cells

    def is_zombie(self, sandbox: str, worker: str, ts_ms: int, interval_s: int) -> bool:
        """``_zombie_expr``: S had started by t (within slack), yet no interval of S owned by W covers t."""
        if not worker:
            return False
        c = self.cells.get(sandbox)
        if c is None:
            return False
        slack = interval_s * 1000 + ZOMBIE_SLACK_MS
        if c.first_start > ts_ms + slack:
            return False  # ownership not known yet at t: allowed
        for started, ended in c.by_worker.get(worker, ()):
            if started - slack <= ts_ms and (ended is None or ts_ms <= ended + slack):
                return False
        return True

    def price(self, ticks: Iterable[Tick], out: Aggregates | None = None) -> Aggregates:
        """Add the priced usage of ``ticks`` (unique ticks) to ``out`` and return it."""
        groups = _Groups()
        self.collect(ticks, groups)
        return self.finish(groups, out)

    def collect(self, ticks: Iterable[Tick], into: _Groups) -> None:
        """The hot loop: group ``ticks`` by (org, bucket, memory size) — the closer's grouping — with the
        zombie test only for sandboxes the cell side knows; ticks of a bucket with a policy change are set
        aside to be priced one by one. Nothing is priced yet (see :meth:`finish`)."""
        size = self.bucket_seconds
        size_ms = size * 1000
        cells = self.cells
        split = self.split
        zombie = self.is_zombie
        groups = into.groups
        singles = into.singles
        unbilled = into.zombies
        for t in ticks:
            bi = t.ts_ms // size_ms
            if cells and t.sandbox_id in cells and zombie(t.sandbox_id, t.worker_id, t.ts_ms, t.interval_s):
                _add(unbilled, (t.org_id, bi * size, "zombie"), 1, t.memory_mb * t.interval_s)
                continue
            if split and (t.org_id, bi * size) in split:
                singles.append(t)
                continue
            key = (t.org_id, bi, t.memory_mb)
            g = groups.get(key)
            if g is None:
                groups[key] = [1, t.interval_s]
            else:
                g[0] += 1
                g[1] += t.interval_s

    def finish(self, collected: _Groups, out: Aggregates | None = None) -> Aggregates:
        """Price what :meth:`collect` grouped (a group's MB-s: its memory size times its seconds)."""
        acc = Aggregates() if out is None else out
        size = self.bucket_seconds
        hist = self.histories
        for key, (n, mbs) in collected.zombies.items():
            _add(acc.unbilled, key, n, mbs)
        for (org, bi, mem), (n, secs) in collected.groups.items():
            b = bi * size
            h = hist.get(org)
            self._price_one(h.as_of(b * 1000) if h else None, org, b, mem, n, secs, mem * secs, acc)
        for t in collected.singles:
            h = hist.get(t.org_id)
            b = t.ts_ms // (size * 1000) * size
            pol = h.as_of(t.ts_ms) if h else None
            self._price_one(pol, t.org_id, b, t.memory_mb, 1, t.interval_s, t.memory_mb * t.interval_s, acc)
        return acc

    @staticmethod
    def _price_one(
        pol: OrgPolicy | None, org: str, b: int, mem: int, n: int, secs: int, mbs: int, acc: Aggregates
    ) -> None:
        """``Ledger._price``: the meter and units, or the reason the usage is not billed."""
        if pol is None:
            reason = "unknown_org"
        elif not pol.billable:
            reason = "free_plan" if pol.billing_provider == "stripe" else f"provider_{pol.billing_provider}"
        else:
            amount = meter_amounts(pol.billing_mode, mem, secs, mbs)
            if amount is not None:
                _add(acc.billable, (org, b, amount.meter), amount.units, n)
                return
            reason = "legacy_unknown_tier"
        _add(acc.unbilled, (org, b, reason), n, mbs)


def _add(d: dict[Key, list[int]], key: Key, a: int, b: int) -> None:
    slot = d.get(key)
    if slot is None:
        d[key] = [a, b]
    else:
        slot[0] += a
        slot[1] += b


def load_pricer(conn: Connection, bucket_seconds: int, hi_ms: int = _NO_HIGH) -> Pricer:
    """A :class:`Pricer` from the ledger's ``org_policies`` (all of them) and ``cell_intervals``.

    Policies are converted exactly as the closer converts them (:func:`sinks.ledger.policy_from_row`).
    Intervals starting later than the window's end plus the largest slack cannot decide any tick
    of the window and are not read.
    """
    found: dict[str, list[OrgPolicy]] = defaultdict(list)
    for r in conn.execute(select(org_policies)):
        found[r.org_id].append(policy_from_row(r))
    ci = cell_intervals.c
    q = select(ci.sandbox_id, ci.worker_id, ci.started_ms, ci.ended_ms)
    if hi_ms < _NO_HIGH:
        q = q.where(ci.started_ms <= hi_ms + MAX_INTERVAL_S * 1000 + ZOMBIE_SLACK_MS)
    rows = [(r[0], r[1], int(r[2]), None if r[3] is None else int(r[3])) for r in conn.execute(q)]
    return Pricer(found, rows, bucket_seconds)


# ============================================================================================ scanning


@dataclass(slots=True)
class ScanCounts:
    records: int = 0
    ticks: int = 0  # valid ticks parsed in the offset range (duplicates included)
    outside: int = 0  # valid ticks outside the time / bucket window
    duplicates: int = 0  # selected ticks whose id was seen before (within one scanner)
    ignored: int = 0  # envelopes of another type
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    min_ts: int = _NO_HIGH
    max_ts: int = _NO_LOW

    def merge(self, o: ScanCounts) -> None:
        self.records += o.records
        self.ticks += o.ticks
        self.outside += o.outside
        self.duplicates += o.duplicates
        self.ignored += o.ignored
        for k, v in o.rejected.items():
            self.rejected[k] = self.rejected.get(k, 0) + v
        self.min_ts = min(self.min_ts, o.min_ts)
        self.max_ts = max(self.max_ts, o.max_ts)


@dataclass(slots=True)
class _Part:
    """What one scanner returns last: the priced ticks it gave up (ids an earlier slice holds), and the
    ticks missing from the ledger among its own, priced and as they are."""

    dropped: Aggregates
    missing: Aggregates
    missing_ticks: list[tuple[Tick, int, int]]


class _Scanner:
    """Reads slices of the topic, parses, dedups, prices. Runs in a worker process (or inline).

    Holds every unique tick: ``id -> (tick, partition, offset)`` of its first occurrence in its slices.
    Pricing is additive per tick, so the ticks it later gives up (cross-slice duplicates) are priced
    again and subtracted.
    """

    def __init__(
        self, bootstrap: str, topic: str, slices: Sequence[PartitionRange], window: tuple[int, int], pricer: Pricer
    ) -> None:
        self.pricer = pricer
        self.groups = _Groups()
        self.bootstrap = bootstrap
        self.topic = topic
        self.slices = list(slices)
        self.lo, self.hi = window
        self.now_ms = time.time_ns() // 1_000_000
        self.seen: dict[str, tuple[Tick, int, int]] = {}
        self.counts = ScanCounts()
        self.derived = Aggregates()

    async def scan(self) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        todo = {TopicPartition(self.topic, s.partition): s for s in self.slices if s.end > s.start}
        if not todo:
            return
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_bytes=64 * 1024 * 1024,
            max_partition_fetch_bytes=16 * 1024 * 1024,
            fetch_max_wait_ms=100,
        )
        await consumer.start()
        try:
            consumer.assign(list(todo))
            for tp, s in todo.items():
                consumer.seek(tp, s.start)
            remaining = set(todo)
            last_progress = time.monotonic()
            while remaining:
                batch = await consumer.getmany(*remaining, timeout_ms=200, max_records=200_000)
                for tp, recs in batch.items():
                    if tp not in remaining or not recs:
                        continue
                    end = todo[tp].end
                    last_progress = time.monotonic()
                    self._consume(tp.partition, recs, end)
                    if recs[-1].offset >= end - 1:
                        remaining.discard(tp)
                        consumer.pause(tp)
                if batch:
                    continue
                for tp in list(remaining):  # nothing came: an offset gap (compaction) may end a slice early
                    if await consumer.position(tp) >= todo[tp].end:
                        remaining.discard(tp)
                        consumer.pause(tp)
                if remaining and time.monotonic() - last_progress > STALL_SECONDS:
                    raise ReplayError(
                        f"no record for {STALL_SECONDS:g}s while reading {sorted(tp.partition for tp in remaining)} "
                        f"of {self.topic!r}; the log may have been truncated under the replay"
                    )
        finally:
            await consumer.stop()

    def _consume(self, partition: int, recs: Sequence[Any], end: int) -> None:
        """The hot loop: parse (the ingest parser, same future-timestamp rule), filter, dedup."""
        setdefault = self.seen.setdefault
        parse = parse_record
        lo, hi = self.lo, self.hi
        now = self.now_ms
        tol = FUTURE_TOLERANCE_MS
        c = self.counts
        rejected = c.rejected
        n_rec = n_ticks = outside = dups = ignored = 0
        mn, mx = c.min_ts, c.max_ts
        fresh: list[Tick] = []
        add = fresh.append
        for r in recs:
            off = r.offset
            if off >= end:
                break
            n_rec += 1
            # Ingest rejects ticks stamped more than FUTURE_TOLERANCE_MS after its clock; it read this record
            # about when it was produced, so the record's own timestamp stands in for that clock.
            rts = r.timestamp
            parsed = parse(r.value, max_ts_ms=(rts if 0 < rts < now else now) + tol)
            ticks = parsed.ticks
            n_ticks += len(ticks)
            for t in ticks:
                ts = t.ts_ms
                if ts < lo or ts >= hi:
                    outside += 1
                    continue
                entry = (t, partition, off)
                if setdefault(t.id, entry) is not entry:  # one probe: inserts unless the id is there
                    dups += 1
                    continue
                add(t)
                if ts < mn:
                    mn = ts
                if ts > mx:
                    mx = ts
            if parsed.rejected:
                for rj in parsed.rejected:
                    rejected[rj.reason] = rejected.get(rj.reason, 0) + 1
            ignored += parsed.ignored
        c.records += n_rec
        c.ticks += n_ticks
        c.outside += outside
        c.duplicates += dups
        c.ignored += ignored
        c.min_ts, c.max_ts = mn, mx
        self.pricer.collect(fresh, self.groups)  # while the batch's ticks are still in the CPU cache

    def price(self) -> None:
        self.derived = self.pricer.finish(self.groups)
        self.groups = _Groups()

    def finish(self, drop: set[str], missing: set[str]) -> _Part:
        """The ticks given up (``drop``: an earlier slice holds them) priced, and the missing ones."""
        pricer = self.pricer
        seen = self.seen
        dropped = pricer.price(seen[tid][0] for tid in drop if tid in seen)
        missing_ticks = [seen[tid] for tid in missing if tid in seen and tid not in drop]
        missing_ticks.sort(key=lambda x: (x[1], x[2]))
        missed = pricer.price(t for t, _, _ in missing_ticks)
        return _Part(dropped, missed, missing_ticks)


_SEP = "\x00"


def _pack_ids(ids: Mapping[str, Any]) -> str | list[str]:
    """Ids for the pipe: one NUL-joined string (one copy, not a pickled object per id), or a list should
    an id contain a NUL (JSON allows it)."""
    if len(ids) < 2:
        return list(ids)
    joined = _SEP.join(ids)
    return joined if joined.count(_SEP) == len(ids) - 1 else list(ids)


def _unpack_ids(packed: str | list[str]) -> set[str]:
    return set(packed) if isinstance(packed, list) else set(packed.split(_SEP))


class _Job:
    """One scanner, run inline or in a forked worker process, in three steps: (1) scan -> counts (the
    span of tick times decides the ledger scope); (2) price -> unique ids and priced aggregates; (3) the
    ids to give up and the missing ids -> :class:`_Part`. In a worker process step 2 overlaps the parent's
    ledger reads."""

    def __init__(self, scanner: _Scanner, fork: bool) -> None:
        self.scanner = scanner
        self.proc: Any = None
        self.conn: Any = None
        if fork:
            ctx = multiprocessing.get_context("fork")
            parent, child = ctx.Pipe(duplex=True)
            self.conn = parent
            self.proc = ctx.Process(target=self._child, args=(child,), daemon=True, name="edgebill-replay")
            self.proc.start()
            child.close()

    def _child(self, conn: Any) -> None:
        gc.disable()  # a short-lived process holding millions of acyclic objects: collections only cost time
        sc = self.scanner
        try:
            c0 = time.process_time()
            asyncio.run(sc.scan())
            c1 = time.process_time()
            conn.send(("scanned", sc.counts))
            sc.price()
            c2 = time.process_time()
            conn.send(("ids", _pack_ids(sc.seen), sc.derived))
            c3 = time.process_time()
            log.debug("replay worker cpu: scan %.3fs, price %.3fs, send ids %.3fs", c1 - c0, c2 - c1, c3 - c2)
            drop, missing = conn.recv()
            conn.send(("part", sc.finish(drop, missing)))
        except BaseException as exc:  # report anything to the parent instead of dying silently
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        finally:
            conn.close()

    def scanned(self) -> ScanCounts:
        if self.proc is None:
            asyncio.run(self.scanner.scan())
            return self.scanner.counts
        counts: ScanCounts = self._recv("scanned")[1]
        return counts

    def ids(self) -> tuple[AbstractSet[str], Aggregates]:
        if self.proc is None:
            self.scanner.price()
            return self.scanner.seen.keys(), self.scanner.derived
        _, ids, derived = self._recv("ids")
        return _unpack_ids(ids), derived

    def part(self, drop: set[str], missing: set[str]) -> _Part:
        if self.proc is None:
            return self.scanner.finish(drop, missing)
        self.conn.send((drop, missing))
        part: _Part = self._recv("part")[1]
        self.proc.join(timeout=30)
        return part

    def _recv(self, want: str) -> tuple[Any, ...]:
        while not self.conn.poll(0.2):
            if not self.proc.is_alive():
                raise ReplayError(f"replay worker process {self.proc.pid} exited with {self.proc.exitcode}")
        try:
            msg: tuple[Any, ...] = self.conn.recv()
        except EOFError as exc:
            raise ReplayError(f"replay worker process {self.proc.pid} went away") from exc
        if msg[0] == "error":
            raise ReplayError(f"replay worker process {self.proc.pid} failed: {msg[1]}")
        if msg[0] != want:
            raise ReplayError(f"replay worker process sent {msg[0]!r}, expected {want!r}")
        return msg

    def stop(self) -> None:
        """Stop the worker process if it is still running (this replay started it), close the pipe."""
        if self.proc is not None:
            if self.proc.is_alive():
                self.proc.terminate()
            self.proc.join(timeout=10)
            self.proc.close()
            self.proc = None
        if self.conn is not None:
            self.conn.close()
            self.conn = None


# ============================================================================================ the report


@dataclass(frozen=True, slots=True)
class KeyDiff:
    """One (org, bucket, meter): units re-derived from the topic vs in the ledger, in meter units
    (MB-s for the unified meter, seconds for tier meters)."""

    org_id: str
    bucket_start: int
    meter: str
    derived_units: int  # from the unique ticks of the range
    billed_units: int  # Σ meter_events.units, every revision and state
    open_units: int  # samples in the ledger not closed yet (priced the same way)
    missing_units: int  # of the ticks missing from the ledger: what --apply adds
    compared: bool  # False: the bucket is not wholly inside the range, only missing units are shown

    @property
    def diff_units(self) -> int:
        """Re-derived minus accounted for (billed + open); 0 when the ledger agrees."""
        return self.derived_units - self.billed_units - self.open_units if self.compared else 0

    @property
    def explained(self) -> bool:
        """Applying the missing ticks would make the ledger agree exactly."""
        return not self.compared or self.diff_units == self.missing_units

    def to_wire(self) -> dict[str, Any]:
        div = meter_unit_divisor(self.meter)
        return {
            "org_id": self.org_id,
            "bucket_start": self.bucket_start,
            "meter": self.meter,
            "compared": self.compared,
            "derived_units": self.derived_units,
            "billed_units": self.billed_units,
            "open_units": self.open_units,
            "diff_units": self.diff_units,
            "missing_units": self.missing_units,
            "derived": _exact(self.derived_units, div),
            "billed": _exact(self.billed_units, div),
            "diff": _exact(self.diff_units, div),
            "missing": _exact(self.missing_units, div),
        }


@dataclass(frozen=True, slots=True)
class OrgMeterDiff:
    """One (org, meter) over the compared buckets: units, and values (the ledger's as assigned to its rows)."""

    org_id: str
    meter: str
    derived_units: int
    billed_units: int
    open_units: int
    billed_value: Decimal  # Σ meter_events.value of the rows

    @property
    def derived_value(self) -> Decimal:
        return round_value(self.derived_units, meter_unit_divisor(self.meter))

    @property
    def value_diff(self) -> Decimal:
        return self.derived_value - self.billed_value

    @property
    def units_agree(self) -> bool:
        return self.derived_units == self.billed_units + self.open_units

    def to_wire(self) -> dict[str, Any]:
        return {
            "org_id": self.org_id,
            "meter": self.meter,
            "derived_units": self.derived_units,
            "billed_units": self.billed_units,
            "open_units": self.open_units,
            "derived_value": _dec(self.derived_value),
            "billed_value": _dec(self.billed_value),
            "value_diff": _dec(self.value_diff),
            "units_agree": self.units_agree,
        }


def _exact(units: int, divisor: int) -> str:
    """Exact decimal of units/divisor (1/1024 has 10 decimals), without trailing zeros."""
    return _dec(Decimal(units) / divisor)


def _dec(value: Decimal) -> str:
    return format(value.normalize(), "f") if value else "0"


@dataclass
class ReplayReport:
    topic: str
    bucket_seconds: int
    ranges: list[PartitionRange]
    complete: bool  # the offset range is the whole topic: unit comparison possible
    window_ms: tuple[int | None, int | None]  # the tick filter [since, until) in ms (None: unbounded)
    compared_buckets: tuple[int, int] | None  # first, last bucket start compared (None: none)
    counts: dict[str, int]
    rejected: dict[str, int]
    unbilled: dict[str, list[int]]  # reason -> [samples, mb_seconds] re-derived
    keys: list[KeyDiff]  # keys with a difference or missing units
    org_meters: list[OrgMeterDiff]  # (org, meter) whose units or values differ
    missing_ids: list[str]
    extra_ids: list[str]
    jobs: int
    seconds: float
    now_ms: int

    @property
    def differing_keys(self) -> list[KeyDiff]:
        return [k for k in self.keys if k.diff_units]

    @property
    def clean(self) -> bool:
        """No difference: nothing missing, nothing extra, every compared (org, bucket, meter) agrees."""
        return not self.missing_ids and not self.extra_ids and not self.differing_keys

    def to_wire(self, limit: int | None = None) -> dict[str, Any]:
        lim = limit or None
        lo, hi = self.window_ms
        return {
            "topic": self.topic,
            "clean": self.clean,
            "complete_range": self.complete,
            "ranges": [
                {"partition": r.partition, "from": r.start, "to": r.end, "log_start": r.log_start, "log_end": r.log_end}
                for r in self.ranges
            ],
            "window": {"since_ms": lo, "until_ms": hi},
            "compared_buckets": list(self.compared_buckets) if self.compared_buckets else None,
            "counts": self.counts,
            "rejected": self.rejected,
            "unbilled": {k: {"samples": v[0], "mb_seconds": v[1]} for k, v in sorted(self.unbilled.items())},
            "differences": [k.to_wire() for k in self.keys[:lim]],
            "org_meters": [o.to_wire() for o in self.org_meters[:lim]],
            "missing_ids": self.missing_ids[:lim],
            "extra_ids": self.extra_ids[:lim],
            "jobs": self.jobs,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class ReplayResult:
    report: ReplayReport
    missing: list[SourcedTick]  # the ticks --apply writes, in (partition, offset) order


# ============================================================================================ the run


def run_replay(
    ledger: Ledger,
    bootstrap: str,
    spec: ReplaySpec,
    *,
    bucket_seconds: int,
    jobs: int | None = None,
    inline_below: int = INLINE_BELOW_RECORDS,
) -> ReplayResult:
    """Re-derive ``spec``'s range and compare it with the ledger. Read-only on Kafka and on the ledger.

    ``jobs``: worker processes for the scan (default: one per CPU, at most 8; ranges of fewer than
    ``inline_below`` records are scanned in this process).
    """
    t0 = time.perf_counter()
    now_ms = time.time_ns() // 1_000_000
    _check_bucket_seconds(ledger, bucket_seconds)
    ranges, complete = asyncio.run(plan_ranges(bootstrap, spec))
    lo, hi = spec.window_ms(bucket_seconds)
    with ledger.engine.connect() as conn:
        pricer = load_pricer(conn, bucket_seconds, hi)
    total = sum(r.size for r in ranges)
    n_jobs = min(MAX_JOBS, max(1, jobs if jobs is not None else (os.cpu_count() or 1)))
    fork = n_jobs > 1 and total >= inline_below and "fork" in multiprocessing.get_all_start_methods()
    if not fork:
        n_jobs = 1
    t_plan = time.perf_counter()
    if fork:
        # Children inherit this process: no pooled DB connection may cross the fork, nor buffered output.
        ledger.engine.dispose()
        sys.stdout.flush()
        sys.stderr.flush()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # millions of acyclic objects (ticks, ids): the collector would only rescan them, repeatedly
    try:
        scanners = [_Scanner(bootstrap, spec.topic, sl, (lo, hi), pricer) for sl in _slices(ranges, n_jobs)]
        sd = _scan_and_diff(ledger, scanners, fork, lo, hi, None if complete else ranges, bucket_seconds)
        del scanners  # every tick but the missing ones is freed here, before the collector runs again
        t_diff = time.perf_counter()
        compared = _compared_buckets(spec, sd.counts, bucket_seconds) if complete else None
        keys, n_compared, org_meters, unbilled = _compare(ledger, pricer, sd.derived, sd.missed, compared)
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
    }
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
        window_ms=(None if lo == _NO_LOW else lo, None if hi == _NO_HIGH else hi),
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
    )
    return ReplayResult(report, [SourcedTick(t, p, o) for t, p, o in sd.missing_ticks])


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
) -> _ScanDiff:
    """Run the scanners (worker processes when ``fork``) through their three steps against the ledger's ids."""
    jobs: list[_Job] = []
    try:
        for sc in scanners:
            jobs.append(_Job(sc, fork))
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
            ledger_read = pool.submit(_ledger_ids, ledger, id_lo, id_hi, lo, hi, partial)
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


def _check_bucket_seconds(ledger: Ledger, bucket_seconds: int) -> None:
    with ledger.engine.connect() as conn:
        got = conn.execute(
            select(counters.c.value).where(counters.c.name == "config.bucket_seconds")
        ).scalar_one_or_none()
    if got is not None and got != bucket_seconds:
        raise LedgerError(
            f"this ledger was built with EDGEBILL_BUCKET_SECONDS={got}; replaying with {bucket_seconds} "
            "would not line up with its buckets"
        )


def _id_scope(lo: int, hi: int, counts: ScanCounts, size: int) -> tuple[int | None, int | None]:
    """Bucket starts [first, last] of the samples the tick-level comparison looks at."""
    first = _floor(lo // 1000, size) if lo != _NO_LOW else None
    last = _floor((hi - 1) // 1000, size) if hi != _NO_HIGH else None
    if counts.min_ts <= counts.max_ts:  # some tick was selected: its buckets bound an open side
        if first is None:
            first = _floor(counts.min_ts // 1000, size)
        if last is None:
            last = _floor(counts.max_ts // 1000, size)
    return first, last


def _compared_buckets(spec: ReplaySpec, counts: ScanCounts, size: int) -> tuple[int, int] | None:
    """[first, last] bucket starts lying wholly inside the window (open sides: the ticks' own span)."""
    first: int | None = None
    last: int | None = None
    if spec.since_ms is not None:
        first = -(-spec.since_ms // (size * 1000)) * size  # ceil to a bucket start
    if spec.bucket_from is not None:
        b = _floor(spec.bucket_from, size)
        first = b if first is None else max(first, b)
    if spec.until_ms is not None:
        last = _floor(spec.until_ms // 1000 - size, size)  # the bucket must end by until
    if spec.bucket_to is not None:
        b = _floor(spec.bucket_to, size)
        last = b if last is None else min(last, b)
    if counts.min_ts <= counts.max_ts:
        if first is None:
            first = _floor(counts.min_ts // 1000, size)
        if last is None:
            last = _floor(counts.max_ts // 1000, size)
    if first is None or last is None or first > last:
        return None
    return first, last


def _ledger_ids(
    ledger: Ledger,
    first: int | None,
    last: int | None,
    lo: int,
    hi: int,
    partial: Sequence[PartitionRange] | None,
) -> tuple[set[str], set[str]]:
    """(ids of the samples in scope, the ids among them that the range should hold).

    Scope: buckets [first, last] and ts in [lo, hi). With a partial offset range, a sample belongs to the
    range only when the offset it was ingested from lies in a range read. The ids come back as one
    separator-joined string (an order of magnitude faster than a row per id); should an id contain the
    separator, the count tells and the rows are read instead.
    """
    if first is None or last is None:
        return set(), set()
    us = usage_samples.c
    conds = [us.bucket_start >= first, us.bucket_start <= last]
    if lo != _NO_LOW:
        conds.append(us.ts_ms >= lo)
    if hi != _NO_HIGH:
        conds.append(us.ts_ms < hi)
    with ledger.engine.connect() as conn:
        if partial is None:
            sep = "\x00" if conn.dialect.name == "sqlite" else "\x01"  # PostgreSQL text cannot hold NUL
            agg = (
                func.group_concat(us.id, func.char(0))
                if conn.dialect.name == "sqlite"
                else func.string_agg(us.id, func.chr(1))
            )
            n, joined = conn.execute(select(func.count(), agg).where(*conds)).one()
            ids = set(joined.split(sep)) if joined else set()
            if len(ids) != n:
                ids = set(conn.execute(select(us.id).where(*conds)).scalars())
            return ids, ids
        rows = conn.execute(select(us.id, us.src_partition, us.src_offset).where(*conds)).all()
    spans: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for r in partial:
        spans[r.partition].append((r.start, r.end))
    ids = {r[0] for r in rows}
    inside = {r[0] for r in rows if any(a <= r[2] < b for a, b in spans.get(r[1], ()))}
    return ids, inside


def _compare(
    ledger: Ledger,
    pricer: Pricer,
    derived: Aggregates,
    missed: Aggregates,
    compared: tuple[int, int] | None,
) -> tuple[list[KeyDiff], int, list[OrgMeterDiff], dict[str, list[int]]]:
    """Per (org, bucket, meter) and per (org, meter): the re-derived usage against the ledger's."""
    billed: dict[Key, int] = {}
    values: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    opened = Aggregates()
    if compared is not None:
        first, last = compared
        me = meter_events.c
        us = usage_samples.c
        with ledger.engine.connect() as conn:
            for r in conn.execute(
                select(me.org_id, me.bucket_start, me.meter, me.units, me.value).where(
                    me.bucket_start >= first, me.bucket_start <= last
                )
            ):
                k = (r[0], int(r[1]), r[2])
                billed[k] = billed.get(k, 0) + int(r[3])
                values[(r[0], r[2])] += Decimal(r[4])
            open_ticks = [
                Tick(r[0], r[1], r[2], r[3], "", int(r[4]), 0, int(r[5]), int(r[6]))
                for r in conn.execute(
                    select(us.id, us.org_id, us.sandbox_id, us.worker_id, us.memory_mb, us.interval_s, us.ts_ms).where(
                        not_aggregated(), us.bucket_start >= first, us.bucket_start <= last
                    )
                )
            ]
        pricer.price(open_ticks, opened)

    def inside(b: int) -> bool:
        return compared is not None and compared[0] <= b <= compared[1]

    keys: list[KeyDiff] = []
    n_compared = 0
    per_om: dict[tuple[str, str], list[int]] = {}
    all_keys = set(billed) | set(opened.billable) | set(missed.billable)
    all_keys |= {k for k in derived.billable if inside(k[1])}
    for k in sorted(all_keys):
        org, b, meter = k
        d = derived.billable.get(k, (0, 0))[0]
        bl = billed.get(k, 0)
        op = opened.billable.get(k, (0, 0))[0]
        ms = missed.billable.get(k, (0, 0))[0]
        kd = KeyDiff(org, b, meter, d, bl, op, ms, inside(b))
        if kd.compared:
            n_compared += 1
            om = per_om.setdefault((org, meter), [0, 0, 0])
            om[0] += d
            om[1] += bl
            om[2] += op
        if kd.diff_units or kd.missing_units:
            keys.append(kd)
    org_meters = []
    for (org, meter), (d, bl, op) in sorted(per_om.items()):
        om_diff = OrgMeterDiff(org, meter, d, bl, op, values.get((org, meter), Decimal(0)))
        if not om_diff.units_agree or om_diff.value_diff:
            org_meters.append(om_diff)
    unbilled: dict[str, list[int]] = {}
    for (_, _, reason), (n, mbs) in derived.unbilled.items():
        slot = unbilled.setdefault(reason, [0, 0])
        slot[0] += n
        slot[1] += mbs
    return keys, n_compared, org_meters, unbilled


# ============================================================================================ apply


@dataclass(frozen=True, slots=True)
class ApplyResult:
    offered: int  # missing ticks written through write_ticks
    inserted: int  # new samples (the rest were present by then: e.g. the worker ingested them meanwhile)
    chunks: int


def apply_problems(result: ReplayResult, *, now_ms: int | None = None) -> list[str]:
    """Why ``--apply`` should not write these ticks (empty: safe). ``--force`` overrides.

    * A missing tick whose bucket ended more than Stripe's 35 days ago would only become an ``expired`` row.
    * A compared (org, bucket, meter) with missing ticks whose difference is not exactly their units: the
      ledger already accounts for part of them (e.g. samples deleted after their bucket was billed) or
      prices differently; writing them would not make it agree, and could bill twice.
    """
    rep = result.report
    now_s = (now_ms if now_ms is not None else time.time_ns() // 1_000_000) // 1000
    problems: list[str] = []
    size = rep.bucket_seconds
    oldest_ok = now_s - STRIPE_MAX_AGE_SECONDS + 300  # Ledger._write_row: bucket_end below this -> expired
    buckets = sorted({_floor(st.tick.ts_ms // 1000, size) for st in result.missing})
    expired = [b for b in buckets if b + size < oldest_ok]
    if expired:
        n = sum(1 for st in result.missing if _floor(st.tick.ts_ms // 1000, size) + size < oldest_ok)
        problems.append(
            f"{n} missing tick(s) in {len(expired)} bucket(s) from {_iso(expired[0])} to {_iso(expired[-1])} are "
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
    ``ON CONFLICT (id) DO NOTHING`` (a tick the worker ingested meanwhile is absorbed); (2) bump the
    counters ``ticks.ingested`` / ``ticks.duplicate`` and ``replay.ticks_offered``; commit. Nothing else is
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
    inserted = chunks = 0
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
        chunks += 1
    log.info(
        "replay applied %d missing tick(s): %d inserted, %d already present",
        len(ticks),
        inserted,
        len(ticks) - inserted,
    )
    return ApplyResult(offered=len(ticks), inserted=inserted, chunks=chunks)


# ============================================================================================ output


def _iso(ts_s: int) -> str:
    return datetime.fromtimestamp(ts_s, UTC).strftime("%Y-%m-%d %H:%MZ")


def render_table(report: ReplayReport, limit: int = 50) -> list[str]:
    """The human-readable report, as lines."""
    c = report.counts
    out = [
        f"topic {report.topic}: {len(report.ranges)} partition(s), offsets "
        + ", ".join(f"{r.partition}:[{r.start},{r.end})" for r in report.ranges)
        + ("" if report.complete else "  (partial offset range: per-bucket units not compared)"),
    ]
    lo, hi = report.window_ms
    if lo is not None or hi is not None:
        out.append(
            f"tick window: [{'-' if lo is None else _iso(lo // 1000)}, {'-' if hi is None else _iso(hi // 1000)})"
        )
    if report.compared_buckets:
        a, b = report.compared_buckets
        out.append(f"buckets compared: {_iso(a)} .. {_iso(b)} (bucket starts, inclusive)")
    out.append(
        f"records {c['records']:,}  ticks read {c['ticks_read']:,}  selected {c['selected']:,}  "
        f"unique {c['unique']:,}  duplicates {c['duplicates']:,}  rejected {c['rejected']:,}  "
        f"other types {c['ignored_type']:,}"
    )
    if report.rejected:
        out.append("rejected by reason: " + ", ".join(f"{k}={v}" for k, v in report.rejected.items()))
    if report.unbilled:
        out.append("counted, not billed: " + ", ".join(f"{k}={v[0]} ticks" for k, v in sorted(report.unbilled.items())))
    out.append(
        f"missing from ledger {c['missing_from_ledger']:,}  extra in ledger {c['extra_in_ledger']:,}  "
        f"(org, bucket, meter) compared {c['compared_keys']:,}, differing {c['differing_keys']:,}"
    )
    if report.keys:
        out.append("")
        out.append(
            f"{'org':<20} {'bucket':<17} {'meter':<34} {'re-derived':>16} {'billed':>16} {'open':>12} "
            f"{'difference':>14} {'missing':>14}"
        )
        for k in report.keys[:limit]:
            w = k.to_wire()
            out.append(
                f"{k.org_id:<20} {_iso(k.bucket_start):<17} {k.meter:<34} {w['derived']:>16} {w['billed']:>16} "
                f"{_exact(k.open_units, meter_unit_divisor(k.meter)):>12} "
                f"{w['diff'] if k.compared else 'n/c':>14} {w['missing']:>14}"
            )
        if len(report.keys) > limit:
            out.append(f"... {len(report.keys) - limit} more (--limit 0 shows all)")
        out.append("(GB-s for the unified meter, seconds for tier meters; n/c = bucket not wholly in the range)")
    if report.org_meters:
        out.append("")
        out.append(f"{'org':<20} {'meter':<34} {'re-derived value':>18} {'billed value':>18} {'difference':>14}")
        for o in report.org_meters[:limit]:
            note = "" if o.units_agree else "  (units differ)"
            out.append(
                f"{o.org_id:<20} {o.meter:<34} {_dec(o.derived_value):>18} {_dec(o.billed_value):>18} "
                f"{_dec(o.value_diff):>14}{note}"
            )
    for label, ids in (("missing from ledger", report.missing_ids), ("extra in ledger", report.extra_ids)):
        if ids:
            shown = ids[:limit]
            more = f" ... (+{len(ids) - len(shown)})" if len(ids) > len(shown) else ""
            out.append(f"{label}: " + ", ".join(shown) + more)
    out.append("")
    out.append(
        "no difference"
        if report.clean
        else f"DIFFERENCES: {c['missing_from_ledger']} missing tick(s), {c['extra_in_ledger']} extra sample(s), "
        f"{c['differing_keys']} (org, bucket, meter) differing"
    )
    out.append(f"({report.seconds:.2f}s, {report.jobs} scan process(es))")
    return out
