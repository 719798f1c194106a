"""Products and prices (with search)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from infra.devkit.stripe_fake._base import locked
from infra.devkit.stripe_fake._customers import search_result
from infra.devkit.stripe_fake._errors import StripeError, no_such
from infra.devkit.stripe_fake._meter_stream import MeterStreamMixin
from infra.devkit.stripe_fake._params import Params
from infra.devkit.stripe_fake._search import compile_query
from infra.devkit.stripe_fake._util import decimal_json

__all__ = ["CatalogMixin"]

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


class CatalogMixin(MeterStreamMixin):
    def _init_state(self) -> None:
        super()._init_state()
        self.products: dict[str, Obj] = {}
        self.prices: dict[str, Obj] = {}

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
            if self.meters[meter_id]["status"] != "active":
                raise StripeError(
                    400,
                    f"The billing meter {meter_id} is inactive: a deactivated meter cannot be attached to a price.",
                    param="recurring[meter]",
                )
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
