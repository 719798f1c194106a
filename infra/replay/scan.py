"""Replay's scan: group-less consumers read slices of the topic, parse every record with the ingest parser,
filter by the tick window, dedup by id and price as they go; big ranges in forked worker processes."""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import time
import traceback
from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any, Final

from infra.replay.plan import NO_HIGH, NO_LOW, PartitionRange, ReplayError
from infra.replay.price import Aggregates, Groups, Pricer
from models.ticks import FUTURE_TOLERANCE_MS, Tick, parse_record

__all__ = ["STALL_SECONDS", "ScanCounts"]

log = logging.getLogger(__name__)

STALL_SECONDS: Final = 30.0  # no record for this long while offsets remain to be read: give up, loudly


@dataclass(slots=True)
class ScanCounts:
    records: int = 0
    ticks: int = 0  # valid ticks parsed in the offset range (duplicates included)
    outside: int = 0  # valid ticks outside the time / bucket window
    duplicates: int = 0  # selected ticks whose id was seen before (within one scanner)
    ignored: int = 0  # envelopes of another type
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> count
    min_ts: int = NO_HIGH
    max_ts: int = NO_LOW

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
        self,
        bootstrap: str,
        topic: str,
        slices: Sequence[PartitionRange],
        window: tuple[int, int],
        pricer: Pricer,
        *,
        orgs: frozenset[str] | None = None,
        counter: Any = None,
    ) -> None:
        """``orgs``: only ticks of these orgs are selected (the others count as outside the window).
        ``counter``: an object with an integer ``value`` the scan adds the records it read to (a shared
        ``multiprocessing.Value`` when the scan runs in a worker process); ``on_progress`` is called after
        each batch when the scan runs in this process."""
        self.pricer = pricer
        self.orgs = orgs
        self.counter = counter
        self.on_progress: Any = None
        self.groups = Groups()
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
        orgs = self.orgs
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
                if ts < lo or ts >= hi or (orgs is not None and t.org_id not in orgs):
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
        if self.counter is not None:
            self.counter.value += n_rec
            if self.on_progress is not None:
                self.on_progress()

    def price(self) -> None:
        self.derived = self.pricer.finish(self.groups)
        self.groups = Groups()

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

    def __init__(self, scanner: _Scanner, fork: bool, on_wait: Any = None) -> None:
        """``on_wait``: called while the parent waits for a worker process (the progress display)."""
        self.scanner = scanner
        self.on_wait = on_wait
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
            if self.on_wait is not None:
                self.on_wait()
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
