"""Exact dedup of tick ids without an index row per tick: an in-memory id map per bucket, kept in step with
the stored batches.

The dedup key is (bucket, tick id): a copy of a tick (same id, same time) always falls in the bucket of the
first copy. For every bucket it holds, :class:`DedupIndex` maps each stored id to the ``seq`` of the batch
holding its kept copy. The ledger uses it only inside an ingest transaction that excludes every other
ingest transaction (SQLite: the one writer; PostgreSQL: an advisory lock), so in order:

1. :meth:`sync` reads the batches committed by any other writer since the index last looked (``seq`` above
   :attr:`seen_seq`) and adds their ids to the buckets it holds;
2. :meth:`bucket` loads a bucket it does not hold from all of that bucket's stored batches;
3. the caller decides which ticks are new, inserts them, and commits; only then :meth:`add` records them.

Steps 1 and 2 reflect committed data only, so a rolled-back transaction leaves the index true. If the outcome
of a commit is unknown (the connection broke during it), the caller :meth:`reset` s the index: it is then
rebuilt from what the database actually holds. Memory is bounded: past ``max_ids`` ids the buckets used
least recently are dropped, and loaded again from their batches if a tick of theirs comes back.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Final

from sinks.ledger.batches import decode_ids

__all__ = ["DEFAULT_MAX_IDS", "DedupIndex"]

log = logging.getLogger(__name__)

#: About 100 bytes of memory per id held (the id string, its map entry and the seq): 20 M ids is ~2 GB.
DEFAULT_MAX_IDS: Final = 20_000_000


class DedupIndex:
    """Per bucket: tick id -> seq of the batch that holds the kept copy (see the module docstring)."""

    def __init__(self, max_ids: int = DEFAULT_MAX_IDS) -> None:
        self.max_ids = max_ids
        self.seen_seq = 0  # every batch at or below this seq is reflected in the buckets held
        self._buckets: OrderedDict[int, dict[str, int]] = OrderedDict()
        self._size = 0
        self.loads = 0  # buckets loaded from storage (a figure for tests and the log)

    @property
    def size(self) -> int:
        return self._size

    def reset(self) -> None:
        """Forget everything; the next use rebuilds from storage."""
        self._buckets.clear()
        self._size = 0
        self.seen_seq = 0

    def sync(self, cur: Any, param: str) -> None:
        """Step 1: add the ids of batches stored since :attr:`seen_seq` to the buckets held. ``cur``: a DBAPI
        cursor inside the ingest transaction; ``param``: the driver's placeholder (``?`` or ``%s``)."""
        if not self._buckets:
            cur.execute("SELECT MAX(seq) FROM tick_batches")
            row = cur.fetchone()
            self.seen_seq = int(row[0] or 0) if row else 0
            return
        cur.execute(f"SELECT seq, bucket_start FROM tick_batches WHERE seq > {param}", (self.seen_seq,))  # noqa: S608 - a placeholder
        fresh = cur.fetchall()
        if not fresh:
            return
        wanted = [int(seq) for seq, b in fresh if int(b) in self._buckets]
        top = max(int(seq) for seq, _ in fresh)
        for i in range(0, len(wanted), 500):
            chunk = wanted[i : i + 500]
            marks = ", ".join([param] * len(chunk))
            cur.execute(f"SELECT seq, bucket_start, data FROM tick_batches WHERE seq IN ({marks})", chunk)  # noqa: S608
            for seq, b, data in cur.fetchall():
                self._merge(int(b), dict.fromkeys(decode_ids(data), int(seq)))
        self.seen_seq = max(self.seen_seq, top)

    def bucket(self, cur: Any, param: str, bucket: int) -> dict[str, int]:
        """Step 2: the ids of ``bucket`` (loaded from its stored batches if not held). Call after :meth:`sync`
        in the same transaction."""
        got = self._buckets.get(bucket)
        if got is not None:
            self._buckets.move_to_end(bucket)
            return got
        cur.execute(f"SELECT seq, data FROM tick_batches WHERE bucket_start = {param} ORDER BY seq", (bucket,))  # noqa: S608
        ids: dict[str, int] = {}
        for seq, data in cur.fetchall():
            for tid in decode_ids(data):
                ids.setdefault(tid, int(seq))
        self._buckets[bucket] = ids
        self._size += len(ids)
        self.loads += 1
        return ids

    def add(self, added: Mapping[int, Mapping[str, int]], top_seq: int) -> None:
        """Step 3, after the commit: record the ids the transaction stored and the highest seq it wrote."""
        for b, ids in added.items():
            self._merge(b, ids)
        self.seen_seq = max(self.seen_seq, top_seq)
        self._evict(keep=set(added))

    def _merge(self, bucket: int, ids: Mapping[str, int]) -> None:
        held = self._buckets.get(bucket)
        if held is None:
            return  # not held: loaded whole from storage when needed
        before = len(held)
        held.update(ids)  # batches hold new ids only: nothing held is replaced
        self._size += len(held) - before

    def _evict(self, keep: set[int]) -> None:
        while self._size > self.max_ids and len(self._buckets) > len(keep):
            b, ids = next(iter(self._buckets.items()))
            if b in keep:
                self._buckets.move_to_end(b)
                continue
            del self._buckets[b]
            self._size -= len(ids)
            log.info("dedup: dropped bucket %d (%d ids) from memory; %d ids held", b, len(ids), self._size)
