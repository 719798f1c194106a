"""Ticks as stored batches: the byte format of a ``tick_batches`` row and the reads every other part of the
ledger goes through (the closer, parity, replay's comparison, retention, the reports).

A batch holds the ticks of one bucket that one ingest transaction wrote, deduplicated: each tick id appears
in at most one batch of its bucket. Batches are only ever inserted, and deleted whole by retention; nothing
rewrites one. Their ``seq`` (insertion order) is what the closer's and the parity edge's cursors count in.

Format 2 (written), big-endian: ``u8 format, u32 ticks, u32 len(ids), u32 len(sums)``, then three sections,
each zstd-compressed msgpack: the ids (the list of tick ids); the sums, what counting usage reads
(``[org dictionary, org index, memory_mb, interval_s]``); the rest (``[sandbox, worker, cell, cpu_count,
ts_ms delta, src_partition, src_offset delta]``). The org dictionary lists the batch's distinct org ids once;
a delta is from the previous tick (the first from 0). Sections apart so that each reader decodes only what
it needs: dedup the ids, the parity edge the sums, the closer the sums and (only for ticks it cannot count
in bulk) the rest.

Format 1 (still read): ``u8 format, u32 ticks, u32 len(ids)``, the ids, then one payload section
``[org dictionary, org index, sandbox, worker, cell, memory_mb, cpu_count, interval_s, ts_ms delta,
src_partition, src_offset delta]``.
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate, chain, repeat
from operator import itemgetter, sub
from typing import Any, Final

import cramjam
import msgspec

from models.errors import LedgerError
from models.ticks import SourcedTick, Tick, TickColumns

__all__ = [
    "FORMAT",
    "StoredBatch",
    "decode_batch",
    "decode_columns",
    "decode_ids",
    "decode_rows",
    "encode_batch",
    "usage_by_org",
]

FORMAT: Final = 2  # the format written; format 1 is still read
_HEAD_1: Final = struct.Struct(">BII")
_HEAD: Final = struct.Struct(">BIII")
_LEVEL: Final = 1  # zstd level: 1 compresses these columns within a few % of level 9, several times faster

_enc = msgspec.msgpack.Encoder()
_ids_dec = msgspec.msgpack.Decoder(list[str])
_payload_dec = msgspec.msgpack.Decoder()


def _zip(raw: bytes) -> bytes:
    return bytes(cramjam.zstd.compress(raw, level=_LEVEL))


def _unzip(raw: bytes | memoryview) -> bytes:
    return bytes(cramjam.zstd.decompress(bytes(raw)))


def _deltas(values: Sequence[int]) -> list[int]:
    return list(map(sub, values, chain((0,), values)))  # in C: each value minus the one before (the first: 0)


_tick_of, _partition_of, _offset_of = itemgetter(0), itemgetter(1), itemgetter(2)


def encode_batch(ticks: Sequence[SourcedTick]) -> bytes:
    """The stored bytes of ``ticks`` (one bucket's, ids unique): :func:`decode_batch` gives them back."""
    if not ticks:
        raise LedgerError("an empty tick batch is never stored")
    # Columns and the org dictionary built in C (map over the ticks), not by a Python step per tick.
    cols = list(zip(*map(_tick_of, ticks), strict=True))
    ids, orgs = cols[0], cols[1]
    names = list(dict.fromkeys(orgs))
    org_index = list(map(dict(zip(names, range(len(names)), strict=True)).__getitem__, orgs))
    sums = [names, org_index, cols[5], cols[7]]
    rest = [
        cols[2],
        cols[3],
        cols[4],
        cols[6],
        _deltas(cols[8]),
        list(map(_partition_of, ticks)),
        _deltas(list(map(_offset_of, ticks))),
    ]
    id_part, sum_part = _zip(_enc.encode(ids)), _zip(_enc.encode(sums))
    return _HEAD.pack(FORMAT, len(ticks), len(id_part), len(sum_part)) + id_part + sum_part + _zip(_enc.encode(rest))


_Sums = tuple[list[str], list[int], list[int], list[int]]  # org dictionary, org index, memory_mb, interval_s
# sandbox, worker, cell, cpu_count, ts_ms delta, src_partition, src_offset delta
_Rest = tuple[list[str], list[str], list[str], list[int], list[int], list[int], list[int]]


class _Sections:
    """Where a stored batch's sections lie (either format), each decoded on demand."""

    __slots__ = ("_v1_payload", "data", "fmt", "id_len", "n", "sum_len")

    def __init__(self, data: bytes | memoryview) -> None:
        self.data = memoryview(data)
        fmt = self.data[0] if len(self.data) else None
        if fmt == FORMAT:
            _, self.n, self.id_len, self.sum_len = _HEAD.unpack_from(self.data, 0)
        elif fmt == 1:
            _, self.n, self.id_len = _HEAD_1.unpack_from(self.data, 0)
            self.sum_len = -1
        else:
            raise LedgerError(f"tick batch in format {fmt}; this edgebill reads formats 1 and {FORMAT} (upgrade it)")
        self.fmt = fmt
        self._v1_payload: list[Any] | None = None

    def ids(self) -> list[str]:
        at = (_HEAD if self.fmt == FORMAT else _HEAD_1).size
        ids = _ids_dec.decode(_unzip(self.data[at : at + self.id_len]))
        if len(ids) != self.n:
            raise LedgerError(f"tick batch damaged: {len(ids)} ids for {self.n} ticks")
        return ids

    def _section(self, at: int, length: int | None, columns: int, *, dictionary: bool = True) -> list[Any]:
        """Decode one section of ``columns`` columns, each one value per tick (but the first, when it is the
        org ``dictionary``)."""
        part = self.data[at:] if length is None else self.data[at : at + length]
        got: list[Any] = _payload_dec.decode(_unzip(part))
        if len(got) != columns or any(len(c) != self.n for c in got[1 if dictionary else 0 :]):
            raise LedgerError("tick batch damaged: a section has the wrong number of columns or values")
        return got

    def _v1(self) -> list[Any]:
        if self._v1_payload is None:
            self._v1_payload = self._section(_HEAD_1.size + self.id_len, None, 11)
        return self._v1_payload

    def sums(self) -> _Sums:
        if self.fmt == 1:
            p = self._v1()
            return p[0], p[1], p[5], p[7]
        s = self._section(_HEAD.size + self.id_len, self.sum_len, 4)
        return s[0], s[1], s[2], s[3]

    def rest(self) -> _Rest:
        if self.fmt == 1:
            p = self._v1()
            return p[2], p[3], p[4], p[6], p[8], p[9], p[10]
        r = self._section(_HEAD.size + self.id_len + self.sum_len, None, 7, dictionary=False)
        return r[0], r[1], r[2], r[3], r[4], r[5], r[6]


def decode_ids(data: bytes | memoryview) -> list[str]:
    """The tick ids of a stored batch, in order, without decoding its payload."""
    return _Sections(data).ids()


@dataclass(frozen=True, slots=True)
class StoredBatch:
    """One decoded ``tick_batches`` row: its ``seq``, bucket, and the ticks with where each was read."""

    seq: int
    bucket_start: int
    ticks: list[Tick]
    partitions: list[int]
    offsets: list[int]

    def sourced(self) -> Iterator[SourcedTick]:
        return map(SourcedTick, self.ticks, self.partitions, self.offsets)


def decode_batch(seq: int, bucket: int, data: bytes | memoryview, *, ids: bool = True) -> StoredBatch:
    """A stored batch as ticks (exactly those :func:`encode_batch` was given, in order). ``ids=False``: the
    ids section is not decoded and every tick's id is ``""`` (for readers that only aggregate)."""
    sec = _Sections(data)
    names, org_index, memory, interval = sec.sums()
    sandbox, worker, cell, cpus, ts_delta, partitions, offset_delta = sec.rest()
    tick_ids: Iterable[str] = sec.ids() if ids else repeat("", sec.n)
    orgs = [names[i] for i in org_index]
    # tuple.__new__ over zipped columns builds the NamedTuples in C: a third cheaper than calling Tick.
    rows = zip(tick_ids, orgs, sandbox, worker, cell, memory, cpus, interval, accumulate(ts_delta), strict=True)
    ticks: list[Tick] = list(map(tuple.__new__, repeat(Tick), rows))
    return StoredBatch(seq, bucket, ticks, partitions, list(accumulate(offset_delta)))


def decode_columns(data: bytes | memoryview) -> TickColumns:
    """A stored batch as columns (no ids, no tick objects): what the closer aggregates. Sandbox, worker and
    time are decoded only if the closer asks for them."""
    sec = _Sections(data)

    def detail() -> tuple[list[str], list[str], list[int]]:
        r = sec.rest()
        return r[0], r[1], list(accumulate(r[4]))

    return TickColumns.lazy(*sec.sums(), detail)


def usage_by_org(data: bytes | memoryview) -> dict[str, tuple[int, int]]:
    """org -> (ticks, MB-s) of a stored batch, from its sums alone (no ids, no tick objects): what the parity
    edge side sums."""
    names, org_index, memory, interval = _Sections(data).sums()
    n = [0] * len(names)
    mbs = [0] * len(names)
    # Counted in C per (org, memory size, interval): a batch holds few distinct triples.
    for (i, mem, secs), k in Counter(zip(org_index, memory, interval, strict=True)).items():
        n[i] += k
        mbs[i] += k * mem * secs
    return {org: (n[i], mbs[i]) for i, org in enumerate(names)}


def decode_rows(rows: Iterable[Any], *, ids: bool = True) -> Iterator[StoredBatch]:
    """Decode ``(seq, bucket_start, data)`` rows (``ids``: see :func:`decode_batch`)."""
    for seq, bucket, data in rows:
        yield decode_batch(int(seq), int(bucket), data, ids=ids)
