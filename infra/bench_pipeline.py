"""Pipeline benchmarks: end-to-end ingest -> closed buckets, worker start, bucket-close latency.

Each run uses its own topic prefix, consumer group and SQLite ledger, and a real ``edgebill worker``
process, exactly as deployed (shadow mode: nothing is sent to Stripe, the closer still writes rows).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator

import orjson

from infra.bench import BenchContext, Metric, raw_consume_rate, register, tick_messages
from infra.broker import ensure_topics, free_port
from infra.db import make_engine, migrate
from infra.kafka_io import publish
from infra.settings import child_env
from models.policy import OrgPolicy
from sinks.ledger import Ledger

log = logging.getLogger(__name__)


class _Run:
    """One isolated pipeline: topics under a fresh prefix, a fresh ledger, worker processes."""

    def __init__(self, ctx: BenchContext, name: str, **env: str) -> None:
        self.ctx = ctx
        self.prefix = f"b{uuid.uuid4().hex[:6]}."
        self.db = ctx.workdir / f"{name}-{self.prefix}db"
        self.engine = make_engine(f"sqlite:///{self.db}")
        migrate(self.engine)
        self.ledger = Ledger(self.engine)
        self.env = child_env(
            {
                "EDGEBILL_KAFKA_BOOTSTRAP": ctx.bootstrap,
                "EDGEBILL_KAFKA_TOPIC_PREFIX": self.prefix,
                "EDGEBILL_KAFKA_GROUP_ID": f"g-{self.prefix}",
                "EDGEBILL_DATABASE_URL": f"sqlite:///{self.db}",
                "EDGEBILL_WEB_PORT": str(free_port()),
                "EDGEBILL_SHADOW": "true",
                "EDGEBILL_PRO_BILLING_AUTHORITY": "cell",
                "EDGEBILL_BILL_FROM": "0",
                **env,
            }
        )
        self.procs: list[subprocess.Popen[bytes]] = []
        ensure_topics(ctx.bootstrap, {self.topic(t): 4 for t in ("usage-ticks", "org-policy", "sandbox-scale-events")})

    def topic(self, name: str) -> str:
        return f"{self.prefix}{name}"

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

    def start_worker(self) -> subprocess.Popen[bytes]:
        logf = (self.ctx.workdir / f"worker-{self.prefix}{len(self.procs)}.log").open("wb")
        p = subprocess.Popen(
            [sys.executable, "-m", "infra.cli", "worker"],
            env=self.env,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        logf.close()
        self.procs.append(p)
        return p

    def wait(self, cond: Callable[[], bool], timeout: float, step: float = 0.02) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if cond():
                return time.monotonic()
            time.sleep(step)
        raise TimeoutError(f"benchmark condition not met in {timeout}s; counters={self.ledger.counters()}")

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.kill(p.pid, signal.SIGKILL)
                    p.wait()
        self.engine.dispose()


def _e2e(ctx: BenchContext, per_message: int, n: int) -> tuple[float, float]:
    """(ticks/s from first record read to every sample closed, seconds)."""
    run = _Run(ctx, f"e2e{per_message}")
    try:
        run.policies()
        run.publish("usage-ticks", tick_messages(n, per_message))
        run.start_worker()
        t0 = run.wait(lambda: run.ledger.counters().get("records.read", 0) > 0, 60)
        t1 = run.wait(
            lambda: run.ledger.counters().get("ticks.ingested", 0) >= n and run.ledger.open_samples() == 0, 600, 0.05
        )
        return n / (t1 - t0), t1 - t0
    finally:
        run.close()


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


@register("latency")
def bench_latency(ctx: BenchContext) -> Iterator[Metric]:
    """Worker start -> ready; bucket closed after its end + grace when caught up (60 s buckets, grace 1 s)."""
    run = _Run(ctx, "latency", EDGEBILL_BUCKET_SECONDS="60", EDGEBILL_GRACE_SECONDS="1")
    try:
        run.policies(10)
        t_start = time.monotonic()
        run.start_worker()
        ready = run.wait(lambda: _healthy(run.env["EDGEBILL_WEB_PORT"]), 60, 0.05)
        # "Ready" = the worker answers /healthz and holds its partitions (it reports their log ends).
        assigned = run.wait(lambda: bool(run.ledger.partition_states()), 60, 0.05)
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

            closed = run.wait(closed_one, 120, 0.02)
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


def _healthy(port: str) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=0.5) as r:
            return bool(r.status == 200)
    except OSError:
        return False


__all__: list[str] = []
