"""The metric objects updated where things happen (the Stripe drivers), in one process registry.

:data:`stripe_request_seconds` (histogram of Stripe API call latency) and :data:`stripe_errors_total`
(``kind`` = rate_limited, server, connection, permanent, duplicate, …). They reset when the process
restarts, as Prometheus expects; ``/metrics`` renders :data:`REGISTRY` first, then the ledger's durable
figures (see :mod:`streams.metrics_view`).
"""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Histogram

__all__ = ["REGISTRY", "stripe_errors_total", "stripe_request_seconds"]

REGISTRY: Final = CollectorRegistry(auto_describe=True)

stripe_request_seconds: Final = Histogram(
    "edgebill_stripe_request_seconds",
    "Latency of Stripe API calls made by the sender, seconds.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0),
    registry=REGISTRY,
)
stripe_errors_total: Final = Counter(
    "edgebill_stripe_errors",
    "Stripe API calls that failed, by kind (rate_limited, server, connection, permanent, duplicate, ...).",
    ["kind"],
    registry=REGISTRY,
)
