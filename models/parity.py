"""Parity math: the cell side's scale-event rows, interval clipping, drift, status and the alert rule.

Pure functions and frozen models; no I/O, no clock (callers pass ``now``). Edge usage in MB-seconds, cell
usage in MB-milliseconds, exact integers until shown (GB-s as exact :class:`~decimal.Decimal`). Also the HMAC
request signing of the internal endpoints and the dashboard token. The rules (clipping, drift, status,
boundary slack, alert): docs/architecture.md, "Module notes".
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Context, Decimal
from enum import StrEnum
from fractions import Fraction
from typing import Any, Final

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.ticks import INT32_MAX, INT64_MAX, MAX_TS_MS, no_nul, parse_timestamp_ms

__all__ = [
    "DRIFT_DECIMALS",
    "EPSILON_GB_SECONDS",
    "MB_MS_PER_GB_S",
    "SIGNATURE_TOLERANCE_SECONDS",
    "AlertEpisode",
    "AlertRule",
    "BucketVerdict",
    "GbSeconds",
    "Interval",
    "Measure",
    "ParityStatus",
    "ScaleEvent",
    "alert_episodes",
    "boundary_slack_mb_ms",
    "bucket_verdict",
    "cell_gb_seconds",
    "classify",
    "clean_streak",
    "clip_ms",
    "dashboard_token",
    "drift_ratio",
    "edge_gb_seconds",
    "gb_seconds_of_mb_ms",
    "measure_intervals",
    "parse_scale_event",
    "ratio_decimal",
    "sign_request",
    "verify_dashboard_token",
    "verify_request",
]

MB_MS_PER_GB_S: Final = 1024 * 1000
EPSILON_GB_SECONDS: Final = Fraction(1, 10**6)  # "~0" for drift and status: |x| < 1e-6 GB-s
DRIFT_DECIMALS: Final = 6
SIGNATURE_TOLERANCE_SECONDS: Final = 300
MAX_MEMORY_MB: Final = 16 * 1024 * 1024
_EXACT: Final = Context(prec=60)
_Q_DRIFT: Final = Decimal(1).scaleb(-DRIFT_DECIMALS)


class ParityStatus(StrEnum):
    OK = "ok"
    DRIFT = "drift"
    EDGE_ONLY = "edge_only"
    CELL_ONLY = "cell_only"


# ------------------------------------------------------------------------------ scale-event wire model


class ScaleEvent(BaseModel):
    """One ``sandbox-scale-events`` value: the cell table's row after the change (change-data-capture).

    ``started_at`` / ``ended_at`` accept RFC 3339 with an offset or unix seconds; stored as unix ms.
    ``ended_at`` is null while the row is open; the same ``id`` is republished with it set.
    """

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    # Limits of the cell_intervals columns, so that every ledger database stores what is accepted here.
    id: str = Field(min_length=1, max_length=255)
    sandbox_id: str = Field(min_length=1, max_length=255)
    org_id: str = Field(min_length=1, max_length=255)
    cell_id: str = Field(default="", max_length=255)
    worker_id: str = Field(default="", max_length=255)
    memory_mb: int = Field(ge=0, le=MAX_MEMORY_MB)
    cpu_percent: int = Field(default=0, ge=0, le=INT32_MAX)
    disk_mb: int = Field(default=0, ge=0, le=INT64_MAX)
    started_ms: int = Field(alias="started_at", ge=0, le=MAX_TS_MS)
    ended_ms: int | None = Field(default=None, alias="ended_at", ge=0, le=MAX_TS_MS)

    _no_nul = field_validator("id", "sandbox_id", "org_id", "cell_id", "worker_id")(no_nul)

    @field_validator("cell_id", "worker_id", mode="before")
    @classmethod
    def _null_is_empty(cls, v: Any) -> Any:
        return "" if v is None else v

    @field_validator("memory_mb", "cpu_percent", "disk_mb", mode="before")
    @classmethod
    def _strict_int(cls, v: Any) -> Any:
        if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()) or isinstance(v, str):
            raise ValueError("must be an integer")
        return int(v) if isinstance(v, float) else v

    @field_validator("started_ms", "ended_ms", mode="before")
    @classmethod
    def _to_ms(cls, v: Any) -> Any:
        if v is None:
            return None
        if isinstance(v, bool):
            raise ValueError("must be unix seconds or an RFC 3339 timestamp")
        if isinstance(v, int | float):
            return int(Decimal(str(v)) * 1000)
        ms = parse_timestamp_ms(v)
        if ms is None:
            raise ValueError("must be unix seconds or an RFC 3339 timestamp with an offset")
        return ms

    @model_validator(mode="after")
    def _ordered(self) -> ScaleEvent:
        if self.ended_ms is not None and self.ended_ms < self.started_ms:
            raise ValueError("ended_at_before_started_at")
        return self

    @property
    def open(self) -> bool:
        return self.ended_ms is None

    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "sandbox_id": self.sandbox_id,
            "org_id": self.org_id,
            "cell_id": self.cell_id,
            "worker_id": self.worker_id,
            "memory_mb": self.memory_mb,
            "cpu_percent": self.cpu_percent,
            "disk_mb": self.disk_mb,
            "started_at": _rfc3339(self.started_ms),
            "ended_at": None if self.ended_ms is None else _rfc3339(self.ended_ms),
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_wire())


def _rfc3339(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_REQUIRED = ("id", "sandbox_id", "org_id", "memory_mb", "started_at")


def parse_scale_event(raw: bytes | None) -> ScaleEvent | str:
    """A scale event, or a short machine-readable reason why the record cannot be one. Never raises."""
    if not raw:
        return "empty_record"
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return "not_json"
    if not isinstance(doc, dict):
        return "not_an_object"
    for key in _REQUIRED:
        if doc.get(key) is None or doc.get(key) == "":
            return f"missing_{key}"
    try:
        return ScaleEvent.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = [str(p) for p in err.get("loc", ())]
        if not loc:
            msg = str(err.get("msg", ""))
            return "ended_at_before_started_at" if "ended_at_before_started_at" in msg else "invalid_scale_event"
        return f"bad_{loc[0]}"


# ------------------------------------------------------------------------------ intervals and measures


@dataclass(frozen=True, slots=True)
class Interval:
    """A cell interval as the parity math needs it (times in unix ms; ``ended_ms`` None = open)."""

    org_id: str
    sandbox_id: str
    memory_mb: int
    started_ms: int
    ended_ms: int | None


def clip_ms(started_ms: int, ended_ms: int | None, now_ms: int, span_start_ms: int, span_end_ms: int) -> int:
    """Milliseconds of ``[started, coalesce(ended, now))`` inside ``[span_start, span_end)``; never negative."""
    end = now_ms if ended_ms is None else ended_ms
    return max(0, min(end, span_end_ms) - max(started_ms, span_start_ms))


def _near(started_ms: int, end_ms: int, point_ms: int, slack_ms: int) -> bool:
    """Does ``[started, end]`` come within ``slack_ms`` of ``point_ms``?"""
    return started_ms < point_ms + slack_ms and end_ms > point_ms - slack_ms


def boundary_slack_mb_ms(iv: Interval, now_ms: int, span_start_ms: int, span_end_ms: int, slack_ms: int) -> int:
    """The slack one interval earns for a span: ``memory × slack`` when it comes within ``slack_ms`` of one of
    the span's boundaries (one tick may straddle it), else 0."""
    if slack_ms <= 0:
        return 0
    end = now_ms if iv.ended_ms is None else iv.ended_ms
    if end < iv.started_ms:
        return 0
    if _near(iv.started_ms, end, span_start_ms, slack_ms) or _near(iv.started_ms, end, span_end_ms, slack_ms):
        return iv.memory_mb * slack_ms
    return 0


class GbSeconds:
    """Both sides in GB-s, of whatever holds ``edge_mb_s`` and ``cell_mb_ms`` (a measure, a parity row)."""

    __slots__ = ()
    edge_mb_s: int
    cell_mb_ms: int

    @property
    def edge_gb_s(self) -> Decimal:
        return edge_gb_seconds(self.edge_mb_s)

    @property
    def cell_gb_s(self) -> Decimal:
        return gb_seconds_of_mb_ms(self.cell_mb_ms)


@dataclass(slots=True)
class Measure(GbSeconds):
    """Both sides of one (org, span): exact integers."""

    edge_mb_s: int = 0
    samples: int = 0
    cell_mb_ms: int = 0
    slack_mb_ms: int = 0

    @property
    def edge_mb_ms(self) -> int:
        return self.edge_mb_s * 1000

    @property
    def empty(self) -> bool:
        return self.samples == 0 and self.edge_mb_s == 0 and self.cell_mb_ms == 0

    def judge(self, tolerance: Fraction | Decimal) -> tuple[Decimal, ParityStatus]:
        """The drift as stored (:func:`ratio_decimal`) and the status of this measure (:func:`classify`)."""
        d, status = classify(self.edge_mb_ms, self.cell_mb_ms, self.slack_mb_ms, Fraction(tolerance))
        return ratio_decimal(d), status


def measure_intervals(
    intervals: Iterable[Interval], spans: Sequence[tuple[int, int]], now_ms: int, slack_ms: int
) -> dict[tuple[str, int], Measure]:
    """Cell MB-ms and boundary slack per (org, span start) for spans ``[(start_s, end_s), …]``.

    Spans must be sorted and non-overlapping (buckets, or a single window).
    """
    out: dict[tuple[str, int], Measure] = {}
    if not spans:
        return out
    starts = [s for s, _ in spans]
    for iv in intervals:
        end = now_ms if iv.ended_ms is None else iv.ended_ms
        # The spans this interval (widened by the slack) can touch.
        lo = max(0, bisect.bisect_right(starts, (iv.started_ms - slack_ms) // 1000) - 1)
        for i in range(lo, len(spans)):
            s, e = spans[i]
            if s * 1000 - slack_ms >= end:
                break
            cell = clip_ms(iv.started_ms, iv.ended_ms, now_ms, s * 1000, e * 1000)
            slack = boundary_slack_mb_ms(iv, now_ms, s * 1000, e * 1000, slack_ms)
            if cell == 0 and slack == 0:
                continue
            m = out.setdefault((iv.org_id, s), Measure())
            m.cell_mb_ms += iv.memory_mb * cell
            m.slack_mb_ms += slack
    return out


# ------------------------------------------------------------------------------ GB-s, drift, status


def edge_gb_seconds(mb_s: int) -> Decimal:
    return _EXACT.divide(Decimal(mb_s), Decimal(1024))


def gb_seconds_of_mb_ms(mb_ms: int) -> Decimal:
    return _EXACT.divide(Decimal(mb_ms), Decimal(MB_MS_PER_GB_S))


cell_gb_seconds = gb_seconds_of_mb_ms


def _near_zero(mb_ms: int) -> bool:
    return Fraction(abs(mb_ms), MB_MS_PER_GB_S) < EPSILON_GB_SECONDS


def drift_ratio(edge_mb_ms: int, cell_mb_ms: int) -> Fraction:
    """``(edge − cell) / cell``, exact; when the cell side is ~0: 0 if the edge is ~0 too, else +1 (100 %)."""
    if _near_zero(cell_mb_ms):
        return Fraction(0) if _near_zero(edge_mb_ms) else Fraction(1)
    return Fraction(edge_mb_ms - cell_mb_ms, cell_mb_ms)


def ratio_decimal(r: Fraction) -> Decimal:
    """A ratio rounded half up to DRIFT_DECIMALS places (for storage and display)."""
    d = _EXACT.divide(Decimal(r.numerator), Decimal(r.denominator))
    return d.quantize(_Q_DRIFT, rounding=ROUND_HALF_UP)


def classify(edge_mb_ms: int, cell_mb_ms: int, slack_mb_ms: int, tolerance: Fraction) -> tuple[Fraction, ParityStatus]:
    """Drift and status of one (org, span) (see the module doc for the rule)."""
    d = drift_ratio(edge_mb_ms, cell_mb_ms)
    edge0, cell0 = _near_zero(edge_mb_ms), _near_zero(cell_mb_ms)
    if (edge0 and cell0) or abs(edge_mb_ms - cell_mb_ms) <= slack_mb_ms:
        return d, ParityStatus.OK
    if cell0:
        return d, ParityStatus.EDGE_ONLY
    if edge0:
        return d, ParityStatus.CELL_ONLY
    if abs(d) > tolerance:
        return d, ParityStatus.DRIFT
    return d, ParityStatus.OK


# ------------------------------------------------------------------------------ alerts and the gate


@dataclass(frozen=True, slots=True)
class AlertRule:
    """The alert thresholds (defaults: 3 orgs ≥ 100 GB-s over 10 %, or the aggregate ≥ 300 GB-s over 10 %, in
    2 consecutive buckets), each a setting (``EDGEBILL_PARITY_ALERT_*``)."""

    org_min_gb_seconds: Decimal = Decimal(100)
    org_drift: Decimal = Decimal("0.10")
    min_orgs: int = 3
    aggregate_min_gb_seconds: Decimal = Decimal(300)
    aggregate_drift: Decimal = Decimal("0.10")
    consecutive: int = 2


@dataclass(frozen=True, slots=True)
class BucketVerdict:
    bucket_start: int
    systemic: bool
    orgs_over: tuple[str, ...]  # orgs meeting the per-org condition, worst first
    edge_mb_ms: int
    cell_mb_ms: int
    drift: Fraction

    def to_wire(self) -> dict[str, Any]:
        return {
            "bucket_start": self.bucket_start,
            "systemic": self.systemic,
            "orgs": list(self.orgs_over),
            "edge_gb_seconds": str(gb_seconds_of_mb_ms(self.edge_mb_ms)),
            "cell_gb_seconds": str(gb_seconds_of_mb_ms(self.cell_mb_ms)),
            "drift": str(ratio_decimal(self.drift)),
        }


def bucket_verdict(bucket_start: int, rows: Iterable[tuple[str, int, int]], rule: AlertRule) -> BucketVerdict:
    """Is one bucket systemic? ``rows`` = (org, edge MB-ms, cell MB-ms) of every pro org in it."""
    org_min = Fraction(rule.org_min_gb_seconds) * MB_MS_PER_GB_S
    agg_min = Fraction(rule.aggregate_min_gb_seconds) * MB_MS_PER_GB_S
    over: list[tuple[Fraction, str]] = []
    edge_total = cell_total = 0
    for org, edge, cell in rows:
        edge_total += edge
        cell_total += cell
        d = drift_ratio(edge, cell)
        if max(edge, cell) >= org_min and abs(d) > Fraction(rule.org_drift):
            over.append((abs(d), org))
    agg = drift_ratio(edge_total, cell_total)
    systemic = len(over) >= rule.min_orgs or (
        max(edge_total, cell_total) >= agg_min and abs(agg) > Fraction(rule.aggregate_drift)
    )
    ordered = tuple(o for _, o in sorted(over, key=lambda x: (-x[0], x[1])))
    return BucketVerdict(bucket_start, systemic, ordered, edge_total, cell_total, agg)


@dataclass(frozen=True, slots=True)
class AlertEpisode:
    """``consecutive`` or more adjacent systemic buckets; alerted once, keyed by its first bucket."""

    first_bucket: int
    fired_at_bucket: int  # the bucket at which the run reached ``consecutive``
    verdicts: tuple[BucketVerdict, ...] = field(default=())

    @property
    def key(self) -> str:
        return f"billing_drift:{self.first_bucket}"


def alert_episodes(verdicts: Sequence[BucketVerdict], bucket_seconds: int, consecutive: int) -> list[AlertEpisode]:
    """Episodes that reach ``consecutive`` adjacent systemic buckets. ``verdicts``: settled buckets, any order;
    a bucket missing from the sequence counts as not systemic."""
    by_start = {v.bucket_start: v for v in verdicts}
    out: list[AlertEpisode] = []
    run: list[BucketVerdict] = []
    for start in sorted(by_start):
        v = by_start[start]
        if not v.systemic:
            run = []
            continue
        if run and run[-1].bucket_start + bucket_seconds != start:
            run = []
        run.append(v)
        if len(run) == max(1, consecutive):
            out.append(AlertEpisode(run[0].bucket_start, start, tuple(run)))
    return out


def clean_streak(
    flagged_buckets: Iterable[int],
    first_bucket: int | None,
    last_settled: int | None,
    size: int,
    *,
    evidence: Iterable[int] | None = None,
) -> int:
    """Consecutive clean buckets ending at ``last_settled`` (the cutover gate), counting back to the first
    flagged bucket or to ``first_bucket`` (the oldest bucket with parity data), whichever is later.

    ``evidence``: the buckets that hold usage on *both* sides (edge ticks and cell intervals); when given,
    only those count. A bucket with no usage on either side proves nothing: it neither counts nor breaks
    the streak (quiet hours happen), while a flagged bucket always breaks it. ``None`` counts every bucket
    of the span (for a caller that has already filtered).
    """
    if last_settled is None or first_bucket is None or last_settled < first_bucket:
        return 0
    lower = first_bucket
    for b in flagged_buckets:
        if b <= last_settled:
            lower = max(lower, b + size)
    if lower > last_settled:
        return 0
    if evidence is None:
        return (last_settled - lower) // size + 1
    return len({b for b in evidence if lower <= b <= last_settled})


# ------------------------------------------------------------------------------ request signing


def sign_request(secret: bytes, ts: int | str, path_qs: str) -> str:
    """Hex HMAC-SHA256 over ``"{ts}.{path+query}"``: the internal-call signature of ``/internal/usage-parity``.

    ``path_qs`` is the request target as sent; bytes that are not UTF-8 arrive surrogate-escaped (as HTTP
    servers decode them) and are signed as the original bytes.
    """
    return hmac.new(secret, f"{ts}.{path_qs}".encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()


def _ascii_int(text: str, max_digits: int = 12) -> bool:
    """Only 0-9 (with an optional '-'): ``str.isdigit`` also accepts '²' and '١', which ``int`` refuses or reads."""
    digits = text.removeprefix("-")
    return 0 < len(digits) <= max_digits and digits.isascii() and digits.isdigit()


def verify_request(
    secret: bytes,
    ts_header: str | None,
    sig_header: str | None,
    path_qs: str,
    now_s: int,
    tolerance_s: int = SIGNATURE_TOLERANCE_SECONDS,
) -> str | None:
    """None when the request is signed correctly and fresh; otherwise the reason it is refused."""
    if not ts_header or not sig_header:
        return "unsigned"
    ts = ts_header.strip()
    if not _ascii_int(ts):
        return "bad_timestamp"
    if abs(now_s - int(ts)) > tolerance_s:
        return "stale"
    sig = sig_header.strip().lower()
    if not sig.isascii():  # compare_digest refuses non-ASCII text; such a header is no signature of ours
        return "bad_signature"
    try:
        expected = sign_request(secret, ts, path_qs)
    except UnicodeEncodeError:  # a target that is neither UTF-8 nor surrogate-escaped bytes
        return "bad_signature"
    if not hmac.compare_digest(expected, sig):
        return "bad_signature"
    return None


def dashboard_token(secret: bytes, expires_s: int) -> str:
    """``"{expires}.{hmac}"``: opens the dashboard until ``expires_s`` (unix s)."""
    return f"{expires_s}.{hmac.new(secret, f'dashboard.{expires_s}'.encode(), hashlib.sha256).hexdigest()}"


def verify_dashboard_token(secret: bytes, token: str | None, now_s: int) -> bool:
    if not token or "." not in token or not token.isascii():
        return False
    exp, _, _sig = token.partition(".")
    if exp.startswith("-") or not _ascii_int(exp) or int(exp) < now_s:
        return False
    return hmac.compare_digest(dashboard_token(secret, int(exp)), token)
