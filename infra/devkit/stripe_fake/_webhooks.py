"""Webhook endpoints, the v1 event list, and signed webhook delivery with bounded retries."""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import hmac
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from infra.devkit.stripe_fake._base import API_VERSION, locked
from infra.devkit.stripe_fake._checkout import CheckoutMixin
from infra.devkit.stripe_fake._errors import StripeError
from infra.devkit.stripe_fake._params import Params
from infra.devkit.stripe_fake._util import dumps

__all__ = [
    "DEFAULT_WEBHOOK_SPEED",
    "STRIPE_RETRY_SCHEDULE_S",
    "WebhookDeliverer",
    "WebhooksMixin",
    "retry_delays",
    "sign_payload",
]

log = logging.getLogger("infra.devkit.stripe_fake")

Obj = dict[str, Any]


def _stripe_schedule() -> tuple[int, ...]:
    """Seconds before each retry of a failed delivery, as in live mode: Stripe retries "with an exponential
    back off" for up to three days and does not publish the intervals; here the delay triples from a minute,
    capped at a day, for as long as the retries stay within 72 hours (9 retries, the last ~66 h in)."""
    delays: list[int] = []
    delay, total = 60, 0
    while total + delay <= 72 * 3600:
        delays.append(delay)
        total += delay
        delay = min(delay * 3, 86_400)
    return tuple(delays)


#: Stripe's retry schedule in seconds (one attempt more than there are delays).
STRIPE_RETRY_SCHEDULE_S = _stripe_schedule()
#: How much faster than Stripe the local server retries by default: three days pass in about 24 s.
DEFAULT_WEBHOOK_SPEED = 10_000.0


def retry_delays(speed: float) -> tuple[float, ...]:
    """Stripe's schedule compressed ``speed`` times (``speed=1``: real time)."""
    if not speed > 0:
        raise ValueError("the webhook speed factor must be > 0")
    return tuple(d / speed for d in STRIPE_RETRY_SCHEDULE_S)


DEFAULT_RETRY_DELAYS = retry_delays(DEFAULT_WEBHOOK_SPEED)


def sign_payload(payload: bytes, secret: str, timestamp: int) -> str:
    """The ``Stripe-Signature`` header value: ``t=<ts>,v1=<hex HMAC-SHA256(secret, "<ts>.<payload>")>``."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


@dataclass(frozen=True)
class _Target:
    endpoint: str
    url: str
    secret: str


class WebhooksMixin(CheckoutMixin):
    #: Seconds between delivery attempts (Stripe's schedule at :data:`DEFAULT_WEBHOOK_SPEED`); a test may
    #: set its own on the instance.
    webhook_retry_delays: tuple[float, ...] = DEFAULT_RETRY_DELAYS

    def set_webhook_speed(self, speed: float) -> None:
        """Retry failed deliveries on Stripe's schedule compressed ``speed`` times."""
        self.webhook_retry_delays = retry_delays(speed)

    def _init_state(self) -> None:
        super()._init_state()
        self.webhook_endpoints: dict[str, Obj] = {}
        self.webhook_secrets: dict[str, str] = {}
        self.deliveries: list[Obj] = []
        self.pending_deliveries: set[str] = set()
        if not hasattr(self, "_deliveries_cv"):
            self._deliveries_cv = threading.Condition(self._lock)

    # -- endpoints ---------------------------------------------------------------------------------

    @staticmethod
    def _events_param(p: Params, required: bool) -> list[str] | None:
        events = p.strings("enabled_events")
        if events is None:
            if required:
                raise StripeError(
                    400,
                    "Missing required param: enabled_events.",
                    code="parameter_missing",
                    param="enabled_events",
                )
            return None
        if not events:
            raise StripeError(400, "enabled_events must not be empty.", param="enabled_events")
        for i, name in enumerate(events):
            if name != "*" and ("." not in name or " " in name):
                raise StripeError(400, f"Invalid enabled_events[{i}]: {name}", param=f"enabled_events[{i}]")
        return events

    @staticmethod
    def _url_param(p: Params) -> str:
        url = p.req_str("url", max_len=5000)
        if not url.startswith(("http://", "https://")):
            raise StripeError(400, f"Invalid URL: {url}", code="url_invalid", param="url")
        return url

    @locked
    def create_webhook_endpoint(self, data: Obj) -> Obj:
        p = Params(data, ("url", "enabled_events", "description", "metadata", "api_version", "connect"))
        ident = self.ids("we_")
        endpoint: Obj = {
            "id": ident,
            "object": "webhook_endpoint",
            "api_version": p.string("api_version") or None,
            "application": None,
            "created": self.now_s(),
            "description": p.string("description") or None,
            "enabled_events": self._events_param(p, required=True),
            "livemode": self.ctx().livemode,
            "metadata": p.metadata(),
            "status": "enabled",
            "url": self._url_param(p),
        }
        secret = "whsec_" + self.ids.hex(32)
        self.webhook_endpoints[ident] = endpoint
        self.webhook_secrets[ident] = secret
        return {**self.copy(endpoint), "secret": secret}

    @locked
    def retrieve_webhook_endpoint(self, ident: str) -> Obj:
        return self.copy(self.get_or_404(self.webhook_endpoints, ident, "webhook endpoint"))

    @locked
    def update_webhook_endpoint(self, ident: str, data: Obj) -> Obj:
        endpoint = self.get_or_404(self.webhook_endpoints, ident, "webhook endpoint")
        p = Params(data, ("url", "enabled_events", "description", "metadata", "disabled"))
        if p.has("url"):
            endpoint["url"] = self._url_param(p)
        events = self._events_param(p, required=False)
        if events is not None:
            endpoint["enabled_events"] = events
        if p.has("description"):
            endpoint["description"] = p.string("description") or None
        if p.has("disabled"):
            endpoint["status"] = "disabled" if p.boolean("disabled") else "enabled"
        endpoint["metadata"] = p.metadata(endpoint["metadata"])
        return self.copy(endpoint)

    @locked
    def delete_webhook_endpoint(self, ident: str) -> Obj:
        self.get_or_404(self.webhook_endpoints, ident, "webhook endpoint")
        del self.webhook_endpoints[ident]
        self.webhook_secrets.pop(ident, None)
        return {"id": ident, "object": "webhook_endpoint", "deleted": True}

    @locked
    def list_webhook_endpoints(self, data: Obj) -> Obj:
        p = Params(data, ("limit", "starting_after", "ending_before"))
        return self.paginate(list(reversed(self.webhook_endpoints.values())), p, "/v1/webhook_endpoints")

    @locked
    def webhook_secret(self, ident: str) -> str:
        """The signing secret of an endpoint (Stripe shows it once, at creation)."""
        return self.webhook_secrets[ident]

    def webhook_targets(self, event_type: str) -> list[_Target]:
        with self._lock:
            return [
                _Target(e["id"], e["url"], self.webhook_secrets[e["id"]])
                for e in self.webhook_endpoints.values()
                if e["status"] == "enabled" and ("*" in e["enabled_events"] or event_type in e["enabled_events"])
            ]

    # -- events ------------------------------------------------------------------------------------

    @locked
    def list_events(self, data: Obj) -> Obj:
        p = Params(data, ("limit", "starting_after", "ending_before", "type", "types", "created", "delivery_success"))
        pattern = p.string("type")
        types = p.strings("types")
        if pattern is not None and types is not None:
            raise StripeError(400, "You may only specify one of these parameters: type, types.")
        rows = [
            e
            for e in reversed(self.events.values())
            if (pattern is None or fnmatch.fnmatchcase(e["type"], pattern)) and (types is None or e["type"] in types)
        ]
        return self.paginate(rows, p, "/v1/events")

    @locked
    def retrieve_event(self, ident: str) -> Obj:
        return self.copy(self.get_or_404(self.events, ident, "event"))

    @locked
    def resend_event(self, ident: str) -> Obj:
        """Deliver an event again to every endpoint it matches (the Dashboard's "Resend"): same id, same body,
        a fresh signature. Returns the event."""
        event = self.get_or_404(self.events, ident, "event")
        for listener in list(self._event_listeners):
            listener(event)
        return self.copy(event)

    # -- delivery bookkeeping (the deliverer calls these) ------------------------------------------

    def _delivery_started(self, delivery_id: str) -> None:
        with self._lock:
            self.pending_deliveries.add(delivery_id)

    def _delivery_attempted(self, record: Obj) -> None:
        with self._lock:
            self.deliveries.append(record)

    def _delivery_finished(self, delivery_id: str, event_id: str, ok: bool) -> None:
        with self._lock:
            self.pending_deliveries.discard(delivery_id)
            event = self.events.get(event_id)
            if ok and event is not None and event["pending_webhooks"] > 0:
                event["pending_webhooks"] -= 1
            self._deliveries_cv.notify_all()

    @locked
    def webhook_deliveries(self) -> list[Obj]:
        """Every delivery attempt: event, endpoint, url, attempt number, HTTP status or error."""
        return [dict(d) for d in self.deliveries]

    def wait_for_webhooks(self, timeout: float = 5.0) -> bool:
        """Block until no delivery is pending (delivered or given up); False on timeout."""
        with self._deliveries_cv:
            return self._deliveries_cv.wait_for(lambda: not self.pending_deliveries, timeout)

    def _clear_pending(self) -> None:
        with self._lock:
            self.pending_deliveries.clear()
            self._deliveries_cv.notify_all()


class WebhookDeliverer:
    """Delivers the state's v1 events to matching endpoints from the server's event loop."""

    def __init__(self, state: WebhooksMixin, *, timeout: float = 5.0) -> None:
        self.state = state
        self.timeout = timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._seq = 0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        self.state.add_event_listener(self._on_event)

    async def stop(self) -> None:
        self.state.remove_event_listener(self._on_event)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
        self.state._clear_pending()

    def _on_event(self, event: Obj) -> None:
        """Called (under the state lock, on any thread) when an event is recorded."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        targets = self.state.webhook_targets(event["type"])
        event["pending_webhooks"] = len(targets)
        payload = dumps(event)
        for target in targets:
            self._seq += 1
            delivery_id = f"{event['id']}:{target.endpoint}:{self._seq}"
            self.state._delivery_started(delivery_id)
            loop.call_soon_threadsafe(self._spawn, delivery_id, event["id"], payload, target)

    def _spawn(self, delivery_id: str, event_id: str, payload: bytes, target: _Target) -> None:
        task = asyncio.get_running_loop().create_task(self._deliver(delivery_id, event_id, payload, target))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, delivery_id: str, event_id: str, payload: bytes, target: _Target) -> None:
        delays = self.state.webhook_retry_delays
        ok = False
        try:
            for attempt in range(1, len(delays) + 2):
                ok = await self._attempt(event_id, payload, target, attempt)
                if ok or attempt > len(delays):
                    break
                await asyncio.sleep(delays[attempt - 1])
        finally:
            if not ok:
                log.info("webhook %s to %s not delivered", event_id, target.url)
            self.state._delivery_finished(delivery_id, event_id, ok)

    async def _attempt(self, event_id: str, payload: bytes, target: _Target, attempt: int) -> bool:
        assert self._session is not None
        # Signed with the real wall clock: receivers check the timestamp against their own clock.
        timestamp = int(time.time())
        headers = {
            "Content-Type": "application/json; charset=utf-8",
            "Stripe-Signature": sign_payload(payload, target.secret, timestamp),
            "User-Agent": "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
            "Stripe-Version": API_VERSION,
        }
        status: int | None = None
        error: str | None = None
        try:
            async with self._session.post(target.url, data=payload, headers=headers) as resp:
                status = resp.status
                await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        self.state._delivery_attempted(
            {
                "event": event_id,
                "endpoint": target.endpoint,
                "url": target.url,
                "attempt": attempt,
                "status": status,
                "error": error,
                "at": time.time(),
            }
        )
        return status is not None and 200 <= status < 300
