"""Replay's report: the differences per (org, bucket, meter) and per (org, meter), as data and as JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from infra.replay.plan import PartitionRange
from models.billing import meter_unit_divisor, round_value
from sinks.ledger import SourcedTick

__all__ = [
    "EXIT_CLEAN",
    "EXIT_DIFFERENCES",
    "EXIT_PENDING_CLOSE",
    "LABELS",
    "PENDING_CLOSE_NOTE",
    "KeyDiff",
    "OrgMeterDiff",
    "ReplayReport",
    "ReplayResult",
]

#: What a replay says of each (org, bucket, meter): the ledger agrees (``ok``); ticks are missing from it
#: and writing them makes it agree (``missing``); it accounts for less (``under-billed``) or more
#: (``over-billed``) than the topic's ticks, for another reason (a policy or ownership known only later);
#: it holds ticks of the key that no meter row accounts for yet (``pending_close``: Stripe has not been
#: billed for them, whatever the rest of the key says).
OK, MISSING, UNDER, OVER, PENDING_CLOSE = "ok", "missing", "under-billed", "over-billed", "pending_close"
LABELS = (OK, MISSING, UNDER, OVER, PENDING_CLOSE)

#: Exit codes of ``edgebill replay``: the report is clean; it found a difference (missing or extra ticks, a
#: key that differs), whatever else it found; no difference, but some compared key is ``pending_close``
#: (never to be read as clean: usage in the ledger that Stripe has not been billed for yet). 2 (could not
#: run, or ``--apply`` refused) is the command's; 3 is ``reconcile``'s "nothing compared".
EXIT_CLEAN, EXIT_DIFFERENCES, EXIT_PENDING_CLOSE = 0, 1, 4

#: What the report says of the keys pending close, and why ``--apply`` leaves them alone.
PENDING_CLOSE_NOTE = (
    "the ledger holds ticks of these (org, bucket, meter) that no meter row accounts for yet, so Stripe has "
    "not been billed for them: billing them is the closer's job (its next run writes their rows, corrections "
    "for closed buckets, and the sender ships them); --apply writes no correction for them"
)


@dataclass(frozen=True, slots=True)
class KeyDiff:
    """One (org, bucket, meter): units re-derived from the topic vs in the ledger, in meter units
    (MB-s for the unified meter, seconds for tier meters)."""

    org_id: str
    bucket_start: int
    meter: str
    derived_units: int  # from the unique ticks of the range
    billed_units: int  # Σ meter_events.units, every revision and state
    open_units: int  # samples in the ledger not aggregated into meter rows yet (priced the same way)
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
    def pending_units(self) -> int:
        """Units of the ledger's ticks of this compared key that no meter row accounts for yet (0: none)."""
        return self.open_units if self.compared and self.open_units > 0 else 0

    @property
    def label(self) -> str:
        """``pending_close`` when the key holds :attr:`pending_units`, else :attr:`difference`."""
        return PENDING_CLOSE if self.pending_units else self.difference

    @property
    def difference(self) -> str:
        """What the units alone say, pending ones counted as accounted for: ok / missing / under-billed /
        over-billed. Differs from :attr:`label` only for a key pending close."""
        if not self.compared:
            return MISSING if self.missing_units else OK
        if self.diff_units == 0:
            return OK
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
            "pending_close_units": self.pending_units,
            "difference_label": self.difference,
            "derived": _exact(self.derived_units, div),
            "billed": _exact(self.billed_units, div),
            "diff": _exact(self.diff_units, div),
            "missing": _exact(self.missing_units, div),
            "pending_close": _exact(self.pending_units, div),
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
    def pending_keys(self) -> list[KeyDiff]:
        """The compared keys labelled ``pending_close``."""
        return [k for k in self.keys if k.pending_units]

    @property
    def has_differences(self) -> bool:
        """Something missing, something extra, or a compared (org, bucket, meter) that differs."""
        return bool(self.missing_ids or self.extra_ids or self.differing_keys)

    @property
    def clean(self) -> bool:
        """No difference, and no compared (org, bucket, meter) pending close."""
        return not self.has_differences and not self.pending_keys

    @property
    def exit_code(self) -> int:
        """The dry run's exit code: a difference wins over pending close, which is never clean."""
        if self.has_differences:
            return EXIT_DIFFERENCES
        return EXIT_PENDING_CLOSE if self.pending_keys else EXIT_CLEAN

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
            "rejected": self.rejected,
            "unbilled": {k: {"samples": v[0], "mb_seconds": v[1]} for k, v in sorted(self.unbilled.items())},
            "differences": [k.to_wire() for k in self.keys[:lim]],
            "pending_close_note": PENDING_CLOSE_NOTE if self.pending_keys else None,
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
