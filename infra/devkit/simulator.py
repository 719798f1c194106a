"""A seeded fleet simulator: orgs, sandboxes, usage ticks — and the truth they should bill.

The truth is computed here, independently of the billing code (its own arithmetic with
:class:`fractions.Fraction`, no import of :mod:`models.billing` math), from the set of *unique*
ticks generated, so the demo and the tests can compare the ledger and Stripe against it.

The cell side, for parity: :func:`scale_rows` derives the ``sandbox-scale-events`` rows that match the
ticks (one row per sandbox per run at one memory size; a resize closes a row and opens the next one at the
start of the first tick of the new size), and :func:`encode_scale_messages` publishes them as the cell's
change-data-capture would (open, then closed; some repeats, some stale "open" repeats after the close).
:func:`inject_drift` changes the *edge* side only — missing ticks, zombie ticks, clock skew — and says
exactly which (org, bucket) pairs it changed, computed with the simulator's own arithmetic.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

import orjson

__all__ = [
    "DRIFT_KINDS",
    "DriftCase",
    "DriftSpec",
    "Fleet",
    "FleetSpec",
    "OrgSpec",
    "SimScaleRow",
    "SimTick",
    "Truth",
    "build_fleet",
    "encode_messages",
    "encode_scale_messages",
    "inject_drift",
    "pick_drift_specs",
    "scale_rows",
    "truth_of",
]

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

    def scale_rows(self) -> list[SimScaleRow]:
        """The cell rows consistent with this fleet's ticks (see :func:`scale_rows`)."""
        return scale_rows(self.ticks)

    def scale_messages(self) -> list[tuple[bytes, bytes]]:
        return encode_scale_messages(self.scale_rows(), seed=self.spec.seed)


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


# ----------------------------------------------------------------------------------- the cell side


@dataclass(frozen=True, slots=True)
class SimScaleRow:
    """One cell ``sandbox_scale_events`` row (times in unix ms; ``ended_ms`` None = still open)."""

    id: str
    sandbox_id: str
    org_id: str
    worker_id: str
    memory_mb: int
    started_ms: int
    ended_ms: int | None
    cell_id: str = "sim-1"

    def record(self, *, closed: bool) -> dict[str, Any]:
        """The CDC value: the row as it is when open (``closed=False``) or after it closed."""

        def ts(ms: int) -> str:
            return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")

        return {
            "id": self.id,
            "sandbox_id": self.sandbox_id,
            "org_id": self.org_id,
            "cell_id": self.cell_id,
            "worker_id": self.worker_id,
            "memory_mb": self.memory_mb,
            "cpu_percent": 100 * max(1, self.memory_mb // 2048),
            "disk_mb": 20480,
            "started_at": ts(self.started_ms),
            "ended_at": ts(self.ended_ms) if closed and self.ended_ms is not None else None,
        }


def scale_rows(ticks: Iterable[SimTick]) -> list[SimScaleRow]:
    """Cell rows that match ``ticks``: per sandbox, one row per run of consecutive ticks at one memory size.

    A tick stamped ``t`` (whole second ``t = ts_ms // 1000``) covers ``(t − interval_s, t]``; a row runs
    from the start of its first tick to the whole second of its last one, so over a row the cell's
    seconds equal the ticks' ``interval_s`` sum exactly, and the two sides differ only by where a tick
    straddling a bucket boundary is counted.
    """
    by_sandbox: dict[str, list[SimTick]] = defaultdict(list)
    for t in ticks:
        by_sandbox[t.sandbox_id].append(t)
    rows: list[SimScaleRow] = []
    count: dict[str, int] = defaultdict(int)

    def close(sandbox: str, run: list[SimTick]) -> None:
        first, last = run[0], run[-1]
        count[sandbox] += 1
        rows.append(
            SimScaleRow(
                id=f"{sandbox}:se{count[sandbox] - 1}",
                sandbox_id=sandbox,
                org_id=first.org_id,
                worker_id=first.worker_id,
                memory_mb=first.memory_mb,
                started_ms=(first.ts_ms // 1000 - first.interval_s) * 1000,
                ended_ms=(last.ts_ms // 1000) * 1000,
            )
        )

    for sandbox in sorted(by_sandbox):
        run: list[SimTick] = []
        for t in sorted(by_sandbox[sandbox], key=lambda t: t.ts_ms):
            if run and (t.memory_mb != run[0].memory_mb or t.worker_id != run[0].worker_id):
                close(sandbox, run)
                run = []
            run.append(t)
        if run:
            close(sandbox, run)
    return rows


def encode_scale_messages(
    rows: Sequence[SimScaleRow], *, seed: int = 7, repeat_rate: float = 0.1
) -> list[tuple[bytes, bytes]]:
    """(key = sandbox_id, value) CDC messages in time order: each row open at its start, closed at its end.

    Like a real CDC feed it repeats itself: ``repeat_rate`` of the changes are published twice, and as
    many rows get their stale *open* version published again after the close (it must not reopen them).
    """
    rng = random.Random(seed + 2)
    events: list[tuple[int, int, SimScaleRow, bool]] = []
    for i, r in enumerate(rows):
        events.append((r.started_ms, i, r, False))
        if r.ended_ms is not None:
            events.append((r.ended_ms, i, r, True))
            if rng.random() < repeat_rate:
                events.append((r.ended_ms + 1, i, r, False))  # stale "open" after the close
        if rng.random() < repeat_rate:
            events.append((r.started_ms, i, r, False))
    events.sort(key=lambda e: (e[0], e[1], e[3]))
    return [(r.sandbox_id.encode(), orjson.dumps(r.record(closed=closed))) for _, _, r, closed in events]


# ----------------------------------------------------------------------------------- drift injection

DRIFT_KINDS = ("missing", "zombie", "skew")
ZOMBIE_WORKER = "w-zombie"


@dataclass(frozen=True)
class DriftSpec:
    """One injected disagreement between the edge and the cell, on the edge side.

    * ``missing``: the ticks of the org's biggest sandbox in buckets ``[bucket_start, +buckets)`` are lost;
    * ``zombie``: a worker that no longer owns that sandbox (``w-zombie``) keeps ticking for it in those
      buckets (new tick ids, same size and cadence): the edge counts it twice;
    * ``skew``: the worker of the org's biggest sandbox alive in ``bucket_start`` has its clock
      ``skew_seconds`` behind during that bucket: its ticks of that bucket are stamped earlier, so usage
      moves from ``bucket_start`` into the bucket before (``buckets`` is ignored).
    """

    kind: str
    org_id: str
    bucket_start: int
    buckets: int = 1
    skew_seconds: int = 1800


@dataclass
class DriftCase:
    ticks: list[SimTick]  # the edge side as published: the fleet's ticks with the drift applied
    specs: list[DriftSpec]
    effect_mb_s: dict[tuple[str, int], int]  # (org, bucket) -> signed change of the edge's MB-s

    @property
    def affected(self) -> set[tuple[str, int]]:
        return {k for k, v in self.effect_mb_s.items() if v}


def _edge_mb_s(ticks: Iterable[SimTick], size: int) -> dict[tuple[str, int], int]:
    out: dict[tuple[str, int], int] = defaultdict(int)
    for t in ticks:
        out[(t.org_id, t.ts_ms // 1000 // size * size)] += t.memory_mb * t.interval_s
    return out


def _cell_mb_ms(rows: Iterable[SimScaleRow], size: int) -> dict[tuple[str, int], int]:
    """The cell's exact MB-ms per (org, bucket), with the simulator's own clipping (closed rows only)."""
    out: dict[tuple[str, int], int] = defaultdict(int)
    for r in rows:
        end = r.ended_ms if r.ended_ms is not None else r.started_ms
        b = r.started_ms // 1000 // size * size
        while b * 1000 < end:
            lo, hi = max(r.started_ms, b * 1000), min(end, (b + size) * 1000)
            if hi > lo:
                out[(r.org_id, b)] += r.memory_mb * (hi - lo)
            b += size
    return out


def _biggest_sandbox(ticks: Iterable[SimTick], org: str, lo_ms: int, hi_ms: int) -> str | None:
    usage: dict[str, int] = defaultdict(int)
    for t in ticks:
        if t.org_id == org and lo_ms <= t.ts_ms < hi_ms:
            usage[t.sandbox_id] += t.memory_mb * t.interval_s
    return max(sorted(usage), key=lambda s: usage[s]) if usage else None


def _apply(ticks: list[SimTick], spec: DriftSpec, size: int) -> list[SimTick]:
    lo_ms = spec.bucket_start * 1000
    if spec.kind == "skew":
        hi_ms = lo_ms + size * 1000
        sandbox = _biggest_sandbox(ticks, spec.org_id, lo_ms, hi_ms)
        if sandbox is None:
            raise ValueError(f"{spec.org_id} has no usage in bucket {spec.bucket_start}")
        return [
            replace(t, ts_ms=t.ts_ms - spec.skew_seconds * 1000)
            if t.sandbox_id == sandbox and lo_ms <= t.ts_ms < hi_ms
            else t
            for t in ticks
        ]
    hi_ms = lo_ms + spec.buckets * size * 1000
    out: list[SimTick] = []
    chosen: dict[int, str | None] = {}
    for b in range(spec.buckets):
        blo = lo_ms + b * size * 1000
        chosen[b] = _biggest_sandbox(ticks, spec.org_id, blo, blo + size * 1000)
        if chosen[b] is None:
            raise ValueError(f"{spec.org_id} has no usage in bucket {spec.bucket_start + b * size}")
    for t in ticks:
        inside = t.org_id == spec.org_id and lo_ms <= t.ts_ms < hi_ms
        target = inside and t.sandbox_id == chosen[(t.ts_ms - lo_ms) // (size * 1000)]
        if spec.kind == "missing":
            if not target:
                out.append(t)
        elif spec.kind == "zombie":
            out.append(t)
            if target:
                out.append(
                    replace(
                        t,
                        id=f"{t.id}:zombie",
                        worker_id=ZOMBIE_WORKER,
                        ts_ms=t.ts_ms + 137,  # its own clock, a little off
                    )
                )
        else:
            raise ValueError(f"unknown drift kind {spec.kind!r} (one of {', '.join(DRIFT_KINDS)})")
    return out


def inject_drift(fleet: Fleet, specs: Sequence[DriftSpec], *, min_share: float = 0.10) -> DriftCase:
    """The fleet's ticks with ``specs`` applied, and exactly which (org, bucket) pairs they changed.

    Raises ValueError when an injection would be too small to be told from the benign boundary slop:
    every (org, bucket) it touches must change by at least ``min_share`` of that bucket's cell usage
    (choose specs with :func:`pick_drift_specs`).
    """
    size = fleet.spec.bucket_seconds
    ticks = list(fleet.ticks)
    for spec in specs:
        ticks = _apply(ticks, spec, size)
    before = _edge_mb_s(fleet.ticks, size)
    after = _edge_mb_s(ticks, size)
    effect = {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)}
    effect = {k: v for k, v in effect.items() if v}
    cell = _cell_mb_ms(fleet.scale_rows(), size)
    for key, delta in sorted(effect.items()):
        if abs(delta) * 1000 < min_share * cell.get(key, 0):
            raise ValueError(f"drift on {key} is too small to tell from boundary slop: {delta} MB-s")
    return DriftCase(ticks=ticks, specs=list(specs), effect_mb_s=effect)


def pick_drift_specs(
    fleet: Fleet,
    kinds: Sequence[str],
    *,
    seed: int = 11,
    buckets: int = 1,
    exclude: Iterable[str] = (),
    at: int | None = None,
) -> list[DriftSpec]:
    """One spec per kind, each on its own pro org, on a bucket where its effect is unmistakable.

    Buckets are chosen from the second simulated hour on (a skew moves usage into the hour before), or
    ``at`` (a bucket start) for every spec.
    """
    rng = random.Random(seed)
    size = fleet.spec.bucket_seconds
    used = set(exclude)
    pro = [o.org_id for o in fleet.orgs if o.plan == "pro"]
    starts = [fleet.spec.start + h * size for h in range(1, fleet.spec.hours - (buckets - 1))]
    if at is not None:
        starts = [at]
    specs: list[DriftSpec] = []
    for kind in kinds:
        candidates = [(o, b) for o in pro if o not in used for b in starts]
        rng.shuffle(candidates)
        for org, b in candidates:
            spec = DriftSpec(kind, org, b, buckets=1 if kind == "skew" else buckets)
            try:
                case = inject_drift(fleet, [spec], min_share=0.25)
            except ValueError:
                continue
            if kind == "skew" and len(case.affected) != 2:
                continue
            specs.append(spec)
            used.add(org)
            break
        else:
            raise ValueError(f"no org and bucket where a {kind!r} drift is unmistakable")
    return specs


def truth_of(orgs: Sequence[OrgSpec], ticks: Iterable[SimTick]) -> Truth:
    """The truth for an arbitrary set of unique ticks (e.g. a :class:`DriftCase`'s), as :func:`build_fleet`
    computes it for the fleet's own ticks."""
    by_id = {o.org_id: o for o in orgs}
    truth = Truth()
    for t in ticks:
        _account(truth, by_id[t.org_id], t)
    return truth
