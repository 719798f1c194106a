"""Invoice previews: ``POST /v1/invoices/create_preview`` for a subscription (or a customer's subscription), with
one line per subscription item, and ``GET /v1/invoices/{id}/lines`` for a preview's lines.

A metered price's line carries the usage of the item's current period: the sum (the meter's aggregation) of
the meter's events for the customer with a timestamp in ``[current_period_start, current_period_end)``,
cancelled events excluded, as ``quantity_decimal`` (exact, as a decimal string) and ``quantity`` (truncated to
an integer, as Stripe fills it). Its amount is the quantity times ``unit_amount_decimal``, rounded to whole
cents. A licensed price's line is its quantity times the unit amount. A period that has ended rolls forward
by the price's interval until it holds the fake's clock.
"""

from __future__ import annotations

from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from typing import Any

from infra.devkit.stripe_fake._base import locked
from infra.devkit.stripe_fake._errors import StripeError, no_such
from infra.devkit.stripe_fake._params import Params
from infra.devkit.stripe_fake._subscriptions import SubscriptionsMixin, add_interval

__all__ = ["InvoicesMixin"]

Obj = dict[str, Any]

#: Lines embedded in an invoice object; the rest is listed with ``GET /v1/invoices/{id}/lines``.
EMBEDDED_LINES = 10
#: Previews are kept this long for their lines to be listed.
PREVIEW_TTL_S = 3600


class InvoicesMixin(SubscriptionsMixin):
    def _init_state(self) -> None:
        super()._init_state()
        self.invoice_previews: dict[str, tuple[float, Obj, list[Obj]]] = {}

    def _period(self, item: Obj, now: int) -> tuple[int, int]:
        """The item's current period at ``now`` (rolled forward past periods that ended)."""
        start, end = int(item["current_period_start"]), int(item["current_period_end"])
        rec = item["price"].get("recurring") or {}
        interval, count = rec.get("interval") or "month", int(rec.get("interval_count") or 1)
        while end <= now:
            start, end = end, add_interval(end, interval, count)
        return start, end

    def _usage(self, meter_id: str, customer: str, start: int, end: int) -> Decimal:
        meter = self.meters.get(meter_id)
        if meter is None:
            return Decimal(0)
        events = [
            e
            for e in self.meter_events.values()
            if e.meter == meter_id and e.customer == customer and e.cancelled_at is None and start <= e.timestamp < end
        ]
        return self._aggregate(meter, events)

    def _line(self, invoice_id: str, sub: Obj, item: Obj, now: int) -> Obj:
        price = item["price"]
        start, end = self._period(item, now)
        rec = price.get("recurring") or {}
        metered = rec.get("usage_type") == "metered"
        if metered:
            quantity = self._usage(rec.get("meter") or "", sub["customer"], start, end)
            period = {"end": end, "start": start}
        else:
            quantity = Decimal(item.get("quantity") or 1)
            nxt = add_interval(end, rec.get("interval") or "month", int(rec.get("interval_count") or 1))
            period = {"end": nxt, "start": end}  # licensed prices are billed in advance, for the next period
        unit = Decimal(str(price.get("unit_amount_decimal") or price.get("unit_amount") or 0))
        amount = int((quantity * unit).quantize(Decimal(1), rounding=ROUND_HALF_UP))
        product = price.get("product")
        return {
            "amount": amount,
            "currency": price["currency"],
            "description": f"{quantity.normalize():f} × {price.get('nickname') or product} (at {unit} / unit)",
            "discount_amounts": [],
            "discountable": True,
            "discounts": [],
            "id": self.ids("il_tmp_", 24),
            "invoice": invoice_id,
            "livemode": sub["livemode"],
            "metadata": {},
            "object": "line_item",
            "parent": {
                "invoice_item_details": None,
                "subscription_item_details": {
                    "invoice_item": None,
                    "proration": False,
                    "proration_details": {"credited_items": None},
                    "subscription": sub["id"],
                    "subscription_item": item["id"],
                },
                "type": "subscription_item_details",
            },
            "period": period,
            "pretax_credit_amounts": [],
            "pricing": {
                "price_details": {"price": price["id"], "product": product},
                "type": "price_details",
                "unit_amount_decimal": format(unit.normalize(), "f"),
            },
            "quantity": int(quantity.to_integral_value(rounding=ROUND_DOWN)),
            "quantity_decimal": format(quantity.normalize(), "f") if quantity else "0",
            "subscription": sub["id"],
            "subtotal": amount,
            "taxes": [],
        }

    @locked
    def create_invoice_preview(self, data: Obj) -> Obj:
        p = Params(
            data,
            ("subscription", "customer", "automatic_tax", "preview_mode", "subscription_details", "expand", "currency"),
        )
        sub_id = p.string("subscription")
        customer = p.string("customer")
        if sub_id:
            sub = self.subscriptions.get(sub_id)
            if sub is None:
                raise no_such("subscription", sub_id, param="subscription", status=400)
            if customer and customer != sub["customer"]:
                raise StripeError(400, "The subscription does not belong to that customer.", param="customer")
        elif customer:
            self.require_customer(customer)
            subs = [s for s in self.subscriptions.values() if s["customer"] == customer and s["status"] != "canceled"]
            if not subs:
                raise StripeError(400, f"No upcoming invoices for customer: {customer}", code="invoice_upcoming_none")
            sub = subs[0]
        else:
            raise StripeError(400, "Missing required param: customer or subscription.", code="parameter_missing")
        if sub["status"] == "canceled":
            raise StripeError(400, f"No upcoming invoices for subscription: {sub['id']}", code="invoice_upcoming_none")
        return self.copy(self._preview(sub))

    def _preview(self, sub: Obj) -> Obj:
        now = self.now_s()
        ident = self.ids("upcoming_in_", 24)
        lines = [self._line(ident, sub, item, now) for item in sub["items"]["data"]]
        first = sub["items"]["data"][0]
        start, end = self._period(first, now)
        subtotal = sum(line["amount"] for line in lines)
        cus = self.customers.get(sub["customer"]) or {}
        balance = int(cus.get("balance") or 0)
        due = max(0, subtotal + balance)
        invoice: Obj = {
            "account_country": "US",
            "account_name": None,
            "account_tax_ids": None,
            "amount_due": due,
            "amount_overpaid": 0,
            "amount_paid": 0,
            "amount_remaining": due,
            "amount_shipping": 0,
            "application": None,
            "attempt_count": 0,
            "attempted": False,
            "auto_advance": False,
            "automatic_tax": {
                "disabled_reason": None,
                "enabled": False,
                "liability": None,
                "provider": None,
                "status": None,
            },
            "automatically_finalizes_at": None,
            "billing_reason": "upcoming",
            "collection_method": sub["collection_method"],
            "created": now,
            "currency": sub["currency"],
            "custom_fields": None,
            "customer": sub["customer"],
            "customer_account": None,
            "customer_address": None,
            "customer_email": cus.get("email"),
            "customer_name": cus.get("name"),
            "customer_phone": None,
            "customer_shipping": None,
            "customer_tax_exempt": "none",
            "customer_tax_ids": [],
            "default_payment_method": None,
            "default_source": None,
            "default_tax_rates": [],
            "description": None,
            "discounts": [],
            "due_date": None,
            "effective_at": None,
            "ending_balance": None,
            "footer": None,
            "from_invoice": None,
            "hosted_invoice_url": None,
            "id": ident,
            "invoice_pdf": None,
            "issuer": {"type": "self"},
            "last_finalization_error": None,
            "latest_revision": None,
            "lines": {
                "data": lines[:EMBEDDED_LINES],
                "has_more": len(lines) > EMBEDDED_LINES,
                "object": "list",
                "url": f"/v1/invoices/{ident}/lines",
            },
            "livemode": sub["livemode"],
            "metadata": {},
            "next_payment_attempt": end,
            "number": None,
            "object": "invoice",
            "on_behalf_of": None,
            "parent": {
                "quote_details": None,
                "subscription_details": {"metadata": dict(sub["metadata"]), "subscription": sub["id"]},
                "type": "subscription_details",
            },
            "payment_settings": {"default_mandate": None, "payment_method_options": None, "payment_method_types": None},
            "period_end": end,
            "period_start": start,
            "post_payment_credit_notes_amount": 0,
            "pre_payment_credit_notes_amount": 0,
            "receipt_number": None,
            "rendering": None,
            "shipping_cost": None,
            "shipping_details": None,
            "starting_balance": balance,
            "statement_descriptor": None,
            "status": "draft",
            # Kept null, as in Stripe's example object: the subscription is in ``parent.subscription_details``.
            "subscription": None,
            "status_transitions": {
                "finalized_at": None,
                "marked_uncollectible_at": None,
                "paid_at": None,
                "voided_at": None,
            },
            "subtotal": subtotal,
            "subtotal_excluding_tax": subtotal,
            "test_clock": None,
            "total": subtotal,
            "total_discount_amounts": [],
            "total_excluding_tax": subtotal,
            "total_pretax_credit_amounts": [],
            "total_taxes": [],
            "webhooks_delivered_at": None,
        }
        self.invoice_previews = {k: v for k, v in self.invoice_previews.items() if v[0] > self.now() - PREVIEW_TTL_S}
        self.invoice_previews[ident] = (self.now(), invoice, lines)
        return invoice

    @locked
    def list_invoice_lines(self, invoice_id: str, data: Obj) -> Obj:
        p = Params(data, ("limit", "starting_after", "ending_before"))
        kept = self.invoice_previews.get(invoice_id)
        if kept is None:
            raise no_such("invoice", invoice_id)
        return self.paginate(kept[2], p, f"/v1/invoices/{invoice_id}/lines")
