"""``edgebill bench --only stripe``: meter events per second delivered to a local Stripe server.

What is measured: the real sender path — :func:`infra.runtime.build_sender` (the worker's own
construction: official SDK, :class:`~sinks.base.RetryingSink` with real backoff sleeps, the v1 sink or
the v2 stream sink and its error-report reconciler) draining a SQLite ledger pre-filled with N
``pending`` rows through :meth:`~sinks.outbox_sender.OutboxSender.run_once`, until none is pending. The clock
runs from the first ``run_once`` to the last; filling the ledger and creating meters/customers are not
timed.

Where it sends: ``edgebill stripe-fake`` started as a child process on 127.0.0.1 (its own interpreter,
so it does not share the sender's GIL, as Stripe would not), reset between runs, live-mode limits on.
Four runs: v1 and v2, each without and with 10 % injected faults (4 % 429, 3 % 500, 3 % cut off after
Stripe recorded the event; 5 % of requests also slowed by 50 ms).

The raw limit (``ratio_to_raw``): bare HTTP POSTs (aiohttp, 8 in flight, bodies encoded beforehand)
of the same v2 stream payloads, 100 valid events each, to the same server in the same run — what the
server can absorb when the client does nothing else.

Every run is checked after the clock stops: every row ``sent``, Stripe's meter summaries equal the
ledger per customer, and no identifier reached Stripe with two values (``exact`` in the output).

The ledger is filled once per size through the public Ledger API (policies, ticks, ``close``) and
copied for each run; each run then publishes the org policies carrying that run's Stripe customers.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Literal

import aiohttp
import orjson
import requests
from pydantic import SecretStr

from infra.catalog import ensure_customers, ensure_meters, meter_totals
from infra.devkit.bench import BenchContext, Metric, register
from infra.devkit.broker import free_port
from infra.devkit.procs import terminate
from infra.devkit.stripe_fake import FaultConfig
from models.billing import UNIFIED_METER
from models.policy import OrgPolicy
from models.ticks import Tick
from sinks.ledger import CloseConfig, Ledger, SourcedTick
from sinks.stripe.v1 import make_client, make_http_session
from sinks.stripe.v2 import iso_timestamp

__all__ = ["FAULTS_10PCT", "LocalStripeProcess", "bench_stripe", "raw_stream_rate"]

log = logging.getLogger(__name__)

H = 3600
API_KEY = "sk_test_edgebill_bench"
#: 10 % of meter-event requests fail (429, 500, cut off after recording); 5 % are slowed too.
FAULTS_10PCT = FaultConfig(
    seed=7, p_429=0.04, p_500=0.03, p_cutoff=0.03, p_slow=0.05, slow_seconds=0.05, live_limits=True
)
CLEAN = FaultConfig(live_limits=True)
RUN_LIMIT_S = 300.0

Mode = Literal["v1", "v2"]


class LocalStripeProcess:
    """``edgebill stripe-fake`` in a child process on a free 127.0.0.1 port; stopped by its PID."""

    def __init__(self, logdir: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._logpath = logdir / "stripe-fake.log"
        self._log: IO[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._http = requests.Session()

    def __enter__(self) -> LocalStripeProcess:
        self._log = self._logpath.open("ab")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "infra.devkit.cli", "stripe-fake", "--port", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"the local Stripe server exited early; see {self._logpath}")
            try:
                self._http.get(f"{self.base}/_fake/clock", timeout=1).raise_for_status()
                return self
            except requests.RequestException:
                time.sleep(0.1)
        self.__exit__(None, None, None)
        raise RuntimeError(f"the local Stripe server did not answer within 30 s; see {self._logpath}")

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._http.close()
        proc, self._proc = self._proc, None
        if proc is not None:
            terminate(proc, grace=10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def _fake(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        resp = self._http.request(method, f"{self.base}/_fake/{path}", json=body, timeout=30)
        resp.raise_for_status()
        return resp.json()

    def reset(self) -> None:
        self._fake("POST", "reset")

    def set_faults(self, cfg: FaultConfig) -> None:
        self._fake("POST", "faults", {"_replace": True, **cfg.to_dict()})

    def conflicting(self) -> list[Any]:
        return list(self._fake("GET", "duplicates")["conflicting"])

    def injected(self) -> dict[str, int]:
        return dict(self._fake("GET", "requests")["faults_injected"])


# -- the raw limit ------------------------------------------------------------------------------------


def raw_stream_rate(server: LocalStripeProcess, n_events: int, *, concurrency: int = 8) -> tuple[float, float]:
    """(events/s, this process's CPU µs per event) of bare HTTP POSTs of 100-event v2 stream payloads (encoded
    beforehand) to ``server``."""
    server.reset()
    server.set_faults(CLEAN)
    http = make_http_session(4)
    try:
        client = make_client(API_KEY, server.base, timeout=10, session=http)
        ensure_meters(client, [UNIFIED_METER])
        customers = list(ensure_customers(client, {f"raw_{i:03d}": f"raw{i}@bench.test" for i in range(100)}).values())
        token = client.v2.billing.meter_event_session.create().authentication_token
    finally:
        http.close()
    ts = iso_timestamp(time.time() - 2 * H)
    bodies = [
        orjson.dumps(
            {
                "events": [
                    {
                        "event_name": UNIFIED_METER,
                        "identifier": f"raw_{k % 1000:04d}:{1_790_000_000 + k}:{UNIFIED_METER}",
                        "timestamp": ts,
                        "payload": {"stripe_customer_id": customers[k % len(customers)], "value": "12.345678"},
                    }
                    for k in range(start, start + 100)
                ]
            }
        )
        for start in range(0, n_events, 100)
    ]
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    url = f"{server.base}/v2/billing/meter_event_stream"

    async def post_all() -> tuple[float, float]:
        queue = list(reversed(bodies))
        async with aiohttp.ClientSession() as session:

            async def worker() -> None:
                while queue:
                    body = queue.pop()
                    async with session.post(url, data=body, headers=headers) as resp:
                        await resp.read()
                        if resp.status != 202:
                            raise RuntimeError(f"raw stream POST answered {resp.status}")

            c0, t0 = time.process_time(), time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            return time.perf_counter() - t0, time.process_time() - c0

    seconds, cpu = asyncio.run(post_all())
    events = len(bodies) * 100
    return events / seconds, cpu * 1e6 / events


# -- ledgers ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    path: Path
    orgs: list[str]
    first_bucket: int
    buckets: int

    @property
    def rows(self) -> int:
        return len(self.orgs) * self.buckets


def _policy(org: str, customer: str | None, effective_at: int) -> OrgPolicy:
    return OrgPolicy.model_validate(
        {
            "org_id": org,
            "plan": "pro",
            "billing_mode": "unified",
            "stripe_customer_id": customer,
            "effective_at": effective_at,
        }
    )


def build_template(path: Path, orgs: int, buckets: int) -> Template:
    """A ledger with ``orgs × buckets`` pending unified rows (one tick each), via the public Ledger API."""
    from sinks.schema import make_engine, migrate

    now = int(time.time())
    first = (now // H - buckets - 2) * H
    names = [f"bench_{i:04d}" for i in range(orgs)]
    engine = make_engine(f"sqlite:///{path}")
    try:
        migrate(engine)
        led = Ledger(engine)
        led.write_policies(
            "org-policy", [(_policy(o, None, 0), 0, i) for i, o in enumerate(names)], {0: (len(names), None)}, {}
        )
        ticks: list[SourcedTick] = []
        for i, org in enumerate(names):
            for b in range(buckets):
                mb = 1024 * (1 + (i + b) % 7)
                ts_ms = (first + b * H + 60 + (i % 50)) * 1000
                ticks.append(SourcedTick(Tick(f"{org}:{b}", org, "sb", "w", "bench", mb, 2, 17 + b % 23, ts_ms), 0, i))
        led.write_ticks("usage-ticks", ticks, bucket_seconds=H, progress={0: (len(ticks), None)})
        led.close(now * 1000, CloseConfig(bucket_seconds=H, grace_seconds=600, shadow=False, bill_from=first))
        counts = led.state_counts()
        if counts != {"pending": orgs * buckets}:
            raise RuntimeError(f"unexpected template ledger: {counts}")
    finally:
        engine.dispose()
    return Template(path, names, first, buckets)


# -- one run ------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    events: int
    seconds: float
    exact: bool
    problems: list[str]
    injected: dict[str, int]
    cpu_s: float  # this process's CPU while it drained: the sender (the local Stripe runs apart)

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def run_sender(server: LocalStripeProcess, tpl: Template, mode: Mode, faults: FaultConfig, workdir: Path) -> RunResult:
    """Drain a copy of ``tpl`` to ``server`` with the worker's sender in ``mode``; time it; check it."""
    from infra.runtime import build_sender
    from infra.settings import StripeSettings
    from sinks.schema import make_engine

    server.reset()
    server.set_faults(CLEAN)
    http = make_http_session(16)
    db = workdir / f"stripe-{mode}-{'faults' if faults.p_429 else 'clean'}.db"
    shutil.copyfile(tpl.path, db)
    engine = make_engine(f"sqlite:///{db}")
    sender = None
    try:
        client = make_client(API_KEY, server.base, timeout=10, session=http)
        meters = ensure_meters(client, [UNIFIED_METER])
        customers = ensure_customers(client, {o: f"{o}@bench.test" for o in tpl.orgs})
        led = Ledger(engine)
        n = len(tpl.orgs)
        led.write_policies(
            "org-policy",
            [(_policy(o, customers[o], 1), 0, n + i) for i, o in enumerate(tpl.orgs)],
            {0: (2 * n, None)},
            {},
        )
        st = StripeSettings(api_base=server.base, api_key=SecretStr(API_KEY), mode=mode)
        sender = build_sender(st, led, session=http)
        server.set_faults(faults)
        c0, t0 = time.process_time(), time.perf_counter()
        while led.state_counts().get("pending"):
            sender.run_once()
            if time.perf_counter() - t0 > RUN_LIMIT_S:
                raise RuntimeError(f"{mode}: rows still pending after {RUN_LIMIT_S:.0f} s: {led.state_counts()}")
        seconds, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        injected = server.injected()
        server.set_faults(CLEAN)
        problems: list[str] = []
        counts = led.state_counts()
        if counts != {"sent": tpl.rows}:
            problems.append(f"row states {counts}")
        ours: dict[str, Decimal] = {}
        for r in led.rows():
            ours[r["org_id"]] = ours.get(r["org_id"], Decimal(0)) + Decimal(r["value"])
        end = tpl.first_bucket + (tpl.buckets + 1) * H
        for org in tpl.orgs:
            theirs = meter_totals(client, meters[UNIFIED_METER], customers[org], tpl.first_bucket, end)
            if theirs != ours.get(org, Decimal(0)):
                problems.append(f"{org}: Stripe {theirs} != ledger {ours.get(org)}")
        conflicting = server.conflicting()
        if conflicting:
            problems.append(f"{len(conflicting)} identifier(s) reached Stripe with two values")
        for p in problems[:10]:
            log.error("stripe bench %s: %s", mode, p)
        return RunResult(tpl.rows, seconds, not problems, problems, injected, cpu_s)
    finally:
        if sender is not None:
            sender.close()
        http.close()
        engine.dispose()


@register("stripe")
def bench_stripe(ctx: BenchContext) -> Iterator[Metric]:
    """Meter events/s delivered to the local Stripe server, v1 and v2, clean and with 10 % faults."""
    v2_tpl = build_template(ctx.workdir / "stripe-v2-template.db", *((200, 100) if not ctx.quick else (40, 50)))
    v1_tpl = build_template(ctx.workdir / "stripe-v1-template.db", *((100, 40) if not ctx.quick else (20, 25)))
    with LocalStripeProcess(ctx.workdir) as server:
        raw, raw_cpu = raw_stream_rate(server, ctx.scale(50_000, 10_000))
        ctx.raw["stripe_stream"] = raw
        yield Metric(
            "stripe_raw_stream_http_events_per_s",
            raw,
            "events/s",
            1.0,
            {
                "what": "bare aiohttp POSTs of 100-event v2 stream bodies, 8 in flight, same server",
                "cpu_us_per_event": round(raw_cpu, 3),
            },
            cpu_ratio_to_raw=1.0,
        )
        runs: list[tuple[str, Mode, FaultConfig, Template]] = [
            ("stripe_v2_events_per_s", "v2", CLEAN, v2_tpl),
            ("stripe_v2_faults10_events_per_s", "v2", FAULTS_10PCT, v2_tpl),
            ("stripe_v1_events_per_s", "v1", CLEAN, v1_tpl),
            ("stripe_v1_faults10_events_per_s", "v1", FAULTS_10PCT, v1_tpl),
        ]
        for name, mode, faults, tpl in runs:
            result = run_sender(server, tpl, mode, faults, ctx.workdir)
            cpu_us = result.cpu_s * 1e6 / result.events
            yield Metric(
                name,
                result.rate,
                "events/s",
                result.rate / raw,
                {
                    "events": result.events,
                    "seconds": round(result.seconds, 3),
                    "exact": result.exact,
                    "faults_injected": result.injected,
                    "cpu_us_per_event": round(cpu_us, 3),
                    **({"problems": result.problems[:5]} if result.problems else {}),
                },
                cpu_ratio_to_raw=raw_cpu / cpu_us if cpu_us else None,
            )
