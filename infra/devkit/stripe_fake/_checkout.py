"""Checkout sessions, and the test helper that completes one as a paying customer would."""

from __future__ import annotations

from typing import Any

from infra.devkit.stripe_fake._base import locked
from infra.devkit.stripe_fake._errors import StripeError, no_such
from infra.devkit.stripe_fake._invoices import InvoicesMixin
from infra.devkit.stripe_fake._params import Params

__all__ = ["CheckoutMixin"]

Obj = dict[str, Any]


class CheckoutMixin(InvoicesMixin):
    def _init_state(self) -> None:
        super()._init_state()
        self.checkout_sessions: dict[str, Obj] = {}
        self._checkout_plans: dict[str, Obj] = {}

    # -- checkout sessions -------------------------------------------------------------------------

    @locked
    def create_checkout_session(self, data: Obj) -> Obj:
        p = Params(
            data,
            (
                "mode",
                "success_url",
                "cancel_url",
                "return_url",
                "customer",
                "customer_email",
                "customer_creation",
                "line_items",
                "metadata",
                "client_reference_id",
                "subscription_data",
                "payment_method_types",
                "allow_promotion_codes",
                "billing_address_collection",
                "expires_at",
                "ui_mode",
                "locale",
                "currency",
            ),
        )
        mode = p.enum("mode", ("payment", "subscription", "setup"), required=True)
        customer = p.string("customer") or None
        if customer is not None:
            self.require_customer(customer)
        email = p.string("customer_email") or None
        if customer is not None and email is not None:
            raise StripeError(400, "You may only specify one of these parameters: customer, customer_email.")
        lines: list[Obj] = []
        subtotal = 0
        currency: str | None = p.string("currency")
        if mode == "subscription":
            for price, quantity, _ in self._resolve_items(p.array("line_items"), "line_items"):
                lines.append({"id": self.ids("li_", 24), "price": price["id"], "quantity": quantity})
                subtotal += (price["unit_amount"] or 0) * (quantity or 0)
                currency = price["currency"]
        elif mode == "payment":
            for i, raw in enumerate(p.array("line_items") or []):
                lp = Params(raw if isinstance(raw, dict) else {}, ("price", "quantity"), f"line_items[{i}]")
                price_id = lp.req_str("price")
                one = self.prices.get(price_id)
                if one is None:
                    raise no_such("price", price_id, param=f"line_items[{i}][price]", status=400)
                price = one
                quantity = lp.integer("quantity", required=True) or 0
                lines.append({"id": self.ids("li_", 24), "price": price_id, "quantity": quantity})
                subtotal += (price["unit_amount"] or 0) * quantity
                currency = price["currency"]
            if not lines:
                raise StripeError(400, "Missing required param: line_items.", code="parameter_missing")
        sub_data = p.sub("subscription_data", ("metadata", "description", "trial_period_days"))
        now = self.now_s()
        ident = self.ids("cs_test_" if not self.ctx().livemode else "cs_live_", 58)
        session: Obj = {
            "id": ident,
            "object": "checkout.session",
            "adaptive_pricing": {"enabled": False},
            "after_expiration": None,
            "allow_promotion_codes": p.boolean("allow_promotion_codes"),
            "amount_subtotal": subtotal if mode != "setup" else None,
            "amount_total": subtotal if mode != "setup" else None,
            "automatic_tax": {"enabled": False, "liability": None, "provider": None, "status": None},
            "billing_address_collection": p.enum("billing_address_collection", ("auto", "required")),
            "cancel_url": p.string("cancel_url") or None,
            "client_reference_id": p.string("client_reference_id", max_len=200) or None,
            "client_secret": None,
            "collected_information": None,
            "consent": None,
            "consent_collection": None,
            "created": now,
            "currency": currency,
            "currency_conversion": None,
            "custom_fields": [],
            "custom_text": {
                "after_submit": None,
                "shipping_address": None,
                "submit": None,
                "terms_of_service_acceptance": None,
            },
            "customer": customer,
            "customer_account": None,
            "customer_creation": p.enum("customer_creation", ("always", "if_required"))
            or (None if customer or mode == "subscription" else "if_required"),
            "customer_details": None,
            "customer_email": email,
            "discounts": [],
            "expires_at": p.integer("expires_at") or now + 86400,
            "integration_identifier": None,
            "invoice": None,
            "invoice_creation": None,
            "livemode": self.ctx().livemode,
            "locale": p.string("locale") or None,
            "managed_payments": {"enabled": False},
            "metadata": p.metadata(),
            "mode": mode,
            "origin_context": None,
            "payment_intent": None,
            "payment_link": None,
            "payment_method_collection": "always" if mode == "subscription" else None,
            "payment_method_configuration_details": None,
            "payment_method_options": {},
            "payment_method_types": p.strings("payment_method_types") or ["card"],
            "payment_status": "unpaid",
            "permissions": None,
            "phone_number_collection": {"enabled": False},
            "recovered_from": None,
            "saved_payment_method_options": None,
            "setup_intent": None,
            "shipping_address_collection": None,
            "shipping_cost": None,
            "shipping_options": [],
            "status": "open",
            "submit_type": None,
            "subscription": None,
            "success_url": p.string("success_url") or None,
            "total_details": {"amount_discount": 0, "amount_shipping": 0, "amount_tax": 0},
            "ui_mode": p.enum("ui_mode", ("hosted", "embedded", "custom")) or "hosted",
            "url": f"https://checkout.stripe.com/c/pay/{ident}",
            "wallet_options": None,
        }
        # Not part of Stripe's object: what completing the session will do.
        self._checkout_plans[ident] = {
            "lines": lines,
            "subscription_metadata": sub_data.metadata() if sub_data else {},
        }
        self.checkout_sessions[ident] = session
        return self.copy(session)

    @locked
    def retrieve_checkout_session(self, ident: str) -> Obj:
        return self.copy(self.get_or_404(self.checkout_sessions, ident, "checkout.session"))

    def line_items(self, ident: str) -> Obj:
        """The session's ``line_items`` list (what ``expand[]=line_items`` shows): Stripe ``item`` objects."""
        session = self.get_or_404(self.checkout_sessions, ident, "checkout.session")
        plan = self._checkout_plans.get(ident, {"lines": []})
        data: list[Obj] = []
        for line in plan["lines"]:
            price = self.prices.get(line["price"])
            if price is None:
                continue
            quantity = line["quantity"]
            amount = (price["unit_amount"] or 0) * (quantity or 0)
            product = self.products.get(price["product"]) or {}
            data.append(
                {
                    "id": line["id"],
                    "object": "item",
                    "adjustable_quantity": None,
                    "amount_discount": 0,
                    "amount_subtotal": amount,
                    "amount_tax": 0,
                    "amount_total": amount,
                    "currency": price["currency"],
                    "description": product.get("name"),
                    "metadata": {},
                    "price": self.copy(price),
                    "quantity": quantity,
                }
            )
        return {
            "object": "list",
            "data": data,
            "has_more": False,
            "url": f"/v1/checkout/sessions/{session['id']}/line_items",
        }

    @locked
    def list_checkout_sessions(self, data: Obj) -> Obj:
        p = Params(
            data,
            ("limit", "starting_after", "ending_before", "customer", "subscription", "status", "created"),
        )
        filters = {k: p.string(k) for k in ("customer", "subscription", "status")}
        rows = [
            s
            for s in reversed(self.checkout_sessions.values())
            if all(v is None or s[k] == v for k, v in filters.items())
        ]
        return self.paginate(rows, p, "/v1/checkout/sessions")

    @locked
    def expire_checkout_session(self, ident: str) -> Obj:
        session = self.get_or_404(self.checkout_sessions, ident, "checkout.session")
        if session["status"] != "open":
            raise StripeError(400, "Only Checkout Sessions with a status of `open` can be expired.")
        session["status"] = "expired"
        self.emit("checkout.session.expired", session)
        return self.copy(session)

    @locked
    def complete_checkout_session(self, ident: str, *, email: str | None = None, name: str | None = None) -> Obj:
        """Test helper: the customer pays. Creates the customer and subscription as Checkout would,
        then emits ``checkout.session.completed``."""
        session = self.get_or_404(self.checkout_sessions, ident, "checkout.session")
        if session["status"] != "open":
            raise StripeError(400, f"Checkout Session {ident} is {session['status']}, not open.")
        plan = self._checkout_plans.get(ident, {"lines": [], "subscription_metadata": {}})
        email = email or session["customer_email"] or "customer@example.com"
        customer = session["customer"]
        if customer is None and (session["mode"] == "subscription" or session["customer_creation"] == "always"):
            customer = self.create_customer({"email": email, **({"name": name} if name else {})})["id"]
            session["customer"] = customer
        if session["mode"] == "subscription":
            assert customer is not None
            lines = [
                {
                    "price": x["price"],
                    **({"quantity": str(x["quantity"])} if x["quantity"] is not None else {}),
                }
                for x in plan["lines"]
            ]
            items = self._resolve_items(lines, "line_items")
            sub = self._new_subscription(customer, items, dict(plan["subscription_metadata"]), None)
            session["subscription"] = sub["id"]
        elif session["mode"] == "payment":
            session["payment_intent"] = self.ids("pi_")
        else:  # setup: Checkout collected a payment method through a SetupIntent
            session["setup_intent"] = self.ids("seti_")
        session["customer_details"] = {
            "address": None,
            "business_name": None,
            "email": email,
            "individual_name": None,
            "name": name,
            "phone": None,
            "tax_exempt": "none",
            "tax_ids": [],
        }
        session["status"] = "complete"
        session["payment_status"] = "paid" if session["amount_total"] else "no_payment_required"
        self.emit("checkout.session.completed", session)
        return self.copy(session)
