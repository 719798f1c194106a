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
from dataclasses import dataclass
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
        bs = bucket_start  # a local name: one global lookup per batch, not per tick

        def split(oldest: int) -> tuple[dict[int, dict[str, SourcedTick]], list[SourcedTick], list[SourcedTick], int]:
            """(per bucket the first copy of each id, the ticks before ``oldest``, later copies, earliest ts)."""
            if not ticks:
                return {}, [], [], 2**63
            # The common case in bulk (one bucket, no id twice, nothing too old), without a loop in Python.
            times = [st[0][8] for st in ticks]
            lo, hi = min(times), max(times)
            if lo >= oldest and bs(lo, bucket_seconds) == bs(hi, bucket_seconds):
                first = dict(zip([st[0][0] for st in ticks], ticks, strict=True))
                if len(first) == len(ticks):
                    return {bs(lo, bucket_seconds): first}, [], [], lo
            by_bucket: dict[int, dict[str, SourcedTick]] = {}
            refused: list[SourcedTick] = []
            again: list[SourcedTick] = []
            earliest = 2**63
            for st in ticks:
                t = st[0]
                ts = t.ts_ms
                if ts < oldest:
                    refused.append(st)
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
            return by_bucket, refused, again, earliest

        refusals = {} if validated else unstorable(ticks)
        if refusals:
            raise TickRefused("; ".join(sorted(set(refusals.values()))))
        # Built before the write lock is taken, as if nothing were before the horizon (the caller has already
        # refused the ticks before the horizon it last saw); built again only if the horizon says otherwise.
        by_bucket, too_old, again, earliest = split(NO_HORIZON_MS)
        with self._ingest_lock:
            try:
                return self._write(
                    topic, ticks, bucket_seconds, progress, counts, split, by_bucket, too_old, again, earliest
                )
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
        split: Any,
        by_bucket: dict[int, dict[str, SourcedTick]],
        too_old: list[SourcedTick],
        again: list[SourcedTick],
        earliest: int,
    ) -> IngestResult:
        """:meth:`write_ticks`' transaction (steps 1 to 6)."""
        inserted = 0
        added: dict[int, dict[str, int]] = {}
        conflicts: list[Conflict] = []
        top = 0
        with self._w.begin() as conn:
            horizon = read_dedup_horizon(conn, shared_lock=True)
            if earliest < horizon_ms(horizon):
                by_bucket, too_old, again, _ = split(horizon_ms(horizon))
            dbapi = conn.connection.dbapi_connection
            assert dbapi is not None
            pg = self._dialect == "postgresql"
            param = self._param
            cur = dbapi.cursor()
            try:
                if pg and by_bucket:
                    cur.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_INGEST,))
                if by_bucket:
                    self.dedup.sync(cur, param)
                stored: dict[tuple[int, str], SourcedTick | None] = {}  # ids held before: their kept copy
                for b in sorted(by_bucket):
                    held = self.dedup.bucket(cur, param, b)
                    mine = by_bucket[b]
                    seen = mine.keys() & held.keys()  # in C: usually empty
                    fresh = [st for tid, st in mine.items() if tid not in seen] if seen else list(mine.values())
                    for tid in seen:
                        st = mine[tid]
                        kept = stored[(b, tid)] = self._kept_copy(cur, param, held[tid], tid)
                        if kept is not None and kept.tick[1:] != st.tick[1:]:
                            conflicts.append(Conflict(st, kept))
                    if not fresh:
                        continue
                    seq = self._insert_batch(cur, pg, b, fresh)
                    added[b] = dict.fromkeys([st[0][0] for st in fresh], seq)
                    inserted += len(fresh)
                    top = max(top, seq)
                for st in again:  # a later copy inside this batch: compared with the copy that counts
                    b = bucket_start(st.tick.ts_ms, bucket_seconds)
                    at = (b, st.tick.id)
                    first = stored[at] if at in stored else by_bucket[b][st.tick.id]
                    if first is not None and first.tick[1:] != st.tick[1:]:
                        conflicts.append(Conflict(st, first))
            finally:
                cur.close()
            self._upsert_progress(conn, topic, progress)
            dup = len(ticks) - len(too_old) - inserted - len(conflicts)
            all_counts = dict(counts or {})
            all_counts["ticks.ingested"] = all_counts.get("ticks.ingested", 0) + inserted
            all_counts["ticks.duplicate"] = all_counts.get("ticks.duplicate", 0) + dup
            if too_old:
                key = f"ticks.{OLDER_THAN_RETENTION}"
                all_counts[key] = all_counts.get(key, 0) + len(too_old)
            if conflicts:
                key = f"ticks.{CONFLICTING_DUPLICATE}"
                all_counts[key] = all_counts.get(key, 0) + len(conflicts)
            self._bump_counters(conn, all_counts)
        self.dedup.add(added, top)
        return IngestResult(
            inserted=inserted, duplicates=dup, too_old=tuple(too_old), horizon_s=horizon, conflicts=tuple(conflicts)
        )

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
