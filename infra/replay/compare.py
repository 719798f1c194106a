"""Replay's comparison with the ledger (read-only, through :class:`~sinks.ledger.Ledger` methods): which ids
and buckets are in scope, the ledger's ids, and the re-derived usage against what the ledger billed."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from decimal import Decimal

from infra.replay.plan import NO_HIGH, NO_LOW, PartitionRange, ReplaySpec
from infra.replay.price import Aggregates, Key, Pricer
from infra.replay.report import KeyDiff, OrgMeterDiff
from infra.replay.scan import ScanCounts
from models.billing import bucket_start, bucket_start_s
from models.errors import LedgerError
from sinks.ledger import Ledger

__all__: list[str] = []


def _check_bucket_seconds(ledger: Ledger, bucket_seconds: int) -> None:
    got = ledger.stored_bucket_seconds()
    if got is not None and got != bucket_seconds:
        raise LedgerError(
            f"this ledger was built with EDGEBILL_BUCKET_SECONDS={got}; replaying with {bucket_seconds} "
            "would not line up with its buckets"
        )


def _id_scope(lo: int, hi: int, counts: ScanCounts, size: int) -> tuple[int | None, int | None]:
    """Bucket starts [first, last] of the samples the tick-level comparison looks at."""
    first = bucket_start(lo, size) if lo != NO_LOW else None
    last = bucket_start(hi - 1, size) if hi != NO_HIGH else None
    if counts.min_ts <= counts.max_ts:  # some tick was selected: its buckets bound an open side
        if first is None:
            first = bucket_start(counts.min_ts, size)
        if last is None:
            last = bucket_start(counts.max_ts, size)
    return first, last


def _compared_buckets(
    spec: ReplaySpec, counts: ScanCounts, size: int, floor: int | None = None
) -> tuple[int, int] | None:
    """[first, last] bucket starts lying wholly inside the window (open sides: the ticks' own span), none
    before ``floor`` (the ledger's dedup horizon: retention dropped the ticks before it)."""
    first: int | None = None
    last: int | None = None
    if spec.since_ms is not None:
        first = bucket_start(spec.since_ms - 1, size) + size  # the first bucket starting at or after since
    if spec.bucket_from is not None:
        b = bucket_start_s(spec.bucket_from, size)
        first = b if first is None else max(first, b)
    if spec.until_ms is not None:
        last = bucket_start_s(spec.until_ms // 1000 - size, size)  # the bucket must end by until
    if spec.bucket_to is not None:
        b = bucket_start_s(spec.bucket_to, size)
        last = b if last is None else min(last, b)
    if counts.min_ts <= counts.max_ts:
        if first is None:
            first = bucket_start(counts.min_ts, size)
        if last is None:
            last = bucket_start(counts.max_ts, size)
    if floor is not None and first is not None:
        first = max(first, floor)
    if first is None or last is None or first > last:
        return None
    return first, last


def _ledger_ids(
    ledger: Ledger,
    first: int | None,
    last: int | None,
    lo: int,
    hi: int,
    partial: Sequence[PartitionRange] | None,
    orgs: Sequence[str] | None = None,
) -> tuple[set[str], set[str]]:
    """(ids of the samples in scope, the ids among them that the range should hold).

    Scope: buckets [first, last] and ts in [lo, hi). With a partial offset range, a sample belongs to the
    range only when the offset it was ingested from lies in a range read.
    """
    if first is None or last is None:
        return set(), set()
    lo_ms = None if lo == NO_LOW else lo
    hi_ms = None if hi == NO_HIGH else hi
    if partial is None:
        ids = ledger.sample_ids(first, last, lo_ms, hi_ms, orgs)
        return ids, ids
    rows = ledger.sample_sources(first, last, lo_ms, hi_ms, orgs)
    spans: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for r in partial:
        spans[r.partition].append((r.start, r.end))
    ids = {r[0] for r in rows}
    inside = {r[0] for r in rows if any(a <= r[2] < b for a, b in spans.get(r[1], ()))}
    return ids, inside


def _compare(
    ledger: Ledger,
    pricer: Pricer,
    derived: Aggregates,
    missed: Aggregates,
    compared: tuple[int, int] | None,
    orgs: Sequence[str] | None = None,
) -> tuple[list[KeyDiff], int, list[OrgMeterDiff], dict[str, list[int]]]:
    """Per (org, bucket, meter) and per (org, meter): the re-derived usage against the ledger's.

    The ledger's side of a key is its meter rows' units plus the units of its ticks not aggregated into
    rows yet (``opened``, priced as the closer will price them). The keys returned are those with a
    difference, missing ticks, or such pending units (labelled ``pending_close``: Stripe has not been
    billed for them)."""
    billed: dict[Key, int] = {}
    values: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    opened = Aggregates()
    if compared is not None:
        first, last = compared
        for k, (units, value) in ledger.billed_by_key(first, last, orgs).items():
            billed[k] = units
            values[(k[0], k[2])] += value
        open_ticks = ledger.open_ticks(first, last, orgs)
        pricer.price(open_ticks, opened)

    def inside(b: int) -> bool:
        return compared is not None and compared[0] <= b <= compared[1]

    keys: list[KeyDiff] = []
    n_compared = 0
    per_om: dict[tuple[str, str], list[int]] = {}
    all_keys = set(billed) | set(opened.billable) | set(missed.billable)
    all_keys |= {k for k in derived.billable if inside(k[1])}
    for k in sorted(all_keys):
        org, b, meter = k
        d = derived.billable.get(k, (0, 0))[0]
        bl = billed.get(k, 0)
        op = opened.billable.get(k, (0, 0))[0]
        ms = missed.billable.get(k, (0, 0))[0]
        kd = KeyDiff(org, b, meter, d, bl, op, ms, inside(b))
        if kd.compared:
            n_compared += 1
            om = per_om.setdefault((org, meter), [0, 0, 0])
            om[0] += d
            om[1] += bl
            om[2] += op
        if kd.diff_units or kd.missing_units or kd.pending_units:
            keys.append(kd)
    org_meters = []
    for (org, meter), (d, bl, op) in sorted(per_om.items()):
        om_diff = OrgMeterDiff(org, meter, d, bl, op, values.get((org, meter), Decimal(0)))
        if not om_diff.units_agree or om_diff.value_diff:
            org_meters.append(om_diff)
    unbilled: dict[str, list[int]] = {}
    for (_, _, reason), (n, mbs) in derived.unbilled.items():
        slot = unbilled.setdefault(reason, [0, 0])
        slot[0] += n
        slot[1] += mbs
    return keys, n_compared, org_meters, unbilled
