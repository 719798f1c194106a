"""Names of the Kafka topics edgebill reads and writes (before the optional prefix setting).

These are wire contracts: producers, the cell side and outside tools use the same names.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "TOPIC_ALERTS",
    "TOPIC_CONTROL",
    "TOPIC_DLQ",
    "TOPIC_POLICY",
    "TOPIC_POLICY_DLQ",
    "TOPIC_SCALE_DLQ",
    "TOPIC_SCALE_EVENTS",
    "TOPIC_TICKS",
    "TOPIC_WEBHOOKS",
]

TOPIC_TICKS: Final = "usage-ticks"
TOPIC_DLQ: Final = "usage-ticks-dlq"
TOPIC_POLICY: Final = "org-policy"
TOPIC_POLICY_DLQ: Final = "org-policy-dlq"
TOPIC_SCALE_EVENTS: Final = "sandbox-scale-events"
TOPIC_SCALE_DLQ: Final = "sandbox-scale-events-dlq"
TOPIC_WEBHOOKS: Final = "stripe-webhook-events"  # verified raw Stripe events, keyed by the event's object id
TOPIC_ALERTS: Final = "billing-alerts"  # the default; EDGEBILL_PARITY_ALERTS_TOPIC renames it
#: Compacted, one partition; key = the control name (``cutover``), value = the cutover state
#: (``models.cutover.CutoverState``) as a history of changes. The cell side reads ``authority`` from it.
TOPIC_CONTROL: Final = "billing-control"
