"""``edgebill bench --only decode``: CPU µs per tick of the ingest parser, single-tick records and arrays of 100.

``parse_record`` (the msgspec fast path, which the worker and replay call) against ``validate_record`` (the
orjson validator it falls back to, the parser before the fast path), on the same records in the same
process, timed with ``time.process_time()``: the median of five passes over the records. No broker.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator

from infra.devkit.bench import BenchContext, Metric, register, tick_messages
from models.ticks import FUTURE_TOLERANCE_MS, ParsedRecord, parse_record, validate_record

__all__: list[str] = []

PASSES = 5


def _us_per_tick(records: list[bytes], n: int, parse: Callable[..., ParsedRecord], max_ts_ms: int) -> float:
    """Median over :data:`PASSES` of the CPU µs per tick one pass of ``parse`` over ``records`` takes."""
    times = []
    for _ in range(PASSES):
        t0 = time.process_time()
        for raw in records:
            parse(raw, max_ts_ms=max_ts_ms)
        times.append((time.process_time() - t0) * 1e6 / n)
    return statistics.median(times)


@register("decode")
def bench_decode(ctx: BenchContext) -> Iterator[Metric]:
    """The parser's CPU per tick: fast path vs the validator alone (its speed before the fast path)."""
    max_ts = int(time.time() * 1000) + FUTURE_TOLERANCE_MS
    for kind, per_message, n in (
        ("single", 1, ctx.scale(100_000, 20_000)),
        ("batched", 100, ctx.scale(500_000, 50_000)),
    ):
        records = [v for _, v in tick_messages(n, per_message)]
        sample = records[:50]  # records both paths must read the same, or the comparison means nothing
        if [parse_record(r, max_ts_ms=max_ts) for r in sample] != [
            validate_record(r, max_ts_ms=max_ts) for r in sample
        ]:
            raise RuntimeError("the fast path and the validator disagree on the benchmark's records")
        fast_us = _us_per_tick(records, n, parse_record, max_ts)
        slow_us = _us_per_tick(records, n, validate_record, max_ts)
        extra = {"ticks": n, "per_message": per_message, "validator_us_per_tick": round(slow_us, 3)}
        yield Metric(
            f"decode_{kind}_us_per_tick",
            fast_us,
            "us/tick",
            None,
            {**extra, "speedup": round(slow_us / fast_us, 2), "passes": PASSES},
            cpu_us_per_tick=fast_us,
        )
