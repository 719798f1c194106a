"""The cutover in the ledger: its history of changes (the audit), the state in force, the workers'
acknowledgements, and the row moves a change implies (a rollback's sweep, a release).

The state in force is the newest ``state`` entry of ``cutover_log``, else the caller's bootstrap state.
Changes are recorded idempotently by change id; a change's row moves are in the transaction that records
it, under the closer's lock: a close run sees the state before or after, never half.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final

import orjson
from sqlalchemy import Connection, and_, func, select, update

from models.billing import Authority, RowState, bucket_end, format_value
from models.cutover import CutoverState, Decision
from models.errors import CutoverRefused
from models.pricing import row_placement
from sinks.ledger.corrections import LedgerCorrections
from sinks.schema import closed_buckets, cutover_acks, cutover_log, meter_events

__all__ = [
    "BOOTSTRAP_SOURCE",
    "LEDGER_SOURCE",
    "CutoverView",
    "EffectiveCutover",
    "LedgerCutover",
    "LogEntry",
    "Recorded",
    "read_effective_state",
]

#: Where the state in force comes from: the ledger's log of changes, or the environment's settings.
LEDGER_SOURCE: Final = "ledger"
BOOTSTRAP_SOURCE: Final = "environment"

KIND_STATE: Final = "state"
KIND_PLAN: Final = "plan"
KIND_RELEASE: Final = "release"
KIND_CANCEL: Final = "cancel"

# Rows a rollback takes from the edge: not sent yet, and never to be sent by it.
_UNSENT_STATES: Final = (
    RowState.PENDING.value,
    RowState.DEFERRED_NO_CUSTOMER.value,
    RowState.SHADOW.value,
)


@dataclass(frozen=True, slots=True)
class EffectiveCutover:
    """The cutover state in force, where it comes from, and its log entry (0: the bootstrap state)."""

    state: CutoverState
    source: str
    seq: int


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One entry of the cutover's audit log."""

    seq: int
    change_id: str
    kind: str
    shadow: bool | None
    bill_from: int | None
    bill_until: int | None
    authority: str | None
    by: str
    reason: str
    command: str
    changed_ms: int
    recorded_ms: int
    published_ms: int | None
    details: dict[str, Any]

    def state(self) -> CutoverState:
        """The state a ``state`` entry records."""
        return CutoverState.model_validate(
            {
                "shadow": bool(self.shadow),
                "bill_from": self.bill_from or 0,
                "bill_until": self.bill_until,
                "authority": self.authority or Authority.CELL.value,
                "changed_at": self.changed_ms,
                "by": self.by,
                "reason": self.reason,
                "command": self.command,
            }
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "change_id": self.change_id,
            "kind": self.kind,
            "shadow": self.shadow,
            "bill_from": self.bill_from,
            "bill_until": self.bill_until,
            "authority": self.authority,
            "by": self.by,
            "reason": self.reason,
            "command": self.command,
            "changed_ms": self.changed_ms,
            "recorded_ms": self.recorded_ms,
            "published_ms": self.published_ms,
            "details": self.details,
        }


@dataclass(frozen=True, slots=True)
class Recorded:
    """The outcome of recording a change: its entry, whether it was new, the rows it moved."""

    seq: int
    new: bool
    rows_moved: list[str] = field(default_factory=list)


def _entry(r: Any) -> LogEntry:
    return LogEntry(
        seq=int(r.seq),
        change_id=r.change_id,
        kind=r.kind,
        shadow=None if r.shadow is None else bool(r.shadow),
        bill_from=None if r.bill_from is None else int(r.bill_from),
        bill_until=None if r.bill_until is None else int(r.bill_until),
        authority=r.authority,
        by=r.by,
        reason=r.reason,
        command=r.command,
        changed_ms=int(r.changed_ms),
        recorded_ms=int(r.recorded_ms),
        published_ms=None if r.published_ms is None else int(r.published_ms),
        details=orjson.loads(r.details) if r.details else {},
    )


def read_effective_state(conn: Connection) -> tuple[int, CutoverState] | None:
    """(seq, state) of the newest ``state`` entry, or None before the first one. One indexed read; the
    closer calls it inside its transaction."""
    cl = cutover_log.c
    r = conn.execute(select(cutover_log).where(cl.kind == KIND_STATE).order_by(cl.seq.desc()).limit(1)).first()
    if r is None:
        return None
    e = _entry(r)
    return e.seq, e.state()


class LedgerCutover(LedgerCorrections):
    """The cutover side of the :class:`sinks.ledger.Ledger`."""

    # ------------------------------------------------------------------ the state in force

    def effective_cutover(self, bootstrap: CutoverState) -> EffectiveCutover:
        """The state in force: the ledger's newest, else ``bootstrap`` (the environment's settings)."""
        with self.engine.connect() as conn:
            got = read_effective_state(conn)
        if got is None:
            return EffectiveCutover(bootstrap, BOOTSTRAP_SOURCE, 0)
        return EffectiveCutover(got[1], LEDGER_SOURCE, got[0])

    def newest_state_seq(self) -> int:
        """The seq of the newest state entry (0: none yet). Cheap: the workers poll it."""
        cl = cutover_log.c
        with self.engine.connect() as conn:
            got = conn.execute(select(func.max(cl.seq)).where(cl.kind == KIND_STATE)).scalar_one_or_none()
        return 0 if got is None else int(got)

    # ------------------------------------------------------------------ recording changes

    def _existing(self, conn: Connection, change_id: str) -> Any:
        return conn.execute(select(cutover_log).where(cutover_log.c.change_id == change_id)).first()

    def _insert_entry(
        self,
        conn: Connection,
        *,
        kind: str,
        change_id: str,
        by: str,
        reason: str,
        command: str,
        changed_ms: int,
        details: Mapping[str, Any],
        state: CutoverState | None = None,
        bill_from: int | None = None,
        published_ms: int | None = None,
    ) -> int:
        values: dict[str, Any] = {
            "change_id": change_id,
            "kind": kind,
            "shadow": None,
            "bill_from": bill_from,
            "bill_until": None,
            "authority": None,
            "by": by,
            "reason": reason,
            "command": command,
            "changed_ms": changed_ms,
            "recorded_ms": self._clock(),
            "published_ms": published_ms,
            "details": orjson.dumps(dict(details), option=orjson.OPT_SORT_KEYS).decode(),
        }
        if state is not None:
            values.update(
                shadow=int(state.shadow),
                bill_from=state.bill_from,
                bill_until=state.bill_until,
                authority=state.authority.value,
            )
        return int(conn.execute(cutover_log.insert().values(**values).returning(cutover_log.c.seq)).scalar_one())

    def record_state(
        self, state: CutoverState, *, details: Mapping[str, Any] | None = None, published: bool = False
    ) -> Recorded:
        """Record a new cutover state (idempotent by its change id); from the commit on it is in force.

        One transaction, under the closer's lock, in order: (1) an entry with the same change id exists ->
        only mark it published when ``published``, and return it (not new); (2) insert the entry
        (``published_ms`` set when ``published``: the caller read it from the topic); (3) when the state has
        a rollback boundary R (``bill_until``), sweep: every bucket at or after R that is closed and not
        already the cell's gets the decision ``skipped_rolled_back``, and its rows not sent yet (pending,
        deferred, shadow) become ``skipped_rolled_back`` (out of their carry streams); the row ids go to the
        entry's details. A crash before the commit records nothing and moves nothing: the command (or the
        agent, reading the topic again) records it again.
        """
        now = self._clock()
        with self._w.begin() as conn:
            self._lock_closer(conn)
            old = self._existing(conn, state.change_id)
            if old is not None:
                if published and old.published_ms is None:
                    conn.execute(update(cutover_log).where(cutover_log.c.seq == old.seq).values(published_ms=now))
                return Recorded(int(old.seq), False)
            moved: list[str] = []
            if state.bill_until is not None:
                moved = self._sweep_rolled_back(conn, state.bill_until, now)
            info = dict(details or {})
            if moved:
                info["rows_skipped_rolled_back"] = moved
            seq = self._insert_entry(
                conn,
                kind=KIND_STATE,
                change_id=state.change_id,
                by=state.by,
                reason=state.reason,
                command=state.command,
                changed_ms=state.changed_at_ms,
                details=info,
                state=state,
                published_ms=now if published else None,
            )
            self._bump_counters(conn, {"cutover.changes": 1, "rows.skipped_rolled_back": len(moved)})
        return Recorded(seq, True, moved)

    def _sweep_rolled_back(self, conn: Connection, until: int, now: int) -> list[str]:
        cb = closed_buckets.c
        conn.execute(
            update(closed_buckets)
            .where(
                cb.bucket_start >= until,
                (cb.decision.is_(None)) | (cb.decision.in_([Decision.BILLED.value, Decision.SHADOW.value])),
            )
            .values(decision=Decision.SKIPPED_ROLLED_BACK.value)
        )
        me = meter_events.c
        rows = conn.execute(
            select(me.id, me.org_id, me.meter, me.state, me.units, me.value).where(
                me.bucket_start >= until, me.state.in_(_UNSENT_STATES)
            )
        ).all()
        self._move_rows(conn, rows, RowState.SKIPPED_ROLLED_BACK, now, "rolled back: the cell bills this bucket")
        return sorted(r.id for r in rows)

    def record_entry(
        self,
        kind: str,
        change_id: str,
        *,
        by: str,
        reason: str,
        command: str,
        changed_ms: int,
        details: Mapping[str, Any] | None = None,
        bill_from: int | None = None,
    ) -> Recorded:
        """Record an entry that changes no state (a plan at T = ``bill_from``, a cancellation at Stripe);
        idempotent by ``change_id``. One transaction: insert unless present."""
        with self._w.begin() as conn:
            old = self._existing(conn, change_id)
            if old is not None:
                return Recorded(int(old.seq), False)
            seq = self._insert_entry(
                conn,
                kind=kind,
                change_id=change_id,
                by=by,
                reason=reason,
                command=command,
                changed_ms=changed_ms,
                details=details or {},
                bill_from=bill_from,
            )
        return Recorded(seq, True)

    def mark_published(self, change_ids: Iterable[str]) -> None:
        """The changes were acknowledged by the broker on the control topic. One transaction; call it only
        after the broker's acknowledgement: a crash before it leaves the change unpublished, and publishing
        it again is harmless (the same change id)."""
        ids = list(change_ids)
        if not ids:
            return
        cl = cutover_log.c
        with self._w.begin() as conn:
            conn.execute(
                update(cutover_log)
                .where(cl.change_id.in_(ids), cl.published_ms.is_(None))
                .values(published_ms=self._clock())
            )

    def release_bucket(
        self,
        bucket: int,
        *,
        bucket_seconds: int,
        bootstrap: CutoverState,
        change_id: str,
        by: str,
        reason: str,
        command: str,
        changed_ms: int,
    ) -> Recorded:
        """Release a gap: a bucket at or after T decided in shadow becomes billed.

        One transaction, under the closer's lock: check the state in force is live and bills ``bucket``
        (T <= bucket < R), and that the bucket is decided ``shadow`` (else :class:`CutoverRefused`); its
        shadow rows leave the shadow carry stream and, in order of (org, meter, revision), get their value
        re-assigned through the billed carry and the state ``pending`` (``expired`` when Stripe would no
        longer take the bucket); the decision becomes ``billed``; the entry is recorded with the rows.
        Shadow rows were never sent, so their identifiers were never used at Stripe and may carry the new
        value. A crash before the commit changes nothing; a repeat finds the bucket billed and refuses.
        """
        now = self._clock()
        with self._w.begin() as conn:
            self._lock_closer(conn)
            old = self._existing(conn, change_id)
            if old is not None:
                return Recorded(int(old.seq), False)
            problems = self._release_problems(conn, bucket, bootstrap)
            if problems:
                raise CutoverRefused(problems)
            released = self._release_rows(conn, bucket, bucket_seconds, now)
            seq = self._insert_entry(
                conn,
                kind=KIND_RELEASE,
                change_id=change_id,
                by=by,
                reason=reason,
                command=command,
                changed_ms=changed_ms,
                details={"bucket": bucket, "rows": released},
                bill_from=bucket,
            )
            self._bump_counters(conn, {"rows.released": len(released)})
        return Recorded(seq, True, [r["id"] for r in released])

    def _release_problems(self, conn: Connection, bucket: int, bootstrap: CutoverState) -> list[str]:
        """Why ``bucket`` may not be released under the state in force (none: it may)."""
        got = read_effective_state(conn)
        state = bootstrap if got is None else got[1]
        problems: list[str] = []
        if not state.live:
            problems.append("the edge is in shadow: a released bucket would not be sent")
        if bucket < state.bill_from or (state.bill_until is not None and bucket >= state.bill_until):
            problems.append(f"bucket {bucket} is outside the edge's billing range [T, R): the cell bills it")
        cb = closed_buckets.c
        decision = conn.execute(select(cb.decision).where(cb.bucket_start == bucket)).scalar_one_or_none()
        if decision != Decision.SHADOW.value:
            problems.append(f"bucket {bucket} is not a gap (decision: {decision or 'not closed'})")
        return problems

    def _release_rows(self, conn: Connection, bucket: int, bucket_seconds: int, now: int) -> list[dict[str, str]]:
        """Move ``bucket``'s shadow rows to the billed carry stream and state, decide it billed; the rows."""
        me = meter_events.c
        rows = conn.execute(
            select(me.id, me.org_id, me.meter, me.state, me.units, me.value)
            .where(me.bucket_start == bucket, me.state == RowState.SHADOW.value)
            .order_by(me.org_id, me.meter, me.revision)
        ).all()
        self._leave_stream(conn, rows)
        state_to, stream = row_placement(Decision.BILLED, bucket_end(bucket, bucket_seconds), now)
        released: list[dict[str, str]] = []
        for r in rows:
            value = self._assign(conn, r.org_id, r.meter, stream, int(r.units))
            text = format_value(value)
            conn.execute(
                update(meter_events)
                .where(me.id == r.id)
                .values(state=state_to.value, value=text, updated_ms=now, last_error="released from shadow")
            )
            released.append({"id": r.id, "value": text, "state": state_to.value})
        cb = closed_buckets.c
        conn.execute(update(closed_buckets).where(cb.bucket_start == bucket).values(decision=Decision.BILLED.value))
        return released

    # ------------------------------------------------------------------ workers' acknowledgements

    def ack_cutover(self, owner: str, seq: int) -> None:
        """``owner`` applies the state entry ``seq`` (0: the bootstrap state). One upsert."""
        stmt = self._insert(cutover_acks).values(owner=owner, seq=seq, acked_ms=self._clock())
        with self._w.begin() as conn:
            conn.execute(
                stmt.on_conflict_do_update(
                    index_elements=["owner"], set_={"seq": stmt.excluded.seq, "acked_ms": stmt.excluded.acked_ms}
                )
            )

    def cutover_acks(self) -> list[tuple[str, int, int]]:
        """(owner, seq, acked_ms) of every worker that has acknowledged a state, newest first."""
        ca = cutover_acks.c
        with self.engine.connect() as conn:
            return [
                (r.owner, int(r.seq), int(r.acked_ms))
                for r in conn.execute(select(cutover_acks).order_by(ca.acked_ms.desc()))
            ]

    # ------------------------------------------------------------------ reads for status and the commands

    def cutover_log(self, *, kinds: Sequence[str] | None = None, limit: int | None = None) -> list[LogEntry]:
        """Audit entries, oldest first (the newest ``limit`` when given)."""
        cl = cutover_log.c
        q = select(cutover_log).order_by(cl.seq.desc())
        if kinds:
            q = q.where(cl.kind.in_(list(kinds)))
        if limit:
            q = q.limit(limit)
        with self.engine.connect() as conn:
            return [_entry(r) for r in reversed(conn.execute(q).all())]

    def latest_plan(self) -> LogEntry | None:
        """The newest plan not followed by a state change (the one ``arm`` would make live), or None."""
        cl = cutover_log.c
        with self.engine.connect() as conn:
            state_seq = conn.execute(select(func.max(cl.seq)).where(cl.kind == KIND_STATE)).scalar_one_or_none()
            q = select(cutover_log).where(cl.kind == KIND_PLAN).order_by(cl.seq.desc()).limit(1)
            r = conn.execute(q).first()
        if r is None or (state_seq is not None and int(r.seq) < int(state_seq)):
            return None
        return _entry(r)

    def unpublished_states(self) -> list[LogEntry]:
        """State entries the control topic has not acknowledged yet, oldest first."""
        cl = cutover_log.c
        with self.engine.connect() as conn:
            return [
                _entry(r)
                for r in conn.execute(
                    select(cutover_log).where(cl.kind == KIND_STATE, cl.published_ms.is_(None)).order_by(cl.seq)
                )
            ]

    def bucket_report(self, buckets: Iterable[int]) -> dict[int, dict[str, Any]]:
        """Per bucket: its decision (None: closed, not decided; absent key ``closed``: not closed) and its
        rows by state (count, Σ value)."""
        wanted = sorted(set(buckets))
        out: dict[int, dict[str, Any]] = {b: {"closed": False, "decision": None, "rows": {}} for b in wanted}
        if not wanted:
            return out
        cb = closed_buckets.c
        me = meter_events.c
        with self.engine.connect() as conn:
            for r in conn.execute(select(cb.bucket_start, cb.decision).where(cb.bucket_start.in_(wanted))):
                out[int(r.bucket_start)].update(closed=True, decision=r.decision)
            sums: dict[tuple[int, str], list[Any]] = defaultdict(lambda: [0, Decimal(0)])
            for m in conn.execute(select(me.bucket_start, me.state, me.value).where(me.bucket_start.in_(wanted))):
                slot = sums[(int(m.bucket_start), m.state)]
                slot[0] += 1
                slot[1] += Decimal(m.value)
            for (b, st), (n, total) in sums.items():
                out[b]["rows"][st] = {"rows": n, "value": format_value(total)}
        return out

    def decided_buckets(
        self, *, at_or_after: int, before: int | None = None, decision: Decision | None = None
    ) -> list[tuple[int, str | None]]:
        """(bucket, decision) of the closed buckets in [at_or_after, before), oldest first."""
        cb = closed_buckets.c
        conds = [cb.bucket_start >= at_or_after]
        if before is not None:
            conds.append(cb.bucket_start < before)
        if decision is not None:
            conds.append(cb.decision == decision.value)
        with self.engine.connect() as conn:
            return [
                (int(r.bucket_start), r.decision)
                for r in conn.execute(
                    select(cb.bucket_start, cb.decision).where(and_(*conds)).order_by(cb.bucket_start)
                )
            ]

    def sent_rows_from(self, bucket: int) -> list[dict[str, Any]]:
        """The rows already sent for buckets at or after ``bucket``, oldest bucket first."""
        me = meter_events.c
        with self.engine.connect() as conn:
            return [
                dict(r._mapping)
                for r in conn.execute(
                    select(meter_events)
                    .where(me.bucket_start >= bucket, me.state == RowState.SENT.value)
                    .order_by(me.bucket_start, me.id)
                )
            ]


class CutoverView:
    """The cutover state in force as the worker's code asks for it: one small object, cached for
    ``ttl_s`` (one indexed read a second at most). The sender, ``/healthz`` and the webhook provisioning
    (which asks for :attr:`authority`) share one instance; :meth:`fresh` reads through the cache."""

    def __init__(
        self,
        ledger: LedgerCutover,
        bootstrap: CutoverState,
        *,
        ttl_s: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ledger = ledger
        self.bootstrap = bootstrap
        self._ttl = ttl_s
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._cached: EffectiveCutover | None = None
        self._at = 0.0

    def fresh(self) -> EffectiveCutover:
        """Read the state in force now (and refresh the cache)."""
        got = self._ledger.effective_cutover(self.bootstrap)
        with self._lock:
            self._cached, self._at = got, self._monotonic()
        return got

    def current(self) -> EffectiveCutover:
        """The state in force, at most ``ttl_s`` old."""
        with self._lock:
            cached, at = self._cached, self._at
        if cached is not None and self._monotonic() - at < self._ttl:
            return cached
        return self.fresh()

    def last_known(self) -> EffectiveCutover:
        """The state in force as last read, however old, without touching the database (the bootstrap
        state, marked so, before the first read). For pages that must answer when the ledger cannot."""
        with self._lock:
            cached = self._cached
        return (
            cached if cached is not None else EffectiveCutover(self.bootstrap, f"{BOOTSTRAP_SOURCE} (not read yet)", 0)
        )

    @property
    def state(self) -> CutoverState:
        return self.current().state

    @property
    def authority(self) -> Authority:
        """Who is authoritative for Pro billing right now (the cell side stops when it is ``edge``)."""
        return self.current().state.authority

    @property
    def live(self) -> bool:
        return self.current().state.live
