"""Stripe set-up edgebill relies on: the billing meters (idempotent), and customers for a fleet."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from decimal import Decimal
from typing import Any

import stripe

from models.billing import LEGACY_TIER_METERS, UNIFIED_METER, short_org

__all__ = ["ALL_METERS", "ensure_customers", "ensure_meters", "meter_totals"]

log = logging.getLogger(__name__)

ALL_METERS: tuple[str, ...] = (UNIFIED_METER, *LEGACY_TIER_METERS.values())


def _meter_display(event_name: str) -> str:
    suffix = event_name.removeprefix("sandbox_compute_sandbox_")
    return "Sandbox compute overage (GB-s)" if suffix == "overage" else f"Sandbox compute {suffix} (seconds)"


def ensure_meters(client: stripe.StripeClient, names: Iterable[str] = ALL_METERS) -> dict[str, str]:
    """event_name -> meter id, creating the missing ones (sum, customer by id, value key ``value``)."""
    found: dict[str, str] = {}
    for m in client.v1.billing.meters.list({"status": "active", "limit": 100}).auto_paging_iter():
        found[m.event_name] = m.id
    for name in names:
        if name in found:
            continue
        meter = client.v1.billing.meters.create(
            {
                "display_name": _meter_display(name),
                "event_name": name,
                "default_aggregation": {"formula": "sum"},
                "customer_mapping": {"event_payload_key": "stripe_customer_id", "type": "by_id"},
                "value_settings": {"event_payload_key": "value"},
            }
        )
        log.info("created Stripe meter %s (%s)", name, meter.id)
        found[name] = meter.id
    return found


#: Stripe refuses an ``Idempotency-Key`` longer than this.
MAX_IDEMPOTENCY_KEY_LENGTH = 255


def _customer_key(org: str) -> str:
    """``customer-create-{org}``, with a long org id in its stable short form (an org id may have 255
    characters, the key may not have more)."""
    key = f"customer-create-{org}"
    return key if len(key) <= MAX_IDEMPOTENCY_KEY_LENGTH else f"customer-create-{short_org(org)}"


def ensure_customers(client: stripe.StripeClient, emails: dict[str, str]) -> dict[str, str]:
    """org_id -> Stripe customer id for every org in ``emails`` (metadata ``org_id``), creating missing ones.

    Creation uses the idempotency key ``customer-create-{org_id}``, so a crash and re-run cannot create
    a second customer for the same org within Stripe's idempotency window.
    """
    found: dict[str, str] = {}
    for c in client.v1.customers.list({"limit": 100}).auto_paging_iter():
        meta = c.metadata.to_dict() if c.metadata is not None else {}
        org = meta.get("org_id")
        if isinstance(org, str) and org in emails and org not in found:
            found[org] = str(c.id)
    for org, email in emails.items():
        if org in found:
            continue
        params: Any = {"email": email, "name": org, "metadata": {"org_id": org}}
        cust = client.v1.customers.create(params, {"idempotency_key": _customer_key(org)})
        found[org] = str(cust.id)
    return found


def meter_totals(client: stripe.StripeClient, meter_id: str, customer: str, start_time: int, end_time: int) -> Decimal:
    """Stripe's own total for (meter, customer) over [start, end), read through meter event summaries.

    ``aggregated_value`` is a JSON number; ``repr`` of the parsed float gives back the decimal Stripe
    wrote as long as it has ≤ 15 significant digits (Stripe's own limit on values).
    """
    total = Decimal(0)
    summaries = client.v1.billing.meters.event_summaries.list(
        meter_id, {"customer": customer, "start_time": start_time, "end_time": end_time, "limit": 100}
    )
    for s in summaries.auto_paging_iter():
        total += Decimal(repr(s.aggregated_value))
    return total
