"""Replay benchmark: ``edgebill replay`` dry-run rate, end to end, on a topic the ledger (almost) holds.

For each message shape (arrays of 100 ticks, single-tick messages) it publishes N ticks plus 2 % repeated
messages to a fresh 4-partition topic, fills a fresh SQLite ledger through the normal path
(:meth:`Ledger.write_ticks`, then :meth:`Ledger.close`) with every tick but a known 0.2 % hold-out, under
a policy mix that exercises every pricing branch (unified, legacy tiers and untiered sizes, free, unknown,
a policy change inside a bucket), closes it, and then times :func:`infra.replay.run_replay` — plan, read,
parse, dedup, price, read the ledger's ids and rows, compare — each run in a fresh interpreter, as the
command runs (start-up and imports not timed). Each run is checked: the missing ticks are exactly the
hold-out, every differing (org, bucket, meter) differs by exactly their units, nothing is extra, and the
duplicates are counted (``"exact": true``). The rate is ticks read / wall seconds, median of the runs, with
the CPU seconds each run used (its worker processes included; ``cpu_us_per_tick`` from their median);
``ratio_to_raw`` and ``cpu_ratio_to_raw`` are against the raw aiokafka + orjson limit of the same shape
measured in the same ``edgebill bench`` run.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

from infra.devkit.bench import BenchContext, Metric, register, tick_messages
from infra.kafka_admin import ensure_topics
from infra.kafka_io import publish
from infra.replay import ReplaySpec, run_replay
from models.policy import OrgPolicy
from models.ticks import parse_record
from sinks.ledger import CloseConfig, Ledger, SourcedTick
from sinks.schema import make_engine, migrate

log = logging.getLogger(__name__)

H = 3600
HOLDOUT_EVERY = 500  # 0.2 % of the ticks never reach the ledger: the replay must find exactly these
DUPLICATE_EVERY = 50  # 2 % of the messages are published twice


def _policies(orgs: int, base_s: int) -> list[tuple[OrgPolicy, int, int]]:
    """Mostly pro unified; every 10th legacy, every 25th free, the last org unknown; every 50th switches
    from unified to legacy in the middle of a bucket (priced per tick there, as the closer does)."""
    out: list[tuple[OrgPolicy, int, int]] = []
    for i in range(orgs - 1):
        org = f"org_{i:04d}"
        mode = "legacy" if i % 10 == 0 else "unified"
        plan = "free" if i % 25 == 1 else "pro"
        out.append(
            (OrgPolicy.model_validate({"org_id": org, "plan": plan, "billing_mode": mode, "effective_at": 0}), 0, 0)
        )
        if i % 50 == 7:
            change = {"org_id": org, "plan": "pro", "billing_mode": "legacy", "effective_at": base_s + H + 1234}
            out.append((OrgPolicy.model_validate(change), 0, 0))
    return out


def _run(ctx: BenchContext, shape: str, per_message: int, n: int, repeats: int) -> Metric:
    topic = f"bench-replay-{shape}-{uuid.uuid4().hex[:6]}"
    ensure_topics(ctx.bootstrap, {topic: 4})
    msgs = tick_messages(n, per_message, seed=11)
    dups = msgs[::DUPLICATE_EVERY]
    asyncio.run(publish(ctx.bootstrap, topic, msgs + dups))
    dup_ticks = sum(len(parse_record(v).ticks) for _, v in dups)

    db = ctx.workdir / f"replay-{shape}.db"
    url = f"sqlite:///{db}"
    engine = make_engine(url)
    try:
        migrate(engine)
        ledger = Ledger(engine)
        ledger.check_bucket_seconds(H)
        base_s = (int(time.time()) // H - 3) * H  # tick_messages spreads ticks over the 3 hours from here
        ledger.write_policies("org-policy", _policies(1000, base_s), {}, {})
        ticks = [SourcedTick(t, 0, i) for i, (_, v) in enumerate(msgs) for t in parse_record(v).ticks]
        holdout = {st.tick.id for st in ticks[::HOLDOUT_EVERY]}
        keep = [st for st in ticks if st.tick.id not in holdout]
        t_fill = time.perf_counter()
        for i in range(0, len(keep), 50_000):
            ledger.write_ticks(topic, keep[i : i + 50_000], bucket_seconds=H, progress={})
        ledger.close(int(time.time() * 1000) + 2 * H * 1000, CloseConfig(H, 600, shadow=True, bill_from=0))
        log.info(
            "replay bench %s: ledger filled with %d ticks in %.1fs", shape, len(keep), time.perf_counter() - t_fill
        )
    finally:
        engine.dispose()  # the last connection closes: SQLite checkpoints the WAL, as after any writer
    del ticks, keep, msgs, dups

    # Each run is `edgebill replay` minus interpreter start-up: a fresh process that opens the ledger,
    # times run_replay and reports back (this process's large heap would otherwise be forked, and timed).
    rates: list[float] = []
    cpu: list[float] = []
    exact = True
    jobs = 0
    try:
        for _ in range(repeats):
            out = subprocess.run(
                [sys.executable, "-m", "infra.devkit.bench.replay", url, ctx.bootstrap, topic],
                capture_output=True,
                check=True,
                timeout=600,
            )
            run = json.loads(out.stdout)
            c = run["counts"]
            rates.append(c["ticks_read"] / run["seconds"])
            cpu.append(run["cpu_s"])
            jobs = run["jobs"]
            ok = (
                set(run["missing_ids"]) == holdout
                and not run["extra_ids"]
                and c["ticks_read"] == n + dup_ticks
                and c["duplicates"] == dup_ticks
                and c["rejected"] == 0
                and run["explained"]
                and run["diff_units"] == run["missing_units"] > 0
            )
            if not ok:
                log.error(
                    "replay bench %s: result not exact: %s", shape, {k: v for k, v in run.items() if "ids" not in k}
                )
            exact = exact and ok
    finally:
        db.unlink(missing_ok=True)
    rate = statistics.median(rates)
    raw = ctx.raw_limit(shape, n)
    cpu_us = statistics.median(cpu) * 1e6 / (n + dup_ticks)
    return Metric(
        f"replay_dry_run_{shape}_ticks_per_s",
        rate,
        "ticks/s",
        rate / raw.rate,
        {
            "ticks": n + dup_ticks,
            "per_message": per_message,
            "runs": [round(r) for r in rates],
            "jobs": jobs,
            # CPU seconds of the replay and its worker processes, per run: steadier than wall time when
            # other work shares the machine; ticks per CPU-second = ticks / cpu_s.
            "cpu_s": [round(c, 2) for c in cpu],
            "missing": len(holdout),
            "exact": exact,
        },
        cpu_us,
        raw.cpu_ratio(cpu_us),
    )


def _cpu_seconds() -> float:
    """User + system CPU of this process and of its waited-for children (the replay's worker processes)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _timed_replay(url: str, bootstrap: str, topic: str) -> dict[str, Any]:
    """One dry run, end to end (plan, read, parse, dedup, price, ledger reads, compare), in this process."""
    engine = make_engine(url)
    try:
        ledger = Ledger(engine)
        r0 = _cpu_seconds()
        t0 = time.perf_counter()
        result = run_replay(ledger, bootstrap, ReplaySpec(topic), bucket_seconds=H)
        secs = time.perf_counter() - t0
        cpu_s = _cpu_seconds() - r0
    finally:
        engine.dispose()
    rep = result.report
    return {
        "seconds": secs,
        "cpu_s": cpu_s,
        "jobs": rep.jobs,
        "counts": rep.counts,
        "missing_ids": rep.missing_ids,
        "extra_ids": rep.extra_ids,
        "explained": all(k.explained for k in rep.keys),
        "diff_units": sum(k.diff_units for k in rep.keys),
        "missing_units": sum(k.missing_units for k in rep.keys),
    }


@register("replay")
def bench_replay(ctx: BenchContext) -> Iterator[Metric]:
    """``edgebill replay`` dry run, end to end, batched and single-tick messages; ratio to the raw limit."""
    repeats = ctx.scale(3, 1)
    yield _run(ctx, "batched", 100, ctx.scale(500_000, 50_000), repeats)
    yield _run(ctx, "single", 1, ctx.scale(200_000, 20_000), repeats)


__all__: list[str] = []

if __name__ == "__main__":  # one timed run, for _run: python -m infra.devkit.bench.replay URL BOOTSTRAP TOPIC
    sys.stdout.write(json.dumps(_timed_replay(*sys.argv[1:4])))
