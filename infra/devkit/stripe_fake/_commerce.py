"""Products, prices and subscriptions (with items)."""

from __future__ import annotations

import calendar
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from infra.devkit.stripe_fake._base import locked
from infra.devkit.stripe_fake._billing import BillingMixin
from infra.devkit.stripe_fake._customers import search_result
from infra.devkit.stripe_fake._errors import StripeError, no_such
from infra.devkit.stripe_fake._params import Params
from infra.devkit.stripe_fake._search import compile_query
from infra.devkit.stripe_fake._util import decimal_json

__all__ = ["CommerceMixin"]

Obj = dict[str, Any]

_INTERVALS = ("day", "week", "month", "year")
_PRODUCT_FIELDS = (
    "id",
    "name",
    "active",
    "description",
    "metadata",
    "unit_label",
    "statement_descriptor",
    "tax_code",
    "url",
    "images",
    "shippable",
)
_PRICE_FIELDS = (
    "currency",
    "product",
    "product_data",
    "unit_amount",
    "unit_amount_decimal",
    "recurring",
    "lookup_key",
    "transfer_lookup_key",
    "nickname",
    "metadata",
    "active",
    "billing_scheme",
    "tax_behavior",
)


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


class CommerceMixin(BillingMixin):
    def _init_state(self) -> None:
        super()._init_state()
        self.products: dict[str, Obj] = {}
        self.prices: dict[str, Obj] = {}
        self.subscriptions: dict[str, Obj] = {}

    # -- products ----------------------------------------------------------------------------------

    def _new_product(self, p: Params, ident: str | None = None) -> Obj:
        ident = ident or p.string("id", max_len=255) or self.ids("prod_", 14)
        if ident in self.products:
            raise StripeError(400, "Product already exists.", code="resource_already_exists", param="id")
        now = self.now_s()
        product: Obj = {
            "id": ident,
            "object": "product",
            "active": p.boolean("active") is not False,
            "created": now,
            "default_price": None,
            "description": p.string("description") or None,
            "images": p.strings("images") or [],
            "livemode": self.ctx().livemode,
            "marketing_features": [],
            "metadata": p.metadata(),
            "name": p.req_str("name", max_len=250),
            "package_dimensions": None,
            "shippable": p.boolean("shippable"),
            "statement_descriptor": p.string("statement_descriptor", max_len=22) or None,
            "tax_code": p.string("tax_code") or None,
            "type": "service",
            "unit_label": p.string("unit_label", max_len=12) or None,
            "updated": now,
            "url": p.string("url") or None,
        }
        self.products[ident] = product
        self.emit("product.created", product)
        return product

    @locked
    def create_product(self, data: Obj) -> Obj:
        return self.copy(self._new_product(Params(data, _PRODUCT_FIELDS)))

    @locked
    def retrieve_product(self, ident: str) -> Obj:
        return self.copy(self.get_or_404(self.products, ident, "product"))

    @locked
    def update_product(self, ident: str, data: Obj) -> Obj:
        product = self.get_or_404(self.products, ident, "product")
        p = Params(data, [f for f in _PRODUCT_FIELDS if f != "id"] + ["default_price"])
        before = self.copy(product)
        if p.has("name"):
            product["name"] = p.req_str("name", max_len=250)
        for key in ("description", "unit_label", "statement_descriptor", "tax_code", "url"):
            if p.has(key):
                product[key] = p.string(key) or None
        if p.has("active"):
            product["active"] = bool(p.boolean("active"))
        if p.has("default_price"):
            price_id = p.string("default_price") or None
            if price_id is not None:
                price = self.prices.get(price_id)
                if price is None or price["product"] != ident:
                    raise no_such("price", price_id, param="default_price", status=400)
            product["default_price"] = price_id
        product["metadata"] = p.metadata(product["metadata"])
        previous = {k: v for k, v in before.items() if product[k] != v}
        if previous:
            product["updated"] = self.now_s()
            self.emit("product.updated", product, previous)
        return self.copy(product)

    @locked
    def delete_product(self, ident: str) -> Obj:
        product = self.get_or_404(self.products, ident, "product")
        if any(p["product"] == ident for p in self.prices.values()):
            raise StripeError(400, "This product cannot be deleted because it has one or more user-created prices.")
        del self.products[ident]
        self.emit("product.deleted", product)
        return {"id": ident, "object": "product", "deleted": True}

    @locked
    def list_products(self, data: Obj) -> Obj:
        p = Params(data, ("limit", "starting_after", "ending_before", "active", "ids", "created", "shippable", "url"))
        active = p.boolean("active")
        ids = p.strings("ids")
        rows = [
            x
            for x in reversed(self.products.values())
            if (active is None or x["active"] == active) and (ids is None or x["id"] in ids)
        ]
        return self.paginate(rows, p, "/v1/products")

    @locked
    def search_products(self, data: Obj) -> Obj:
        return self._search(data, self.products, {"active", "name", "description", "url"}, "/v1/products/search")

    def _search(self, data: Obj, table: dict[str, Obj], fields: set[str], url: str) -> Obj:
        p = Params(data, ("query", "limit", "page"))
        match = compile_query(p.req_str("query"), fields)
        limit = p.integer("limit") or 10
        if not 1 <= limit <= 100:
            raise StripeError(400, "Invalid limit: must be between 1 and 100", param="limit")
        rows = [x for x in reversed(table.values()) if match(x)]
        return search_result(rows[:limit], len(rows) > limit, url)

    # -- prices ------------------------------------------------------------------------------------

    def _recurring(self, p: Params) -> Obj | None:
        rec = p.sub("recurring", ("interval", "interval_count", "usage_type", "meter", "trial_period_days"))
        if rec is None:
            return None
        interval = rec.enum("interval", _INTERVALS, required=True)
        count = rec.integer("interval_count") or 1
        if not 1 <= count <= 12 * (1 if interval == "year" else 3):
            raise StripeError(400, "Invalid recurring[interval_count].", param="recurring[interval_count]")
        usage = rec.enum("usage_type", ("licensed", "metered")) or "licensed"
        meter_id = rec.string("meter") or None
        if usage == "metered" and meter_id is None:
            raise StripeError(
                400,
                "Starting with Stripe version `2025-03-31.basil`, metered prices must be backed by meters. "
                "Pass recurring[meter].",
                param="recurring[meter]",
            )
        if meter_id is not None:
            if usage != "metered":
                raise StripeError(
                    400,
                    "recurring[meter] can only be set when recurring[usage_type] is `metered`.",
                    param="recurring[meter]",
                )
            if meter_id not in self.meters:
                raise no_such("billing meter", meter_id, param="recurring[meter]", status=400)
        return {
            "interval": interval,
            "interval_count": count,
            "meter": meter_id,
            "trial_period_days": rec.integer("trial_period_days"),
            "usage_type": usage,
        }

    def _claim_lookup_key(self, key: str | None, transfer: bool, owner: str) -> None:
        if key is None:
            return
        for price in self.prices.values():
            if price["lookup_key"] == key and price["id"] != owner:
                if not transfer:
                    raise StripeError(
                        400,
                        f"A price (`{price['id']}`) already uses that lookup key.",
                        param="lookup_key",
                    )
                price["lookup_key"] = None

    @locked
    def create_price(self, data: Obj) -> Obj:
        p = Params(data, _PRICE_FIELDS)
        currency = p.req_str("currency").lower()
        if p.has("product") == p.has("product_data"):
            raise StripeError(400, "You must specify exactly one of product or product_data.", param="product")
        product_id = p.string("product")
        if product_id is None:
            pd = p.sub("product_data", ("name", "active", "metadata", "unit_label", "statement_descriptor", "id"))
            assert pd is not None
            product_id = self._new_product(pd)["id"]
        elif product_id not in self.products:
            raise no_such("product", product_id, param="product", status=400)
        scheme = p.enum("billing_scheme", ("per_unit",)) or "per_unit"
        if p.has("unit_amount") and p.has("unit_amount_decimal"):
            raise StripeError(
                400,
                "You may only specify one of these parameters: unit_amount, unit_amount_decimal.",
                param="unit_amount",
            )
        unit_amount = p.integer("unit_amount")
        decimal = p.decimal("unit_amount_decimal")
        if unit_amount is None and decimal is None:
            raise StripeError(
                400, "Missing required param: unit_amount.", code="parameter_missing", param="unit_amount"
            )
        if unit_amount is not None:
            if unit_amount < 0:
                raise StripeError(400, "Invalid unit_amount: must be >= 0.", param="unit_amount")
            decimal = Decimal(unit_amount)
        assert decimal is not None
        exponent = decimal.as_tuple().exponent
        if decimal < 0 or (isinstance(exponent, int) and exponent < -12):
            raise StripeError(
                400, "Invalid unit_amount_decimal: at most 12 decimal places.", param="unit_amount_decimal"
            )
        if unit_amount is None and decimal == decimal.to_integral_value():
            unit_amount = int(decimal)
        recurring = self._recurring(p)
        lookup_key = p.string("lookup_key", max_len=200) or None
        ident = self.ids("price_")
        self._claim_lookup_key(lookup_key, bool(p.boolean("transfer_lookup_key")), ident)
        price: Obj = {
            "id": ident,
            "object": "price",
            "active": p.boolean("active") is not False,
            "billing_scheme": scheme,
            "created": self.now_s(),
            "currency": currency,
            "custom_unit_amount": None,
            "livemode": self.ctx().livemode,
            "lookup_key": lookup_key,
            "metadata": p.metadata(),
            "nickname": p.string("nickname") or None,
            "product": product_id,
            "recurring": recurring,
            "tax_behavior": p.enum("tax_behavior", ("inclusive", "exclusive", "unspecified")) or "unspecified",
            "tiers_mode": None,
            "transform_quantity": None,
            "type": "recurring" if recurring is not None else "one_time",
            "unit_amount": unit_amount,
            "unit_amount_decimal": decimal_json(decimal),
        }
        self.prices[ident] = price
        self.emit("price.created", price)
        return self.copy(price)

    @locked
    def retrieve_price(self, ident: str) -> Obj:
        return self.copy(self.get_or_404(self.prices, ident, "price"))

    @locked
    def update_price(self, ident: str, data: Obj) -> Obj:
        price = self.get_or_404(self.prices, ident, "price")
        p = Params(data, ("active", "metadata", "nickname", "lookup_key", "transfer_lookup_key", "tax_behavior"))
        before = self.copy(price)
        if p.has("active"):
            price["active"] = bool(p.boolean("active"))
        if p.has("nickname"):
            price["nickname"] = p.string("nickname") or None
        if p.has("lookup_key"):
            key = p.string("lookup_key", max_len=200) or None
            self._claim_lookup_key(key, bool(p.boolean("transfer_lookup_key")), ident)
            price["lookup_key"] = key
        if p.has("tax_behavior"):
            price["tax_behavior"] = p.enum("tax_behavior", ("inclusive", "exclusive", "unspecified"))
        price["metadata"] = p.metadata(price["metadata"])
        previous = {k: v for k, v in before.items() if price[k] != v}
        if previous:
            self.emit("price.updated", price, previous)
        return self.copy(price)

    @locked
    def list_prices(self, data: Obj) -> Obj:
        p = Params(
            data,
            (
                "limit",
                "starting_after",
                "ending_before",
                "active",
                "currency",
                "product",
                "type",
                "lookup_keys",
                "recurring",
                "created",
            ),
        )
        active = p.boolean("active")
        currency = p.string("currency")
        product = p.string("product")
        type_ = p.enum("type", ("one_time", "recurring"))
        keys = p.strings("lookup_keys")
        rec = p.sub("recurring", ("interval", "usage_type", "meter"))
        rows = []
        for x in reversed(self.prices.values()):
            if active is not None and x["active"] != active:
                continue
            if currency is not None and x["currency"] != currency.lower():
                continue
            if product is not None and x["product"] != product:
                continue
            if type_ is not None and x["type"] != type_:
                continue
            if keys is not None and x["lookup_key"] not in keys:
                continue
            if rec is not None:
                r = x["recurring"] or {}
                if any(rec.has(k) and r.get(k) != rec.string(k) for k in ("interval", "usage_type", "meter")):
                    continue
            rows.append(x)
        return self.paginate(rows, p, "/v1/prices")

    @locked
    def search_prices(self, data: Obj) -> Obj:
        return self._search(
            data, self.prices, {"active", "currency", "lookup_key", "product", "type"}, "/v1/prices/search"
        )

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
        period_end = add_interval(now, rec["interval"], rec["interval_count"])
        sub_items: list[Obj] = [
            {
                "id": self.ids("si_", 14),
                "object": "subscription_item",
                "billing_thresholds": None,
                "created": now,
                "current_period_end": period_end,
                "current_period_start": now,
                "discounts": [],
                "metadata": item_meta,
                "plan": self._plan(price),
                "price": self.copy(price),
                "quantity": quantity,
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
            "billing_cycle_anchor": now,
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
            "start_date": now,
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
