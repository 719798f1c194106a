"""The seeded fault-injection run: exact money under every fault at once.

Per seed: ≥ 10 % duplicate ticks, heavy reordering across partitions, arrays and single messages,
malformed records mixed in, a policy upgrade and a downgrade inside buckets, late ticks inside the
grace period and after their bucket closed, ticks past Stripe's 35-day window, Stripe faults (429,
500, answers lost after Stripe recorded the event), five SIGKILLs of the worker at random moments,
and a second worker joining and leaving the group during the run.

The truth is computed by ``chaos.py`` independently of the billing code. Set
``EDGEBILL_TEST_CHAOS_SEEDS=1,2,3`` to run more seeds (default: one).
"""

from __future__ import annotations

import random
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction
from typing import Any

import chaos
import orjson
import pytest
from pydantic_settings import BaseSettings, SettingsConfigDict

from infra.catalog import ensure_customers, ensure_meters, meter_totals
from infra.devkit.stripe_fake import FaultConfig
from infra.kafka_io import publish_sync, read_topic_sync
from models.policy import OrgPolicy

pytestmark = pytest.mark.integration


class _ChaosEnv(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGEBILL_TEST_CHAOS_", frozen=True, extra="ignore")

    seeds: str = "1"


SEEDS = [int(s) for s in _ChaosEnv().seeds.split(",") if s.strip()]
KILLS = 5


def _dec(f: Fraction) -> Decimal:
    return Decimal(f.numerator) / Decimal(f.denominator)


@pytest.mark.parametrize("seed", SEEDS)
def test_seeded_fault_run_bills_exactly(make_stack: Callable[..., Any], seed: int) -> None:
    faults = FaultConfig(seed=seed, p_429=0.03, p_500=0.03, p_cutoff=0.03)
    now = int(time.time())
    bill_from = (now - 60 * 86400) // 3600 * 3600  # before the 40-day-old usage: it must be `expired`, not skipped
    stack = make_stack(stripe_faults=faults, EDGEBILL_STRIPE_SEND_INTERVAL="0.5", EDGEBILL_BILL_FROM=str(bill_from))
    sc = chaos.build(seed, now)
    rng = random.Random(seed * 7919)

    meters = ensure_meters(stack.client)
    customers = ensure_customers(stack.client, {o: f"{o}@example.test" for o in sc.orgs})
    policies = [
        (
            p.org.encode(),
            OrgPolicy.model_validate(
                {
                    "org_id": p.org,
                    "plan": p.plan,
                    "billing_mode": p.mode,
                    "stripe_customer_id": customers[p.org],
                    "effective_at": p.effective_s,
                }
            ).to_json(),
        )
        for p in sc.policies
    ]
    publish_sync(stack.bootstrap, stack.topic("org-policy"), policies)

    # Phase 1 is published in paced chunks while workers come and go.
    chunks = [sc.phase1[i : i + 120] for i in range(0, len(sc.phase1), 120)]
    published = threading.Event()

    def producer() -> None:
        for chunk in chunks:
            publish_sync(stack.bootstrap, stack.topic("usage-ticks"), chunk)
            time.sleep(0.8)
        published.set()

    prod = threading.Thread(target=producer, daemon=True)
    worker = stack.start_worker()
    prod.start()
    t0 = time.monotonic()
    kill_at = sorted(rng.uniform(2.0, 40.0) for _ in range(KILLS))
    join_at, leave_at = rng.uniform(5.0, 12.0), rng.uniform(18.0, 30.0)
    second: Any = None
    events: list[str] = []
    pending = [("kill", t) for t in kill_at] + [("join", join_at), ("leave", leave_at)]
    pending.sort(key=lambda e: e[1])
    for kind, at in pending:
        time.sleep(max(0.0, at - (time.monotonic() - t0)))
        if kind == "kill":
            stack.kill9(worker)
            events.append(f"{at:.1f}s SIGKILL worker (ingested={stack.ledger.counters().get('ticks.ingested', 0)})")
            worker = stack.start_worker()
        elif kind == "join":
            second = stack.start_worker()
            events.append(f"{at:.1f}s second worker joins")
        else:
            stack.stop(second)
            events.append(f"{at:.1f}s second worker leaves")
    prod.join(timeout=120)
    assert published.is_set(), "producer did not finish"

    unique_phase1 = len(sc.ticks) - sum(
        1 for m in sc.phase2 for e in _envelopes(m[1]) if e["id"] not in _ids(sc.phase1)
    )

    def phase1_done() -> bool:
        c = stack.ledger.counters()
        st = stack.ledger.state_counts()
        return (
            c.get("ticks.ingested", 0) >= unique_phase1
            and stack.ledger.open_samples() == 0
            and not (st.get("pending") or st.get("deferred_no_customer"))
        )

    stack.wait(phase1_done, 120, f"phase 1 to be billed; events: {events}")
    closed_before = {r["id"] for r in stack.ledger.rows()}

    # Phase 2: late ticks for closed buckets, stale duplicates, usage older than 35 days.
    publish_sync(stack.bootstrap, stack.topic("usage-ticks"), sc.phase2)

    def all_done() -> bool:
        c = stack.ledger.counters()
        st = stack.ledger.state_counts()
        return (
            c.get("ticks.ingested", 0) == len(sc.ticks)
            and stack.ledger.open_samples() == 0
            and not (st.get("pending") or st.get("deferred_no_customer"))
        )

    stack.wait(all_done, 90, f"phase 2 to be billed; events: {events}")
    time.sleep(2.0)  # a few more closer/sender cycles: nothing may change any more
    assert stack.ledger.counters()["ticks.ingested"] == len(sc.ticks)
    rows = stack.ledger.rows()

    # 1. Exact units per (org, bucket, meter), corrections included.
    got_units: dict[tuple[str, int, str], int] = defaultdict(int)
    for r in rows:
        got_units[(r["org_id"], r["bucket_start"], r["meter"])] += r["units"]
    assert dict(got_units) == sc.truth_units()

    # 2. Late ticks after close became new correction rows (rows are never rewritten: values only add up).
    new_corrections = [r for r in rows if r["revision"] > 0 and r["id"] not in closed_before]
    assert new_corrections, "phase 2's late ticks must produce correction rows"

    # 3. Usage past Stripe's window is visible as `expired`, never sent.
    expired = [r for r in rows if r["state"] == "expired"]
    assert {r["bucket_start"] for r in expired} == sc.expired_buckets
    assert {r["state"] for r in rows} <= {"sent", "expired"}

    # 4. Per (org, meter): sent values add up to the exact total rounded once; Stripe holds the same.
    truth = sc.truth_values(exclude_buckets=sc.expired_buckets)
    sent: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for r in rows:
        if r["state"] == "sent":
            sent[(r["org_id"], r["meter"])] += Decimal(r["value"])
    assert {k: v for k, v in sent.items() if v} == {k: _dec(chaos.round6(v)) for k, v in truth.items() if v}
    for (org, meter), value in sent.items():
        theirs = meter_totals(stack.client, meters[meter], customers[org], sc.start, sc.start + (sc.hours + 2) * 3600)
        assert theirs == value, (org, meter)

    # 5. No identifier ever reached Stripe with two values.
    assert stack.stripe.state.conflicting_identifiers() == []

    # 6. Every malformed record is in the DLQ with its reason (at least once: DLQ writes are at-least-once).
    dlq = read_topic_sync(stack.bootstrap, stack.topic("usage-ticks-dlq"), idle_timeout=1.5)
    assert all(r.headers.get("edgebill-reason") and r.headers.get("edgebill-source") for r in dlq)
    by_value = {r.value for r in dlq}
    for bad in sc.malformed:
        if bad == orjson.dumps(["not an envelope", 42]):
            assert {orjson.dumps("not an envelope"), orjson.dumps(42)} <= by_value
        else:
            assert bad in by_value, bad
    assert len(events) == KILLS + 2


def _envelopes(value: bytes) -> list[dict[str, Any]]:
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return []
    docs = doc if isinstance(doc, list) else [doc]
    return [d for d in docs if isinstance(d, dict) and "id" in d]


_ids_cache: dict[int, set[str]] = {}


def _ids(messages: list[Any]) -> set[str]:
    key = id(messages)
    if key not in _ids_cache:
        _ids_cache[key] = {e["id"] for m in messages for e in _envelopes(m[1])}
    return _ids_cache[key]
