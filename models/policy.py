"""``org-policy`` wire model and policy-as-of-time resolution.

An org's policy is a history: each record says what holds from ``effective_at`` on. A tick is
priced by the policy in effect at the tick's own timestamp, so a replay prices it the same way
whenever it runs.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.billing import BillingMode, Plan
from models.ticks import MAX_TS_MS, no_nul, parse_timestamp_ms

__all__ = ["STRIPE_BILLED_PROVIDERS", "OrgPolicy", "PolicyHistory"]

#: ``billing_provider`` values billed through Stripe, i.e. by edgebill: ``stripe``, and ``legacy`` (the
#: original system's name for the same path). Anything else (``autumn``) is billed elsewhere: the usage is
#: counted, with the reason ``provider_<name>``, never sent.
STRIPE_BILLED_PROVIDERS: frozenset[str] = frozenset({"stripe", "legacy"})


class OrgPolicy(BaseModel):
    """One policy record. ``effective_at`` accepts unix seconds or RFC 3339; stored as unix ms."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    # Limits of the org_policies columns, so that every ledger database stores what is accepted here.
    org_id: str = Field(min_length=1, max_length=255)
    plan: Plan
    billing_mode: BillingMode = BillingMode.UNIFIED
    stripe_customer_id: str | None = Field(default=None, max_length=255)
    stripe_subscription_id: str | None = Field(default=None, max_length=255)
    billing_provider: str = Field(default="stripe", max_length=32)
    effective_at_ms: int = Field(ge=0, le=MAX_TS_MS, alias="effective_at")

    _no_nul = field_validator("org_id", "stripe_customer_id", "stripe_subscription_id", "billing_provider")(no_nul)

    @field_validator("effective_at_ms", mode="before")
    @classmethod
    def _to_ms(cls, v: Any) -> int:
        if isinstance(v, bool):
            raise ValueError("effective_at must be unix seconds or an RFC 3339 timestamp")
        if isinstance(v, int | float):
            return int(v * 1000)
        ms = parse_timestamp_ms(v)
        if ms is None:
            raise ValueError("effective_at must be unix seconds or an RFC 3339 timestamp with offset")
        return ms

    @property
    def billed_through_stripe(self) -> bool:
        """The org's provider is one edgebill bills through (:data:`STRIPE_BILLED_PROVIDERS`)."""
        return self.billing_provider in STRIPE_BILLED_PROVIDERS

    @property
    def billable(self) -> bool:
        """Only pro orgs billed through Stripe are billed by edgebill."""
        return self.plan is Plan.PRO and self.billed_through_stripe

    def to_wire(self) -> dict[str, Any]:
        return {
            "org_id": self.org_id,
            "plan": self.plan.value,
            "billing_mode": self.billing_mode.value,
            "stripe_customer_id": self.stripe_customer_id,
            "stripe_subscription_id": self.stripe_subscription_id,
            "billing_provider": self.billing_provider,
            "effective_at": datetime.fromtimestamp(self.effective_at_ms / 1000, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_wire())

    @classmethod
    def from_json(cls, raw: bytes) -> OrgPolicy:
        return cls.model_validate(orjson.loads(raw))


class PolicyHistory:
    """The policy history of one org, answering "what held at time t" in O(log n)."""

    __slots__ = ("_policies", "_starts")

    def __init__(self, policies: Sequence[OrgPolicy]) -> None:
        ordered = sorted(policies, key=lambda p: p.effective_at_ms)
        self._policies = ordered
        self._starts = [p.effective_at_ms for p in ordered]

    def as_of(self, ts_ms: int) -> OrgPolicy | None:
        """The policy in effect at ``ts_ms`` (the latest one with ``effective_at <= ts``), or None."""
        i = bisect.bisect_right(self._starts, ts_ms)
        return self._policies[i - 1] if i else None

    def latest(self) -> OrgPolicy | None:
        return self._policies[-1] if self._policies else None

    def change_points(self, start_ms: int, end_ms: int) -> list[int]:
        """Effective times strictly inside ``(start_ms, end_ms)``: where pricing changes within a span."""
        lo = bisect.bisect_right(self._starts, start_ms)
        hi = bisect.bisect_left(self._starts, end_ms)
        return self._starts[lo:hi]
