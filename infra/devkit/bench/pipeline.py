"""Pipeline benchmarks: end-to-end ingest -> closed buckets, worker start, bucket-close latency, the ledger's
bytes per tick.

Each run uses its own topic prefix, consumer group and SQLite ledger, and a real ``edgebill worker``
process, exactly as deployed (shadow mode: nothing is sent to Stripe, the closer still writes rows).
Beside each end-to-end rate: the CPU the worker processes spent per tick over the same interval (read from
``/proc/<pid>/stat``), and on PostgreSQL also the CPU of the database backends serving them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from infra.devkit.bench import BenchContext, Metric, register, tick_messages
from infra.devkit.bench.cpu import CpuWindow, pg_backend_pids
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


@dataclass(frozen=True)
class E2E:
    """One end-to-end run: ``n`` ticks from the first record read to every sample closed."""

    n: int
    seconds: float
    worker_cpu_s: float | None  # every worker process, over the same interval
    db_cpu_s: float | None = None  # PostgreSQL backends serving the workers (None on SQLite: in the worker)
    extra: dict[str, Any] = field(default_factory=dict)  # what ``inspect`` returned
    # From the first record read to the last tick in the ledger (before the last buckets close: on a worker
    # just started, closing also waits for Faust's own consumer group to join, about 2 s on Tansu).
    ingest_seconds: float | None = None

    @property
    def rate(self) -> float:
        return self.n / self.seconds

    @property
    def cpu_us_per_tick(self) -> float | None:
        return None if self.worker_cpu_s is None else self.worker_cpu_s * 1e6 / self.n

    @property
    def db_cpu_us_per_tick(self) -> float | None:
        return None if self.db_cpu_s is None else self.db_cpu_s * 1e6 / self.n


def run_e2e(
    ctx: BenchContext,
    per_message: int,
    n: int,
    *,
    workers: int = 1,
    db_url: str | None = None,
    worker_db_url: str | None = None,
    db_pids: Callable[[], list[int]] | None = None,
    inspect: Callable[[_Run], dict[str, Any]] | None = None,
) -> E2E:
    """Time ``n`` ticks from the first record read to every sample closed, with the workers' CPU over that
    interval. ``worker_db_url``: the URL the workers get (default ``db_url``); ``db_pids``: the database
    backends to clock as well; ``inspect``: called with the stopped run before its ledger is dropped."""
    env = {} if worker_db_url is None else {"EDGEBILL_DATABASE_URL": worker_db_url}
    run = _Run(ctx, f"e2e{per_message}", db_url=db_url, **env)
    try:
        run.policies()
        # A backlog, then the workers (started together, so they join the group in one generation): the
        # clock runs from the first record written to the last bucket closed, independent of the producer.
        run.publish("usage-ticks", tick_messages(n, per_message))
        for _ in range(workers):
            run.start_worker()
        worker_cpu = CpuWindow(lambda: [w.pid for w in run.alive()])
        db_cpu = CpuWindow(db_pids) if db_pids is not None else None
        t0 = run.wait(lambda: run.ledger.counters().get("records.read", 0) > 0, 60, "the first record read", step=0.02)
        worker_cpu.start()
        if db_cpu is not None:
            db_cpu.start()
        ingested_at: list[float] = []

        def done() -> bool:
            if run.ledger.counters().get("ticks.ingested", 0) < n:
                return False
            if not ingested_at:
                ingested_at.append(time.monotonic())
            return run.ledger.open_samples() == 0

        t1 = run.wait(done, 600, f"{n} ticks ingested and every sample closed", step=0.02)
        w_s = worker_cpu.stop()
        d_s = db_cpu.stop() if db_cpu is not None else None
        if db_cpu is not None and db_cpu.lost:
            log.warning("%d database backend(s) ended during the run: their CPU is not counted", db_cpu.lost)
        extra: dict[str, Any] = {}
        if inspect is not None:
            for w in run.workers:
                run.stop(w)
            extra = inspect(run)
        return E2E(n, t1 - t0, w_s, d_s, extra, ingest_seconds=ingested_at[0] - t0)
    finally:
        run.close()


def _owned(run: _Run) -> list[Any]:
    now = time.time() * 1000
    rows = [r for r in run.ledger.partition_states() if r.topic == run.topic("usage-ticks")]
    return [r for r in rows if r.reported_ms and now - r.reported_ms < 5000]


@register("pipeline")
def bench_pipeline(ctx: BenchContext) -> Iterator[Metric]:
    """End-to-end ingest -> closed buckets, single-tick and batched messages; ratio to the raw limit, in wall
    time and in CPU per tick."""
    for kind, per_message, n in (
        ("single", 1, ctx.scale(100_000, 20_000)),
        ("batched", 100, ctx.scale(1_000_000, 100_000)),
    ):
        r = run_e2e(ctx, per_message, n)
        raw = ctx.raw_limit(kind, n)
        extra: dict[str, Any] = {"ticks": n, "seconds": round(r.seconds, 2)}
        if r.ingest_seconds:
            extra["ingest_seconds"] = round(r.ingest_seconds, 2)
            extra["ingest_ratio_to_raw"] = round(n / r.ingest_seconds / raw.rate, 4)
        if per_message > 1:
            extra["per_message"] = per_message
        cpu = r.cpu_us_per_tick
        yield Metric(f"e2e_{kind}_ticks_per_s", r.rate, "ticks/s", r.rate / raw.rate, extra, cpu, raw.cpu_ratio(cpu))


@register("scaleout")
def bench_scaleout(ctx: BenchContext) -> Iterator[Metric]:
    """One worker vs two in one group, 4 partitions, PostgreSQL ledger (skipped without PostgreSQL).

    Two workers on two shared cores cannot show twice the rate, so scale-out is judged in CPU: the CPU seconds
    per million ticks of two workers against one (``scaleout_cpu_2_vs_1_workers_*``, goal <= 1.15); the
    database backends' CPU is reported beside it (and their sum with the workers', ``with_db``).
    """
    base = pg_base_url()
    if base is None:
        yield Metric("scaleout_skipped", 0, "n/a", None, {"reason": "PostgreSQL not reachable on 127.0.0.1:5432"})
        return
    counts = {"single": ctx.scale(200_000, 40_000), "batched": ctx.scale(1_000_000, 100_000)}
    results: dict[tuple[str, int], E2E] = {}
    for kind, per_message in (("single", 1), ("batched", 100)):
        for workers in (1, 2):
            with PgSchema(base) as pg:
                results[(kind, workers)] = run_e2e(
                    ctx,
                    per_message,
                    counts[kind],
                    workers=workers,
                    db_url=pg.url,
                    worker_db_url=pg.worker_url,
                    db_pids=pg.backend_pids,
                )
    for (kind, workers), r in results.items():  # single-tick messages first, one worker before two
        raw = ctx.raw_limit(kind, counts[kind])
        cpu = r.cpu_us_per_tick
        extra: dict[str, Any] = {"ticks": r.n, "per_message": 1 if kind == "single" else 100}
        extra["worker_cpu_s_per_million_ticks"] = _round(cpu)
        extra["db_cpu_s_per_million_ticks"] = _round(r.db_cpu_us_per_tick)
        yield Metric(
            f"e2e_pg_{workers}_worker{'s' if workers > 1 else ''}_{kind}_ticks_per_s",
            r.rate,
            "ticks/s",
            r.rate / raw.rate,
            extra,
            cpu,
            raw.cpu_ratio(cpu),
        )
    for kind in ("single", "batched"):
        one, two = results[(kind, 1)], results[(kind, 2)]
        yield Metric(f"scaleout_speedup_2_workers_{kind}", two.rate / one.rate, "x", None, {"cores": os.cpu_count()})
        if one.cpu_us_per_tick and two.cpu_us_per_tick:
            with_db = None
            if one.db_cpu_us_per_tick is not None and two.db_cpu_us_per_tick is not None:
                with_db = (two.cpu_us_per_tick + two.db_cpu_us_per_tick) / (
                    one.cpu_us_per_tick + one.db_cpu_us_per_tick
                )
            yield Metric(
                f"scaleout_cpu_2_vs_1_workers_{kind}",
                two.cpu_us_per_tick / one.cpu_us_per_tick,
                "x",
                None,
                {
                    "what": "worker CPU s per million ticks, two workers / one (goal <= 1.15)",
                    "cpu_s_per_million_ticks_1_worker": _round(one.cpu_us_per_tick),
                    "cpu_s_per_million_ticks_2_workers": _round(two.cpu_us_per_tick),
                    "with_db": _round(with_db, 4),
                },
            )


def _round(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


def pg_base_url() -> str | None:
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


class PgSchema:
    """A fresh PostgreSQL schema for one run, dropped on exit: ``url`` for the harness, ``worker_url`` (the
    same with an application name of its own) for the workers, so that :meth:`backend_pids` finds the
    server processes serving the workers and nothing else."""

    def __init__(self, base: str) -> None:
        import sqlalchemy

        self.schema = f"bench_{uuid.uuid4().hex[:10]}"
        self.url = f"{base}?options=-csearch_path%3D{self.schema}"
        self.application_name = f"eb-{self.schema}"
        self.worker_url = f"{self.url}&application_name={self.application_name}"
        self._admin = sqlalchemy.create_engine(base)

    def __enter__(self) -> PgSchema:
        with self._admin.begin() as c:
            c.exec_driver_sql(f"CREATE SCHEMA {self.schema}")
        return self

    def __exit__(self, *exc: object) -> None:
        with self._admin.begin() as c:
            c.exec_driver_sql(f"DROP SCHEMA {self.schema} CASCADE")
        self._admin.dispose()

    def _query(self, sql: str, params: dict[str, str]) -> list[int]:
        with self._admin.connect() as c:
            return [int(row[0]) for row in c.exec_driver_sql(sql, params)]

    def backend_pids(self) -> list[int]:
        return pg_backend_pids(self._query, self.application_name)

    def relation_bytes(self) -> dict[str, int]:
        """Table -> ``pg_total_relation_size`` (heap, indexes, TOAST) of every table in the schema."""
        sql = (
            "SELECT c.relname, pg_total_relation_size(c.oid) FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE n.nspname = %(schema)s AND c.relkind IN ('r', 'p')"
        )
        with self._admin.connect() as c:
            return {str(r[0]): int(r[1]) for r in c.exec_driver_sql(sql, {"schema": self.schema})}


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


__all__ = ["E2E", "PgSchema", "pg_base_url", "run_e2e"]
