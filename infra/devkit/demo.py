"""``make demo``: the whole pipeline on embedded parts, checked against an independent truth.

Steps: start the embedded broker and the local Stripe server (child processes, 127.0.0.1, free
ports); create the meters and one customer per pro org through the official SDK; publish org
policies and a simulated fleet's ticks (duplicates, reordering, arrays and single messages);
start ``edgebill worker`` (live sending, authority edge, BILL_FROM at the first simulated hour);
SIGKILL it mid-run and start it again (``--kill-worker``); wait until every tick is in the ledger,
every bucket is closed and every row is sent; then read Stripe's totals back through meter event
summaries and print, per org: ticks, GB-s from the simulator, from the ledger, and from Stripe.
Exit 0 only when all three agree exactly (and per meter). Everything started is stopped.

Parity: the fleet's cell rows are published to ``sandbox-scale-events`` and one drift case is
injected on the edge side (``--drift``, default: one org loses a sandbox's ticks for an hour). The demo
prints the parity table (drift per org and bucket) and passes only when it is clean for every other org
and flagged for exactly the injected (org, bucket) pairs. Billing exactness is checked against the truth
of the ticks actually published (a lost tick is not billed, and must not be).
"""

from __future__ import annotations

import logging
import random
import secrets
import signal
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

from infra.catalog import ensure_customers, ensure_meters, meter_totals
from infra.devkit.broker import free_port
from infra.devkit.simulator import (
    TIERS,
    UNIFIED_METER,
    DriftCase,
    Fleet,
    FleetSpec,
    build_fleet,
    inject_drift,
    pick_drift_specs,
    truth_of,
)
from infra.devkit.stack import Child, WorkerStack, wait_until
from infra.kafka_admin import ensure_topics, kafka_answers
from infra.kafka_io import publish_sync
from models.parity import dashboard_token
from models.policy import OrgPolicy
from sinks.stripe.v1 import make_client

__all__ = ["DemoOptions", "run_demo"]

log = logging.getLogger(__name__)

API_KEY = "sk_test_edgebill_demo"


@dataclass(frozen=True)
class DemoOptions:
    orgs: int = 24
    hours: int = 4
    seed: int = 7
    kills: int = 1
    timeout: float = 150.0
    keep: bool = False
    var_dir: Path = Path("var/demo")
    drift: tuple[str, ...] = ("missing",)  # kinds injected on the edge side (missing, skew), one org each
    serve: bool = False  # after the checks, keep everything running and print the dashboard link until Ctrl-C


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "infra.devkit.cli", *args]


def _fmt(x: Fraction | Decimal) -> str:
    d = Decimal(x.numerator) / Decimal(x.denominator) if isinstance(x, Fraction) else x
    return f"{d.quantize(Decimal('0.000001')):,}"


def run_demo(opts: DemoOptions) -> int:
    t0 = time.monotonic()
    logging.getLogger("infra.catalog").setLevel(logging.WARNING)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    root = (opts.var_dir / stamp).resolve()
    root.mkdir(parents=True, exist_ok=True)
    kport, sport, wport = free_port(), free_port(), free_port()
    bootstrap = f"127.0.0.1:{kport}"
    stripe_base = f"http://127.0.0.1:{sport}"
    db_url = f"sqlite:///{root / 'ledger.db'}"
    web_secret = secrets.token_hex(32)  # signs the dashboard link printed by --serve
    size = 3600
    now = int(time.time())
    start = (now // size - opts.hours - 1) * size  # whole past hours; the newest ends >= 1 h ago
    stack: WorkerStack | None = None
    children: list[Child] = []
    print(f"edgebill demo — logs and ledger in {root}")
    try:
        # The worker harness migrates the ledger now; its workers start once the fleet is published.
        stack = WorkerStack(
            bootstrap=bootstrap,
            database_url=db_url,
            logdir=root,
            group_id="edgebill-demo",
            web_port=wport,
            env={
                "EDGEBILL_STRIPE_API_BASE": stripe_base,
                "EDGEBILL_STRIPE_API_KEY": API_KEY,
                "EDGEBILL_SHADOW": "false",
                "EDGEBILL_PRO_BILLING_AUTHORITY": "edge",
                "EDGEBILL_BILL_FROM": str(start),
                "EDGEBILL_BUCKET_SECONDS": str(size),
                "EDGEBILL_PARITY_REFRESH_INTERVAL": "1",
                "EDGEBILL_WEB_INTERNAL_SECRET": web_secret,
            },
            stop_grace=10,
        )
        broker = Child(
            "broker", _cli("broker", "--port", str(kport), "--log-dir", str(root)), stack.env, root / "broker.log"
        )
        stripe_srv = Child("stripe", _cli("stripe-fake", "--port", str(sport)), stack.env, root / "stripe.log")
        children = [stripe_srv, broker]
        broker.start()
        stripe_srv.start()
        wait_until(lambda: kafka_answers(bootstrap, 0.5), 30, "the embedded broker")
        client = make_client(API_KEY, stripe_base, timeout=10)
        wait_until(lambda: _stripe_up(client), 30, "the local Stripe server")
        print(f"  broker {bootstrap}, local Stripe {stripe_base}   ({time.monotonic() - t0:.1f}s)")

        clean = build_fleet(FleetSpec(orgs=opts.orgs, hours=opts.hours, start=start, seed=opts.seed))
        # One drift case per kind, on the edge side; the fleet below is what the edge publishes (and bills).
        case = inject_drift(clean, pick_drift_specs(clean, list(opts.drift), seed=opts.seed) if opts.drift else [])
        fleet = Fleet(clean.spec, clean.orgs, case.ticks, truth_of(clean.orgs, case.ticks))
        meters = ensure_meters(client)
        customers = ensure_customers(client, {o.org_id: o.customer_email for o in fleet.orgs if o.plan == "pro"})
        print(f"  Stripe: {len(meters)} meters, {len(customers)} customers")

        ensure_topics(
            bootstrap,
            {
                "usage-ticks": 4,
                "org-policy": 4,
                "usage-ticks-dlq": 4,
                "sandbox-scale-events": 4,
                "sandbox-scale-events-dlq": 4,
                "billing-alerts": 1,
            },
        )
        policies = [
            (
                o.org_id.encode(),
                OrgPolicy.model_validate(
                    {
                        "org_id": o.org_id,
                        "plan": o.plan,
                        "billing_mode": o.billing_mode,
                        "stripe_customer_id": customers.get(o.org_id),
                        "effective_at": start - 86_400,
                    }
                ).to_json(),
            )
            for o in fleet.orgs
        ]
        publish_sync(bootstrap, "org-policy", policies)
        messages = fleet.messages()
        publish_sync(bootstrap, "usage-ticks", messages)
        scale = clean.scale_messages()  # the cell's view comes from the fleet as it really ran
        publish_sync(bootstrap, "sandbox-scale-events", scale)
        print(
            f"  produced {len(fleet.ticks):,} unique ticks as {len(messages):,} messages "
            f"({sum(1 for _, v in messages if v.startswith(b'[')):,} arrays) for {len(fleet.orgs)} orgs, "
            f"{opts.hours} h from {datetime.fromtimestamp(start, UTC):%Y-%m-%d %H:%M}Z, and "
            f"{len(clean.scale_rows()):,} cell rows as {len(scale):,} scale events   ({time.monotonic() - t0:.1f}s)"
        )
        for spec in case.specs:
            print(
                f"  injected drift: {spec.kind} on {spec.org_id} at "
                f"{datetime.fromtimestamp(spec.bucket_start, UTC):%H:%M}Z (edge side only)"
            )

        ledger = stack.ledger
        worker = stack.start_worker()
        rng = random.Random(opts.seed)
        expected_rows = _expected_rows(fleet)
        for k in range(opts.kills):
            # Kill at a random moment while the worker is busy ingesting, then start it again.
            target = rng.uniform(0.15, 0.7) * len(fleet.ticks)

            def busy(target: float = target, w: Child = worker) -> bool:
                return ledger.counters().get("ticks.ingested", 0) >= target or not w.alive

            stack.wait(
                busy,
                opts.timeout,
                "ingestion to start",
                step=0.05,
                fail_on_exit=False,
            )
            ingested = ledger.counters().get("ticks.ingested", 0)
            print(f"  SIGKILL worker #{k + 1} after {ingested:,} ticks ingested; restarting it")
            worker = stack.restart(worker, kill=True)

        def finished() -> bool:
            nonlocal worker
            if not worker.alive:
                print(f"  worker exited unexpectedly; restarting it. Last lines:\n{worker.tail(10)}")
                worker = stack.restart(worker)
                return False
            c = ledger.counters()
            states = ledger.state_counts()
            return (
                c.get("ticks.ingested", 0) >= len(fleet.ticks)
                and ledger.open_samples() == 0
                and states.get("sent", 0) >= expected_rows
                and states.get("pending", 0) == 0
            )

        stack.wait(finished, opts.timeout, "every tick billed and sent", step=0.5, fail_on_exit=False)
        print(f"  pipeline done: {ledger.state_counts()}   ({time.monotonic() - t0:.1f}s)")
        ok = _report(fleet, ledger, client, meters, customers, start, start + opts.hours * size)
        parity_ok = _parity(stack, fleet, case, len(scale), finished_ms=int(time.time() * 1000), timeout=opts.timeout)
        counters = ledger.counters()
        print(
            f"  ledger counters: ingested={counters.get('ticks.ingested', 0):,} "
            f"duplicates={counters.get('ticks.duplicate', 0):,} rejected={counters.get('records.rejected', 0)} "
            f"closes={counters.get('close.runs', 0)} corrections={counters.get('close.corrections', 0)} "
            f"worker starts={len(stack.workers)}"
        )
        print(
            f"\n{'PASS' if ok and parity_ok else 'FAIL'}: simulator, ledger and Stripe "
            f"{'agree exactly' if ok else 'DISAGREE'}; parity "
            f"{'clean for every other org, drift flagged exactly where injected' if parity_ok else 'WRONG'} "
            f"({time.monotonic() - t0:.1f}s)"
        )
        rc = 0 if ok and parity_ok else 1
        if opts.serve:
            _serve(stack, worker, f"http://127.0.0.1:{wport}", web_secret.encode(), bootstrap, stripe_base)
        return rc
    except Exception as exc:
        print(f"\nFAIL: {type(exc).__name__}: {exc}")
        if stack is not None:
            print(stack.logs(15))
        for c in children:
            print(f"--- last lines of {c.logpath}:\n{c.tail(15)}")
        return 1
    finally:
        if stack is not None:
            stack.close()
        for c in children:
            c.stop(10.0)
        if not opts.keep and root.exists():
            for p in sorted(root.glob("*")):
                if p.is_file():
                    p.unlink()
            root.rmdir()


def _serve(stack: WorkerStack, worker: Child, web: str, secret: bytes, bootstrap: str, stripe_base: str) -> None:
    """Keep the stack up, print the dashboard link, restart the worker if it dies; return on Ctrl-C or SIGTERM."""
    ttl = 12 * 3600
    token = dashboard_token(secret, int(time.time()) + ttl)
    print(f"\n  dashboard (valid {ttl // 3600} h): {web}/dashboard?token={token}")
    print(f"  broker {bootstrap}, local Stripe {stripe_base}, worker {web}; Ctrl-C stops everything", flush=True)

    def stop(_sig: int, _frame: object) -> None:
        raise KeyboardInterrupt

    # Both set here: a shell that starts the demo in the background leaves SIGINT ignored.
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while True:
            if not worker.alive:
                print(f"  worker exited; restarting it. Last lines:\n{worker.tail(10)}", flush=True)
                worker = stack.restart(worker)
            time.sleep(1.0)
    except KeyboardInterrupt:
        print("\n  stopping")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stripe_up(client: Any) -> bool:
    try:
        client.v1.billing.meters.list({"limit": 1})
    except Exception:
        return False
    return True


def _expected_rows(fleet: Fleet) -> int:
    """Rows the ledger must end with in ``sent`` (at least): one per billable (org, bucket, meter)."""
    size = fleet.spec.bucket_seconds
    modes = {o.org_id: o for o in fleet.orgs}
    keys: set[tuple[str, int, str]] = set()
    for t in fleet.ticks:
        o = modes[t.org_id]
        if o.plan != "pro":
            continue
        meter = UNIFIED_METER if o.billing_mode == "unified" else TIERS.get(t.memory_mb)
        if meter is not None and t.interval_s * t.memory_mb > 0:
            keys.add((t.org_id, t.ts_ms // 1000 // size * size, meter))
    return len(keys)


def _report(
    fleet: Fleet,
    ledger: Any,
    client: Any,
    meters: dict[str, str],
    customers: dict[str, str],
    start: int,
    end: int,
) -> bool:
    """Print the per-org table; True when simulator, ledger and Stripe agree exactly per (org, meter)."""
    sent: dict[tuple[str, str], Decimal] = {}
    for r in ledger.rows(state="sent"):
        key = (r["org_id"], r["meter"])
        sent[key] = sent.get(key, Decimal(0)) + Decimal(r["value"])
    ok = True
    mismatches: list[str] = []
    print()
    print(
        f"  {'org':<8} {'plan':<4} {'mode':<7} {'ticks':>6} {'unbilled':>8} {'GB-s (simulator)':>20} "
        f"{'GB-s (ledger)':>20} {'GB-s (Stripe)':>20}  ok"
    )
    for o in fleet.orgs:
        meters_of = fleet.meters_of(o) if o.plan == "pro" else []
        sim_gbs = Fraction(0)
        led_gbs = Decimal(0)
        str_gbs = Decimal(0)
        org_ok = True
        for m in meters_of:
            truth = fleet.truth.rounded(o.org_id, m)
            led = sent.get((o.org_id, m), Decimal(0))
            theirs = meter_totals(client, meters[m], customers[o.org_id], start, end + 3600)
            gb = Fraction(1) if m == UNIFIED_METER else Fraction(next(k for k, v in TIERS.items() if v == m), 1024)
            sim_gbs += truth * gb
            led_gbs += led * Decimal(gb.numerator) / Decimal(gb.denominator)
            str_gbs += theirs * Decimal(gb.numerator) / Decimal(gb.denominator)
            t = Decimal(truth.numerator) / Decimal(truth.denominator)
            if not (t == led == theirs):
                org_ok = False
                mismatches.append(f"{o.org_id} {m}: simulator {t} ledger {led} Stripe {theirs}")
        ok = ok and org_ok
        print(
            f"  {o.org_id:<8} {o.plan:<4} {o.billing_mode:<7} {fleet.truth.org_ticks[o.org_id]:>6} "
            f"{fleet.truth.org_unbillable_ticks[o.org_id]:>8} {_fmt(sim_gbs):>20} {_fmt(led_gbs):>20} "
            f"{_fmt(str_gbs):>20}  {'yes' if org_ok else 'NO'}"
        )
    for line in mismatches:
        print(f"  MISMATCH {line}")
    unbilled = ledger.unbilled()
    if unbilled:
        reasons: dict[str, int] = {}
        for u in unbilled:
            reasons[u["reason"]] = reasons.get(u["reason"], 0) + int(u["samples"])
        print(f"  counted, not billed (by design): {reasons}")
    return ok


def _parity(
    stack: WorkerStack, fleet: Fleet, case: DriftCase, scale_records: int, finished_ms: int, timeout: float
) -> bool:
    """Wait for a parity refresh after everything was read, print the table; True when it is clean for every
    org except the drifted ones, flagged for exactly the (org, bucket) pairs the injection changed."""
    from sinks.parity import ParityStore

    size = fleet.spec.bucket_seconds
    ledger = stack.ledger
    store = ParityStore(stack.engine, bucket_seconds=size)
    stack.wait(lambda: ledger.counters().get("scale.read", 0) >= scale_records, timeout, "the scale events", step=0.3)
    mark = max(finished_ms, int(time.time() * 1000))  # a refresh that starts after this has seen everything
    stack.wait(lambda: store.state().get("refreshed_ms", 0) > mark, timeout, "a parity refresh", step=0.3)
    start = fleet.spec.start
    buckets = list(range(start, start + fleet.spec.hours * size, size))
    rows = {(r.org_id, r.bucket_start): r for r in store.rows(start, buckets[-1] + size)}
    orgs = sorted({o for o, _ in rows})
    print("\n  parity: edge (usage ticks) vs cell (scale events), drift = (edge - cell) / cell per pro org and hour")
    print(f"  {'org':<8} " + " ".join(f"{datetime.fromtimestamp(b, UTC):%H:%M}Z".rjust(19) for b in buckets))
    for org in orgs:
        cells = []
        for b in buckets:
            r = rows.get((org, b))
            if r is None:
                cells.append("-".rjust(19))
                continue
            flag = "" if r.status.value == "ok" else f" {r.status.value.upper()}"
            cells.append(f"{r.drift * 100:+.2f}%{flag}".rjust(19))
        print(f"  {org:<8} " + " ".join(cells))
    flagged = {k for k, r in rows.items() if r.flagged}
    drifted = {s.org_id for s in case.specs}
    clean_orgs = [o for o in orgs if o not in drifted]
    ok = flagged == case.affected and all(not rows[k].flagged for k in rows if k[0] in clean_orgs)
    print(
        f"  {len(rows)} (org, hour) rows: {len(clean_orgs)} orgs clean in every hour; flagged {sorted(flagged)} "
        f"{'== injected' if flagged == case.affected else f'!= injected {sorted(case.affected)}'}"
    )
    return ok
