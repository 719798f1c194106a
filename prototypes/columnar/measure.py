# ruff: noqa: T201
"""CPU µs per tick of the Python parse path and of the throwaway coldec prototype (see README.md).

Run: nice -n 19 .venv/bin/python prototypes/columnar/measure.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from array import array
from itertools import accumulate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

import coldec
import cramjam
import msgspec

from infra.devkit.bench import tick_messages
from models.ticks import parse_record

N_TICKS, PER_MESSAGE, BATCH, RUNS, PREFILL = 200_000, 100, 80, 3, 2_000_000
F = {name: i for i, name in enumerate(coldec.FIELDS)}
COLUMN_BUFFERS = [
    F[k]
    for k in (
        "ids", "ids_off", "org", "sandbox", "sandbox_off", "worker", "worker_off", "cell", "cell_off",
        "memory_mb", "cpu_count", "interval_s", "ts_ms",
    )
]  # fmt: skip


def prefilled_set() -> object:
    """A hash set holding PREFILL ids that are not in the bench input (filled outside the timed part)."""
    s = coldec.set_new(PREFILL + N_TICKS)
    step = 200_000
    for lo in range(0, PREFILL, step):
        ids = [f"sb_{i % 50_000:05d}:9:{i}".encode() for i in range(lo, lo + step)]  # seed 9: not the bench's 1
        off = array("q", [0])
        off.extend(accumulate(map(len, ids)))
        coldec.dedup_new(b"".join(ids), off, s)
    assert coldec.set_len(s) == PREFILL
    return s


def timed(fn, setup=None) -> float:
    """Median over RUNS of the CPU seconds of fn(setup()) (setup untimed), after one untimed warm-up."""
    fn(setup() if setup else None)
    runs = []
    for _ in range(RUNS):
        arg = setup() if setup else None
        t0 = time.process_time()
        fn(arg)
        runs.append(time.process_time() - t0)
    return statistics.median(runs)


def main() -> int:
    records = [v for _, v in tick_messages(N_TICKS, PER_MESSAGE)]
    batches = [records[i : i + BATCH] for i in range(0, len(records), BATCH)]
    decode = coldec.decode
    untyped = msgspec.json.Decoder().decode
    decoded = [decode(b) for b in batches]
    assert sum(r[F["n"]] for r in decoded) == N_TICKS and not any(r[F["fallback"]] for r in decoded)
    stored = sum(len(r[i]) for r in decoded for i in COLUMN_BUFFERS)
    packed = sum(len(cramjam.zstd.compress(r[i], level=1)) for r in decoded for i in COLUMN_BUFFERS)
    raw_bytes = sum(map(len, records))

    def a(_):
        for r in records:
            parse_record(r)

    def b(_):
        for r in records:
            untyped(r)

    def c(_):
        for batch in batches:
            decode(batch)

    def d(s):
        dedup = coldec.dedup_new
        for batch in batches:
            r = decode(batch)
            mask = dedup(r[1], r[2], s)
        assert mask.count(1) == len(mask)  # every bench id is new to the prefilled set

    def e_alone(_):
        compress = cramjam.zstd.compress
        for r in decoded:
            for i in COLUMN_BUFFERS:
                compress(r[i], level=1)

    def de(s):
        dedup, compress = coldec.dedup_new, cramjam.zstd.compress
        for batch in batches:
            r = decode(batch)
            dedup(r[1], r[2], s)
            for i in COLUMN_BUFFERS:
                compress(r[i], level=1)

    us = 1e6 / N_TICKS
    rows = [
        ("(a) models.ticks.parse_record, per record", timed(a)),
        ("(b) msgspec.json.Decoder().decode, untyped", timed(b)),
        ("(c) coldec.decode, batches of 80 records", timed(c)),
        (f"(d) coldec.decode + dedup_new (set prefilled with {PREFILL:,} ids)", timed(d, prefilled_set)),
        ("(e) zstd level 1 of the 13 column buffers, alone", timed(e_alone)),
        ("(d)+(e) decode + dedup_new + zstd, in one loop", timed(de, prefilled_set)),
    ]
    print(
        f"{N_TICKS:,} ticks, {PER_MESSAGE} per record, {len(records)} records ({raw_bytes / N_TICKS:.0f} B/tick JSON); "
        f"columns {stored / N_TICKS:.1f} B/tick, zstd-1 {packed / N_TICKS:.1f} B/tick; "
        f"CPU time.process_time, median of {RUNS} runs"
    )
    for name, secs in rows:
        print(f"{name:<70} {secs * us:7.3f} µs/tick")
    return 0


if __name__ == "__main__":
    sys.exit(main())
