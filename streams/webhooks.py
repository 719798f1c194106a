"""Stripe webhooks in the worker: the receiver page, the webhook agent and its retry timer.

``POST /webhooks/stripe`` (:func:`receive_webhook`): 200 only after the verified event is acknowledged on
``stripe-webhook-events`` (413, 408, 400 or 503 otherwise; nothing logged carries the signature, secret or
body). The agent stores each batch (:meth:`WebhookStore.receive`) before acking, then applies each event and
publishes plan records; the retry timer (leader) applies what waits. Provisioning runs in a thread, only
under authority ``edge``. In detail: docs/architecture.md, "Module notes".
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

import stripe

from models.billing import Authority
from models.catalog import CATALOG_KEYS, missing_keys
from models.errors import InvalidRecord
from models.webhooks import (
    FINAL_OUTCOMES,
    Ignore,
    Outcome,
    SetupCheckout,
    SubscriptionChange,
    classify,
    parse_event,
    routing_key,
)
from sinks.base import Status
from sinks.webhooks.provisioning import ProvisionRequest, StripeProvisioner
from sinks.webhooks.store import PendingPolicy, WebhookStore
from streams.config import WebhookConfig
from streams.pipeline import Deps
from streams.records import RAW_BYTES, retry_forever

__all__ = ["Answer", "WebhookRuntime", "install_webhooks", "receive_webhook", "verify_signature"]

log = logging.getLogger(__name__)

WEBHOOK_PATH: Final = "/webhooks/stripe"
CLAIM_MS: Final = 30_000  # the agent's own time to apply an event it just stored, before the timer may
MAX_RETRY_DELAY_MS: Final = 300_000

Append = Callable[[bytes, bytes], Awaitable[None]]
SendPolicy = Callable[[PendingPolicy], Awaitable[None]]


# ----------------------------------------------------------------------------------------------- receiver


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: dict[str, Any]


def verify_signature(body: bytes, header: str | None, secret: str, tolerance_s: int) -> str | None:
    """None when ``header`` signs ``body`` with ``secret`` within ``tolerance_s``; else a short reason (no secret,
    no header value in it). The check is the official SDK's (:class:`stripe.WebhookSignature`)."""
    if not header:
        return "no Stripe-Signature header"
    try:
        stripe.WebhookSignature.verify_header(body, header, secret, tolerance_s)
    except stripe.SignatureVerificationError as exc:
        text = str(exc)
        if "tolerance" in text:
            return "signature timestamp outside the tolerance"
        if "matching" in text:
            return "no signature matches the body"
        return "malformed Stripe-Signature header"
    except (UnicodeDecodeError, TypeError, ValueError):
        # Not UTF-8 (the SDK decodes the body), or a header the constant-time compare cannot take.
        return "malformed body or Stripe-Signature header"
    return None


async def _read_body(request: Any, limit: int) -> bytes | None:
    """The raw body, or None when it is longer than ``limit`` (stops reading there)."""
    declared = request.content_length
    if declared is not None and declared > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.readany()
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)


async def receive_webhook(request: Any, cfg: WebhookConfig, append: Append) -> Answer:
    """Handle one ``POST /webhooks/stripe`` (an aiohttp request); see the module docstring for the answers."""
    remote = getattr(request, "remote", None)
    try:
        async with asyncio.timeout(cfg.body_timeout_s):
            body = await _read_body(request, cfg.max_body_bytes)
    except TimeoutError:
        log.warning("refused a Stripe webhook from %s: body not received within %g s", remote, cfg.body_timeout_s)
        return Answer(408, {"error": f"body not received within {cfg.body_timeout_s:g} s"})
    if body is None:
        log.warning("refused a Stripe webhook from %s: body larger than %d bytes", remote, cfg.max_body_bytes)
        return Answer(413, {"error": f"body larger than {cfg.max_body_bytes} bytes"})
    reason = verify_signature(body, request.headers.get("Stripe-Signature"), cfg.secret, cfg.tolerance_s)
    if reason is not None:
        log.warning("refused a Stripe webhook from %s: %s", remote, reason)
        return Answer(400, {"error": "signature verification failed", "reason": reason})
    try:
        event = parse_event(body)
    except InvalidRecord as exc:
        log.warning("refused a signed Stripe webhook from %s: %s", remote, exc.reason)
        return Answer(400, {"error": "not a Stripe event", "reason": exc.reason})
    key = routing_key({"id": event.id, "data": {"object": dict(event.object)}})
    try:
        await asyncio.wait_for(append(key, body), timeout=cfg.append_timeout_s)
    except Exception as exc:
        what = f"{type(exc).__name__}: {exc}"
        log.error("Stripe event %s not stored (%s); answering 503 so Stripe retries", event.id, what)
        return Answer(503, {"error": "not stored; retry later"})
    log.info("received Stripe event %s (%s)", event.id, event.type)
    return Answer(200, {"received": True, "id": event.id})


# ----------------------------------------------------------------------------------------------- the agent


def _retry_delay_ms(attempts: int, retry_after: float | None) -> int:
    delay = min(MAX_RETRY_DELAY_MS, 2_000 * 2 ** min(attempts, 12))
    delay = int(delay)
    if retry_after is not None:
        delay = max(delay, int(retry_after * 1000))
    return delay


class WebhookRuntime:
    """The agent's and the timer's behaviour, independent of Faust so tests can drive it."""

    def __init__(
        self,
        store: WebhookStore,
        *,
        topic: str,
        authority: Authority | Callable[[], Authority],
        provisioner: StripeProvisioner | None,
    ) -> None:
        """``authority``: who provisions, or a function asked at each event (the cutover state in force can
        change while the worker runs)."""
        self.store = store
        self.topic = topic
        self._authority = authority
        self.provisioner = provisioner
        self._busy: set[str] = set()
        self._lock = asyncio.Lock()

    @property
    def authority(self) -> Authority:
        a = self._authority
        return a if isinstance(a, Authority) else a()

    def receive(self, records: Sequence[tuple[int, int, bytes | None]]) -> list[str]:
        return self.store.receive(self.topic, records, claim_ms=CLAIM_MS)

    def apply(self, event_id: str) -> Outcome | None:
        """Apply one stored event (blocking: Stripe and the ledger). None when it needs nothing (unknown, or
        already final); ``RECEIVED`` when a transient failure left it for the retry timer."""
        inbox = self.store.load(event_id)
        if inbox is None or inbox.outcome in FINAL_OUTCOMES:
            return None
        ev = inbox.event
        action = classify(ev)
        if isinstance(action, Ignore):
            return self.store.finish_ignored(ev.id, action.reason)
        if isinstance(action, SubscriptionChange):
            org = action.org_id or self.store.resolve_org(action.subscription_id, action.customer_id)
            if org is None and self.provisioner is not None:
                org = self.provisioner.org_of_subscription(action.subscription_id)
            if org is None:
                return self.store.finish_ignored(ev.id, "no org_id on the subscription or its customer")
            return self.store.finish_subscription(ev.id, ev.created, action, org)
        return self._setup(ev.id, ev.created, action, inbox.attempts)

    def _setup(self, event_id: str, created: int, action: SetupCheckout, attempts: int) -> Outcome:
        org = action.org_id
        snap = self.store.org_snapshot(org)
        catalog = self.store.catalog()
        keys = [k for k in CATALOG_KEYS if k in catalog] + sorted(set(catalog) - set(CATALOG_KEYS))
        req = ProvisionRequest(
            org, action.customer_id, tuple((k, catalog[k]) for k in keys), snap.generation, snap.credit_txn_id is None
        )
        if self.authority is not Authority.EDGE:
            would = {**req.describe(), "policy": {"plan": "pro", "effective_at": created}, "session": action.session_id}
            return self.store.finish_shadow(event_id, org, action.customer_id, would)
        if snap.paying_subscriptions:
            if snap.credit_txn_id is not None:
                detail = f"already has a paying subscription ({', '.join(snap.paying_subscriptions)})"
                return self.store.finish_noop(event_id, org, detail)
            # A paying subscription without the credit: the one an interrupted provisioning created (its
            # customer.subscription.created came first), or one made elsewhere. Keep it; make sure of the credit.
            req = replace(req, subscription_id=snap.paying_subscriptions[0])
        missing = missing_keys(catalog)
        if missing:
            return self.store.finish_failed(
                event_id, f"price catalog incomplete (no {', '.join(missing)}): run `edgebill stripe setup`", org
            )
        if self.provisioner is None:
            return self.store.finish_failed(event_id, "no Stripe client configured", org)
        out = self.provisioner.provision(req)
        if out.status is Status.OK and out.result is not None:
            return self.store.finish_provisioned(event_id, created, org, out.result)
        if out.status is Status.TRANSIENT:
            delay = _retry_delay_ms(attempts, out.retry_after)
            log.warning("provisioning %s for %s: transient failure, retrying in %.0fs", org, event_id, delay / 1000)
            self.store.retry_later(event_id, out.error or "transient failure", delay)
            return Outcome.RECEIVED
        return self.store.finish_failed(event_id, out.error or "permanent failure", org)

    def _apply_logged(self, event_id: str) -> Outcome | None:
        try:
            outcome = self.apply(event_id)
        except Exception as exc:
            log.exception("applying Stripe event %s failed; it stays received and is retried", event_id)
            try:
                self.store.retry_later(event_id, f"{type(exc).__name__}: {exc}", 5_000)
            except Exception:
                log.exception("could not schedule the retry of %s", event_id)
            return None
        if outcome is not None:
            log.info("Stripe event %s: %s", event_id, outcome.value)
        return outcome

    async def apply_all(self, event_ids: Iterable[str]) -> list[Outcome | None]:
        """Apply events one at a time, each in a thread; an event another task is applying is skipped."""
        outcomes: list[Outcome | None] = []
        for event_id in event_ids:
            if event_id in self._busy:
                continue
            self._busy.add(event_id)
            try:
                outcomes.append(await asyncio.to_thread(self._apply_logged, event_id))
            finally:
                self._busy.discard(event_id)
        return outcomes

    async def publish_pending(self, send: SendPolicy) -> int:
        """Publish the plan records not yet on ``org-policy`` (in decision order), then mark them published."""
        async with self._lock:
            pending = await asyncio.to_thread(self.store.pending_policies)
            done: list[int] = []
            try:
                for p in pending:
                    await send(p)
                    done.append(p.id)
            except Exception:
                n, total = len(done), len(pending)
                log.exception("publishing plan records failed after %d of %d; the rest are retried", n, total)
            if done:
                await asyncio.to_thread(self.store.mark_published, done)
            return len(done)

    async def retry_tick(self, send: SendPolicy) -> None:
        """Apply the events whose retry time has come, then publish what is pending."""
        try:
            due = await asyncio.to_thread(self.store.due)
            await self.apply_all(due)
            await self.publish_pending(send)
        except Exception:
            log.exception("webhook retry run failed; it runs again")


def install_webhooks(app: Any, deps: Deps) -> WebhookRuntime:
    """Register the webhook topic, agent, retry timer and the ``POST /webhooks/stripe`` page on ``app``."""
    from faust.web import View

    cfg = deps.config
    wcfg = cfg.webhooks
    rt = WebhookRuntime(
        WebhookStore(deps.ledger.engine, clock=deps.clock_ms),
        topic=cfg.topics.webhooks,
        authority=lambda: deps.cutover.authority,
        provisioner=deps.provisioner,
    )
    events_topic = app.topic(cfg.topics.webhooks, partitions=cfg.kafka.partitions, **RAW_BYTES)
    policy_topic = app.topic(cfg.topics.policy, partitions=cfg.kafka.partitions, **RAW_BYTES)

    async def append(key: bytes, body: bytes) -> None:
        fut = await events_topic.send(key=key, value=body)
        await fut

    async def send_policy(p: PendingPolicy) -> None:
        fut = await policy_topic.send(key=p.org_id.encode(), value=p.body)
        await fut

    def receive_into(out: list[list[str]], records: Sequence[tuple[int, int, bytes | None]]) -> None:
        out.append(rt.receive(records))

    async def webhook_agent(stream: Any) -> Any:
        async for events in stream.take_events(100, within=0.2):
            records = [(e.message.partition, e.message.offset, e.message.value) for e in events]
            received: list[list[str]] = []
            await retry_forever("webhook inbox write", functools.partial(receive_into, received, records))
            await rt.apply_all(received[-1])
            await rt.publish_pending(send_policy)
            yield len(records)

    app.agent(events_topic, name="edgebill.webhooks")(webhook_agent)

    async def retry() -> None:
        await rt.retry_tick(send_policy)

    app.timer(wcfg.retry_interval_s, on_leader=True, name="edgebill.webhooks-retry")(retry)

    class StripeWebhookView(View):
        async def post(self, request: Any) -> Any:
            answer = await receive_webhook(request, wcfg, append)
            return self.json(answer.body, status=answer.status)

    app.page(WEBHOOK_PATH, name="stripe-webhook")(StripeWebhookView)
    return rt
