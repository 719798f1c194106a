"""Subscriptions and their items."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime
from typing import Any

from infra.devkit.stripe_fake._base import locked
from infra.devkit.stripe_fake._catalog import CatalogMixin
from infra.devkit.stripe_fake._errors import StripeError, no_such
from infra.devkit.stripe_fake._params import Params

__all__ = ["SubscriptionsMixin", "add_interval"]

Obj = dict[str, Any]

_INTERVALS = ("day", "week", "month", "year")


def add_interval(ts: int, interval: str, count: int) -> int:
    """``ts`` plus ``count`` calendar intervals (months clamp to the month's last day, like Stripe)."""
    if interval == "day":
        return ts + 86400 * count
    if interval == "week":
        return ts + 7 * 86400 * count
    dt = datetime.fromtimestamp(ts, tz=UTC)
    months = count * (12 if interval == "year" else 1)
    month0 = dt.month - 1 + months
    year, month = dt.year + month0 // 12, month0 % 12 + 1
    day = min(dt.day, calendar.monthrange(year, month)[1])
    return int(dt.replace(year=year, month=month, day=day).timestamp())


class SubscriptionsMixin(CatalogMixin):
    def _init_state(self) -> None:
        super()._init_state()
        self.subscriptions: dict[str, Obj] = {}

    # -- subscriptions -----------------------------------------------------------------------------

    def _plan(self, price: Obj) -> Obj:
        rec = price["recurring"] or {}
        return {
            "id": price["id"],
            "object": "plan",
            "active": price["active"],
            "amount": price["unit_amount"],
            "amount_decimal": price["unit_amount_decimal"],
            "billing_scheme": price["billing_scheme"],
            "created": price["created"],
            "currency": price["currency"],
            "interval": rec.get("interval"),
            "interval_count": rec.get("interval_count"),
            "livemode": price["livemode"],
            "metadata": dict(price["metadata"]),
            "meter": rec.get("meter"),
            "nickname": price["nickname"],
            "product": price["product"],
            "tiers_mode": None,
            "transform_usage": None,
            "trial_period_days": rec.get("trial_period_days"),
            "usage_type": rec.get("usage_type"),
        }

    def _resolve_items(self, items: list[Any] | None, param: str = "items") -> list[tuple[Obj, int | None, Obj]]:
        """Validate ``items[i][price|quantity|metadata]``: active recurring prices, one currency/interval."""
        if not items:
            raise StripeError(400, f"Missing required param: {param}.", code="parameter_missing", param=param)
        resolved: list[tuple[Obj, int | None, Obj]] = []
        for i, raw in enumerate(items):
            where = f"{param}[{i}]"
            if not isinstance(raw, dict):
                raise StripeError(400, f"Invalid {where}: must be a hash", param=where)
            ip = Params(raw, ("price", "quantity", "metadata"), where)
            price_id = ip.req_str("price")
            price = self.prices.get(price_id)
            if price is None:
                raise no_such("price", price_id, param=f"{where}[price]", status=400)
            if not price["active"]:
                raise StripeError(
                    400,
                    "The price specified is inactive. This field only accepts active prices.",
                    param=f"{where}[price]",
                )
            if price["type"] != "recurring":
                raise StripeError(
                    400,
                    "The price specified is set to `type=one_time` but this field only accepts prices with "
                    "`type=recurring`.",
                    param=f"{where}[price]",
                )
            quantity = ip.integer("quantity")
            metered = price["recurring"]["usage_type"] == "metered"
            if metered and quantity is not None:
                raise StripeError(
                    400,
                    f"Quantity should not be specified where usage_type is `metered`. Remove quantity from `{where}`.",
                    param=f"{where}[quantity]",
                )
            if not metered:
                quantity = 1 if quantity is None else quantity
                if quantity < 0:
                    raise StripeError(400, "Invalid quantity: must be >= 0.", param=f"{where}[quantity]")
            resolved.append((price, quantity, ip.metadata()))
        first = resolved[0][0]
        for price, _, _ in resolved[1:]:
            if price["currency"] != first["currency"]:
                raise StripeError(400, "All prices on a subscription must have the same currency.", param=param)
            a, b = price["recurring"], first["recurring"]
            if (a["interval"], a["interval_count"]) != (b["interval"], b["interval_count"]):
                raise StripeError(
                    400, "All prices on a subscription must have the same `recurring.interval`.", param=param
                )
        return resolved

    def _new_subscription(
        self,
        customer: str,
        items: list[tuple[Obj, int | None, Obj]],
        metadata: dict[str, str],
        p: Params | None,
    ) -> Obj:
        now = self.now_s()
        ident = self.ids("sub_")
        rec = items[0][0]["recurring"]
        # ``backdate_start_date``: the subscription starts (and its billing cycle is anchored) in the past; the
        # current period is the one holding now.
        backdate = p.integer("backdate_start_date") if p else None
        if backdate is not None and backdate > now:
            raise StripeError(400, "backdate_start_date must be in the past.", param="backdate_start_date")
        start = now if backdate is None else backdate
        period_start, period_end = start, add_interval(start, rec["interval"], rec["interval_count"])
        while period_end <= now:
            period_start, period_end = period_end, add_interval(period_end, rec["interval"], rec["interval_count"])
        sub_items: list[Obj] = [
            {
                "id": self.ids("si_", 14),
                "object": "subscription_item",
                "billing_thresholds": None,
                "created": now,
                "current_period_end": period_end,
                "current_period_start": period_start,
                "discounts": [],
                "metadata": item_meta,
                "plan": self._plan(price),
                "price": self.copy(price),
                # Stripe leaves ``quantity`` out of items on metered prices (usage comes from the meter).
                **({} if quantity is None else {"quantity": quantity}),
                "subscription": ident,
                "tax_rates": [],
            }
            for price, quantity, item_meta in items
        ]
        collection = (p.enum("collection_method", ("charge_automatically", "send_invoice")) if p else None) or (
            "charge_automatically"
        )
        sub: Obj = {
            "id": ident,
            "object": "subscription",
            "application": None,
            "application_fee_percent": None,
            "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
            "billing_cycle_anchor": start,
            "billing_cycle_anchor_config": None,
            "billing_mode": {"flexible": None, "type": "classic"},
            "billing_schedules": [],
            "billing_thresholds": None,
            "cancel_at": None,
            "cancel_at_period_end": bool(p.boolean("cancel_at_period_end")) if p else False,
            "canceled_at": None,
            "cancellation_details": {"comment": None, "feedback": None, "reason": None},
            "collection_method": collection,
            "created": now,
            "currency": items[0][0]["currency"],
            "customer": customer,
            "customer_account": None,
            "days_until_due": (p.integer("days_until_due") if p else None),
            "default_payment_method": None,
            "default_source": None,
            "default_tax_rates": [],
            "description": (p.string("description") if p else None) or None,
            "discounts": [],
            "ended_at": None,
            "invoice_settings": {
                "account_tax_ids": None,
                "custom_fields": None,
                "description": None,
                "footer": None,
                "issuer": {"type": "self"},
            },
            "items": {
                "object": "list",
                "data": sub_items,
                "has_more": False,
                "url": f"/v1/subscription_items?subscription={ident}",
            },
            "latest_invoice": None,
            "livemode": self.ctx().livemode,
            "managed_payments": {"enabled": False},
            "metadata": metadata,
            "next_pending_invoice_item_invoice": None,
            "on_behalf_of": None,
            "pause_collection": None,
            "payment_settings": {
                "payment_method_options": None,
                "payment_method_types": None,
                "save_default_payment_method": "off",
            },
            "pending_invoice_item_interval": None,
            "pending_setup_intent": None,
            "pending_update": None,
            "schedule": None,
            "start_date": start,
            "status": "active",
            "test_clock": None,
            "transfer_data": None,
            "trial_end": None,
            "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
            "trial_start": None,
        }
        self.subscriptions[ident] = sub
        self.emit("customer.subscription.created", sub)
        return sub

    @locked
    def create_subscription(self, data: Obj) -> Obj:
        p = Params(
            data,
            (
                "customer",
                "items",
                "metadata",
                "collection_method",
                "days_until_due",
                "cancel_at_period_end",
                "description",
                "default_payment_method",
                "payment_behavior",
                "proration_behavior",
                "off_session",
                "backdate_start_date",
            ),
        )
        customer = p.req_str("customer")
        self.require_customer(customer)
        items = self._resolve_items(p.array("items"))
        return self.copy(self._new_subscription(customer, items, p.metadata(), p))

    @locked
    def retrieve_subscription(self, ident: str) -> Obj:
        return self.copy(self.get_or_404(self.subscriptions, ident, "subscription"))

    @locked
    def update_subscription(self, ident: str, data: Obj) -> Obj:
        sub = self.get_or_404(self.subscriptions, ident, "subscription")
        p = Params(data, ("metadata", "cancel_at_period_end", "description", "proration_behavior"))
        if sub["status"] == "canceled" and p.has("cancel_at_period_end"):
            raise StripeError(400, "A canceled subscription can only update its cancellation_details and metadata.")
        before = self.copy(sub)
        if p.has("cancel_at_period_end"):
            flag = bool(p.boolean("cancel_at_period_end"))
            sub["cancel_at_period_end"] = flag
            sub["cancel_at"] = sub["items"]["data"][0]["current_period_end"] if flag else None
        if p.has("description"):
            sub["description"] = p.string("description") or None
        sub["metadata"] = p.metadata(sub["metadata"])
        previous = {k: v for k, v in before.items() if sub[k] != v}
        if previous:
            self.emit("customer.subscription.updated", sub, previous)
        return self.copy(sub)

    @locked
    def cancel_subscription(self, ident: str, data: Obj) -> Obj:
        sub = self.get_or_404(self.subscriptions, ident, "subscription")
        p = Params(data, ("invoice_now", "prorate", "cancellation_details"))
        if sub["status"] == "canceled":
            raise StripeError(
                400,
                f"No such subscription: '{ident}'. It has already been canceled.",
                code="resource_missing",
            )
        details = p.sub("cancellation_details", ("comment", "feedback"))
        now = self.now_s()
        sub["status"] = "canceled"
        sub["canceled_at"] = now
        sub["ended_at"] = now
        sub["cancellation_details"] = {
            "comment": details.string("comment") if details else None,
            "feedback": details.string("feedback") if details else None,
            "reason": "cancellation_requested",
        }
        self.emit("customer.subscription.deleted", sub)
        return self.copy(sub)

    @locked
    def list_subscriptions(self, data: Obj) -> Obj:
        p = Params(data, ("limit", "starting_after", "ending_before", "customer", "status", "price", "created"))
        customer = p.string("customer")
        status = p.enum("status", ("active", "canceled", "all", "past_due", "trialing", "unpaid", "incomplete"))
        price = p.string("price")
        rows = []
        for s in reversed(self.subscriptions.values()):
            if customer is not None and s["customer"] != customer:
                continue
            if status is None and s["status"] == "canceled":
                continue
            if status not in (None, "all") and s["status"] != status:
                continue
            if price is not None and all(i["price"]["id"] != price for i in s["items"]["data"]):
                continue
            rows.append(s)
        return self.paginate(rows, p, "/v1/subscriptions")

    @locked
    def list_subscription_items(self, data: Obj) -> Obj:
        p = Params(data, ("limit", "starting_after", "ending_before", "subscription"))
        sub = self.get_or_404(self.subscriptions, p.req_str("subscription"), "subscription")
        return self.paginate(list(sub["items"]["data"]), p, f"/v1/subscription_items?subscription={sub['id']}")
