"""A seeded, repeatable fault scenario for the pipeline, with its own truth.

The truth is computed here from the *unique* ticks and the policies, with a deliberately naive
implementation (linear policy lookup, Fraction arithmetic) that shares no code with the billing path.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

import orjson

UNIFIED = "sandbox_compute_sandbox_overage"
TIERS = {
    1024: "sandbox_compute_sandbox_1gb",
    4096: "sandbox_compute_sandbox_4gb",
    8192: "sandbox_compute_sandbox_8gb",
    16384: "sandbox_compute_sandbox_16gb",
    32768: "sandbox_compute_sandbox_32gb",
    65536: "sandbox_compute_sandbox_64gb",
}
H = 3600
DAY = 86400

Message = tuple[bytes | None, bytes, int | None]


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class ChaosTick:
    id: str
    org: str
    sandbox: str
    memory_mb: int
    interval_s: int
    ts_ms: int

    def envelope(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "usage_tick",
            "sandbox_id": self.sandbox,
            "org_id": self.org,
            "plan": "pro",
            "worker_id": "w-1",
            "cell_id": "chaos",
            "payload": {"sandbox_id": self.sandbox, "interval_s": self.interval_s, "memory_mb": self.memory_mb},
            "timestamp": _iso(self.ts_ms),
        }


@dataclass(frozen=True)
class ChaosPolicy:
    org: str
    plan: str
    mode: str
    effective_s: int


@dataclass
class Scenario:
    seed: int
    start: int  # first bucket start (unix s)
    hours: int
    partitions: int
    orgs: list[str]
    policies: list[ChaosPolicy]
    ticks: list[ChaosTick]  # unique, including late and expired ones
    phase1: list[Message]
    phase2: list[Message]  # published after buckets closed: late ticks, old duplicates, expired ticks
    malformed: list[bytes]
    expired_buckets: set[int] = field(default_factory=set)

    # ---------------------------------------------------------------- truth

    def policy_at(self, org: str, ts_ms: int) -> ChaosPolicy | None:
        best: ChaosPolicy | None = None
        for p in self.policies:
            if p.org == org and p.effective_s * 1000 <= ts_ms and (best is None or p.effective_s >= best.effective_s):
                best = p
        return best

    def truth_units(self) -> dict[tuple[str, int, str], int]:
        """(org, bucket_start, meter) -> exact integer units (MB-s for unified, seconds for tiers)."""
        out: dict[tuple[str, int, str], int] = defaultdict(int)
        for t in self.ticks:
            pol = self.policy_at(t.org, t.ts_ms)
            if pol is None or pol.plan != "pro":
                continue
            bucket = (t.ts_ms // 1000) - (t.ts_ms // 1000) % H
            if pol.mode == "unified":
                if t.memory_mb * t.interval_s:
                    out[(t.org, bucket, UNIFIED)] += t.memory_mb * t.interval_s
            elif t.memory_mb in TIERS and t.interval_s:
                out[(t.org, bucket, TIERS[t.memory_mb])] += t.interval_s
        return dict(out)

    def truth_values(self, exclude_buckets: set[int]) -> dict[tuple[str, str], Fraction]:
        """(org, meter) -> exact value over the buckets not excluded."""
        out: dict[tuple[str, str], Fraction] = defaultdict(Fraction)
        for (org, bucket, meter), units in self.truth_units().items():
            if bucket in exclude_buckets:
                continue
            out[(org, meter)] += Fraction(units, 1024) if meter == UNIFIED else Fraction(units)
        return dict(out)


def round6(x: Fraction) -> Fraction:
    scaled = x * 10**6
    whole = scaled.numerator // scaled.denominator
    if (scaled - whole) * 2 >= 1:
        whole += 1
    return Fraction(whole, 10**6)


def build(seed: int, now_s: int, *, partitions: int = 4, hours: int = 3, n_orgs: int = 9) -> Scenario:
    rng = random.Random(seed)
    start = (now_s // H - hours - 2) * H
    end = start + hours * H
    orgs = [f"c{seed}_org{i}" for i in range(n_orgs)]
    policies: list[ChaosPolicy] = []
    for i, org in enumerate(orgs):
        if i == 0:  # free, then upgraded to pro at :30 of the second hour
            policies.append(ChaosPolicy(org, "free", "unified", start - 60 * DAY))
            policies.append(ChaosPolicy(org, "pro", "unified", start + H + 1800))
        elif i == 1:  # pro, downgraded to free at :20 of the last hour
            policies.append(ChaosPolicy(org, "pro", "legacy", start - 60 * DAY))
            policies.append(ChaosPolicy(org, "free", "legacy", start + 2 * H + 1200))
        elif i == n_orgs - 1:
            policies.append(ChaosPolicy(org, "free", "unified", start - 60 * DAY))
        else:
            policies.append(ChaosPolicy(org, "pro", rng.choice(["unified", "unified", "legacy"]), start - 60 * DAY))
    ticks: list[ChaosTick] = []
    for org in orgs:
        legacy = any(p.org == org and p.mode == "legacy" for p in policies)
        sizes = [1024, 4096, 8192, 2048] if legacy else [1024, 1536, 3000, 4096, 8192]
        for s in range(rng.randint(1, 3)):
            sb = f"{org}_sb{s}"
            t = start + rng.randrange(0, 1200)
            stop = end - rng.randrange(0, 1200)
            mem = rng.choice(sizes)
            gen, row = 0, 0
            while t < stop:
                if rng.random() < 0.01:
                    mem = rng.choice(sizes)
                interval = rng.choice([19, 20, 20, 21, 40])
                t += interval
                row += 1
                ts_ms = t * 1000 + rng.randrange(1000)
                if ts_ms >= end * 1000:
                    break
                ticks.append(ChaosTick(f"{sb}:{gen}:{row}", org, sb, mem, interval, ts_ms))
    # Expired: usage 40 days ago (Stripe's window is 35 days): must end as visible `expired` rows.
    old_bucket = (now_s - 40 * DAY) // H * H
    expired = [
        ChaosTick(f"{orgs[2]}_old:0:{k}", orgs[2], f"{orgs[2]}_old", 4096, 20, (old_bucket + 20 * k + 5) * 1000)
        for k in range(1, 31)
    ]
    # Late after close: a share of the first hour's ticks is held back until phase 2.
    first_hour = [t for t in ticks if t.ts_ms < (start + H) * 1000]
    late = set(rng.sample(range(len(first_hour)), k=max(5, len(first_hour) // 20)))
    late_ids = {first_hour[i].id for i in late}
    on_time = [t for t in ticks if t.id not in late_ids]
    late_ticks = [t for t in ticks if t.id in late_ids]
    all_ticks = ticks + expired

    malformed = [
        b"{definitely not json",
        orjson.dumps({"id": "bad:1", "payload": {"interval_s": 20}, "timestamp": _iso(start * 1000)}),
        orjson.dumps({"id": "bad:2", "org_id": orgs[1], "timestamp": "half past ten"}),
        orjson.dumps(
            {"id": "bad:3", "org_id": orgs[1], "payload": {"interval_s": -20}, "timestamp": _iso(start * 1000)}
        ),
        orjson.dumps(["not an envelope", 42]),
        b"",
    ]
    phase1 = _encode(on_time, rng, partitions, dup_rate=0.12, malformed=malformed)
    # Phase 2: late ticks, duplicates of long-delivered ticks (must be absorbed), and expired usage.
    old_dups = rng.sample(on_time, k=min(len(on_time), 200))
    phase2 = _encode(late_ticks + old_dups + expired, rng, partitions, dup_rate=0.1, malformed=[])
    return Scenario(
        seed=seed,
        start=start,
        hours=hours,
        partitions=partitions,
        orgs=orgs,
        policies=policies,
        ticks=all_ticks,
        phase1=phase1,
        phase2=phase2,
        malformed=malformed,
        expired_buckets={old_bucket},
    )


def _encode(
    ticks: list[ChaosTick], rng: random.Random, partitions: int, *, dup_rate: float, malformed: list[bytes]
) -> list[Message]:
    """Time order with heavy local reordering, duplicates, arrays and singles, random partitions."""
    stream = sorted(ticks, key=lambda t: t.ts_ms)
    for i in range(len(stream)):  # reorder: move items up to ~40 positions
        j = min(len(stream) - 1, i + rng.randrange(0, 40))
        stream[i], stream[j] = stream[j], stream[i]
    with_dups: list[ChaosTick] = []
    for t in stream:
        with_dups.append(t)
        if rng.random() < dup_rate:
            with_dups.insert(max(0, len(with_dups) - rng.randrange(0, 300)), t)
    out: list[Message] = []
    i = 0
    while i < len(with_dups):
        # Random partition (not by org): one org's ticks interleave across partitions.
        part = rng.randrange(partitions)
        if rng.random() < 0.35:
            n = rng.randint(2, 25)
            chunk = with_dups[i : i + n]
            out.append((chunk[0].org.encode(), orjson.dumps([t.envelope() for t in chunk]), part))
            i += n
        else:
            t = with_dups[i]
            out.append((t.org.encode(), orjson.dumps(t.envelope()), part))
            i += 1
    for bad in malformed:
        out.insert(rng.randrange(len(out) + 1), (b"bad", bad, rng.randrange(partitions)))
    return out
