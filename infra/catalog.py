"""Stripe set-up edgebill relies on: the billing meters, the price catalog and the one webhook endpoint
(``edgebill stripe setup``, idempotent: everything is found again by event name, metadata or URL, so a second
run creates nothing), and customers for a fleet."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from typing import Any

import stripe

from models.billing import LEGACY_TIER_METERS, UNIFIED_METER, org_token
from models.catalog import (
    CATALOG,
    CATALOG_METERS,
    CURRENCY,
    METER_AGGREGATION,
    METER_CUSTOMER_KEY,
    METER_VALUE_KEY,
    PRODUCT_MARK,
    PRODUCT_NAME,
    CatalogPrice,
    meter_display_name,
    missing_keys,
)
from models.webhooks import WEBHOOK_EVENTS

__all__ = [
    "ALL_METERS",
    "SetupReport",
    "ensure_catalog",
    "ensure_customers",
    "ensure_meters",
    "ensure_webhook_endpoint",
    "meter_totals",
]

log = logging.getLogger(__name__)

ALL_METERS: tuple[str, ...] = (UNIFIED_METER, *LEGACY_TIER_METERS.values())


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
                "display_name": meter_display_name(name),
                "event_name": name,
                "default_aggregation": {"formula": METER_AGGREGATION},
                "customer_mapping": {"event_payload_key": METER_CUSTOMER_KEY, "type": "by_id"},
                "value_settings": {"event_payload_key": METER_VALUE_KEY},
            }
        )
        log.info("created Stripe meter %s (%s)", name, meter.id)
        found[name] = meter.id
    return found


#: Stripe refuses an ``Idempotency-Key`` longer than this.
MAX_IDEMPOTENCY_KEY_LENGTH = 255


def _customer_key(org: str) -> str:
    """``customer-create-{org}``, one key per org: the org part is :func:`org_token` (a long org id, or one
    holding ``~``, in its stable short form; an org id may have 255 characters, the key may not have more),
    so an org whose id is another org's short form never replays that org's customer."""
    prefix = "customer-create-"
    return prefix + org_token(org, MAX_IDEMPOTENCY_KEY_LENGTH - len(prefix))


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


# ---------------------------------------------------------------------------------------- stripe setup


@dataclass
class SetupReport:
    """What ``edgebill stripe setup`` found, created (or, in a dry run, would create) and refuses.

    ``prices``: catalog key -> (meter event name, price id) for every price found or created; complete only
    when ``problems`` is empty. ``warnings`` do not stop the set-up (another endpoint on the same events).
    """

    dry_run: bool
    meters: dict[str, str] = field(default_factory=dict)
    product: str | None = None
    prices: dict[str, tuple[str, str]] = field(default_factory=dict)
    found: list[str] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    endpoint: str | None = None
    endpoint_secret: str | None = None  # only when the endpoint was created now (Stripe shows it once)

    @property
    def complete(self) -> bool:
        return not self.problems and not missing_keys({k: v[1] for k, v in self.prices.items()})

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["prices"] = {k: {"meter": m, "price": p} for k, (m, p) in self.prices.items()}
        out["complete"] = self.complete
        return out


def _meta(obj: Any) -> dict[str, Any]:
    meta: Any = obj.to_dict().get("metadata")
    return dict(meta or {})


def _meter_ok(obj: Any) -> str | None:
    """Why an existing meter cannot carry edgebill's events as they are sent, or None."""
    meter: dict[str, Any] = obj.to_dict()
    agg = (meter.get("default_aggregation") or {}).get("formula")
    ckey = (meter.get("customer_mapping") or {}).get("event_payload_key")
    vkey = (meter.get("value_settings") or {}).get("event_payload_key")
    want = (METER_AGGREGATION, METER_CUSTOMER_KEY, METER_VALUE_KEY)
    if (agg, ckey, vkey) != want:
        return f"aggregation {agg}, customer key {ckey}, value key {vkey} (want {', '.join(want)})"
    return None


def _price_ok(obj: Any, want: CatalogPrice, meter_id: str | None) -> str | None:
    """Why an existing price with the catalog's tier differs from the catalog entry, or None."""
    price: dict[str, Any] = obj.to_dict()
    rec = price.get("recurring") or {}
    got: list[Any] = [
        price.get("currency"),
        rec.get("usage_type"),
        rec.get("interval"),
        Decimal(str(price.get("unit_amount_decimal") or "0")),
    ]
    expect: list[Any] = [CURRENCY, "metered", "month", want.unit_amount_decimal]
    if meter_id is not None:  # else a dry run that would create the meter: no id to match yet
        got.append(rec.get("meter"))
        expect.append(meter_id)
    if got != expect:
        return f"has {got}, the catalog says {expect}: give the entry a new version key, Stripe prices are immutable"
    return None


def ensure_catalog(client: stripe.StripeClient, *, dry_run: bool = False) -> SetupReport:
    """Meters, the product and every catalog price, found by event name / metadata or created.

    Order: meters (active, by event name); the product (metadata ``edgebill=compute``); its active prices (by
    ``metadata.tier``). A meter or price that exists with other settings is a problem (nothing is changed
    under it); a crash part-way leaves what was created, and the next run finds it instead of creating it again.
    """
    rep = SetupReport(dry_run=dry_run)
    v1 = client.v1
    active = {m.event_name: m for m in v1.billing.meters.list({"status": "active", "limit": 100}).auto_paging_iter()}
    for name in CATALOG_METERS:
        meter = active.get(name)
        if meter is not None:
            why = _meter_ok(meter)
            if why:
                rep.problems.append(f"meter {name} ({meter.id}): {why}")
            rep.meters[name] = str(meter.id)
            rep.found.append(f"meter {name} {meter.id}")
            continue
        if dry_run:
            rep.created.append(f"meter {name}")
            continue
        created = v1.billing.meters.create(
            {
                "display_name": meter_display_name(name),
                "event_name": name,
                "default_aggregation": {"formula": METER_AGGREGATION},
                "customer_mapping": {"event_payload_key": METER_CUSTOMER_KEY, "type": "by_id"},
                "value_settings": {"event_payload_key": METER_VALUE_KEY},
            }
        )
        rep.meters[name] = str(created.id)
        rep.created.append(f"meter {name} {created.id}")
    mark_key, mark_value = PRODUCT_MARK
    products = [
        p
        for p in v1.products.list({"active": True, "limit": 100}).auto_paging_iter()
        if _meta(p).get(mark_key) == mark_value
    ]
    if len(products) > 1:
        ids = ", ".join(str(p.id) for p in products)
        rep.warnings.append(f"several active products are marked {mark_key}={mark_value} ({ids}); using the oldest")
    product = min(products, key=lambda p: (p.created, str(p.id))) if products else None
    if product is not None:
        rep.product = str(product.id)
        rep.found.append(f"product {product.id}")
    elif dry_run:
        rep.created.append(f"product {PRODUCT_NAME!r}")
    else:
        params: Any = {"name": PRODUCT_NAME, "metadata": {mark_key: mark_value}}
        product = v1.products.create(params)
        rep.product = str(product.id)
        rep.created.append(f"product {product.id}")
    by_tier: dict[str, Any] = {}
    if rep.product is not None:
        for price in v1.prices.list({"product": rep.product, "active": True, "limit": 100}).auto_paging_iter():
            tier = _meta(price).get("tier")
            if isinstance(tier, str):
                by_tier.setdefault(tier, price)
    for entry in CATALOG:
        meter_id = rep.meters.get(entry.meter)
        existing = by_tier.get(entry.tier)
        if existing is not None:
            why = _price_ok(existing, entry, meter_id)
            if why:
                rep.problems.append(f"price {existing.id} (tier {entry.tier}) {why}")
                continue
            rep.prices[entry.key] = (entry.meter, str(existing.id))
            rep.found.append(f"price {entry.key} {existing.id}")
            continue
        if dry_run or meter_id is None or rep.product is None:
            rep.created.append(f"price {entry.key} ({entry.tier}, {format(entry.unit_amount_decimal, 'f')} ¢/unit)")
            continue
        price_params: Any = {
            "currency": CURRENCY,
            "product": rep.product,
            "unit_amount_decimal": format(entry.unit_amount_decimal, "f"),
            "recurring": {"interval": "month", "usage_type": "metered", "meter": meter_id},
            "billing_scheme": "per_unit",
            "nickname": f"{entry.key} ({entry.unit})",
            "metadata": entry.metadata(),
        }
        created_price = v1.prices.create(price_params)
        rep.prices[entry.key] = (entry.meter, str(created_price.id))
        rep.created.append(f"price {entry.key} {created_price.id}")
    return rep


def ensure_webhook_endpoint(
    client: stripe.StripeClient,
    url: str,
    rep: SetupReport,
    events: Sequence[str] = WEBHOOK_EVENTS,
) -> None:
    """Register (or verify) the one endpoint at ``url`` for ``events``; warn about any other on the same events.

    An endpoint at ``url`` is found by its URL: missing events are added and a disabled one is enabled; none is
    created (its signing secret is in ``rep.endpoint_secret``, shown once by Stripe). Every other enabled endpoint
    subscribed to one of ``events`` is a warning: if it also provisions (the cell's own ``/webhooks/stripe``),
    every org is provisioned twice.
    """
    v1 = client.v1
    endpoints = list(v1.webhook_endpoints.list({"limit": 100}).auto_paging_iter())
    ours = sorted((e for e in endpoints if e.url == url), key=lambda e: (e.created, str(e.id)))
    wanted = set(events)
    if len(ours) > 1:
        extra = ", ".join(str(e.id) for e in ours[1:])
        rep.warnings.append(f"{len(ours)} endpoints deliver to {url}; keeping {ours[0].id}, delete {extra}")
    for e in endpoints:
        if e.url == url or e.status != "enabled":
            continue
        enabled = set(e.enabled_events or [])
        shared = sorted(wanted if "*" in enabled else wanted & enabled)
        if shared:
            rep.warnings.append(
                f"endpoint {e.id} ({e.url}) also receives {', '.join(shared)}: if it provisions too (such as the "
                "cell's own /webhooks/stripe), every org is provisioned twice; disable it or drop these events"
            )
    if ours:
        ep = ours[0]
        rep.endpoint = str(ep.id)
        have = set(ep.enabled_events or [])
        missing = sorted(wanted - have) if "*" not in have else []
        if missing or ep.status != "enabled":
            what = (f"add {', '.join(missing)}" if missing else "") + ("; enable it" if ep.status != "enabled" else "")
            if rep.dry_run:
                rep.created.append(f"update endpoint {ep.id}: {what.strip('; ')}")
            else:
                params: Any = {"enabled_events": sorted(have | wanted), "disabled": False}
                v1.webhook_endpoints.update(str(ep.id), params)
                rep.created.append(f"updated endpoint {ep.id}: {what.strip('; ')}")
        else:
            rep.found.append(f"endpoint {ep.id} {url}")
        return
    if rep.dry_run:
        rep.created.append(f"endpoint {url} for {', '.join(events)}")
        return
    create: Any = {
        "url": url,
        "enabled_events": list(events),
        "description": "edgebill: provisioning and org plans",
        "metadata": {"edgebill": "webhooks"},
    }
    ep = v1.webhook_endpoints.create(create)
    rep.endpoint = str(ep.id)
    rep.endpoint_secret = ep.secret
    rep.created.append(f"endpoint {ep.id} {url}")
