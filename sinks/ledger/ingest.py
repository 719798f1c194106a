"""Ledger ingest: tick batches (dedup by bucket and tick id), org policy history, partition progress.

The worker's hot path. A transaction writes the new ticks of each bucket as one compressed batch
(:mod:`sinks.ledger.batches`); batches are only ever inserted, never updated (the closer's cursors say which
are aggregated; see :mod:`sinks.ledger.closer`). Dedup is exact and needs no index row per tick
(:mod:`sinks.ledger.dedup`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from sqlalchemy import Engine, select

from models.billing import bucket_start
from models.errors import LedgerError, TickRefused
from models.policy import OrgPolicy
from models.retention import NO_HORIZON_MS, OLDER_THAN_RETENTION, horizon_ms
from models.ticks import INT_LIMITS, STRING_LIMITS, SourcedTick, Tick, tick_fingerprint
from models.watermark import PartitionState
from sinks.ledger.batches import decode_batch, encode_batch
from sinks.ledger.dedup import DEFAULT_MAX_IDS, DedupIndex
from sinks.ledger.store import Clock, SqlStore, read_dedup_horizon, read_partition_states, wall_clock_ms
from sinks.schema import counters, org_policies, partition_progress

__all__ = [
    "ADVISORY_LOCK_INGEST",
    "CONFLICTING_DUPLICATE",
    "Conflict",
    "IngestResult",
    "LedgerIngest",
    "SourcedTick",
    "unstorable",
]

#: Reason and counter suffix of a tick whose id its bucket already holds with another payload.
CONFLICTING_DUPLICATE: Final = "conflicting_duplicate"

#: Transaction-scoped PostgreSQL advisory lock held by every ingest transaction, so that dedup sees every batch
#: committed before it (on SQLite the write transaction itself is exclusive).
ADVISORY_LOCK_INGEST: Final = 0x656467696E6773  # "edgings"

_KEPT_CACHE: Final = 16  # decoded batches kept to compare the kept copies of duplicates against


@dataclass(frozen=True, slots=True)
class Conflict:
    """A tick refused as a duplicate although its payload differs from the copy stored first (which counts)."""

    tick: SourcedTick
    kept: SourcedTick

    @property
    def fingerprints(self) -> tuple[str, str]:
        """(the refused copy's, the kept copy's) payload fingerprints."""
        return tick_fingerprint(self.tick.tick), tick_fingerprint(self.kept.tick)


@dataclass(frozen=True, slots=True)
class IngestResult:
    """What one :meth:`LedgerIngest.write_ticks` did: ``inserted`` new ticks, ``duplicates`` ticks whose id
    their bucket already held with the same payload (or repeated in the batch), ``conflicts`` the ones whose
    bucket held the id with another payload (not counted; the caller dead-letters them), ``too_old`` the ticks
    refused because they lie before the dedup horizon (in batch order, every occurrence), and that horizon as
    read in the transaction."""

    inserted: int
    duplicates: int
    too_old: tuple[SourcedTick, ...] = ()
    horizon_s: int = 0
    conflicts: tuple[Conflict, ...] = ()


_STRING_AT: Final = tuple((Tick._fields.index(name), name, limit) for name, limit in STRING_LIMITS.items())
_INT_AT: Final = tuple((Tick._fields.index(name), name, limit) for name, limit in INT_LIMITS.items())


def unstorable(ticks: Sequence[SourcedTick]) -> dict[str, str]:
    """Tick id -> why the ledger refuses it: a string longer than its limit or holding a NUL, an integer out
    of its range (the parser refuses the same; this guards every other writer). A whole-batch test first,
    one pass over each column in C; only a batch that fails it is looked at tick by tick."""
    if not ticks:
        return {}
    cols = list(zip(*[st[0] for st in ticks], strict=True))
    clean = all("\x00" not in "".join(cols[i]) and max(map(len, cols[i])) <= limit for i, _, limit in _STRING_AT)
    clean = clean and all(min(cols[i]) >= 0 and max(cols[i]) <= limit for i, _, limit in _INT_AT)
    if clean:
        return {}
    out: dict[str, str] = {}
    for st in ticks:
        t = st[0]
        for i, name, limit in _STRING_AT:
            v = str(t[i])
            if len(v) > limit:
                out[t.id] = f"{name} is longer than {limit} characters"
            elif "\x00" in v:
                out[t.id] = f"{name} contains a NUL character"
        for i, name, limit in _INT_AT:
            n = t[i]
            if not isinstance(n, int) or not 0 <= n <= limit:
                out[t.id] = f"{name} is out of range (0 to {limit})"
    return out


@dataclass(slots=True)
class _Split:
    """A batch's ticks by bucket: the first copy of each id per bucket, the ticks before the horizon, the
    later copies of an id within the batch, and the earliest time among the ticks kept."""

    by_bucket: dict[int, dict[str, SourcedTick]]
    too_old: list[SourcedTick]
    again: list[SourcedTick]
    earliest: int


def _split(ticks: Sequence[SourcedTick], oldest: int, bucket_seconds: int) -> _Split:
    """:class:`_Split` of ``ticks``, refusing those before ``oldest`` (unix ms)."""
    if not ticks:
        return _Split({}, [], [], 2**63)
    bs = bucket_start  # a local name: one global lookup per batch, not per tick
    # The common case in bulk (one bucket, no id twice, nothing too old), without a loop in Python.
    times = [st[0][8] for st in ticks]
    lo, hi = min(times), max(times)
    if lo >= oldest and bs(lo, bucket_seconds) == bs(hi, bucket_seconds):
        first = dict(zip([st[0][0] for st in ticks], ticks, strict=True))
        if len(first) == len(ticks):
            return _Split({bs(lo, bucket_seconds): first}, [], [], lo)
    by_bucket: dict[int, dict[str, SourcedTick]] = {}
    too_old: list[SourcedTick] = []
    again: list[SourcedTick] = []
    earliest = 2**63
    for st in ticks:
        t = st[0]
        ts = t.ts_ms
        if ts < oldest:
            too_old.append(st)
            continue
        if ts < earliest:
            earliest = ts
        b = bs(ts, bucket_seconds)
        got = by_bucket.get(b)
        if got is None:
            got = by_bucket[b] = {}
        if t.id in got:
            again.append(st)
        else:
            got[t.id] = st
    return _Split(by_bucket, too_old, again, earliest)


@dataclass(slots=True)
class _Stored:
    """What one transaction inserted: the count, per bucket the new ids with their batch's seq, the
    conflicting duplicates, and the highest seq written."""

    inserted: int = 0
    added: dict[int, dict[str, int]] = field(default_factory=dict)
    conflicts: list[Conflict] = field(default_factory=list)
    top_seq: int = 0


def _ingest_counts(counts: Mapping[str, int] | None, stored: _Stored, dup: int, too_old: int) -> dict[str, int]:
    """The caller's counters plus what the write itself counted."""
    out = dict(counts or {})
    out["ticks.ingested"] = out.get("ticks.ingested", 0) + stored.inserted
    out["ticks.duplicate"] = out.get("ticks.duplicate", 0) + dup
    for name, n in ((OLDER_THAN_RETENTION, too_old), (CONFLICTING_DUPLICATE, len(stored.conflicts))):
        if n:
            out[f"ticks.{name}"] = out.get(f"ticks.{name}", 0) + n
    return out


class LedgerIngest(SqlStore):
    """The ingest side of the :class:`sinks.ledger.Ledger`: tick batches, policies, progress."""

    def __init__(self, engine: Engine, *, clock: Clock = wall_clock_ms, dedup_max_ids: int = DEFAULT_MAX_IDS) -> None:
        super().__init__(engine, clock=clock)
        self.dedup = DedupIndex(dedup_max_ids)
        self._ingest_lock = threading.Lock()  # one ingest transaction at a time in this process
        self._kept: OrderedDict[int, dict[str, SourcedTick]] = OrderedDict()

    def check_bucket_seconds(self, bucket_seconds: int) -> None:
        """Refuse to run with a bucket size other than the one this ledger was started with."""
        with self._w.begin() as conn:
            # Insert-if-absent first: two workers starting at once must not both try to create it.
            conn.execute(
                self._insert(counters)
                .values(name="config.bucket_seconds", value=bucket_seconds)
                .on_conflict_do_nothing(index_elements=["name"])
            )
            got = conn.execute(select(counters.c.value).where(counters.c.name == "config.bucket_seconds")).scalar_one()
            if got != bucket_seconds:
                raise LedgerError(
                    f"this ledger was built with EDGEBILL_BUCKET_SECONDS={got}; refusing to run with "
                    f"{bucket_seconds} (stored bucket starts would no longer line up)"
                )

    def write_ticks(
        self,
        topic: str,
        ticks: Sequence[SourcedTick],
        *,
        bucket_seconds: int,
        progress: Mapping[int, tuple[int, int | None]],
        counts: Mapping[str, int] | None = None,
        validated: bool = False,
    ) -> IngestResult:
        """Store the ticks whose (bucket, id) is new and advance partition progress, atomically.

        One transaction, in this order: (1) read the dedup horizon (:mod:`models.retention`; on PostgreSQL
        under a shared advisory lock that retention takes exclusively to move it) and set aside the ticks
        before it, which are not written (``too_old``: their ids may have been dropped, so they could be
        copies of ticks already counted); (2) take the ingest lock (PostgreSQL: :data:`ADVISORY_LOCK_INGEST`;
        SQLite: the write transaction) and bring the dedup index up to every batch committed before
        (:mod:`sinks.ledger.dedup`); (3) per bucket, drop the ids it already holds (a different payload is a
        :class:`Conflict`) and insert the rest as one batch; (4) upsert ``partition_progress`` (offset and
        newest event time, monotonic); (5) bump counters; commit; (6) record the new ids in the index.
        A crash before the commit writes nothing: the records are redelivered (their offsets were not
        committed to Kafka, which happens only after this returns) and written then. A crash after the commit
        but before the Kafka offset commit redelivers them too: the index, rebuilt from the stored batches,
        holds their ids, so they count as duplicates, not twice. The dedup and the aggregate input are the
        same batch, so there is no window in which one is written without the other. An error anywhere,
        the commit included, resets the index (a commit whose outcome is unknown must not leave it behind
        the database). The caller dead-letters the ``too_old`` and ``conflicts`` ticks before it commits the
        offsets (a crash in between refuses them again).

        Raises :class:`models.errors.TickRefused` (a record error) when a tick holds a value no column it
        reaches could hold; ``validated``: the caller's parser checked exactly those limits already
        (:func:`models.ticks.parse_record`), so the check is skipped.
        """
        refusals = {} if validated else unstorable(ticks)
        if refusals:
            raise TickRefused("; ".join(sorted(set(refusals.values()))))
        # Split before the write lock is taken, as if nothing were before the horizon (the caller has already
        # refused the ticks before the horizon it last saw); split again only if the horizon says otherwise.
        split = _split(ticks, NO_HORIZON_MS, bucket_seconds)
        with self._ingest_lock:
            try:
                return self._write(topic, ticks, bucket_seconds, progress, counts, split)
            except BaseException:
                self.dedup.reset()
                self._kept.clear()
                raise

    def _write(
        self,
        topic: str,
        ticks: Sequence[SourcedTick],
        bucket_seconds: int,
        progress: Mapping[int, tuple[int, int | None]],
        counts: Mapping[str, int] | None,
        split: _Split,
    ) -> IngestResult:
        """:meth:`write_ticks`' transaction (steps 1 to 6)."""
        with self._w.begin() as conn:
            horizon = read_dedup_horizon(conn, shared_lock=True)
            if split.earliest < horizon_ms(horizon):
                split = _split(ticks, horizon_ms(horizon), bucket_seconds)
            dbapi = conn.connection.dbapi_connection
            assert dbapi is not None
            cur = dbapi.cursor()
            try:
                stored = self._store_new(cur, split, bucket_seconds)
            finally:
                cur.close()
            self._upsert_progress(conn, topic, progress)
            dup = len(ticks) - len(split.too_old) - stored.inserted - len(stored.conflicts)
            self._bump_counters(conn, _ingest_counts(counts, stored, dup, len(split.too_old)))
        self.dedup.add(stored.added, stored.top_seq)
        return IngestResult(
            inserted=stored.inserted,
            duplicates=dup,
            too_old=tuple(split.too_old),
            horizon_s=horizon,
            conflicts=tuple(stored.conflicts),
        )

    def _store_new(self, cur: Any, split: _Split, bucket_seconds: int) -> _Stored:
        """Steps 2 and 3 on the transaction's driver cursor: per bucket, the ids not held yet inserted as one
        batch; the held ones (and the batch's own later copies) compared with the copy that counts."""
        out = _Stored()
        if not split.by_bucket:
            return out
        param, pg = self._param, self._dialect == "postgresql"
        if pg:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_INGEST,))
        self.dedup.sync(cur, param)
        stored: dict[tuple[int, str], SourcedTick | None] = {}  # ids held before: their kept copy
        for b in sorted(split.by_bucket):
            held = self.dedup.bucket(cur, param, b)
            mine = split.by_bucket[b]
            seen = mine.keys() & held.keys()  # in C: usually empty
            for tid in seen:
                st = mine[tid]
                kept = stored[(b, tid)] = self._kept_copy(cur, param, held[tid], tid)
                if kept is not None and kept.tick[1:] != st.tick[1:]:
                    out.conflicts.append(Conflict(st, kept))
            new = {tid: st for tid, st in mine.items() if tid not in seen} if seen else mine
            if not new:
                continue
            seq = self._insert_batch(cur, pg, b, list(new.values()))
            out.added[b] = dict.fromkeys(new, seq)
            out.inserted += len(new)
            out.top_seq = max(out.top_seq, seq)
        for st in split.again:  # a later copy inside this batch: compared with the copy that counts
            b = bucket_start(st.tick.ts_ms, bucket_seconds)
            at = (b, st.tick.id)
            first = stored[at] if at in stored else split.by_bucket[b][st.tick.id]
            if first is not None and first.tick[1:] != st.tick[1:]:
                out.conflicts.append(Conflict(st, first))
        return out

    @staticmethod
    def _insert_batch(cur: Any, pg: bool, bucket: int, ticks: list[SourcedTick]) -> int:
        """Insert one batch through the driver (no SQL compilation per batch); returns its seq."""
        data = encode_batch(ticks)
        if pg:
            cur.execute(
                "INSERT INTO tick_batches (bucket_start, ticks, data) VALUES (%s, %s, %s) RETURNING seq",
                (bucket, len(ticks), data),
            )
            return int(cur.fetchone()[0])
        cur.execute("INSERT INTO tick_batches (bucket_start, ticks, data) VALUES (?, ?, ?)", (bucket, len(ticks), data))
        return int(cur.lastrowid)

    def _kept_copy(self, cur: Any, param: str, seq: int, tick_id: str) -> SourcedTick | None:
        """The stored copy of ``tick_id`` in batch ``seq`` (a few decoded batches are cached: a redelivery
        brings whole batches of duplicates); None if retention dropped that batch meanwhile."""
        got = self._kept.get(seq)
        if got is None:
            cur.execute(f"SELECT bucket_start, data FROM tick_batches WHERE seq = {param}", (seq,))  # noqa: S608
            row = cur.fetchone()
            if row is None:
                return None
            got = {st.tick.id: st for st in decode_batch(seq, int(row[0]), row[1]).sourced()}
            self._kept[seq] = got
            while len(self._kept) > _KEPT_CACHE:
                self._kept.popitem(last=False)
        else:
            self._kept.move_to_end(seq)
        return got.get(tick_id)

    def record_progress(
        self, topic: str, progress: Mapping[int, tuple[int, int | None]], counts: Mapping[str, int]
    ) -> None:
        """Advance progress for records that produced no sample (all rejected / ignored), with counters."""
        with self._w.begin() as conn:
            self._upsert_progress(conn, topic, progress)
            self._bump_counters(conn, counts)

    def write_policies(
        self,
        topic: str,
        policies: Sequence[tuple[OrgPolicy, int, int]],
        progress: Mapping[int, tuple[int, int | None]],
        counts: Mapping[str, int],
    ) -> None:
        """Upsert policy records ((org, effective_at) -> the later record wins) and advance progress.

        One transaction: (1) upsert ``org_policies``, one statement for the whole batch; (2) upsert progress;
        (3) counters. A crash before the commit redelivers the records; applying one again is a no-op (same
        key, same values).
        """
        now = self._clock()
        rows: dict[tuple[str, int], dict[str, Any]] = {}  # per key the batch's last record: the later one wins
        for pol, part, off in policies:
            rows[(pol.org_id, pol.effective_at_ms)] = {
                "org_id": pol.org_id,
                "effective_ms": pol.effective_at_ms,
                "plan": pol.plan.value,
                "billing_mode": pol.billing_mode.value,
                "stripe_customer_id": pol.stripe_customer_id,
                "stripe_subscription_id": pol.stripe_subscription_id,
                "billing_provider": pol.billing_provider,
                "src_partition": part,
                "src_offset": off,
                "received_ms": now,
            }
        with self._w.begin() as conn:
            if rows:
                stmt = self._insert(org_policies)
                later = {k: stmt.excluded[k] for k in next(iter(rows.values())) if k not in ("org_id", "effective_ms")}
                conn.execute(
                    stmt.on_conflict_do_update(index_elements=["org_id", "effective_ms"], set_=later), [*rows.values()]
                )
            self._upsert_progress(conn, topic, progress)
            self._bump_counters(conn, counts)

    def report_highwaters(self, topic: str, highwaters: Mapping[int, int], owner: str) -> None:
        """Record the log end of the partitions this worker owns (drives the caught-up test)."""
        if not highwaters:
            return
        now = self._clock()
        stmt = self._insert(partition_progress)
        stmt = stmt.on_conflict_do_update(
            index_elements=["topic", "partition"],
            set_={
                "highwater": stmt.excluded.highwater,
                "reported_ms": stmt.excluded.reported_ms,
                "owner": stmt.excluded.owner,
            },
        )
        with self._w.begin() as conn:
            conn.execute(
                stmt,
                [
                    {
                        "topic": topic,
                        "partition": p,
                        "committed_offset": -1,
                        "max_event_ms": None,
                        "highwater": hw,
                        "reported_ms": now,
                        "owner": owner,
                    }
                    for p, hw in highwaters.items()
                ],
            )

    def partition_states(self) -> list[PartitionState]:
        with self.engine.connect() as conn:
            return read_partition_states(conn)
