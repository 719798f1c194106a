"""The invoice check: the usage lines of Stripe's upcoming invoice (its preview for a subscription) against the
ledger. Pure; the ledger side and the preview are read by ``sinks``. A line matches when its quantity equals
exactly what Stripe should hold for its meter, customer and period; rows not sent yet are reported apart; an
unknown price is ``meter_misconfigured``. In detail: docs/architecture.md, "Module notes".
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from models.reconcile import Label, dec

__all__ = ["InvoiceLine", "InvoiceLineResult", "compare_invoice_line"]


@dataclass(frozen=True, slots=True)
class InvoiceLine:
    """One usage line of Stripe's invoice preview."""

    price_id: str
    quantity: Decimal
    period_start: int
    period_end: int
    subscription_item: str | None = None


@dataclass(frozen=True, slots=True)
class InvoiceLineResult:
    org_id: str
    subscription: str
    customer: str
    price_id: str
    meter: str | None  # None: the price is not in the catalog edgebill published
    period_start: int
    period_end: int
    stripe: Decimal
    ledger: Decimal  # what Stripe should hold for the period (as for a window)
    pending: Decimal  # rows of the period not sent yet
    label: Label
    detail: str = ""
    settled: bool = True  # False: rows of the period were sent too recently for Stripe to count them yet

    @property
    def difference(self) -> bool:
        """A difference that counts: a settled line that does not match."""
        return self.settled and self.label.difference

    def to_wire(self) -> dict[str, Any]:
        return {
            "org_id": self.org_id,
            "subscription": self.subscription,
            "customer": self.customer,
            "price": self.price_id,
            "meter": self.meter,
            "period": {"start": self.period_start, "end": self.period_end},
            "stripe": dec(self.stripe),
            "ledger": dec(self.ledger),
            "pending": dec(self.pending),
            "difference": dec(self.stripe - self.ledger),
            "label": self.label.value,
            "settled": self.settled,
            "detail": self.detail,
        }


def compare_invoice_line(stripe: Decimal, ledger: Decimal, *, meter_known: bool) -> Label:
    """An invoice preview's usage quantity against the ledger for the same period and meter."""
    if not meter_known:
        return Label.METER_MISCONFIGURED
    if stripe == ledger:
        return Label.OK
    return Label.SHORT if stripe < ledger else Label.OVER
