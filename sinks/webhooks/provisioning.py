"""Provisioning an org's pro subscription at Stripe: one subscription carrying every catalog price, with
``metadata.org_id``, and the sign-up credit (a −3000 cents customer balance transaction) once per org.

Outcomes are data (:class:`ProvisionOutcome`), never exceptions. A crash at any point still ends with one
subscription and one credit: org-derived idempotency keys within Stripe's 24 h, and a look for an earlier
attempt's objects before writing.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import stripe

from models.webhooks import (
    CREDIT_CURRENCY,
    ENDED_STATUSES,
    PROMO_CREDIT_CENTS,
    credit_idempotency_key,
    subscription_idempotency_key,
)
from sinks.base import Status
from sinks.stripe.errors import classify
from sinks.webhooks.store import Provisioned

__all__ = ["ProvisionOutcome", "ProvisionRequest", "StripeProvisioner"]

log = logging.getLogger(__name__)

CREDIT_MARK = "edgebill_credit"  # balance-transaction metadata key: the org the sign-up credit was given to


@dataclass(frozen=True, slots=True)
class ProvisionRequest:
    """Provision ``org_id`` for ``customer_id`` with ``prices`` ((catalog key, price id) in catalog order).

    ``generation``: how many subscriptions were provisioned for the org before (picks the idempotency key);
    ``credit``: whether the sign-up credit is still to be applied; ``subscription_id``: a paying subscription the
    org already has (then no subscription is created, only the credit is made sure of)."""

    org_id: str
    customer_id: str
    prices: tuple[tuple[str, str], ...]
    generation: int = 0
    credit: bool = True
    subscription_id: str | None = None  # the org's paying subscription the ledger knows: kept, none created

    @property
    def subscription_key(self) -> str:
        return subscription_idempotency_key(self.org_id, self.generation)

    def describe(self) -> dict[str, Any]:
        """What provisioning does for this request (also the shadow log's "would have done")."""
        return {
            "subscription": {
                "customer": self.customer_id,
                "idempotency_key": self.subscription_key,
                "items": [{"key": k, "price": p} for k, p in self.prices],
                "metadata": {"org_id": self.org_id},
            },
            "credit": (
                {
                    "amount": PROMO_CREDIT_CENTS,
                    "currency": CREDIT_CURRENCY,
                    "idempotency_key": credit_idempotency_key(self.org_id),
                }
                if self.credit
                else None
            ),
        }


@dataclass(frozen=True, slots=True)
class ProvisionOutcome:
    status: Status
    result: Provisioned | None = None
    error: str | None = None
    retry_after: float | None = None


def _meta(obj: Any) -> Mapping[str, Any]:
    """An SDK object's metadata as a plain dict ({} when it has none)."""
    if obj is None:
        return {}
    meta: Any = obj.to_dict().get("metadata") if hasattr(obj, "to_dict") else None
    return dict(meta or {})


class StripeProvisioner:
    """Creates (or finds) an org's subscription and sign-up credit. Blocking: call it from a thread."""

    def __init__(self, client: stripe.StripeClient) -> None:
        self._client = client

    def provision(self, req: ProvisionRequest) -> ProvisionOutcome:
        """Provision ``req``; never raises.

        Side effects, in order: (1) keep ``req.subscription_id`` if given, else list the customer's
        subscriptions and adopt one with ``metadata.org_id`` = the org that has not ended; (2) otherwise create
        the subscription (every price, ``metadata.org_id``) with the key ``req.subscription_key``; (3) when
        ``req.credit``, list the customer's balance transactions and adopt the one marked for the org,
        otherwise create it (−3000 cents) with the key ``credit-{org}``.
        Nothing is recorded here: a crash after (2) or (3) is followed by a retry that finds the same
        subscription and credit (step 1 and 3's look-ups, or the idempotency keys), never a second one.
        """
        if not req.prices:
            return ProvisionOutcome(Status.PERMANENT, error="empty price catalog: run `edgebill stripe setup`")
        v1 = self._client.v1
        step = "subscription"
        try:
            sub: Any = (
                v1.subscriptions.retrieve(req.subscription_id)
                if req.subscription_id is not None
                else self._find_subscription(req)
            )
            adopted = sub is not None
            if sub is None:
                params: Any = {
                    "customer": req.customer_id,
                    "items": [{"price": price} for _, price in req.prices],
                    "metadata": {"org_id": req.org_id},
                }
                sub = v1.subscriptions.create(params, {"idempotency_key": req.subscription_key})
            step = "credit"
            credit_id: str | None = None
            if req.credit:
                credit_id = self._find_credit(req)
                if credit_id is None:
                    txn_params: Any = {
                        "amount": PROMO_CREDIT_CENTS,
                        "currency": CREDIT_CURRENCY,
                        "description": "Pro sign-up credit",
                        "metadata": {"org_id": req.org_id, CREDIT_MARK: req.org_id},
                    }
                    txn = v1.customers.balance_transactions.create(
                        req.customer_id, txn_params, {"idempotency_key": credit_idempotency_key(req.org_id)}
                    )
                    credit_id = str(txn.id)
        except Exception as exc:
            o = classify(exc, req)
            status = o.status
            if isinstance(exc, stripe.IdempotencyError) and (exc.http_status or 0) == 409:
                status = Status.TRANSIENT  # the same key is still in flight (an earlier attempt): wait for it
            log.warning("provisioning %s: %s failed (%s): %s", req.org_id, step, status.value, o.error)
            error = f"{step}: {o.error}" + (f" [{o.code}]" if o.code else "")
            return ProvisionOutcome(status, error=error, retry_after=o.retry_after)
        items = [str(i.id) for i in sub["items"].data]
        detail = {**req.describe(), "adopted_subscription": adopted, "subscription_items": items}
        result = Provisioned(str(sub.id), req.customer_id, str(sub.status), credit_id, detail)
        log.info(
            "provisioned %s: subscription %s (%d items%s), credit %s",
            req.org_id,
            result.subscription_id,
            len(items),
            ", found" if adopted else "",
            credit_id or "already given",
        )
        return ProvisionOutcome(Status.OK, result)

    def _find_subscription(self, req: ProvisionRequest) -> Any:
        subs = self._client.v1.subscriptions.list({"customer": req.customer_id, "status": "all", "limit": 100})
        for sub in subs.auto_paging_iter():
            if _meta(sub).get("org_id") == req.org_id and sub.status not in ENDED_STATUSES:
                return sub
        return None

    def _find_credit(self, req: ProvisionRequest) -> str | None:
        txns = self._client.v1.customers.balance_transactions.list(req.customer_id, {"limit": 100})
        for txn in txns.auto_paging_iter():
            if _meta(txn).get(CREDIT_MARK) == req.org_id:
                return str(txn.id)
        return None

    def org_of_subscription(self, subscription_id: str) -> str | None:
        """``metadata.org_id`` of a subscription, else of its customer (read with ``expand[]=customer``); None
        when neither says, or Stripe cannot be asked now."""
        try:
            sub = self._client.v1.subscriptions.retrieve(subscription_id, {"expand": ["customer"]})
        except Exception as exc:
            log.warning("could not look up the org of %s: %s", subscription_id, exc)
            return None
        customer: Any = sub.customer
        org = _meta(sub).get("org_id") or (None if isinstance(customer, str) else _meta(customer).get("org_id"))
        return org if isinstance(org, str) and org else None
