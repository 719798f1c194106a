"""The price catalog: every Stripe price a pro subscription carries, and its ``billing_prices`` key. Pure.

``edgebill stripe setup`` publishes it and provisioning puts one subscription item per entry; amounts are
cents per meter unit (``unit_amount_decimal``, at most 12 decimals). How each amount is derived:
docs/architecture.md, "Module notes".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_DOWN, Decimal
from typing import Final

from models.billing import LEGACY_TIER_METERS, UNIFIED_METER

__all__ = [
    "CATALOG",
    "CATALOG_KEYS",
    "CATALOG_METERS",
    "CURRENCY",
    "DISK_METER",
    "METER_AGGREGATION",
    "METER_CUSTOMER_KEY",
    "METER_VALUE_KEY",
    "PRODUCT_MARK",
    "PRODUCT_NAME",
    "RESERVED_METER",
    "CatalogPrice",
    "meter_display_name",
    "missing_keys",
]

CURRENCY: Final = "usd"
PRODUCT_NAME: Final = "Sandbox Compute"
#: Metadata that marks edgebill's product and prices (``{"edgebill": "compute"}``).
PRODUCT_MARK: Final = ("edgebill", "compute")
RESERVED_METER: Final = "sandbox_compute_sandbox_reserved"
#: What every meter event edgebill sends carries, and how its meters are set up to read it: the customer id
#: under ``stripe_customer_id`` (mapping ``by_id``), the value under ``value``, summed.
METER_CUSTOMER_KEY: Final = "stripe_customer_id"
METER_VALUE_KEY: Final = "value"
METER_AGGREGATION: Final = "sum"
DISK_METER: Final = "sandbox_compute_sandbox_disk_overage"

_CENT_DECIMALS: Final = Decimal(1).scaleb(-12)

#: USD per second of each legacy tier (the original system's pricing table), and its price version key.
_TIERS: Final[dict[int, tuple[str, str]]] = {
    1024: ("0.000001080246914", "sandbox_1gb_v4"),
    4096: ("0.000005787037037", "sandbox_4gb_v4"),
    8192: ("0.00001350308642", "sandbox_8gb_v5"),
    16384: ("0.00002700617284", "sandbox_16gb_v4"),
    32768: ("0.0001929012346", "sandbox_32gb_v4"),
    65536: ("0.0005401234568", "sandbox_64gb_v4"),
}


def _cents(usd: str) -> Decimal:
    """USD -> cents, truncated to Stripe's 12 decimals, without trailing zeros."""
    return (Decimal(usd) * 100).quantize(_CENT_DECIMALS, rounding=ROUND_DOWN).normalize()


@dataclass(frozen=True, slots=True)
class CatalogPrice:
    """One catalog entry. ``tier`` is the price's ``metadata.tier`` (how setup finds it again)."""

    key: str  # billing_prices key
    tier: str
    meter: str  # the billing meter's event name
    unit_amount_decimal: Decimal  # cents per meter unit
    unit: str  # what one meter unit is
    memory_mb: int | None = None

    def metadata(self) -> dict[str, str]:
        meta = {PRODUCT_MARK[0]: PRODUCT_MARK[1], "tier": self.tier, "unit": self.unit, "billing_key": self.key}
        if self.memory_mb is not None:
            meta["memory_mb"] = str(self.memory_mb)
        return meta


_ONE_GB_RATE: Final = _cents(_TIERS[1024][0])

CATALOG: Final[tuple[CatalogPrice, ...]] = (
    *(
        CatalogPrice(f"tier_{mb}", tier, LEGACY_TIER_METERS[mb], _cents(usd), "second", mb)
        for mb, (usd, tier) in sorted(_TIERS.items())
    ),
    CatalogPrice("overage", "sandbox_overage_v1", UNIFIED_METER, _ONE_GB_RATE, "gb_second"),
    CatalogPrice("reserved", "sandbox_reserved_v1", RESERVED_METER, _ONE_GB_RATE, "gb_second"),
    CatalogPrice("disk_overage", "sandbox_disk_overage", DISK_METER, Decimal("0.00001"), "gb_second_above_20gb"),
)
CATALOG_KEYS: Final = tuple(p.key for p in CATALOG)
#: Every meter the catalog's prices use, in catalog order.
CATALOG_METERS: Final = tuple(dict.fromkeys(p.meter for p in CATALOG))


def meter_display_name(event_name: str) -> str:
    suffix = event_name.removeprefix("sandbox_compute_sandbox_")
    if suffix == "overage":
        return "Sandbox compute overage (GB-s)"
    if suffix == "reserved":
        return "Sandbox compute reserved (GB-s)"
    if suffix == "disk_overage":
        return "Sandbox disk above 20 GB (GB-s)"
    return f"Sandbox compute {suffix} (seconds)"


def missing_keys(prices: Mapping[str, str]) -> list[str]:
    """Catalog keys without a price id in ``prices`` (a catalog is published whole or not at all)."""
    return [k for k in CATALOG_KEYS if not prices.get(k)]
