"""Ticks as stored batches: the byte format of a ``tick_batches`` row and the reads every other part of the
ledger goes through (the closer, parity, replay's comparison, retention, the reports).

A batch holds the ticks of one bucket that one ingest transaction wrote, deduplicated: each tick id appears
in at most one batch of its bucket. Batches are only ever inserted, and deleted whole by retention; nothing
rewrites one. Their ``seq`` (insertion order) is what the closer's and the parity edge's cursors count in.

Format 1, big-endian: ``u8 format, u32 ticks, u32 len(ids section)``, then the ids section, then the payload
section, each zstd-compressed msgpack. Ids: the list of tick ids. Payload: ``[org dictionary, org index,
sandbox, worker, cell, memory_mb, cpu_count, interval_s, ts_ms delta, src_partition, src_offset delta]``,
where the org dictionary lists the batch's distinct org ids once and the deltas are from the previous tick
(the first from 0). The ids come first and apart so that dedup can read them without the payload.
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

FORMAT: Final = 1
_HEAD: Final = struct.Struct(">BII")
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
    payload = [
        names,
        org_index,
        cols[2],
        cols[3],
        cols[4],
        cols[5],
        cols[6],
        cols[7],
        _deltas(cols[8]),
        list(map(_partition_of, ticks)),
        _deltas(list(map(_offset_of, ticks))),
    ]
    id_part = _zip(_enc.encode(ids))
    return _HEAD.pack(FORMAT, len(ticks), len(id_part)) + id_part + _zip(_enc.encode(payload))


def _head(data: bytes | memoryview) -> tuple[int, int]:
    fmt, n, id_len = _HEAD.unpack_from(data, 0)
    if fmt != FORMAT:
        raise LedgerError(f"tick batch in format {fmt}; this edgebill reads format {FORMAT} (upgrade it)")
    return n, id_len


def decode_ids(data: bytes | memoryview) -> list[str]:
    """The tick ids of a stored batch, in order, without decoding its payload."""
    n, id_len = _head(data)
    ids = _ids_dec.decode(_unzip(memoryview(data)[_HEAD.size : _HEAD.size + id_len]))
    if len(ids) != n:
        raise LedgerError(f"tick batch damaged: {len(ids)} ids for {n} ticks")
    return ids


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
    p = _payload(data)
    tick_ids: Iterable[str] = decode_ids(data) if ids else repeat("", len(p[1]))
    names: list[str] = p[0]
    orgs = [names[i] for i in p[1]]
    # tuple.__new__ over zipped columns builds the NamedTuples in C: a third cheaper than calling Tick.
    rows = zip(tick_ids, orgs, p[2], p[3], p[4], p[5], p[6], p[7], accumulate(p[8]), strict=True)
    ticks: list[Tick] = list(map(tuple.__new__, repeat(Tick), rows))
    return StoredBatch(seq, bucket, ticks, p[9], list(accumulate(p[10])))


def decode_columns(data: bytes | memoryview) -> TickColumns:
    """A stored batch's payload as columns (no ids, no tick objects): what the closer aggregates."""
    p = _payload(data)
    return TickColumns(p[0], p[1], p[2], p[3], p[5], p[7], list(accumulate(p[8])))


def _payload(data: bytes | memoryview) -> list[Any]:
    _, id_len = _head(data)
    p: list[Any] = _payload_dec.decode(_unzip(memoryview(data)[_HEAD.size + id_len :]))
    if len(p) != 11:
        raise LedgerError("tick batch damaged: payload has the wrong number of columns")
    return p


def usage_by_org(data: bytes | memoryview) -> dict[str, tuple[int, int]]:
    """org -> (ticks, MB-s) of a stored batch, from its payload alone (no ids, no tick objects): what the
    parity edge side sums."""
    p = _payload(data)
    n = [0] * len(p[0])
    mbs = [0] * len(p[0])
    # Counted in C per (org, memory size, interval): a batch holds few distinct triples.
    for (i, mem, secs), k in Counter(zip(p[1], p[5], p[7], strict=True)).items():
        n[i] += k
        mbs[i] += k * mem * secs
    return {org: (n[i], mbs[i]) for i, org in enumerate(p[0])}


def decode_rows(rows: Iterable[Any], *, ids: bool = True) -> Iterator[StoredBatch]:
    """Decode ``(seq, bucket_start, data)`` rows (``ids``: see :func:`decode_batch`)."""
    for seq, bucket, data in rows:
        yield decode_batch(int(seq), int(bucket), data, ids=ids)
