"""A seeded fleet simulator: orgs, sandboxes, usage ticks — and the truth they should bill.

The truth is computed here, independently of the billing code (its own arithmetic with
:class:`fractions.Fraction`, no import of :mod:`models.billing` math), from the set of *unique*
ticks generated, so the demo and the tests can compare the ledger and Stripe against it.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

import orjson

__all__ = ["Fleet", "FleetSpec", "OrgSpec", "SimTick", "Truth", "build_fleet", "encode_messages"]

UNIFIED_METER = "sandbox_compute_sandbox_overage"
TIERS = {
    1024: "sandbox_compute_sandbox_1gb",
    4096: "sandbox_compute_sandbox_4gb",
    8192: "sandbox_compute_sandbox_8gb",
    16384: "sandbox_compute_sandbox_16gb",
    32768: "sandbox_compute_sandbox_32gb",
    65536: "sandbox_compute_sandbox_64gb",
}
ALL_METERS = [UNIFIED_METER, *TIERS.values()]


@dataclass(frozen=True)
class FleetSpec:
    orgs: int = 24
    hours: int = 4
    start: int = 0  # unix s, bucket aligned: first simulated bucket
    bucket_seconds: int = 3600
    seed: int = 7
    tick_seconds: int = 20
    max_sandboxes: int = 3
    legacy_share: float = 0.35
    free_orgs: int = 2
    duplicate_rate: float = 0.10
    batch_share: float = 0.5  # share of ticks sent inside JSON arrays
    max_batch: int = 40
    odd_memory_orgs: int = 1  # legacy orgs that also run a non-tier memory size (visible as unbillable)


@dataclass
class OrgSpec:
    org_id: str
    plan: str
    billing_mode: str
    customer_email: str


@dataclass(frozen=True, slots=True)
class SimTick:
    id: str
    org_id: str
    sandbox_id: str
    memory_mb: int
    interval_s: int
    ts_ms: int
    worker_id: str = "w-1"

    def envelope(self) -> dict[str, Any]:
        ts = datetime.fromtimestamp(self.ts_ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        return {
            "id": self.id,
            "type": "usage_tick",
            "sandbox_id": self.sandbox_id,
            "org_id": self.org_id,
            "plan": "pro",
            "worker_id": self.worker_id,
            "cell_id": "sim-1",
            "payload": {
                "sandbox_id": self.sandbox_id,
                "cost_cents": 10,
                "interval_s": self.interval_s,
                "memory_mb": self.memory_mb,
                "cpu_count": max(1, self.memory_mb // 2048),
            },
            "timestamp": ts,
        }


@dataclass
class Truth:
    """What should be billed, from the unique ticks: per (org, meter) exact value, per org GB-s."""

    meter_values: dict[tuple[str, str], Fraction] = field(default_factory=lambda: defaultdict(Fraction))
    org_gb_seconds: dict[str, Fraction] = field(default_factory=lambda: defaultdict(Fraction))
    org_ticks: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    org_unbillable_ticks: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def rounded(self, org: str, meter: str) -> Fraction:
        """The value Stripe must hold: the exact total rounded once, half up, to 6 decimals."""
        v = self.meter_values.get((org, meter), Fraction(0))
        scaled = v * 10**6
        whole = scaled.numerator // scaled.denominator
        if (scaled - whole) * 2 >= 1:
            whole += 1
        return Fraction(whole, 10**6)


@dataclass
class Fleet:
    spec: FleetSpec
    orgs: list[OrgSpec]
    ticks: list[SimTick]  # unique ticks
    truth: Truth

    def meters_of(self, org: OrgSpec) -> list[str]:
        return [UNIFIED_METER] if org.billing_mode == "unified" else list(TIERS.values())

    def messages(self) -> list[tuple[bytes, bytes]]:
        return encode_messages(self.ticks, self.spec)


def build_fleet(spec: FleetSpec) -> Fleet:
    rng = random.Random(spec.seed)
    orgs: list[OrgSpec] = []
    for i in range(spec.orgs):
        free = i >= spec.orgs - spec.free_orgs
        legacy = (not free) and rng.random() < spec.legacy_share
        orgs.append(
            OrgSpec(
                org_id=f"org_{i:03d}",
                plan="free" if free else "pro",
                billing_mode="legacy" if legacy else "unified",
                customer_email=f"billing+org{i:03d}@example.test",
            )
        )
    legacy_orgs = [o for o in orgs if o.billing_mode == "legacy" and o.plan == "pro"]
    odd = {o.org_id for o in legacy_orgs[: spec.odd_memory_orgs]}
    window_end = spec.start + spec.hours * spec.bucket_seconds
    truth = Truth()
    ticks: list[SimTick] = []
    tier_sizes = list(TIERS)[:5]
    # Unified orgs also run sizes that are not whole GB, so GB-s values carry decimals (rounding is exercised).
    unified_sizes = [1024, 1536, 3000, 4096, 8192, 16384]
    for o in orgs:
        for s in range(rng.randint(1, spec.max_sandboxes)):
            sandbox = f"sb_{o.org_id[4:]}_{s}"
            gen = 0
            start = spec.start + rng.randrange(0, spec.bucket_seconds)
            stop = window_end - rng.randrange(0, spec.bucket_seconds)
            sizes = unified_sizes if o.billing_mode == "unified" else tier_sizes
            memory = rng.choice(sizes)
            if o.org_id in odd and s == 0:
                memory = 2048  # not a legacy tier
            t = start
            row = 0
            while t < stop:
                if rng.random() < 0.004 and o.org_id not in odd:  # resize
                    memory = rng.choice(sizes)
                if rng.random() < 0.002:  # hibernate + wake: a new SQLite generation restarts row ids
                    gen += 1
                    row = 0
                interval = spec.tick_seconds + rng.choice((-1, 0, 0, 0, 1))
                t += interval
                row += 1
                tick = SimTick(
                    id=f"{sandbox}:{gen}:{row}",
                    org_id=o.org_id,
                    sandbox_id=sandbox,
                    memory_mb=memory,
                    interval_s=interval,
                    ts_ms=t * 1000 + rng.randrange(0, 1000),
                )
                if tick.ts_ms >= window_end * 1000:
                    break
                ticks.append(tick)
                _account(truth, o, tick)
    return Fleet(spec=spec, orgs=orgs, ticks=ticks, truth=truth)


def _account(truth: Truth, org: OrgSpec, tick: SimTick) -> None:
    truth.org_ticks[org.org_id] += 1
    if org.plan != "pro":
        truth.org_unbillable_ticks[org.org_id] += 1
        return
    gbs = Fraction(tick.memory_mb * tick.interval_s, 1024)
    if org.billing_mode == "unified":
        truth.meter_values[(org.org_id, UNIFIED_METER)] += gbs
        truth.org_gb_seconds[org.org_id] += gbs
        return
    meter = TIERS.get(tick.memory_mb)
    if meter is None:
        truth.org_unbillable_ticks[org.org_id] += 1
        return
    truth.meter_values[(org.org_id, meter)] += tick.interval_s
    truth.org_gb_seconds[org.org_id] += gbs


def encode_messages(ticks: list[SimTick], spec: FleetSpec) -> list[tuple[bytes, bytes]]:
    """(key, value) Kafka messages: time-ordered with local shuffles, some batched, ~duplicate_rate repeats."""
    rng = random.Random(spec.seed + 1)
    ordered = sorted(ticks, key=lambda t: t.ts_ms)
    # Local reordering: swap neighbours within a few seconds of each other.
    for i in range(len(ordered) - 1):
        if rng.random() < 0.2:
            ordered[i], ordered[i + 1] = ordered[i + 1], ordered[i]
    stream: list[SimTick] = []
    for t in ordered:
        stream.append(t)
        if rng.random() < spec.duplicate_rate:
            # Redelivery: the same tick again, a little later in the stream.
            stream.insert(max(0, len(stream) - rng.randint(0, 50)), t)
    messages: list[tuple[bytes, bytes]] = []
    pending: dict[str, list[SimTick]] = defaultdict(list)
    for t in stream:
        if rng.random() < spec.batch_share:
            bucket = pending[t.org_id]
            bucket.append(t)
            if len(bucket) >= rng.randint(2, spec.max_batch):
                messages.append((t.org_id.encode(), orjson.dumps([x.envelope() for x in bucket])))
                bucket.clear()
        else:
            messages.append((t.org_id.encode(), orjson.dumps(t.envelope())))
    for org, bucket in pending.items():
        if bucket:
            messages.append((org.encode(), orjson.dumps([x.envelope() for x in bucket])))
    return messages


def iter_file_messages(lines: Iterator[bytes]) -> Iterator[tuple[bytes | None, bytes]]:
    """Messages from JSON lines (an envelope or an array per line); the key is the org of the first."""
    for line in lines:
        line = line.strip()
        if not line:
            continue
        key: bytes | None = None
        try:
            doc = orjson.loads(line)
            first = doc[0] if isinstance(doc, list) and doc else doc
            if isinstance(first, dict) and isinstance(first.get("org_id"), str):
                key = first["org_id"].encode()
        except orjson.JSONDecodeError:
            key = None  # sent as is: the worker dead-letters it with its reason
        yield key, line
