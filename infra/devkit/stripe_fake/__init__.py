"""A stateful, in-memory, Stripe-compatible HTTP server (aiohttp), for offline runs and tests.

It speaks the subset of Stripe this project uses, the way the official SDK talks to Stripe
(v1 form-encoded with bracket nesting, v2 JSON, the v2 meter-event stream on a session token),
with Stripe's validation rules and error bodies, Idempotency-Key replay, fault injection and
inspection endpoints under ``/_fake/``. Bound to 127.0.0.1 unless told otherwise.

Public API: :class:`FakeStripe` (state + operations), :func:`build_app`, :func:`run_foreground`
(``edgebill stripe-fake``), :class:`StripeServerThread` (tests), :class:`FaultConfig`,
:class:`StripeError`.

Stripe endpoints: customers (+ search, balance_transactions), products (+ search), prices (+ search),
subscriptions, subscription_items, invoices/create_preview (+ the preview's lines), checkout/sessions (+ expire),
webhook_endpoints, events,
billing/meters (+ deactivate, reactivate, event_summaries), billing/meter_events,
billing/meter_event_adjustments; v2 billing/meter_event_session, meter_event_stream, meter_events,
meter_event_adjustments, core/events.

Inspection (not Stripe): ``GET /_fake/meter_events``, ``/_fake/duplicates``, ``/_fake/receipts``, ``/_fake/requests``,
``/_fake/error_reports``, ``/_fake/webhook_deliveries``; ``GET|POST /_fake/faults`` and
``/_fake/clock`` (``{"advance": seconds}``); ``POST /_fake/reset``,
``POST /_fake/meter_events/{identifier}/drop`` and ``.../reject`` (an accepted event lost after the 202,
silently or with an error report), ``POST /_fake/checkout_sessions/{id}/complete`` (fires
``checkout.session.completed``, signed, to every matching endpoint), ``POST /_fake/events/{id}/resend``.

Webhook delivery retries a non-2xx answer on Stripe's live schedule (exponential, up to three days)
compressed by a speed factor (``webhook_speed``, default 10,000: about 24 s in all). ``expand[]`` is
honoured on the answers (``customer`` on a subscription, ``line_items`` on a checkout session, ...).
"""

from __future__ import annotations

from infra.devkit.stripe_fake._errors import StripeError
from infra.devkit.stripe_fake._faults import FaultConfig
from infra.devkit.stripe_fake._meters import MeterEventRecord
from infra.devkit.stripe_fake._routes import build_app
from infra.devkit.stripe_fake._server import StripeServerThread, run_foreground
from infra.devkit.stripe_fake._state import FakeStripe

__all__ = [
    "FakeStripe",
    "FaultConfig",
    "MeterEventRecord",
    "StripeError",
    "StripeServerThread",
    "build_app",
    "run_foreground",
]
