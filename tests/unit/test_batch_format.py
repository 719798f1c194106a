"""The stored form of a tick batch: what is written reads back exactly, by every reader (ticks, ids, columns,
per-org usage), and batches written by an earlier edgebill (format 1) read the same way."""

from __future__ import annotations

import struct
from collections import defaultdict

import cramjam
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.errors import LedgerError
from models.ticks import SourcedTick, Tick
from sinks.ledger.batches import FORMAT, decode_batch, decode_columns, decode_ids, encode_batch, usage_by_org

_text = st.text(max_size=12)
_tick = st.builds(
    Tick,
    st.uuids().map(str),
    st.sampled_from(["org_a", "org_b", "org_ü", ""]),
    _text,
    _text,
    _text,
    st.integers(0, 1 << 20),
    st.integers(0, 512),
    st.integers(0, 86_400),
    st.integers(0, 253_402_300_799_999),
)
_batch = st.lists(
    st.tuples(_tick, st.integers(0, 1023), st.integers(0, 1 << 62)),
    min_size=1,
    max_size=60,
    unique_by=lambda t: t[0].id,
).map(lambda rows: [SourcedTick(*r) for r in rows])


def _v1(ticks: list[SourcedTick]) -> bytes:
    """A batch in format 1, as an earlier edgebill wrote it (one payload section after the ids)."""

    def deltas(v: list[int]) -> list[int]:
        return [b - a for a, b in zip([0, *v], v, strict=False)]

    names: dict[str, int] = {}
    org = [names.setdefault(s.tick.org_id, len(names)) for s in ticks]
    t = [s.tick for s in ticks]
    payload = [
        list(names),
        org,
        [x.sandbox_id for x in t],
        [x.worker_id for x in t],
        [x.cell_id for x in t],
        [x.memory_mb for x in t],
        [x.cpu_count for x in t],
        [x.interval_s for x in t],
        deltas([x.ts_ms for x in t]),
        [s.partition for s in ticks],
        deltas([s.offset for s in ticks]),
    ]
    ids = bytes(cramjam.zstd.compress(msgspec.msgpack.encode([x.id for x in t])))
    body = bytes(cramjam.zstd.compress(msgspec.msgpack.encode(payload)))
    return struct.pack(">BII", 1, len(ticks), len(ids)) + ids + body


def _assert_reads_back(data: bytes, ticks: list[SourcedTick]) -> None:
    got = decode_batch(7, 3600, data)
    assert list(got.sourced()) == ticks
    assert decode_ids(data) == [s.tick.id for s in ticks]
    assert [t.id for t in decode_batch(7, 3600, data, ids=False).ticks] == [""] * len(ticks)
    cols = decode_columns(data)
    assert [cols.org_names[i] for i in cols.org] == [s.tick.org_id for s in ticks]
    assert (cols.memory_mb, cols.interval_s) == (
        [s.tick.memory_mb for s in ticks],
        [s.tick.interval_s for s in ticks],
    )
    assert cols.sandbox_id == [s.tick.sandbox_id for s in ticks]
    assert cols.worker_id == [s.tick.worker_id for s in ticks]
    assert cols.ts_ms == [s.tick.ts_ms for s in ticks]
    want: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for s in ticks:
        want[s.tick.org_id][0] += 1
        want[s.tick.org_id][1] += s.tick.memory_mb * s.tick.interval_s
    assert usage_by_org(data) == {org: (n, mbs) for org, (n, mbs) in want.items()}


@settings(max_examples=200, deadline=None)
@given(_batch)
def test_a_batch_reads_back_exactly_through_every_reader(ticks: list[SourcedTick]) -> None:
    data = encode_batch(ticks)
    assert data[0] == FORMAT
    _assert_reads_back(data, ticks)


@settings(max_examples=100, deadline=None)
@given(_batch)
def test_a_format_1_batch_written_before_reads_the_same(ticks: list[SourcedTick]) -> None:
    _assert_reads_back(_v1(ticks), ticks)


def test_an_unknown_format_or_a_damaged_batch_is_a_ledger_error() -> None:
    ticks = [SourcedTick(Tick("a", "o", "s", "w", "c", 1024, 1, 20, 5), 0, 1)]
    data = encode_batch(ticks)
    with pytest.raises(LedgerError, match="format 9"):
        decode_batch(1, 0, bytes([9]) + data[1:])
    with pytest.raises(LedgerError, match="damaged"):
        decode_ids(data[:1] + struct.pack(">I", 2) + data[5:])  # says two ticks, holds one
    with pytest.raises(LedgerError, match="damaged"):
        usage_by_org(data[:1] + struct.pack(">I", 2) + data[5:])
