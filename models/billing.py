"""Pure time and money math: buckets, GB-seconds, meters, value formatting, rounding carry.

No I/O, no floats: usage is kept as exact integers (MB-seconds for the unified meter, seconds for
legacy tier meters) and turned into a Stripe value string only at the edge, with
:func:`carry_rounded_delta` guaranteeing that the values sent for one (org, meter) always add up
to the exact running total rounded once, so rounding never loses or invents money over time.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from enum import StrEnum
from typing import Final

# Stripe's window is defined with its margins in models.stripe_window; re-exported here for older imports.
from models.stripe_window import STRIPE_MAX_AGE_SECONDS, STRIPE_MAX_FUTURE_SECONDS

__all__ = [
    "ID_SCHEME",
    "ID_SCHEMES",
    "LEGACY_TIER_METERS",
    "MAX_IDENTIFIER_LENGTH",
    "MAX_SIGNIFICANT_DIGITS",
    "ORG_HASH_HEX",
    "ORG_HASH_MARK",
    "ORG_PREFIX_CHARS",
    "STRIPE_MAX_AGE_SECONDS",
    "STRIPE_MAX_FUTURE_SECONDS",
    "UNIFIED_METER",
    "VALUE_DECIMALS",
    "Authority",
    "BillingMode",
    "MeterAmount",
    "Plan",
    "RowState",
    "bucket_end",
    "bucket_start",
    "bucket_start_s",
    "carry_rounded_delta",
    "format_value",
    "gb_seconds",
    "mb_seconds",
    "meter_amounts",
    "meter_row_id",
    "meter_unit_divisor",
    "org_token",
    "round_value",
    "short_org",
    "significant_digits",
]

UNIFIED_METER: Final = "sandbox_compute_sandbox_overage"
LEGACY_TIER_METERS: Final[dict[int, str]] = {
    1024: "sandbox_compute_sandbox_1gb",
    4096: "sandbox_compute_sandbox_4gb",
    8192: "sandbox_compute_sandbox_8gb",
    16384: "sandbox_compute_sandbox_16gb",
    32768: "sandbox_compute_sandbox_32gb",
    65536: "sandbox_compute_sandbox_64gb",
}
VALUE_DECIMALS: Final = 6
MAX_SIGNIFICANT_DIGITS: Final = 15
MAX_IDENTIFIER_LENGTH: Final = 100
_QUANTUM: Final = Decimal(1).scaleb(-VALUE_DECIMALS)


class Plan(StrEnum):
    PRO = "pro"
    FREE = "free"


class BillingMode(StrEnum):
    LEGACY = "legacy"
    UNIFIED = "unified"


class Authority(StrEnum):
    """Which side is authoritative for Pro billing: the cell (the old path) or the edge (this system)."""

    CELL = "cell"
    EDGE = "edge"


class RowState(StrEnum):
    """States of a meter row in the outbox: ``pending`` -> ``sent``; ``shadow`` (decided in shadow, not sent
    unless an operator releases the bucket); ``skipped_before_bill_from`` (the cell bills the bucket);
    ``skipped_rolled_back`` (after a rollback, the cell bills the bucket again); ``deferred_no_customer``;
    ``rejected`` (Stripe refused it for good); ``expired`` (past Stripe's 35-day window); ``cancelled`` (sent,
    then cancelled at Stripe through a meter-event adjustment: it no longer counts there)."""

    PENDING = "pending"
    SENT = "sent"
    SHADOW = "shadow"
    SKIPPED_BEFORE_BILL_FROM = "skipped_before_bill_from"
    SKIPPED_ROLLED_BACK = "skipped_rolled_back"
    DEFERRED_NO_CUSTOMER = "deferred_no_customer"
    REJECTED = "rejected"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


def bucket_start(ts_ms: int, bucket_seconds: int) -> int:
    """Start (unix s) of the tumbling UTC-epoch-aligned bucket holding ``ts_ms``; floors negatives too.

    The one bucket rule: every bucket computed from a timestamp comes from here (or from
    :func:`bucket_start_s` for a time in seconds), so a tick lands in the same bucket at ingest, in the
    closer, in replay and in parity.
    """
    return (ts_ms // 1000) // bucket_seconds * bucket_seconds


def bucket_start_s(ts_s: int, bucket_seconds: int) -> int:
    """:func:`bucket_start` of a time given in unix seconds."""
    return ts_s // bucket_seconds * bucket_seconds


def bucket_end(start: int, bucket_seconds: int) -> int:
    return start + bucket_seconds


def mb_seconds(memory_mb: int, interval_s: int) -> int:
    """Exact MB-s of one tick (the unified meter's integer unit, see :func:`meter_unit_divisor`)."""
    return memory_mb * interval_s


def gb_seconds(memory_mb: int, interval_s: int) -> Decimal:
    """Exact GB-s of one tick: ``memory_mb × interval_s / 1024`` (exact: 1/1024 has 10 decimals)."""
    return Decimal(mb_seconds(memory_mb, interval_s)) / 1024


def meter_unit_divisor(meter: str) -> int:
    """Integer units per meter value: MB-s per GB-s for the unified meter, 1 s per s for tier meters."""
    return 1024 if meter == UNIFIED_METER else 1


@dataclass(frozen=True, slots=True)
class MeterAmount:
    meter: str
    units: int  # exact integer units (see meter_unit_divisor)


def meter_amounts(mode: BillingMode, memory_mb: int, seconds: int, mb_seconds: int) -> MeterAmount | None:
    """The meter and exact units an aggregate of ticks at one memory size contributes, or None.

    ``None`` means the usage is not billable in this mode (a legacy memory size outside the six
    tiers); callers record it as unbillable, visibly.
    """
    if mode is BillingMode.UNIFIED:
        return MeterAmount(UNIFIED_METER, mb_seconds)
    meter = LEGACY_TIER_METERS.get(memory_mb)
    if meter is None:
        return None
    return MeterAmount(meter, seconds)


#: Characters of a long org id kept in front of its hash in an identifier (see :func:`meter_row_id`).
ORG_PREFIX_CHARS: Final = 24
#: Hex digits of sha256(org id) in the short form: 96 bits, so two org ids colliding is not a practical risk.
ORG_HASH_HEX: Final = 24
ORG_HASH_MARK: Final = "~"
#: The identifier scheme every new row takes (2: an org id holding ``~`` always takes the short form; why:
#: docs/architecture.md, "Module notes"). A written row's identifier is stored, never computed again.
ID_SCHEME: Final = 2
ID_SCHEMES: Final = (1, 2)
_METER_NAME: Final = re.compile(r"(?!r[0-9]+\Z)[^:]+\Z")


def short_org(org_id: str, prefix_chars: int = ORG_PREFIX_CHARS) -> str:
    """The stable short form of an org id inside an identifier: its first ``prefix_chars`` characters (for
    a human reading Stripe's dashboard), ``~``, and 24 hex digits of sha256 of the whole id (UTF-8)."""
    digest = hashlib.sha256(org_id.encode("utf-8", "surrogatepass")).hexdigest()[:ORG_HASH_HEX]
    return f"{org_id[:prefix_chars]}{ORG_HASH_MARK}{digest}"


def org_token(org_id: str, max_chars: int, *, scheme: int = ID_SCHEME) -> str:
    """The org's part of a key of at most ``max_chars`` characters, one per org id: the id itself when it
    fits and holds no ``~``, else :func:`short_org` (its readable prefix shortened further if need be).

    Injective (up to a 96-bit sha256 prefix collision): a plain token holds no ``~``, a short one ends in
    ``~`` and 24 hex digits of its org's hash. ``scheme=1`` computes what scheme 1 wrote (the plain id
    whenever it fits) for rows written before scheme 2; never use it for a new row.
    Raises ValueError when not even the hash fits.
    """
    if scheme not in ID_SCHEMES:
        raise ValueError(f"unknown identifier scheme {scheme!r}")
    if len(org_id) <= max_chars and (scheme == 1 or ORG_HASH_MARK not in org_id):
        return org_id
    room = max_chars - len(ORG_HASH_MARK) - ORG_HASH_HEX
    if room < 0:
        raise ValueError(f"no org token of at most {max_chars} characters")
    return short_org(org_id, min(ORG_PREFIX_CHARS, room))


def meter_row_id(org_id: str, start: int, meter: str, revision: int = 0, *, scheme: int = ID_SCHEME) -> str:
    """Outbox id and Stripe ``identifier``: ``{org}:{bucket_start}:{meter}`` or ``…:r{n}`` for corrections.

    One identifier per (org, bucket, meter, revision), a pure function of its arguments; the org part is
    :func:`org_token` (the plain org id when the whole fits :data:`MAX_IDENTIFIER_LENGTH` and holds no ``~``,
    else :func:`short_org`). Every new row takes :data:`ID_SCHEME`; a re-send sends the stored identifier.
    Raises ValueError for a negative revision, a meter name that could not be read back, or when not even
    the hash fits (a meter name of about 50 characters or more). Why: docs/architecture.md, "Module notes".
    """
    if revision < 0:
        raise ValueError(f"revision must be >= 0, not {revision}")
    if not _METER_NAME.match(meter):
        raise ValueError(f"meter name {meter!r} holds ':' or reads as a revision: no unique identifier")
    tail = f":{start}:{meter}" if revision == 0 else f":{start}:{meter}:r{revision}"
    room = MAX_IDENTIFIER_LENGTH - len(tail)
    if room < len(ORG_HASH_MARK) + ORG_HASH_HEX:
        raise ValueError(f"no identifier of at most {MAX_IDENTIFIER_LENGTH} characters for meter {meter!r}")
    return org_token(org_id, room, scheme=scheme) + tail


def significant_digits(value: Decimal) -> int:
    """Significant digits of a finite decimal, ignoring trailing zeros of the fraction."""
    if value.is_zero():
        return 1
    t = value.normalize().as_tuple()
    digits = len(t.digits)
    exp = int(t.exponent)
    return digits if exp <= 0 else digits + exp


def round_value(units: int, divisor: int) -> Decimal:
    """Exact ``units/divisor`` rounded once, half up, to VALUE_DECIMALS."""
    return (Decimal(units) / divisor).quantize(_QUANTUM, rounding=ROUND_HALF_UP)


def format_value(value: Decimal) -> str:
    """Stripe value string: plain notation, at most 6 decimals, no trailing zeros, ≤ 15 significant digits.

    Raises ValueError when the value cannot be written within Stripe's 15 significant digits.
    """
    q = value.quantize(_QUANTUM, rounding=ROUND_HALF_UP)
    if significant_digits(q) > MAX_SIGNIFICANT_DIGITS:
        raise ValueError(f"value {value} needs more than {MAX_SIGNIFICANT_DIGITS} significant digits")
    text = format(q.normalize(), "f")
    return "0" if text in ("-0", "") else text


def _fit_digits(value: Decimal) -> Decimal:
    """Truncate decimals (toward zero) until ``value`` has ≤ 15 significant digits."""
    decimals = VALUE_DECIMALS
    while decimals > 0 and significant_digits(value) > MAX_SIGNIFICANT_DIGITS:
        decimals -= 1
        value = value.quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_DOWN)
    if significant_digits(value) > MAX_SIGNIFICANT_DIGITS:
        raise ValueError(f"value {value} cannot be sent: more than {MAX_SIGNIFICANT_DIGITS} integer digits")
    return value


def carry_rounded_delta(
    total_units_before: int, sent_before: Decimal, added_units: int, divisor: int
) -> tuple[Decimal, Decimal]:
    """The value to put on the next row of one (org, meter), and the new cumulative sent value.

    ``total_units_before``: exact units of every earlier row of this (org, meter, stream);
    ``sent_before``: the sum of the values already assigned to those rows.
    The new row gets ``round(total_after) - sent_before``, so after any number of rows the values add
    up to the exact total rounded once, never the sum of per-row roundings. A delta that would need
    more than 15 significant digits is truncated; the remainder is carried to the next row.
    """
    target = round_value(total_units_before + added_units, divisor)
    delta = _fit_digits(target - sent_before)
    return delta, sent_before + delta
