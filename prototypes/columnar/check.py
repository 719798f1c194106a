# ruff: noqa: T201
"""Correctness of the throwaway coldec prototype against models.ticks.parse_record (the reference).

For every record coldec accepts, its columns must give exactly parse_record's ticks (every field, in order) and
ignored count, and parse_record must have rejected nothing in it. A record coldec lists in ``fallback`` is fine
(the caller would parse it in Python); the hand-made "must fall back" cases check it does so where it has to.

Run: .venv/bin/python prototypes/columnar/check.py
"""

from __future__ import annotations

import os
import random
import sys
from array import array

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import coldec
import orjson

from infra.devkit.bench import tick_messages
from models.ticks import Tick, _parse_fast, parse_record

F = {name: i for i, name in enumerate(coldec.FIELDS)}


def _strs(buf: bytes, off: bytes) -> list[str]:
    o = array("q", off)
    return [buf[o[i] : o[i + 1]].decode() for i in range(len(o) - 1)]


def columns_to_records(records: list[bytes], max_ts_ms: int | None = None) -> list[tuple[list[Tick], int] | None]:
    """Per record: (ticks rebuilt from coldec's columns, ignored), or None when coldec fell back."""
    r = coldec.decode(records, max_ts_ms=max_ts_ms)
    n = r[F["n"]]
    ids = _strs(r[F["ids"]], r[F["ids_off"]])
    sbs = _strs(r[F["sandbox"]], r[F["sandbox_off"]])
    wks = _strs(r[F["worker"]], r[F["worker_off"]])
    cls = _strs(r[F["cell"]], r[F["cell_off"]])
    names = r[F["org_names"]]
    org = array("I", r[F["org"]])
    mem, cpu, itv, ts = (array("q", r[F[k]]) for k in ("memory_mb", "cpu_count", "interval_s", "ts_ms"))
    assert all(len(c) == n for c in (ids, sbs, wks, cls, org, mem, cpu, itv, ts))
    assert len(set(names)) == len(names), "org dictionary holds a name twice"
    assert set(org) <= set(range(len(names))) and len(set(org)) == len(names), "unused or bad org index"
    rec_off, ignored = array("q", r[F["rec_off"]]), array("q", r[F["ignored"]])
    fallback = set(r[F["fallback"]])
    out: list[tuple[list[Tick], int] | None] = []
    for i in range(len(records)):
        a, b = rec_off[i], rec_off[i + 1]
        if i in fallback:
            assert a == b and ignored[i] == 0
            out.append(None)
            continue
        ticks = [
            Tick(ids[j], names[org[j]], sbs[j], wks[j], cls[j], mem[j], cpu[j], itv[j], ts[j]) for j in range(a, b)
        ]
        out.append((ticks, ignored[i]))
    return out


class Counts:
    def __init__(self) -> None:
        self.records = self.accepted = self.ticks = self.fields = 0


def compare(records: list[bytes], counts: Counts, max_ts_ms: int | None = None) -> list[bool]:
    """Assert coldec == parse_record on every record coldec accepts; returns which it accepted."""
    got = columns_to_records(records, max_ts_ms)
    accepted = []
    for raw, g in zip(records, got, strict=True):
        counts.records += 1
        accepted.append(g is not None)
        if g is None:
            continue
        ref = parse_record(raw, max_ts_ms=max_ts_ms)
        assert not ref.rejected, (raw, ref.rejected)
        ticks, ignored = g
        assert ignored == ref.ignored, (raw, ignored, ref.ignored)
        assert len(ticks) == len(ref.ticks), raw
        for t, u in zip(ticks, ref.ticks, strict=True):
            for k in Tick._fields:
                a, b = getattr(t, k), getattr(u, k)
                assert a == b and type(a) is type(b), (raw, k, a, b)
                counts.fields += 1
        counts.accepted += 1
        counts.ticks += len(ticks)
    return accepted


BASE = {
    "id": "sb_00001:1:1",
    "type": "usage_tick",
    "sandbox_id": "sb_00001",
    "org_id": "org_0001",
    "worker_id": "w-1",
    "cell_id": "bench",
    "payload": {"interval_s": 20, "memory_mb": 2048, "cpu_count": 2},
    "timestamp": "2026-12-07T17:00:00.000Z",
}


def env(**kw: object) -> dict:
    e = {**BASE, **kw}
    return {k: v for k, v in e.items() if v is not ...}


def rec(*envs: dict) -> bytes:
    return orjson.dumps(list(envs))


# Records coldec must accept (and match parse_record on).
ACCEPT: list[bytes] = [
    rec(env()),
    orjson.dumps(env()),  # a single envelope, not an array
    rec(dict(reversed(list(env().items())))),  # keys in another order
    rec({**env(payload={"cpu_count": 4, "memory_mb": 0, "interval_s": 86400})}),
    b' [ { "id" : "a" ,\n"org_id":"o",\t"timestamp" : "2026-01-01T00:00:00Z" } ]\r\n ',  # whitespace, defaults
    rec(env(payload=None), env(payload={}), env(sandbox_id=None, worker_id=None, cell_id=None)),
    rec(env(sandbox_id="", payload={"sandbox_id": "sb_from_payload", "interval_s": 5})),
    rec(env(sandbox_id=None, payload={"sandbox_id": None})),
    rec(env(plan="pro"), env(plan=None), env(payload={"cost_cents": -12345, "memory_mb": None})),
    rec(env(type="scale_event"), env()),  # an envelope of another type: ignored
    rec(env(id="ü" * 255, org_id="組織" * 127, sandbox_id="🦀" * 255, worker_id="é", cell_id="x" * 255)),
    rec(
        env(timestamp="2026-12-07T17:00:00Z"),
        env(timestamp="2026-12-07T17:00:00.1Z"),
        env(timestamp="2026-12-07T17:00:00.12+05:30"),
        env(timestamp="2026-12-07T17:00:00.99999-07:00"),
        env(timestamp="2026-12-07T17:00:00.999999-00:00"),
        env(timestamp="1970-01-01T00:30:00+01:00"),  # before the epoch once offset: negative ms
        env(timestamp="1970-01-01T00:00:00.000+00:01"),
        env(timestamp="2024-02-29T23:59:59.999+23:59"),
        env(timestamp="2000-02-29T12:00:00Z"),
        env(timestamp="9999-12-31T23:59:59.999-23:59"),
        env(timestamp="2100-03-01T00:00:00Z"),
    ),
]

# Records coldec must leave to the Python path.
FALL_BACK: list[bytes] = [
    b"",
    b"[]",
    b"{}",
    b"not json",
    b"[1, 2]",
    rec(env()) + b"x",
    rec(env(id="")),
    rec(env(org_id="")),
    rec(env(id="x" * 256)),
    rec(env(sandbox_id="é" * 256)),
    rec(env(payload={"sandbox_id": "x" * 256})),
    rec(env(id=...)),
    rec(env(org_id=...)),
    rec(env(timestamp=...)),
    rec(env(id=None)),
    rec(env(type=None)),
    rec(env(extra_field=1)),
    rec(env(payload={"gpu": 1})),
    rec(env(payload={"memory_mb": -1})),
    rec(env(payload={"memory_mb": 16 * 1024 * 1024 + 1})),
    rec(env(payload={"interval_s": 86401})),
    rec(env(payload={"cpu_count": 1_000_001})),
    rec(env(payload={"cpu_count": 2.0})),
    rec(env(payload={"cpu_count": True})),
    rec(env(payload={"cpu_count": "2"})),
    rec(env(payload=[1])),
    rec(env(id="a\\b")),
    rec(env(id='a"b')),
    rec(env(id="a\x00b")),
    rec(env(id="a\nb")),
    b'[{"id":"a","org_id":"o","timestamp":"2026-01-01T00:00:00Z","id":"b"}]',  # duplicate key
    b'[{"id":"\\u0041","org_id":"o","timestamp":"2026-01-01T00:00:00Z"}]',
    b'[{"id":"\xff","org_id":"o","timestamp":"2026-01-01T00:00:00Z"}]',  # invalid UTF-8
    b'[{"id":"\xed\xa0\x80","org_id":"o","timestamp":"2026-01-01T00:00:00Z"}]',  # a surrogate
    b'[{"id":"a","org_id":"o","timestamp":"2026-01-01T00:00:00Z","payload":{"cpu_count":01}}]',
    b'[{"id":"a","org_id":"o","timestamp":"2026-01-01T00:00:00Z","payload":{"cpu_count":1e2}}]',
    b'[{"id":"a","org_id":"o","timestamp":"2026-01-01T00:00:00Z",}]',
    rec(env(timestamp="2026-12-07T17:00:00")),  # no offset
    rec(env(timestamp="2026-12-07T17:00:00.1234567Z")),  # 7 fraction digits (Python accepts; coldec does not)
    rec(env(timestamp="2026-12-07 17:00:00Z")),
    rec(env(timestamp="2026-12-07T24:00:00Z")),
    rec(env(timestamp="2026-12-07T17:00:60Z")),
    rec(env(timestamp="2023-02-29T17:00:00Z")),
    rec(env(timestamp="2026-12-07T17:00:00+24:00")),
    rec(env(timestamp="1969-12-31T23:59:59Z")),
    rec(env(type="scale_event", timestamp="yesterday"), env()),
    rec(env(), env(id="")),  # one bad envelope sends the whole record back
]


def mutations(seed: int, count: int) -> list[bytes]:
    """Byte-level mutations of valid records (bounded: ``count`` of them), to probe the scanner's edges."""
    rnd = random.Random(seed)
    alphabet = b'{}[]":,\\ 0123456789-+.eEnulTZ:a\x00\x1f\x7f\xc3\xa9\xff'
    seeds = [*ACCEPT, rec(env(), env(id="x2", payload={"memory_mb": 4096}))]
    out = []
    for _ in range(count):
        b = bytearray(rnd.choice(seeds))
        for _ in range(rnd.randint(1, 3)):
            op, i = rnd.randrange(3), rnd.randrange(len(b))
            if op == 0:
                b[i] = rnd.choice(alphabet)
            elif op == 1:
                b.insert(i, rnd.choice(alphabet))
            elif len(b) > 1:
                del b[i]
        out.append(bytes(b))
    return out


def check_dedup(ids: list[bytes]) -> None:
    """dedup_new against a Python set, over ``ids`` with repeats inside one call."""
    ids = [*ids, *ids[::3]]
    ids_buf, off = b"".join(ids), array("q", [0])
    for x in ids:
        off.append(off[-1] + len(x))
    s = coldec.set_new(0)  # starts small: exercises growth
    first = coldec.dedup_new(ids_buf, off.tobytes(), s)
    seen: set[bytes] = set()
    expect = bytearray()
    for x in ids:
        expect.append(x not in seen)
        seen.add(x)
    assert first == bytes(expect), "dedup mask differs from a Python set"
    assert coldec.set_len(s) == len(seen)
    again = coldec.dedup_new(ids_buf, off, s)  # an array('q') works as offsets too
    assert again == bytes(len(ids)), "a second pass found new ids"
    print(f"dedup_new: {len(ids)} ids ({len(seen)} distinct), mask equal to a Python set, second pass all old")


def main() -> int:
    counts = Counts()
    msgs = tick_messages(200_000, 100)
    records = [v for _, v in msgs]
    for i in range(0, len(records), 80):
        ok = compare(records[i : i + 80], counts)
        assert all(ok), "coldec fell back on a bench record"
    bench = (counts.records, counts.ticks, counts.fields)
    print(f"bench: {bench[0]} records, {bench[1]} ticks, {bench[2]} fields compared: all equal, no fallback")

    ok = compare(ACCEPT, counts)
    bad = [r for r, a in zip(ACCEPT, ok, strict=True) if not a]
    assert not bad, f"fell back on records it should accept: {bad}"
    print(f"hand-made accepted: {len(ACCEPT)} records equal to parse_record")
    ok = compare(FALL_BACK, counts)
    bad = [r for r, a in zip(FALL_BACK, ok, strict=True) if a]
    assert not bad, f"accepted records it should leave to Python: {bad}"
    print(f"hand-made fallback: {len(FALL_BACK)} records all left to the Python path")
    # max_ts_ms: a tick later than the limit sends its record back.
    limit = 1796662800000  # 2026-12-07T17:00:00Z
    ok = compare([rec(env()), rec(env(timestamp="2026-12-07T17:00:00.001Z"))], counts, max_ts_ms=limit)
    assert ok == [True, False], ok
    print("max_ts_ms: equal ticks at the limit, fallback one ms beyond")

    fuzz = mutations(seed=7, count=30_000)
    before, clean_fallbacks = counts.accepted, 0
    for i in range(0, len(fuzz), 500):
        chunk = fuzz[i : i + 500]
        for raw, ok in zip(chunk, compare(chunk, counts), strict=True):
            if not ok:  # the msgspec fast path took it, coldec did not
                clean_fallbacks += _parse_fast(raw, None) is not None
    print(
        f"mutations: {len(fuzz)} mutated records, {counts.accepted - before} accepted, all equal to parse_record; "
        f"{clean_fallbacks} fell back although the msgspec fast path took them (the prototype's stricter cases)"
    )

    r = coldec.decode(records)
    o = array("q", r[F["ids_off"]])
    check_dedup([r[F["ids"]][o[i] : o[i + 1]] for i in range(len(o) - 1)])
    print(f"TOTAL: {counts.records} records, {counts.ticks} ticks, {counts.fields} fields compared; every field equal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
