"""Small shared helpers: JSON with exact decimals, ids, ISO-8601 times, value digit rules."""

from __future__ import annotations

import random
import string
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

__all__ = [
    "MAX_SIGNIFICANT_DIGITS",
    "IdFactory",
    "decimal_json",
    "dumps",
    "from_iso",
    "iso",
    "parse_meter_value",
    "significant_digits",
]

MAX_SIGNIFICANT_DIGITS = 15
_ALNUM = string.ascii_letters + string.digits


def decimal_json(value: Decimal) -> str:
    """A Decimal as a plain JSON number text (no exponent, no trailing zeros): ``0.3``, ``25``, ``-1.5``."""
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "") else text


def _default(obj: Any) -> Any:
    if isinstance(obj, Decimal):
        return orjson.Fragment(decimal_json(obj).encode())
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def dumps(obj: Any) -> bytes:
    """orjson, with Decimals written as exact JSON numbers (so ``repr(float(x))`` shows the decimal)."""
    return orjson.dumps(obj, default=_default)


def iso(ts: float) -> str:
    """Stripe v2 timestamp text: ``2024-06-01T12:00:00.000Z``."""
    dt = datetime.fromtimestamp(ts, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def from_iso(text: str) -> float:
    """Parse an ISO-8601 timestamp (``Z`` or offset; a naive one is read as UTC). Raises ValueError."""
    dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def significant_digits(value: Decimal) -> int:
    """Significant digits of a finite decimal (leading and trailing zeros do not count; 0 has 1)."""
    digits = value.normalize().as_tuple().digits
    return max(1, len(digits))


def parse_meter_value(text: str) -> Decimal | None:
    """A meter value string as a finite Decimal, or None if it is not a plain decimal number."""
    stripped = text.strip()
    if not stripped or any(c not in "0123456789+-.eE" for c in stripped):
        return None
    try:
        value = Decimal(stripped)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


class IdFactory:
    """Stripe-looking object ids (``cus_`` + 14 chars, others + 24), from a seeded RNG."""

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def __call__(self, prefix: str, length: int = 24) -> str:
        return prefix + "".join(self._rng.choice(_ALNUM) for _ in range(length))

    def hex(self, length: int = 32) -> str:
        return "".join(self._rng.choice("0123456789abcdef") for _ in range(length))

    def uuid(self) -> str:
        h = self.hex(32)
        return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{h[16:20]}-{h[20:]}"
