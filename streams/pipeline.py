"""The worker's behaviour without Faust: parse a batch, write it, close buckets, send rows.

:class:`Pipeline` is what :mod:`streams.wiring` calls from its agents and timers, and what tests drive:
ingest (:func:`prepare_ingest`, :meth:`Pipeline.write_step`), policies, closing, sending (only while the
cutover state in force is live) and the cutover (:meth:`Pipeline.record_control`,
:meth:`Pipeline.control_tick`). The closer and the sender run in a thread, one at a time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import Final

from models.cutover import CONTROL_KEY, CutoverState
from models.errors import InvalidRecord
from models.policy import OrgPolicy
from models.retention import OLDER_THAN_RETENTION, horizon_ms
from models.ticks import FUTURE_TOLERANCE_MS, locate_envelope, parse_record
from models.watermark import watermark
from sinks.ledger import (
    CONFLICTING_DUPLICATE,
    CloseResult,
    Conflict,
    CutoverView,
    EffectiveCutover,
    Ledger,
    SourcedTick,
)
from sinks.outbox_sender import OutboxSender, SendReport
from sinks.parity import ParityStore
from sinks.reconcile.run import Reconciliation
from sinks.retention import CompactResult, Retention
from sinks.webhooks.provisioning import StripeProvisioner
from streams.config import WorkerConfig
from streams.health import Health, RateLimitedLog, ledger_write_failures_total, ticks_refused_total
from streams.records import DeadLetter, Record, dead_letter, first_line, run_logged

__all__ = [
    "Deps",
    "IngestBatch",
    "Pipeline",
    "WritePlan",
    "is_record_error",
    "prepare_ingest",
]

log = logging.getLogger(__name__)

REFUSED: Final = "ledger_refused"  # dead-letter reason of a tick the database refused


@dataclass(slots=True)
class IngestBatch:
    ticks: list[SourcedTick] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    progress: dict[int, tuple[int, int | None]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    records: Sequence[Record] = ()  # what the batch was parsed from (to dead-letter a refused tick)
    topic: str = ""
    # Every tick passed the parser's limits (prepare_ingest): the ledger need not check them again.
    validated: bool = False


def prepare_ingest(records: Sequence[Record], topic: str, now_ms: int, horizon_s: int = 0) -> IngestBatch:
    """Parse a batch of ``usage-ticks`` records: good ticks, dead letters, per-partition progress. Pure.

    A tick before the dedup horizon ``horizon_s`` (the one the ledger last reported, :mod:`models.retention`)
    is dead-lettered as ``older_than_retention`` here; the ledger checks again against its own horizon when
    it writes (:meth:`sinks.ledger.Ledger.write_ticks`).
    """
    out = IngestBatch(records=records, topic=topic, validated=True)
    rejected = ignored = read = too_old = 0
    max_ts = now_ms + FUTURE_TOLERANCE_MS
    oldest = horizon_ms(horizon_s)
    ticks_append, ticks_extend = out.ticks.append, out.ticks.extend
    new = tuple.__new__  # a NamedTuple's own __new__ is a Python function: too dear once per tick
    progress = out.progress
    for rec in records:
        parsed = parse_record(rec.value, max_ts_ms=max_ts)
        read += 1
        part, off = rec.partition, rec.offset
        newest: int | None = None
        if parsed.ticks:
            times = [t[8] for t in parsed.ticks]  # ts_ms
            newest = max(times)
            if min(times) >= oldest:  # the common case, in bulk: SourcedTicks built in C
                ticks_extend(map(new, repeat(SourcedTick), zip(parsed.ticks, repeat(part), repeat(off))))
            else:
                for tick in parsed.ticks:
                    if tick.ts_ms < oldest:
                        raw, index = locate_envelope(rec.value, tick.id)
                        out.dead.append(
                            dead_letter(rec, topic, OLDER_THAN_RETENTION, raw, index, detail=_too_old(horizon_s))
                        )
                        too_old += 1
                        continue
                    ticks_append(SourcedTick(tick, part, off))
        for r in parsed.rejected:
            out.dead.append(dead_letter(rec, topic, r.reason, r.raw, r.index))
            rejected += 1
        ignored += parsed.ignored
        prev = progress.get(part)
        if prev is None:
            progress[part] = (off, newest)
        else:
            ev = prev[1] if newest is None else (newest if prev[1] is None else max(prev[1], newest))
            progress[part] = (off if off > prev[0] else prev[0], ev)
    out.counts = {"records.read": read, "records.rejected": rejected, "records.ignored_type": ignored}
    if too_old:
        out.counts[f"ticks.{OLDER_THAN_RETENTION}"] = too_old
    return out


def _too_old(horizon_s: int) -> str:
    return (
        f"the tick is before the ledger's dedup horizon (unix s {horizon_s}): retention dropped the ticks of its "
        "bucket, so it could be a copy of one of them, and Stripe would refuse it as older than 35 days"
    )


# DB-API exception classes (sqlite3, psycopg, and SQLAlchemy's wrappers of them, which have the same names)
# that say "this data cannot be stored", as opposed to "the database cannot be used now".
_RECORD_ERRORS: frozenset[str] = frozenset({"DataError", "IntegrityError", "TickRefused"})


def is_record_error(exc: BaseException) -> bool:
    """Whether a failed ledger write is about the data written (isolate and dead-letter the record) rather
    than the database (down, locked, full, misconfigured: retry, never dead-letter).

    Record errors: the DB-API's ``DataError`` and ``IntegrityError`` (a value too long, out of range, a NUL,
    a constraint), raised raw by the driver or wrapped by SQLAlchemy, the ledger's own
    :class:`models.errors.TickRefused`, and the driver's own refusal to encode
    a value (``UnicodeError``, ``OverflowError``). Everything else, ``OperationalError`` and
    ``InterfaceError`` (connection lost, database locked, disk full) and any unknown error included, is not.
    """
    orig = getattr(exc, "orig", None)  # sqlalchemy.exc.DBAPIError / StatementError carry the driver's error
    for e in (exc, orig) if isinstance(orig, BaseException) else (exc,):
        if isinstance(e, UnicodeError | OverflowError):
            return True
        if any(cls.__name__ in _RECORD_ERRORS for cls in type(e).__mro__):
            return True
    return False


def describe_error(exc: BaseException) -> str:
    """``ClassName: first line`` of the driver's error (what the database said), for a dead letter."""
    orig = getattr(exc, "orig", None)
    e = orig if isinstance(orig, BaseException) else exc
    return f"{type(e).__name__}: {first_line(e)}"


@dataclass(slots=True)
class WritePlan:
    """Where the ledger write of one :class:`IngestBatch` stands; :meth:`Pipeline.write_step` advances it.

    Resumable: a step that fails because the database is unavailable raises, leaves the plan as it was,
    and the next step continues from there (nothing is written twice except what a crash re-delivers).
    """

    batch: IngestBatch
    whole: bool = True  # still trying the batch in one transaction
    parts: list[list[SourcedTick]] = field(default_factory=list)  # left to write (a stack) once split
    refused: list[tuple[SourcedTick, str]] = field(default_factory=list)  # ticks the database refused, why
    too_old: list[SourcedTick] = field(default_factory=list)  # ticks before the ledger's dedup horizon
    conflicts: list[Conflict] = field(default_factory=list)  # ids stored already with another payload
    written: bool = False  # every tick is written or refused (progress and counters still to record)

    @property
    def isolating(self) -> bool:
        return not self.whole


def _halves(ticks: list[SourcedTick]) -> list[list[SourcedTick]]:
    """``ticks`` split in two, first half on top of the stack (written first)."""
    mid = len(ticks) // 2
    return [ticks[mid:], ticks[:mid]] if mid else [ticks]


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass
class Deps:
    """Everything the pipeline needs, passed in (the Faust app is the only global).

    ``cutover`` is built from the ledger and the environment's bootstrap state: the one object through which
    the worker's code asks for the cutover state in force (the sender, ``/healthz``, webhook provisioning).
    """

    config: WorkerConfig
    ledger: Ledger
    sender: OutboxSender | None
    clock_ms: Callable[[], int] = field(default=_wall_clock_ms)
    owner: str = field(default_factory=_owner)
    provisioner: StripeProvisioner | None = None  # Stripe writes of the webhook agent (authority edge)
    reconciliation: Reconciliation | None = None  # Stripe reads of the scheduled reconciliation
    cutover: CutoverView = field(init=False)

    def __post_init__(self) -> None:
        self.cutover = CutoverView(self.ledger, self.config.close.bootstrap)


class Pipeline:
    """The worker's behaviour, independent of Faust's decorators so it can be driven by tests."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps
        cfg = deps.config
        t = cfg.topics
        self.ticks_topic = t.ticks
        self.dlq_topic = t.dlq
        self.policy_topic = t.policy
        self.policy_dlq_topic = t.policy_dlq
        self.scale_topic = t.scale
        self.control_topic = t.control
        self.close_cfg = cfg.close
        # Every input the closer must have read before a bucket closes: ticks (event time), and the two
        # topics that decide *how* a tick is billed — policies (plan, mode) and the cell's scale events
        # (sandbox ownership, for zombie ticks). Those two hold the watermark while they lag.
        n = cfg.kafka.partitions
        self.partitions: dict[str, int] = {self.ticks_topic: n, self.policy_topic: n, self.scale_topic: n}
        self._close_lock = asyncio.Lock()
        self._send_lock = asyncio.Lock()
        self._retention_lock = asyncio.Lock()
        self.last_retention: CompactResult | None = None
        self.last_close: CloseResult | None = None
        self.last_send: SendReport | None = None
        self.health = Health()
        self.log_throttle = RateLimitedLog(log)
        self._applied_seq: int | None = None  # the cutover state entry this worker applies and acknowledged
        # The ledger's dedup horizon as its last write reported it: prepare_ingest refuses ticks before it.
        self.horizon_s = 0
        self._acked_at = 0.0

    # -- ingest -------------------------------------------------------------------------------

    def write_batch(self, batch: IngestBatch) -> tuple[list[SourcedTick], list[Conflict]]:
        """Write a prepared batch to the ledger (ticks + progress + counters in one transaction); returns the
        ticks the ledger refused as before its dedup horizon and the conflicting duplicates (both to
        dead-letter before the offsets are committed)."""
        led = self.deps.ledger
        if batch.ticks:
            res = led.write_ticks(
                self.ticks_topic,
                batch.ticks,
                bucket_seconds=self.close_cfg.bucket_seconds,
                progress=batch.progress,
                counts=batch.counts,
                validated=batch.validated,
            )
            self.horizon_s = max(self.horizon_s, res.horizon_s)
            return list(res.too_old), list(res.conflicts)
        led.record_progress(self.ticks_topic, batch.progress, batch.counts)
        return [], []

    def write_step(self, plan: WritePlan) -> None:
        """Write ``plan``'s ticks, isolating any the database refuses; blocking (run it in a thread).

        1. The whole batch in one transaction (:meth:`write_batch`): ticks, progress, counters. Done.
        2. If the database refuses it for a record's sake (:func:`is_record_error`), split it in halves and
           write each half without progress or counters, splitting again what is refused, down to single
           ticks: those are the refused ones (``plan.refused``, with the database's reason). The others are
           written, ``log2(n)`` transactions per refused tick.
        3. ``plan.written`` is then set: the caller dead-letters the refused ticks (:meth:`refused_letters`)
           and only then records progress and counters (:meth:`finish_isolated`), then commits offsets.

        Raises whatever is not a record error (the database is unavailable): the plan keeps its place, and
        calling again resumes. A crash in step 2 or 3 re-delivers the batch: written ticks are duplicates by
        id, refused ones are isolated and dead-lettered again (a dead letter may be written twice).
        """
        if plan.whole and self._write_whole(plan):
            return
        self._write_parts(plan)
        plan.written = True

    def _write_whole(self, plan: WritePlan) -> bool:
        """Step 1: whether the batch is written in one transaction; on a record error, split it (step 2)."""
        try:
            too_old, conflicts = self.write_batch(plan.batch)
        except Exception as exc:
            if not is_record_error(exc):
                raise
            ledger_write_failures_total.labels("refused").inc()
            ticks = plan.batch.ticks
            self.log_throttle.failure(
                "ledger refused a batch",
                "ingest: the ledger refused a batch of %d tick(s) (%s); isolating the refused one(s)",
                len(ticks),
                describe_error(exc),
            )
            plan.whole = False
            plan.parts = _halves(ticks)
            return False
        plan.too_old.extend(too_old)
        plan.conflicts.extend(conflicts)
        plan.written = True
        return True

    def _write_parts(self, plan: WritePlan) -> None:
        """Step 2: write the parts left, halving a refused one down to single (refused) ticks."""
        led = self.deps.ledger
        while plan.parts:
            part = plan.parts[-1]
            try:
                res = led.write_ticks(
                    self.ticks_topic,
                    part,
                    bucket_seconds=self.close_cfg.bucket_seconds,
                    progress={},
                    validated=plan.batch.validated,
                )
            except Exception as exc:
                if not is_record_error(exc):
                    raise
                plan.parts.pop()
                if len(part) == 1:
                    plan.refused.append((part[0], describe_error(exc)))
                else:
                    plan.parts.extend(_halves(part))
                continue
            plan.parts.pop()
            plan.too_old.extend(res.too_old)
            plan.conflicts.extend(res.conflicts)
            self.horizon_s = max(self.horizon_s, res.horizon_s)

    def refused_letters(self, plan: WritePlan) -> list[DeadLetter]:
        """Dead letters for the ticks the ledger refused: the envelope's bytes (its array element when the
        record is an array), reason ``ledger_refused``, the database's words in ``edgebill-detail``."""
        by_pos = {(r.partition, r.offset): r for r in plan.batch.records}
        out: list[DeadLetter] = []
        for st, why in plan.refused:
            rec = by_pos.get((st.partition, st.offset))
            if rec is None:  # cannot happen: every tick comes from a record of its batch
                continue
            raw, index = locate_envelope(rec.value, st.tick.id)
            out.append(dead_letter(rec, plan.batch.topic or self.ticks_topic, REFUSED, raw, index, detail=why))
        return out

    def too_old_letters(self, plan: WritePlan) -> list[DeadLetter]:
        """Dead letters for the ticks the ledger refused as before its dedup horizon: the envelope's bytes,
        reason ``older_than_retention`` (what :func:`prepare_ingest` gives the ones it refuses itself)."""
        by_pos = {(r.partition, r.offset): r for r in plan.batch.records}
        out: list[DeadLetter] = []
        for st in plan.too_old:
            rec = by_pos.get((st.partition, st.offset))
            if rec is None:  # cannot happen: every tick comes from a record of its batch
                continue
            raw, index = locate_envelope(rec.value, st.tick.id)
            topic = plan.batch.topic or self.ticks_topic
            out.append(dead_letter(rec, topic, OLDER_THAN_RETENTION, raw, index, detail=_too_old(self.horizon_s)))
        return out

    def conflict_letters(self, plan: WritePlan) -> list[DeadLetter]:
        """Dead letters for the ticks refused as conflicting duplicates (their id is stored already, with
        another payload; the stored copy counts): the envelope's bytes, reason ``conflicting_duplicate``,
        both payload fingerprints and where the kept copy was read from."""
        by_pos = {(r.partition, r.offset): r for r in plan.batch.records}
        topic = plan.batch.topic or self.ticks_topic
        out: list[DeadLetter] = []
        for c in plan.conflicts:
            rec = by_pos.get((c.tick.partition, c.tick.offset))
            if rec is None:  # cannot happen: every tick comes from a record of its batch
                continue
            mine, kept = c.fingerprints
            pos = next((i for i, x in enumerate(plan.batch.ticks) if x is c.tick), 0)
            tid = c.tick.tick.id
            # which element of its record: copies of one id in one array record are told apart by position
            same = sum(
                1
                for x in plan.batch.ticks[:pos]
                if x.tick.id == tid and (x.partition, x.offset) == (c.tick.partition, c.tick.offset)
            )
            raw, index = locate_envelope(rec.value, tid, same)
            kept_at = f"{topic}/{c.kept.partition}/{c.kept.offset}"
            why = f"id {c.tick.tick.id!r} is stored with payload {kept} (read at {kept_at}); this copy has {mine}"
            d = dead_letter(rec, topic, CONFLICTING_DUPLICATE, raw, index, detail=why)
            d.headers.update(
                {
                    "edgebill-fingerprint": mine.encode(),
                    "edgebill-kept-fingerprint": kept.encode(),
                    "edgebill-kept-source": kept_at.encode(),
                }
            )
            out.append(d)
        return out

    def finish_isolated(self, plan: WritePlan) -> None:
        """Record the progress and counters of a batch written by isolation (its refused ticks count as
        rejected); blocking. Only after the refused ticks are dead-lettered."""
        counts = dict(plan.batch.counts)
        counts["records.rejected"] = counts.get("records.rejected", 0) + len(plan.refused)
        self.deps.ledger.record_progress(self.ticks_topic, plan.batch.progress, counts)
        ticks_refused_total.inc(len(plan.refused))

    def policies_from(self, records: Sequence[Record]) -> tuple[list[tuple[OrgPolicy, int, int]], list[DeadLetter]]:
        good: list[tuple[OrgPolicy, int, int]] = []
        dead: list[DeadLetter] = []
        for rec in records:
            try:
                if not rec.value:
                    raise InvalidRecord("empty_record")
                good.append((OrgPolicy.from_json(rec.value), rec.partition, rec.offset))
            except (InvalidRecord, ValueError) as exc:
                reason = exc.reason if isinstance(exc, InvalidRecord) else "invalid_policy"
                log.error("org-policy %s/%s rejected: %s", rec.partition, rec.offset, exc)
                dead.append(dead_letter(rec, self.policy_topic, reason, rec.value or b"", None))
        return good, dead

    # -- closing and sending ------------------------------------------------------------------

    def close_once(self) -> CloseResult | None:
        """One closer run: watermark from partition progress, then :meth:`Ledger.close` (also without a
        watermark: closed buckets that gained ticks are closed again whatever the watermark). None when there
        is no watermark and nothing was closed again."""
        now = self.deps.clock_ms()
        wm = watermark(
            self.deps.ledger.partition_states(),
            self.partitions,
            now,
            self.deps.config.progress_stale_after_ms,
            event_time_topics=frozenset({self.ticks_topic}),
        )
        result = self.deps.ledger.close(wm, self.close_cfg)
        if wm is None and result.close_id is None:
            return None  # no watermark, and no closed bucket had gained ticks
        self.last_close = result
        return result

    def send_once(self) -> SendReport | None:
        """One sender run, only while the cutover state in force is live (read now, not cached): pending
        rows exist only for buckets decided billed, and a state in shadow keeps them waiting."""
        if self.deps.sender is None or not self.deps.cutover.fresh().state.live:
            return None
        report = self.deps.sender.run_once()
        self.last_send = report
        return report

    def retention_once(self, stop: threading.Event | None = None) -> CompactResult | None:
        """One retention run (:meth:`sinks.retention.Retention.compact`) at the clock's now, with the configured
        days; None when retention is off. The parity edge sums are advanced first, so no sample is dropped
        before it is summed there. ``stop`` ends the run between two chunks (the next run goes on)."""
        cfg = self.deps.config
        if cfg.retention_days <= 0:
            return None
        engine = self.deps.ledger.engine
        size = self.close_cfg.bucket_seconds
        result = Retention(engine, bucket_seconds=size).compact(
            self.deps.clock_ms(),
            cfg.retention_days,
            parity=ParityStore(engine, bucket_seconds=size, clock=self.deps.clock_ms),
            stop=None if stop is None else stop.is_set,
        )
        self.horizon_s = max(self.horizon_s, result.horizon_s)
        self.last_retention = result
        return result

    async def retention_tick(self) -> None:
        """The leader's retention timer: one run at a time, in a thread; when the worker stops, the run ends
        after the chunk it is deleting (so stopping never waits for a whole compaction)."""
        if self._retention_lock.locked():
            return
        async with self._retention_lock:
            stop = threading.Event()
            try:
                await self._run_logged("retention run", lambda: self.retention_once(stop))
            finally:
                stop.set()

    async def close_tick(self) -> None:
        if self._close_lock.locked():
            return
        async with self._close_lock:
            await self._run_logged("closer run", self.close_once)

    async def send_tick(self) -> None:
        if self._send_lock.locked():
            return
        async with self._send_lock:
            await self._run_logged("sender run", self.send_once)

    async def _run_logged(self, what: str, fn: Callable[[], object]) -> None:
        """Run ``fn`` in a thread; a failure is logged (once per interval while it repeats), not raised."""
        await run_logged(self.log_throttle, what, fn)

    # -- the cutover --------------------------------------------------------------------------

    def record_control(self, records: Sequence[Record]) -> list[CutoverState]:
        """Record the cutover states read from ``billing-control`` (idempotent by change id); returns the
        ones the ledger did not hold yet (made by a tool that did not record them itself). A record that is
        not a cutover state is logged and skipped: it cannot change billing."""
        fresh: list[CutoverState] = []
        for rec in records:
            if rec.key is not None and rec.key != CONTROL_KEY.encode():
                continue
            try:
                state = CutoverState.from_json(rec.value or b"")
            except ValueError as exc:
                log.error("billing-control %s/%s is not a cutover state, ignored: %s", rec.partition, rec.offset, exc)
                continue
            got = self.deps.ledger.record_state(state, details={"source": self.control_topic}, published=True)
            if got.new:
                log.warning(
                    "cutover change read from %s, not made through this ledger: %s (by %s: %s)",
                    self.control_topic,
                    _describe(state),
                    state.by or "?",
                    state.reason or "no reason given",
                )
                fresh.append(state)
        return fresh

    def control_tick(self) -> EffectiveCutover | None:
        """Notice a new cutover state: log it once (what, who, why, which command) and acknowledge it for
        this worker; re-acknowledge every 30 s so ``cutover status`` sees the worker alive. Returns the
        state when it changed."""
        seq = self.deps.ledger.newest_state_seq()
        now = time.monotonic()
        if seq == self._applied_seq:
            if now - self._acked_at >= 30.0:
                self.deps.ledger.ack_cutover(self.deps.owner, seq)
                self._acked_at = now
            return None
        eff = self.deps.cutover.fresh()
        st = eff.state
        if eff.seq == 0:
            log.info("cutover state in force: the environment's (no change recorded yet): %s", _describe(st))
        else:
            log.info(
                "cutover state in force: seq %d from the ledger: %s; changed by %s at %s, reason: %s, command: %s",
                eff.seq,
                _describe(st),
                st.by or "?",
                st.to_wire()["changed_at"],
                st.reason or "-",
                st.command or "-",
            )
            boot = self.deps.config.close.bootstrap
            if boot.flags() != st.flags():
                log.info("the environment's cutover settings (%s) are not in force", _describe(boot))
        self.deps.ledger.ack_cutover(self.deps.owner, eff.seq)
        self._applied_seq, self._acked_at = eff.seq, now
        return eff

    async def control_progress(self) -> None:
        await self._run_logged("cutover acknowledgement", self.control_tick)


def _describe(state: CutoverState) -> str:
    until = "" if state.bill_until is None else f" bill_until={state.bill_until}"
    return f"shadow={state.shadow} bill_from={state.bill_from}{until} authority={state.authority.value}"
