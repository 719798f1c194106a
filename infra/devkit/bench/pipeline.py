"""Pipeline benchmarks: end-to-end ingest -> closed buckets, worker start, bucket-close latency.

Each run uses its own topic prefix, consumer group and SQLite ledger, and a real ``edgebill worker``
process, exactly as deployed (shadow mode: nothing is sent to Stripe, the closer still writes rows).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson

from infra.devkit.bench import BenchContext, Metric, raw_consume_rate, register, tick_messages
from infra.devkit.stack import WorkerStack
from infra.kafka_admin import ensure_topics
from infra.kafka_io import publish
from models.policy import OrgPolicy

log = logging.getLogger(__name__)


class _Run(WorkerStack):
    """One isolated pipeline (the dev kit's worker harness): topics under a fresh prefix, a fresh ledger,
    worker processes in shadow mode, each on its own web port."""

    def __init__(self, ctx: BenchContext, name: str, db_url: str | None = None, **env: str) -> None:
        self.ctx = ctx
        prefix = f"b{uuid.uuid4().hex[:6]}."
        super().__init__(
            bootstrap=ctx.bootstrap,
            database_url=db_url or f"sqlite:///{ctx.workdir / f'{name}-{prefix}db'}",
            logdir=ctx.workdir,
            topic_prefix=prefix,
            env={
                "EDGEBILL_SHADOW": "true",
                "EDGEBILL_PRO_BILLING_AUTHORITY": "cell",
                "EDGEBILL_BILL_FROM": "0",
                **env,
            },
            log_name=f"worker-{prefix}",
            stop_grace=20,
        )
        ensure_topics(ctx.bootstrap, {self.topic(t): 4 for t in ("usage-ticks", "org-policy", "sandbox-scale-events")})

    def publish(self, topic: str, msgs: list[tuple[bytes, bytes]]) -> None:
        asyncio.run(publish(self.ctx.bootstrap, self.topic(topic), msgs))

    def policies(self, orgs: int = 1000) -> None:
        pols = [
            (
                f"org_{i:04d}".encode(),
                OrgPolicy.model_validate({"org_id": f"org_{i:04d}", "plan": "pro", "effective_at": 0}).to_json(),
            )
            for i in range(orgs)
        ]
        self.publish("org-policy", pols)


def _e2e(
    ctx: BenchContext, per_message: int, n: int, *, workers: int = 1, db_url: str | None = None
) -> tuple[float, float]:
    """(ticks/s from first record read to every sample closed, seconds)."""
    run = _Run(ctx, f"e2e{per_message}", db_url=db_url)
    try:
        run.policies()
        # A backlog, then the workers (started together, so they join the group in one generation): the
        # clock runs from the first record written to the last bucket closed, independent of the producer.
        run.publish("usage-ticks", tick_messages(n, per_message))
        for _ in range(workers):
            run.start_worker()
        t0 = run.wait(lambda: run.ledger.counters().get("records.read", 0) > 0, 60, "the first record read", step=0.02)
        t1 = run.wait(
            lambda: run.ledger.counters().get("ticks.ingested", 0) >= n and run.ledger.open_samples() == 0,
            600,
            f"{n} ticks ingested and every sample closed",
            step=0.05,
        )
        return n / (t1 - t0), t1 - t0
    finally:
        run.close()


def _owned(run: _Run) -> list[Any]:
    now = time.time() * 1000
    rows = [r for r in run.ledger.partition_states() if r.topic == run.topic("usage-ticks")]
    return [r for r in rows if r.reported_ms and now - r.reported_ms < 5000]


@register("pipeline")
def bench_pipeline(ctx: BenchContext) -> Iterator[Metric]:
    """End-to-end ingest -> closed buckets, single-tick and batched messages; ratio to the raw limit."""
    n_single = ctx.scale(100_000, 20_000)
    rate, secs = _e2e(ctx, 1, n_single)
    raw = ctx.raw.get("single") or raw_consume_rate(ctx, 1, n_single)[0]
    yield Metric("e2e_single_ticks_per_s", rate, "ticks/s", rate / raw, {"ticks": n_single, "seconds": round(secs, 2)})
    n_batched = ctx.scale(1_000_000, 100_000)
    rate, secs = _e2e(ctx, 100, n_batched)
    raw = ctx.raw.get("batched") or raw_consume_rate(ctx, 100, n_batched)[0]
    yield Metric(
        "e2e_batched_ticks_per_s",
        rate,
        "ticks/s",
        rate / raw,
        {"ticks": n_batched, "per_message": 100, "seconds": round(secs, 2)},
    )


@register("scaleout")
def bench_scaleout(ctx: BenchContext) -> Iterator[Metric]:
    """One worker vs two in one group, 4 partitions, PostgreSQL ledger: the speed-up (skipped without PG)."""
    base = _pg_base_url()
    if base is None:
        yield Metric("scaleout_skipped", 0, "n/a", None, {"reason": "PostgreSQL not reachable on 127.0.0.1:5432"})
        return
    n = ctx.scale(200_000, 40_000)
    nb = ctx.scale(1_000_000, 100_000)
    rates: dict[tuple[int, int], float] = {}
    for per_message, count in ((1, n), (100, nb)):
        for workers in (1, 2):
            url, drop = _pg_schema(base)
            try:
                rates[(per_message, workers)], _ = _e2e(ctx, per_message, count, workers=workers, db_url=url)
            finally:
                drop()
    raw_single = ctx.raw.get("single") or raw_consume_rate(ctx, 1, n)[0]
    raw_batched = ctx.raw.get("batched") or raw_consume_rate(ctx, 100, nb)[0]
    for (per_message, workers), rate in sorted(rates.items()):
        kind = "single" if per_message == 1 else "batched"
        raw = raw_single if per_message == 1 else raw_batched
        yield Metric(
            f"e2e_pg_{workers}_worker{'s' if workers > 1 else ''}_{kind}_ticks_per_s",
            rate,
            "ticks/s",
            rate / raw,
            {"ticks": n if per_message == 1 else nb, "per_message": per_message},
        )
    for kind, per_message in (("single", 1), ("batched", 100)):
        yield Metric(
            f"scaleout_speedup_2_workers_{kind}",
            rates[(per_message, 2)] / rates[(per_message, 1)],
            "x",
            None,
            {"cores": os.cpu_count()},
        )


def _pg_base_url() -> str | None:
    import sqlalchemy

    url = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
    try:
        eng = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 3})
        with eng.connect() as c:
            c.exec_driver_sql("SELECT 1")
        eng.dispose()
    except Exception:
        return None
    return url


def _pg_schema(base: str) -> tuple[str, Callable[[], None]]:
    import sqlalchemy

    schema = f"bench_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(base)
    with admin.begin() as c:
        c.exec_driver_sql(f"CREATE SCHEMA {schema}")

    def drop() -> None:
        with admin.begin() as c:
            c.exec_driver_sql(f"DROP SCHEMA {schema} CASCADE")
        admin.dispose()

    return f"{base}?options=-csearch_path%3D{schema}", drop


def _vm_hwm_mb(pid: int) -> float:
    """Peak resident memory (VmHWM) of a process, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _memory_run(ctx: BenchContext, orgs: int, hours: int) -> float:
    """Peak RSS of a worker holding ``orgs x hours`` open org-hours (one tick each)."""
    run = _Run(ctx, "mem", EDGEBILL_GRACE_SECONDS=str(7 * 86400))  # nothing closes: every hour stays open
    try:
        run.policies(orgs)
        p = run.start_worker()
        run.wait(lambda: bool(_owned(run)), 60, "the worker to own its partitions", step=0.1)
        if hours:
            base_s = (int(time.time()) // 3600 - hours - 1) * 3600
            msgs: list[tuple[bytes, bytes]] = []
            for h in range(hours):
                stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(base_s + h * 3600))
                batch = [
                    {
                        "id": f"m:{h}:{o}",
                        "org_id": f"org_{o:04d}",
                        "worker_id": "w",
                        "sandbox_id": f"sb{o}",
                        "payload": {"interval_s": 20, "memory_mb": 1024},
                        "timestamp": stamp,
                    }
                    for o in range(orgs)
                ]
                msgs.extend((b"k", orjson.dumps(batch[i : i + 100])) for i in range(0, orgs, 100))
            run.publish("usage-ticks", msgs)
            run.wait(
                lambda: run.ledger.counters().get("ticks.ingested", 0) >= orgs * hours,
                300,
                f"{orgs * hours} open org-hours ingested",
                step=0.1,
            )
        time.sleep(6)  # a parity refresh and a few closer runs over what is held
        return _vm_hwm_mb(p.pid)
    finally:
        run.close()


@register("memory")
def bench_memory(ctx: BenchContext) -> Iterator[Metric]:
    """Peak worker memory while 100k org-hours are held open, minus an idle worker's peak.

    Open buckets live in the ledger (SQL), not in the worker's memory, so this should stay flat.
    """
    org_hours = ctx.scale(100_000, 20_000)
    orgs, hours = 1000, org_hours // 1000
    peaks = []
    for load in (False, True):
        peaks.append(_memory_run(ctx, orgs, hours if load else 0))
    per = (peaks[1] - peaks[0]) * 100_000 / org_hours
    yield Metric("worker_peak_rss_idle_mib", peaks[0], "MiB", None)
    yield Metric(
        "worker_peak_rss_extra_per_100k_open_org_hours_mib",
        per,
        "MiB",
        None,
        {"org_hours": org_hours, "peak_loaded_mib": round(peaks[1], 1)},
    )


@register("latency")
def bench_latency(ctx: BenchContext) -> Iterator[Metric]:
    """Worker start -> ready; bucket closed after its end + grace when caught up (60 s buckets, grace 1 s)."""
    run = _Run(ctx, "latency", EDGEBILL_BUCKET_SECONDS="60", EDGEBILL_GRACE_SECONDS="1")
    try:
        run.policies(10)
        t_start = time.monotonic()
        worker = run.start_worker()
        ready = run.wait(lambda: run.healthy(worker, timeout=0.5), 60, "the worker's /healthz", step=0.05)
        # "Ready" = the worker answers /healthz and holds its partitions (it reports their log ends).
        assigned = run.wait(lambda: bool(run.ledger.partition_states()), 60, "the worker's partitions", step=0.05)
        yield Metric("worker_start_to_ready_s", max(ready, assigned) - t_start, "s", None)
        latencies = []
        for _ in range(ctx.scale(3, 1)):
            # A tick in the current minute; the bucket may close at end + 1 s.
            while time.time() % 60 > 50:
                time.sleep(0.2)
            now = time.time()
            end = int(now) // 60 * 60 + 60
            env = {
                "id": f"lat:{uuid.uuid4().hex}",
                "org_id": "org_0001",
                "payload": {"interval_s": 1, "memory_mb": 1024},
                "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            }
            before = len(run.ledger.rows())
            run.publish("usage-ticks", [(b"org_0001", orjson.dumps(env))])

            def closed_one(b: int = before) -> bool:
                return len(run.ledger.rows()) > b

            closed = run.wait(closed_one, 120, "the bucket to close", step=0.02)
            latencies.append(time.time() - (time.monotonic() - closed) - (end + 1))
        yield Metric(
            "bucket_close_latency_after_end_plus_grace_s",
            max(latencies),
            "s",
            None,
            {"samples": len(latencies), "all": [round(x, 3) for x in latencies]},
        )
    finally:
        run.close()


__all__: list[str] = []
