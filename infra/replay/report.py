"""Replay's report: the differences per (org, bucket, meter) and per (org, meter), as data and as JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from infra.replay.plan import PartitionRange
from models.billing import meter_unit_divisor, round_value
from sinks.ledger import SourcedTick

__all__ = ["EXIT_PENDING_CLOSE", "LABELS", "PENDING_CLOSE", "KeyDiff", "OrgMeterDiff", "ReplayReport", "ReplayResult"]

#: What a replay says of each (org, bucket, meter): the ledger agrees (``ok``); ticks are missing from it
#: and writing them makes it agree (``missing``); it accounts for less (``under-billed``) or more
#: (``over-billed``) than the topic's ticks, for another reason (a policy or ownership known only later);
#: it holds every tick but some are not in meter rows yet (``pending_close``: nothing reached Stripe for
#: them; the closer bills them on its next run).
OK, MISSING, UNDER, OVER, PENDING_CLOSE = "ok", "missing", "under-billed", "over-billed", "pending_close"
LABELS = (OK, MISSING, UNDER, OVER, PENDING_CLOSE)

#: Exit code of a replay whose only finding is ``pending_close`` keys (no difference, nothing billed yet).
EXIT_PENDING_CLOSE = 4


@dataclass(frozen=True, slots=True)
class KeyDiff:
    """One (org, bucket, meter): units re-derived from the topic vs in the ledger, in meter units
    (MB-s for the unified meter, seconds for tier meters)."""

    org_id: str
    bucket_start: int
    meter: str
    derived_units: int  # from the unique ticks of the range
    billed_units: int  # Σ meter_events.units, every revision and state
    open_units: int  # samples in the ledger not closed yet (priced the same way)
    missing_units: int  # of the ticks missing from the ledger: what --apply adds
    compared: bool  # False: the bucket is not wholly inside the range, only missing units are shown

    @property
    def diff_units(self) -> int:
        """Re-derived minus accounted for (billed + open); 0 when the ledger agrees."""
        return self.derived_units - self.billed_units - self.open_units if self.compared else 0

    @property
    def explained(self) -> bool:
        """Applying the missing ticks would make the ledger agree exactly."""
        return not self.compared or self.diff_units == self.missing_units

    @property
    def label(self) -> str:
        """ok / missing / under-billed / over-billed / pending_close (see :data:`LABELS`)."""
        if not self.compared:
            return MISSING if self.missing_units else OK
        if self.diff_units == 0:
            return PENDING_CLOSE if self.open_units else OK
        if self.missing_units and self.diff_units == self.missing_units:
            return MISSING
        return UNDER if self.diff_units > 0 else OVER

    def to_wire(self) -> dict[str, Any]:
        div = meter_unit_divisor(self.meter)
        return {
            "org_id": self.org_id,
            "bucket_start": self.bucket_start,
            "meter": self.meter,
            "label": self.label,
            "compared": self.compared,
            "derived_units": self.derived_units,
            "billed_units": self.billed_units,
            "open_units": self.open_units,
            "diff_units": self.diff_units,
            "missing_units": self.missing_units,
            "derived": _exact(self.derived_units, div),
            "billed": _exact(self.billed_units, div),
            "diff": _exact(self.diff_units, div),
            "missing": _exact(self.missing_units, div),
        }


@dataclass(frozen=True, slots=True)
class OrgMeterDiff:
    """One (org, meter) over the compared buckets: units, and values (the ledger's as assigned to its rows)."""

    org_id: str
    meter: str
    derived_units: int
    billed_units: int
    open_units: int
    billed_value: Decimal  # Σ meter_events.value of the rows

    @property
    def derived_value(self) -> Decimal:
        return round_value(self.derived_units, meter_unit_divisor(self.meter))

    @property
    def value_diff(self) -> Decimal:
        return self.derived_value - self.billed_value

    @property
    def units_agree(self) -> bool:
        return self.derived_units == self.billed_units + self.open_units

    def to_wire(self) -> dict[str, Any]:
        return {
            "org_id": self.org_id,
            "meter": self.meter,
            "derived_units": self.derived_units,
            "billed_units": self.billed_units,
            "open_units": self.open_units,
            "derived_value": _dec(self.derived_value),
            "billed_value": _dec(self.billed_value),
            "value_diff": _dec(self.value_diff),
            "units_agree": self.units_agree,
        }


def _exact(units: int, divisor: int) -> str:
    """Exact decimal of units/divisor (1/1024 has 10 decimals), without trailing zeros."""
    return _dec(Decimal(units) / divisor)


def _dec(value: Decimal) -> str:
    return format(value.normalize(), "f") if value else "0"


@dataclass
class ReplayReport:
    topic: str
    bucket_seconds: int
    ranges: list[PartitionRange]
    complete: bool  # the offset range is the whole topic: unit comparison possible
    window_ms: tuple[int | None, int | None]  # the tick filter [since, until) in ms (None: unbounded)
    compared_buckets: tuple[int, int] | None  # first, last bucket start compared (None: none)
    counts: dict[str, int]
    rejected: dict[str, int]
    unbilled: dict[str, list[int]]  # reason -> [samples, mb_seconds] re-derived
    keys: list[KeyDiff]  # keys with a difference or missing units
    org_meters: list[OrgMeterDiff]  # (org, meter) whose units or values differ
    missing_ids: list[str]
    extra_ids: list[str]
    jobs: int
    seconds: float
    now_ms: int
    labels: dict[str, int] = field(default_factory=dict)  # label -> (org, bucket, meter) keys
    horizon_s: int = 0  # the ledger's dedup horizon (0: none): nothing before it is compared
    clipped: bool = False  # the range asked for reached past the horizon: compared from the horizon on

    @property
    def differing_keys(self) -> list[KeyDiff]:
        return [k for k in self.keys if k.diff_units]

    @property
    def pending_close(self) -> list[KeyDiff]:
        """Compared keys that agree only because ticks not yet in meter rows are counted (nothing billed)."""
        return [k for k in self.keys if k.label == PENDING_CLOSE]

    @property
    def clean(self) -> bool:
        """No difference and nothing waiting: nothing missing, nothing extra, every compared (org, bucket,
        meter) agrees with what its meter rows hold (ticks not closed yet are not clean)."""
        return not self.missing_ids and not self.extra_ids and not self.differing_keys and not self.pending_close

    @property
    def exit_code(self) -> int:
        """0 clean, 1 differences (they win), :data:`EXIT_PENDING_CLOSE` when only pending_close keys remain."""
        if self.clean:
            return 0
        if self.missing_ids or self.extra_ids or self.differing_keys:
            return 1
        return EXIT_PENDING_CLOSE

    def to_wire(self, limit: int | None = None) -> dict[str, Any]:
        lim = limit or None
        lo, hi = self.window_ms
        return {
            "topic": self.topic,
            "clean": self.clean,
            "complete_range": self.complete,
            "ranges": [
                {"partition": r.partition, "from": r.start, "to": r.end, "log_start": r.log_start, "log_end": r.log_end}
                for r in self.ranges
            ],
            "window": {"since_ms": lo, "until_ms": hi},
            "dedup_horizon_s": self.horizon_s or None,
            "clipped_to_horizon": self.clipped,
            "compared_buckets": list(self.compared_buckets) if self.compared_buckets else None,
            "counts": self.counts,
            "labels": self.labels,
            "pending_close": {
                "keys": len(self.pending_close),
                "open_units": sum(k.open_units for k in self.pending_close),
            },
            "rejected": self.rejected,
            "unbilled": {k: {"samples": v[0], "mb_seconds": v[1]} for k, v in sorted(self.unbilled.items())},
            "differences": [k.to_wire() for k in self.keys[:lim]],
            "org_meters": [o.to_wire() for o in self.org_meters[:lim]],
            "missing_ids": self.missing_ids[:lim],
            "extra_ids": self.extra_ids[:lim],
            "jobs": self.jobs,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class ReplayResult:
    report: ReplayReport
    missing: list[SourcedTick]  # the ticks --apply writes, in (partition, offset) order


def _iso(ts_s: int) -> str:
    return datetime.fromtimestamp(ts_s, UTC).strftime("%Y-%m-%d %H:%MZ")
