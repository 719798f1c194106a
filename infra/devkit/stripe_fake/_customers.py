"""Customers and customer balance transactions."""

from __future__ import annotations

import copy
from typing import Any

from infra.devkit.stripe_fake._base import StateBase, locked
from infra.devkit.stripe_fake._errors import StripeError, no_such
from infra.devkit.stripe_fake._params import Params
from infra.devkit.stripe_fake._search import compile_query

__all__ = ["CustomersMixin"]

Obj = dict[str, Any]

_CUSTOMER_FIELDS = (
    "address",
    "balance",
    "description",
    "email",
    "metadata",
    "name",
    "phone",
    "preferred_locales",
    "tax_exempt",
)
_ADDRESS_KEYS = ("city", "country", "line1", "line2", "postal_code", "state")


class CustomersMixin(StateBase):
    def _init_state(self) -> None:
        super()._init_state()
        self.customers: dict[str, Obj] = {}
        self.deleted_customers: set[str] = set()
        self.balance_transactions: dict[str, Obj] = {}

    # -- helpers -----------------------------------------------------------------------------------

    def customer_exists(self, ident: str) -> bool:
        return ident in self.customers

    def require_customer(self, ident: str, param: str = "customer") -> Obj:
        cus = self.customers.get(ident)
        if cus is None:
            raise no_such("customer", ident, param=param, status=400)
        return cus

    @staticmethod
    def _address(p: Params) -> Obj | None:
        sub = p.sub("address", _ADDRESS_KEYS)
        if sub is None:
            return None
        return {k: sub.string(k) for k in _ADDRESS_KEYS}

    def _balance_txn(self, cus: Obj, amount: int, *, description: str | None, metadata: dict[str, str] | None) -> Obj:
        ending = int(cus["balance"]) + amount
        txn: Obj = {
            "id": self.ids("cbtxn_"),
            "object": "customer_balance_transaction",
            "amount": amount,
            "checkout_session": None,
            "created": self.now_s(),
            "credit_note": None,
            "currency": cus["currency"] or "usd",
            "customer": cus["id"],
            "customer_account": None,
            "description": description,
            "ending_balance": ending,
            "invoice": None,
            "livemode": cus["livemode"],
            "metadata": metadata,
            "type": "adjustment",
        }
        cus["balance"] = ending
        if cus["currency"] is None:
            cus["currency"] = txn["currency"]
        self.balance_transactions[txn["id"]] = txn
        return txn

    # -- API ---------------------------------------------------------------------------------------

    @locked
    def create_customer(self, data: Obj) -> Obj:
        p = Params(data, _CUSTOMER_FIELDS)
        ctx = self.ctx()
        now = self.now_s()
        cus: Obj = {
            "id": self.ids("cus_", 14),
            "object": "customer",
            "address": self._address(p),
            "balance": 0,
            "created": now,
            "currency": None,
            "default_source": None,
            "delinquent": False,
            "description": p.string("description"),
            "discount": None,
            "email": p.string("email", max_len=512),
            "invoice_prefix": self.ids.hex(8).upper()[:7],
            "invoice_settings": {
                "custom_fields": None,
                "default_payment_method": None,
                "footer": None,
                "rendering_options": None,
            },
            "livemode": ctx.livemode,
            "metadata": p.metadata(),
            "name": p.string("name", max_len=256),
            "next_invoice_sequence": 1,
            "phone": p.string("phone", max_len=20),
            "preferred_locales": p.strings("preferred_locales") or [],
            "shipping": None,
            "tax_exempt": p.enum("tax_exempt", ("none", "exempt", "reverse")) or "none",
            "test_clock": None,
        }
        self.customers[cus["id"]] = cus
        balance = p.integer("balance")
        if balance:
            self._balance_txn(cus, balance, description=None, metadata=None)
        self.emit("customer.created", cus)
        return self.copy(cus)

    @locked
    def retrieve_customer(self, ident: str) -> Obj:
        if ident in self.deleted_customers:
            return {"id": ident, "object": "customer", "deleted": True}
        return self.copy(self.get_or_404(self.customers, ident, "customer"))

    @locked
    def update_customer(self, ident: str, data: Obj) -> Obj:
        cus = self.get_or_404(self.customers, ident, "customer")
        p = Params(data, _CUSTOMER_FIELDS)
        before = self.copy(cus)
        for key in ("description", "email", "name", "phone"):
            if p.has(key):
                cus[key] = p.string(key) or None
        if p.has("address"):
            cus["address"] = self._address(p)
        if p.has("preferred_locales"):
            cus["preferred_locales"] = p.strings("preferred_locales") or []
        if p.has("tax_exempt"):
            cus["tax_exempt"] = p.enum("tax_exempt", ("none", "exempt", "reverse")) or "none"
        cus["metadata"] = p.metadata(cus["metadata"])
        balance = p.integer("balance")
        if balance is not None and balance != cus["balance"]:
            self._balance_txn(cus, balance - int(cus["balance"]), description=None, metadata=None)
        previous = {k: v for k, v in before.items() if cus[k] != v}
        if previous:
            self.emit("customer.updated", cus, previous)
        return self.copy(cus)

    @locked
    def delete_customer(self, ident: str) -> Obj:
        cus = self.get_or_404(self.customers, ident, "customer")
        del self.customers[ident]
        self.deleted_customers.add(ident)
        self.emit("customer.deleted", cus)
        return {"id": ident, "object": "customer", "deleted": True}

    @locked
    def list_customers(self, data: Obj) -> Obj:
        p = Params(data, ("limit", "starting_after", "ending_before", "email", "created", "test_clock"))
        email = p.string("email")
        rows = [c for c in reversed(self.customers.values()) if email is None or c["email"] == email]
        return self.paginate(rows, p, "/v1/customers")

    @locked
    def search_customers(self, data: Obj) -> Obj:
        p = Params(data, ("query", "limit", "page"))
        match = compile_query(p.req_str("query"), {"email", "name", "phone", "created"})
        limit = p.integer("limit") or 10
        if not 1 <= limit <= 100:
            raise StripeError(400, "Invalid limit: must be between 1 and 100", param="limit")
        rows = [c for c in reversed(self.customers.values()) if match(c)]
        return search_result(rows[:limit], len(rows) > limit, "/v1/customers/search")

    @locked
    def create_balance_transaction(self, ident: str, data: Obj) -> Obj:
        cus = self.get_or_404(self.customers, ident, "customer")
        p = Params(data, ("amount", "currency", "description", "metadata"))
        amount = p.integer("amount", required=True)
        assert amount is not None
        currency = p.req_str("currency").lower()
        if cus["currency"] not in (None, currency):
            raise StripeError(
                400,
                f"The currency {currency} does not match the customer's currency {cus['currency']}.",
                param="currency",
            )
        before = self.copy(cus)
        txn = self._balance_txn(cus, amount, description=p.string("description"), metadata=p.metadata())
        self.emit("customer.updated", cus, {"balance": before["balance"]})
        return self.copy(txn)

    @locked
    def list_balance_transactions(self, ident: str, data: Obj) -> Obj:
        self.get_or_404(self.customers, ident, "customer")
        p = Params(data, ("limit", "starting_after", "ending_before", "created", "invoice"))
        rows = [t for t in reversed(self.balance_transactions.values()) if t["customer"] == ident]
        return self.paginate(rows, p, f"/v1/customers/{ident}/balance_transactions")


def search_result(rows: list[Obj], has_more: bool, url: str) -> Obj:
    return {
        "object": "search_result",
        "data": [copy.deepcopy(r) for r in rows],
        "has_more": has_more,
        "next_page": None,
        "url": url,
    }
